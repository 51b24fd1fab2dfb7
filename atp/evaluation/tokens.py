"""Per-sample kept tokens, carried to lmms-eval's logged samples, and their summary.

lmms-eval 0.7 lets a model report per-request token usage: a request answered with a
``GenerationResult(text, token_counts)`` is logged with ``token_counts.to_dict()`` in the
sample's ``token_counts`` list. :class:`KeptTokenCounts` adds ``kept_tokens`` (one count per
ATP layer) and ``avg_tokens`` (the paper's "Token" metric) to that dict. :class:`TokenLedger`
keeps the metric per document and, when the model is cleaned up after the last request,
reports its mean through lmms-eval's throughput log, which the results file holds under
``throughput`` as ``avg_tokens`` (and ``avg_tokens/TASK`` per task).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from lmms_eval.api.instance import TokenCounts


@dataclass
class KeptTokenCounts(TokenCounts):
    """lmms-eval's token counts plus what atp kept for this request."""

    kept_tokens: list[int] = field(default_factory=list)  # (K,) after each ATP layer; [] unpruned
    avg_tokens: float | None = None

    def to_dict(self) -> dict:
        return {**super().to_dict(), "kept_tokens": self.kept_tokens, "avg_tokens": self.avg_tokens}


@dataclass
class TokenLedger:
    """The Token metric of every answered request, by (task, doc_id)."""

    tokens: dict[tuple[str, object], list[float]] = field(default_factory=lambda: defaultdict(list))
    elapsed: float = 0.0
    generated: int = 0
    requests: int = 0

    def add(self, task: str, doc_id, avg_tokens: float) -> None:
        self.tokens[(task, doc_id)].append(avg_tokens)

    def gathered(self) -> tuple[dict[tuple[str, object], list[float]], float, int]:
        """Every rank's entries, summed time and generated tokens (under data parallel all ranks
        must call this together)."""
        mine = (dict(self.tokens), self.elapsed, self.generated)
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return mine
        parts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, mine)
        merged = defaultdict(list)
        for tokens, _, _ in parts:
            for key, values in tokens.items():
                merged[key].extend(values)
        return dict(merged), sum(part[1] for part in parts), sum(part[2] for part in parts)

    def summary(self) -> tuple[dict[str, float], float, int]:
        """``{"tokens": mean over documents, "tokens/TASK": ...}``, seconds spent generating and
        tokens generated, over all ranks; a document's value is the mean over its requests (one per
        choice of a multiple-choice question)."""
        tokens, elapsed, generated = self.gathered()
        per_doc = {key: sum(values) / len(values) for key, values in tokens.items() if values}
        if not per_doc:
            return {}, elapsed, generated
        by_task = defaultdict(list)
        for (task, _), value in per_doc.items():
            by_task[task].append(value)
        out = {"tokens": sum(per_doc.values()) / len(per_doc)}
        out.update({f"tokens/{task}": sum(values) / len(values) for task, values in sorted(by_task.items())})
        return out, elapsed, generated
