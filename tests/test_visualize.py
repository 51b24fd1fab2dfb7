"""``atp visualize``: the pictures are valid PNGs of the stated size and panel count, and their
white patches are exactly the pruned tokens (the pixels are read back from the file)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import atp
from atp.cli import main
from atp.cli.visualize import KEPT_CAP, SPATIAL, Picture, draw, render
from atp.tiny import write_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("offline")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("visualize")
    return {f: write_tiny_checkpoint(root / f, f, num_layers=4) for f in ("llava", "llava_next", "qwen2_vl")}


def noise(seed: int, size=(96, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def cells(png, picture: dict):
    """Per token of one drawn grid: its cell's pixels (cell, cell, 3)."""
    left, top, _, _ = picture["box"]
    cell, (rows, cols) = picture["cell"], picture["grid"]
    for r in range(rows):
        for c in range(cols):
            x, y = left + c * cell, top + r * cell
            yield picture["offset"] + r * cols + c, png[y : y + cell, x : x + cell]


def check_pixels(path, layout: dict, stats) -> None:
    """White cell <=> pruned token, in every panel; the input panel has no white cell; an orange
    frame exactly on the tokens kept only by the spatial grid."""
    png = np.asarray(Image.open(path).convert("RGB"))
    assert list(Image.open(path).size) == layout["size"]
    assert Image.open(path).format == "PNG"
    assert len(layout["panels"]) == len(stats.layers) + 1
    masks = [torch.ones_like(stats.masks[0][0])] + [m[0] for m in stats.masks]
    reasons = [{}] + [{n: r[0] for n, r in rs.items()} for rs in stats.reasons]
    checked = 0
    for panel, mask, why in zip(layout["panels"], masks, reasons):
        for picture in panel["pictures"]:
            for token, pixels in cells(png, picture):
                white = bool((pixels == 255).all())
                assert white == (not bool(mask[token])), (panel["title"], token)
                if white:
                    continue
                assert (pixels <= KEPT_CAP).all() or (pixels == SPATIAL).all(-1).any()
                others = [r[token] for n, r in why.items() if n != "spatial"]
                spatial_only = "spatial" in why and bool(why["spatial"][token]) and not any(map(bool, others))
                framed = bool((pixels[0] == SPATIAL).all(-1).all())  # the top row is the frame
                assert framed == spatial_only, (panel["title"], token)
                checked += 1
    assert checked > 0


def attached(loaded, **options):
    """The atp policy with untrained binned heads (any number of images), at thresholds that prune."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # untrained heads
        return atp.attach(loaded.model, layers=[1, 2], threshold_head="binned", **options)


def test_the_embedded_model_with_the_synthetic_picture(tmp_path, capsys):
    output = tmp_path / "out.png"
    assert main(["visualize", "--output", str(output), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["visual_tokens"] == 576 and len(record["kept"]) == 3 and record["exact"]
    assert [p["title"].split(":")[0] for p in record["layout"]["panels"]] == [
        "input",
        "layer 4",
        "layer 14",
        "layer 24",
    ]
    for panel, kept in zip(record["layout"]["panels"][1:], record["kept"]):
        assert f"{kept} of 576 kept" in panel["title"]
    image = Image.open(output)
    assert image.format == "PNG" and list(image.size) == record["layout"]["size"]
    # every panel's whitened patches are the pruned ones: count them
    png = np.asarray(image.convert("RGB"))
    for panel, kept in zip(record["layout"]["panels"], [576, *record["kept"]]):
        (picture,) = panel["pictures"]
        white = sum(bool((pixels == 255).all()) for _, pixels in cells(png, picture))
        assert white == 576 - kept


@pytest.mark.parametrize("family,images", [("llava", 2), ("llava_next", 1), ("qwen2_vl", 2)])
def test_every_family_grid_is_drawn_where_its_tokens_are(folders, tmp_path, family, images):
    """Pixels read back against the masks: LLaVA's images, LLaVA-NeXT's base and tile canvas,
    Qwen2-VL's dynamic resolution, several images."""
    from atp.cli.loading import load

    loaded = load(str(folders[family]))
    with attached(loaded, init_theta_r=0.5, init_theta_s=0.9) as handle:
        picture, record = draw(loaded, handle, [noise(i) for i in range(images)], "what is it ?")
        stats = handle.stats
    assert record["exact"], record
    grids = stats.grids[0]
    assert len(grids) == (2 * images if family == "llava_next" else images)
    path = tmp_path / f"{family}.png"
    picture.save(path)
    check_pixels(path, record["layout"], stats)


def test_qwen_pictures_are_the_images_the_model_saw(folders):
    """The patches put back in place give the image back, pixel for pixel (Qwen2-VL; an image the
    processor does not resize)."""
    from atp.cli.loading import load
    from atp.cli.visualize import pictures
    from atp.host.attach import resolve_adapter

    loaded = load(str(folders["qwen2_vl"]))
    vision = loaded.model.config.vision_config
    unit = vision.patch_size * vision.spatial_merge_size
    image = noise(3, (12 * unit, 8 * unit))
    inputs = dict(loaded.processor.image_processor(images=[image], do_resize=False, return_tensors="pt"))
    (_, h, w) = inputs["image_grid_thw"][0].tolist()
    assert (h * vision.patch_size, w * vision.patch_size) == (8 * unit, 12 * unit)
    grids = [[(h // vision.spatial_merge_size, w // vision.spatial_merge_size)]]
    (found,) = pictures(resolve_adapter(loaded.model), inputs, grids, 0, loaded.processor)
    assert found.exact
    assert np.abs(found.pixels.astype(int) - np.asarray(image).astype(int)).max() <= 1


def test_a_family_without_pixels_is_drawn_as_a_grey_token_map():
    from types import SimpleNamespace

    stats = SimpleNamespace(
        num_visual=torch.tensor([4]),
        masks=[torch.tensor([[True, False, True, False]])],
        reasons=[{}],
        kept=torch.tensor([[2]]),
        layers=(1,),
    )
    image, layout = render([Picture(None, (2, 2), 0, False)], stats, 0, 64)
    png = np.asarray(image)
    panel = layout["panels"][1]
    assert "(approximate)" not in panel["title"]  # the title is the count; the note is drawn beside it
    whites = [bool((pixels == 255).all()) for _, pixels in cells(png, panel["pictures"][0])]
    assert whites == [False, True, False, True]
    greys = [pixels for _, pixels in cells(png, panel["pictures"][0])]
    assert (greys[0] == 128).all()


def test_several_images_give_the_distribution_of_kept_tokens(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        noise(i, (336, 336)).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    output = tmp_path / "kept.png"
    argv = [
        "visualize",
        "--images",
        str(folder),
        "--output",
        str(output),
        "--panels",
        str(tmp_path / "panels"),
    ]
    assert main([*argv, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert [r["image"].rsplit("/", 1)[-1] for r in record["images"]] == ["0.png", "1.png", "2.png"]
    assert json.loads(output.with_suffix(".json").read_text()) == record
    assert Image.open(output).format == "PNG"
    assert sorted(p.name for p in (tmp_path / "panels").iterdir()) == ["0.png", "1.png", "2.png"]
    # each image's counts are those of visualizing it alone
    assert (
        main(["visualize", "--image", str(folder / "1.png"), "--output", str(tmp_path / "one.png"), "--json"])
        == 0
    )
    alone = json.loads(capsys.readouterr().out)
    assert record["images"][1]["kept"] == alone["kept"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--image", "missing.png"], "is not an image file"),
        (["--images", "missing"], "neither an image file nor a folder"),
        (["--image", "a.png", "--images", "b"], "not both"),
        (["--panels", "p"], "--panels DIR goes with --images"),
        (["--size", "4"], "argument --size: must be an int >= 16, got 4"),
        (["--layers", "40"], "layers"),
    ],
)
def test_bad_input_is_refused_with_what_to_do(tmp_path, capsys, argv, message):
    try:
        status = main(["visualize", "--output", str(tmp_path / "x.png"), *argv])
    except SystemExit as exit:  # argparse refuses a flag's value before the command runs
        status = exit.code
    assert status == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_without_matplotlib_the_distribution_names_the_extra(tmp_path, capsys, monkeypatch):
    import atp.cli.plotting

    def missing(option="--plot"):
        raise ValueError(f'{option} needs matplotlib: pip install "atp[viz]" (or pip install matplotlib)')

    monkeypatch.setattr(atp.cli.plotting, "require", missing)
    noise(0).save(tmp_path / "a.png")
    assert main(["visualize", "--images", str(tmp_path / "a.png"), "--output", str(tmp_path / "k.png")]) == 2
    assert 'pip install "atp[viz]"' in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["drop", "mask"])
def test_reasons_explain_every_kept_token(folders, mode):
    """The atp policy's reasons: the union of its branches (and read tokens) is the layer's mask."""
    from atp.cli.loading import load

    loaded = load(str(folders["llava"]))
    with attached(loaded, init_theta_r=0.5, init_theta_s=0.9, prune_mode=mode) as handle:
        draw(loaded, handle, [noise(0)], "q")
        stats = handle.stats
    for mask, reasons in zip(stats.masks, stats.reasons):
        assert {"redundancy", "spatial"} <= set(reasons)
        union = torch.zeros_like(mask)
        for flags in reasons.values():
            assert not bool((flags & ~mask).any())  # a reason only for kept tokens
            union |= flags
        assert torch.equal(union, mask)


def test_plots_share_one_style(tmp_path):
    from atp.cli.plotting import bench_plot, eval_plot

    record = {
        "pretrained": "x",
        "rows": [
            {"method": "unpruned", "model_args": "", "tokens": 16.0, "gqa exact_match": 0.5},
            {"method": "fastv", "model_args": "policy=fastv", "tokens": 8.0, "gqa exact_match": 0.4},
        ],
    }
    eval_plot(record, tmp_path / "eval.png")
    methods = {
        "unpruned": {"prefill_ms": 2.0, "decode_tokens_per_s": 5.0},
        "atp": {"prefill_ms": 1.0, "decode_tokens_per_s": 6.0},
    }
    bench_plot({"device": "cpu", "methods": methods}, tmp_path / "bench.png")
    for name in ("eval.png", "bench.png"):
        assert Image.open(tmp_path / name).format == "PNG"
    with pytest.raises(ValueError, match="no scores"):
        eval_plot({"rows": [{"method": "unpruned", "model_args": "", "tokens": 1.0}]}, tmp_path / "x.png")
