"""SentencePiece tokenizer.model rebuilt from a GGUF vocabulary (finetune.gguf_vocab), checked against
llama.cpp's own tokenizer test vectors (texts and the ids the real tokenizer gave them), and the
transformers tokenizer of a SentencePiece family against llama.cpp on chat prompts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from finetune.core.config import compose
from finetune.models.gguf_vocab import read_gguf_vocab, sentencepiece_model, tokenizer_model, write_sentencepiece_model
from finetune.models.gguf_source import packaged_gguf_path
from finetune.models.loading import load_tokenizer
from finetune.runtimes.llamacpp import open_gguf

sys.path.insert(0, str(Path(__file__).parent))
from export_support import llama_cpp_vocab, real_tokenizer_dir  # noqa: E402


def _vectors(gguf: Path) -> list[tuple[str, list[int]]]:
    texts = gguf.with_name(gguf.name + ".inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = gguf.with_name(gguf.name + ".out").read_text(encoding="utf-8").split("\n")
    return [(t, [int(x) for x in i.split()]) for t, i in zip(texts, ids)]


@pytest.mark.parametrize("name", ["ggml-vocab-phi-3.gguf", "ggml-vocab-llama-spm.gguf"])
def test_rebuilt_sentencepiece_model_tokenizes_like_the_original(name, tmp_path):
    import sentencepiece as spm

    gguf = llama_cpp_vocab(name)
    vocab = read_gguf_vocab(gguf)
    assert vocab.model == tokenizer_model(gguf) == "llama" and len(vocab.tokens) >= 32000
    path = tmp_path / "tokenizer.model"
    path.write_bytes(sentencepiece_model(vocab, n_pieces=32000))  # Phi-3's chat tokens are added tokens
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2) and sp.get_piece_size() == 32000
    vectors = _vectors(gguf)
    assert len(vectors) > 30
    for text, ids in vectors:
        assert sp.encode(text) == ids, text


def test_a_byte_level_vocabulary_has_no_sentencepiece_model(tmp_path):
    gguf = packaged_gguf_path(compose(["model=smollm2"]).model)  # SmolLM2: GPT-2 style BPE
    assert tokenizer_model(gguf) == "gpt2"  # read from the header: no llama.cpp needed (GPU hosts lack it)
    assert write_sentencepiece_model(gguf, tmp_path / "tokenizer.model") is None
    assert not (tmp_path / "tokenizer.model").exists()


def test_phi3_tokenizer_gives_llama_cpp_ids_on_chat_prompts():
    """transformers 5 with Phi-3's `legacy: false` drops the word-start space after a chat token
    ("<|user|>Hello" -> "Hello"); llama.cpp, SentencePiece and transformers 4 keep it ("▁Hello").
    load_tokenizer makes transformers tokenize as llama.cpp will serve the model."""
    from transformers import AutoTokenizer

    path = str(real_tokenizer_dir("phi3"))
    texts = ["<|user|>\nHello world<|end|>\n<|assistant|>\n",
             "<|system|>\nSplit the address.<|end|>\n<|user|>\nAddress: 12 Main St<|end|>\n<|assistant|>\n"
             '{"AddressNumber": "12"}<|end|>\n<|endoftext|>',
             "<|user|>\na    b\n  indented {{ x }} 🙂<|end|>\n<|assistant|>\n"]
    fixed = load_tokenizer(compose(["model=phi3"]).model, path=path)
    plain = AutoTokenizer.from_pretrained(path)
    with open_gguf(llama_cpp_vocab("ggml-vocab-phi-3.gguf"), vocab_only=True) as llm:
        served = [llm.tokenize(t.encode(), add_bos=False, special=True) for t in texts]
    for text, ids in zip(texts, served):
        assert fixed(text, add_special_tokens=False)["input_ids"] == ids, text
    assert plain(texts[0], add_special_tokens=False)["input_ids"] != served[0]  # what the fix is for
