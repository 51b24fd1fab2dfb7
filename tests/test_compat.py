"""The seam to transformers: the cache is found by type, and what atp cannot find is an error.

A release that renames or hides what atp reads must fail loudly, never prune (or count) nothing.
The suite runs at both ends of the supported range, so these tests see the cache under both of
its names (``past_key_values`` up to 5.23, ``cache`` from 5.24).
"""

from __future__ import annotations

import re

import pytest
import torch
from transformers.cache_utils import DynamicCache

import atp
from atp.host import compat
from atp.host.compat import output_cache
from atp.tiny.models import cache_kwargs, llava_batch, tiny_llava

pytestmark = pytest.mark.filterwarnings("ignore:atp.attach")

RANGE = re.escape(f">={compat.TRANSFORMERS_RANGE[0]},<{compat.TRANSFORMERS_RANGE[1]}")


@pytest.fixture
def model():
    return tiny_llava(num_layers=4)


@pytest.fixture
def batch(model):
    return llava_batch(model, [([1, 5], [7, 8, 9], 1), ([1, 5, 6, 4], [7, 8], 1)])


def step_after(batch, token=5):
    """A decode step continuing ``batch``: one new token per sample, the mask one longer."""
    ones = torch.ones(batch["input_ids"].shape[0], 1, dtype=torch.long)
    return {"input_ids": ones * token, "attention_mask": torch.cat([batch["attention_mask"], ones], 1)}


def test_the_cache_is_found_by_type_under_any_name():
    cache = DynamicCache()
    assert compat.find_cache((), {"past_key_values": cache}) is cache
    assert compat.find_cache((), {"cache": cache, "use_cache": True}) is cache
    assert compat.find_cache((), {"kv_state_of_a_future_release": cache}) is cache
    assert compat.find_cache((torch.zeros(1), cache), {}) is cache
    assert compat.find_cache((), {"cache": None, "attention_mask": torch.ones(1, 2)}) is None
    with pytest.raises(compat.CompatibilityError, match="2 different KV caches"):
        compat.find_cache((), {"cache": cache, "past_key_values": DynamicCache()})


def test_a_rotary_layout_atp_does_not_know_is_an_error():
    assert compat.rotary_seq_dim(torch.zeros(2, 7, 16), 1) == 1
    with pytest.raises(compat.CompatibilityError, match=r"rotary embedding has shape \(3, 2, 7, 16\)"):
        compat.rotary_seq_dim(torch.zeros(3, 2, 7, 16), 1)  # Qwen2-VL's M-RoPE up to transformers 5.15


def test_the_installed_release_is_in_the_declared_range():
    versions = compat.versions()
    assert compat.tested() == {"torch": True, "transformers": True}, versions
    assert versions["transformers"] in compat.version_note()
    assert not compat._in("5.26.0", compat.TRANSFORMERS_RANGE)
    assert not compat._in("5.17.0", compat.TRANSFORMERS_RANGE)
    assert compat._in("5.25.1", compat.TRANSFORMERS_RANGE)
    assert compat._in("2.15.0+cu130", compat.TORCH_RANGE) and not compat._in("2.16.0", compat.TORCH_RANGE)
    assert compat._in("5.18.0.dev0", compat.TRANSFORMERS_RANGE)


def test_output_cache_and_cache_argument_match_the_installed_release(model, batch):
    name = compat.cache_argument(model)
    assert name in compat.CACHE_ARGUMENTS
    with atp.attach(model, layers=[1, 3], policy="fixed", keep=[8, 4]), torch.no_grad():
        out = model(**batch, use_cache=True)
        cache = output_cache(out)
        assert isinstance(cache, DynamicCache)
        assert [compat.cache_length(cache, layer) for layer in range(4)] == [
            batch["input_ids"].shape[1] - 16 + kept for kept in (16, 8, 8, 4)
        ]
        model(**step_after(batch), **{name: cache})  # a decode step under the release's own name
        assert compat.cache_length(cache, 3) == batch["input_ids"].shape[1] - 16 + 4 + 1


def test_generate_without_a_visible_cache_is_an_error_not_zeros(model, batch, monkeypatch):
    """Simulates a release that renames the cache into something atp cannot recognise."""
    with atp.attach(model, layers=[1, 3], policy="fixed", keep=[8, 4]) as handle:
        monkeypatch.setattr(compat, "find_cache", lambda args, kwargs: None)
        with pytest.raises(compat.CompatibilityError, match=rf"found no KV cache.*transformers .*{RANGE}"):
            model.generate(**batch, max_new_tokens=3, do_sample=False)
        monkeypatch.undo()
        model.generate(**batch, max_new_tokens=3, do_sample=False)  # the same call works again
        assert handle.stats.kept.tolist() == [[8, 4], [8, 4]]


def test_a_continuation_without_a_visible_cache_is_an_error(model, batch, monkeypatch):
    with atp.attach(model, layers=[1, 3], policy="fixed", keep=[8, 4]), torch.no_grad():
        cache = output_cache(model(**batch, use_cache=True))
        monkeypatch.setattr(compat, "find_cache", lambda args, kwargs: None)
        with pytest.raises(compat.CompatibilityError, match="continues earlier tokens.*no KV cache"):
            model(**step_after(batch), **cache_kwargs(model, cache))


@pytest.mark.parametrize("images", [False, True])
def test_a_prefill_on_a_cache_that_holds_tokens_is_an_error(model, batch, monkeypatch, images):
    """The multimodal model does not see the cache (a rename), its layers do: not a new prefill."""
    with atp.attach(model, layers=[1, 3], policy="fixed", keep=[8, 4]), torch.no_grad():
        cache = output_cache(model(**batch, use_cache=True))
        found = compat.find_cache  # hidden where the multimodal model is called (input_ids), seen by layers
        monkeypatch.setattr(
            compat, "find_cache", lambda args, kwargs: None if "input_ids" in kwargs else found(args, kwargs)
        )
        step = {"input_ids": torch.tensor([[5], [6]])}  # no mask: nothing else tells it continues
        if images:  # looks like a new multimodal prompt
            step = {"input_ids": batch["input_ids"], "pixel_values": batch["pixel_values"]}
        message = (
            "took this forward for a prefill.*already holds" if images else "continues a KV cache atp pruned"
        )
        with pytest.raises(compat.CompatibilityError, match=message):
            model(**step, **cache_kwargs(model, cache))


def test_a_decode_step_on_a_cache_atp_did_not_prune_is_an_error(model, batch):
    """Layer 2 lies inside the first pruned segment; its cache is given back its pruned tokens."""
    with atp.attach(model, layers=[1, 3], policy="fixed", keep=[8, 4]), torch.no_grad():
        cache = output_cache(model(**batch, use_cache=True))
        layer = cache.layers[2]
        layer.keys = torch.cat([layer.keys, layer.keys[:, :, :8]], dim=2)
        layer.values = torch.cat([layer.values, layer.values[:, :, :8]], dim=2)
        with pytest.raises(compat.CompatibilityError, match="layer 2's KV cache holds .* decode mask"):
            model(**step_after(batch), **cache_kwargs(model, cache))


def test_the_flop_counter_counts_attention_whichever_sdpa_kernel_runs():
    """torch counts CPU flash attention as 0 FLOPs; the seam's counter gives it the SDPA formula,
    so the math and the flash kernel count the same, and the count includes attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    query, key, value = (torch.randn(1, 4, 16, 8) for _ in range(3))
    counts = {}
    for backend in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION):
        counter = compat.flop_counter(display=False)
        with sdpa_kernel(backend), counter:
            torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True)
        counts[backend] = counter.get_total_flops()
    assert counts[SDPBackend.MATH] == counts[SDPBackend.FLASH_ATTENTION] == 2 * 2 * 4 * 16 * 16 * 8


def test_pyproject_compat_and_the_oldest_ci_pins_declare_the_same_range():
    from pathlib import Path

    from packaging.requirements import Requirement
    from packaging.version import Version

    root = Path(__file__).resolve().parents[1]
    declared = {}
    for line in re.findall(
        r'^\s*"((?:torch|transformers)[^"]*)"', (root / "pyproject.toml").read_text(), re.M
    ):
        requirement = Requirement(line)
        declared[requirement.name] = {spec.operator: Version(spec.version) for spec in requirement.specifier}
    oldest = dict(
        line.split("==") for line in (root / ".ci" / "oldest.txt").read_text().split() if "==" in line
    )
    newest = dict(
        line.split("==") for line in (root / ".ci" / "newest.txt").read_text().split() if "==" in line
    )
    for name, (low, high) in {"torch": compat.TORCH_RANGE, "transformers": compat.TRANSFORMERS_RANGE}.items():
        assert declared[name] == {">=": Version(low), "<": Version(high)}
        assert oldest[name] == low
        # the newest pins are in the range's last minor: the release CI's newest stage must reach
        assert compat._in(newest[name], (low, high)) and Version(newest[name]).release[:2] == (
            Version(high).release[0],
            Version(high).release[1] - 1,
        )


def test_a_trainer_without_the_methods_atp_trainer_overrides_is_refused():
    from transformers import Trainer

    compat.check_trainer(Trainer)  # the installed release has them all

    class Renamed(Trainer):
        _save = None  # as if a release renamed it: AtpTrainer would never save the ATP weights

    with pytest.raises(compat.CompatibilityError, match="Trainer has no _save"):
        compat.check_trainer(Renamed)
