"""Edge cases on the tiny LLaVA: text-only prompts in a batch, half precision, odd decode tokens."""

from __future__ import annotations

import pytest
import torch

import atp
from atp.host.compat import output_cache
from atp.tiny.models import cache_kwargs, tiny_llava
from tests.numerics import REORDERED, assert_same_continuation, greedy_steps
from tests.test_invariants import logits, random_masks

pytestmark = pytest.mark.filterwarnings("ignore:atp.attach")


def comparable_positions(model, inputs, keep_mask):
    """Text (non-pad) positions and kept visual positions of the final layer, (B, L) bool."""
    ids = inputs["input_ids"]
    visual = ids == model.config.image_token_id
    out = ~visual & inputs.get("attention_mask", torch.ones_like(ids)).bool()
    for b in range(ids.shape[0]):
        positions = visual[b].nonzero().flatten()
        out[b, positions[keep_mask[b, : len(positions)]]] = True
    return out


def test_mixed_batch_with_a_text_only_prompt_equals_singles(model):
    from atp.tiny.models import left_pad, llava_prompt

    prompts = [llava_prompt(model, [1, 5, 6], [7, 8, 9]), [1, 20, 21, 22, 23, 24, 25]]
    ids, mask = left_pad(prompts)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    mixed = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    with atp.attach(model, layers=[1, 3], policy="fixed", keep=[6, 3]) as handle:
        batch_logits, (batch_tokens, batch_scores) = logits(model, mixed), greedy_steps(model, mixed, 6)
        assert handle.stats.num_visual.tolist() == [16, 0]
        assert handle.stats.kept.tolist() == [[6, 3], [0, 0]]
        assert handle.stats.avg_tokens == (16 + 2 * 6 + 3) / 4  # whole counts / 4: exact in float32
        image_alone = {"input_ids": ids[:1], "pixel_values": pixels}
        image_logits, image_gen = logits(model, image_alone), greedy_steps(model, image_alone, 6)
        kept_mask = handle.stats.masks[-1]
    with torch.no_grad():
        text_alone = {"input_ids": torch.tensor([prompts[1]])}
        text_logits, text_gen = logits(model, text_alone), greedy_steps(model, text_alone, 6)
    compare = comparable_positions(model, image_alone, kept_mask)[0]
    torch.testing.assert_close(batch_logits[0][compare], image_logits[0][compare], **REORDERED)
    torch.testing.assert_close(batch_logits[1, -7:], text_logits[0], **REORDERED)
    for b, (tokens, scores) in enumerate((image_gen, text_gen)):
        assert_same_continuation((batch_tokens[b], batch_scores[b]), (tokens[0], scores[0]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keep_all_and_drop_equals_mask(batch, dtype):
    model = tiny_llava(num_layers=4).to(dtype)
    inputs = {**batch, "pixel_values": batch["pixel_values"].to(dtype)}
    real = batch["attention_mask"].bool()
    ref = logits(model, inputs)
    with atp.attach(model, layers=[1, 3], policy="keep_all"):
        assert torch.equal(logits(model, inputs)[real], ref[real])
    masks = random_masks(2, 16, 2, seed=2)
    out = {}
    for mode in ("drop", "mask"):
        with atp.attach(model, layers=[1, 3], policy="manual", keep_masks=masks, prune_mode=mode):
            out[mode] = logits(model, inputs)
    compare = comparable_positions(model, inputs, masks[-1])
    assert torch.isfinite(out["mask"][real]).all() and torch.isfinite(out["drop"][real]).all()
    # bfloat16 keeps 8 significant bits (float16 11): one ulp of a logit below 1 is <= 2**-8 ~ 4e-3.
    # Both modes accumulate in float32 and round each op's output to the half type, where they differ
    # by an ulp at most where the float32 results straddle a rounding boundary; such differences
    # average out over the 64-wide dot products downstream. 0.05 allows ~12 ulps of the logits.
    torch.testing.assert_close(
        out["drop"][compare].float(), out["mask"][compare].float(), rtol=0.05, atol=0.05
    )


def test_an_image_token_generated_while_decoding_is_just_a_token(model, batch):
    """A random model may sample the image token id; without pixels it is text, as unattached."""
    image_token = model.config.image_token_id
    step = {
        "input_ids": torch.full((2, 1), image_token),
        "attention_mask": torch.cat([batch["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1),
    }
    masks = random_masks(2, 16, 1, seed=4)
    out = {}
    for mode in ("drop", "mask"):
        with (
            atp.attach(model, layers=[2], policy="manual", keep_masks=masks, prune_mode=mode),
            torch.no_grad(),
        ):
            cache = output_cache(model(**batch, use_cache=True))
            out[mode] = model(**step, **cache_kwargs(model, cache)).logits
    torch.testing.assert_close(out["drop"], out["mask"], **REORDERED)
