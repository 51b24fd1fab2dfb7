"""What atp reads is what transformers resolves, and state is checked where it is used.

Each test draws the members of a class of paths off the tested ones: every cache implementation
a generation config can name, every family's settings changed after ``attach``, every per-call
output option, hub kernels swapped in before or after ``attach``. The verdict is compared with
what transformers really does, not with a list atp keeps.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers.cache_utils import DynamicCache
from transformers.generation.configuration_utils import ALL_CACHE_IMPLEMENTATIONS

import atp
from atp.host import compat
from atp.host.compat import output_cache
from atp.tiny.models import llava_batch, tiny_llava
from tests.families import FAMILIES, visual_mask

pytestmark = pytest.mark.filterwarnings("ignore:atp.attach")
BY_NAME = {family.key: family for family in FAMILIES}


# the tested range -------------------------------------------------------------------------
def test_attach_warns_in_one_line_when_a_release_is_outside_the_tested_range(monkeypatch):
    model = tiny_llava(num_layers=4)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        atp.attach(model, layers=[2]).remove()
    assert not [w for w in seen if issubclass(w.category, compat.UntestedVersionWarning)]
    inside = compat.versions()
    for name, version in (("transformers", "5.99.0"), ("torch", "2.99.0"), ("transformers", "5.17.0")):
        monkeypatch.setattr(compat, "versions", lambda name=name, version=version: {**inside, name: version})
        with pytest.warns(compat.UntestedVersionWarning) as caught:
            handle = atp.attach(model, layers=[2])
        handle.remove()
        (message,) = [str(w.message) for w in caught if issubclass(w.category, compat.UntestedVersionWarning)]
        assert f"{name} {version} (tested >=" in message and "\n" not in message
        assert caught[0].filename == __file__  # points at the caller's attach


# what generate resolves ------------------------------------------------------------------
def plain_generate_cache(model, batch, **settings) -> type | Exception:
    """The cache generate builds without atp for these settings (or the error it raises)."""
    try:
        out = model.generate(
            **batch, max_new_tokens=2, do_sample=False, return_dict_in_generate=True, **settings
        )
    except Exception as error:  # a setting this machine cannot run (an offloaded cache on a CPU, ...)
        return error
    return type(output_cache(out))


@pytest.mark.parametrize("family_name", ["llava", "gemma3"])
@pytest.mark.parametrize("where", ["checkpoint", "call"])
@pytest.mark.parametrize("implementation", [None, *ALL_CACHE_IMPLEMENTATIONS])
def test_generate_is_refused_exactly_when_transformers_builds_a_cache_atp_cannot_follow(
    family_name, where, implementation
):
    """A checkpoint's generation_config.json (Gemma 3's says ``hybrid``, which transformers runs
    with the default dynamic cache) or a keyword: atp follows generate's own resolution."""
    family = BY_NAME[family_name]
    model = family.model()
    batch = family.batch(model)
    settings = {}
    if where == "checkpoint":
        model.generation_config.cache_implementation = implementation
    else:
        settings["cache_implementation"] = implementation
    built = plain_generate_cache(model, batch, **settings)
    handle = atp.attach(model, layers=[2], policy="fixed", keep=[4])
    if built is DynamicCache:
        out = model.generate(**batch, max_new_tokens=2, do_sample=False, **settings)
        assert out.shape[1] == batch["input_ids"].shape[1] + 2
    else:
        with pytest.raises(ValueError, match="use the default dynamic cache"):
            model.generate(**batch, max_new_tokens=2, do_sample=False, **settings)
    handle.remove()


@pytest.mark.parametrize(
    ("checkpoint", "call", "runs"),
    [
        ({"num_beams": 2}, {}, False),  # a checkpoint default is what generate uses
        ({"num_beams": 2}, {"num_beams": 1}, True),  # a keyword overrides it
        ({}, {"generation_config": {"num_beams": 2}}, False),  # a GenerationConfig given as a dict
        ({"use_cache": False}, {"use_cache": True}, True),
        ({}, {"use_cache": False}, False),
        ({"do_sample": True, "top_k": 3}, {}, True),
    ],
)
def test_generate_settings_are_read_with_transformers_priorities(checkpoint, call, runs):
    from transformers import GenerationConfig

    model = tiny_llava(num_layers=4)
    batch = llava_batch(model, [([1, 5], [7, 8, 9], 1)])
    for name, value in checkpoint.items():
        setattr(model.generation_config, name, value)
    if "generation_config" in call:
        call = {"generation_config": GenerationConfig(**call["generation_config"])}
    handle = atp.attach(model, layers=[2], policy="fixed", keep=[4])
    if runs:
        model.generate(**batch, max_new_tokens=2, **call)
    else:
        with pytest.raises(ValueError, match="not supported with atp|atp needs use_cache=True"):
            model.generate(**batch, max_new_tokens=2, **call)
    handle.remove()


# settings changed after attach ------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family.key)
def test_an_attention_implementation_set_after_attach_is_refused_at_the_next_forward(family):
    model = family.model()
    batch = family.batch(model)
    handle = atp.attach(model, layers=[2], policy="fixed", keep=[4])
    model.set_attn_implementation("eager")
    with pytest.raises(ValueError, match="set after atp.attach.*attach again"), torch.no_grad():
        model(**batch)
    handle.remove()


# config variants each family's adapter refuses at attach: (attribute path, value)
REFUSED_VARIANTS = [
    ("llava_next", "vision_feature_select_strategy", "full"),
    ("gemma3", "mm_tokens_per_image", 15),
    ("internvl", "image_seq_length", 15),
    ("qwen3_vl_moe", "text_config.output_router_logits", True),
]


def set_path(config, path: str, value) -> None:
    *parents, name = path.split(".")
    for parent in parents:
        config = getattr(config, parent)
    setattr(config, name, value)


@pytest.mark.parametrize(("family_name", "path", "value"), REFUSED_VARIANTS)
def test_a_config_changed_after_attach_is_refused_as_attach_refuses_it(family_name, path, value):
    family = BY_NAME[family_name]
    refused = family.model()
    set_path(refused.config, path, value)
    with pytest.raises(ValueError) as at_attach:
        atp.attach(refused, layers=[2])
    model = family.model()
    batch = family.batch(model)
    handle = atp.attach(model, layers=[2], policy="fixed", keep=[4])
    set_path(model.config, path, value)
    with pytest.raises(ValueError) as at_forward, torch.no_grad():
        model(**batch)
    assert str(at_forward.value) == str(at_attach.value)
    handle.remove()


OUTPUT_OPTIONS = [
    {"output_attentions": True},
    {"output_hidden_states": True},
    {"output_router_logits": True},
    {"return_dict": False},
    {"use_cache": False},
]


@pytest.mark.parametrize(
    ("family", "options"),
    [
        (family, options)
        for family in FAMILIES
        for options in OUTPUT_OPTIONS
        if family.routed or "output_router_logits" not in options  # routers: mixture-of-experts only
    ],
    ids=lambda value: value.name if hasattr(value, "name") else "-".join(value),
)
def test_per_call_output_options_run_drop_equal_to_mask_or_are_refused_clearly(family, options):
    """Never a KeyError, an IndexError or a shape mismatch from deep inside: either the option
    works (drop and mask give the same logits) or atp refuses it with a ValueError."""
    model = family.model()
    batch = family.batch(model)
    with torch.no_grad():
        model(**batch, **options)  # the model itself takes the option
    logits = {}
    for mode in ("drop", "mask"):
        handle = atp.attach(model, layers=[2], policy="fixed", keep=[4], prune_mode=mode)
        try:
            with torch.no_grad():
                out = model(**batch, **options)
        except ValueError as error:
            assert "atp" in str(error)
            logits[mode] = None
        else:
            logits[mode] = out[0] if isinstance(out, tuple) else out.logits
        finally:
            handle.remove()
    assert (logits["drop"] is None) == (logits["mask"] is None)
    if logits["drop"] is not None:
        text = batch["attention_mask"].bool() & ~visual_mask(model, batch)  # pruned tokens differ by design
        # the invariant suite's drop == mask bound (tests/test_invariants.py)
        torch.testing.assert_close(logits["drop"][text], logits["mask"][text], rtol=1e-4, atol=1e-4)
