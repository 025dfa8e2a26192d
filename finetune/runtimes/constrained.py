"""Grammar-constrained decoding in transformers, through llguidance, with the GBNF grammar llama.cpp gets.

`GrammarMask` is a transformers LogitsProcessor. For each row of a batch it keeps an llguidance matcher,
feeds it the token the row generated last, and sets the logit of every token the grammar does not allow
next to -inf. Allowed tokens keep their logits, so a greedy answer that already fits the grammar comes
out unchanged. The model's stop tokens are the grammar's end: allowed only once the answer is complete,
and then the only tokens allowed (after the optional space llama.cpp's schema grammars end with), so
the answer ends on the model's end-of-turn token as an unconstrained one does. It runs before
temperature and top-p, so sampling draws only from allowed tokens.
"""

from __future__ import annotations

from typing import Any

from transformers import LogitsProcessor

from finetune.core.errors import ConfigError


def llguidance_tokenizer(tokenizer: Any, stop_ids: list[int], n_vocab: int) -> Any:
    """llguidance's view of a Hugging Face tokenizer, the stop tokens as its end-of-sequence tokens."""
    import llguidance.hf

    try:
        return llguidance.hf.from_tokenizer(tokenizer, n_vocab=n_vocab, eos_token=list(stop_ids))
    except ValueError as exc:
        raise ConfigError(f"constrained decoding in transformers needs a fast (Rust) tokenizer: {exc}; "
                          f"set evaluate.constrained=false to evaluate without constraints") from None


def grammar_matcher(lltokenizer: Any, grammar: str) -> Any:
    """A fresh llguidance matcher for a GBNF grammar; ValueError naming the problem if it does not compile."""
    import llguidance

    matcher = llguidance.LLMatcher(lltokenizer, llguidance.grammar_from("gbnf", grammar), log_level=0)
    if matcher.is_error():
        raise ValueError(f"llguidance cannot use the grammar: {matcher.get_error()}\n{grammar[:2000]}")
    return matcher


def prototypes(lltokenizer: Any, grammars: list[str | None]) -> list[Any]:
    """A matcher for each grammar in the list (None for None), each distinct grammar compiled once; an
    answer starts from a deep copy of its prompt's."""
    compiled: dict[str, Any] = {}
    for grammar in grammars:
        if grammar is not None and grammar not in compiled:
            compiled[grammar] = grammar_matcher(lltokenizer, grammar)
    return [compiled[g] if g is not None else None for g in grammars]


def accepts(matcher: Any, tokens: list[int]) -> bool:
    """Whether the grammar allows exactly these tokens as a whole answer (the matcher is used up)."""
    return matcher.consume_tokens(list(tokens)) and matcher.is_accepting()


def advance(matcher: Any, token: int, row: int) -> None:
    """Feed the token a row generated to its matcher; the mask allowed it, so a refusal is a bug."""
    if not matcher.consume_token(token):
        raise RuntimeError(f"row {row}: token {token} broke the grammar it was allowed by: {matcher.get_error()}")


def blocked_tokens(matchers: list[Any], vocab: int) -> Any:
    """Per row, True for each of the `vocab` ids its matcher does not allow next (a None matcher: nothing blocked)."""
    import torch

    blocked = torch.zeros((len(matchers), vocab), dtype=torch.bool)
    for i, matcher in enumerate(matchers):
        if matcher is None:
            continue
        allowed = torch.frombuffer(bytearray(matcher.compute_logit_bias()), dtype=torch.uint8)[:vocab] != 0
        blocked[i, : allowed.shape[0]] = ~allowed
        blocked[i, allowed.shape[0]:] = True  # ids the tokenizer does not have
    return blocked


class GrammarMask(LogitsProcessor):
    """Masks one batch of generate(): row i follows its own copy of its grammar (`grammars`: one per row)."""

    def __init__(self, lltokenizer: Any, grammars: list[str | None], stop_ids: list[int]):
        self.matchers = [m.deep_copy() if m is not None else None for m in prototypes(lltokenizer, grammars)]
        self.stop_ids = set(stop_ids)
        self.done = [m is None for m in self.matchers]  # a row without a grammar is never masked
        self.started = False

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self.started:  # the previous step's tokens: advance each row's grammar
            for i, token in enumerate(input_ids[:, -1].tolist()):
                if self.done[i]:
                    continue
                if token in self.stop_ids:
                    self.done[i] = True  # later tokens of this row are padding
                else:
                    advance(self.matchers[i], token, i)
        self.started = True
        live = [None if done else m for m, done in zip(self.matchers, self.done)]
        blocked = blocked_tokens(live, scores.shape[-1])
        return scores.masked_fill(blocked.to(scores.device), float("-inf"))
