"""Qwen3.5's own paths: linear-attention (Gated-DeltaNet) layers after an ATP layer, decoding from
their pruned state, the ATP layers that work, and what mask mode does on linear layers. (The
invariant suite covers the rest for the dense and MoE variants, tests/families.py.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import atp
from atp.core.efficiency import layer_flops, report_from_stats, shape_from_config
from atp.host import compat
from atp.host.compat import output_cache
from atp.tiny.models import qwen_batch, tiny_qwen3_5
from tests.numerics import REORDERED

pytestmark = pytest.mark.filterwarnings("ignore:atp.attach")

SAMPLES = [
    [[1, 5], ("image", 8, 8), [6, 7], ("image", 4, 8), [8, 9, 10]],  # 16 + 8 visual tokens
    [[1], ("image", 4, 16), [4, 5, 6, 7, 8, 9]],  # 16 in one image: a shorter prompt (left padding)
]
NEW_TOKENS = 5


@pytest.fixture(scope="module")
def model():
    """The released layer pattern: linear, linear, linear, full, twice (ATP layer 4 scores from 3)."""
    return tiny_qwen3_5(8, 0, layer_types="released")


@pytest.fixture(scope="module")
def moe_model():
    return tiny_qwen3_5(8, 0, layer_types="released", moe=True)


def kept_tail_reference(model, sample: list, seed: int, tokens: torch.Tensor, atp_layer: int, keep):
    """Logits (T, V) after the prompt's last token and each of ``tokens[:-1]`` (T new tokens), by hand:
    the unattached model's layers before ``atp_layer`` on every token, then the layers from it on
    over the kept tokens only (text, kept visual ones, the new tokens; in order, at their original
    rotary positions) in one causal pass without a cache, then the final norm and the head.

    What atp must compute: a layer after the ATP layer never sees a pruned token, and each decode
    step continues the kept tokens' cache and recurrent state (the pass here has no cache at all)."""
    inputs = qwen_batch([sample], [seed], frame_blocks=True)
    new = tokens[None, :-1]
    full = {
        **inputs,
        "input_ids": torch.cat([inputs["input_ids"], new], dim=1),
        "attention_mask": torch.ones(1, inputs["input_ids"].shape[1] + new.shape[1], dtype=torch.long),
        "mm_token_type_ids": torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, new.shape[1])),
    }
    language = model.model.language_model
    seen = {}

    def capture(module, args, kwargs):
        seen["hidden"], seen["rotary"] = (
            args[0] if args else kwargs["hidden_states"],
            kwargs["position_embeddings"],
        )

    hook = language.layers[atp_layer].register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        model(**full)
    hook.remove()
    visual = (full["input_ids"][0] == 151) | (full["input_ids"][0] == 152)
    kept = ~visual
    kept[visual.nonzero().flatten()[keep[: int(visual.sum())]]] = True
    index = kept.nonzero().flatten()
    hidden = seen["hidden"][:, index]
    rotary = tuple(x[:, index] for x in seen["rotary"])
    with torch.no_grad():
        for layer in language.layers[atp_layer:]:
            hidden = layer(hidden, position_embeddings=rotary, attention_mask=None)  # causal, no padding
        logits = model.lm_head(language.norm(hidden))
    return logits[0, -len(tokens) :]


def greedy(model, inputs):
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    return out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.scores, dim=1)


@pytest.mark.parametrize("variant", ["dense", "moe"])
@pytest.mark.parametrize("mode", ["drop", "mask"])
def test_decode_after_pruning_continues_the_linear_layers_state_of_the_kept_tokens(request, variant, mode):
    """A batch of two prompts (left padding; different kept counts: drop mode's filler slots) pruned
    at layer 4 by a scoring policy: every greedy step's logits equal the hand-computed pass of the
    kept tokens through layers 4-7 (three linear layers, then a full one). A linear layer that took in
    a pruned token, a zeroed filler between real ones, or a decode step that did not continue the
    kept tokens' state would move the logits by far more than rounding (tests/numerics.py; the MoE
    variant's routed experts are a reordering too)."""
    model = request.getfixturevalue("model" if variant == "dense" else "moe_model")
    batch = qwen_batch(SAMPLES, frame_blocks=True)
    with atp.attach(model, layers=[4], policy="fixed", keep=[0.4], prune_mode=mode) as handle:
        tokens, scores = greedy(model, batch)
        masks = handle.stats.masks[0]
    counts = [int(m.sum()) for m in masks]
    assert counts[0] != counts[1] and min(counts) > 0  # pruned, by different amounts
    for b, sample in enumerate(SAMPLES):
        steps = int((tokens[b] != 2).cumprod(0).sum())  # up to its end-of-sequence token
        steps = min(steps + 1, NEW_TOKENS)
        reference = kept_tail_reference(model, sample, b, tokens[b, :steps], 4, masks[b])
        torch.testing.assert_close(scores[b, :steps], reference, **REORDERED)


def test_a_scoring_policy_needs_a_full_attention_layer_before_its_atp_layer(model):
    with pytest.raises(ValueError, match=r"ATP layer\(s\) \[6\] follow .* linear-attention .* \(4\)"):
        atp.attach(model, layers=[6])  # layer 5 is a linear one: no queries and keys to score with
    with pytest.raises(ValueError, match=r"ATP layer\(s\) \[5, 7\] follow"):
        atp.attach(model, layers=[4, 5, 7], policy="fixed", keep=[8, 6, 4])
    with atp.attach(
        model, layers=[4, 6], policy="manual", keep_masks=[torch.ones(1, 24, dtype=torch.bool)] * 2
    ):
        pass  # fixed masks read no attention: any layer after the first full one


def test_default_layers_move_to_layers_a_scoring_policy_can_use(model):
    """attach without layers: the paper's layers (scaled to the depth) moved to the nearest layer
    right after a full-attention one, so a plain attach works on the released pattern."""
    with atp.attach(model) as handle:  # 8 layers: the paper's [1, 4, 6] -> 4 (after full layer 3)
        assert handle.layers == (4,)
    deep = tiny_qwen3_5(32, 0, layer_types="released")
    with atp.attach(deep) as handle:  # [4, 14, 24] -> 4, 12 (a tie between 12 and 16: the earlier), 24
        assert handle.layers == (4, 12, 24)


def test_atp_layers_come_after_the_first_full_attention_layer(model):
    """Transformers counts the cache by the first full-attention layer (layer 3): it must hold every token."""
    for layers in ([2], [3], [3, 5]):
        with pytest.raises(ValueError, match=r"at or before layer 3, the first full-attention layer"):
            atp.attach(
                model,
                layers=layers,
                policy="manual",
                keep_masks=[torch.ones(1, 24, dtype=torch.bool)] * len(layers),
            )


def test_mask_mode_runs_linear_layers_on_the_kept_tokens_with_their_soft_weights(model):
    """Mask mode keeps every token in the full-attention layers (a log bias) but a linear layer sees
    the kept tokens only: with binary masks what drop mode sees; in training (soft masks) each kept
    token's input is multiplied by its keep weight, so the threshold heads get gradients there too."""
    batch = qwen_batch(SAMPLES, frame_blocks=True)
    language = model.model.language_model
    seen = {}

    def spy(i):
        def hook(module, args, kwargs):
            seen[i] = (kwargs["hidden_states"].shape[1], kwargs.get("attention_mask"))

        return hook

    hooks = [
        language.layers[i].linear_attn.register_forward_pre_hook(spy(i), with_kwargs=True) for i in (4, 5, 6)
    ]
    length = batch["input_ids"].shape[1]
    try:
        with atp.attach(model, layers=[4], policy="fixed", keep=[0.4], prune_mode="mask") as handle:
            with torch.no_grad():
                model(**batch)
            kept = handle.stats.kept[:, 0]
        widest = int(length - (handle.stats.num_visual - kept).min())
        assert {i: seen[i][0] for i in (4, 5, 6)} == {4: widest, 5: widest, 6: widest}
        model.train()
        with atp.attach(model, layers=[4], init_theta_r=0.45, temperature=20.0) as handle:
            out = model(**batch)
            weights = seen[4][1]
            out.logits.float().square().mean().backward()
            grads = [p.grad for p in handle.parameters() if p.grad is not None]
        assert weights.requires_grad and bool(((weights > 0.5) & (weights < 1)).any())  # soft, kept
        assert grads and all(torch.isfinite(g).all() for g in grads)
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)
        for hook in hooks:
            hook.remove()


def test_the_efficiency_report_counts_keys_of_full_layers_and_a_fixed_state_for_linear_ones(model):
    """KV bytes: only the full-attention layers (3: every token, 7: the kept ones) hold keys; the
    linear layers' conv windows and recurrent states have the size the report gives, pruned or not.
    FLOPs: a full-attention layer (its query projection also makes the output gate) counts what
    torch's counter measures on it."""
    inputs = qwen_batch(SAMPLES[:1], frame_blocks=True)
    keep = torch.arange(24)[None] % 3 != 0  # 16 of 24 kept
    with atp.attach(model, layers=[4], policy="manual", keep_masks=[keep]) as handle, torch.no_grad():
        out = model(**inputs, use_cache=True)
        stats = handle.stats
    length = inputs["input_ids"].shape[1]
    found = report_from_stats(stats, model, text_tokens=length - 24, kv_bytes_per_element=4)
    cache = output_cache(out)
    assert atp.kv_cache_bytes(cache) == found.kv_cache_bytes == (length + length - 8) * 2 * 2 * 32 * 4
    states = [layer for layer in cache.layers if hasattr(layer, "recurrent_states")]
    held = sum(
        t.numel() * t.element_size()
        for layer in states
        for t in (*layer.conv_states.values(), *layer.recurrent_states.values())
        if t is not None
    )
    assert len(states) == 6 and held == found.state_bytes
    language, seen = model.model.language_model, {}

    def capture(module, args, kwargs):
        seen["hidden"], seen["rotary"] = args[0], kwargs["position_embeddings"]

    hook = language.layers[3].register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    counter = compat.flop_counter(display=False)
    with counter, torch.no_grad():
        language.layers[3](seen["hidden"], position_embeddings=seen["rotary"], attention_mask=None)
    shape = shape_from_config(model.config)
    assert shape.output_gate and shape.linear.layers == (0, 1, 2, 4, 5, 6)
    assert counter.get_total_flops() == layer_flops(length, shape, "2flops-per-mac", 3)
    ungated = dataclasses.replace(shape, output_gate=False)  # negative control: the gate's width counts
    assert counter.get_total_flops() != layer_flops(length, ungated, "2flops-per-mac", 3)


def test_the_moe_variant_counts_its_active_experts():
    """Qwen3.5-MoE's config has no dense FFN width: the report's FFN is the experts a token runs
    (2 of 32 wide) plus the shared one (32 wide)."""
    shape = shape_from_config(tiny_qwen3_5(6, 0, moe=True).config)
    assert shape.intermediate == 2 * 32 + 32 and shape.linear.layers == (3, 4) and shape.output_gate
