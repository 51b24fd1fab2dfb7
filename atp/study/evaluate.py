"""The study's evaluation loop: accuracy and kept tokens per question type.

Answers are one word, so greedy decoding's first token is the argmax of the logits at the last
prompt position: one prefill per batch (left padding), with atp attached or not. With a handle,
the kept tokens after each ATP layer, the Token metric and the policy's thresholds (the atp
policy's theta_r, theta_s per question) come from ``handle.stats`` of the same forward.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from atp.study.shapes import PAD, TYPES, VOCAB, Example, encode, pixels


@dataclass
class Scores:
    """Per question type: accuracy, mean Token metric, mean kept tokens after each ATP layer."""

    correct: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    total: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    tokens: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    kept: dict[str, list[float]] = field(default_factory=dict)
    # per type, threshold name -> one list (a value per ATP layer) per question
    thresholds: dict[str, dict[str, list[list[float]]]] = field(default_factory=dict)
    # per question: (shapes on its canvas, its Token metric)
    busy: list[tuple[int, float]] = field(default_factory=list)

    def accuracy(self, kind: str | None = None) -> float:
        kinds = [kind] if kind else list(self.total)
        total = sum(self.total[k] for k in kinds)
        return sum(self.correct[k] for k in kinds) / total if total else float("nan")

    def avg_tokens(self, kind: str | None = None) -> float:
        kinds = [kind] if kind else list(self.total)
        total = sum(self.total[k] for k in kinds)
        return sum(self.tokens[k] for k in kinds) / total if total else float("nan")

    def threshold_spread(self, kind: str) -> dict[str, dict[str, list[float]]]:
        """Threshold name -> ``{"mean": [..], "std": [..]}`` per ATP layer over the questions of
        ``kind`` (the population standard deviation: 0 for a head that reads no input)."""
        out = {}
        for name, rows in self.thresholds.get(kind, {}).items():
            values = torch.tensor(rows, dtype=torch.float64)  # (questions, K)
            out[name] = {
                "mean": values.mean(0).tolist(),
                "std": values.std(0, correction=0).tolist(),
            }
        return out

    def by_shapes(self) -> dict:
        """How the Token metric follows the image: ``{"tokens": {shapes on the canvas: mean Token},
        "count": {shapes: questions}, "slope": least-squares tokens per extra shape}`` over every
        question (the slope is 0 for a policy whose kept counts ignore the image, nan for one
        canvas size)."""
        counts, sums = defaultdict(int), defaultdict(float)
        for shapes, tokens in self.busy:
            counts[shapes] += 1
            sums[shapes] += tokens
        values = torch.tensor(self.busy, dtype=torch.float64).reshape(-1, 2)
        x, y = values[:, 0] - values[:, 0].mean(), values[:, 1] - values[:, 1].mean()
        spread = float((x * x).sum())
        return {
            "tokens": {str(n): sums[n] / counts[n] for n in sorted(counts)},
            "count": {str(n): counts[n] for n in sorted(counts)},
            "slope": float((x * y).sum()) / spread if spread > 0 else float("nan"),
        }

    def to_dict(self) -> dict:
        kinds = [k for k in TYPES if self.total.get(k)]
        return {
            "accuracy": self.accuracy(),
            "avg_tokens": self.avg_tokens(),
            "by_shapes": self.by_shapes(),
            "per_type": {
                k: {
                    "accuracy": self.accuracy(k),
                    "avg_tokens": self.avg_tokens(k),
                    "kept": [v / self.total[k] for v in self.kept.get(k, [])],
                    "count": self.total[k],
                    **({"thresholds": self.threshold_spread(k)} if self.thresholds.get(k) else {}),
                }
                for k in kinds
            },
        }


def prompt_batch(examples: list[Example], image_tokens: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts (up to ``a :``) with their pixels."""
    prompts = [encode(e, image_tokens, answer=False)[0] for e in examples]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": torch.stack([pixels(e.image) for e in examples]),
    }


@torch.no_grad()
def evaluate(model, examples, handle=None, batch_size: int = 64) -> Scores:
    """Accuracy of ``model`` (eval mode, atp attached through ``handle`` or not) on ``examples``."""
    was_training = model.training
    model.eval()
    image_tokens = model.config.image_seq_length
    scores = Scores()
    examples = list(examples)
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = prompt_batch(chunk, image_tokens)
            logits = model(**batch).logits[:, -1]  # (B, V) at the last prompt token
            predicted = logits.argmax(dim=-1).tolist()
            if handle is not None:
                stats = handle.stats
                tokens = stats.tokens_per_sample.tolist()
                kept = stats.kept.tolist()
                thresholds = {name: value.tolist() for name, value in stats.thresholds.items()}
            else:
                tokens, kept = [float(image_tokens)] * len(chunk), [[] for _ in chunk]
                thresholds = {}
            for row, (e, p, t, k) in enumerate(zip(chunk, predicted, tokens, kept)):
                scores.total[e.kind] += 1
                scores.correct[e.kind] += VOCAB[p] == e.answer
                scores.tokens[e.kind] += t
                scores.busy.append((len(e.shapes), t))
                sums = scores.kept.setdefault(e.kind, [0.0] * len(k))
                for i, value in enumerate(k):
                    sums[i] += value
                for name, values in thresholds.items():
                    scores.thresholds.setdefault(e.kind, {}).setdefault(name, []).append(values[row])
    finally:
        model.train(was_training)
    return scores
