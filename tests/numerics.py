"""How the tests compare float32 results that come from the same model computed in another order.

Two runs of one tiny model that differ only in the order of their float32 reductions -- drop vs
mask mode (shorter sequences: other matmul and SDPA blocking), a left-padded batch vs a sample
alone, a mixture-of-experts layer whose expert matmuls take other shapes, AVX2 vs AVX-512
kernels -- agree up to rounding, not bitwise. The tolerance below is argued from the arithmetic,
and greedy tokens are compared where their scores are not a tie up to that rounding.
"""

from __future__ import annotations

import torch

# Bound on |a - b| for logits (and step scores) of such runs. The tiny models' logits stay below
# ~1.2 (hidden 64, init std 0.02; RMSNorm before every block and the LM head keeps each dot
# product's terms O(1)). A float32 dot product of n <= 128 terms (hidden 64, MLP 128, head dim 16,
# prompts of <= ~150 keys in attention) rounds within n * 2**-24 ~ 8e-6 of the sum of its terms'
# magnitudes in any order (Higham's gamma_n; ~sqrt(n) * 2**-24 ~ 7e-7 typically); over <= 6 layers
# plus the LM head that stays below 1e-4 absolute, and relative for a logit far from 0. A pruned
# token leaking in, or a kept one lost, moves a text logit by >= 1e-2: 100x this bound.
REORDERED = {"rtol": 1e-4, "atol": 1e-4}


def greedy_steps(model, inputs: dict, n: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy new tokens (B, n) and their step scores (B, n, V) of ``model.generate``."""
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=n,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            **kwargs,
        )
    return out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.scores, dim=1)


def assert_same_continuation(first, second, pad: int = 0, tolerance: dict | None = None) -> None:
    """Greedy continuations of one sample that should agree: ``(tokens (T,), scores (T, V))``.

    The scores agree at every step within ``tolerance`` (REORDERED by default) and so do the
    tokens, unless both runs' scores agree but the tokens do not: then the top two scores are
    within twice the tolerance (a tie decided by rounding) and the runs may go apart from there.
    ``second`` may stop earlier (its run ended at the end-of-sequence token; a batch pads on).
    """
    tolerance = REORDERED if tolerance is None else tolerance
    (tokens, scores), (other_tokens, other_scores) = first, second
    steps = len(other_tokens)
    assert len(tokens) >= steps
    for t in range(steps):
        torch.testing.assert_close(scores[t], other_scores[t], **tolerance, msg=f"scores of new token {t}")
        if tokens[t] != other_tokens[t]:
            return
    assert bool((tokens[steps:] == pad).all()), f"tokens after the end: {tokens[steps:].tolist()}"


def assert_same_greedy(first, second, pad: int = 0, tolerance: dict | None = None) -> None:
    """:func:`assert_same_continuation` for every sample of two :func:`greedy_steps` results
    (B, T) and (B, T', V) of the same batch (generate stops early once every sample has ended)."""
    if first[0].shape[1] < second[0].shape[1]:
        first, second = second, first
    (tokens, scores), (other_tokens, other_scores) = first, second
    assert tokens.shape[0] == other_tokens.shape[0]
    for b in range(tokens.shape[0]):
        assert_same_continuation(
            (tokens[b], scores[b]), (other_tokens[b], other_scores[b]), pad=pad, tolerance=tolerance
        )
