"""``atp eval``: lmms-eval once per method at one Token metric, and the paper's Table 1 layout.

Each method runs as its own ``python -m lmms_eval --model atp`` process (or under a launcher such
as ``accelerate launch``); the results files give each task's scores and the Token metric (mean
visual tokens per decoder layer over the documents, ``throughput.avg_tokens``), and the table has
one row per method: Token, every score, and the retention against the unpruned row. Nothing here
imports lmms-eval, so ``--dry-run`` (the commands, not run) works without the ``eval`` extra.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from atp.evaluation.matched import Method, matched_methods

TINY_FRACTION = 0.5  # the tiny model has 4 layers: a quarter of its tokens is out of FastV's reach


def add_parser(sub) -> None:
    from atp.arguments import COUNT, OPEN_FRACTION, POSITIVE, at_least

    parser = sub.add_parser(
        "eval",
        help="run lmms-eval tasks for every method at one Token metric and write the Table 1 layout",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--model",
        default=None,
        metavar="PATH_OR_ID",
        help="checkpoint folder or hub id (default: a tiny random LLaVA and two tiny local tasks)",
    )
    parser.add_argument("--tasks", default=None, help="lmms-eval tasks, comma separated")
    parser.add_argument("--include-path", default=None, help="a folder of extra lmms-eval task YAMLs")
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "--fraction",
        type=OPEN_FRACTION,
        default=None,
        help="the Token metric as a fraction of the visual tokens (default 0.25, the paper's 144 of 576)",
    )
    target.add_argument(
        "--tokens",
        type=POSITIVE,
        default=None,
        help="the Token metric as a count (needs the visual tokens per image from the config or --visual-tokens)",
    )
    parser.add_argument(
        "--visual-tokens", type=COUNT, default=None, help="visual tokens per image (for --tokens)"
    )
    parser.add_argument(
        "--num-layers", type=at_least(2), default=None, help="decoder layers (default: from the config)"
    )
    parser.add_argument(
        "--methods",
        default=None,
        help="only these of unpruned,atp,fastv,pdrop,fixed,random,spatial,pool (comma separated)",
    )
    parser.add_argument(
        "--method",
        action="append",
        default=[],
        metavar="NAME=MODEL_ARGS",
        help="a method of your own (repeatable; replaces the matched ones), e.g. 'fastv=policy=fastv,layers=2'",
    )
    parser.add_argument("--atp-checkpoint", default=None, help="a trained ATP checkpoint: adds the atp row")
    parser.add_argument(
        "--model-args",
        default="",
        help="added to every method's --model_args, e.g. dtype=bfloat16,device=cuda,batch_size=8",
    )
    parser.add_argument(
        "--launcher",
        default="",
        help="prefix of each run instead of the interpreter, e.g. 'accelerate launch --num_processes 8'",
    )
    parser.add_argument("--lmms-eval-args", default="", help="more lmms-eval arguments, e.g. '--limit 100'")
    parser.add_argument(
        "--output-dir", default="eval-results", help="runs, table.md and table.json (default eval-results)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the lmms-eval commands and stop")
    parser.add_argument(
        "--plot",
        default=None,
        metavar="PNG",
        help="also plot each score against the Token metric (needs matplotlib)",
    )
    parser.add_argument(
        "--from-table",
        default=None,
        metavar="JSON",
        help="print (and --plot) a table.json written earlier instead of running anything",
    )
    parser.add_argument("--json", action="store_true", help="print the JSON record instead of the table")


@dataclass
class Plan:
    pretrained: str
    tasks: str
    include_path: str | None
    fraction: float | None
    methods: list[Method]


def plan(args) -> Plan:
    """What will run: the model, the tasks and every method's model args (writes the tiny model
    and tasks into the output folder when no ``--model`` is given)."""
    output = Path(args.output_dir)
    pretrained, tasks, include_path = args.model, args.tasks, args.include_path
    if pretrained is None:
        from atp.tiny.checkpoint import write_tiny_checkpoint

        pretrained = str(output / "tiny-llava")
        if not (Path(pretrained) / "config.json").exists():
            write_tiny_checkpoint(pretrained, family="llava", num_layers=4)
        if tasks is None:
            from atp.evaluation.tiny_tasks import TASKS, write_tiny_tasks

            tasks, include_path = ",".join(TASKS), str(write_tiny_tasks(output / "tiny-tasks"))
    if not tasks:
        raise ValueError("--tasks is required with --model (e.g. --tasks gqa,pope,mme)")
    if args.method:
        methods = [_own_method(text) for text in args.method]
        return Plan(pretrained, tasks, include_path, None, methods)
    num_layers, visual = _shape(pretrained, args)
    fraction = _fraction(args, visual, default=TINY_FRACTION if args.model is None else 0.25)
    methods = matched_methods(num_layers, fraction, args.atp_checkpoint)
    if args.methods:
        wanted = [name.strip() for name in args.methods.split(",") if name.strip()]
        known = {method.name for method in methods} | {"atp"}
        unknown = sorted(set(wanted) - known)
        if unknown:
            raise ValueError(
                f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(sorted(known))}"
            )
        if "atp" in wanted and not args.atp_checkpoint:
            raise ValueError("--methods atp needs --atp-checkpoint DIR (a trained ATP checkpoint)")
        methods = [method for method in methods if method.name in wanted]
    return Plan(pretrained, tasks, include_path, fraction, methods)


def _own_method(text: str) -> Method:
    name, separator, model_args = text.partition("=")
    if not separator or not name.strip():
        raise ValueError(
            f"--method takes NAME=MODEL_ARGS (MODEL_ARGS may be empty: 'unpruned='), got {text!r}"
        )
    return Method(name.strip(), model_args, float("nan"))


def _shape(pretrained: str, args) -> tuple[int, int | None]:
    """Decoder layers and visual tokens per image (None when the family has no fixed count)."""
    if args.num_layers is not None and (args.visual_tokens is not None or args.tokens is None):
        return args.num_layers, args.visual_tokens
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(pretrained)
    except OSError as error:
        raise OSError(
            f"cannot read the config of {pretrained!r} ({error}); pass --num-layers (and --visual-tokens "
            "with --tokens), or a local checkpoint folder"
        ) from error
    num_layers = args.num_layers or config.get_text_config().num_hidden_layers
    visual = args.visual_tokens or getattr(config, "image_seq_length", None)
    return num_layers, visual


def _fraction(args, visual: int | None, default: float) -> float:
    if args.tokens is None:
        return default if args.fraction is None else args.fraction
    if not visual:
        raise ValueError(
            "--tokens needs the visual tokens per image, which this config does not state (dynamic "
            "resolution): pass --visual-tokens N, or --fraction"
        )
    return args.tokens / visual


def command(plan: Plan, method: Method, args) -> list[str]:
    """The lmms-eval command line of one method."""
    model_args = ",".join(
        part for part in (f"pretrained={plan.pretrained}", method.model_args, args.model_args) if part
    )
    launcher = shlex.split(args.launcher) if args.launcher else [sys.executable]
    out = [*launcher, "-m", "lmms_eval", "--model", "atp", "--model_args", model_args, "--tasks", plan.tasks]
    out += ["--log_samples", "--output_path", str(run_folder(args, method))]
    if plan.include_path:
        out += ["--include_path", str(plan.include_path)]
    return out + shlex.split(args.lmms_eval_args)


def run_folder(args, method: Method) -> Path:
    return Path(args.output_dir) / "runs" / method.name.replace(" ", "_")


def run_method(plan: Plan, method: Method, args) -> dict:
    """One lmms-eval run; its row (Token and each score) from the newest results file."""
    folder = run_folder(args, method)
    before = set(folder.rglob("*_results.json")) if folder.exists() else set()
    done = subprocess.run(
        command(plan, method, args),
        capture_output=True,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    files = sorted(set(folder.rglob("*_results.json")) - before)
    if not files:  # lmms-eval exits 0 when the model fails: the missing file is the error
        raise RuntimeError(
            f"{method.name}: lmms-eval wrote no results (exit {done.returncode})\n"
            f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    results = json.loads(files[-1].read_text())
    row = {
        "method": method.name,
        "model_args": method.model_args,
        "tokens": results["throughput"]["avg_tokens"],
    }
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "_stderr" not in key:
                row[f"{task} {key.split(',')[0]}"] = value
    return row


def add_retention(rows: list[dict]) -> None:
    """Each row's ``retention``: its scores over the unpruned row's, averaged over the scores (the
    paper's Table 1 reports it per method); absent without an unpruned row or for a zero score."""
    base = next((row for row in rows if row["method"] == "unpruned"), None)
    if base is None:
        return
    keys = [key for key in base if key not in ("method", "model_args", "tokens") and base[key]]
    for row in rows:
        if keys and all(key in row for key in keys):
            row["retention"] = sum(row[key] / base[key] for key in keys) / len(keys)


def markdown(rows: list[dict]) -> str:
    columns = [key for key in rows[0] if key not in ("method", "model_args") and key != "retention"]
    columns += ["retention"] if any("retention" in row for row in rows) else []
    header = ["Token" if column == "tokens" else column for column in columns]
    lines = ["| method | model_args | " + " | ".join(header) + " |", "|---" * (len(columns) + 2) + "|"]
    for row in rows:
        cells = [f"{row[c]:.4g}" if isinstance(row.get(c), (int, float)) else "" for c in columns]
        args = f"`{row['model_args']}`" if row["model_args"] else ""
        lines.append(f"| {row['method']} | {args} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(args) -> int:
    if args.plot:
        from atp.cli.plotting import require

        require("--plot")  # before any run
    if args.from_table:
        from atp.arguments import read_json

        record = read_json(args.from_table, "--from-table")
        _check_table(record, args.from_table)
        _write_plot(record, args)
        print(json.dumps(record, indent=2) if args.json else markdown(record["rows"]), end="")
        return 0
    todo = plan(args)
    runnable = [method for method in todo.methods if method.model_args is not None]
    for method in todo.methods:
        if method.model_args is None:
            print(f"{method.name}: left out: {method.skipped}", file=sys.stderr)
    if args.dry_run:
        for method in runnable:
            target = (
                ""
                if method.fraction != method.fraction
                else f"  # Token metric {100 * method.fraction:.1f}% of the visual tokens"
            )
            print(f"{method.name}:{target}\n  {shlex.join(command(todo, method, args))}")
        return 0
    if importlib.util.find_spec("lmms_eval") is None:
        raise ValueError('atp eval runs lmms-eval, which is not installed: pip install "atp[eval]"')
    rows = []
    for method in runnable:
        print(f"running {method.name} ...", file=sys.stderr, flush=True)
        try:
            rows.append(run_method(todo, method, args))
        except RuntimeError as error:
            print(f"atp eval: error: {error}", file=sys.stderr)
            return 1
    add_retention(rows)
    record = {
        "pretrained": args.model or "tiny random LLaVA (random weights: the scores mean nothing)",
        "tasks": todo.tasks,
        "fraction": todo.fraction,
        "rows": rows,
        "left_out": {m.name: m.skipped for m in todo.methods if m.model_args is None},
    }
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "table.json").write_text(json.dumps(record, indent=2))
    table = markdown(rows)
    (output / "table.md").write_text(table)
    _write_plot(record, args)
    print(json.dumps(record, indent=2) if args.json else table, end="" if not args.json else "\n")
    print(f"wrote {output / 'table.md'} and {output / 'table.json'}", file=sys.stderr)
    return 0


def _check_table(record: dict, path) -> None:
    """A table.json as :func:`main` writes it: rows of dicts, each with a method and its model args."""
    rows = record.get("rows")
    if (
        not rows
        or not isinstance(rows, list)
        or not all(isinstance(row, dict) and {"method", "model_args"} <= set(row) for row in rows)
    ):
        raise ValueError(
            f"--from-table {path} has no 'rows' of methods (each with 'method' and 'model_args'); give a "
            "table.json written by atp eval"
        )


def _write_plot(record: dict, args) -> None:
    if args.plot:
        from atp.cli.plotting import eval_plot

        eval_plot(record, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
