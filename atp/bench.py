"""``atp bench``: prefill latency, time to first token, decode speed and memory, pruned vs not.

Methods run interleaved, round after round, on one model and one prompt, so the ratios come
from one run (wall clock on a shared CPU is noisy; CUDA events after a warm-up on a GPU).
``atp`` (untrained heads with fixed initial thresholds), ``fastv`` and ``fixed`` are set to the
same average token count: ``atp`` runs first, ``fixed`` reuses its kept counts at the same
layers, and ``fastv``'s ratio is solved for the same Token metric.
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from dataclasses import dataclass

import torch

import atp
from atp import compat
from atp.efficiency import report_from_stats


@dataclass
class BenchConfig:
    num_layers: int = 8
    hidden_size: int = 1024
    heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    text_tokens: int = 48
    new_tokens: int = 8
    repeats: int = 5
    warmup: int = 1
    theta_r: float = 0.5
    theta_s: float = 0.9
    dtype: str = "float32"
    seed: int = 0


def build_model(config: BenchConfig, device: str):
    """A LLaVA-1.5-shaped model with random weights: CLIP 336/14 (576 visual tokens) and a Llama LM
    with the 7B's FFN ratio, ``num_layers`` x ``hidden_size`` (the real 7B: 32 x 4096)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=config.image_size,
        patch_size=config.patch_size,
    )
    text = LlamaConfig(
        hidden_size=config.hidden_size,
        intermediate_size=int(config.hidden_size * 11008 / 4096),
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        vocab_size=32064,
        max_position_embeddings=4096,
    )
    llava = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=32000,
        image_seq_length=(config.image_size // config.patch_size) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(config.seed)
    with torch.device(device):  # built in place: a 7B model is not first materialised on the host
        model = compat.model_from_config(LlavaForConditionalGeneration, llava, getattr(torch, config.dtype))
    model.eval()
    model.generation_config.pad_token_id = 0
    return model


def make_inputs(model, config: BenchConfig, device: str) -> dict:
    generator = torch.Generator().manual_seed(config.seed)
    visual = model.config.image_seq_length
    before = torch.randint(3, 32000, (8,), generator=generator).tolist()
    after = torch.randint(3, 32000, (config.text_tokens - 8,), generator=generator).tolist()
    ids = torch.tensor([[1, *before, *([model.config.image_token_id] * visual), *after]], device=device)
    pixels = torch.randn(1, 3, config.image_size, config.image_size, generator=generator)
    return {"input_ids": ids, "pixel_values": pixels.to(device=device, dtype=model.dtype)}


class Clock:
    """Wall clock on CPU, CUDA events on a GPU (after synchronising)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin


def _attach(model, method: dict):
    if method.get("args") is not None:  # the command line's ATP options
        from atp.loading import attach_from_args

        return attach_from_args(model, method["args"], **method["options"])
    if method["policy"] is None:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return atp.attach(model, layers=method["layers"], policy=method["policy"], **method["options"])


def solve_fastv_ratio(avg_tokens: float, visual: int, num_layers: int, layer: int) -> float:
    """The FastV ratio R whose Token metric equals ``avg_tokens`` when pruning before ``layer``."""
    kept = (avg_tokens * num_layers - layer * visual) / (num_layers - layer)
    return min(max(1.0 - kept / visual, 0.0), 0.99)


def loaded_inputs(loaded, device: str) -> dict:
    """One synthetic image and a question through a checkpoint's processor (its chat template)."""
    from atp.demo import prompt_inputs, synthetic_image

    dtype = next(loaded.model.parameters()).dtype
    inputs = prompt_inputs(loaded, synthetic_image(), "Describe the image in detail.")
    return {
        name: value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
        for name, value in inputs.items()
        if isinstance(value, torch.Tensor)
    }


def run(config: BenchConfig, device: str = "cpu", loaded=None, atp_args=None) -> dict:
    """Every method on one prompt, interleaved round after round; ``loaded`` (a checkpoint from
    ``--model``) replaces the random LLaVA-1.5-shaped model and its prompt; ``atp_args`` (parsed
    ``--policy``, ``--layers``, ``--option``, ``--atp-checkpoint``) define the ``atp`` row."""
    from atp.attach import resolve_adapter

    if loaded is None:
        model = build_model(config, device)
        inputs = make_inputs(model, config, device)
    else:
        model, inputs = loaded.model, loaded_inputs(loaded, device)
    adapter = resolve_adapter(model)
    num_layers = len(adapter.decoder_layers())
    config.num_layers, config.hidden_size = num_layers, adapter.text_config().hidden_size
    clock = Clock(device)
    layers = atp.default_layers(num_layers)
    methods = {
        "unpruned": {"policy": None, "layers": None, "options": {}},
        "keep_all": {"policy": "keep_all", "layers": layers, "options": {}},  # the scoring overhead alone
        "atp": {
            "policy": "atp",
            "layers": layers,
            "options": {"init_theta_r": config.theta_r, "init_theta_s": config.theta_s},
        },
    }
    if atp_args is not None and (
        atp_args.policy,
        atp_args.layers,
        atp_args.option,
        atp_args.atp_checkpoint,
    ) != (
        None,
        None,
        [],
        None,
    ):
        methods["atp"] = {
            "policy": atp_args.policy,
            "layers": atp_args.layers,
            "options": {},
            "args": atp_args,
        }
    with torch.no_grad():  # calibrate the baselines on atp's counts
        handle = _attach(model, methods["atp"])
        model(**inputs)
        layers = list(handle.layers)  # the baselines prune at the same layers
        kept = handle.stats.kept[0].tolist()
        avg = handle.stats.avg_tokens
        visual = int(handle.stats.num_visual[0])
        handle.remove()
    fastv_layer = max(1, round(2 * num_layers / 32))
    methods["fastv"] = {
        "policy": "fastv",
        "layers": [fastv_layer],
        "options": {"ratio": solve_fastv_ratio(avg, visual, num_layers, fastv_layer)},
    }
    if 0 not in layers:  # a pre-LLM row (pool) has no layers to copy
        methods["fixed"] = {"policy": "fixed", "layers": layers, "options": {"keep": [int(k) for k in kept]}}
    times = {name: {"prefill": [], "first_token": [], "decode": []} for name in methods}
    results = {name: {} for name in methods}

    def prefill():  # logits for the last position only, as generate's prefill
        model(**inputs, use_cache=True, logits_to_keep=1)

    def first_token():
        model.generate(**inputs, max_new_tokens=1, do_sample=False)

    state = {}

    def start_decoding():  # untimed: a prefill whose cache the decode loop extends
        state["cache"] = compat.output_cache(model(**inputs, use_cache=True, logits_to_keep=1))

    cache_name = compat.cache_argument(model)

    def decode():  # decode steps with a fixed token: the same work for every method
        length = inputs["input_ids"].shape[1]
        token = torch.full((1, 1), 5, device=inputs["input_ids"].device)
        for step in range(config.new_tokens):
            # the embedded model's positions by hand; a checkpoint's model (M-RoPE too) derives its own
            position = (
                {}
                if loaded is not None
                else {"position_ids": torch.full((1, 1), length + step, device=token.device)}
            )
            model(input_ids=token, use_cache=True, **position, **{cache_name: state["cache"]})

    with torch.no_grad():
        for round_index in range(config.warmup + config.repeats):
            for name, method in methods.items():
                handle = _attach(model, method)
                if device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                for kind, fn in (("prefill", prefill), ("first_token", first_token), ("decode", decode)):
                    if kind == "decode":
                        start_decoding()
                    elapsed = clock(fn)
                    if round_index >= config.warmup:
                        times[name][kind].append(elapsed)
                if round_index == 0:
                    out = model(**inputs, use_cache=True)
                    results[name]["kv_cache_bytes"] = atp.kv_cache_bytes(compat.output_cache(out))
                    if handle is not None:
                        results[name]["kept"] = handle.stats.kept[0].tolist()
                        results[name]["layers"] = list(handle.stats.layers)
                        results[name]["avg_tokens"] = handle.stats.avg_tokens
                        efficiency = report_from_stats(
                            handle.stats,
                            model,
                            text_tokens=inputs["input_ids"].shape[1] - visual,
                            convention="2flops-per-mac",
                        )
                        results[name]["flops"] = efficiency.flops
                        results[name]["kv_ratio_analytic"] = efficiency.kv_ratio
                    else:
                        results[name].update(
                            kept=[], layers=[], avg_tokens=float(visual), kv_ratio_analytic=1.0
                        )
                    if device.startswith("cuda"):
                        results[name]["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
                if handle is not None:
                    handle.remove()
    base = results["unpruned"]
    text = inputs["input_ids"].shape[1] - visual
    from atp.efficiency import layer_flops, shape_from_config

    full_flops = layer_flops(text + visual, shape_from_config(model.config), "2flops-per-mac") * num_layers
    base["flops"] = full_flops
    for name, result in results.items():
        prefill_s = statistics.median(times[name]["prefill"])
        first_s = statistics.median(times[name]["first_token"])
        decode_s = statistics.median(times[name]["decode"])
        result.update(
            prefill_ms=prefill_s * 1000,
            ttft_ms=first_s * 1000,
            decode_tokens_per_s=config.new_tokens / decode_s,
            flops_ratio=result["flops"] / full_flops,
            kv_ratio=result["kv_cache_bytes"] / base["kv_cache_bytes"],
        )
    for result in results.values():
        result["prefill_ratio"] = result["prefill_ms"] / base["prefill_ms"]
        result["decode_speedup"] = result["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    overhead = results["keep_all"]["prefill_ms"] / base["prefill_ms"] - 1.0
    counted = {}
    for name in ("unpruned", "keep_all"):  # the same overhead in FLOPs: deterministic
        handle = _attach(model, methods[name])
        counter = compat.flop_counter(display=False)
        with counter, torch.no_grad():
            model(**inputs, use_cache=True, logits_to_keep=1)
        counted[name] = counter.get_total_flops()
        if handle is not None:
            handle.remove()
    return {
        "model": loaded.name if loaded is not None else "LLaVA-1.5 shape, random weights",
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "threads": torch.get_num_threads(),
        "config": config.__dict__,
        "visual_tokens": visual,
        "text_tokens": text,
        "flops_convention": "2flops-per-mac (decoder layers only; vision tower and LM head excluded)",
        "timing": "CUDA events"
        if device.startswith("cuda")
        else "wall clock (time.perf_counter), median of repeats",
        "scoring_overhead": overhead,
        "scoring_overhead_flops": counted["keep_all"] / counted["unpruned"] - 1.0,
        "methods": results,
    }


def format_table(record: dict) -> str:
    rows = [
        f"atp bench on {record['device']} ({record['threads']} threads), {record['timing']}",
        f"model: {record.get('model', 'LLaVA-1.5 shape')}, {record['config']['num_layers']} layers x "
        f"{record['config']['hidden_size']}, "
        f"{record['visual_tokens']} visual + {record['text_tokens']} text tokens, {record['config']['dtype']}",
        f"FLOPs: {record['flops_convention']}",
        "",
        f"{'method':>9} | {'Token':>6} | {'FLOPs':>6} | {'prefill ms':>10} | {'ratio':>6} | {'TTFT ms':>8} | "
        f"{'decode tok/s':>12} | {'KV':>6}",
    ]
    for name, result in record["methods"].items():
        rows.append(
            f"{name:>9} | {result['avg_tokens']:>6.1f} | {result['flops_ratio']:>6.1%} | {result['prefill_ms']:>10.1f} | "
            f"{result['prefill_ratio']:>6.1%} | {result['ttft_ms']:>8.1f} | {result['decode_tokens_per_s']:>12.1f} | "
            f"{result['kv_ratio']:>6.1%}"
        )
    rows.append("")
    rows.append(
        f"scoring overhead (keep_all vs unpruned prefill): {record['scoring_overhead']:+.1%} time, "
        f"{record['scoring_overhead_flops']:+.2%} FLOPs (FlopCounterMode, whole forward)"
    )
    atp_result = record["methods"]["atp"]
    rows.append(
        f"atp prefill ratio {atp_result['prefill_ratio']:.1%} vs FLOPs ratio {atp_result['flops_ratio']:.1%} "
        f"(gap {atp_result['prefill_ratio'] - atp_result['flops_ratio']:+.1%})"
    )
    return "\n".join(rows)


def plot(record: dict, path: str) -> None:
    from atp.plotting import bench_plot

    bench_plot(record, path)


def main(args) -> int:
    from atp.loading import device_of, load

    device = device_of(args)
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    for name, least in (
        ("repeats", 1),
        ("new_tokens", 1),
        ("num_layers", 2),
        ("hidden_size", 16),
        ("text_tokens", 9),
    ):
        value = getattr(args, name, None)
        if value is not None and value < least:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {least}, got {value}")
    if args.plot:
        from atp.plotting import require

        require("--plot")  # before minutes of measuring
    config = BenchConfig()
    if device.startswith("cuda") and not args.small:  # the real LLaVA-1.5-7B language model shapes
        config = BenchConfig(
            num_layers=32, hidden_size=4096, heads=32, dtype="bfloat16", repeats=10, warmup=3
        )
    for name in ("num_layers", "hidden_size", "repeats", "new_tokens", "text_tokens"):
        if getattr(args, name, None) is not None:
            setattr(config, name, getattr(args, name))
    if args.dtype is not None:
        config.dtype = args.dtype
    loaded = None
    if args.model is not None:
        loaded = load(args.model, config.dtype, device, args.attn_implementation)
    record = run(config, device, loaded, args)
    text = json.dumps(record)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(text + "\n")
    if args.plot:
        plot(record, args.plot)
    print(text if args.json else format_table(record))
    return 0
