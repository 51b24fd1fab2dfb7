"""Edge cases on the tiny LLaVA: text-only prompts in a batch, half precision, odd decode tokens."""

from __future__ import annotations

import pytest
import torch

import atp
from atp.compat import output_cache
from atp.testing import cache_kwargs, tiny_llava
from tests.test_invariants import greedy, logits, random_masks

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
    from atp.testing import left_pad, llava_prompt

    prompts = [llava_prompt(model, [1, 5, 6], [7, 8, 9]), [1, 20, 21, 22, 23, 24, 25]]
    ids, mask = left_pad(prompts)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    mixed = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    with atp.attach(model, layers=[1, 3], policy="fixed", keep=[6, 3]) as handle:
        batch_logits, batch_gen = logits(model, mixed), greedy(model, mixed)
        assert handle.stats.num_visual.tolist() == [16, 0]
        assert handle.stats.kept.tolist() == [[6, 3], [0, 0]]
        assert handle.stats.avg_tokens == pytest.approx((16 + 2 * 6 + 3) / 4)
        image_alone = {"input_ids": ids[:1], "pixel_values": pixels}
        image_logits, image_gen = logits(model, image_alone), greedy(model, image_alone)
        kept_mask = handle.stats.masks[-1]
    with torch.no_grad():
        text_alone = {"input_ids": torch.tensor([prompts[1]])}
        text_logits, text_gen = logits(model, text_alone), greedy(model, text_alone)
    compare = comparable_positions(model, image_alone, kept_mask)[0]
    torch.testing.assert_close(batch_logits[0][compare], image_logits[0][compare], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batch_logits[1, -7:], text_logits[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(batch_gen[0, ids.shape[1] :], image_gen[0, ids.shape[1] :])
    assert torch.equal(batch_gen[1, ids.shape[1] :], text_gen[0, 7:])


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
    torch.testing.assert_close(out["drop"], out["mask"], rtol=1e-4, atol=1e-4)
