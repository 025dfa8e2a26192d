"""finetune: from task data to a verified, task-specific small language model."""

__version__ = "0.1.0"
