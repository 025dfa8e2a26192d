"""The train stage (stage) and what it is built from: the starting model and precision (model), our TRL
trainer (trl_hooks), callbacks, checkpoints and resume (checkpoints), experiment trackers (tracking)."""
