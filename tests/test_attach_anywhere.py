"""Attaching anywhere keeps every promise: a second turn after every policy, a module inside a
vision-language model, a model not materialised yet. Each gives the right answer or a refusal
that says what to pass instead; never a result that may be wrong."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import atp
from atp.host import checkpoint
from atp.host.attach import resolve_adapter
from atp.host.attention import ATTENTION_NAME
from atp.host.compat import attention_implementation
from atp.tiny.models import cache_kwargs, tiny_llava
from tests.families import BY_NAME_FAMILIES, FAMILIES, visual_mask

pytestmark = [pytest.mark.filterwarnings("ignore:atp.attach"), pytest.mark.usefixtures("one_thread")]

# Drop and mask mode sum the same attention terms (a masked key's weight is exp(-inf) = 0 exactly)
# in another order and through other kernels. A float32 sum of n terms is off by at most n * 2**-24
# relative: under 1e-5 for the n <= 128 terms here (width 64, MLP 128, ~100 keys), and four layers
# add a few such errors, under the suite's 1e-4 on logits of order 1. A wrong key set or position
# moves the logits of these tiny models by 1e-3 and more.
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}
TURN = [20, 21, 22]  # the second turn's text ids (no family's special tokens: tests/families.TEXT_IDS)
# every registered policy with options that prune (a new policy fails the first test until added)
OPTIONS = {
    "manual": lambda width: {
        "keep_masks": [torch.rand(2, width, generator=torch.Generator().manual_seed(0)) < 0.5]
    },
    "fixed": lambda width: {"keep": [0.5]},
    "random": lambda width: {"keep": [0.5], "seed": 1},
    "atp": lambda width: {
        "init_theta_r": 0.45,
        "init_theta_s": 0.9,
        "temperature": 200.0,
        "threshold_head": "binned",
    },
    "fastv": lambda width: {"ratio": 0.5},
    "pdrop": lambda width: {"ratio": 0.5},
    "spatial": lambda width: {"strides": [2]},
    "pool": lambda width: {"stride": 2},  # merges each 2 x 2 block into one token before layer 0
    "keep_all": lambda width: {},
}
POLICIES = sorted(OPTIONS)
FAMILY_NAMES = [family.key for family in FAMILIES]


@functools.cache
def tiny(family: str) -> tuple[torch.nn.Module, dict]:
    """The family's tiny model and two-sample batch, built once (a removed handle leaves it as it was)."""
    model = BY_NAME_FAMILIES[family].model(seed=3)
    return model, BY_NAME_FAMILIES[family].batch(model)


def test_every_registered_policy_takes_a_second_turn():
    assert atp.registry().names("policy") == POLICIES


# a second turn ---------------------------------------------------------------------------------
def _attach(model, batch, policy: str, mode: str):
    pre_llm = atp.registry().get("policy", policy).factory.pre_llm
    width = int(visual_mask(model, batch).sum(1).max())
    return atp.attach(
        model, layers=None if pre_llm else [2], policy=policy, prune_mode=mode, **OPTIONS[policy](width)
    )


def _first_turn(model, batch):
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)


def _ones(batch: dict, columns: int) -> torch.Tensor:
    """``batch``'s attention mask with ``columns`` more real tokens on the right."""
    mask = batch["attention_mask"]
    return torch.cat([mask, mask.new_ones(mask.shape[0], columns)], dim=1)


def _second_turn(model, batch: dict, first, whole: bool):
    """Greedy steps of a text-only turn continuing ``first``'s cache: ``whole`` gives generate the
    whole conversation as input_ids (it slices off what the cache holds), else only the tokens the
    cache does not hold (the last generated token and the turn), with the mask over all of them."""
    turn = torch.tensor([TURN] * first.sequences.shape[0])
    conversation = torch.cat([first.sequences, turn], dim=1)
    mask = _ones(batch, conversation.shape[1] - batch["attention_mask"].shape[1])
    inputs = {"input_ids": conversation if whole else conversation[:, first.sequences.shape[1] - 1 :]}
    for name in ("token_type_ids", "mm_token_type_ids"):  # text: type 0
        if whole and name in batch:
            inputs[name] = torch.nn.functional.pad(batch[name], (0, mask.shape[1] - batch[name].shape[1]))
    with torch.no_grad():
        out = model.generate(
            **inputs,
            attention_mask=mask,
            max_new_tokens=3,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            **cache_kwargs(model, first.past_key_values),
        )
    return out.sequences[:, conversation.shape[1] if whole else inputs["input_ids"].shape[1] :], torch.stack(
        out.logits, dim=1
    )


def assert_same_steps(drop, mask) -> None:
    """``(tokens (B, T), logits (B, T, V))`` of two greedy continuations that should agree: the logits
    at every step while the tokens agree (a tie decided by rounding may part them; the logits of
    that step agree, checked)."""
    (tokens, logits), (other_tokens, other_logits) = drop, mask
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1]):
            torch.testing.assert_close(
                logits[b, t], other_logits[b, t], **TOLERANCE, msg=f"sample {b}, step {t}"
            )
            if tokens[b, t] != other_tokens[b, t]:
                break


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_second_turn_after_every_policy_gives_drop_equals_mask(family, policy):
    model, batch = tiny(family)
    out = {}
    for mode in ("drop", "mask"):
        with _attach(model, batch, policy, mode) as handle:
            first = _first_turn(model, batch)
            out[mode] = (first.sequences, handle.stats.kept, _second_turn(model, batch, first, whole=False))
    assert torch.equal(out["drop"][0], out["mask"][0])
    assert torch.equal(out["drop"][1], out["mask"][1])
    assert_same_steps(out["drop"][2], out["mask"][2])


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3"])  # 1D RoPE, M-RoPE, sliding window
def test_a_second_turn_given_as_the_whole_conversation_gives_drop_equals_mask_or_a_refusal(family, policy):
    """generate finds the new tokens by the cache's layer 0, which a pre-LLM policy prunes in drop
    mode: that form is refused (naming the one that works) before generate prepares anything, and
    the cache continues right after the refusal."""
    model, batch = tiny(family)
    out = {}
    for mode in ("mask", "drop"):
        with _attach(model, batch, policy, mode):
            first = _first_turn(model, batch)
            if mode == "drop" and atp.registry().get("policy", policy).factory.pre_llm:
                with pytest.raises(
                    ValueError, match=r"Pass only the tokens after the first \d+ \(input_ids\[:, \d+:\]\)"
                ):
                    _second_turn(model, batch, first, whole=True)
                out[mode] = _second_turn(model, batch, first, whole=False)
            else:
                out[mode] = _second_turn(model, batch, first, whole=True)
    assert_same_steps(out["drop"], out["mask"])


@pytest.mark.parametrize("mode", ["drop", "mask"])
@pytest.mark.parametrize("policy", POLICIES)
def test_a_continuation_whose_mask_does_not_cover_the_cache_and_the_new_tokens_is_refused(policy, mode):
    """A turn without the last generated token, its 2D mask as if it were there: transformers'
    contract is a mask over every token seen and the new ones, and atp (which rebuilds the mask
    after a pre-LLM policy) would read it otherwise than in the other mode."""
    model, batch = tiny("llava")
    with _attach(model, batch, policy, mode), torch.no_grad():
        first = _first_turn(model, batch)
        mask = _ones(batch, first.sequences.shape[1] - batch["input_ids"].shape[1] + len(TURN))
        message = "a continuation's mask covers every token seen and the new ones"
        with pytest.raises(ValueError, match=message):
            model(
                input_ids=torch.tensor([TURN] * 2),
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1)[:, -len(TURN) :],
                **cache_kwargs(model, first.past_key_values),
            )


# a module inside a model -------------------------------------------------------------------------
def _parts(family: str) -> list[tuple[str, torch.nn.Module]]:
    """The family's modules a user might attach to instead of the whole model: every sub-module some
    registered backbone adapter claims (they carry the model's config), and the language model."""
    model = BY_NAME_FAMILIES[family].model()
    backbones = [entry.factory for entry in atp.registry().entries() if entry.kind == "backbone"]
    parts = [
        (name, module)
        for name, module in model.named_modules()
        if name and any(backbone.matches(module) for backbone in backbones)
    ]
    assert parts, "every family's inner multimodal model carries its config"
    language = resolve_adapter(model).language_model()
    return [*parts, ("language model", language)]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_attaching_to_a_module_inside_the_model_is_refused_naming_the_model(family):
    """Attached to the inner model, atp would not guard the outer model's generate, see its labels
    or add the budget loss to its loss: refused, naming the model to pass, and nothing changes."""
    full = type(BY_NAME_FAMILIES[family].model()).__name__
    for name, module in _parts(family):
        config = copy.deepcopy(module.config.to_dict()) if hasattr(module, "config") else None
        with pytest.raises(ValueError, match="(?i)pass the full vision-language model") as error:
            atp.attach(module)
        if name != "language model":  # the language model's config does not name the whole model
            assert full in str(error.value), (name, str(error.value))
        assert "atp" not in dict(module.named_children()), name
        if config is not None:
            assert module.config.to_dict() == config, name
            assert attention_implementation(module.config) != ATTENTION_NAME


# a model not materialised yet ----------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    """A folder with ATP weights that are not the initial ones, those weights and the model (detached)."""
    model = tiny_llava(num_layers=4)
    with atp.attach(model, layers=[1, 3]) as handle:
        with torch.no_grad():
            for param in handle.parameters():
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
        weights = {name: value.clone() for name, value in handle.policy.state_dict().items()}
        handle.save_pretrained(tmp_path / "atp")
    return tmp_path / "atp", weights, model


def _meta_copy(model):
    with torch.device("meta"):
        return type(model)(copy.deepcopy(model.config)).eval()


def _materialise(meta, model) -> None:
    """``to_empty`` then the base model's weights, as a checkpoint loader does (no ATP keys in them),
    and its buffers (non-persistent ones, e.g. position ids, are in no state dict)."""
    meta.to_empty(device="cpu")
    missing = meta.load_state_dict(model.state_dict(), strict=False).missing_keys
    assert missing and all(key.startswith("atp.") for key in missing)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            meta.get_buffer(name).copy_(buffer)


def _same_weights(handle, weights: dict) -> bool:
    state = handle.policy.state_dict()
    return state.keys() == weights.keys() and all(torch.equal(state[name], weights[name]) for name in weights)


def test_from_pretrained_on_a_meta_model_keeps_the_weights_until_it_is_materialised(saved):
    folder, weights, model = saved
    meta = _meta_copy(model)
    handle = atp.attach(meta, from_pretrained=folder)
    assert all(param.is_meta for param in handle.parameters())
    _materialise(meta, model)
    assert _same_weights(handle, weights)
    batch = BY_NAME_FAMILIES["llava"].batch(model)
    with atp.attach(model, from_pretrained=folder), torch.no_grad():
        expected = model(**batch).logits
    with torch.no_grad():
        torch.testing.assert_close(meta(**batch).logits, expected, rtol=0, atol=0)  # same weights, same ops


def test_a_meta_model_saves_the_atp_weights_it_will_get(saved, tmp_path):
    folder, weights, model = saved
    handle = atp.attach(_meta_copy(model), from_pretrained=folder)
    handle.save_pretrained(tmp_path / "again")
    again = atp.attach(copy.deepcopy(model), from_pretrained=tmp_path / "again")
    assert _same_weights(again, weights)


def test_a_meta_model_gets_its_initial_heads_when_materialised(saved):
    """Untrained heads too: after ``to_empty`` the initial thresholds attach warned about, not
    whatever memory ``to_empty`` found."""
    _, _, model = saved
    torch.manual_seed(11)
    with atp.attach(copy.deepcopy(model), layers=[1, 3]) as handle:
        initial = {name: value.clone() for name, value in handle.policy.state_dict().items()}
    meta = _meta_copy(model)
    torch.manual_seed(11)
    handle = atp.attach(meta, layers=[1, 3])
    _materialise(meta, model)
    assert _same_weights(handle, initial)


def test_atp_weights_attached_under_a_meta_device_context_are_loaded(saved):
    """Only the ATP heads would be on the meta device (``atp.attach`` called under
    ``with torch.device("meta")`` on a model with weights): they are built and loaded for real."""
    folder, weights, model = saved
    target = copy.deepcopy(model)
    with torch.device("meta"):
        handle = atp.attach(target, from_pretrained=folder)
    assert not any(param.is_meta for param in handle.parameters())
    assert _same_weights(handle, weights)
    with torch.device("meta"):  # a model built there too: kept until it is materialised
        meta = type(model)(copy.deepcopy(model.config))
        handle = atp.attach(meta, from_pretrained=folder)
    _materialise(meta, model)
    assert _same_weights(handle, weights)


def test_loading_atp_weights_into_heads_on_the_meta_device_is_refused(saved):
    folder, _, model = saved
    handle = atp.attach(_meta_copy(model), layers=[1, 3])
    with pytest.raises(
        ValueError, match=r"the ATP heads are on the meta device .* Materialise the model first"
    ):
        checkpoint.load_weights(handle.policy, folder)
