"""Uniform spatial sampling only (PruMerge+-style grid keeping)."""

from __future__ import annotations

from atp.policies.base import Decision, Policy, PolicyContext, PolicyInput
from atp.policies.options import OptionCheck
from atp.scorers.spatial import level


class SpatialPolicy(Policy):
    """Keep the tokens on a uniform grid: at ATP layer k, those whose row and column are
    multiples of ``strides[k]`` (per image grid). No attention scores are computed.

    Options
    -------
    strides : one stride per ATP layer (2 keeps a quarter, 4 a sixteenth, ...); each a multiple
        of the one before, since a token pruned earlier stays pruned.
    lambda_sample : as in the atp policy's spatial score, in (0, s^2) for the smallest stride
        s > 1 (only the grid matters here).
    """

    name = "spatial"

    def __init__(self, context: PolicyContext, strides: list[int] | None = None, lambda_sample: float = 3.0):
        super().__init__(context)
        check = OptionCheck(self.name)
        self.strides = check.per_layer(
            "strides",
            strides,
            context.layers,
            "one stride",
            lambda name, value: check.integer(name, value, 1),
        )
        before = 1  # the last stride that pruned (1 keeps every live token)
        for index, stride in enumerate(self.strides):
            if stride > 1 and stride % before:
                instead = before * max(1, round(stride / before))
                raise ValueError(
                    f"policy 'spatial': option strides[{index}] = {stride} is not a multiple of {before}, an "
                    f"earlier stride: the stride-{stride} grid is not inside the tokens the stride-{before} "
                    f"grid kept, since a token pruned earlier stays pruned (e.g. strides[{index}] = {instead})"
                )
            before = max(before, stride)
        self.spatial_strides = tuple(sorted({s for s in self.strides if s > 1})) or None
        finest = min(self.spatial_strides or (2,))
        # at or above s^2 the stride-s grid scores 0 like the tokens off every grid
        self.lambda_sample = check.real("lambda_sample", lambda_sample, 0.0, finest**2, True, True)

    def decide(self, inputs: PolicyInput) -> Decision:
        stride = self.strides[inputs.index]
        if stride == 1:
            return Decision(inputs.live.float())
        # exactly the stride-s grid and every coarser one (atp.scorers.spatial.grid_scores)
        keep = (inputs.spatial > level(stride, self.lambda_sample)) & inputs.live
        return Decision(keep.float(), reasons={"spatial": keep})
