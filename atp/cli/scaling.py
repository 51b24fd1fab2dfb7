"""The scaling run: pruned against unpruned at the prompt sizes and batch sizes users run.

For each shape (one LLaVA-1.5 image, LLaVA-NeXT's 2,880 tokens, several images, a video-sized
prompt, batches of 4 and 16) the methods run interleaved round after round on one model, and
each is timed through ``generate`` (time to first token = the prefill a user waits for, then
decode tokens/s at that context). Peak memory is measured separately, one subprocess per shape
and method, as the rise of the process's resident-set high-water mark over one ``generate``
call (on CUDA, the allocator's peak). Ratios are per round against the unpruned model of the
same round, with bootstrap intervals (:mod:`atp.core.measure`); the FLOPs ratio stands beside each.

Run it with ``python -m atp.cli.scaling`` (or ``benchmarks/scaling.py``).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from dataclasses import dataclass

import torch

from atp.cli.bench import (
    BenchConfig,
    _attach,
    _static,
    bench_methods,
    build_model,
    make_inputs,
    timed_generate,
)
from atp.core.measure import (
    Clock,
    current_rss,
    paired_ratios,
    peak_rss,
    pin_threads,
    reset_peak_rss,
    summarize,
    threads_restored,
)


@dataclass(frozen=True)
class Shape:
    images: int
    image_size: int
    batch: int
    note: str


SHAPES = {
    "llava-1.5": Shape(1, 336, 1, "one image, 576 visual tokens (LLaVA-1.5)"),
    "llava-next": Shape(
        5, 336, 1, "2,880 visual tokens: LLaVA-NeXT's base image and four tiles, as five images"
    ),
    "multi-image": Shape(3, 336, 1, "three images, 1,728 visual tokens"),
    "video": Shape(8, 196, 1, "a video: 8 frames x 196 tokens = 1,568 visual tokens"),
    "batch-4": Shape(1, 336, 4, "4 prompts of one image each"),
    "batch-16": Shape(1, 336, 16, "16 prompts of one image each"),
}
METHODS = ("unpruned", "atp", "fastv")


def shape_config(base: BenchConfig, shape: Shape) -> BenchConfig:
    config = BenchConfig(**{**base.__dict__})
    config.images, config.image_size, config.batch = shape.images, shape.image_size, shape.batch
    return config


def measure_shape(name: str, base: BenchConfig, methods=METHODS, device: str = "cpu") -> dict:
    """Times, FLOPs and KV-cache ratios of ``methods`` on one shape (in this process)."""
    shape = SHAPES[name]
    config = shape_config(base, shape)
    model = build_model(config, device)
    inputs = make_inputs(model, config, device)
    num_layers = config.num_layers
    every, visual = bench_methods(model, inputs, config, num_layers)
    chosen = {method: every[method] for method in methods}
    clock = Clock(device)
    times = {method: {"ttft": [], "decode": []} for method in chosen}
    static = {}
    order = list(chosen)
    with torch.no_grad():
        for round_index in range(config.warmup + config.repeats):
            shift = round_index % len(order)
            for method in order[shift:] + order[:shift]:
                handle = _attach(model, chosen[method])
                ttft, decode = timed_generate(model, inputs, config.new_tokens, clock)
                if round_index >= config.warmup:
                    times[method]["ttft"].append(ttft)
                    times[method]["decode"].append(decode)
                if method not in static:
                    static[method] = _static(model, inputs, handle, visual)
                if handle is not None:
                    handle.remove()
    from atp.core.efficiency import layer_flops, shape_from_config

    length = inputs["input_ids"].shape[1]
    full = layer_flops(length, shape_from_config(model.config), "2flops-per-mac") * num_layers  # per sample
    static["unpruned"]["flops"] = static["unpruned"]["flops_padded"] = full
    base_times, base_kv = times["unpruned"], static["unpruned"]["kv_cache_bytes"]
    rows = {}
    for method in chosen:
        own = times[method]
        ttft = summarize(own["ttft"])
        decode = summarize(own["decode"])
        rows[method] = {
            "avg_tokens": static[method]["avg_tokens"],
            "flops_ratio": static[method]["flops"] / full,
            "flops_ratio_padded": static[method]["flops_padded"] / full,
            "kv_cache_bytes": static[method]["kv_cache_bytes"],
            "kv_ratio": static[method]["kv_cache_bytes"] / base_kv,
            "ttft_ms": ttft["median"] * 1000,
            "prefill_samples_per_s": config.batch / ttft["median"],
            "decode_tokens_per_s": config.new_tokens * config.batch / decode["median"],
            "time_ratio": summarize(paired_ratios(own["ttft"], base_times["ttft"])),
            "decode_speedup": summarize(paired_ratios(base_times["decode"], own["decode"])),
            "options": chosen[method],
        }
    return {
        "shape": name,
        "note": shape.note,
        "visual_tokens": visual,
        "prompt_tokens": length,
        "batch": config.batch,
        "methods": rows,
    }


def memory_worker(request: dict) -> dict:
    """In a fresh process: the rise of the peak memory over one ``generate`` of one method."""
    base = BenchConfig(**request["config"])
    device = request["device"]
    if device == "cpu":
        pin_threads(base.threads)
    config = shape_config(base, SHAPES[request["shape"]])
    model = build_model(config, device)
    inputs = make_inputs(model, config, device)
    handle = _attach(model, request["method"])
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        if not reset_peak_rss():
            raise RuntimeError("this OS cannot reset the peak resident set (Linux's /proc/self/clear_refs)")
        start = current_rss()
    with torch.no_grad():
        model.generate(
            **inputs, max_new_tokens=config.new_tokens, min_new_tokens=config.new_tokens, do_sample=False
        )
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else peak_rss()
    if handle is not None:
        handle.remove()
    return {"start_bytes": start, "peak_bytes": peak, "rise_bytes": peak - start}


def measure_memory(name: str, method: str, options: dict, base: BenchConfig, device: str) -> dict:
    request = {"shape": name, "method": options, "config": base.__dict__, "device": device}
    done = subprocess.run(
        [sys.executable, "-m", "atp.cli.scaling", "--memory-worker", json.dumps(request)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the memory run of {method} on {name} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@threads_restored
def run(
    base: BenchConfig,
    shapes=tuple(SHAPES),
    methods=METHODS,
    device: str = "cpu",
    memory: bool = True,
    log=print,
) -> dict:
    """The scaling record: every shape's times and ratios, and (``memory``) peak memory per method."""
    for name in shapes:
        if name not in SHAPES:
            raise ValueError(f"unknown shape {name!r}; choose from {', '.join(SHAPES)}")
    if "unpruned" not in methods:
        raise ValueError("the methods must include 'unpruned' (every ratio is against it)")
    threads = pin_threads(base.threads) if device == "cpu" else torch.get_num_threads()
    base.threads = threads
    records = []
    for name in shapes:
        log(f"[scaling] {name}: timing {', '.join(methods)}")
        record = measure_shape(name, base, methods, device)
        if memory:
            for method, row in record["methods"].items():
                log(f"[scaling] {name}: peak memory of {method} (subprocess)")
                row["memory"] = measure_memory(name, method, row["options"], base, device)
            start = record["methods"]["unpruned"]["memory"]["rise_bytes"]
            for row in record["methods"].values():
                row["memory_ratio"] = row["memory"]["rise_bytes"] / start if start else None
        records.append(record)
    return {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "threads": threads,
        "config": dict(base.__dict__),
        "flops_convention": "2flops-per-mac (decoder layers only; vision tower and LM head excluded)",
        "timing": f"generate: time to first token and decode steps, median of {base.repeats} interleaved rounds "
        f"after {base.warmup} warm-up; ratios per round against unpruned, 95% bootstrap interval",
        "memory": "peak memory above the loaded model over one generate call, one subprocess per method "
        + ("(CUDA allocator peak)" if device.startswith("cuda") else "(resident-set high-water mark, Linux)"),
        "shapes": records,
    }


def format_table(record: dict) -> str:
    config = record["config"]
    rows = [
        f"atp scaling on {record['device']} ({record['threads']} threads); {config['num_layers']} layers x "
        f"{config['hidden_size']}, {config['dtype']}, {config['new_tokens']} decode steps",
        f"timing: {record['timing']}",
        f"FLOPs: {record['flops_convention']}",
        f"memory: {record['memory']}",
        "",
        f"{'shape':>11} | {'visual':>6} | {'batch':>5} | {'method':>8} | {'Token':>6} | {'FLOPs':>6} | {'padded':>6} | "
        f"{'time ratio [95% CI]':>22} | {'TTFT ms':>8} | {'decode tok/s':>12} | {'KV':>6} | {'peak rise':>10}",
    ]
    for shape in record["shapes"]:
        for method, row in shape["methods"].items():
            ratio = row["time_ratio"]
            memory = row.get("memory")
            rise = f"{memory['rise_bytes'] / 2**20:>7.0f} MiB" if memory else f"{'-':>10}"
            rows.append(
                f"{shape['shape']:>11} | {shape['visual_tokens']:>6} | {shape['batch']:>5} | {method:>8} | "
                f"{row['avg_tokens']:>6.1f} | {row['flops_ratio']:>6.1%} | {row['flops_ratio_padded']:>6.1%} | "
                f"{ratio['median']:>6.1%} [{ratio['low']:.1%}, {ratio['high']:.1%}] | {row['ttft_ms']:>8.1f} | "
                f"{row['decode_tokens_per_s']:>12.1f} | {row['kv_ratio']:>6.1%} | {rise}"
            )
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    from atp.arguments import COUNT, NON_NEGATIVE_COUNT

    parser = argparse.ArgumentParser(prog="python -m atp.cli.scaling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=["unpruned", "keep_all", "atp", "fastv", "fixed"],
    )
    parser.add_argument("--num-layers", type=COUNT, default=8)
    parser.add_argument("--hidden-size", type=COUNT, default=1024)
    parser.add_argument("--heads", type=COUNT, default=16)
    parser.add_argument("--repeats", type=COUNT, default=3, help="timed rounds per shape (default 3)")
    parser.add_argument(
        "--warmup", type=NON_NEGATIVE_COUNT, default=1, help="untimed rounds first (default 1)"
    )
    parser.add_argument("--new-tokens", type=COUNT, default=8, help="decode steps (default 8)")
    parser.add_argument(
        "--threads", type=COUNT, default=None, help="torch threads on CPU (default: available cores)"
    )
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--output", default=None, help="write the JSON record here")
    parser.add_argument(
        "--plot", default=None, help="write the time-ratio vs FLOPs-ratio plot here (matplotlib)"
    )
    parser.add_argument("--json", action="store_true", help="print the JSON record instead of the table")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.memory_worker is not None:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return 0
    for name, least in (("repeats", 1), ("new_tokens", 1), ("num_layers", 1), ("warmup", 0)):
        if getattr(args, name) < least:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least {least}")
    if args.plot:
        from atp.cli.plotting import require

        require("--plot")
    base = BenchConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        heads=args.heads,
        repeats=args.repeats,
        warmup=args.warmup,
        new_tokens=args.new_tokens,
        threads=args.threads,
        dtype=args.dtype,
    )
    log = (lambda message: print(message, file=sys.stderr)) if args.json else print
    record = run(base, args.shapes, tuple(args.methods), args.device, memory=not args.no_memory, log=log)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(json.dumps(record) + "\n")
    if args.plot:
        from atp.cli.plotting import scaling_plot

        scaling_plot(record, args.plot)
    print(json.dumps(record) if args.json else format_table(record))
    return 0


def markdown(record: dict) -> str:
    """The scaling record as one markdown table (docs/benchmarks.md shows it, checked by its tests)."""
    rows = [
        "| shape | visual tokens | batch | method | Token | FLOPs | FLOPs as padded | TTFT ratio [95% CI] | TTFT ms | "
        "prefill samples/s | decode tok/s | KV cache | peak memory rise | peak ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape in record["shapes"]:
        for method, row in shape["methods"].items():
            ratio = row["time_ratio"]
            memory = row.get("memory")
            rise = f"{memory['rise_bytes'] / 2**20:.0f} MiB" if memory else "-"
            peak = f"{row['memory_ratio']:.1%}" if row.get("memory_ratio") is not None else "-"
            rows.append(
                f"| {shape['shape']} | {shape['visual_tokens']} | {shape['batch']} | {method} | "
                f"{row['avg_tokens']:.1f} | {row['flops_ratio']:.1%} | {row['flops_ratio_padded']:.1%} | "
                f"{ratio['median']:.1%} [{ratio['low']:.1%}, {ratio['high']:.1%}] | {row['ttft_ms']:.1f} | "
                f"{row['prefill_samples_per_s']:.2f} | {row['decode_tokens_per_s']:.1f} | {row['kv_ratio']:.1%} | "
                f"{rise} | {peak} |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
