"""The third-party plugin in integrations/atp-openclip: discovered, selectable, removable."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import atp
from atp.cli import main
from atp.tiny.models import TinyTokenizer

pytestmark = pytest.mark.filterwarnings("ignore:atp.attach", "ignore:clip_relevance runs an untrained CLIP")
OPTIONS = {"tokenizer": TinyTokenizer(), "model_name": "atp-tiny-clip"}


def test_the_plugin_is_discovered_through_its_entry_point(capsys):
    entry = atp.registry().get("scorer", "clip_relevance")
    assert entry.origin == "atp-openclip 0.1.0"
    assert main(["plugins"]) == 0
    assert "clip_relevance" in capsys.readouterr().out


def test_clip_relevance_is_selectable_ranks_patches_and_is_removable(model, batch):
    with torch.no_grad():
        reference = model(**batch).logits
    handle = atp.attach(
        model, layers=[2], policy="fixed", keep=[6], scorer="clip_relevance", scorer_options=OPTIONS
    )
    with pytest.warns(UserWarning, match="untrained CLIP"), torch.no_grad():
        model(**batch)
    kept = handle.stats.masks[0]
    scorer = handle.policy.scorer
    scores = scorer._cache[1]  # (B, 16) relevance of each visual token, computed once per prefill
    clip, clip_tokenizer = scorer._clip
    ids = batch["input_ids"]
    instruction = handle.runtime.prefill.instruction
    for b in range(2):
        text = OPTIONS["tokenizer"].decode(ids[b][instruction[b]].tolist())
        text_embed = F.normalize(clip.encode_text(clip_tokenizer([text])).float(), dim=-1)[0]
        token = 5  # row 1, column 1 of the 4 x 4 grid: pixels 8..16 of the 32 px image
        patch = batch["pixel_values"][b, :, 8:16, 8:16][None]
        patch = F.interpolate(patch, size=(32, 32), mode="bilinear", align_corners=False)
        with torch.no_grad():
            expected = F.normalize(clip.encode_image(patch).float(), dim=-1)[0] @ text_embed
        # a batch of crops (and of texts) vs one through the tiny CLIP (width 32, 2 blocks a tower):
        # ~13 float32 matmuls of <= 64 terms in another order, ~sqrt(64) * 2**-24 ~ 5e-7 relative each,
        # so the unit embeddings, and their cosine (|x| <= 1), agree within ~1e-5 even adding up linearly
        torch.testing.assert_close(scores[b, token], expected, rtol=1e-4, atol=1e-5)
        assert torch.equal(
            kept[b], torch.zeros(16, dtype=torch.bool).index_fill(0, scores[b].topk(6).indices, True)
        )
    handle.remove()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference)


def test_clip_relevance_refuses_bad_options(model):
    with pytest.raises(ValueError, match="needs the VLM's tokenizer"):
        atp.attach(model, layers=[2], policy="fixed", keep=[6], scorer="clip_relevance")
    with pytest.raises(ValueError, match=r"\.safetensors file only"):
        atp.attach(
            model,
            layers=[2],
            policy="fixed",
            keep=[6],
            scorer="clip_relevance",
            scorer_options={**OPTIONS, "weights": "clip.pt"},
        )
    assert "atp" not in dict(model.named_children())


def test_clip_scores_follow_the_prompt_of_each_prefill(model):
    from atp.tiny.models import llava_batch

    first = llava_batch(model, [([1, 5], [7, 8, 9], 1)])
    second = {**first, "input_ids": first["input_ids"].clone()}
    second["input_ids"][0, -3:] = torch.tensor([20, 21, 22])  # same image, another question
    with (
        atp.attach(
            model, layers=[2], policy="fixed", keep=[6], scorer="clip_relevance", scorer_options=OPTIONS
        ) as handle,
        torch.no_grad(),
    ):
        model(**first)
        scores_first = handle.policy.scorer._cache[1].clone()
        model(**second)
        scores_second = handle.policy.scorer._cache[1]
    assert not torch.equal(scores_first, scores_second)
