"""Export stages: merge (safetensors), gptq (4-bit GPTQ), gguf (llama.cpp), ollama (Modelfile).

Each stage writes into a `.tmp-*` sibling, verifies what it wrote, and only then moves it into place.
"""


class ExportError(RuntimeError):
    """An export step failed or an exported artifact did not pass its check; the message says which."""
