"""Family-specific behaviour of the backbone adapters and the size-agnostic threshold head."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import atp
from atp.components.threshold_head import BinnedThresholdHead, quantiles
from atp.host.attach import resolve_adapter
from atp.tiny.models import qwen_batch, tiny_qwen2_vl
from tests.families import FAMILIES

pytestmark = pytest.mark.filterwarnings("ignore:atp.attach")


def test_every_family_is_registered_and_listed():
    listed = {entry["family"] for entry in atp.supported_models()}
    assert {family.name for family in FAMILIES} <= listed
    for family in FAMILIES:
        assert resolve_adapter(family.model()).family == family.name


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_qwen_grids_from_grid_thw_equal_grids_from_mrope_positions(version):
    model = tiny_qwen2_vl(version=version)
    batch = qwen_batch(
        [
            [[1, 5], ("image", 8, 8), [6], ("image", 4, 8), [7]],
            [[1], ("image", 8, 12), [4], ("video", 4, 4, 6), [6]],
        ]
    )
    adapter = resolve_adapter(model)
    from_thw = adapter.visual_layout(batch["input_ids"], batch, {})
    assert from_thw.grids == [[(4, 4), (2, 4)], [(4, 6), (2, 3), (2, 3)]]  # a video gives one grid per frame
    positions, _ = model.model.get_rope_index(
        batch["input_ids"],
        batch["mm_token_type_ids"],
        batch["image_grid_thw"],
        batch["video_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    from_positions = adapter.visual_layout(batch["input_ids"], {}, {"position_ids": positions})
    assert from_positions.grids == from_thw.grids
    assert torch.equal(from_positions.visual, from_thw.visual)
    assert from_thw.structural.sum().item() == 8  # vision start / end markers


def test_qwen_needs_grids_and_refuses_the_paper_head():
    model = tiny_qwen2_vl()
    batch = qwen_batch([[[1], ("image", 4, 4), [5]]])
    with pytest.raises(ValueError, match="needs image_grid_thw"):
        resolve_adapter(model).visual_layout(batch["input_ids"], {}, {})
    with pytest.raises(ValueError, match="use threshold_head='binned'"):
        atp.attach(model, layers=[1], threshold_head="paper")
    handle = atp.attach(model, layers=[1, 2])
    assert isinstance(handle.policy.heads[0], BinnedThresholdHead)  # "auto" picks the size-agnostic head
    handle.remove()


@given(st.lists(st.floats(0, 1), min_size=1, max_size=40), st.integers(2, 5), st.integers(2, 16))
def test_quantiles_do_not_depend_on_order_or_resolution(values, repeat, bins):
    scores = torch.tensor([values])
    live = torch.ones_like(scores, dtype=torch.bool)
    base = quantiles(scores, live, bins)
    shuffled = quantiles(scores[:, torch.randperm(len(values))], live, bins)
    assert torch.equal(base, shuffled)
    assert bool((base[:, 1:] <= base[:, :-1]).all())  # high to low
    assert base[0, 0] == max(values) and base[0, -1] == min(values)
    repeated = quantiles(scores.repeat_interleave(repeat, dim=1), live.repeat_interleave(repeat, dim=1), bins)
    assert repeated[0, 0] == base[0, 0] and repeated[0, -1] == base[0, -1]


def test_binned_head_accepts_any_number_of_visual_tokens():
    head = BinnedThresholdHead(bins=8, hidden_size=16, init_theta_r=0.3, init_theta_s=0.6)
    for tokens in (4, 64, 1000):
        scores = torch.rand(2, tokens)
        live = torch.rand(2, tokens) > 0.3
        live[1] = False  # a sample with nothing alive
        theta_r, theta_s = head(scores, scores, live, torch.tensor([tokens, tokens]))
        # zero weights: sigmoid(logit(theta) rounded to float32); the rounding and a float32 sigmoid
        # (within ~2 ulps) leave a few 2**-24 of theta < 1, under the default float32 tolerance (1.3e-6)
        torch.testing.assert_close(theta_r, torch.full((2,), 0.3))
        torch.testing.assert_close(theta_s, torch.full((2,), 0.6))


def layout_of(model, batch):
    """The adapter's view of a batch, with the language model's real inputs."""
    adapter = resolve_adapter(model)
    seen = {}
    hook = adapter.language_model().register_forward_pre_hook(
        lambda m, a, k: seen.update(k), with_kwargs=True
    )
    with torch.no_grad():
        model(**batch)
    hook.remove()
    return adapter.visual_layout(batch["input_ids"], batch, seen)


@pytest.mark.parametrize("onevision", [False, True])
def test_llava_next_tiles_and_newlines(onevision):
    from atp.tiny.models import llava_next_batch, tiny_llava_next

    model = tiny_llava_next(onevision=onevision)
    media = [("image", 40, 70)] + ([("video", 2)] if onevision else [])
    batch = llava_next_batch(model, [([1], [5], [("image", 32, 32)]), ([1], [5], media)])
    layout = layout_of(model, batch)
    expected = [[(4, 4), (4, 4)], [(4, 4), (4, 8)] + ([(2, 2), (2, 2)] if onevision else [])]
    assert layout.grids == expected  # base grid, then the unpadded high-resolution grid (and video frames)
    assert layout.structural.sum(1).tolist() == [
        4,
        4 + int(onevision),
    ]  # one newline per row (+ after a video)
    assert not (layout.structural & layout.visual).any()
    placeholders = (batch["input_ids"] == model.config.image_token_id) | (
        batch["input_ids"] == getattr(model.config, "video_token_id", -1)
    )
    assert torch.equal(layout.structural | layout.visual, placeholders)


def test_internvl_tiles_and_markers():
    from atp.tiny.models import internvl_batch, tiny_internvl

    model = tiny_internvl()
    batch = internvl_batch(model, [([1, 5], [7], [1, 3])])
    layout = layout_of(model, batch)
    assert layout.grids == [[(4, 4)] * 4]
    marked = batch["input_ids"][layout.structural].tolist()
    assert marked == [125, 124, 125, 124]  # <img> and </img> around each image


def test_mistral3_rows_breaks_and_back_to_back_images():
    from atp.tiny.models import mistral3_batch, tiny_mistral3

    model = tiny_mistral3()
    batch = mistral3_batch(model, [([1], [5, 6], [(32, 48), (16, 24), (24, 16)])])
    layout = layout_of(model, batch)
    assert layout.grids == [[(4, 6), (2, 3), (3, 2)]]
    assert batch["input_ids"][layout.structural].tolist() == [12, 12, 12, 13, 12, 13, 12, 12, 13]


def test_sliding_window_language_models_are_refused():
    from atp.tiny.models import tiny_mistral3

    model = tiny_mistral3()
    model.config.text_config.sliding_window = 4096
    with pytest.raises(ValueError, match="uses sliding-window attention layers"):
        atp.attach(model, layers=[1])
    assert "atp" not in dict(model.named_children())


@pytest.mark.parametrize("onevision", [False, True])
def test_llava_next_images_back_to_back_are_told_apart(onevision):
    from atp.tiny.models import llava_next_batch, tiny_llava_next

    model = tiny_llava_next(onevision=onevision)
    media = [("image", 32, 32), ("image", 40, 70), ("image", 32, 32)]  # no text between the images
    batch = llava_next_batch(model, [([1], [5, 6], media)])
    layout = layout_of(model, batch)
    assert layout.grids == [[(4, 4), (4, 4), (4, 4), (4, 8), (4, 4), (4, 4)]]
    with torch.no_grad():
        reference = model(**batch).logits
    with atp.attach(model, layers=[1, 3], policy="keep_all") as handle, torch.no_grad():
        assert torch.equal(model(**batch).logits, reference)
        assert handle.stats.num_visual.tolist() == [16 * 5 + 32]
    with atp.attach(model, layers=[1, 3], policy="fixed", keep=[0.5, 0.5]), torch.no_grad():
        model.generate(**batch, max_new_tokens=3, do_sample=False)


def test_llava_next_newlines_are_found_under_autocast():
    from atp.tiny.models import llava_next_batch, tiny_llava_next

    model = tiny_llava_next()
    batch = llava_next_batch(model, [([1], [5, 6], [("image", 40, 70)])])
    with atp.attach(model, layers=[1, 3], policy="keep_all") as handle:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(**batch)
        assert handle.stats.num_visual.tolist() == [48]  # 16 + 4 x 8; the 4 newlines are structural
        assert handle.runtime.prefill.context["grids"] == [[(4, 4), (4, 8)]]


def test_a_misread_layout_is_an_error_not_silent():
    from atp.backbones.base import VisualLayout
    from atp.core.state import Prefill

    visual = torch.zeros(1, 10, dtype=torch.bool)
    visual[0, 2:8] = True
    layout = VisualLayout(visual, torch.zeros_like(visual), [[(2, 2)]])  # 4 of 6 tokens
    with pytest.raises(ValueError, match="cover 4 tokens but the prompt has 6 visual tokens"):
        Prefill.start(layout, {}, "drop", False, 3.0, None)


def test_llava_with_a_pixtral_tower_reads_rows_and_breaks():
    from atp.tiny.models import mistral3_batch, tiny_pixtral_llava

    model = tiny_pixtral_llava()
    batch = mistral3_batch(model, [([1, 5], [7, 8], [(32, 48)]), ([1], [4, 5, 6], [(16, 24), (24, 16)])])
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        reference = model(**batch).logits
    with atp.attach(model, layers=[1, 3], policy="keep_all") as handle, torch.no_grad():
        assert torch.equal(model(**batch).logits[real], reference[real])
        assert handle.runtime.prefill.context["grids"] == [[(4, 6)], [(2, 3), (3, 2)]]
    with atp.attach(model, layers=[1, 3]) as handle:
        assert isinstance(handle.policy.heads[0], BinnedThresholdHead)  # the token count varies
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=3, do_sample=False)
