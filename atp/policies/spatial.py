"""Uniform spatial sampling only (PruMerge+-style grid keeping)."""

from __future__ import annotations

from atp.policies.base import Decision, Policy, PolicyContext, PolicyInput


class SpatialPolicy(Policy):
    """Keep the tokens on a uniform grid: at ATP layer k, those whose row and column are
    multiples of ``strides[k]`` (per image grid). No attention scores are computed.

    Options
    -------
    strides : one stride per ATP layer (2 keeps a quarter, 4 a sixteenth, ...).
    lambda_sample : as in the atp policy's spatial score (only the grid matters here).
    """

    def __init__(self, context: PolicyContext, strides: list[int] | None = None, lambda_sample: float = 3.0):
        super().__init__(context)
        if strides is None or len(strides) != len(context.layers):
            raise ValueError(
                f"the 'spatial' policy needs strides=[...], one per ATP layer ({len(context.layers)})"
            )
        for stride in strides:
            if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
                raise ValueError(f"strides must be positive ints, got {stride!r}")
        self.strides = list(strides)
        self.lambda_sample = float(lambda_sample)
        self.spatial_strides = tuple(sorted({s for s in self.strides if s > 1})) or None

    def decide(self, inputs: PolicyInput) -> Decision:
        stride = self.strides[inputs.index]
        if stride == 1:
            return Decision(inputs.live.float())
        threshold = 1.0 - self.lambda_sample / stride**2 - 1e-6  # the stride-s grid and every coarser one
        return Decision(((inputs.spatial >= threshold) & inputs.live).float())
