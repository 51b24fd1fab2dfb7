"""vLLM unpruned vs atp's in-LLM pruning inside vLLM: prefill, TTFT, throughput, KV blocks.

    .venv-vllm/bin/python integrations/atp-vllm/benchmark.py [--rounds 3] [--output FILE]

One engine per method (unpruned, fastv, fixed, atp, pool), each in its own process and held for the whole run; the driver asks them in
turn, round after round (interleaved, the order rotated each round), so a machine that speeds up
or slows down moves every method alike. The reported figures are per-round ratios to the unpruned
engine: median and a 95% bootstrap interval over rounds (atp bench's convention).

The model: a random LLaVA-1.5-shaped checkpoint written offline (336 px images in 14 px patches:
576 visual tokens; 8 decoder layers of width 1024 in 4 heads of 256), float32, vLLM's CPU engine
in eager mode (``--compile``: vLLM's default compilation). Per round and concurrency C in
(1, 4, 16): C requests with different images at once, max_tokens 16, greedy.

* ``ttft``: the time to the first token of one request alone (max_tokens 1): the prefill.
* ``requests/s`` and ``output tokens/s`` at each concurrency.
* KV blocks: what the scheduler allocates per request (vLLM allocates blocks for every prompt token
  before the forward, for all layers alike, so pruning saves compute here, not KV memory; see
  docs/serving.md).

``Token`` is the paper's metric (visual tokens at the input of each decoder layer, averaged over the
8 layers); no FLOPs figure is printed here (``atp flops`` gives them for a schedule).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = {
    "unpruned": None,
    "fastv": {"layers": [2], "policy": "fastv", "options": {"ratio": 0.75}},  # FastV's R: the share dropped
    "fixed": {"layers": [2], "policy": "fixed", "options": {"keep": [0.25]}},
    "atp": {"layers": [1, 4, 6], "policy": "atp", "options": {}},
    "pool": {"layers": [0], "policy": "pool", "options": {"stride": 2}},  # at layer 0's input: 2 x 2 averages
}
CONCURRENCY = (1, 4, 16)
QUESTION = "USER: <image>\nWhat is shown in the image ? ASSISTANT:"


def worker(checkpoint: str, settings: dict | None, compiled: bool) -> None:
    """Hold one engine; answer the driver's commands (one JSON line each) until stdin closes."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import numpy as np
    from atp_vllm import ENGINE_ARGUMENTS
    from PIL import Image
    from vllm import LLM, SamplingParams

    arguments = {
        "model": checkpoint,
        "dtype": "float32",
        "max_model_len": 1024,
        "limit_mm_per_prompt": {"image": 1},
        "seed": 0,
        **ENGINE_ARGUMENTS,
        "enforce_eager": not compiled,
        "max_num_batched_tokens": 16 * 1024,
    }
    if settings is not None:
        arguments["hf_overrides"] = {"architectures": ["AtpLlavaForConditionalGeneration"], "atp": settings}
    llm = LLM(**arguments)
    runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    block_size = llm.llm_engine.vllm_config.cache_config.block_size

    def requests(count: int, offset: int) -> list[dict]:
        pictures = [np.random.default_rng(offset + i).random((336, 336, 3)) for i in range(count)]
        return [
            {"prompt": QUESTION, "multi_modal_data": {"image": Image.fromarray((p * 255).astype("uint8"))}}
            for p in pictures
        ]

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        batch = requests(command["concurrency"], command["offset"])
        first = time.perf_counter()
        llm.generate(batch[:1], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
        ttft = time.perf_counter() - first
        start = time.perf_counter()
        results = llm.generate(
            batch, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True), use_tqdm=False
        )
        wall = time.perf_counter() - start
        prompt = len(results[0].prompt_token_ids)
        kept = getattr(getattr(runner.model, "atp", None), "kept_log", [])
        print(
            json.dumps(
                {
                    "ttft": ttft,
                    "wall": wall,
                    "requests": len(results),
                    "output_tokens": sum(len(r.outputs[0].token_ids) for r in results),
                    "prompt_tokens": prompt,
                    "kv_blocks_per_request": -(-(prompt + 16) // block_size),
                    "kept": kept[-1]["kept"] if kept else None,
                }
            ),
            flush=True,
        )


def write_checkpoint(folder: Path) -> Path:
    from atp.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(folder, "llava", num_layers=8, head_dim=256, image_size=336, patch_size=14)


def token_metric(kept: list[int] | None, layers: list[int], num_layers: int = 8, visual: int = 576) -> float:
    """The paper's Token: visual tokens at the input of each decoder layer, averaged over layers."""
    if not kept:
        return float(visual)
    counts, current = [], visual
    boundaries = dict(zip(layers, kept))
    for layer in range(num_layers):
        current = boundaries.get(layer, current)
        counts.append(current)
    return sum(counts) / num_layers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--output", help="also write the JSON record here")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="vLLM's default compilation for every engine (default: eager mode)",
    )
    parser.add_argument("--worker", nargs=2, metavar=("CHECKPOINT", "SETTINGS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], json.loads(args.worker[1]), args.compile)
        return 0
    from atp.core.measure import paired_ratios, summarize

    folder = Path(tempfile.mkdtemp(prefix="atp-vllm-bench-"))
    checkpoint = str(write_checkpoint(folder / "model"))
    workers = {}
    for name, settings in METHODS.items():
        workers[name] = subprocess.Popen(
            [sys.executable, __file__, "--worker", checkpoint, json.dumps(settings)]
            + ["--compile"] * args.compile,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
    for name, process in workers.items():
        for line in process.stdout:
            if line.startswith("{") and json.loads(line).get("ready"):
                break
        else:
            raise RuntimeError(f"the {name} engine did not start")
    samples = {name: {c: [] for c in CONCURRENCY} for name in METHODS}
    names = list(METHODS)
    for round_index in range(args.rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for concurrency in CONCURRENCY:
            for name in order:
                process = workers[name]
                command = {"concurrency": concurrency, "offset": 1000 * round_index}
                process.stdin.write(json.dumps(command) + "\n")
                process.stdin.flush()
                line = next(line for line in process.stdout if line.startswith("{"))
                samples[name][concurrency].append(json.loads(line))
        print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    for process in workers.values():
        process.stdin.close()
        process.wait(timeout=120)
    record = {
        "model": "LLaVA-1.5 shape, random weights, 8 layers x 1024, 576 visual tokens",
        "rounds": args.rounds,
        "mode": "compiled (vLLM's default compilation)" if args.compile else "eager (enforce_eager=True)",
    }
    record["methods"] = {}
    base = samples["unpruned"]
    for name in METHODS:
        entry = {
            "kept": samples[name][1][0]["kept"],
            "kv_blocks_per_request": samples[name][1][0]["kv_blocks_per_request"],
        }
        layers = (METHODS[name] or {}).get("layers", [])
        entry["token"] = token_metric(entry["kept"], layers)
        ttft = [s["ttft"] for s in samples[name][1]]
        entry["ttft_ms"] = summarize([t * 1000 for t in ttft])["median"]
        entry["ttft_ratio"] = summarize(paired_ratios(ttft, [s["ttft"] for s in base[1]]))
        for concurrency in CONCURRENCY:
            rates = [s["requests"] / s["wall"] for s in samples[name][concurrency]]
            tokens = [s["output_tokens"] / s["wall"] for s in samples[name][concurrency]]
            base_rates = [s["requests"] / s["wall"] for s in base[concurrency]]
            entry[f"c{concurrency}"] = {
                "requests_per_s": summarize(rates)["median"],
                "output_tokens_per_s": summarize(tokens)["median"],
                "speedup": summarize(paired_ratios(rates, base_rates)),
            }
        record["methods"][name] = entry
    print(table(record))
    print(json.dumps(record))
    if args.output:
        Path(args.output).write_text(json.dumps(record, indent=1))
    return 0


def table(record: dict) -> str:
    def interval(summary: dict) -> str:
        return f"{summary['median']:.2f} [{summary['low']:.2f}, {summary['high']:.2f}]"

    rows = [
        "| method | Token | kept after each ATP layer | KV blocks / request | TTFT ms | TTFT ratio | "
        "req/s speedup c=1 | c=4 | c=16 | out tok/s c=16 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in record["methods"].items():
        rows.append(
            f"| {name} | {entry['token']:.1f} | {entry['kept'] or '-'} | {entry['kv_blocks_per_request']} | "
            f"{entry['ttft_ms']:.0f} | {interval(entry['ttft_ratio'])} | {interval(entry['c1']['speedup'])} | "
            f"{interval(entry['c4']['speedup'])} | {interval(entry['c16']['speedup'])} | "
            f"{entry['c16']['output_tokens_per_s']:.1f} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
