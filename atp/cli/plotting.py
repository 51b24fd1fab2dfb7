"""One plotting style for every figure atp writes (``atp bench --plot``, ``atp eval --plot``,
``atp visualize`` over several images): matplotlib with the Agg backend, one colour per method,
the same fonts, grid and size, PNG at 120 dpi. matplotlib is the ``viz`` extra
(``pip install "atp[viz]"``); :func:`require` says so when it is missing.
"""

from __future__ import annotations

from contextlib import contextmanager

DPI = 120
# one colour per method, the same in every figure (others cycle through the rest)
METHOD_COLOURS = {
    "unpruned": "#4d4d4d",
    "keep_all": "#7f7f7f",
    "atp": "#d62728",
    "atp_frozen": "#d62728",
    "atp_full": "#ff9896",
    "fixed_trained": "#98df8a",
    "fastv": "#1f77b4",
    "pdrop": "#9467bd",
    "fixed": "#2ca02c",
    "random": "#8c564b",
    "spatial": "#ff7f0e",
    "pool": "#17becf",
}
OTHER_COLOURS = ("#e377c2", "#bcbd22", "#aec7e8", "#98df8a", "#ffbb78")
STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "savefig.dpi": DPI,
    "savefig.bbox": "tight",
}


def require(option: str = "--plot"):
    """``matplotlib.pyplot`` with the Agg backend, or a ValueError naming the extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ValueError(
            f'{option} needs matplotlib: pip install "atp[viz]" (or pip install matplotlib)'
        ) from error
    return plt


def colour(method: str, index: int = 0) -> str:
    name = method if method in METHOD_COLOURS else method.split(" ")[0]
    return METHOD_COLOURS.get(name, OTHER_COLOURS[index % len(OTHER_COLOURS)])


@contextmanager
def figure(ncols: int = 1, width: float = 4.5, height: float = 3.4, option: str = "--plot"):
    """``(fig, axes)`` in atp's style; ``axes`` is a list of ``ncols`` axes."""
    plt = require(option)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
        try:
            yield fig, list(axes[0])
        finally:
            plt.close(fig)


def save(fig, path) -> None:
    fig.tight_layout()
    fig.savefig(path, format="png")


def bench_plot(record: dict, path) -> None:
    """``atp bench --plot``: prefill time and decode speed per method."""
    names = list(record["methods"])
    colours = [colour(name, i) for i, name in enumerate(names)]
    with figure(2, option="--plot") as (fig, axes):
        axes[0].bar(names, [record["methods"][n]["prefill_ms"] for n in names], color=colours)
        axes[0].set_ylabel("prefill ms")
        axes[1].bar(names, [record["methods"][n]["decode_tokens_per_s"] for n in names], color=colours)
        axes[1].set_ylabel("decode tokens / s")
        for axis in axes:
            axis.tick_params(axis="x", rotation=30)
        fig.suptitle(f"atp bench ({record['device']})")
        save(fig, path)


def scaling_plot(record: dict, path) -> None:
    """The scaling run: each pruned method's time ratio (with its interval) against the FLOPs
    ratio of what it computes, one point per shape; points on the diagonal run as fast as their
    FLOPs predict."""
    markers = "os^Dv<>p*h"
    with figure(1, width=5.2, height=4.2, option="--plot") as (fig, axes):
        axis = axes[0]
        top = 0.0
        for index, shape in enumerate(record["shapes"]):
            for method, row in shape["methods"].items():
                if method == "unpruned":
                    continue
                ratio = row["time_ratio"]
                flops = row.get("flops_ratio_padded", row["flops_ratio"])
                top = max(top, ratio["high"], flops)
                axis.errorbar(
                    flops,
                    ratio["median"],
                    yerr=[[ratio["median"] - ratio["low"]], [ratio["high"] - ratio["median"]]],
                    fmt=markers[index % len(markers)],
                    color=colour(method),
                    capsize=2,
                    label=f"{method}, {shape['shape']}",
                )
        limit = min(1.0, top * 1.15)
        axis.plot(
            [0, limit], [0, limit], color="#999999", linewidth=0.8, linestyle="--", label="time = FLOPs"
        )
        axis.plot(
            [0, limit], [0, 1.1 * limit], color="#cccccc", linewidth=0.8, linestyle=":", label="1.10x FLOPs"
        )
        axis.set_xlim(0, limit)
        axis.set_ylim(0, limit)
        axis.set_xlabel("FLOPs ratio as computed (a batch padded to its longest sample)")
        axis.set_ylabel("time-to-first-token ratio")
        axis.set_title(f"atp scaling ({record['device']}, {record['threads']} threads)")
        axis.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False, fontsize=7)
        save(fig, path)


def eval_plot(record: dict, path) -> None:
    """``atp eval --plot``: each score against the Token metric, one point per method (the
    paper's accuracy-vs-tokens view), one panel per score."""
    rows = record["rows"]
    scores = [key for key in rows[0] if key not in ("method", "model_args", "tokens", "retention")]
    if not scores:
        raise ValueError("the evaluation record has no scores to plot")
    with figure(len(scores), width=3.8, option="--plot") as (fig, axes):
        for axis, score in zip(axes, scores):
            for index, row in enumerate(rows):
                if score in row:
                    axis.scatter(
                        row["tokens"],
                        row[score],
                        color=colour(row["method"], index),
                        marker="os^Dv<>p*h"[index % 10],
                        s=40,
                        alpha=0.85,
                        zorder=3,
                        label=row["method"],
                    )
            axis.set_xlabel("Token (mean visual tokens per layer)")
            axis.set_ylabel(score)
            axis.set_title(score)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
        fig.suptitle(f"accuracy against tokens: {record.get('pretrained', '')}", fontsize=9)
        save(fig, path)


def kept_distribution_plot(
    layers: list[int], kept: list[list[int]], num_visual: list[int], path, labels: list[str] | None = None
) -> None:
    """``atp visualize`` over several images: the kept tokens after each ATP layer, one box (and
    every image as a dot) per layer; ``kept`` is per image, one count per ATP layer."""
    with figure(1, width=max(4.5, 1.2 * len(layers) + 2), option="--output") as (fig, axes):
        axis = axes[0]
        columns = [[row[k] for row in kept] for k in range(len(layers))]
        positions = list(range(1, len(layers) + 1))
        axis.boxplot(columns, positions=positions, widths=0.5, showfliers=False)
        for position, column in zip(positions, columns):
            spread = [position + 0.12 * ((i % 5) - 2) / 2 for i in range(len(column))]
            axis.scatter(spread, column, s=12, color=colour("atp"), alpha=0.6, zorder=3)
        axis.set_xticks(positions, [f"layer {layer}" for layer in layers])
        axis.set_ylabel("visual tokens kept")
        axis.set_ylim(bottom=0)
        total = max(num_visual) if num_visual else 0
        axis.set_title(f"kept tokens per ATP layer over {len(kept)} images (of {total} visual tokens)")
        save(fig, path)
