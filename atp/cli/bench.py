"""``atp bench``: prefill latency, time to first token, decode speed and memory, pruned vs not.

Methods run interleaved, round after round, on one model and one prompt: every ratio is taken
within a round (each method against the unpruned model of the same round), and reported as the
median over rounds with a bootstrap interval, so that a machine that speeds up or slows down
between rounds does not pass for a difference between methods. In each round a method is
attached, one forward runs untimed-for-the-targets (the first forward after switching methods,
reported as ``prefill_cold``), then the timed prefill and one ``generate`` call whose steps are
time-stamped by a logits processor: its time to first token and decode tokens/s are what a
user's ``generate`` sees.

``atp`` (untrained heads with fixed initial thresholds), ``fastv`` and ``fixed`` are set to the
same average token count: ``atp`` runs first, ``fixed`` reuses its kept counts at the same
layers, and ``fastv``'s ratio is solved for the same Token metric.

:func:`add_parser` adds the command, :func:`main` runs it, :func:`run` measures (rounds timed by
``_time_rounds``, summarised by ``_summarize_methods``); the scaling run (:mod:`atp.cli.scaling`)
reuses the model, the prompt and the methods built here.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass

import torch

from atp.core.efficiency import layer_flops, report, report_from_stats, shape_from_config
from atp.core.measure import Clock, HookTime, paired_ratios, pin_threads, summarize, threads_restored, verdict
from atp.host import compat
from atp.host.attach import attach, default_layers


@dataclass
class BenchConfig:
    num_layers: int = 8
    hidden_size: int = 1024
    heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    text_tokens: int = 48
    new_tokens: int = 8
    repeats: int = 10
    warmup: int = 1
    theta_r: float = 0.5
    theta_s: float = 0.9
    dtype: str = "float32"
    seed: int = 0
    images: int = 1  # images in the prompt (video frames are images of a smaller size)
    batch: int = 1  # prompts per forward (the same text, each its own random image)
    threads: int | None = None  # torch threads on CPU (default: the cores this process may use)


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
    """``config.batch`` prompts of ``config.text_tokens`` text tokens around ``config.images``
    images back to back (8 text tokens before them); each prompt gets its own random pixels."""
    generator = torch.Generator().manual_seed(config.seed)
    visual = model.config.image_seq_length * config.images
    before = torch.randint(3, 32000, (8,), generator=generator).tolist()
    after = torch.randint(3, 32000, (config.text_tokens - 8,), generator=generator).tolist()
    row = [1, *before, *([model.config.image_token_id] * visual), *after]
    ids = torch.tensor([row] * config.batch, device=device)
    size = config.image_size
    pixels = torch.randn(config.batch * config.images, 3, size, size, generator=generator)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": pixels.to(device=device, dtype=model.dtype),
    }


def _attach(model, method: dict):
    if method.get("args") is not None:  # the command line's ATP options
        from atp.cli.loading import attach_from_args

        return attach_from_args(model, method["args"], **method["options"])
    if method["policy"] is None:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return attach(model, layers=method["layers"], policy=method["policy"], **method["options"])


def solve_fastv_ratio(avg_tokens: float, visual: int, num_layers: int, layer: int) -> float:
    """The FastV ratio R whose Token metric equals ``avg_tokens`` when pruning before ``layer``."""
    kept = (avg_tokens * num_layers - layer * visual) / (num_layers - layer)
    return min(max(1.0 - kept / visual, 0.0), 0.99)


def loaded_inputs(loaded, device: str) -> dict:
    """One synthetic image and a question through a checkpoint's processor (its chat template)."""
    from atp.cli.demo import prompt_inputs, synthetic_image

    dtype = next(loaded.model.parameters()).dtype
    inputs = prompt_inputs(loaded, synthetic_image(), "Describe the image in detail.")
    return {
        name: value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
        for name, value in inputs.items()
        if isinstance(value, torch.Tensor)
    }


def _step_stamps(clock):
    """A logits processor that time-stamps every step of ``generate`` (it runs once per new token,
    right after that step's forward)."""
    from transformers import LogitsProcessor

    class StepStamps(LogitsProcessor):
        def __init__(self):
            self.stamps = []

        def __call__(self, input_ids, scores):
            self.stamps.append(clock.now())
            return scores

    return StepStamps()


def timed_generate(model, inputs: dict, new_tokens: int, clock) -> tuple[float, float]:
    """Seconds to the first token and seconds for the ``new_tokens`` decode steps after it, of one
    greedy ``generate`` call (``new_tokens + 1`` tokens, none stopping early)."""
    from transformers import LogitsProcessorList

    stamps = _step_stamps(clock)
    begin = clock.now()
    model.generate(
        **inputs,
        max_new_tokens=new_tokens + 1,
        min_new_tokens=new_tokens + 1,
        do_sample=False,
        logits_processor=LogitsProcessorList([stamps]),
    )
    if len(stamps.stamps) != new_tokens + 1:
        raise RuntimeError(f"generate made {len(stamps.stamps)} steps, {new_tokens + 1} were asked for")
    return stamps.stamps[0] - begin, stamps.stamps[-1] - stamps.stamps[0]


TARGETS = {
    "prefill_vs_flops": (
        "atp prefill time ratio / its FLOPs ratio",
        1.10,
        "prefill time ratio within 1.10x of the FLOPs ratio",
    ),
    "scoring_overhead": (
        "keep_all prefill time / unpruned prefill time - 1 (two clocks: noisy)",
        0.02,
        "scoring + heads under 2%: keep_all vs unpruned",
    ),
    "scoring_share": (
        "time inside atp's hooks with keep_all (scoring at full length, heads) / its prefill time",
        0.02,
        "scoring + heads under 2%: timed inside",
    ),
    "atp_share": (
        "time inside atp's hooks with atp (scoring, heads, layouts, gathers) / its prefill time",
        0.02,
        "all of atp's own work under 2% of its prefill",
    ),
    "atp_vs_fastv": ("atp prefill time / fastv prefill time", 1.0, "atp no slower than FastV (same Token)"),
    "decode_vs_unpruned": (
        "atp decode step time / unpruned decode step time",
        1.0,
        "decoding on the pruned cache no slower than unpruned",
    ),
}


@threads_restored
def run(config: BenchConfig, device: str = "cpu", loaded=None, atp_args=None, profile: bool = False) -> dict:
    """Every method on one prompt, interleaved round after round; ``loaded`` (a checkpoint from
    ``--model``) replaces the random LLaVA-1.5-shaped model and its prompt; ``atp_args`` (parsed
    ``--policy``, ``--layers``, ``--option``, ``--atp-checkpoint``) define the ``atp`` row;
    ``profile`` adds op tables of one prefill per method (:func:`profile_prefill`)."""
    threads = pin_threads(config.threads) if not device.startswith("cuda") else torch.get_num_threads()
    config.threads = threads
    model, inputs = _model_and_inputs(config, device, loaded)
    num_layers = config.num_layers
    clock = Clock(device)
    methods, visual = bench_methods(model, inputs, config, num_layers, atp_args)
    times, results = _time_rounds(model, inputs, methods, config, device, clock, visual)
    text = inputs["input_ids"].shape[1] - visual
    length = inputs["input_ids"].shape[1]
    full_flops = layer_flops(length, shape_from_config(model.config), "2flops-per-mac") * num_layers
    results["unpruned"]["flops"] = full_flops
    _summarize_methods(times, results, config, clock, inputs, full_flops)
    targets = bench_targets(times, results, device=device)
    counted = _count_flops(model, inputs, methods)
    record = {
        "model": loaded.name if loaded is not None else "LLaVA-1.5 shape, random weights",
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "threads": threads,
        "config": dict(config.__dict__),
        "visual_tokens": visual,
        "text_tokens": text,
        "batch": inputs["input_ids"].shape[0],
        "flops_convention": "2flops-per-mac (decoder layers only; vision tower and LM head excluded)",
        "timing": ("CUDA events" if device.startswith("cuda") else "wall clock (time.perf_counter)")
        + f", median of {config.repeats} interleaved rounds after {config.warmup} warm-up",
        "interval": "95% percentile bootstrap of the median of per-round ratios (2000 resamples, seeded)",
        "scoring_overhead": results["keep_all"]["prefill_ratio"] - 1.0,
        "scoring_overhead_flops": counted["keep_all"] / counted["unpruned"] - 1.0,
        "targets": targets,
        "methods": results,
    }
    if profile:
        record["profile"] = profile_prefill(model, inputs, methods, device)
    return record


def _model_and_inputs(config: BenchConfig, device: str, loaded=None) -> tuple:
    """The model and its prompt: ``loaded``'s (a checkpoint from ``--model``) or the random
    LLaVA-1.5-shaped model's; the model's decoder depth and width are written into ``config``."""
    from atp.host.attach import resolve_adapter

    if loaded is None:
        model = build_model(config, device)
        inputs = make_inputs(model, config, device)
    else:
        model, inputs = loaded.model, loaded_inputs(loaded, device)
    adapter = resolve_adapter(model)
    num_layers = len(adapter.decoder_layers())
    config.num_layers, config.hidden_size = num_layers, adapter.text_config().hidden_size
    return model, inputs


def _time_rounds(
    model, inputs: dict, methods: dict, config: BenchConfig, device: str, clock, visual: int
) -> tuple[dict, dict]:
    """``config.warmup`` then ``config.repeats`` rounds, each method once per round (the order
    rotating): ``times`` (per method, the timed rounds' samples of each kind) and ``results`` (per
    method, what the first round measures without a clock, :func:`_static`, and the CUDA peak)."""
    kinds = ("prefill", "prefill_cold", "hooks", "ttft", "decode")
    times = {name: {kind: [] for kind in kinds} for name in methods}
    results = {name: {} for name in methods}

    def prefill():  # logits for the last position only, as generate's prefill
        model(**inputs, use_cache=True, logits_to_keep=1)

    names = list(methods)
    with torch.no_grad():
        for round_index in range(config.warmup + config.repeats):
            shift = round_index % len(names)  # each method in every place of the order in turn
            for name in names[shift:] + names[:shift]:
                method = methods[name]
                handle = _attach(model, method)
                if device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                measured = {"prefill_cold": clock(prefill)}
                with HookTime() as hooks:
                    measured["prefill"] = clock(prefill)
                measured["hooks"] = hooks.total
                measured["ttft"], measured["decode"] = timed_generate(model, inputs, config.new_tokens, clock)
                if round_index >= config.warmup:
                    for kind, value in measured.items():
                        times[name][kind].append(value)
                if round_index == 0:
                    results[name].update(_static(model, inputs, handle, visual))
                    if device.startswith("cuda"):
                        results[name]["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
                if handle is not None:
                    handle.remove()
    return times, results


def _summarize_methods(
    times: dict, results: dict, config: BenchConfig, clock, inputs: dict, full_flops: float
) -> None:
    """Each method's medians, and its ratios against the unpruned model of the same round with
    their bootstrap intervals, written into its entry of ``results``."""
    base, base_kv = times["unpruned"], results["unpruned"]["kv_cache_bytes"]
    seed = config.seed
    for name, result in results.items():
        own = times[name]
        intervals = {
            "prefill_ratio": summarize(paired_ratios(own["prefill"], base["prefill"]), seed=seed),
            "ttft_ratio": summarize(paired_ratios(own["ttft"], base["ttft"]), seed=seed),
            "decode_speedup": summarize(paired_ratios(base["decode"], own["decode"]), seed=seed),
            "cold_penalty": summarize(
                [c / w - 1 for c, w in zip(own["prefill_cold"], own["prefill"])], seed=seed
            ),
            # host time (kernels run asynchronously on a GPU): a CPU measure only
            **(
                {}
                if clock.cuda
                else {"hooks_share": summarize(paired_ratios(own["hooks"], own["prefill"]), seed=seed)}
            ),
        }
        prefill_ms = summarize([t * 1000 for t in own["prefill"]], seed=seed)
        result.update(
            prefill_ms=prefill_ms["median"],
            prefill_ms_spread=[prefill_ms["min"], prefill_ms["max"]],
            prefill_cold_ms=summarize([t * 1000 for t in own["prefill_cold"]])["median"],
            ttft_ms=summarize([t * 1000 for t in own["ttft"]])["median"],
            decode_tokens_per_s=config.new_tokens
            * inputs["input_ids"].shape[0]
            / summarize(own["decode"])["median"],
            flops_ratio=result["flops"] / full_flops,
            kv_ratio=result["kv_cache_bytes"] / base_kv,
            prefill_ratio=intervals["prefill_ratio"]["median"],
            ttft_ratio=intervals["ttft_ratio"]["median"],
            decode_speedup=intervals["decode_speedup"]["median"],
            intervals=intervals,
            hooks_ms=None if clock.cuda else summarize([t * 1000 for t in own["hooks"]])["median"],
            samples={kind: [t * 1000 for t in values] for kind, values in own.items()},
        )


def _count_flops(model, inputs: dict, methods: dict) -> dict:
    """The FLOPs of one prefill, unpruned and with keep_all (``FlopCounterMode``): the scoring
    overhead in FLOPs, deterministic."""
    counted = {}
    for name in ("unpruned", "keep_all"):  # the same overhead in FLOPs: deterministic
        handle = _attach(model, methods[name])
        counter = compat.flop_counter(display=False)
        with counter, torch.no_grad():
            model(**inputs, use_cache=True, logits_to_keep=1)
        counted[name] = counter.get_total_flops()
        if handle is not None:
            handle.remove()
    return counted


def bench_methods(model, inputs: dict, config: BenchConfig, num_layers: int, atp_args=None) -> dict:
    """The methods to time (``atp``'s counts calibrating ``fastv`` and ``fixed``) and the prompt's
    visual tokens per sample."""
    layers = default_layers(num_layers)
    methods = {
        "unpruned": {"policy": None, "layers": None, "options": {}},
        "keep_all": {"policy": "keep_all", "layers": layers, "options": {}},  # the scoring overhead alone
        "atp": {
            "policy": "atp",
            "layers": layers,
            "options": {"init_theta_r": config.theta_r, "init_theta_s": config.theta_s},
        },
    }
    if config.images > 1:  # the paper's head reads one image's tokens; this one any count
        methods["atp"]["options"]["threshold_head"] = "binned"
    given = (
        None
        if atp_args is None
        else (atp_args.policy, atp_args.layers, atp_args.option, atp_args.atp_checkpoint)
    )
    if given is not None and given != (None, None, [], None):
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
        kept = handle.stats.kept.float().mean(dim=0).round().long().tolist()
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
    return methods, visual


def _static(model, inputs: dict, handle, visual: int) -> dict:
    """What does not need a clock: kept counts, Token metric, FLOPs and KV-cache bytes."""
    out = model(**inputs, use_cache=True)
    result = {"kv_cache_bytes": compat.kv_cache_bytes(compat.output_cache(out))}
    if handle is None:
        result.update(kept=[], layers=[], avg_tokens=float(visual), kv_ratio_analytic=1.0)
        return result
    stats, text = handle.stats, inputs["input_ids"].shape[1] - visual
    batch = stats.kept.shape[0]
    reports = [
        report_from_stats(stats, model, text_tokens=text, sample=b, convention="2flops-per-mac")
        for b in range(batch)
    ]
    # in a batch, drop mode computes every layer at the longest sample's length (the others are
    # padded with fillers): the FLOPs of that padded batch, per sample
    padded = report(
        shape_from_config(model.config),
        list(stats.layers),
        stats.kept.max(dim=0).values.tolist(),
        visual_tokens=float(stats.num_visual.max()),
        text_tokens=text,
        convention="2flops-per-mac",
    )
    result.update(
        kept=stats.kept[0].tolist(),
        kept_per_sample=stats.kept.tolist(),
        layers=list(stats.layers),
        avg_tokens=stats.avg_tokens,
        flops=sum(r.flops for r in reports) / batch,  # the mean over the samples, per sample
        flops_padded=padded.flops,
        kv_ratio_analytic=sum(r.kv_ratio for r in reports) / batch,
    )
    return result


def bench_targets(times: dict, results: dict, seed: int = 0, device: str = "cpu") -> list[dict]:
    """Each target of the benchmark with its per-round samples summarised and a verdict
    (:func:`atp.core.measure.verdict`): met, missed, or undecided within the noise."""
    samples = {}
    if "atp" in times:
        flops = results["atp"]["flops_ratio"]
        samples["prefill_vs_flops"] = [
            r / flops for r in paired_ratios(times["atp"]["prefill"], times["unpruned"]["prefill"])
        ]
        samples["decode_vs_unpruned"] = paired_ratios(times["atp"]["decode"], times["unpruned"]["decode"])
        # host time (kernels run asynchronously on a GPU): CPU only; and only where the hooks were
        # timed at all (an attached method whose hooks report no time would pass for free)
        if not device.startswith("cuda") and any(times["atp"]["hooks"]):
            samples["atp_share"] = paired_ratios(times["atp"]["hooks"], times["atp"]["prefill"])
        if "fastv" in times:
            samples["atp_vs_fastv"] = paired_ratios(times["atp"]["prefill"], times["fastv"]["prefill"])
    if "keep_all" in times:
        samples["scoring_overhead"] = [
            r - 1 for r in paired_ratios(times["keep_all"]["prefill"], times["unpruned"]["prefill"])
        ]
        if not device.startswith("cuda") and any(times["keep_all"]["hooks"]):
            samples["scoring_share"] = paired_ratios(times["keep_all"]["hooks"], times["keep_all"]["prefill"])
    targets = []
    for name, (measure, limit, goal) in TARGETS.items():
        if name not in samples:
            continue
        summary = summarize(samples[name], seed=seed)
        targets.append(
            {
                "name": name,
                "goal": goal,
                "measure": measure,
                "limit": limit,
                **summary,
                "status": verdict(summary, limit),
            }
        )
    return targets


ATP_RANGES = (
    "atp.model_input",
    "atp.language_model_input",
    "atp.layer_input",
    "atp.last_output",
    "atp.score",
)


def profile_prefill(
    model, inputs: dict, methods: dict, device: str, forwards: int = 3, top: int = 12
) -> dict:
    """``torch.profiler`` on ``forwards`` prefills of each method (after one untimed): time by op
    (self time, per forward) and atp's own share, the time inside its hooks and scoring (the
    ranges :func:`atp.core.measure.traced` names, Python included) of the profiled forwards' wall time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    clock = Clock(device)
    out = {}
    for name in ("unpruned", "keep_all", "atp", "fastv"):
        if name not in methods:
            continue
        handle = _attach(model, methods[name])
        with torch.no_grad():
            model(**inputs, use_cache=True, logits_to_keep=1)
            with torch_profile(activities=activities) as prof:
                begin = clock.now()
                for _ in range(forwards):
                    model(**inputs, use_cache=True, logits_to_keep=1)
                wall_ms = (clock.now() - begin) * 1000 / forwards
        if handle is not None:
            handle.remove()
        events = prof.key_averages()
        ops = {
            event.key: {
                "calls": event.count / forwards,
                "self_ms": event.self_cpu_time_total / 1000 / forwards,
            }
            for event in events
            if not event.key.startswith("atp.")
        }
        ranges = {
            event.key: event.cpu_time_total / 1000 / forwards
            for event in events
            if event.key.startswith("atp.")
        }
        atp_ms = sum(ms for key, ms in ranges.items() if key in ATP_RANGES)
        out[name] = {
            "wall_ms": wall_ms,
            "ops_ms": sum(op["self_ms"] for op in ops.values()),
            "atp_ms": atp_ms,
            "atp_share": atp_ms / wall_ms,
            "ranges": ranges,
            "ops": dict(sorted(ops.items(), key=lambda item: -item[1]["self_ms"])[: top * 3]),
        }
    return out


def _op_rows(profile: dict, top: int):
    """(op, unpruned entry, atp entry) for the ``top`` ops of each, the unpruned ones first."""
    base, pruned = profile.get("unpruned", {}).get("ops", {}), profile.get("atp", {}).get("ops", {})
    names = sorted(base, key=lambda op: -base[op]["self_ms"])[:top]
    names += [op for op in sorted(pruned, key=lambda op: -pruned[op]["self_ms"])[:top] if op not in names]
    absent = {"self_ms": 0.0, "calls": 0}
    return [(op, base.get(op, absent), pruned.get(op, absent)) for op in names]


def format_profile(profile: dict, top: int = 12) -> str:
    """The op table, unpruned vs atp (self time per prefill), and atp's share of each method."""
    rows = [f"{'op':>48} | {'unpruned ms':>11} | {'atp ms':>8} | {'ratio':>6} | {'calls':>11}"]
    for op, a, b in _op_rows(profile, top):
        ratio = f"{b['self_ms'] / a['self_ms']:6.1%}" if a["self_ms"] else "   new"
        rows.append(
            f"{op[-48:]:>48} | {a['self_ms']:>11.2f} | {b['self_ms']:>8.2f} | {ratio} | "
            f"{a['calls']:>5.0f} {b['calls']:>5.0f}"
        )
    rows.append("")
    for name, entry in profile.items():
        rows.append(
            f"{name:>9}: {entry['wall_ms']:.1f} ms per prefill under the profiler, atp's hooks and scoring "
            f"{entry['atp_ms']:.2f} ms ({entry['atp_share']:.2%})"
        )
    return "\n".join(rows)


def _ms(value: float | None) -> str:
    """Milliseconds, or "-" where not measured (atp's host time on a GPU)."""
    return "-" if value is None else f"{value:.1f}"


def _interval(summary: dict, percent: bool = True) -> str:
    if percent:
        return f"{summary['median']:.1%} [{summary['low']:.1%}, {summary['high']:.1%}]"
    return f"{summary['median']:.3f} [{summary['low']:.3f}, {summary['high']:.3f}]"


def format_table(record: dict) -> str:
    config = record["config"]
    rows = [
        f"atp bench on {record['device']} ({record['threads']} threads), {record['timing']}",
        f"model: {record.get('model', 'LLaVA-1.5 shape')}, {config['num_layers']} layers x "
        f"{config['hidden_size']}, batch {record.get('batch', 1)}, "
        f"{record['visual_tokens']} visual + {record['text_tokens']} text tokens, {config['dtype']}",
        f"FLOPs: {record['flops_convention']}",
        f"[low, high]: {record.get('interval', 'spread')}",
        "",
        f"{'method':>9} | {'Token':>6} | {'FLOPs':>6} | {'prefill ms':>10} | {'prefill ratio [95% CI]':>23} | "
        f"{'TTFT ms':>8} | {'decode tok/s':>12} | {'KV':>6} | {'cold +':>6} | {'atp ms':>6}",
    ]
    for name, result in record["methods"].items():
        intervals = result.get("intervals", {})
        ratio = (
            _interval(intervals["prefill_ratio"])
            if "prefill_ratio" in intervals
            else f"{result['prefill_ratio']:.1%}"
        )
        cold = f"{intervals['cold_penalty']['median']:+6.1%}" if "cold_penalty" in intervals else ""
        rows.append(
            f"{name:>9} | {result['avg_tokens']:>6.1f} | {result['flops_ratio']:>6.1%} | {result['prefill_ms']:>10.1f} | "
            f"{ratio:>23} | {result['ttft_ms']:>8.1f} | {result['decode_tokens_per_s']:>12.1f} | "
            f"{result['kv_ratio']:>6.1%} | {cold:>6} | {_ms(result.get('hooks_ms')):>6}"
        )
    rows.append("")
    rows.append(
        f"scoring overhead (keep_all vs unpruned prefill): {record['scoring_overhead']:+.1%} time, "
        f"{record['scoring_overhead_flops']:+.2%} FLOPs (FlopCounterMode, whole forward)"
    )
    if record.get("targets"):
        rows += ["", f"{'target':>52} | {'measured [95% CI]':>28} | {'limit':>6} | status"]
        for target in record["targets"]:
            rows.append(
                f"{target['goal']:>52} | {_interval(target, percent=False):>28} | {target['limit']:>6.2f} | "
                f"{target['status']}"
            )
    if "profile" in record:
        rows += [
            "",
            "profile of one prefill (torch.profiler, self time by op):",
            format_profile(record["profile"]),
        ]
    return "\n".join(rows)


def plot(record: dict, path: str) -> None:
    from atp.cli.plotting import bench_plot

    bench_plot(record, path)


def add_parser(sub) -> None:
    from atp.arguments import at_least
    from atp.cli.loading import add_atp_arguments, add_model_arguments

    bench = sub.add_parser(
        "bench", help="prefill / decode latency and memory: unpruned vs atp vs fastv vs fixed"
    )
    add_model_arguments(bench, "a random LLaVA-1.5-shaped model sized by --num-layers / --hidden-size")
    add_atp_arguments(bench)
    bench.add_argument("--small", action="store_true", help="on a GPU, use the CPU-sized model")
    bench.add_argument(
        "--num-layers", type=at_least(2), default=None, help="decoder layers (CPU default 8, GPU 32)"
    )
    bench.add_argument(
        "--hidden-size", type=at_least(16), default=None, help="LM width (CPU default 1024, GPU 4096)"
    )
    bench.add_argument(
        "--repeats",
        type=at_least(1),
        default=None,
        help="timed rounds, median and bootstrap interval reported (default 10)",
    )
    bench.add_argument(
        "--warmup", type=at_least(0), default=None, help="untimed rounds first (CPU default 1, GPU 3)"
    )
    bench.add_argument(
        "--threads",
        type=at_least(1),
        default=None,
        help="torch threads on CPU (default: the cores this process may use)",
    )
    bench.add_argument(
        "--profile", action="store_true", help="add torch.profiler op tables of one prefill, unpruned vs atp"
    )
    bench.add_argument("--new-tokens", type=at_least(1), default=None, help="decode steps timed (default 8)")
    bench.add_argument(
        "--text-tokens", type=at_least(9), default=None, help="prompt text tokens (default 48)"
    )
    bench.add_argument("--output", default=None, help="also write the JSON record to this file")
    bench.add_argument("--plot", default=None, help="write a PNG plot here (needs matplotlib)")
    bench.add_argument("--json", action="store_true", help="print the JSON record instead of the table")


def main(args) -> int:
    from atp.cli.loading import device_of, load

    device = device_of(args)
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    for name, least in (
        ("repeats", 1),
        ("new_tokens", 1),
        ("num_layers", 2),
        ("hidden_size", 16),
        ("text_tokens", 9),
        ("threads", 1),
        ("warmup", 0),
    ):
        value = getattr(args, name, None)
        if value is not None and value < least:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {least}, got {value}")
    if args.plot:
        from atp.cli.plotting import require

        require("--plot")  # before minutes of measuring
    config = BenchConfig()
    if device.startswith("cuda") and not args.small:  # the real LLaVA-1.5-7B language model shapes
        config = BenchConfig(
            num_layers=32, hidden_size=4096, heads=32, dtype="bfloat16", repeats=10, warmup=3
        )
    for name in ("num_layers", "hidden_size", "repeats", "new_tokens", "text_tokens", "threads", "warmup"):
        if getattr(args, name, None) is not None:
            setattr(config, name, getattr(args, name))
    if args.dtype is not None:
        config.dtype = args.dtype
    loaded = None
    if args.model is not None:
        loaded = load(args.model, config.dtype, device, args.attn_implementation)
    record = run(config, device, loaded, args, profile=args.profile)
    text = json.dumps(record)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(text + "\n")
    if args.plot:
        plot(record, args.plot)
    print(text if args.json else format_table(record))
    return 0


def markdown(record: dict, top: int = 12) -> str:
    """The record as markdown tables (docs/benchmarks.md shows these, checked by its tests):
    methods, targets, and, when profiled, ops and atp's share; tables apart by blank lines."""
    rows = [
        "| method | Token | FLOPs | prefill ms | prefill ratio [95% CI] | first forward after switching | "
        "TTFT ms | decode tok/s | KV cache | atp's own ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in record["methods"].items():
        intervals = result["intervals"]
        rows.append(
            f"| {name} | {result['avg_tokens']:.1f} | {result['flops_ratio']:.1%} | {result['prefill_ms']:.1f} | "
            f"{_interval(intervals['prefill_ratio'])} | {intervals['cold_penalty']['median']:+.1%} | "
            f"{result['ttft_ms']:.1f} | {result['decode_tokens_per_s']:.1f} | {result['kv_ratio']:.1%} | "
            f"{_ms(result.get('hooks_ms'))} |"
        )
    tables = ["\n".join(rows)]
    rows = ["| target | measured as | median [95% CI] | limit | status |", "|---|---|---|---|---|"]
    for target in record["targets"]:
        rows.append(
            f"| {target['goal']} | {target['measure']} | {_interval(target, percent=False)} | "
            f"{target['limit']:.2f} | **{target['status']}** |"
        )
    tables.append("\n".join(rows))
    if "profile" in record:
        profile = record["profile"]
        rows = [
            "| op | unpruned ms | atp ms | atp / unpruned | calls (unpruned, atp) |",
            "|---|---|---|---|---|",
        ]
        for op, a, b in _op_rows(profile, top):
            ratio = f"{b['self_ms'] / a['self_ms']:.1%}" if a["self_ms"] else "atp only"
            rows.append(
                f"| `{op}` | {a['self_ms']:.2f} | {b['self_ms']:.2f} | {ratio} | {a['calls']:.0f}, {b['calls']:.0f} |"
            )
        tables.append("\n".join(rows))
        rows = [
            "| method | prefill ms (profiled) | atp's hooks ms | share | scoring | pruning (decide, layouts) |",
            "|---|---|---|---|---|---|",
        ]
        for name, entry in profile.items():
            ranges = entry["ranges"]
            rows.append(
                f"| {name} | {entry['wall_ms']:.1f} | {entry['atp_ms']:.2f} | {entry['atp_share']:.2%} | "
                f"{ranges.get('atp.score', 0.0):.2f} | {ranges.get('atp.prune', 0.0):.2f} |"
            )
        tables.append("\n".join(rows))
    return "\n\n".join(tables)


def width_markdown(records: list[dict]) -> str:
    """One row per bench record (e.g. several ``--hidden-size``): how the ratios and atp's own
    share move with the width of the language model."""
    rows = [
        "| LM width | unpruned prefill ms | atp prefill ratio [95% CI] | FLOPs ratio | ratio / FLOPs ratio | "
        "atp's own ms | atp's share | scoring share (keep_all) | atp / FastV |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for record in sorted(records, key=lambda r: r["config"]["hidden_size"]):
        methods, targets = record["methods"], {t["name"]: t for t in record["targets"]}
        atp_row = methods["atp"]
        rows.append(
            f"| {record['config']['hidden_size']} | {methods['unpruned']['prefill_ms']:.1f} | "
            f"{_interval(atp_row['intervals']['prefill_ratio'])} | {atp_row['flops_ratio']:.1%} | "
            f"{_interval(targets['prefill_vs_flops'], percent=False)} | {_ms(atp_row['hooks_ms'])} | "
            f"{_interval(targets['atp_share'])} | {_interval(targets['scoring_share'])} | "
            f"{_interval(targets['atp_vs_fastv'], percent=False)} |"
        )
    return "\n".join(rows)
