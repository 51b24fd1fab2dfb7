"""Multi-granularity spatial score (Sec. 3.3.1, Eq. 5), made continuous.

Eq. 5 gives the tokens of the stride-s grid (row and column multiples of s, sampling rate
R_s = 1 / s^2) the level 1 - R_s * lambda_sample. Used as it stands, that score is a step
function: the spatial branch's kept count jumps at a few level values and cannot move in
between (its threshold gets no gradient there), and the tokens on no grid all score 0, so
in training each keeps a soft weight sigmoid(-theta_s T) that inference never keeps.

atp keeps Eq. 5's levels as the boundaries and spreads each level's tokens evenly over the
band up to the next level, in a progressive spatial order: every token has its own score in
(0, 1], the tokens off every grid fill the lowest band (0, level of the finest grid], and
a threshold at a level value keeps exactly that grid and the coarser ones, as Eq. 5 does. In
between, the kept set grows token by token, still spread over the image, and the grids nest.
"""

from __future__ import annotations

import functools

import torch


def default_strides(height: int, width: int) -> tuple[int, ...]:
    """Strides 2, 4, 8, ... up to half the grid's longer side (24 x 24 -> (2, 4, 8))."""
    strides, stride = [], 2
    while stride <= max(height, width) // 2:
        strides.append(stride)
        stride *= 2
    return tuple(strides) or (2,)


def level(stride: int, lambda_sample: float = 1.0) -> float:
    """Eq. 5's score of the stride-``stride`` grid, 1 - lambda_sample / stride^2, floored at 0
    and rounded to float32 as the scores are (a token off every grid is at level 0)."""
    if stride <= 1:
        return 0.0
    return float(torch.tensor(max(0.0, 1.0 - lambda_sample / stride**2), dtype=torch.float32))


def progressive_order(height: int, width: int) -> torch.Tensor:
    """LongTensor (height * width,): each token's rank in a coarse-to-fine order that spreads
    every prefix over the grid (bit-reversed Morton order: a 2-D van der Corput sequence)."""
    bits = max(1, (max(height, width) - 1).bit_length())
    rows = torch.arange(height)[:, None].expand(height, width).flatten()
    cols = torch.arange(width)[None, :].expand(height, width).flatten()
    key = torch.zeros_like(rows)
    for b in range(bits):  # the lowest bits of row and column lead: coarse grids come first
        key |= ((rows >> b) & 1) << (2 * (bits - 1 - b) + 1)
        key |= ((cols >> b) & 1) << (2 * (bits - 1 - b))
    rank = torch.empty_like(key)
    rank[key.argsort()] = torch.arange(key.numel())
    return rank


@functools.lru_cache(maxsize=64)
def grid_scores(
    height: int, width: int, lambda_sample: float = 1.0, strides: tuple[int, ...] | None = None
) -> torch.Tensor:
    """Spatial scores of an (height x width) token grid, row-major, float32 (height * width,).

    A token's level is Eq. 5's score of the coarsest grid it lies on (0 on none); the tokens
    of one level take evenly spaced scores in (level, next level] (the top level up to 1),
    in :func:`progressive_order`. So ``score > level(s)`` keeps exactly the stride-s grid and
    the coarser ones, every score differs, and a higher threshold keeps a subset.
    """
    if height < 1 or width < 1:
        raise ValueError(f"grid must be at least 1 x 1, got {height} x {width}")
    strides = default_strides(height, width) if strides is None else tuple(sorted(strides))
    rows = torch.arange(height)[:, None]
    cols = torch.arange(width)[None, :]
    levels = torch.zeros(height, width, dtype=torch.float64)
    for stride in strides:
        on_grid = (rows % stride == 0) & (cols % stride == 0)
        levels = torch.where(on_grid, torch.tensor(level(stride, lambda_sample), dtype=torch.float64), levels)
    levels = levels.flatten()
    rank = progressive_order(height, width)
    values = sorted(set(levels.tolist()))
    score = torch.zeros(height * width, dtype=torch.float64)
    for low, high in zip(values, [*values[1:], 1.0]):
        members = (levels == low).nonzero().flatten()
        order = rank[members].argsort()  # first in the progressive order scores highest
        count = members.numel()
        steps = torch.arange(count, 0, -1, dtype=torch.float64) / count  # 1, ..., 1 / count
        score[members[order]] = low + (high - low) * steps
    return score.float()


def spatial_scores(
    grids: list[list[tuple[int, int]]],
    width: int,
    lambda_sample: float = 1.0,
    strides: tuple[int, ...] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Per-sample spatial scores (B, width) for images laid out one after another in visual order.

    ``grids[b]`` lists the (height, width) of each image of sample b; slots beyond the
    sample's images (padding of a batch) score 0.
    """
    out = torch.zeros(len(grids), width)
    for b, sample in enumerate(grids):
        offset = 0
        for h, w in sample:
            out[b, offset : offset + h * w] = grid_scores(h, w, lambda_sample, strides)
            offset += h * w
    return out.to(device)
