"""LFM2-VL's own paths: crop grids from ``spatial_shapes`` (also in ``generate``, which encodes the
images before the prefill), the ATP layers its convolution layers allow, and the caches after
pruning. (The family suite covers the rest, drop == mask through the convolution layers included.)"""

from __future__ import annotations

import pytest
import torch

import atp
from atp.host.attach import resolve_adapter
from atp.tiny.models import lfm2_vl_batch, tiny_lfm2_vl
from tests.numerics import greedy_steps

pytestmark = pytest.mark.filterwarnings("ignore:atp.attach")

SAMPLES = [[[1, 5], ("image", 12, 8), [7, 8, 9]], [[1], ("image", 8, 12, 1, 2), [4, 5, 6, 7]]]
GRIDS = [[(6, 4)], [(4, 4), (4, 4), (4, 6)]]  # (h / 2, w / 2) per crop: the tiles, then the thumbnail


def test_grids_are_the_crops_shapes_in_a_forward_and_in_generate():
    model = tiny_lfm2_vl()
    batch = lfm2_vl_batch(SAMPLES)
    assert resolve_adapter(model).visual_layout(batch["input_ids"], batch, {}).grids == GRIDS
    with atp.attach(model, layers=[1, 3], policy="fixed", keep=[8, 4]) as handle:
        with torch.no_grad():
            model(**batch)
        assert handle.stats.grids == GRIDS
        greedy_steps(model, batch, 2)  # generate hands the language model no spatial_shapes
        assert handle.stats.grids == GRIDS and handle.stats.kept.tolist() == [[8, 4], [8, 4]]


def test_image_tokens_without_crop_shapes_are_refused():
    model = tiny_lfm2_vl()
    batch = lfm2_vl_batch(SAMPLES)
    with pytest.raises(ValueError, match="atp needs spatial_shapes"):
        resolve_adapter(model).visual_layout(batch["input_ids"], {}, {})
    with pytest.raises(ValueError, match="spatial_shapes does not match its image tokens"):
        resolve_adapter(model).visual_layout(
            batch["input_ids"], {"spatial_shapes": torch.tensor([[8, 8]] * 4)}, {}
        )


def test_atp_layers_the_convolution_layers_do_not_allow_are_refused_with_the_layers_that_work():
    model = tiny_lfm2_vl(6, layer_types=("conv", "full_attention", "conv", "full_attention", "conv", "conv"))
    with pytest.raises(
        ValueError, match=r"ATP layer\(s\) \[1\] come at or before layer 1, the first attention"
    ):
        atp.attach(model, layers=[1, 4], policy="fixed", keep=[8, 4])
    with pytest.raises(ValueError, match=r"ATP layer\(s\) \[3\] follow a lfm2_vl layer without attention"):
        atp.attach(model, layers=[2, 3], policy="fixed", keep=[8, 4])
    assert "atp" not in dict(model.named_children())
    with atp.attach(model, layers=[2, 4], policy="fixed", keep=[8, 4]) as handle:  # after attention layers
        with torch.no_grad():
            model(**lfm2_vl_batch(SAMPLES))
        assert handle.stats.kept.tolist() == [[8, 4], [8, 4]]
    with atp.attach(model) as handle:  # the paper's [1, 3, 4] for 6 layers, each moved to a layer that works
        assert handle.layers == (2, 4)


def test_attention_caches_shrink_by_the_pruned_tokens():
    """Layers 0-2 and 5 attend (F, F, F, C, C, F): their caches hold every token before the first ATP
    layer, then the kept ones (the longest pruned row, padding included, sets the width); the
    convolution layers 3-4 hold a fixed-size state instead (the suite checks their numbers)."""
    model = tiny_lfm2_vl()
    batch = lfm2_vl_batch(SAMPLES)
    with atp.attach(model, layers=[1, 3], policy="fixed", keep=[8, 4]), torch.no_grad():
        out = model(**batch, use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    length = batch["input_ids"].shape[1]
    pruned = [min(v - kept for v in (24, 48)) for kept in (8, 4)]  # 6 x 4; two 4 x 4 tiles and 4 x 6
    keys = [cache.layers[i].keys.shape[2] for i in (0, 1, 2, 5)]
    assert keys == [length, length - pruned[0], length - pruned[0], length - pruned[1]]
