"""``atp demo``: attach ATP to a tiny random LLaVA-1.5-shaped model and show what it prunes.

Everything is built from configs (no download): a CLIP tower at 336 px / patch 14
(576 visual tokens, as LLaVA-1.5) and a 32-layer Llama language model of hidden size 64.
The weights are random, so the generated tokens are meaningless; the pruning machinery,
the statistics and the KV-cache savings are real. ``--model`` runs a checkpoint instead
(:mod:`atp.cli.loading`). :func:`add_parser` adds the command, :func:`main` runs it.
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch

from atp.host import compat
from atp.tiny.models import clip_pixel_values, llava_prompt, tiny_llava


def add_parser(sub) -> None:
    from atp.arguments import COUNT, OPEN_FRACTION, SEED
    from atp.cli.loading import add_atp_arguments, add_model_arguments

    demo = sub.add_parser("demo", help="prune a model's visual tokens on one image and print what was kept")
    add_model_arguments(demo, "a tiny random LLaVA-1.5-shaped model, offline")
    add_atp_arguments(demo)
    demo.add_argument(
        "--theta-r", type=OPEN_FRACTION, default=0.5, help="initial redundancy threshold (atp policy)"
    )
    demo.add_argument(
        "--theta-s", type=OPEN_FRACTION, default=0.9, help="initial spatial threshold (atp policy)"
    )
    demo.add_argument("--image", default=None, help="an image file (default: a synthetic picture)")
    demo.add_argument("--prompt", default="Describe the image.", help="the question (with --model)")
    demo.add_argument("--max-new-tokens", type=COUNT, default=8)
    demo.add_argument("--seed", type=SEED, default=0, help="the embedded model's weights")
    demo.add_argument("--json", action="store_true", help="print one JSON record instead of a table")


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


def embedded(seed: int = 0):
    """The demo's own model: LLaVA-1.5's shape, random weights, no processor (see the module doc)."""
    from atp.cli.loading import Loaded

    model = tiny_llava(num_layers=32, image_size=336, patch_size=14, hidden_size=64, seed=seed)
    return Loaded(model, None, EMBEDDED)


EMBEDDED = "tiny random LLaVA-1.5 shape: CLIP 336/14 (576 visual tokens), 32-layer Llama, hidden 64"


def prompt_inputs(loaded, image, prompt: str) -> dict:
    """The model's inputs for one image and a question: the processor's chat template for a
    checkpoint, token ids by hand for the embedded model."""
    model = loaded.model
    if loaded.processor is None:
        return {
            "input_ids": torch.tensor([llava_prompt(model, [1, 11, 12, 13], [14, 15, 16, 17, 18, 19, 20])]),
            "pixel_values": clip_pixel_values(image, 336)[None],
        }
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    processor = loaded.processor
    if getattr(processor, "chat_template", None):
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
    else:
        token = getattr(processor, "image_token", "<image>")
        text = f"{token}\n{prompt}"
    return dict(processor(text=[text], images=[image], return_tensors="pt"))


def run(args) -> dict:
    """Load (or build) the model, generate with and without ATP, return the measurements."""
    from atp.cli.loading import DTYPES, attach_from_args, load_from_args

    started = time.perf_counter()
    if args.image is None:
        image = synthetic_image()
    else:
        from PIL import Image

        image = Image.open(args.image)
    policy = args.policy or ("atp" if args.atp_checkpoint is None else None)
    initial = {"init_theta_r": args.theta_r, "init_theta_s": args.theta_s} if policy == "atp" else {}
    loaded = load_from_args(args, lambda: embedded(args.seed))
    model = loaded.model
    handle = attach_from_args(model, args, **initial)  # first, so that bad options fail before anything runs
    device = next(model.parameters()).device
    inputs = {
        name: value.to(
            device=device, dtype=DTYPES[args.dtype or "float32"] if value.is_floating_point() else value.dtype
        )
        for name, value in prompt_inputs(loaded, image, args.prompt).items()
        if isinstance(value, torch.Tensor)
    }

    def generate():
        with torch.no_grad():
            return model.generate(
                **inputs, max_new_tokens=args.max_new_tokens, do_sample=False, return_dict_in_generate=True
            )

    pruned = generate()
    stats = handle.stats
    options = handle.config()["options"]
    handle.remove()
    full = generate()
    prompt_length = inputs["input_ids"].shape[1]
    record = {
        "model": loaded.name,
        "policy": handle.config()["policy"],
        "options": options,
        "layers": list(stats.layers),
        "num_layers": stats.num_layers,
        "visual_tokens": int(stats.num_visual[0]),
        "kept": stats.kept[0].tolist(),
        "avg_tokens": stats.avg_tokens,
        "kv_cache_bytes": compat.kv_cache_bytes(compat.output_cache(pruned)),
        "kv_cache_bytes_full": compat.kv_cache_bytes(compat.output_cache(full)),
        "generated": pruned.sequences[0, prompt_length:].tolist(),
        "generated_full": full.sequences[0, prompt_length:].tolist(),
        "seconds": round(time.perf_counter() - started, 2),
    }
    if loaded.processor is not None:
        decode = loaded.processor.batch_decode
        record["text"] = decode(pruned.sequences[:, prompt_length:], skip_special_tokens=True)[0]
        record["text_full"] = decode(full.sequences[:, prompt_length:], skip_special_tokens=True)[0]
    return record


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
        f"generated token ids: {result['generated']}"
        + (f" ({result['text']!r})" if "text" in result else " (random weights, meaningless)"),
        f"finished in {result['seconds']} s",
    ]
    return "\n".join(lines)


def main(args) -> int:
    result = run(args)
    print(json.dumps(result) if args.json else format_report(result))
    return 0
