"""Public API behaviour: policies, registry, several models, mask mode in eval."""

from __future__ import annotations

import pytest
import torch

import atp
from atp.host.compat import output_cache
from atp.tiny.models import tiny_llava

pytestmark = pytest.mark.filterwarnings("ignore:atp.attach")


def test_registry_lists_builtins_with_origin():
    reg = atp.registry()
    assert {"atp", "keep_all", "fixed", "manual"} <= set(reg.names("policy"))
    assert {"llava", "qwen2_vl", "qwen2_5_vl"} <= set(reg.names("backbone"))
    assert reg.get("scorer", "redundancy").origin == "atp"
    for kind in ("threshold_head", "mask_combiner", "position_keeper", "budget_loss"):
        assert reg.names(kind), kind
    with pytest.raises(ValueError, match="unknown scorer 'nope'"):
        reg.get("scorer", "nope")
    assert "llava" in {m["family"] for m in atp.supported_models()}


def test_default_layers_follow_the_paper():
    assert atp.default_layers(32) == [4, 14, 24]
    assert atp.default_layers(4) == [1, 2, 3]
    assert atp.default_layers(2) == [1]


def test_untrained_atp_starts_at_half_thresholds_with_both_branches_deciding(model, batch):
    """Untrained heads give every sample theta_r = theta_s = 0.5 (docs/concepts.md): each branch
    keeps tokens the other does not, so both thresholds can learn from the first step."""
    with pytest.warns(UserWarning, match="the threshold heads are untrained"):
        handle = atp.attach(model, layers=[1, 3])
    with handle:
        with torch.no_grad():
            model(**batch)
        stats = handle.stats
        assert set(stats.thresholds) == {"theta_r", "theta_s"}
        for value in stats.thresholds.values():
            assert torch.equal(value, torch.full((2, 2), 0.5))
        kept = stats.kept[:, 0]
        assert bool((kept > 0).all() and (kept < 16).all())
        reasons = stats.reasons[0]
        only_redundancy = reasons["redundancy"] & ~reasons["spatial"]
        only_spatial = reasons["spatial"] & ~reasons["redundancy"]
        assert bool(only_redundancy.any(dim=1).all() and only_spatial.any(dim=1).all())
        assert sum(p.numel() for p in handle.parameters()) > 0


def test_atp_thresholds_prune_adaptively_per_sample(batch):
    model = tiny_llava(num_layers=4)
    with atp.attach(model, layers=[1, 3], init_theta_r=0.5, init_theta_s=0.2) as handle:
        with torch.no_grad():
            model(**batch)
        stats = handle.stats
    assert (stats.kept[:, 0] < 16).all() and (stats.kept[:, 0] > 0).all()
    assert bool((stats.masks[1] <= stats.masks[0]).all())
    grid = torch.zeros(4, 4, dtype=torch.bool)
    grid[::2, ::2] = True  # the stride-2 grid scores 0.25 > theta_s = 0.2: always kept
    assert stats.masks[1][:, grid.flatten()].all()
    assert not torch.equal(stats.masks[0][0], stats.masks[0][1])  # per-instance decisions
    assert torch.equal(stats.kept, torch.stack([m.sum(1) for m in stats.masks], 1))


def test_fixed_budgets_are_met_exactly(model, batch):
    with atp.attach(model, layers=[1, 2, 3], policy="fixed", keep=[10, 0.5, 2]) as handle:
        with torch.no_grad():
            model(**batch)
        assert handle.stats.kept.tolist() == [[10, 5, 2], [10, 5, 2]]
        assert handle.stats.avg_tokens == (16 + 10 + 5 + 2) / 4  # whole counts / 4: exact in float32


def test_mask_mode_generates_in_eval(model, batch):
    with atp.attach(model, layers=[1, 3], policy="fixed", keep=[8, 4], prune_mode="mask") as handle:
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=4, do_sample=False)
            cache = output_cache(model(**batch))
        assert out.shape[1] == batch["input_ids"].shape[1] + 4
        assert handle.stats.kept.tolist() == [[8, 4], [8, 4]]
        assert {layer.keys.shape[2] for layer in cache.layers} == {batch["input_ids"].shape[1]}


def test_two_attached_models_do_not_interfere(batch):
    first, second = tiny_llava(num_layers=4, seed=0), tiny_llava(num_layers=4, seed=1)
    with torch.no_grad():
        ref_first = first(**batch).logits
    one = atp.attach(first, layers=[1], policy="fixed", keep=[4])
    two = atp.attach(second, layers=[2, 3], policy="fixed", keep=[12, 6])
    with torch.no_grad():
        first(**batch)
        second(**batch)
        first.generate(**batch, max_new_tokens=3)
    assert one.stats.kept.tolist() == [[4], [4]]
    assert two.stats.kept.tolist() == [[12, 6], [12, 6]]
    one.remove()
    with torch.no_grad():
        assert torch.equal(first(**batch).logits, ref_first)
        second(**batch)
    assert two.stats.kept.tolist() == [[12, 6], [12, 6]]
    two.remove()


def test_handle_repr_and_context_manager(model):
    with atp.attach(model, layers=[2], policy="keep_all") as handle:
        assert "llava" in repr(handle) and "attached" in repr(handle)
    assert handle.removed and "removed" in repr(handle)


class FakeEntryPoint:
    """An ``atp`` entry point whose ``load`` returns ``plugin`` (or raises ``error``)."""

    group = "atp"

    def __init__(self, name, plugin=None, error=None):
        self.name, self.value, self.plugin, self.error, self.dist = (
            name,
            f"{name}:plugin",
            plugin,
            error,
            None,
        )

    def load(self):
        if self.error is not None:
            raise self.error
        return self.plugin


def plugin(**hooks):
    """A plugin object whose attributes are hook implementations."""
    from atp.hookspecs import hookimpl

    return type("Plugin", (), {name: staticmethod(hookimpl(function)) for name, function in hooks.items()})()


def registry_with(monkeypatch, *entry_points, strict=False):
    from atp import plugins

    monkeypatch.setattr(plugins, "entry_points", lambda group: list(entry_points))
    if strict:
        monkeypatch.setenv(plugins.STRICT_ENV, "1")
    else:
        monkeypatch.delenv(plugins.STRICT_ENV, raising=False)
    return plugins.build_registry(plugins.plugin_manager())


def test_a_broken_plugin_warns_and_the_rest_keeps_working(monkeypatch):
    broken = FakeEntryPoint("broken", error=ImportError("No module named 'broken_plugin'"))
    with pytest.warns(RuntimeWarning, match="plugin 'broken'.*failed to load.*ATP_STRICT_PLUGINS=1"):
        reg = registry_with(monkeypatch, broken)
    assert "atp" in reg.names("policy")
    with pytest.raises(ImportError, match="broken_plugin"):
        registry_with(monkeypatch, broken, strict=True)


def test_misspelt_hook_names_are_caught(monkeypatch):
    typo = FakeEntryPoint("typo", plugin(atp_register_scorer=lambda register: register("x", object)))
    with pytest.warns(RuntimeWarning, match=r"unknown hook\(s\) \['atp_register_scorer'\]"):
        reg = registry_with(monkeypatch, typo)
    assert "x" not in reg.names("scorer")
    import pluggy

    with pytest.raises(pluggy.PluginValidationError, match="atp_register_scorers"):
        registry_with(monkeypatch, typo, strict=True)


def test_a_plugin_that_fails_while_registering_is_skipped(monkeypatch):
    def explode(register):
        register("fine", object)
        raise RuntimeError("boom")

    bad = FakeEntryPoint("bad", plugin(atp_register_policies=explode))
    with pytest.warns(RuntimeWarning, match="failed in atp_register_policies"):
        reg = registry_with(monkeypatch, bad)
    assert "fine" not in reg.names("policy")  # nothing half-registered


def test_plugins_add_components_resolve_backbones_and_observe(monkeypatch, batch):
    from atp.policies.keep_all import KeepAllPolicy

    class EveryOther(KeepAllPolicy):
        def decide(self, inputs):
            decision = super().decide(inputs)
            decision.mask[:, 1::2] = 0.0
            return decision

    events = []
    extra = FakeEntryPoint(
        "extra",
        plugin(
            atp_register_policies=lambda register: register("every_other", EveryOther),
            atp_resolve_backbone=lambda model: "llava" if hasattr(model, "marked_for_llava") else None,
            atp_observe=lambda event: events.append(event),
        ),
    )
    reg = registry_with(monkeypatch, extra)
    import sys

    monkeypatch.setattr(sys.modules["atp.host.attach"], "registry", lambda: reg)
    assert reg.get("policy", "every_other").origin == "extra"
    model = tiny_llava(num_layers=4)
    model.config.model_type = "something_else"  # only the resolve hook can claim it now
    with pytest.raises(ValueError, match="unsupported model"):
        atp.attach(model, layers=[1])
    model.marked_for_llava = True
    with atp.attach(model, layers=[1, 3], policy="every_other", observe=True) as handle:
        with torch.no_grad():
            model(**batch)
        assert handle.stats.kept.tolist() == [[8, 8], [8, 8]]
    assert [event["layer"] for event in events] == [1, 3]
    assert events[0]["keep"].shape == (2, 16) and events[0]["model"] is model


def test_llava_15_7b_shapes_attach_without_weights():
    """The published LLaVA-1.5-7B config on the meta device: paper defaults, 2 x 576 head input."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
        ),
        text_config=LlamaConfig(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32064,
        ),
        image_token_index=32000,
        image_seq_length=576,
        vision_feature_layer=-2,
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    with atp.attach(model) as handle:
        assert handle.layers == (4, 14, 24)
        assert handle.policy.heads[0].proj.in_features == 2 * 576
        assert handle.policy.heads[0].proj.weight.device.type == "meta"


def test_budget_losses_are_selected_by_name(monkeypatch, batch):
    from atp.components.budget_loss import PaperBudgetLoss

    class Doubled(PaperBudgetLoss):
        def __call__(self, *args, **kwargs):
            return {name: 2 * value for name, value in super().__call__(*args, **kwargs).items()}

    extra = FakeEntryPoint(
        "losses", plugin(atp_register_budget_losses=lambda register: register("doubled", Doubled))
    )
    reg = registry_with(monkeypatch, extra)
    import sys

    monkeypatch.setattr(sys.modules["atp.host.attach"], "registry", lambda: reg)
    model = tiny_llava(num_layers=4)
    losses = {}
    for name in ("paper", "doubled"):
        with atp.attach(model, layers=[1, 3], budget_loss=name, target_tokens=4.0) as handle, torch.no_grad():
            model(**batch)
            losses[name] = handle.stats.losses
    assert torch.equal(losses["doubled"]["atp"], 2 * losses["paper"]["atp"])
    with pytest.raises(ValueError, match="unknown budget_loss 'nope'"):
        atp.attach(model, layers=[1], budget_loss="nope")
    assert "atp" not in dict(model.named_children())
