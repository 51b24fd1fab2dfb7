"""The paths users take besides a plain forward: copies, pickles, saving, other argument forms,
images at the end of a prompt, later turns. Each gives the right answer or a clear refusal."""

from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import GenerationConfig

import atp
from atp.host.compat import output_cache
from atp.tiny.models import cache_kwargs, left_pad, llava_prompt, tiny_llava
from tests.numerics import REORDERED, assert_same_continuation, assert_same_greedy, greedy_steps

pytestmark = pytest.mark.filterwarnings("ignore:atp.attach")


def greedy(model, inputs, n=5, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False, **kwargs)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


# copies, pickles, saving -------------------------------------------------------------------
def test_a_deep_copy_is_an_independent_attached_model(model, batch):
    handle = atp.attach(model, layers=[1, 2], policy="fixed", keep=[8, 4])
    reference = greedy(model, batch)
    clone = copy.deepcopy(model)
    assert torch.equal(greedy(clone, batch), reference)
    clone_handle = clone.atp.handle
    assert clone_handle.model is clone and clone_handle.runtime is not handle.runtime
    assert clone_handle.stats.kept.tolist() == [[8, 4], [8, 4]]

    with torch.no_grad():
        clone.lm_head.weight.zero_()  # the copy's own weights decide its output
    new = greedy(clone, batch)[:, batch["input_ids"].shape[1] :]
    assert bool((new == 0).all())  # all-zero logits: argmax is token 0
    assert torch.equal(greedy(model, batch), reference)

    handle.remove()  # detaching the original leaves the copy attached and pruning
    assert "generate" in clone.__dict__ and "generate" not in model.__dict__
    logits(clone, batch)
    assert clone_handle.stats.kept.tolist() == [[8, 4], [8, 4]]
    clone_handle.remove()
    assert "atp" not in dict(clone.named_children())


def test_pickle_and_torch_save_round_trip_an_attached_model(model, batch):
    """Pickled before its first forward, as an unattached model must be (transformers' output
    capturing hooks, installed by the first forward, are local functions)."""
    handle = atp.attach(model, layers=[1, 2], policy="fixed", keep=[8, 4])
    buffer, pickled = io.BytesIO(), pickle.dumps(handle)  # a handle pickles with its model
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    reference, reference_logits = greedy(model, batch), logits(model, batch)
    assert torch.equal(greedy(loaded, batch), reference)
    assert torch.equal(logits(loaded, batch), reference_logits)
    assert loaded.atp.handle.stats.kept.tolist() == [[8, 4], [8, 4]]

    again = pickle.loads(pickled)
    assert again.model.atp.handle is again and torch.equal(greedy(again.model, batch), reference)

    handle.remove()
    unattached = logits(model, batch)
    loaded.atp.handle.remove()
    assert torch.equal(logits(loaded, batch), unattached)


def test_an_attached_model_unpickles_in_a_new_process(model, tmp_path):
    """The attention function atp registers must exist in the process that loads the model.
    (A text prompt: transformers itself cannot run a LLaVA vision tower unpickled in a new process,
    attached or not; its hidden states come back None.)"""
    atp.attach(model, layers=[1, 2], policy="fixed", keep=[8, 4])
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    torch.save({"model": model, "ids": ids}, tmp_path / "attached.pt")
    torch.save(logits(model, {"input_ids": ids}), tmp_path / "logits.pt")
    script = (
        "import torch\n"
        f"saved = torch.load({str(tmp_path / 'attached.pt')!r}, weights_only=False)\n"
        f"reference = torch.load({str(tmp_path / 'logits.pt')!r})\n"
        "with torch.no_grad():\n"
        "    out = saved['model'](input_ids=saved['ids']).logits\n"
        "assert torch.equal(out, reference), (out - reference).abs().max()\n"
        "saved['model'].atp.handle.remove()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def saved_keys(folder) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as saved:
        return set(saved.keys())


def test_save_pretrained_writes_the_base_model_only(model, tmp_path):
    model.save_pretrained(tmp_path / "unattached")
    ignored_before = set(model._keys_to_ignore_on_save or ())
    handle = atp.attach(model, layers=[1, 2], policy="atp")
    assert any(key.startswith("atp.") for key in model.state_dict())  # trainers still see them
    model.save_pretrained(tmp_path / "base")
    assert saved_keys(tmp_path / "base") == saved_keys(tmp_path / "unattached")
    reloaded, info = type(model).from_pretrained(tmp_path / "base", output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    handle.save_pretrained(tmp_path / "atp")  # atp's weights go here
    with safe_open(str(tmp_path / "atp" / "atp_model.safetensors"), "pt") as saved:
        assert set(saved.keys()) == set(handle.policy.state_dict())
    handle.remove()
    assert set(model._keys_to_ignore_on_save or ()) == ignored_before


def test_attaching_through_a_module_of_an_attached_model_is_refused(model):
    atp.attach(model, layers=[1])
    with pytest.raises(ValueError, match="already attached to a model this module belongs to"):
        atp.attach(model.model)
    holder = torch.nn.ModuleDict({"vlm": model})
    with pytest.raises(ValueError, match="already attached to its submodule 'vlm'"):
        atp.attach(holder)
    assert len(model.atp.handle.runtime.hooks) > 0 and model.atp.handle.removed is False


# prompt layouts ----------------------------------------------------------------------------
def _image_last_batch(model):
    """Two prompts that end with their image, left padded."""
    ids, mask = left_pad([llava_prompt(model, [1, 5, 6], []), llava_prompt(model, [1, 11], [])])
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def test_an_image_at_the_end_of_the_prompt_keeps_its_last_token(model):
    """The first new token is predicted from the prompt's last token: it is never pruned, so
    drop (which stops computing pruned tokens) and mask give the same prediction."""
    batch = _image_last_batch(model)
    width = int((batch["input_ids"] == model.config.image_token_id).sum(1).max())
    keep = torch.ones(2, width, dtype=torch.bool)
    keep[:, ::3] = False
    keep[:, -1] = False  # the policy asks to prune the last token
    out = {}
    for mode in ("drop", "mask"):
        with atp.attach(model, layers=[2], policy="manual", keep_masks=[keep], prune_mode=mode) as handle:
            out[mode] = (logits(model, batch)[:, -1], greedy_steps(model, batch, 5), handle.stats)
    torch.testing.assert_close(out["drop"][0], out["mask"][0], **REORDERED)
    assert_same_greedy(out["drop"][1], out["mask"][1])
    for mode in ("drop", "mask"):
        masks = out[mode][2].masks[0]
        assert bool(masks[:, -1].all()) and torch.equal(masks[:, :-1], keep[:, :-1])


def test_a_visual_token_that_predicts_a_supervised_label_is_kept(model):
    """With labels, the loss reads the position before each supervised text token."""
    ids = torch.tensor([llava_prompt(model, [1, 5], [6, 7, 8])])
    visual = ids[0] == model.config.image_token_id
    last_visual = int(visual.nonzero().max())
    labels = torch.where(visual, -100, ids)[None][0]
    keep = torch.zeros(1, int(visual.sum()), dtype=torch.bool)
    pixels = torch.randn(1, 3, 32, 32)
    for mode, supervised in (("drop", True), ("mask", True), ("drop", False)):
        lab = labels.clone()
        if not supervised:
            lab[:, last_visual + 1 :] = -100
        with atp.attach(model, layers=[2], policy="manual", keep_masks=[keep], prune_mode=mode) as handle:
            with torch.no_grad():
                model(input_ids=ids, pixel_values=pixels, labels=lab)
            kept = handle.stats.masks[0][0]
        assert bool(kept[-1]) is supervised and not bool(kept[:-1].any())


def test_rope2d_positions_do_not_depend_on_left_padding(model):
    short, long = (
        llava_prompt(model, [1, 5, 6], [7, 8]),
        llava_prompt(model, [1, 11, 2, 3, 4, 5, 6], [7, 8, 9]),
    )
    ids, mask = left_pad([short, long])
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    options = {
        "max_new_tokens": 4,
        "do_sample": False,
        "output_logits": True,
        "return_dict_in_generate": True,
    }
    with atp.attach(model, layers=[2], policy="fixed", keep=[0.5], positions="rope2d"), torch.no_grad():
        in_batch = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **options)
        alone = model.generate(input_ids=torch.tensor([short]), pixel_values=pixels[:1], **options)
    assert_same_continuation(  # the new tokens and their logits (a left-padded batch: a reordering)
        (in_batch.sequences[0, ids.shape[1] :], torch.stack(in_batch.logits)[:, 0]),
        (alone.sequences[0, len(short) :], torch.stack(alone.logits)[:, 0]),
    )


# generate settings, whatever form they take --------------------------------------------------
@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, b: m.generate(**b, prefill_chunk_size=4), "prefill_chunk_size=4 is not supported"),
        (
            lambda m, b: m.generate(
                b["input_ids"], GenerationConfig(num_beams=2), pixel_values=b["pixel_values"]
            ),
            "beam search is not supported",
        ),
        (
            lambda m, b: m.generate(**b, generation_config=GenerationConfig(prefill_chunk_size=8)),
            "prefill_chunk_size=8",
        ),
        (lambda m, b: m.generate(**b, penalty_alpha=0.6, top_k=4), "contrastive search is not supported"),
        (lambda m, b: m.generate(**b, guidance_scale=1.5), "classifier-free guidance"),
        (lambda m, b: m.generate(**b, custom_generate=lambda *a, **k: None), "custom_generate"),
        (lambda m, b: m.generate(**b, prompt_lookup_num_tokens=2), "assisted generation is not supported"),
    ],
    ids=["chunked", "positional-config", "config-chunked", "contrastive", "cfg", "custom", "prompt-lookup"],
)
def test_generation_settings_are_refused_in_every_form(model, batch, call, message):
    with atp.attach(model, layers=[1, 2], policy="fixed", keep=[8, 4]) as handle:
        with pytest.raises(ValueError, match=message):
            call(model, batch)
        assert handle.runtime.prefill is None  # refused before anything ran


def test_a_model_generation_config_is_read_too(model, batch):
    model.generation_config.num_beams = 2
    with atp.attach(model, layers=[1]), pytest.raises(ValueError, match="beam search"):
        model.generate(**batch, max_new_tokens=2)
    with atp.attach(model, layers=[1]):  # a keyword overrides the model's setting, as in generate
        assert greedy(model, batch, num_beams=1).shape[1] == batch["input_ids"].shape[1] + 5


def test_encoded_images_in_a_continuation_are_refused(model, batch):
    """Chunked prefill by hand, or images of a later turn encoded by generate, arrive as
    ``mm_encoder_outputs`` with a cache: atp pruned the cache without them."""
    with atp.attach(model, layers=[1]):
        with torch.no_grad():
            out = model(**batch, use_cache=True)
        more = torch.tensor([llava_prompt(model, [4], [5])] * 2)
        with pytest.raises(ValueError, match="visual inputs arrived after the prefill"):
            model(
                input_ids=more,
                mm_encoder_outputs={"image": torch.zeros(1)},
                **cache_kwargs(model, output_cache(out)),
            )


def test_an_image_in_a_later_turn_through_generate_is_refused(model, batch):
    with atp.attach(model, layers=[1]):
        with torch.no_grad():
            first = model.generate(**batch, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        turn = torch.tensor([llava_prompt(model, [4], [5])] * 2)
        ids = torch.cat([first.sequences, turn], dim=1)
        mask = torch.cat(
            [batch["attention_mask"], torch.ones(2, ids.shape[1] - batch["attention_mask"].shape[1])], 1
        )
        pixels = torch.cat([batch["pixel_values"], batch["pixel_values"]])
        with pytest.raises(ValueError, match="visual inputs arrived after the prefill"):
            model.generate(
                input_ids=ids,
                attention_mask=mask.long(),
                pixel_values=pixels,
                max_new_tokens=2,
                **cache_kwargs(model, output_cache(first)),
            )


def test_a_text_turn_continues_a_pruned_cache_as_one_long_prompt():
    """A second, text-only turn on the cache of the first equals drop == mask on it."""
    model = tiny_llava(num_layers=4)
    first_ids = torch.tensor([llava_prompt(model, [1, 5], [6, 7])])
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    turn = torch.tensor([[9, 10, 11]])
    keep = torch.rand(1, 16, generator=torch.Generator().manual_seed(0)) < 0.5
    out = {}
    for mode in ("drop", "mask"):
        with (
            atp.attach(model, layers=[2], policy="manual", keep_masks=[keep], prune_mode=mode),
            torch.no_grad(),
        ):
            first = model(input_ids=first_ids, pixel_values=pixels, use_cache=True)
            second = model(
                input_ids=turn,
                attention_mask=torch.ones(1, first_ids.shape[1] + 3, dtype=torch.long),
                **cache_kwargs(model, output_cache(first)),
            )
            out[mode] = second.logits
    torch.testing.assert_close(out["drop"], out["mask"], **REORDERED)


# config variants seen at attach ---------------------------------------------------------------
def test_config_variants_the_forward_cannot_lay_out_are_refused_at_attach():
    from atp.tiny.models import tiny_llava_next

    model = tiny_llava(num_layers=4)
    model.config.image_seq_length = 17  # e.g. vision_feature_select_strategy="full" keeps CLS
    with pytest.raises(ValueError, match="17 image tokens .* are not a square grid"):
        atp.attach(model, layers=[1])
    assert "atp" not in dict(model.named_children())
    model = tiny_llava_next(num_layers=4)
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match="'full' with a CLIP tower"):
        atp.attach(model, layers=[1])


def test_image_placeholders_without_images_are_refused(model):
    """Unattached, the placeholders are embedded as ordinary tokens; atp would prune them as
    if they were an image."""
    ids = torch.tensor([llava_prompt(model, [1, 5], [6, 7])])
    with (
        atp.attach(model, layers=[1]),
        pytest.raises(ValueError, match="16 image placeholder tokens but no images"),
    ):
        model(input_ids=ids)


def test_rope2d_refuses_positions_that_count_the_left_padding(model):
    short, long = (
        llava_prompt(model, [1, 5, 6], [7, 8]),
        llava_prompt(model, [1, 11, 2, 3, 4, 5, 6], [7, 8, 9]),
    )
    ids, mask = left_pad([short, long])
    pixels = torch.randn(2, 3, 32, 32)
    with atp.attach(model, layers=[2], policy="keep_all", positions="rope2d"), torch.no_grad():
        with pytest.raises(ValueError, match="needs position ids that skip the left padding"):
            model(
                input_ids=ids, attention_mask=mask, pixel_values=pixels
            )  # positions 0..L-1 count the padding
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        padded = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, position_ids=positions).logits
        alone = model(input_ids=torch.tensor([short]), pixel_values=pixels[:1]).logits
    torch.testing.assert_close(padded[0, -len(short) :], alone[0], **REORDERED)


def test_rope2d_padding_check_reads_missing_position_ids_as_the_default_count():
    from atp.components.position_keeper import _check_padding_free

    real = torch.tensor([[False, True, True], [True, True, True]])
    _check_padding_free(torch.tensor([[0, 0, 1], [0, 1, 2]]), real)  # padding-free: accepted
    with pytest.raises(ValueError, match="skip the left padding"):
        _check_padding_free(None, real)  # a layer given no ids counts the padding
