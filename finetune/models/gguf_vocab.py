"""A SentencePiece `tokenizer.model` rebuilt from a GGUF's vocabulary.

llama.cpp's converter reads SentencePiece families (Gemma 2 and 3, Phi-3, Llama 2 / TinyLlama) from
`tokenizer.model`, which transformers 5 neither keeps when it loads a tokenizer from a GGUF nor writes
in `save_pretrained`. A GGUF with a SentencePiece vocabulary (`tokenizer.ggml.model == "llama"`) holds
every piece with its score and type, so the model file can be written back: the converter then turns
it into the same vocabulary again. The vocabulary is read through llama.cpp itself (a vocab-only load).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# llama.cpp token attributes (llama_token_attr) -> SentencePiece piece types.
_ATTR_UNKNOWN, _ATTR_UNUSED, _ATTR_CONTROL, _ATTR_USER_DEFINED, _ATTR_BYTE = 1, 2, 8, 16, 32
_SPACE = "\u2581"  # SentencePiece's escaped space


@dataclass
class GGUFVocab:
    model: str  # tokenizer.ggml.model: "llama" is SentencePiece, "gpt2" byte-level BPE, ...
    tokens: list[str]
    scores: list[float]
    attrs: list[int]
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int
    add_space_prefix: bool


def tokenizer_model(gguf_path: Path) -> str:
    """The GGUF's tokenizer.ggml.model ('llama' = SentencePiece, 'gpt2' = BPE), read from its header only."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields.get("tokenizer.ggml.model")
    return bytes(field.parts[field.data[0]]).decode("utf-8") if field is not None else ""


def read_gguf_vocab(gguf_path: Path) -> GGUFVocab:
    """The vocabulary of a GGUF, as llama.cpp reads it (about 2 s for Gemma's 262k tokens)."""
    import llama_cpp

    from finetune.runtimes.llamacpp import open_gguf

    with open_gguf(Path(gguf_path), vocab_only=True) as llm:
        vocab = llm._model.vocab
        n = llama_cpp.llama_vocab_n_tokens(vocab)
        meta = dict(llm.metadata)
        tokens = [llama_cpp.llama_vocab_get_text(vocab, i).decode("utf-8") for i in range(n)]
        scores = [float(llama_cpp.llama_vocab_get_score(vocab, i)) for i in range(n)]
        attrs = [int(llama_cpp.llama_vocab_get_attr(vocab, i)) for i in range(n)]

    def token_id(key: str) -> int:
        return int(meta.get(f"tokenizer.ggml.{key}", -1))

    return GGUFVocab(model=meta.get("tokenizer.ggml.model", ""), tokens=tokens, scores=scores, attrs=attrs,
                     bos_id=token_id("bos_token_id"), eos_id=token_id("eos_token_id"),
                     unk_id=token_id("unknown_token_id"), pad_id=token_id("padding_token_id"),
                     # llama.cpp's default for SentencePiece vocabularies that do not say
                     add_space_prefix=meta.get("tokenizer.ggml.add_space_prefix", "true") == "true")


def sentencepiece_model(vocab: GGUFVocab, n_pieces: int | None = None) -> bytes:
    """A serialized SentencePiece BPE model of the first `n_pieces` tokens (default: all).

    GGUF control tokens stay control pieces (never produced from raw text); user-defined tokens
    (Gemma's runs of spaces and newlines, HTML tags) stay user-defined, with spaces escaped as
    SentencePiece stores them; padding entries the converter invented become unused pieces.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    if vocab.model != "llama":
        raise ValueError(f"the GGUF vocabulary is {vocab.model!r}, not SentencePiece ('llama')")
    n = len(vocab.tokens) if n_pieces is None else int(n_pieces)
    by_text = {t: i for i, t in enumerate(vocab.tokens[:n])}
    # The SentencePiece model's own BOS/EOS; a GGUF may name an added token as EOS (Phi-3: <|endoftext|>).
    bos = vocab.bos_id if 0 <= vocab.bos_id < n else by_text.get("<s>", -1)
    eos = vocab.eos_id if 0 <= vocab.eos_id < n else by_text.get("</s>", -1)
    pad = vocab.pad_id if 0 <= vocab.pad_id < n and vocab.pad_id not in (bos, eos, vocab.unk_id) else -1
    Piece = pb.ModelProto.SentencePiece
    proto = pb.ModelProto()
    for i in range(n):
        piece, attr = proto.pieces.add(), vocab.attrs[i]
        piece.piece, piece.score = vocab.tokens[i], vocab.scores[i]
        if i == vocab.unk_id:
            piece.type, piece.score = Piece.UNKNOWN, 0.0
        elif i in (bos, eos, pad) or attr & _ATTR_CONTROL:
            piece.type, piece.score = Piece.CONTROL, 0.0
        elif attr & _ATTR_BYTE:
            piece.type = Piece.BYTE
        elif attr & _ATTR_USER_DEFINED:
            piece.type, piece.piece = Piece.USER_DEFINED, vocab.tokens[i].replace(" ", _SPACE)
        elif attr & (_ATTR_UNUSED | _ATTR_UNKNOWN):
            piece.type = Piece.UNUSED
        else:
            piece.type = Piece.NORMAL
    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = n
    spec.byte_fallback = any(a & _ATTR_BYTE for a in vocab.attrs[:n])
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = vocab.unk_id, bos, eos, pad
    for field, i in (("unk_piece", vocab.unk_id), ("bos_piece", bos), ("eos_piece", eos), ("pad_piece", pad)):
        if i >= 0:
            setattr(spec, field, vocab.tokens[i])
    norm = proto.normalizer_spec
    norm.name, norm.add_dummy_prefix = "identity", vocab.add_space_prefix
    norm.remove_extra_whitespaces, norm.escape_whitespaces = False, True
    return proto.SerializeToString()


def write_sentencepiece_model(gguf_path: Path, out_path: Path, n_pieces: int | None = None) -> Path | None:
    """Write `out_path` (tokenizer.model) from the GGUF's vocabulary; None if it is not SentencePiece."""
    if tokenizer_model(gguf_path) != "llama":  # BPE (gpt2) vocabularies need no tokenizer.model
        return None
    vocab = read_gguf_vocab(gguf_path)
    Path(out_path).write_bytes(sentencepiece_model(vocab, n_pieces))
    return Path(out_path)
