"""The study's report: markdown tables, plots and verdicts from the per-seed results (``study.json``).

Every number comes from the run's result files: accuracy per question type and overall with the
spread over seeds, the Token metric, the kept tokens per ATP layer per question type, the
thresholds per question type, the soft and hard Token metric of each learned stage, the oracle
(accuracy per question type against the fraction kept from the first ATP layer on) and the wall
/ CPU seconds of every stage.

The verdicts compare methods seed by seed (each seed's stages start from the same base model): a
difference is **beyond the seeds' spread** when the mean of the per-seed differences is more than
twice their sample standard deviation (:func:`beyond_spread`; with three seeds, about a paired
t-test at 7% two-sided). Two verdicts, one per part of the paper's claim:

* **layer-wise** (:func:`layerwise_verdict`): do the learned kept counts per ATP layer differ from
  the fixed ratios' schedule at the same Token metric, and does the accuracy;
* **instance-wise** (:func:`instancewise_verdict`): is the learned policy's fine-minus-coarse
  difference in Token larger than the constant-threshold control's (which reads no input, so its
  difference comes from the scores alone), and is its accuracy higher than the control's.
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
    "control",
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


NOT_METHODS = ("oracle",)  # per-seed entries that are no method's result
LEARNED = ("atp_frozen", "atp_full", "control")


def methods(record: dict) -> list[str]:
    found = {name for seed in record["seeds"].values() for name in seed if name not in NOT_METHODS}
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
        thresholds = _thresholds(runs)
        if thresholds:
            row["thresholds"] = thresholds
        budgets = [r["budget"] for r in runs if "budget" in r]
        if budgets:
            row["budget"] = {key: _mean_std([b[key] for b in budgets]) for key in ("hard", "soft", "target")}
        row["wall_seconds"] = sum(r["seconds"]["wall"] for r in runs)
        row["cpu_seconds"] = sum(r["seconds"]["cpu"] for r in runs)
        out[method] = row
    return out


def _thresholds(runs: list[dict]) -> dict:
    """``{TYPE: {name: {"mean": [per layer], "std": [per layer]}}}``: the mean over seeds of each
    seed's mean and standard deviation over the questions of the type."""
    out: dict = {}
    for kind in TYPES:
        found = [r["per_type"][kind].get("thresholds") for r in runs if kind in r["per_type"]]
        found = [f for f in found if f]
        for name in found[0] if found else ():
            out.setdefault(kind, {})[name] = {
                stat: [
                    sum(f[name][stat][i] for f in found) / len(found)
                    for i in range(len(found[0][name][stat]))
                ]
                for stat in ("mean", "std")
            }
    return out


def beyond_spread(differences: list[float]) -> bool | None:
    """Whether per-seed differences (method A minus method B, seed by seed) are beyond the seeds'
    spread: ``|mean| > 2 * sample std``; None with fewer than two seeds (no spread to compare)."""
    values = [d for d in differences if not math.isnan(d)]
    if len(values) < 2:
        return None
    mean, std = _mean_std(values)
    return abs(mean) > 2 * std and mean != 0


def _difference(values: list[float], digits: int = 1) -> str:
    mean, std = _mean_std(values)
    return f"{mean:+.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")


def layerwise_verdict(
    learned_kept: list[list[float]],
    fixed_kept: list[list[float]],
    learned_accuracy: list[float],
    fixed_accuracy: list[float],
    layers: list[int],
    min_tokens: float = 1.0,
    names: tuple[str, str] = ("atp", "fixed ratios"),
    tokens: tuple[list[float], list[float]] | None = None,
) -> dict:
    """Per seed (the same order in every list): kept tokens after each ATP layer (means over the
    test questions) of the learned policy and of the fixed ratios, and their accuracies (0-1).

    The schedule differs when at some layer the per-seed differences are beyond the seeds' spread
    and at least ``min_tokens`` in the mean. Returns ``{"verdict": "yes" | "schedule only" |
    "worse" | "no" | "one seed", "schedule_differs": [per layer], "sentence": str, ...}``: "yes" a
    different schedule and a higher accuracy, "schedule only" a different schedule at an accuracy
    within the spread, "worse" a different schedule and a lower accuracy, "no" a schedule within
    the spread of the fixed one."""
    learned_name, fixed_name = names
    per_layer = [[a[k] - b[k] for a, b in zip(learned_kept, fixed_kept)] for k in range(len(layers))]
    accuracy = [100 * (a - b) for a, b in zip(learned_accuracy, fixed_accuracy)]
    if len(accuracy) < 2:
        return {"verdict": "one seed", "sentence": f"layer-wise ({learned_name}): one seed, no verdict"}
    differs = [bool(beyond_spread(d)) and abs(_mean_std(d)[0]) >= min_tokens for d in per_layer]
    accuracy_beyond = bool(beyond_spread(accuracy))
    gain = _mean_std(accuracy)[0]
    kept = ", ".join(
        f"layer {layer}: {_mean_std([a[k] for a in learned_kept])[0]:.1f} against "
        f"{_mean_std([b[k] for b in fixed_kept])[0]:.1f} ({_difference(d)})"
        for k, (layer, d) in enumerate(zip(layers, per_layer))
    )
    if not any(differs):
        verdict, plain = "no", "its kept counts per layer are within the seeds' spread of the fixed ratios'"
    elif accuracy_beyond and gain > 0:
        verdict, plain = (
            "yes",
            "it learns a schedule of its own and it is more accurate, beyond the seeds' spread",
        )
    elif accuracy_beyond:
        verdict, plain = (
            "worse",
            "it learns a schedule of its own, and it is less accurate beyond the seeds' spread",
        )
    else:
        verdict = "schedule only"
        plain = "it learns a schedule of its own, but the accuracy is within the seeds' spread of the fixed ratios'"
    sentence = (
        f"Layer-wise, {learned_name} against {fixed_name} ({len(accuracy)} seeds{_tokens(tokens)}): "
        f"**{verdict}**: {plain}. Kept tokens after each ATP layer, {kept}; accuracy "
        f"{_difference(accuracy)} points."
    )
    return {
        "verdict": verdict,
        "schedule_differs": differs,
        "kept_differences": [_mean_std(d) for d in per_layer],
        "accuracy_difference": _mean_std(accuracy),
        "sentence": sentence,
    }


def instancewise_verdict(
    learned_gap: list[float],
    control_gap: list[float],
    learned_accuracy: list[float],
    control_accuracy: list[float],
    names: tuple[str, str] = ("atp", "the constant-threshold control"),
    tokens: tuple[list[float], list[float]] | None = None,
    groups: tuple[str, str] = ("fine", "coarse"),
) -> dict:
    """Per seed: the fine-minus-coarse difference in Token (mean over the fine types minus over
    the coarse ones) of the learned policy and of the control, and their accuracies (0-1).

    Returns ``{"verdict": "yes" | "tokens only" | "accuracy only" | "opposite" | "no" | "one seed",
    "sentence": str, ...}``: "yes" when the learned policy gives fine questions more tokens than
    the control does beyond the seeds' spread and is more accurate beyond it; "tokens only" /
    "accuracy only" when one of the two holds; "opposite" when it gives the coarse questions
    more, beyond the spread (and is not more accurate); "no" when neither holds. ``tokens``: per
    seed, the Token metric of each (quoted in the sentence). ``groups`` names the two groups of
    question types the gaps compare (e.g. the types the oracle says need tokens, and the rest)."""
    learned_name, control_name = names
    first, second = groups
    gaps = [a - b for a, b in zip(learned_gap, control_gap)]
    accuracy = [100 * (a - b) for a, b in zip(learned_accuracy, control_accuracy)]
    if len(gaps) < 2:
        return {"verdict": "one seed", "sentence": f"instance-wise ({learned_name}): one seed, no verdict"}
    more_tokens = bool(beyond_spread(gaps)) and _mean_std(gaps)[0] > 0
    fewer_tokens = bool(beyond_spread(gaps)) and _mean_std(gaps)[0] < 0
    better = bool(beyond_spread(accuracy)) and _mean_std(accuracy)[0] > 0
    if more_tokens and better:
        verdict, plain = (
            "yes",
            f"{first} questions get more tokens than the control gives them, and it is more accurate",
        )
    elif more_tokens:
        verdict = "tokens only"
        plain = f"{first} questions get more tokens than the control gives them, but the accuracy is within the spread"
    elif better:
        verdict = "accuracy only"
        plain = f"it is more accurate than the control, but does not give {first} questions more tokens than the control does"
    elif fewer_tokens:
        verdict, plain = (
            "opposite",
            f"{second} questions get more tokens than the control gives them, not {first} ones",
        )
    else:
        verdict = "no"
        plain = (
            f"its {first}-minus-{second} difference in tokens and its accuracy are within the seeds' spread of "
            "the control's"
        )
    sentence = (
        f"Instance-wise ({first} against {second} questions), {learned_name} against {control_name} "
        f"({len(gaps)} seeds{_tokens(tokens)}): **{verdict}**: {plain}. "
        f"{first.capitalize()}-minus-{second} Token: {_difference(learned_gap)} against {_difference(control_gap)} "
        f"(difference {_difference(gaps)}); accuracy {_difference(accuracy)} points."
    )
    return {
        "verdict": verdict,
        "gap_difference": _mean_std(gaps),
        "accuracy_difference": _mean_std(accuracy),
        "sentence": sentence,
    }


def _tokens(tokens: tuple[list[float], list[float]] | None) -> str:
    if not tokens:
        return ""
    return f", Token {_mean_std(tokens[0])[0]:.1f} against {_mean_std(tokens[1])[0]:.1f}"


def _seeds_with(record: dict, *names: str) -> list[dict]:
    return [seed for seed in record["seeds"].values() if all(n in seed for n in names)]


def kept_overall(result: dict) -> list[float]:
    """Kept tokens after each ATP layer, the mean over every test question."""
    rows = [r for r in result["per_type"].values() if r.get("kept")]
    total = sum(r["count"] for r in rows)
    return [sum(r["kept"][k] * r["count"] for r in rows) / total for k in range(len(rows[0]["kept"]))]


def type_gap(result: dict, value=lambda r: r["avg_tokens"], first=FINE, second=COARSE) -> float:
    """Mean over the ``first`` types (default the fine ones) minus mean over the ``second`` types
    (default the coarse ones) of ``value(per-type result)``."""
    a = [value(result["per_type"][k]) for k in first]
    b = [value(result["per_type"][k]) for k in second]
    return sum(a) / len(a) - sum(b) / len(b)


NEEDY_LOSS = 10.0  # points an oracle setting must cost a question type for the type to need tokens


def needy_types(record: dict, loss: float = NEEDY_LOSS) -> tuple[list[str], dict, dict | None]:
    """The question types that need the visual tokens after the first ATP layer, by the oracle:
    ``(types, {type: points lost}, the oracle row)``, from the ``random`` row at the first ATP layer
    whose Token metric is nearest the study's target (mean over seeds); a type needs tokens when
    that row costs it at least ``loss`` points. ``([], {}, None)`` without an oracle."""
    if not any("oracle" in seed for seed in record["seeds"].values()):
        return [], {}, None
    config = record["config"]
    target = config["fraction"] * (config["image_size"] // config["patch_size"]) ** 2
    mean = oracle_mean(record)
    rows = [r for r in mean["rows"] if r["policy"] == "random" and r["layer"] == config["layers"][0]]
    if not rows:
        return [], {}, None
    row = min(rows, key=lambda r: abs(r["avg_tokens"] - target))
    lost = {k: 100 * (mean["unpruned"]["per_type"][k] - row["per_type"][k]) for k in TYPES}
    return [k for k in TYPES if lost[k] >= loss], lost, row


def theta_gap(result: dict, name: str, layer: int = 0) -> float:
    """The fine-minus-coarse difference of the mean threshold ``name`` at ATP layer index ``layer``."""
    return type_gap(result, lambda r: r["thresholds"][name]["mean"][layer] if "thresholds" in r else math.nan)


def imagewise_verdict(seeds: list[dict], learned: str, control: str = "control") -> dict | None:
    """Per seed, the least-squares slope of the Token metric against the number of shapes on the
    canvas (:meth:`atp.study.evaluate.Scores.by_shapes`) of ``learned`` and of ``control``: does
    the learned policy give busier images more tokens than the control does (whose thresholds are
    the same for every image, so its slope comes from the scores alone)? None when the results
    carry no slope."""
    slopes = [
        (s[learned].get("by_shapes", {}).get("slope"), s[control].get("by_shapes", {}).get("slope"))
        for s in seeds
    ]
    if not slopes or any(a is None or b is None for a, b in slopes):
        return None
    differences = [a - b for a, b in slopes]
    if len(differences) < 2:
        return {"verdict": "one seed", "sentence": f"image-wise ({learned}): one seed, no verdict"}
    beyond = bool(beyond_spread(differences))
    mean = _mean_std(differences)[0]
    if beyond and mean > 0:
        verdict, plain = (
            "yes",
            "busier images get more tokens than the control gives them, beyond the seeds' spread",
        )
    elif beyond:
        verdict, plain = (
            "opposite",
            "busier images get fewer tokens than the control gives them, beyond the seeds' spread",
        )
    else:
        verdict, plain = "no", "its tokens per extra shape are within the seeds' spread of the control's"
    sentence = (
        f"Instance-wise (by image: tokens per extra shape on the canvas), {learned} against {control} "
        f"({len(differences)} seeds): **{verdict}**: {plain}. Slope {_difference([a for a, _ in slopes], 2)} "
        f"against {_difference([b for _, b in slopes], 2)} tokens per shape (difference {_difference(differences, 2)})."
    )
    return {"verdict": verdict, "slope_difference": _mean_std(differences), "sentence": sentence}


def _paired(seeds: list[dict], value, *names: str) -> list[list[float]]:
    """Per method name, ``value(result)`` of each seed (the same seed order for every name)."""
    return [[value(s[name]) for s in seeds] for name in names]


def _instancewise(record: dict, seeds: list[dict], learned: str, first_layer: int) -> dict:
    """The instance-wise verdicts of ``learned`` against the control: by granularity (with the
    thresholds' fine-minus-coarse gap), by image, and by the oracle's needy types."""
    names = (learned, "control")
    accuracy = _paired(seeds, lambda r: r["accuracy"], *names)
    tokens = tuple(_paired(seeds, lambda r: r["avg_tokens"], *names))
    out = {}
    result = instancewise_verdict(*_paired(seeds, type_gap, *names), *accuracy, names=names, tokens=tokens)
    thetas = []
    for name in ("theta_r", "theta_s"):
        values, control = _paired(seeds, lambda r, name=name: theta_gap(r, name), *names)
        beyond = beyond_spread([a - b for a, b in zip(values, control)])
        result[f"{name}_gap"] = {
            "learned": _mean_std(values),
            "control": _mean_std(control),
            "beyond_spread": beyond,
        }
        thetas.append(
            f"{name} {_difference(values, 3)} against {_difference(control, 3)} "
            f"({'beyond' if beyond else 'within'} the spread)"
        )
    result["sentence"] += f" Fine-minus-coarse threshold at ATP layer {first_layer}: {', '.join(thetas)}."
    out[f"instancewise/{learned}"] = result
    image = imagewise_verdict(seeds, learned)
    if image:
        out[f"instancewise-image/{learned}"] = image
    needy, lost, row = needy_types(record)
    rest = [k for k in TYPES if k not in needy]
    if row is None:
        return out
    if needy and rest:
        gap = lambda r: type_gap(r, first=needy, second=rest)  # noqa: E731
        result = instancewise_verdict(
            *_paired(seeds, gap, *names), *accuracy, names=names, tokens=tokens, groups=("needy", "other")
        )
        cost = ", ".join(f"{k} {-lost[k]:+.1f}" for k in TYPES)
        result["sentence"] += (
            f" Needy types, by the oracle (random, {row['fraction']:g} of the tokens from layer "
            f"{row['layer']} on, Token {row['avg_tokens']:.1f}: {cost} points): {', '.join(needy)}."
        )
        result["needy"] = needy
    else:
        result = {
            "verdict": "no contrast",
            "needy": needy,
            "sentence": (
                f"Instance-wise by need ({learned}): no verdict: the oracle (random, {row['fraction']:g} "
                f"of the tokens from layer {row['layer']} on) costs {'every' if needy else 'no'} question type "
                f"{NEEDY_LOSS:g} points or more, so no type needs the tokens more than another"
            ),
        }
    out[f"instancewise-needy/{learned}"] = result
    return out


def verdicts(record: dict) -> dict:
    """Every verdict the record allows: ``{key: verdict dict}`` (see :func:`layerwise_verdict`,
    :func:`instancewise_verdict`); pairs whose stages are missing are left out."""
    layers = list(record["config"]["layers"])
    out = {}
    for learned, fixed in (("atp_full", "fixed_trained"), ("atp_frozen", "fixed"), ("control", "fixed")):
        seeds = _seeds_with(record, learned, fixed)
        if seeds and all(r.get("kept") for s in seeds for r in s[learned]["per_type"].values()):
            out[f"layerwise/{learned}"] = layerwise_verdict(
                [kept_overall(s[learned]) for s in seeds],
                [kept_overall(s[fixed]) for s in seeds],
                [s[learned]["accuracy"] for s in seeds],
                [s[fixed]["accuracy"] for s in seeds],
                layers,
                names=(learned, fixed),
                tokens=([s[learned]["avg_tokens"] for s in seeds], [s[fixed]["avg_tokens"] for s in seeds]),
            )
    learned = "atp_frozen"  # trained as the control is: the LM frozen, the same budget loss
    seeds = _seeds_with(record, learned, "control")
    if seeds:
        out.update(_instancewise(record, seeds, learned, layers[0]))
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
        if method not in LEARNED or "kept" not in row:
            continue
        for kind in TYPES:
            kept = row["kept"].get(kind, [])
            lines.append(
                "| "
                + " | ".join([method, kind, *[f"{k:.1f}" for k in kept], _cell(row[f"tokens/{kind}"], False)])
                + " |"
            )
    lines += _threshold_lines(rows, layers)
    lines += _budget_lines(rows)
    lines += _busy_lines(record)
    if any("oracle" in seed for seed in record["seeds"].values()):
        lines += [
            "",
            "Oracle: the base model keeping a fraction of the visual tokens from the first ATP layer on, "
            "accuracy (%) per question type, mean over seeds (Δ: points against the unpruned model):",
            "",
            oracle_markdown(record).rstrip("\n"),
        ]
    lines += [
        "",
        f"Time per stage, summed over seeds ({config.get('threads', '?')} CPU threads per stage as configured; "
        "a resumed run counts each stage when it ran):",
        "",
        "| stage | wall s | CPU s |",
        "|---|---|---|",
    ]
    times = [(method, row["wall_seconds"], row["cpu_seconds"]) for method, row in rows.items()]
    oracles = [seed["oracle"]["seconds"] for seed in record["seeds"].values() if "oracle" in seed]
    if oracles:
        times.insert(1, ("oracle", sum(o["wall"] for o in oracles), sum(o["cpu"] for o in oracles)))
    for method, wall, cpu in times:
        lines.append(f"| {method} | {wall:.0f} | {cpu:.0f} |")
    lines.append(f"| **total** | {sum(t[1] for t in times):.0f} | {sum(t[2] for t in times):.0f} |")
    found = record.get("verdicts") or verdicts(record)
    if found:
        lines += [
            "",
            "Verdicts (differences seed by seed; beyond the spread: |mean| > 2 x their sample std):",
            "",
        ]
        lines += [f"- {v['sentence']}" for v in found.values()]
    return "\n".join(lines) + "\n"


def _threshold_lines(rows: dict, layers: list[int]) -> list[str]:
    found = [(m, r) for m, r in rows.items() if r.get("thresholds")]
    if not found:
        return []
    names = sorted({n for _, r in found for t in r["thresholds"].values() for n in t})
    head = ["method", "question type", *[f"{n} at layer {layer}" for n in names for layer in layers]]
    lines = [
        "",
        "Thresholds per question type: mean ± standard deviation over the test questions (each a mean over seeds):",
        "",
        "| " + " | ".join(head) + " |",
        "|---" * len(head) + "|",
    ]
    for method, row in found:
        for kind in TYPES:
            values = row["thresholds"].get(kind)
            if not values:
                continue
            cells = [
                f"{values[n]['mean'][k]:.3f} ± {values[n]['std'][k]:.3f}"
                for n in names
                for k in range(len(layers))
            ]
            lines.append("| " + " | ".join([method, kind, *cells]) + " |")
    return lines


def _busy_lines(record: dict) -> list[str]:
    """Token metric by the number of shapes on the canvas (mean over seeds), and its slope."""
    found = {}
    for method in methods(record):
        runs = [
            seed[method]["by_shapes"]
            for seed in record["seeds"].values()
            if "by_shapes" in seed.get(method, {})
        ]
        if runs and method in (*LEARNED, "fixed_trained", "unpruned"):
            found[method] = runs
    if not found:
        return []
    shapes = sorted({n for runs in found.values() for r in runs for n in r["tokens"]}, key=int)
    head = ["method", *[f"{n} shapes" for n in shapes], "tokens per shape"]
    lines = [
        "",
        "Token by the number of shapes on the canvas, over every test question (mean over seeds), and the "
        "least-squares slope (± over seeds):",
        "",
        "| " + " | ".join(head) + " |",
        "|---" * len(head) + "|",
    ]
    for method, runs in found.items():
        cells = []
        for n in shapes:
            values = [r["tokens"][n] for r in runs if n in r["tokens"]]
            cells.append(f"{sum(values) / len(values):.1f}" if values else "")
        slope = _mean_std([r["slope"] for r in runs])
        cells.append(f"{slope[0]:+.2f}" + ("" if math.isnan(slope[1]) else f" ± {slope[1]:.2f}"))
        lines.append("| " + " | ".join([method, *cells]) + " |")
    return lines


def _budget_lines(rows: dict) -> list[str]:
    found = [(m, r["budget"]) for m, r in rows.items() if r.get("budget")]
    if not found:
        return []
    lines = [
        "",
        "Token metric of a training batch in a training-mode forward: hard (tokens kept) and soft "
        "(sums of the soft masks), mean ± std over seeds:",
        "",
        "| method | target | hard Token | soft Token |",
        "|---|---|---|---|",
    ]
    for method, budget in found:
        cells = [_cell(budget[k], False) for k in ("target", "hard", "soft")]
        lines.append("| " + " | ".join([method, *cells]) + " |")
    return lines


def oracle_mean(record: dict) -> dict:
    """The oracle of every seed averaged: the layout of :func:`atp.study.oracle.measure`'s result,
    each number a mean over seeds, plus ``fine_loss_std`` / ``coarse_loss_std`` per row (points,
    over seeds)."""
    results = [seed["oracle"] for seed in record["seeds"].values() if "oracle" in seed]

    def mean_row(rows: list[dict]) -> dict:
        out = {key: rows[0][key] for key in ("policy", "layer", "fraction")}
        for key in ("avg_tokens", "accuracy", "coarse", "fine"):
            out[key] = sum(r[key] for r in rows) / len(rows)
        out["per_type"] = {k: sum(r["per_type"][k] for r in rows) / len(rows) for k in rows[0]["per_type"]}
        return out

    unpruned = [r["unpruned"] for r in results]
    mean = {"unpruned": mean_row(unpruned), "rows": []}
    for index in range(len(results[0]["rows"])):
        rows = [r["rows"][index] for r in results]
        row = mean_row(rows)
        for group in ("coarse", "fine"):
            row[f"{group}_loss_std"] = _mean_std(
                [100 * (u[group] - r[group]) for u, r in zip(unpruned, rows)]
            )[1]
        mean["rows"].append(row)
    return mean


def oracle_markdown(record: dict) -> str:
    from atp.study.oracle import markdown as table

    return table(oracle_mean(record))


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
    from atp.cli.plotting import colour, figure, save

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
