"""Models: resolving weights and tokenizer from a path, a package or the hub (loading), the chat-template
families (families), and a SentencePiece tokenizer.model rebuilt from a GGUF (gguf_vocab)."""
