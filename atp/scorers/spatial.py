"""Multi-granularity spatial score (Sec. 3.3.1, Eq. 5)."""

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


@functools.lru_cache(maxsize=64)
def grid_scores(
    height: int, width: int, lambda_sample: float = 3.0, strides: tuple[int, ...] | None = None
) -> torch.Tensor:
    """Spatial scores of an (height x width) token grid, row-major, float32 (height * width,).

    A token lies on the stride-s grid when its row and column are multiples of s; that grid
    samples at rate R_s = 1 / s^2 and scores 1 - R_s * lambda_sample. A token's score is the
    maximum over the grids it lies on (0 on none), so coarser grids score higher and the
    grids nest: a higher threshold keeps a subset.
    """
    if height < 1 or width < 1:
        raise ValueError(f"grid must be at least 1 x 1, got {height} x {width}")
    strides = default_strides(height, width) if strides is None else tuple(sorted(strides))
    rows = torch.arange(height)[:, None]
    cols = torch.arange(width)[None, :]
    score = torch.zeros(height, width)
    for stride in strides:
        on_grid = (rows % stride == 0) & (cols % stride == 0)
        score = torch.where(on_grid, torch.full_like(score, 1.0 - lambda_sample / stride**2), score)
    return score.clamp_min(0.0).flatten()


def spatial_scores(
    grids: list[list[tuple[int, int]]],
    width: int,
    lambda_sample: float = 3.0,
    strides: tuple[int, ...] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Per-sample spatial scores (B, width) for images laid out one after another in visual order.

    ``grids[b]`` lists the (height, width) of each image of sample b; tokens beyond the
    sample's images score 0.
    """
    out = torch.zeros(len(grids), width)
    for b, sample in enumerate(grids):
        offset = 0
        for h, w in sample:
            out[b, offset : offset + h * w] = grid_scores(h, w, lambda_sample, strides)
            offset += h * w
    return out.to(device)
