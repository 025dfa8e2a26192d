"""Per-token log-probabilities of what `model.generate` chose, recorded as a logits processor.

The processor sits first in the list, so it sees the model's raw scores (before a grammar mask). At each
step it keeps the log-softmax of the scores; at the next step the token just chosen is the last column of
`input_ids`, and its log-probability is read from the kept distribution. Only one step's distribution is
held (batch x vocabulary), never the whole history.
"""

from __future__ import annotations

from typing import Any

from transformers import LogitsProcessor


class TokenLogprobs(LogitsProcessor):
    def __init__(self) -> None:
        self.steps: list[Any] = []  # per step: the chosen tokens' log-probabilities, one per row
        self.last: Any = None  # log-softmax of the latest step's scores

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if self.last is not None:
            self.steps.append(self.last.gather(1, input_ids[:, -1:]).squeeze(1))
        self.last = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def rows(self, generated: Any) -> list[list[float]]:
        """Per row, the log-probability of each generated token (`generated`: batch x new tokens)."""
        import torch

        steps = list(self.steps)
        if self.last is not None and generated.shape[1] > len(steps):
            steps.append(self.last.gather(1, generated[:, len(steps) : len(steps) + 1].to(self.last.device)).squeeze(1))
        if not steps:
            return [[] for _ in range(generated.shape[0])]
        return torch.stack(steps, dim=1).tolist()
