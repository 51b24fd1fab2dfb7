"""Bad input gets a clear error, and the model is left untouched."""

from __future__ import annotations

import pytest
import torch

import atp
from atp.host import compat
from atp.host.compat import output_cache
from atp.tiny.models import cache_kwargs, llava_prompt

pytestmark = pytest.mark.filterwarnings("ignore:atp.attach")


def untouched(model) -> bool:
    return (
        "atp" not in dict(model.named_children())
        and model.config.text_config._attn_implementation == "sdpa"
        and "generate" not in model.__dict__
        and not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    )


@pytest.mark.parametrize(
    ("layers", "error", "message"),
    [
        ([0, 2], ValueError, "layer 0 cannot be an ATP layer"),
        ([4], ValueError, "out of range: the language model has 4 decoder layers"),
        ([-1], ValueError, "out of range"),
        ([2, 2], ValueError, "duplicates"),
        ([1.5], TypeError, "layers must be ints"),
        ([True], TypeError, "layers must be ints"),
        ("12", TypeError, "layers must be a list of ints"),
        ([], ValueError, "layers is empty"),
    ],
)
def test_bad_layers(model, layers, error, message):
    with pytest.raises(error, match=message):
        atp.attach(model, layers=layers)
    assert untouched(model)


def test_unsupported_model_lists_the_supported_families():
    from transformers import LlamaConfig, LlamaForCausalLM

    text_only = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=64
        )
    )
    with pytest.raises(
        ValueError,
        match=r"unsupported model LlamaForCausalLM .*atp supports: .*llava \(llava\).*qwen2_vl \(qwen2_vl\)",
    ):
        atp.attach(text_only, layers=[1])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        atp.attach("llava-hf/llava-1.5-7b-hf")


def test_unsupported_attention_implementation(model):
    model.set_attn_implementation({"text_config": "eager"})
    with pytest.raises(
        ValueError, match="does not support the 'eager' attention.*attn_implementation='sdpa'"
    ):
        atp.attach(model, layers=[1])
    assert "atp" not in dict(model.named_children())


def test_unknown_policy_and_options(model):
    with pytest.raises(ValueError, match="unknown policy 'fastvv'; registered: .*atp.*keep_all"):
        atp.attach(model, layers=[1], policy="fastvv")
    with pytest.raises(
        ValueError, match="policy 'atp' does not take option.*colour.*its options are: temperature"
    ):
        atp.attach(model, layers=[1], colour="red")
    with pytest.raises(ValueError, match="option keep has 1 entries but there are 2 ATP layers"):
        atp.attach(model, layers=[1, 2], policy="fixed", keep=[4])
    with pytest.raises(
        ValueError, match=r"keep\[0\] must be an int count >= 0 or a float fraction in \(0, 1\]"
    ):
        atp.attach(model, layers=[1], policy="fixed", keep=[1.5])
    with pytest.raises(ValueError, match="prune_mode must be one of"):
        atp.attach(model, layers=[1], prune_mode="prune")
    with pytest.raises(ValueError, match=r"option init_theta_r must be a number in \(0, 1\), got 1.0"):
        atp.attach(model, layers=[1], init_theta_r=1.0)
    assert untouched(model)


def fingerprint(model) -> tuple:
    """Everything attach could change: weights, hooks on every module, attention, attributes."""
    hooks = [
        (name, dict(m._forward_pre_hooks), dict(m._forward_hooks), dict(m._backward_hooks), list(m._modules))
        for name, m in model.named_modules()
    ]
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    attributes = {key: id(value) for key, value in model.__dict__.items()}
    return state, hooks, model.config.text_config._attn_implementation, attributes


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"policy": "fixed", "keep": "0.5"}, TypeError, "policy 'fixed': option keep must be a list"),
        ({"policy": "fixed", "keep": 0.5}, TypeError, r"e.g. keep=\[0.5, 0.5\]"),
        ({"policy": "fixed", "keep": [8, 12]}, ValueError, "counts can only shrink or stay"),
        ({"policy": "random", "keep": [8, 4], "seed": None}, TypeError, "option seed must be an int"),
        ({"policy": "random", "keep": [8, 4], "ratio": "0.5"}, ValueError, "does not take option.*ratio"),
        ({"policy": "pdrop", "ratio": "0.5"}, TypeError, r"give the number itself \(ratio=0.5\)"),
        ({"policy": "spatial", "strides": [2, 3]}, ValueError, "not a multiple of 2"),
        (
            {"policy": "atp", "temperature": float("nan")},
            ValueError,
            "option temperature must be a finite number",
        ),
        ({"policy": "atp", "scorer_options": {"colour": 1}}, ValueError, "RedundancyScorer does not take"),
    ],
)
def test_a_refused_option_leaves_the_model_exactly_as_it_was(model, options, error, message):
    before = fingerprint(model)
    with pytest.raises(error, match=message):
        atp.attach(model, layers=[1, 3], **options)
    after = fingerprint(model)
    assert after[0].keys() == before[0].keys()
    assert all(torch.equal(after[0][name], before[0][name]) for name in before[0])
    assert after[1:] == before[1:] and untouched(model)
    with atp.attach(model, layers=[1, 3], policy="keep_all"):  # the fingerprint sees an attach
        assert fingerprint(model)[1] != before[1] and fingerprint(model)[2:] != before[2:]


def test_attaching_twice(model):
    handle = atp.attach(model, layers=[1])
    with pytest.raises(ValueError, match="already attached.*handle.remove"):
        atp.attach(model, layers=[2])
    handle.remove()
    handle.remove()  # idempotent
    with pytest.raises(ValueError, match="not attached"):
        atp.detach(model)
    assert untouched(model)


def test_generation_modes_not_supported_yet(model, batch):
    with atp.attach(model, layers=[1, 2], policy="fixed", keep=[8, 4]):
        for kwargs, message in [
            ({"num_beams": 2}, "beam search is not supported"),
            ({"use_cache": False}, "needs use_cache=True"),
            ({"cache_implementation": "static"}, "cache_implementation='static' is not supported"),
        ]:
            with pytest.raises(ValueError, match=message):
                model.generate(**batch, max_new_tokens=2, **kwargs)


def test_static_cache_is_refused(model, batch):
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=64)
    with atp.attach(model, layers=[1]), pytest.raises(ValueError, match="DynamicCache only.*StaticCache"):
        model(**batch, **cache_kwargs(model, cache))


def test_inputs_embeds_and_chunked_prefill_are_refused(model, batch):
    with atp.attach(model, layers=[1]):
        embeds = model.get_input_embeddings()(batch["input_ids"])
        with pytest.raises(ValueError, match="needs input_ids"):
            model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
        ids = torch.tensor([llava_prompt(model, [1, 5], [6, 7])])
        with torch.no_grad():
            out = model(input_ids=ids[:, :2], use_cache=True)
        with pytest.raises(ValueError, match="visual inputs arrived after the prefill"):
            model(
                input_ids=ids[:, 2:],
                pixel_values=batch["pixel_values"][:1],
                **cache_kwargs(model, output_cache(out)),
            )


def test_foreign_cache_is_refused(model, batch):
    with torch.no_grad():
        cache = output_cache(model(**batch, use_cache=True))  # built without atp
    with atp.attach(model, layers=[1], policy="fixed", keep=[4]):
        with torch.no_grad():
            model(**batch)  # an atp prefill
        step = {
            "input_ids": torch.tensor([[5], [6]]),
            "attention_mask": torch.cat([batch["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1),
        }
        with pytest.raises(ValueError, match="does not continue the last prefill"):
            model(**step, **cache_kwargs(model, cache))


def test_prompts_without_images_pass_through(model):
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        ref_gen = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    with atp.attach(model, layers=[1, 2], policy="fixed", keep=[4, 2]) as handle:
        with pytest.raises(RuntimeError, match="no forward has run"):
            handle.stats  # noqa: B018
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, ref)
            assert torch.equal(model.generate(input_ids=ids, max_new_tokens=4, do_sample=False), ref_gen)
        assert handle.stats.num_visual.tolist() == [0]
        assert handle.stats.kept.tolist() == [[0, 0]]
        assert handle.stats.avg_tokens == 0.0


def test_untrained_heads_warn(model):
    with pytest.warns(UserWarning, match="threshold heads are untrained"):
        handle = atp.attach(model, layers=[1])
    handle.remove()


def test_compiled_models_are_refused(model, batch):
    model.compile(backend="eager")
    with pytest.raises(ValueError, match="does not support torch.compile"):
        atp.attach(model, layers=[1])
    assert "atp" not in dict(model.named_children())


def test_compiling_after_attach_is_refused_at_the_forward(model, batch):
    with atp.attach(model, layers=[1]):
        model.compile(backend="eager")
        with pytest.raises(RuntimeError, match="does not support torch.compile"):
            model(**batch)


def test_a_cache_from_elsewhere_is_refused_in_mask_mode_too(model, batch):
    with torch.no_grad():
        foreign = output_cache(model(**batch, use_cache=True))  # built without atp
    step = {
        "input_ids": torch.tensor([[5], [6]]),
        "attention_mask": torch.cat([batch["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1),
    }
    with atp.attach(model, layers=[1], policy="fixed", keep=[4], prune_mode="mask"), torch.no_grad():
        own = output_cache(model(**batch, use_cache=True))
        model(**step, **cache_kwargs(model, own))  # the prefill's own cache continues
        with pytest.raises(ValueError, match="does not continue the last prefill"):
            model(**step, **cache_kwargs(model, foreign))


def test_pool_needs_position_ids_when_decoding_by_hand(model, batch):
    step = {
        "input_ids": torch.tensor([[5], [6]]),
        "attention_mask": torch.cat([batch["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1),
    }
    with atp.attach(model, policy="pool"), torch.no_grad():
        cache = output_cache(model(**batch, use_cache=True))
        with pytest.raises(ValueError, match="decode steps need position_ids"):
            model(**step, **cache_kwargs(model, cache))
        length = batch["input_ids"].shape[1]
        positions = (batch["attention_mask"].sum(1, keepdim=True) - 1 + 1).clamp_min(0) * 0 + length
        model(**step, **cache_kwargs(model, cache), position_ids=positions)  # fine with positions


def test_the_runtime_keeps_no_cache_or_pixels_after_a_prefill(model, batch):
    import gc
    import weakref

    with atp.attach(model, layers=[1], policy="fixed", keep=[4]) as handle, torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, return_dict_in_generate=True)
        cache = weakref.ref(output_cache(out))
        assert handle.runtime.prefill.context["inputs"] == {}
        del out
        gc.collect()
        assert cache() is None  # atp holds no strong reference to the KV cache


def test_state_is_not_reused_across_unrelated_calls(model, batch):
    masks = [torch.tensor([[True] * 16, [True] * 4 + [False] * 12])]
    step = {
        "input_ids": torch.tensor([[5], [6]]),
        "attention_mask": torch.cat([batch["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1),
    }
    with atp.attach(model, layers=[2], policy="manual", keep_masks=masks), torch.no_grad():
        cache = output_cache(model(**batch, use_cache=True))
        model(input_ids=torch.tensor([[1, 5, 6]]))  # an image-free forward replaces the state
        with pytest.raises(ValueError, match="pruned by an earlier prefill"):
            model(**step, **cache_kwargs(model, cache))
        model(**batch)
        text = model.model.language_model(input_ids=torch.tensor([[1, 5, 6, 7]]))  # the LM on its own
        assert text.last_hidden_state.shape[1] == 4
        with pytest.raises(ValueError, match="Input image size"):  # fails between the hooks ...
            model(**{**batch, "pixel_values": torch.randn(2, 3, 16, 16)})
        cache = output_cache(model(**batch, use_cache=True))  # ... leaves nothing behind
        model(**step, **cache_kwargs(model, cache))


def test_training_needs_soft_masks_and_non_reentrant_checkpointing(model, batch):
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.train()
    with atp.attach(model, layers=[1], prune_mode="drop"), pytest.warns(UserWarning, match="get no gradient"):
        model(**batch, labels=labels)
    compat.enable_checkpointing(model, use_reentrant=True)
    with atp.attach(model, layers=[1]), pytest.raises(ValueError, match="use_reentrant': False"):
        model(**batch, labels=labels)
    compat.disable_checkpointing(model)
