"""``atp demo``: attach ATP to a tiny random LLaVA-1.5-shaped model and show what it prunes.

Everything is built from configs (no download): a CLIP tower at 336 px / patch 14
(576 visual tokens, as LLaVA-1.5) and a 32-layer Llama language model of hidden size 64.
The weights are random, so the generated tokens are meaningless; the pruning machinery,
the statistics and the KV-cache savings are real.
"""

from __future__ import annotations

import json
import time
import warnings

import numpy as np
import torch

import atp
from atp import compat
from atp.testing import clip_pixel_values, llava_prompt, tiny_llava


def synthetic_image(size: int = 336):
    """A picture with a few shapes on a gradient, so the patches differ."""
    from PIL import Image, ImageDraw

    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    pixels = np.stack(
        [np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)), np.full((size, size), 96, np.uint8)], -1
    )
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    draw.ellipse((40, 60, 150, 170), fill=(230, 40, 40))
    draw.rectangle((190, 180, 300, 300), fill=(30, 30, 200))
    return image


def run(
    layers: list[int] | None = None,
    policy: str = "atp",
    theta_r: float = 0.5,
    theta_s: float = 0.9,
    image_path: str | None = None,
    max_new_tokens: int = 8,
    seed: int = 0,
    extra_options: dict | None = None,
) -> dict:
    """Build the tiny model, generate with and without ATP, return the measurements."""
    started = time.perf_counter()
    model = tiny_llava(num_layers=32, image_size=336, patch_size=14, hidden_size=64, seed=seed)
    if image_path is None:
        image = synthetic_image()
    else:
        from PIL import Image

        image = Image.open(image_path)
    inputs = {
        "input_ids": torch.tensor([llava_prompt(model, [1, 11, 12, 13], [14, 15, 16, 17, 18, 19, 20])]),
        "pixel_values": clip_pixel_values(image, 336)[None],
    }
    options = {"init_theta_r": theta_r, "init_theta_s": theta_s} if policy == "atp" else {}
    options.update(extra_options or {})

    def generate():
        with torch.no_grad():
            return model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True
            )

    with warnings.catch_warnings():  # first, so that bad options fail before anything runs
        warnings.simplefilter("ignore", UserWarning)  # the heads are untrained by design here
        handle = atp.attach(model, layers=layers, policy=policy, **options)
    pruned = generate()
    stats = handle.stats
    handle.remove()
    full = generate()
    prompt_length = inputs["input_ids"].shape[1]
    return {
        "model": "tiny random LLaVA-1.5 shape: CLIP 336/14 (576 visual tokens), 32-layer Llama, hidden 64",
        "policy": policy,
        "options": options,
        "layers": list(stats.layers),
        "num_layers": stats.num_layers,
        "visual_tokens": int(stats.num_visual[0]),
        "kept": stats.kept[0].tolist(),
        "avg_tokens": stats.avg_tokens,
        "kv_cache_bytes": atp.kv_cache_bytes(compat.output_cache(pruned)),
        "kv_cache_bytes_full": atp.kv_cache_bytes(compat.output_cache(full)),
        "generated": pruned.sequences[0, prompt_length:].tolist(),
        "generated_full": full.sequences[0, prompt_length:].tolist(),
        "seconds": round(time.perf_counter() - started, 2),
    }


def format_report(result: dict) -> str:
    lines = [
        f"atp demo: {result['model']}",
        f"policy {result['policy']!r} {result['options']}, ATP layers {result['layers']}",
        "",
        f"{'layers':>10} | {'visual tokens':>13} | {'kept':>6}",
        f"{'-' * 10}-+-{'-' * 13}-+-{'-' * 6}",
    ]
    bounds = [0, *result["layers"], result["num_layers"]]
    counts = [result["visual_tokens"], *result["kept"]]
    for start, stop, count in zip(bounds, bounds[1:], counts):
        span = f"{start}-{stop - 1}"
        lines.append(f"{span:>10} | {count:>13} | {count / max(result['visual_tokens'], 1):>6.1%}")
    ratio = result["kv_cache_bytes"] / max(result["kv_cache_bytes_full"], 1)
    lines += [
        "",
        f"average visual tokens per layer (the paper's 'Token' metric): {result['avg_tokens']:.1f} "
        f"of {result['visual_tokens']}",
        f"KV cache after generate: {result['kv_cache_bytes']:,} bytes with pruning, "
        f"{result['kv_cache_bytes_full']:,} without ({ratio:.1%})",
        f"generated token ids (random weights, meaningless): {result['generated']}",
        f"finished in {result['seconds']} s",
    ]
    return "\n".join(lines)


def main(args) -> int:
    from atp.cli import parse_options

    options = parse_options(getattr(args, "option", []), args.policy)
    result = run(
        args.layers,
        args.policy,
        args.theta_r,
        args.theta_s,
        args.image,
        args.max_new_tokens,
        args.seed,
        options,
    )
    print(json.dumps(result) if args.json else format_report(result))
    return 0
