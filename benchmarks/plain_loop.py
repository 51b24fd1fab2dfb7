"""The plain loop a user might write: attach once, time N prefills, detach, in blocks.

It measures the same prefill as `atp bench` (the random LLaVA-1.5-shaped model, 576 visual
tokens, atp's untrained heads at init_theta_r=0.5, init_theta_s=0.9), but in blocks: unpruned
N times, then atp N times, and again. Each block's ratio to the block before it shows how far
the machine drifts between blocks, which a plain loop takes for a difference between methods
(`atp bench` compares methods within one round instead). docs/benchmarks.md reports both.

    python benchmarks/plain_loop.py --blocks 4 --calls 5 --output plain_loop.json
"""

import argparse
import json
import statistics
import time
import warnings

import torch

import atp
from atp.cli.bench import BenchConfig, build_model, make_inputs
from atp.core.measure import pin_threads, summarize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=4, help="unpruned/atp block pairs (default 4)")
    parser.add_argument("--calls", type=int, default=5, help="timed prefills per block (default 5)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    threads = pin_threads(args.threads)
    config = BenchConfig()
    model = build_model(config, "cpu")
    inputs = make_inputs(model, config, "cpu")
    layers = atp.default_layers(config.num_layers)

    def prefill():
        model(**inputs, use_cache=True, logits_to_keep=1)

    blocks = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(args.blocks):
            block = {}
            for name in ("unpruned", "atp"):
                handle = None
                if name == "atp":
                    handle = atp.attach(
                        model, layers=layers, policy="atp", init_theta_r=0.5, init_theta_s=0.9
                    )
                calls = []
                for _ in range(args.calls + 1):  # the first call after attaching is not timed
                    begin = time.perf_counter()
                    prefill()
                    calls.append((time.perf_counter() - begin) * 1000)
                block[name] = calls[1:]
                if handle is not None:
                    handle.remove()
            blocks.append(block)
    unpruned = [statistics.median(block["unpruned"]) for block in blocks]
    pruned = [statistics.median(block["atp"]) for block in blocks]
    record = {
        "threads": threads,
        "blocks": blocks,
        "ratio_per_block": [a / b for a, b in zip(pruned, unpruned)],
        "ratio_of_medians": statistics.median(pruned) / statistics.median(unpruned),
        "unpruned_block_medians_ms": unpruned,
        "unpruned_drift": max(unpruned) / min(unpruned) - 1,
        "ratio": summarize([a / b for a, b in zip(pruned, unpruned)]),
    }
    print(f"plain loop, {args.blocks} blocks x {args.calls} prefills per method, {threads} threads")
    print("unpruned block medians (ms):", ", ".join(f"{v:.1f}" for v in unpruned))
    print("atp block medians (ms):     ", ", ".join(f"{v:.1f}" for v in pruned))
    print("atp / unpruned per block:   ", ", ".join(f"{v:.1%}" for v in record["ratio_per_block"]))
    print(
        f"ratio of medians {record['ratio_of_medians']:.1%}; unpruned drifted {record['unpruned_drift']:.1%} between blocks"
    )
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
