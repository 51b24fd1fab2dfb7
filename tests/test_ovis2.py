"""Ovis2's layout: the visual indicator tokens are structural, every crop is one square grid of the
size the vision tower gives, and a prompt the processor did not build is refused. (The family suite
covers the rest.)"""

from __future__ import annotations

import pytest
import torch

import atp
from atp.host.attach import resolve_adapter
from atp.tiny.models import OVIS_IDS, ovis2_batch, tiny_ovis2

pytestmark = pytest.mark.filterwarnings("ignore:atp.attach")


def test_indicators_are_structural_and_each_crop_is_a_grid():
    model = tiny_ovis2()
    batch = ovis2_batch([[[1, 5], ("image", 2, 3), [6], ("image", 1, 1), [7]]])
    layout = resolve_adapter(model).visual_layout(batch["input_ids"], batch, {})
    indicators = torch.isin(batch["input_ids"], torch.tensor([OVIS_IDS[k] for k in OVIS_IDS if k != "image"]))
    assert torch.equal(layout.structural, indicators)
    # start, grid, end per image; 2 x 3 tiles: a column marker between the 3 of a row, a row marker between rows
    assert int(indicators.sum()) == 3 + 2 * 2 + 1 + 3
    assert torch.equal(layout.visual, batch["input_ids"] == OVIS_IDS["image"])
    assert layout.grids == [[(4, 4)] * 8]  # the global image and 6 tiles, then the second image


def test_the_grid_side_is_what_the_vision_tower_gives():
    model = tiny_ovis2(image_size=24)  # 12 patches a side, merged 2 x 2
    assert resolve_adapter(model).grid_side() == 6
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=torch.randn(1, 3, 24, 24))
    assert features.pooler_output.shape[1] == 6 * 6


def test_patches_that_do_not_divide_by_the_stride_are_refused():
    model = tiny_ovis2(image_size=18)  # 9 patches a side, stride 2
    with pytest.raises(ValueError, match="9 patches per side do not divide by its hidden_stride=2"):
        atp.attach(model, layers=[1])
    assert "atp" not in dict(model.named_children())


def test_a_run_that_is_not_whole_crops_is_refused():
    model = tiny_ovis2()
    batch = ovis2_batch([[[1, 5], ("image", 1, 1), [7]]])
    ids = batch["input_ids"]  # 1, 5, <IMG_START>, 16 image tokens, ...: drop the first image token
    ids = torch.cat([ids[:, :3], ids[:, 4:]], dim=1)
    with pytest.raises(ValueError, match="run of 15 image tokens, not a multiple of the 16 tokens of a tile"):
        resolve_adapter(model).visual_layout(ids, {}, {})


def test_each_grid_is_drawn_on_its_own_crop():
    """``atp visualize`` draws a grid on the crop its tokens came from: the global image, then the
    tiles, in ``pixel_values`` order (as Ovis2's image processor stacks them)."""
    model = tiny_ovis2()
    batch = ovis2_batch([[[1], ("image", 1, 2), [6]], [[1], ("image", 1, 1), [6]]])
    adapter = resolve_adapter(model)
    grids = adapter.visual_layout(batch["input_ids"], batch, {}).grids
    drawn = adapter.grid_pixels(batch, grids)
    crops = iter(batch["pixel_values"])
    assert [len(sample) for sample in drawn] == [3, 1]
    assert all(torch.equal(pixels, next(crops)) for sample in drawn for pixels in sample)
