"""Accuracy and the Token metric per method through lmms-eval (the paper's Table 1 layout).

Runs ``python -m lmms_eval --model atp`` once per method, reads each results file and prints
one row per method: the Token metric (mean kept visual tokens per layer, over samples) and each
task's score. Without ``--pretrained`` it writes a tiny random LLaVA (4 layers, 16 visual tokens)
and the two tiny local tasks of :mod:`atp.evaluation.tiny_tasks`, and compares the methods at a
Token metric near 8 of 16: the numbers then only show that the pipeline runs (random weights).

    python benchmarks/lmms_eval_table.py [--json] [--output table.json]
    python benchmarks/lmms_eval_table.py --pretrained llava-hf/llava-1.5-7b-hf --tasks gqa,pope \\
        --method "fastv=policy=fastv,layers=2,option.ratio=0.711" --method "unpruned=" ...
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TINY_METHODS = {  # the tiny LLaVA: 4 layers, 16 visual tokens per image
    "unpruned": "",
    "atp (untrained heads)": "policy=atp,layers=1;2,option.threshold_head=binned",  # 1 or 2 images
    "fastv": "policy=fastv,layers=1,option.ratio=0.67",
    "pdrop": "policy=pdrop,layers=1;2,option.ratio=0.5",
    "fixed": "policy=fixed,layers=1;2,option.keep=[0.5,0.5]",
    "spatial": "policy=spatial,layers=1,option.strides=[2]",
    "random": "policy=random,layers=1;2,option.keep=[0.5,0.5]",
    "pool": "policy=pool,option.stride=2",
}


def run(pretrained, tasks, include_path, name, model_args, output, extra_args) -> dict:
    args = ",".join(part for part in (f"pretrained={pretrained}", model_args, extra_args) if part)
    command = [sys.executable, "-m", "lmms_eval", "--model", "atp", "--model_args", args, "--tasks", tasks]
    command += ["--log_samples", "--output_path", str(output / name.replace(" ", "_"))]
    if include_path:
        command += ["--include_path", str(include_path)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    files = sorted((output / name.replace(" ", "_")).rglob("*_results.json"))
    if not files:  # lmms-eval exits 0 when the model fails: the missing file is the error
        raise SystemExit(f"{name}: lmms-eval wrote no results\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    results = json.loads(files[-1].read_text())
    scores = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if isinstance(value, float) and "_stderr" not in key:
                scores[f"{task} {key.split(',')[0]}"] = value
    return {"method": name, "model_args": model_args, "tokens": results["throughput"]["avg_tokens"], **scores}


def add_retention(rows: list[dict]) -> None:
    """Each row's ``retention``: its scores over the unpruned row's, averaged over the scores (the
    paper's Table 1 reports it per method); absent without an unpruned row or for a zero score."""
    base = next((row for row in rows if row["method"] == "unpruned"), None)
    if base is None:
        return
    keys = [key for key in base if key not in ("method", "model_args", "tokens") and base[key]]
    for row in rows:
        if keys:
            row["retention"] = sum(row[key] / base[key] for key in keys) / len(keys)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--pretrained", default=None, help="checkpoint folder or hub id (default: a tiny LLaVA)"
    )
    parser.add_argument(
        "--tasks", default=None, help="lmms-eval tasks, comma separated (default: the tiny tasks)"
    )
    parser.add_argument("--include_path", default=None, help="extra task folder for lmms-eval")
    parser.add_argument("--method", action="append", default=[], metavar="NAME=MODEL_ARGS")
    parser.add_argument(
        "--model-args", default="dtype=float32,device=cpu,batch_size=2", help="added to every run"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--output", default=None, help="also write the JSON record here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        pretrained, tasks, include_path = args.pretrained, args.tasks, args.include_path
        if pretrained is None:
            from atp.tiny import write_tiny_checkpoint

            pretrained = write_tiny_checkpoint(scratch / "tiny-llava", family="llava", num_layers=4)
        if tasks is None:
            from atp.evaluation.tiny_tasks import TASKS, write_tiny_tasks

            tasks, include_path = ",".join(TASKS), write_tiny_tasks(scratch / "tasks")
        methods = dict(pair.split("=", 1) for pair in args.method) or TINY_METHODS
        rows = [
            run(pretrained, tasks, include_path, n, a, scratch, args.model_args) for n, a in methods.items()
        ]
    add_retention(rows)
    record = {"pretrained": str(args.pretrained or "tiny random LLaVA"), "tasks": tasks, "rows": rows}
    if args.output:
        Path(args.output).write_text(json.dumps(record, indent=2))
    if args.json:
        print(json.dumps(record, indent=2))
        return
    columns = [key for key in rows[0] if key not in ("method", "model_args")]
    print("| method | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for row in rows:
        print(f"| {row['method']} | " + " | ".join(f"{row.get(c, float('nan')):.3g}" for c in columns) + " |")


if __name__ == "__main__":
    main()
