"""GLM-4.1V's and GLM-4.6V's videos: frames written as image blocks, told apart by
``mm_token_type_ids`` (the invariant suite runs images; transformers takes images and videos in
separate forwards), and the GLM-4.6V text models atp does not follow."""

from __future__ import annotations

import pytest

import atp
from atp.tiny.models import qwen_batch, tiny_glm4v, tiny_glm46v
from tests.numerics import assert_same_greedy, greedy_steps

pytestmark = pytest.mark.filterwarnings("ignore:atp.attach")

VIDEOS = [[[1, 5], ("video", 4, 4, 8), [7, 8]], [[1], ("video", 2, 4, 4), [4, 5, 6]]]  # 2 frames of 8; 1 of 4


@pytest.mark.parametrize("build", [tiny_glm4v, tiny_glm46v], ids=["glm4v", "glm46v"])
def test_a_video_batch_has_one_grid_per_frame_and_drop_equals_mask(build):
    model = build()
    batch = qwen_batch(VIDEOS, glm=True)
    out = {}
    for mode in ("drop", "mask"):
        with atp.attach(model, layers=[1, 3], policy="fixed", keep=[6, 3], prune_mode=mode) as handle:
            out[mode] = (greedy_steps(model, batch, 5), handle.stats.kept.tolist(), handle.stats.grids)
    assert out["drop"][2] == [[(2, 4), (2, 4)], [(2, 2)]]
    assert out["drop"][1] == out["mask"][1] == [[6, 3], [4, 3]]  # the short video keeps all it has
    assert_same_greedy(out["drop"][0], out["mask"][0])


def test_a_video_without_token_types_is_refused_by_the_adapter():
    """transformers 5.24 refuses it first; the adapter does not guess if a release lets it through."""
    from atp.host.attach import resolve_adapter

    model = tiny_glm4v()
    batch = qwen_batch(VIDEOS, glm=True)
    del batch["mm_token_type_ids"]
    with pytest.raises(ValueError, match="mm_token_type_ids .* to tell them from images"):
        resolve_adapter(model).visual_layout(batch["input_ids"], batch, {})


def test_glm46v_with_another_text_model_is_refused_with_its_model_type():
    """GLM-4.6V builds its language model from ``text_config.model_type``; atp follows the dense
    GLM-4.1V text model only (the refusal reads the config, as it would for the MoE one)."""
    model = tiny_glm46v()
    model.config.text_config.model_type = "glm4v_moe_text"
    with pytest.raises(ValueError, match="language model is 'glm4v_moe_text'.*dense GLM-4.1V text model"):
        atp.attach(model, layers=[1])
    assert "atp" not in dict(model.named_children())
