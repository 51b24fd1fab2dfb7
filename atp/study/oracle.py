"""The oracle: how much do the visual tokens after the first ATP layer matter, per question type?

No training: the base model, evaluated while only a fraction ``f`` of the visual tokens is kept
from layer ``L`` on (layers ``0 .. L-1`` see every token), with policies that do not learn:

* ``random``: a uniformly random ``f`` of the tokens (``atp``'s ``random`` policy); ``f = 0``
  keeps none, so what the layers before ``L`` read is all the answer can use;
* ``fixed``: the top ``f`` by the redundancy score (``atp``'s ``fixed`` policy);
* ``spatial``: the stride-``s`` grid, ``f = 1 / s**2`` (``atp``'s ``spatial`` policy).

If the fine questions (answered from a few small patches) lose many points when few tokens are
kept after layer ``L`` and the coarse ones lose none, there is something for an instance-wise
policy to learn: keep more for fine questions. If neither loses, layers ``0 .. L-1`` already
answered the question and no pruning after them can show adaptivity (docs/study.md).
"""

from __future__ import annotations

import math
import warnings

from atp.study.evaluate import evaluate
from atp.study.shapes import COARSE, FINE, TYPES

FRACTIONS = (1.0, 0.5, 0.25, 0.15, 0.1, 0.05, 0.0)  # 0: layers before the first ATP layer alone
POLICIES = ("random", "fixed", "spatial")
STRIDES = (2, 3, 4)  # 1/4, 1/9, 1/16 of the tokens


def _options(policy: str, fraction: float, stride: int, seed: int) -> dict:
    keep = [fraction if fraction > 0 else 0]  # 0: a count, no visual token from the first ATP layer on
    if policy == "random":
        return {"keep": keep, "seed": seed}
    if policy == "fixed":
        return {"keep": keep}
    return {"strides": [stride]}


def _row(policy: str, layer: int, fraction: float, scores) -> dict:
    per_type = {k: scores.accuracy(k) for k in TYPES if scores.total.get(k)}
    return {
        "policy": policy,
        "layer": layer,
        "fraction": fraction,
        "avg_tokens": scores.avg_tokens(),
        "accuracy": scores.accuracy(),
        "coarse": sum(per_type[k] for k in COARSE) / len(COARSE),
        "fine": sum(per_type[k] for k in FINE) / len(FINE),
        "per_type": per_type,
    }


def measure(
    model,
    examples,
    first_layers=(1, 2),
    fractions=FRACTIONS,
    policies=POLICIES,
    strides=STRIDES,
    seed: int = 0,
) -> dict:
    """``{"unpruned": row, "rows": [row, ...]}``: accuracy per question type of ``model`` (the base
    model, eval only) keeping ``fraction`` of the visual tokens from ATP layer ``layer`` on, for every
    policy, first layer and fraction (``spatial``: every stride). A row: policy, layer, fraction,
    avg_tokens (the Token metric), accuracy, coarse, fine (means over the types), per_type."""
    from atp.host.attach import attach

    model.eval()
    examples = list(examples)
    unpruned = _row("unpruned", 0, 1.0, evaluate(model, examples))
    rows = []
    for policy in policies:
        for layer in first_layers:
            grid = [(1.0 / s**2, s) for s in strides] if policy == "spatial" else [(f, 0) for f in fractions]
            for fraction, stride in grid:
                if fraction >= 1.0:
                    rows.append({**unpruned, "policy": policy, "layer": layer})
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    handle = attach(
                        model, policy=policy, layers=[layer], **_options(policy, fraction, stride, seed)
                    )
                try:
                    rows.append(_row(policy, layer, fraction, evaluate(model, examples, handle)))
                finally:
                    handle.remove()
    return {"unpruned": unpruned, "rows": rows}


def losses(result: dict) -> list[dict]:
    """Per row: points lost on coarse and fine questions against the unpruned model."""
    base = result["unpruned"]
    return [
        {
            **row,
            "coarse_loss": 100 * (base["coarse"] - row["coarse"]),
            "fine_loss": 100 * (base["fine"] - row["fine"]),
        }
        for row in result["rows"]
    ]


def separating(result: dict, fine_loss: float = 10.0, coarse_loss: float = 3.0) -> list[dict]:
    """The rows where fine questions lose at least ``fine_loss`` points and coarse ones at most
    ``coarse_loss``: settings where what is kept after the first ATP layer matters for fine
    questions only (the condition for instance-wise adaptivity to be measurable)."""
    return [r for r in losses(result) if r["fine_loss"] >= fine_loss and r["coarse_loss"] <= coarse_loss]


def _loss(row: dict, group: str) -> str:
    spread = row.get(f"{group}_loss_std", math.nan)
    return f"{-row[f'{group}_loss']:+.1f}" + ("" if math.isnan(spread) else f" ± {spread:.1f}")


def markdown(result: dict) -> str:
    """A table: one row per (policy, first layer, fraction): the Token metric, accuracy (%) per
    type and the change against the unpruned model (± the spread over seeds when the rows carry
    ``coarse_loss_std`` / ``fine_loss_std``, as :func:`atp.study.report.oracle_mean` gives)."""
    head = ["policy", "first layer", "kept", "Token", "coarse", "fine", "Δ coarse", "Δ fine", *TYPES]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    base = result["unpruned"]
    cells = ["unpruned", "", "1", f"{base['avg_tokens']:.1f}", f"{100 * base['coarse']:.1f}"]
    cells += [f"{100 * base['fine']:.1f}", "", ""] + [f"{100 * base['per_type'][k]:.0f}" for k in TYPES]
    lines.append("| " + " | ".join(cells) + " |")
    for row in losses(result):
        if row["fraction"] >= 1.0:
            continue
        cells = [row["policy"], str(row["layer"]), f"{row['fraction']:.3g}", f"{row['avg_tokens']:.1f}"]
        cells += [f"{100 * row['coarse']:.1f}", f"{100 * row['fine']:.1f}"]
        cells += [_loss(row, "coarse"), _loss(row, "fine")]
        cells += [f"{100 * row['per_type'][k]:.0f}" for k in TYPES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
