"""Qwen3-VL's own mechanisms: DeepStack after an ATP layer, per-frame video blocks, copies, and
the MoE variant's router logits. (The invariant suite covers the rest for both variants.)"""

from __future__ import annotations

import copy

import pytest
import torch

import atp
from atp.tiny.models import qwen_batch, tiny_qwen3_vl

pytestmark = pytest.mark.filterwarnings("ignore:atp.attach")

SAMPLES = [
    [[1, 5], ("image", 8, 8), [6], ("image", 4, 8), [7, 8, 9]],  # 16 + 8 tokens
    [[1], ("image", 8, 12), [4, 5], ("video", 4, 4, 4), [6, 7, 8, 9, 10]],  # 24 + 2 frames of 4
]


@pytest.fixture
def model():
    return tiny_qwen3_vl(4, 0)


@pytest.fixture
def batch():
    return qwen_batch(SAMPLES, frame_blocks=True)


def test_deepstack_adds_the_kept_tokens_features_only_after_an_atp_layer(model, batch, monkeypatch):
    """Layer 1 drops; DeepStack's second addition (after layer 1) gets one feature row per kept
    visual token, and the mask it writes through marks exactly the kept visual slots."""
    language = model.model.language_model
    calls = []
    original = type(language)._deepstack_process

    def spy(self, hidden, mask, features):
        calls.append((hidden.shape[1], int(mask.sum()), features.shape[0]))
        return original(self, hidden, mask, features)

    monkeypatch.setattr(type(language), "_deepstack_process", spy)
    with atp.attach(model, layers=[1, 3], policy="fixed", keep=[10, 5]) as handle, torch.no_grad():
        model(**batch)
        kept = handle.stats.kept.tolist()
    visual = int((batch["input_ids"] == 151).sum() + (batch["input_ids"] == 152).sum())
    full = batch["input_ids"].shape[1]
    assert calls[0] == (full, visual, visual)  # after layer 0: the whole sequence
    compact, rows, features = calls[1]
    assert compact < full and rows == features == sum(k[0] for k in kept) == 20


def test_video_frames_are_one_grid_each(model, batch):
    with atp.attach(model, layers=[1], policy="keep_all") as handle, torch.no_grad():
        model(**batch)
        grids = handle.stats.grids
    assert grids[0] == [(4, 4), (2, 4)]
    assert grids[1] == [(4, 6), (2, 2), (2, 2)]  # the image, then the video's two frames


def test_a_copy_follows_its_own_runtime_and_detach_restores_the_method(model, batch):
    language = model.model.language_model
    handle = atp.attach(model, layers=[1, 3], policy="fixed", keep=[10, 5])
    assert "_deepstack_process" in language.__dict__
    with torch.no_grad():
        reference = model(**batch).logits
    clone = copy.deepcopy(model)
    clone_language = clone.model.language_model
    assert clone_language.__dict__["_deepstack_process"].runtime is clone.atp.handle.runtime
    handle.remove()
    assert "_deepstack_process" not in language.__dict__
    with torch.no_grad():
        assert torch.equal(clone(**batch).logits, reference)  # the copy still prunes, on its own state
    clone.atp.handle.remove()
    assert "_deepstack_process" not in clone_language.__dict__


def test_moe_router_logits_are_refused_with_the_setting_to_change():
    model = tiny_qwen3_vl(4, 0, moe=True)
    model.config.text_config.output_router_logits = True
    with pytest.raises(ValueError, match="output_router_logits = False"):
        atp.attach(model, layers=[1])
    assert "atp" not in dict(model.named_children())
    model.config.text_config.output_router_logits = False
    with atp.attach(model, layers=[1, 3], policy="fixed", keep=[10, 5]) as handle, torch.no_grad():
        model(**qwen_batch(SAMPLES, frame_blocks=True))
        assert handle.stats.kept.tolist() == [[10, 5], [10, 5]]


def test_the_flops_preset_reads_like_the_config_it_was_copied_from():
    """The 4B preset's language-model fields are what ``shape_from_config`` reads from a config
    with the published sizes (no weights built)."""
    from transformers import Qwen3VLConfig

    from atp.core.efficiency import PRESETS, shape_from_config

    text = {
        "hidden_size": 2560,
        "intermediate_size": 9728,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
    }
    shape = shape_from_config(Qwen3VLConfig(text_config=text), "qwen3-vl-4b")
    preset = PRESETS["qwen3-vl-4b"]
    fields = ("num_layers", "hidden", "intermediate", "heads", "kv_heads", "head_dim", "vocab")
    assert [getattr(shape, f) for f in fields] == [getattr(preset, f) for f in fields]
