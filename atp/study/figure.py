"""The paper's Fig. 4 for the study: one test image, a coarse and a fine question side by side,
each drawn by ``atp visualize`` from the study's trained model.

``python -m atp.study.figure --study runs/study --seed 0 --stage atp_frozen --output fig.png``
writes the image to ``fig.png``'s folder, runs ``atp visualize`` once per question (the base
model and its processor from ``seedN/base/model``, the trained modules from
``seedN/STAGE/atp``), and puts the two pictures side by side, each under its question and the
tokens kept after each ATP layer. The commands it ran are printed, so each half can be redrawn
with the library's command alone.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from atp.study.shapes import COARSE, FINE, example

COARSE_KIND = "background"
FINE_KIND = "colour"


def pick(seed: int, size: int, layout: str, index: int = 0):
    """A test example of the fine kind (a canvas with several shapes, one of them small) and the
    coarse question about the same canvas."""
    fine = example(seed, "test", index, size, FINE_KIND, layout)
    coarse = example(seed, "test", 0, size, COARSE_KIND, layout)
    return fine, " ".join(coarse.question)


def visualize(
    model: Path, checkpoint: Path, image: Path, prompt: str, output: Path
) -> tuple[list[str], dict]:
    """``atp visualize`` for one question: (the command's words, its JSON record)."""
    import contextlib
    import io

    from atp.cli.app import main as cli

    words = ["visualize", "--model", str(model), "--atp-checkpoint", str(checkpoint)]
    words += ["--image", str(image), "--prompt", prompt, "--output", str(output), "--json"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli(words)
    if code != 0:
        raise RuntimeError(f"atp {shlex.join(words)} failed with exit code {code}")
    return ["atp", *words], json.loads(printed.getvalue().strip().splitlines()[-1])


def side_by_side(panels: list[tuple[Path, str]], output: Path) -> None:
    """Pictures with a caption under each, in one row."""
    from PIL import Image, ImageDraw

    from atp.cli.visualize import _font

    images = [Image.open(path).convert("RGB") for path, _ in panels]
    caption = 44
    width = sum(i.width for i in images) + 10 * (len(images) - 1)
    height = max(i.height for i in images) + caption
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for image, (_, text) in zip(images, panels):
        canvas.paste(image, (x, 0))
        draw.multiline_text((x + 6, image.height + 4), text, fill="black", font=_font())
        x += image.width + 10
    canvas.save(output, format="PNG")


def main(argv: list[str] | None = None) -> int:
    from PIL import Image

    parser = argparse.ArgumentParser(prog="python -m atp.study.figure", description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default="runs/study", help="the study's output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--stage",
        default="atp_frozen",
        help="a learned stage with an atp/ checkpoint and the base LM (atp_frozen, control; atp_full fine-tuned an LM it did not save)",
    )
    parser.add_argument("--index", type=int, default=0, help="which test example of the fine kind")
    parser.add_argument("--output", default="study-fig4.png")
    args = parser.parse_args(argv)
    folder = Path(args.study) / f"seed{args.seed}"
    record = json.loads((Path(args.study) / "study.json").read_text())
    config = record["config"]
    fine, coarse_prompt = pick(
        args.seed, config["image_size"], config.get("layout", "image_first"), args.index
    )
    output = Path(args.output)
    image = output.with_name(output.stem + "-image.png")
    Image.fromarray(fine.image).save(image)
    panels = []
    for kind, prompt in ((COARSE_KIND, coarse_prompt), (FINE_KIND, " ".join(fine.question))):
        half = output.with_name(f"{output.stem}-{kind}.png")
        words, found = visualize(folder / "base" / "model", folder / args.stage / "atp", image, prompt, half)
        print(shlex.join(words))
        group = "coarse" if kind in COARSE else "fine" if kind in FINE else kind
        kept = " / ".join(str(int(k)) for k in found["kept"])
        panels.append((half, f"{group}: {prompt}\nkept after layers {found['layers']}: {kept}"))
    side_by_side(panels, output)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
