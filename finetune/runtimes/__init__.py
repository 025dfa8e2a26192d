"""The runtimes that serve a model: transformers (batched generation, stop tokens) and llama.cpp (GGUF
loading, tokenizing, generation), with the types they share (generation)."""
