"""The study's report: markdown tables and plots from the per-seed results (``study.json``).

Every number comes from the run's result files: accuracy per question type and overall with the
spread over seeds, the Token metric, the kept tokens per ATP layer per question type, and the
wall / CPU seconds of every stage.
"""

from __future__ import annotations

import math
from pathlib import Path

from atp.study.shapes import COARSE, FINE, TYPES

ORDER = (
    "unpruned",
    "atp_frozen",
    "atp_full",
    "fixed_trained",
    "fastv",
    "pdrop",
    "fixed",
    "random",
    "spatial",
    "pool",
)


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    # the sample standard deviation; none from one seed
    std = (
        math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        if len(values) > 1
        else float("nan")
    )
    return mean, std


def methods(record: dict) -> list[str]:
    found = {name for seed in record["seeds"].values() for name in seed}
    return [m for m in ORDER if m in found] + sorted(found - set(ORDER))


def summary(record: dict) -> dict:
    """``{method: {"accuracy": (mean, std), "TYPE": (mean, std), "avg_tokens": ..., "kept": {TYPE: [..]}}}``."""
    out = {}
    seeds = list(record["seeds"].values())
    for method in methods(record):
        runs = [seed[method] for seed in seeds if method in seed]
        row = {
            "accuracy": _mean_std([r["accuracy"] for r in runs]),
            "avg_tokens": _mean_std([r["avg_tokens"] for r in runs]),
            "seeds": len(runs),
        }
        for group, kinds in (("coarse", COARSE), ("fine", FINE)):
            row[group] = _mean_std(
                [sum(r["per_type"][k]["accuracy"] for k in kinds) / len(kinds) for r in runs]
            )
        for kind in TYPES:
            row[kind] = _mean_std([r["per_type"][kind]["accuracy"] for r in runs])
            row[f"tokens/{kind}"] = _mean_std([r["per_type"][kind]["avg_tokens"] for r in runs])
            kept = [r["per_type"][kind]["kept"] for r in runs if r["per_type"][kind]["kept"]]
            if kept:
                row.setdefault("kept", {})[kind] = [
                    sum(k[i] for k in kept) / len(kept) for i in range(len(kept[0]))
                ]
        row["wall_seconds"] = sum(r["seconds"]["wall"] for r in runs)
        row["cpu_seconds"] = sum(r["seconds"]["cpu"] for r in runs)
        out[method] = row
    return out


def _cell(pair: tuple[float, float], percent: bool = True) -> str:
    mean, std = pair
    if math.isnan(mean):
        return ""
    scale = 100 if percent else 1
    return f"{scale * mean:.1f}" + ("" if math.isnan(std) else f" ± {scale * std:.1f}")


def markdown(record: dict) -> str:
    rows = summary(record)
    config = record["config"]
    lines = []
    head = ["method", "Token", "overall", "coarse", "fine", *TYPES]
    lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for method, row in rows.items():
        cells = [
            method,
            _cell(row["avg_tokens"], False),
            _cell(row["accuracy"]),
            _cell(row["coarse"]),
            _cell(row["fine"]),
        ]
        cells += [_cell(row[k]) for k in TYPES]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Kept visual tokens after each ATP layer, per question type (mean over seeds):", ""]
    layers = config["layers"]
    head = ["method", "question type", *[f"after layer {layer}" for layer in layers], "Token"]
    lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for method, row in rows.items():
        if not method.startswith("atp") or "kept" not in row:
            continue
        for kind in TYPES:
            kept = row["kept"].get(kind, [])
            lines.append(
                "| "
                + " | ".join([method, kind, *[f"{k:.1f}" for k in kept], _cell(row[f"tokens/{kind}"], False)])
                + " |"
            )
    lines += [
        "",
        "Time per stage, summed over seeds (2 CPU threads):",
        "",
        "| stage | wall s | CPU s |",
        "|---|---|---|",
    ]
    for method, row in rows.items():
        lines.append(f"| {method} | {row['wall_seconds']:.0f} | {row['cpu_seconds']:.0f} |")
    lines.append(f"| **total** | {record['total_wall_seconds']:.0f} | |")
    return "\n".join(lines) + "\n"


def write_report(record: dict, output) -> Path:
    """``report.md`` (and ``accuracy.png``, ``kept.png`` when matplotlib is installed) in ``output``."""
    output = Path(output)
    text = markdown(record)
    try:
        plot(record, output)
        text += "\n![accuracy per question type](accuracy.png)\n\n![kept tokens per ATP layer](kept.png)\n"
    except ValueError as error:  # matplotlib missing: the tables alone
        text += f"\n(no plots: {error})\n"
    path = output / "report.md"
    path.write_text(text)
    return path


def plot(record: dict, output: Path) -> None:
    from atp.plotting import colour, figure, save

    rows = summary(record)
    with figure(1, width=7.5, option="the study's plots") as (fig, axes):
        axis = axes[0]
        names = list(rows)
        width = 0.8 / len(names)
        groups = ["overall", "coarse", "fine", *TYPES]
        for index, name in enumerate(names):
            values = [rows[name]["accuracy" if g == "overall" else g] for g in groups]
            xs = [g + index * width for g in range(len(groups))]
            axis.bar(
                xs,
                [100 * v[0] for v in values],
                width,
                yerr=[0.0 if math.isnan(v[1]) else 100 * v[1] for v in values],
                color=colour(name, index),
                label=name,
                capsize=1.5,
            )
        axis.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups)
        axis.set_ylabel("accuracy (%)")
        axis.set_ylim(0, 100)
        axis.legend(fontsize=7, ncol=2)
        axis.set_title("accuracy per question type (mean ± std over seeds)")
        save(fig, output / "accuracy.png")
    learned = [m for m in rows if m.startswith("atp") and "kept" in rows[m]]
    with figure(max(1, len(learned)), width=4.2, option="the study's plots") as (fig, axes):
        layers = record["config"]["layers"]
        for axis, name in zip(axes, learned):
            for kind in TYPES:
                kept = rows[name]["kept"].get(kind)
                if kept:
                    axis.plot(
                        range(len(layers)),
                        kept,
                        marker="o",
                        label=kind,
                        linestyle="-" if kind in FINE else "--",
                    )
            axis.set_xticks(range(len(layers)), [f"layer {layer}" for layer in layers])
            axis.set_ylabel("visual tokens kept")
            axis.set_title(f"{name}: kept per question type")
            axis.legend(fontsize=7)
        save(fig, output / "kept.png")
