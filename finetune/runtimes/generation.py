"""What both runtimes share: the settings of a generation, its result, and the BOS rule.

Both runtimes (finetune.runtimes.transformers, finetune.runtimes.llamacpp) stop on the model's
end-of-turn tokens and count only the tokens generated before the stop, so tokens/s compare across them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence, Union

# What a runtime decodes under: one GBNF grammar for every prompt, one per prompt, or None (free text).
Grammars = Union[str, Sequence[Union[str, None]], None]


def common_prefix(token_lists: list[list[int]], keep: int) -> int:
    """Tokens every list starts with, leaving each at least `keep` of its own (0 for fewer than two lists): the
    prompt opening both runtimes compute once per call."""
    if len(token_lists) < 2:
        return 0
    first, limit = token_lists[0], min(len(t) for t in token_lists) - keep
    length = 0
    while length < limit and all(t[length] == first[length] for t in token_lists):
        length += 1
    return length


def longest_prompt(tokenizer: Any, prompts: list[str]) -> int:
    """Tokens of the longest of `prompts` (rendered prompt texts, tokenized as they are)."""
    return max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)


def context_needed(longest: int, max_new_tokens: int) -> int:
    """Tokens a runtime's context must hold for prompts of up to `longest` tokens: the answer and 16 to spare."""
    return longest + max_new_tokens + 16


def per_prompt(grammar: Grammars, n: int) -> list[str | None]:
    """One grammar (or None) for each of `n` prompts: `grammar` for all, or a list giving each its own."""
    if grammar is None or isinstance(grammar, str):
        return [grammar] * n
    grammars = list(grammar)
    if len(grammars) != n:
        raise ValueError(f"{len(grammars)} grammars for {n} prompts")
    return grammars


@dataclass
class Generation:
    text: str  # decoded answer, up to (not including) the stop token
    n_tokens: int  # tokens generated before the stop
    latency_s: float  # wall time until this answer was available (its whole batch, when batched)
    stopped: bool  # ended on a stop token (False: cut at max_new_tokens)
    batch: int = 0  # answers generated together share one latency
    # Natural log-probability of each generated token (the stop token not included) under the model's own
    # distribution before any grammar mask: the confidence signals of finetune.route. None: not recorded.
    logprobs: list[float] | None = None
    # Under a grammar, greedy: whether the grammar changed any choice (a token other than the raw argmax). An
    # unsteered answer is the model's unconstrained greedy answer too. None: not recorded.
    steered: bool | None = None


@dataclass
class Sampling:
    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 42

    @property
    def greedy(self) -> bool:
        """Argmax decoding: no sampling, or sampling at temperature 0 (llama.cpp's greedy sampler)."""
        return not self.do_sample or self.temperature == 0.0

    def decides_answers(self) -> dict:
        """The settings the answers depend on: under greedy decoding the length only (temperature, top_p and the
        seed change nothing), so runs that differ in method.seed share cached base-model answers."""
        if self.greedy:
            return {"max_new_tokens": self.max_new_tokens, "greedy": True}
        return asdict(self)


def adds_bos(bos_token: str | None, prompt: str) -> bool:
    """Let the tokenizer add its special tokens only when the chat template did not write BOS itself.

    Templates such as Llama 3's and Gemma's render the BOS text; tokenizing that with special tokens
    on would start the prompt with two BOS tokens. Both runtimes use this rule.
    """
    return not (bos_token and prompt.startswith(bos_token))
