"""Gemma 3's own paths: the sliding window measured in original positions while decoding far past
it, and what is refused. (The invariant suite covers the rest.)"""

from __future__ import annotations

import pytest
import torch

import atp
from atp.tiny.models import gemma3_batch, tiny_gemma3
from tests.numerics import assert_same_greedy, greedy_steps

pytestmark = pytest.mark.filterwarnings("ignore:atp.attach")

SAMPLES = [[[1, 5, 6], 1, [7, 8, 9, 10]], [[1], 2, [4, 5, 6, 7, 8, 9, 10, 11]]]


def test_decoding_past_the_window_equals_mask_mode_and_the_caches_hold_what_they_should():
    """20 new tokens with a window of 8: every sliding layer's keys in decoding are the last 7
    kept tokens (in drop mode far fewer visual tokens sit among them than in mask mode), and the
    greedy continuation and its scores are the same in both modes."""
    model = tiny_gemma3(6, 0, sliding_window=8)
    batch = gemma3_batch([[[1, 5], 1, [7]], [[1], 2, [4, 5]]])  # images just before the question's end
    visual = int((batch["input_ids"] == 152).sum(1).max())
    first = torch.arange(visual) < 4  # the first 4 visual tokens of each sample: far behind the window
    early = [first.expand(2, -1), (torch.arange(visual) < 2).expand(2, -1)]
    out = {}
    for mode in ("drop", "mask"):
        with atp.attach(model, layers=[1, 4], policy="manual", keep_masks=early, prune_mode=mode):
            generated = model.generate(
                **batch, max_new_tokens=20, do_sample=False, output_scores=True, return_dict_in_generate=True
            )
        out[mode] = generated
        cache = generated.cache if hasattr(generated, "cache") else generated.past_key_values
        stored = [layer.keys.shape[2] for layer in cache.layers]
        assert stored[0] == stored[1] == stored[3] == stored[4] == 7  # sliding: window - 1
        if mode == "drop":
            total = batch["input_ids"].shape[1] + 19
            assert stored[2] < total and stored[5] < stored[2]  # global layers shrink by the pruned tokens
    length = batch["input_ids"].shape[1]
    drop, mask = ((out[m].sequences[:, length:], torch.stack(out[m].scores, 1)) for m in ("drop", "mask"))
    assert_same_greedy(drop, mask)  # tokens, and scores up to a reordering's rounding


def test_renumbered_positions_are_refused_with_the_reason():
    model = tiny_gemma3()
    with pytest.raises(ValueError, match="positions='renumber' works with 1d-rope models"):
        atp.attach(model, layers=[1], positions="renumber")
    assert "atp" not in dict(model.named_children())


@pytest.mark.parametrize("model_type", ["gemma3n", "glm4v_moe"])
def test_families_left_out_are_refused_with_the_reason(model_type):
    model = tiny_gemma3()
    model.config.model_type = model_type  # the refusal reads the config's model type only
    with pytest.raises(ValueError, match=f"model_type '{model_type}'"):
        atp.attach(model, layers=[1])
    assert "atp" not in dict(model.named_children())


def test_a_cache_built_without_the_config_keeps_every_token_and_gives_the_same_continuation():
    """A user's ``DynamicCache()`` has no sliding-window layers: its sliding layers keep every key,
    the window still applies through the mask, and greedy decoding is the same as with the
    model's own cache."""
    from transformers import DynamicCache

    from atp.tiny.models import cache_kwargs

    model = tiny_gemma3(6, 0, sliding_window=8)
    batch = gemma3_batch([[[1, 5], 1, [7]], [[1], 2, [4, 5]]])
    with atp.attach(model, layers=[1, 4], policy="fixed", keep=[4, 2]):
        own = greedy_steps(model, batch, 12)
        plain = greedy_steps(model, batch, 12, **cache_kwargs(model, DynamicCache()))
    assert_same_greedy(own, plain)  # the window as a mask over more keys: a reordering
