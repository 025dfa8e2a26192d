"""Export stages: merge (safetensors), gptq (4-bit GPTQ), gguf (llama.cpp), ollama (Modelfile).

Each stage writes into a `.tmp-*` sibling, verifies what it wrote, and only then moves it into place.
Adding a format: one module with its stage function `fn(cfg, run) -> dict`, plus one row of the stage
table in finetune/pipeline.py (docs/architecture.md).
"""
