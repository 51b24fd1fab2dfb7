"""Every baseline's settings at one Token metric: the paper's comparison at equal average tokens.

The Token metric is the mean over decoder layers of the visual tokens each layer sees. Each
method below is set by fractions of the tokens alive (ratios, strides), not by counts, so the
same settings hold for one image or several and for dynamic resolution; the metric they give,
as a fraction of the unpruned visual tokens, depends only on the number of decoder layers.
Layers follow the papers' choices for a 32-layer model (FastV at 2, PDrop at 2 / 6 / 12,
fixed ratios at ATP's 4 / 14 / 24), scaled to the model's depth.

    >>> [m.name for m in matched_methods(32, 0.25)]
    ['unpruned', 'fastv', 'pdrop', 'fixed', 'random', 'spatial', 'pool']
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from atp.core.efficiency import tokens_per_layer

PAPER_DEPTH = 32  # LLaVA-1.5-7B, the depth the layer choices below are given for
FASTV_LAYER = 2
PDROP_LAYERS = (2, 6, 12)
ATP_LAYERS = (4, 14, 24)
SPATIAL_STRIDES = (2, 4)


class _Unreachable(ValueError):
    """A method cannot reach the target on this model (a row left out, with the reason)."""


@dataclass(frozen=True)
class Method:
    """One row of the comparison: lmms-eval ``--model_args`` (after ``pretrained=``) and the
    Token metric it gives as a fraction of the unpruned visual tokens (rounding aside). A method
    that cannot reach the target has ``model_args`` None and the reason in ``skipped``."""

    name: str
    model_args: str | None
    fraction: float
    skipped: str = ""

    def to_dict(self) -> dict:
        out = {"name": self.name, "model_args": self.model_args, "fraction": self.fraction}
        return {**out, "skipped": self.skipped} if self.skipped else out


def scaled_layers(layers: tuple[int, ...], num_layers: int) -> list[int]:
    """``layers`` of a 32-layer model at the same relative depth of a ``num_layers`` one: increasing,
    each in 1..num_layers - 1 (layer 0 has no earlier attention to score with)."""
    if num_layers < len(layers) + 1:
        raise _Unreachable(
            f"its {len(layers)} pruning layers need a model of at least {len(layers) + 1} layers"
        )
    out: list[int] = []
    for index, layer in enumerate(layers):
        lowest = out[-1] + 1 if out else 1
        highest = num_layers - (len(layers) - index)
        out.append(min(max(round(layer * num_layers / PAPER_DEPTH), lowest), highest))
    return out


def schedule_fraction(num_layers: int, layers: list[int], kept: list[float]) -> float:
    """The Token metric over the unpruned count when ATP layer ``k`` leaves ``kept[k]`` (fractions
    of the visual tokens) alive."""
    return sum(tokens_per_layer(num_layers, layers, kept, 1.0)) / num_layers


def _solve(fraction_of, target: float) -> float:
    """The ratio ``q`` in (0, 1] with ``fraction_of(q) == target`` (increasing in ``q``), by bisection."""
    low, high = 0.0, 1.0
    if fraction_of(1e-9) > target:
        raise _Unreachable(
            f"the layers before its first pruning layer already see more than {target:.3g} of the "
            "visual tokens"
        )
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if fraction_of(middle) < target else (low, middle)
    return (low + high) / 2


def _ratio(value: float) -> str:
    return f"{value:.4f}".rstrip("0").rstrip(".")


def _geometric(policy: str, layers: list[int], num_layers: int, target: float, extra: str = "") -> Method:
    """Keep the same fraction ``q`` of the tokens alive at every pruning layer, ``q`` solved."""

    def fraction_of(q: float) -> float:
        return schedule_fraction(num_layers, layers, [q ** (k + 1) for k in range(len(layers))])

    q = float(_ratio(_solve(fraction_of, target)))
    at = ";".join(map(str, layers))
    if policy == "pdrop":
        args = f"policy=pdrop,layers={at},option.ratio={_ratio(q)}"
    else:
        args = f"policy={policy},layers={at},option.keep=[{','.join([_ratio(q)] * len(layers))}]{extra}"
    return Method(policy, args, fraction_of(q))


def matched_methods(num_layers: int, fraction: float, atp_checkpoint: str | None = None) -> list[Method]:
    """Every method at a Token metric of ``fraction`` of the visual tokens on a ``num_layers``-layer
    model: FastV's ratio, PDrop's lambda and the fixed / random keep ratio solved for it; the
    spatial layers chosen as the nearest; pooling only when its stride gives ``fraction`` within
    10% (``1 / stride**2``). ``atp_checkpoint`` (trained with ``target_tokens``) adds the ATP row."""
    if not isinstance(num_layers, int) or num_layers < 2:
        raise ValueError(f"num_layers must be an int >= 2, got {num_layers!r}")
    if not (isinstance(fraction, (int, float)) and 0 < fraction < 1):
        raise ValueError(f"the target must be a fraction of the visual tokens in (0, 1), got {fraction!r}")
    methods = [Method("unpruned", "", 1.0)]
    if atp_checkpoint:
        methods.append(Method("atp", f"atp_checkpoint={atp_checkpoint}", math.nan))
    makers = {
        "fastv": lambda: _fastv(num_layers, fraction),
        "pdrop": lambda: _geometric("pdrop", scaled_layers(PDROP_LAYERS, num_layers), num_layers, fraction),
        "fixed": lambda: _geometric("fixed", scaled_layers(ATP_LAYERS, num_layers), num_layers, fraction),
        "random": lambda: _geometric(
            "random", scaled_layers(ATP_LAYERS, num_layers), num_layers, fraction, ",option.seed=0"
        ),
        "spatial": lambda: _spatial(num_layers, fraction),
        "pool": lambda: _pool(fraction),
    }
    for name, make in makers.items():
        try:
            methods.append(make())
        except _Unreachable as reason:
            methods.append(Method(name, None, math.nan, skipped=str(reason)))
    return methods


def _fastv(num_layers: int, target: float) -> Method:
    """FastV drops once at layer K: (K + (L - K) * kept) / L = target."""
    (layer,) = scaled_layers((FASTV_LAYER,), num_layers)
    kept = (target * num_layers - layer) / (num_layers - layer)
    if kept <= 0:
        raise _Unreachable(f"the layers before its layer {layer} already see more than {target:.3g}")
    ratio = float(_ratio(1 - kept))
    args = f"policy=fastv,layers={layer},option.ratio={_ratio(ratio)}"
    return Method("fastv", args, schedule_fraction(num_layers, [layer], [1 - ratio]))


def _pool(target: float) -> Method:
    """Pooling keeps ``1 / stride**2`` at every layer: a row only when that is within 10% of the target."""
    stride = max(2, round(target**-0.5))
    if abs(stride**-2 - target) > 0.1 * target:
        raise _Unreachable(
            f"its strides keep 1/4, 1/9, 1/16, ... at every layer, none within 10% of {target:.3g}"
        )
    return Method("pool", f"policy=pool,option.stride={stride}", stride**-2)


def _spatial(num_layers: int, target: float) -> Method:
    """Strides 2 then 4 (a quarter, then a sixteenth of the grid) at the two layers nearest the target."""
    kept = [s**-2 for s in SPATIAL_STRIDES]
    (fastv_layer,) = scaled_layers((FASTV_LAYER,), num_layers)
    pairs = [(a, b) for a in range(1, num_layers - 1) for b in range(a + 1, num_layers)]
    if not pairs:
        raise _Unreachable("it needs two pruning layers after layer 0")
    values = {pair: schedule_fraction(num_layers, list(pair), kept) for pair in pairs}
    # nearest the target; among equals, the first layer nearest FastV's
    first, second = min(pairs, key=lambda p: (round(abs(values[p] - target), 12), abs(p[0] - fastv_layer)))
    value = values[(first, second)]
    strides = ",".join(map(str, SPATIAL_STRIDES))
    return Method("spatial", f"policy=spatial,layers={first};{second},option.strides=[{strides}]", value)
