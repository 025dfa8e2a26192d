"""One answer of the batched llama.cpp path (finetune.runtimes.llamacpp_batch), stopped exactly where
llama-cpp-python's create_completion stops it, so both paths give the same text and token count."""

from __future__ import annotations

from typing import Any


class AnswerState:
    """One answer's tokens and text, stopped as llama-cpp-python's create_completion stops: at an
    end-of-generation token (not counted), at the first listed stop string found in the text (the text
    cut there, the token counted), or at max_tokens; stop checks wait while the text ends inside a
    UTF-8 character (its multibyte_fix, copied as it is)."""

    def __init__(self, stops: list[bytes], max_tokens: int, bos: int, piece: Any):
        self.stops, self.max_tokens, self.bos, self.piece = stops, max_tokens, bos, piece
        self.tokens: list[int] = []
        self.raw = b""
        self.multibyte_fix = 0
        self.text: bytes | None = None  # set when finished
        self.stopped = False

    def _all_text(self) -> bytes:
        # llama-cpp-python's detokenize drops the space a leading BOS piece starts with
        if self.tokens and self.tokens[0] == self.bos and self.raw[:1] == b" ":
            return self.raw[1:]
        return self.raw

    def add(self, token: int, is_eog: bool) -> bool:
        """Take the next sampled token; True when the answer is finished."""
        if is_eog:
            self.text, self.stopped = self._all_text(), True
            return True
        self.tokens.append(token)
        self.raw += self.piece(token)
        all_text = self._all_text()
        for k, char in enumerate(all_text[-3:]):
            k = 3 - k
            for num, pattern in [(2, 192), (3, 224), (4, 240)]:
                if num > k and pattern & char == pattern:
                    self.multibyte_fix = num - k
        if self.multibyte_fix > 0:
            self.multibyte_fix -= 1
            return False
        hits = [s for s in self.stops if s in all_text]
        if hits:
            self.text, self.stopped = all_text[: all_text.index(hits[0])], True
            return True
        if len(self.tokens) >= self.max_tokens:
            self.text = all_text
            return True
        return False

    def cut(self) -> None:
        """Finish at the end of the sequence's context (only reachable past max_tokens, see multibyte_fix)."""
        self.text = self._all_text()
