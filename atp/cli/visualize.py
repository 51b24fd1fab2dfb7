"""``atp visualize``: pictures of what was pruned (the paper's Fig. 4).

One panel for the input and one per ATP layer: the picture the model saw, each visual token's
patch whitened once the token is pruned, the kept count in the panel's title. Tokens kept at a
layer only by the spatial grid (the atp policy's spatial branch, or the spatial policy) have an
orange frame; tokens kept by the redundancy score are drawn as they are. To keep white meaning
"pruned", kept patches are drawn with their pixels capped at 247.

Each image grid is drawn on the pixels its tokens cover, as the model's adapter reports them
(``BackboneAdapter.grid_pixels``: LLaVA-1.5's image, LLaVA-NeXT's base image and unpadded tile
canvas, Qwen2-VL's dynamic-resolution image put back from its patches). A family that cannot say
gets the image resized to the grid, titled "approximate", or a grey token map when even the
image is unknown.

Over several images (``--images``) it writes the distribution of kept tokens per ATP layer, the
paper's instance-wise adaptivity, as a plot and a JSON record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

WHITE = 255
KEPT_CAP = 247  # kept pixels never reach pure white
SPATIAL = (255, 140, 0)
READ = (200, 0, 200)
TITLE = 24
GAP = 8
LEGEND = 22
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Picture:
    """One image grid: its pixels (H, W, 3) uint8, its token grid and where its tokens start
    among the sample's visual tokens; ``exact`` False when the pixels are an approximation."""

    pixels: np.ndarray | None
    grid: tuple[int, int]
    offset: int
    exact: bool


def pictures(
    adapter,
    inputs: dict,
    grids: list[list[tuple[int, int]]],
    sample: int = 0,
    processor=None,
    images: list | None = None,
) -> list[Picture]:
    """The pictures of sample ``sample``'s grids (``grids``: every sample's, ``handle.stats.grids``);
    ``images`` (that sample's PIL images) stand in, resized, where the adapter knows no pixels."""
    found = adapter.grid_pixels(inputs, grids)[sample]
    grids = grids[sample]
    mean, std = _normalisation(processor)
    out, offset = [], 0
    for index, grid in enumerate(grids):
        pixels, exact = found[index], True
        if pixels is not None:
            array = _denormalise(pixels, mean, std)
        elif images is not None and len(images) == len(grids):
            array = np.asarray(images[index].convert("RGB").resize((grid[1] * 16, grid[0] * 16)))
            exact = False
        else:
            array, exact = None, False
        out.append(Picture(array, tuple(grid), offset, exact))
        offset += grid[0] * grid[1]
    return out


def _normalisation(processor) -> tuple[np.ndarray, np.ndarray]:
    source = getattr(processor, "image_processor", processor)
    mean = getattr(source, "image_mean", None) or CLIP_MEAN
    std = getattr(source, "image_std", None) or CLIP_STD
    return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def _denormalise(pixels: torch.Tensor, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    array = pixels.detach().float().cpu().permute(1, 2, 0).numpy()
    return (np.clip(array * std + mean, 0.0, 1.0) * 255).round().astype(np.uint8)


def render(pictures: list[Picture], stats, sample: int = 0, size: int = 320):
    """``(image, layout)``: the panels as a PIL image, and where each picture and cell is (for
    reading the pixels back: ``layout["panels"][p]["pictures"][i]`` has ``box`` and ``cell``)."""
    from PIL import Image, ImageDraw

    font = _font()
    num_visual = int(stats.num_visual[sample])
    masks = [torch.ones(num_visual, dtype=torch.bool)] + [m[sample, :num_visual].cpu() for m in stats.masks]
    reasons = [{}] + [{n: r[sample, :num_visual].cpu() for n, r in rs.items()} for rs in stats.reasons]
    titles = [f"input: {num_visual} visual tokens"] + [
        f"layer {layer}: {int(stats.kept[sample, k])} of {num_visual} kept"
        for k, layer in enumerate(stats.layers)
    ]
    cells = [max(2, size // max(p.grid)) for p in pictures]
    panel_width = max(p.grid[1] * c for p, c in zip(pictures, cells))
    heights = [p.grid[0] * c for p, c in zip(pictures, cells)]
    panel_height = TITLE + sum(heights) + GAP * (len(pictures) - 1)
    width = len(masks) * panel_width + GAP * (len(masks) + 1)
    canvas = Image.new("RGB", (width, panel_height + 2 * GAP + LEGEND), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    layout = {"size": list(canvas.size), "panels": []}
    for k, (mask, why, title) in enumerate(zip(masks, reasons, titles)):
        left = GAP + k * (panel_width + GAP)
        draw.text((left, GAP), title + _approximate(pictures), fill=(0, 0, 0), font=font)
        top, placed = GAP + TITLE, []
        for picture, cell, height in zip(pictures, cells, heights):
            rows, cols = picture.grid
            tile = _draw_picture(picture, cell, mask, why)
            canvas.paste(tile, (left, top))
            placed.append(
                {
                    "box": [left, top, left + cols * cell, top + height],
                    "cell": cell,
                    "grid": [rows, cols],
                    "offset": picture.offset,
                    "exact": picture.exact,
                }
            )
            top += height + GAP
        layout["panels"].append({"title": title, "pictures": placed})
    draw.text((GAP, panel_height + GAP + 4), _legend(stats), fill=(60, 60, 60), font=font)
    return canvas, layout


def _draw_picture(picture: Picture, cell: int, mask: torch.Tensor, why: dict):
    from PIL import Image, ImageDraw

    rows, cols = picture.grid
    if picture.pixels is None:
        base = Image.new("RGB", (cols * cell, rows * cell), (128, 128, 128))
    else:
        base = Image.fromarray(picture.pixels).resize((cols * cell, rows * cell), Image.Resampling.BICUBIC)
    array = np.minimum(np.asarray(base), KEPT_CAP).astype(np.uint8)
    keep = mask[picture.offset : picture.offset + rows * cols].view(rows, cols).numpy()
    pruned = np.repeat(np.repeat(~keep, cell, axis=0), cell, axis=1)
    array = array.copy()
    array[pruned] = WHITE
    tile = Image.fromarray(array)
    draw = ImageDraw.Draw(tile)
    line = max(1, cell // 8)
    spatial_only = _only(why, "spatial", picture, rows, cols)
    read_only = _only(why, "read", picture, rows, cols)
    for colour, flags in ((SPATIAL, spatial_only), (READ, read_only)):
        if flags is None:
            continue
        for r, c in zip(*np.nonzero(flags & keep)):
            x, y = int(c) * cell, int(r) * cell
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), outline=colour, width=line)
    return tile


def _only(why: dict, name: str, picture: Picture, rows: int, cols: int) -> np.ndarray | None:
    """Tokens kept for ``name`` and for no other reason, as a (rows, cols) grid."""
    if name not in why:
        return None
    span = slice(picture.offset, picture.offset + rows * cols)
    others = [r[span] for n, r in why.items() if n != name]
    alone = why[name][span].clone()
    for other in others:
        alone &= ~other
    return alone.view(rows, cols).numpy()


def _approximate(pictures: list[Picture]) -> str:
    return "" if all(p.exact for p in pictures) else " (approximate)"


def _legend(stats) -> str:
    names = {name for reasons in stats.reasons for name, flags in reasons.items() if bool(flags.any())}
    parts = ["white: pruned"]
    if "spatial" in names and len(names - {"read"}) > 1:
        parts.append("orange frame: kept only by the spatial grid")
        parts.append("plain: kept by the redundancy score")
    elif "spatial" in names:
        parts.append("orange frame: kept by the spatial grid")
    if "read" in names:
        parts.append("purple frame: kept because its output is read")
    return " | ".join(parts)


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: the bitmap font
        return ImageFont.load_default()


# the command -----------------------------------------------------------------------------
def add_parser(sub) -> None:
    from atp.arguments import OPEN_FRACTION, SEED, at_least
    from atp.cli.loading import add_atp_arguments, add_model_arguments

    parser = sub.add_parser(
        "visualize",
        help="draw what was pruned: the image with pruned patches whitened, one panel per ATP layer",
        description=__doc__.split("\n\n")[0],
    )
    add_model_arguments(parser, "the demo's tiny random LLaVA-1.5-shaped model, offline")
    add_atp_arguments(parser)
    parser.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help="an image of the prompt (repeat for several images in one prompt; default: a synthetic picture)",
    )
    parser.add_argument(
        "--images",
        nargs="+",
        default=None,
        metavar="PATH",
        help="folders or files: one prompt per image, and the distribution of kept tokens per layer",
    )
    parser.add_argument("--prompt", default="Describe the image.", help="the question (with --model)")
    parser.add_argument(
        "--output",
        default=None,
        help="the PNG to write (default atp-visualize.png; with --images atp-kept.png, and a .json beside it)",
    )
    parser.add_argument(
        "--panels", default=None, metavar="DIR", help="with --images: also each image's panels here"
    )
    parser.add_argument(
        "--size", type=at_least(16), default=320, help="pixels of a grid's longer side (default 320)"
    )
    parser.add_argument(
        "--theta-r", type=OPEN_FRACTION, default=0.5, help="initial redundancy threshold (atp policy)"
    )
    parser.add_argument(
        "--theta-s", type=OPEN_FRACTION, default=0.9, help="initial spatial threshold (atp policy)"
    )
    parser.add_argument("--seed", type=SEED, default=0, help="the embedded model's weights")
    parser.add_argument("--json", action="store_true", help="print the JSON record")


def image_files(paths: list[str]) -> list[Path]:
    """Files, and the images in folders (sorted), checked to exist."""
    found = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise ValueError(f"{path} is neither an image file nor a folder")
    if not found:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {', '.join(paths)}")
    return found


def prompt_inputs(loaded, images: list, prompt: str) -> dict:
    """The model's inputs for ``images`` and a question (the demo's, for several images)."""
    from atp.tiny.models import clip_pixel_values, llava_prompt

    model = loaded.model
    if loaded.processor is None:
        size = model.config.vision_config.image_size
        ids = llava_prompt(model, [1, 11, 12, 13], [14, 15, 16, 17, 18, 19, 20], images=len(images))
        return {
            "input_ids": torch.tensor([ids]),
            "pixel_values": torch.stack([clip_pixel_values(i, size) for i in images]),
        }
    processor = loaded.processor
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    if getattr(processor, "chat_template", None):
        text = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )
    else:
        text = "".join(f"{getattr(processor, 'image_token', '<image>')}\n" for _ in images) + prompt
    return dict(processor(text=[text], images=images, return_tensors="pt"))


def _inputs_on(model, inputs: dict, dtype) -> dict:
    device = next(model.parameters()).device
    return {
        name: value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
        for name, value in inputs.items()
        if isinstance(value, torch.Tensor)
    }


def draw(loaded, handle, images: list, prompt: str, size: int = 320):
    """One prefill with ``images``; ``(picture, record)``."""
    from atp.host.attach import resolve_adapter

    model = loaded.model
    dtype = next(model.parameters()).dtype
    inputs = _inputs_on(model, prompt_inputs(loaded, images, prompt), dtype)
    with torch.no_grad():
        model(**inputs)
    stats = handle.stats
    if int(stats.num_visual[0]) == 0:
        raise ValueError(
            "the prompt has no visual tokens to draw; pass an image the model's processor accepts"
        )
    found = pictures(resolve_adapter(model), inputs, stats.grids, 0, loaded.processor, images)
    picture, layout = render(found, stats, 0, size)
    record = {
        "layers": list(stats.layers),
        "visual_tokens": int(stats.num_visual[0]),
        "kept": stats.kept[0].tolist(),
        "avg_tokens": float(stats.tokens_per_sample[0]),
        "grids": [list(g) for g in stats.grids[0]],
        "exact": all(p.exact for p in found),
        "layout": layout,
    }
    return picture, record


def main(args) -> int:
    from PIL import Image

    from atp.cli.demo import embedded, synthetic_image
    from atp.cli.loading import attach_from_args, load_from_args

    if args.size < 16:
        raise ValueError(f"--size must be at least 16 pixels, got {args.size}")
    if args.images and args.image:
        raise ValueError(
            "give --image (several images in one prompt) or --images (one prompt per image), not both"
        )
    if args.panels and not args.images:
        raise ValueError("--panels DIR goes with --images")
    files = image_files(args.images) if args.images else [Path(p) for p in args.image]
    for path in files:
        if not path.is_file():
            raise ValueError(f"{path} is not an image file")
    if args.images:
        from atp.cli.plotting import require

        require("--images")  # the distribution plot, before any model is loaded
    loaded = load_from_args(args, lambda: embedded(args.seed))
    policy = args.policy or ("atp" if args.atp_checkpoint is None else None)
    initial = {"init_theta_r": args.theta_r, "init_theta_s": args.theta_s} if policy == "atp" else {}
    handle = attach_from_args(loaded.model, args, **initial)
    try:
        if not args.images:
            images = [Image.open(path).convert("RGB") for path in files] or [synthetic_image()]
            picture, record = draw(loaded, handle, images, args.prompt, args.size)
            output = Path(args.output or "atp-visualize.png")
            picture.save(output, format="PNG")
            record = {
                "model": loaded.name,
                "policy": handle.config()["policy"],
                "output": str(output),
                **record,
            }
            print(json.dumps(record) if args.json else _summary(record))
            return 0
        return _distribution(loaded, handle, files, args)
    finally:
        handle.remove()


def _distribution(loaded, handle, files: list[Path], args) -> int:
    from PIL import Image

    from atp.cli.plotting import kept_distribution_plot

    rows = []
    for path in files:
        picture, record = draw(loaded, handle, [Image.open(path).convert("RGB")], args.prompt, args.size)
        if args.panels:
            Path(args.panels).mkdir(parents=True, exist_ok=True)
            picture.save(Path(args.panels) / f"{path.stem}.png", format="PNG")
        rows.append(
            {
                "image": str(path),
                "visual_tokens": record["visual_tokens"],
                "kept": record["kept"],
                "avg_tokens": record["avg_tokens"],
            }
        )
    output = Path(args.output or "atp-kept.png")
    layers = list(handle.layers)
    kept_distribution_plot(layers, [r["kept"] for r in rows], [r["visual_tokens"] for r in rows], output)
    record = {
        "model": loaded.name,
        "policy": handle.config()["policy"],
        "layers": layers,
        "images": rows,
        "output": str(output),
    }
    output.with_suffix(".json").write_text(json.dumps(record, indent=2))
    if args.json:
        print(json.dumps(record))
    else:
        for k, layer in enumerate(layers):
            counts = [r["kept"][k] for r in rows]
            print(
                f"layer {layer}: kept {min(counts)}-{max(counts)} (mean {sum(counts) / len(counts):.1f}) over {len(rows)} images"
            )
        print(f"wrote {output} and {output.with_suffix('.json')}")
    return 0


def _summary(record: dict) -> str:
    kept = ", ".join(f"layer {layer}: {count}" for layer, count in zip(record["layers"], record["kept"]))
    note = "" if record["exact"] else " (approximate placement: this family's pixels are not known to atp)"
    return f"{record['visual_tokens']} visual tokens; kept {kept}; wrote {record['output']}{note}"
