"""What the docs say is refused is refused, and every message says what to do instead.

docs/concepts.md's table "What is refused, and why" and the message tables of
docs/troubleshooting.md are parsed. Each item of a row (the refused things of a concepts row,
split at the commas outside parentheses and backticks; the quoted messages of a troubleshooting
row) runs the scenario registered for it below: a tiny model in the documented situation. The
scenario checks that atp raises and that the message says what to do; a troubleshooting message
must also contain what the page quotes (``...`` stands for any text, ``N`` and numbers for any
number). An item without a scenario fails, and so does a scenario whose item is gone: a new row
needs a test.

A scenario is found by its key: the longest key that is part of the item's text.
"""

from __future__ import annotations

import functools
import pickle
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import atp
from atp.host import compat
from atp.host.compat import output_cache
from atp.tiny.models import (
    cache_kwargs,
    llava_batch,
    llava_prompt,
    tiny_gemma3,
    tiny_llava,
    tiny_llava_next,
    tiny_mistral3,
    tiny_qwen2_vl,
)

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.filterwarnings("ignore:atp.attach")


# the pages ---------------------------------------------------------------------------------
def split_outside(text: str, separator: str) -> list[str]:
    """``text`` split at ``separator`` where it is outside parentheses and backticks."""
    parts, current, depth, quoted = [], "", 0, False
    for char in text:
        if char == "`":
            quoted = not quoted
        elif not quoted and char in "()":
            depth += 1 if char == "(" else -1
        if char == separator and depth == 0 and not quoted:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return [*parts, current.strip()]


def tables(page: str) -> list[list[list[str]]]:
    """Every table of a docs page: its rows (the header first), each a list of cells."""
    found, rows = [], []
    for line in [*(ROOT / "docs" / page).read_text().splitlines(), ""]:
        if line.startswith("|"):
            if not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", line):  # not the separator line
                rows.append(split_outside(line.strip()[1:-1], "|"))
        elif rows:
            found.append(rows)
            rows = []
    return found


def refused_items() -> list[str]:
    """The refused things of docs/concepts.md's "What is refused, and why", one per item."""
    found = [table for table in tables("concepts.md") if table[0] == ["refused", "why"]]
    assert len(found) == 1, "docs/concepts.md should have one table headed | refused | why |"
    items = [item for row in found[0][1:] for item in split_outside(row[0], ",")]
    return [re.sub(r"^(and|or) ", "", item) for item in items]


def troubleshooting_rows() -> list[str]:
    """The first cells of docs/troubleshooting.md's message tables."""
    return [
        row[0]
        for table in tables("troubleshooting.md")
        if table[0][0] == "message (start)"
        for row in table[1:]
    ]


def quoted_messages() -> list[str]:
    """The messages docs/troubleshooting.md quotes, one per item (a row may quote several; a
    remark in parentheses, such as "(a warning)", is not a message)."""
    found = []
    for cell in troubleshooting_rows():
        outside, depth, quoted = "", 0, False
        for char in cell:
            quoted = not quoted if char == "`" else quoted
            if not quoted and char in "()":
                depth += 1 if char == "(" else -1
            elif depth == 0:
                outside += char
        found += re.findall(r"`([^`]+)`", outside)
    return found


def pattern(quoted: str) -> str:
    """A regular expression for a quoted message: ``...`` is any text, ``N`` and numbers any number."""
    parts = [re.escape(part.strip()) for part in quoted.split("...") if part.strip()]
    return re.sub(r"\b(N|\d+)\b", r"\\d+", ".*".join(parts))


def scenario_key(item: str, scenarios: dict) -> str | None:
    """The longest key of ``scenarios`` that is part of ``item``."""
    keys = [key for key in scenarios if key in item]
    return max(keys, key=len) if keys else None


# building blocks ---------------------------------------------------------------------------
def llava():
    """A tiny LLaVA (16 visual tokens per image) and a left-padded batch of two prompts."""
    model = tiny_llava(num_layers=4)
    return model, llava_batch(model, [([1, 5, 6], [7, 8, 9, 10], 1), ([1, 11], [12, 13, 14, 15, 16, 17], 1)])


def fixed(model, **kwargs):
    return atp.attach(model, layers=[1, 2], policy="fixed", keep=[8, 4], **kwargs)


def next_step(batch: dict) -> dict:
    """One decode step after ``batch``."""
    ones = torch.ones(2, 1, dtype=torch.long)
    return {
        "input_ids": torch.tensor([[5], [6]]),
        "attention_mask": torch.cat([batch["attention_mask"], ones], 1),
    }


def refused(call: Callable, *says: str, error=ValueError) -> str:
    """``call()`` raises ``error`` with a message in which every regular expression of ``says``
    is found (the situation, and what to do instead); returns the message."""
    with pytest.raises(error) as caught:
        call()
    message = str(caught.value)
    for fragment in says:
        assert re.search(fragment, message, re.S), f"{fragment!r} is not in the message:\n{message}"
    return message


def generate_refused(*says: str, **settings) -> Callable[[], str]:
    def scenario() -> str:
        model, batch = llava()
        given = {name: value() if name == "assistant_model" else value for name, value in settings.items()}
        with fixed(model):
            return refused(lambda: model.generate(**batch, max_new_tokens=2, **given), *says)

    return scenario


def generation_mode(mode: str, **settings) -> Callable[[], str]:
    return generate_refused(
        f"{mode} is not supported with atp yet", "use greedy decoding or sampling", **settings
    )


# scenarios ---------------------------------------------------------------------------------
def images_after_the_prefill(encoded: bool) -> Callable[[], str]:
    """Images (``pixel_values``, or already encoded as ``mm_encoder_outputs``) with a cache."""

    def scenario() -> str:
        model, batch = llava()
        with fixed(model), torch.no_grad():
            cache = output_cache(model(**batch, use_cache=True))
            if encoded:
                visual = {"mm_encoder_outputs": {"image": torch.zeros(1)}}
            else:
                visual = {"pixel_values": batch["pixel_values"]}
            return refused(
                lambda: model(**next_step(batch), **visual, **cache_kwargs(model, cache)),
                "visual inputs arrived after the prefill",
                "put every image in the first forward",
            )

    return scenario


def static_cache() -> str:
    from transformers import StaticCache

    model, batch = llava()
    says = ("DynamicCache only, got StaticCache", r"use the default cache \(cache_implementation=None\)")
    with fixed(model), torch.no_grad():
        forward = refused(
            lambda: model(**batch, **cache_kwargs(model, StaticCache(config=model.config, max_cache_len=64))),
            *says,
        )
        cache = StaticCache(config=model.config, max_cache_len=64)
        generate = refused(
            lambda: model.generate(**batch, max_new_tokens=2, **cache_kwargs(model, cache)), *says
        )
    return f"{forward}\n{generate}"


def other_cache_implementations() -> str:
    model, batch = llava()
    messages = []
    with fixed(model):
        for implementation in ("static", "offloaded", "quantized", "sliding_window"):
            call = functools.partial(
                model.generate, **batch, max_new_tokens=2, cache_implementation=implementation
            )
            says = f"cache_implementation='{implementation}' is not supported"
            messages.append(refused(call, says, "use the default dynamic cache"))
    return "\n".join(messages)


def another_prefills_cache() -> str:
    model, batch = llava()
    with fixed(model), torch.no_grad():
        first = output_cache(model(**batch, use_cache=True))
        model(**batch, use_cache=True)  # a second prefill: atp now follows its cache
        return refused(
            lambda: model(**next_step(batch), **cache_kwargs(model, first)),
            "does not continue the last prefill",
            # what to do: continue the cache the last prefill filled
            r";[^;]*\b(continue|pass|use)\b[^;]*\bprefill\b",
        )


def cache_widths_differ() -> str:
    model, batch = llava()
    with fixed(model), torch.no_grad():
        cache = output_cache(model(**batch, use_cache=True))
        layer = cache.layers[1]  # pruned at ATP layer 1; one key and value more than atp kept
        layer.keys = torch.cat([layer.keys, layer.keys[:, :, :1]], dim=2)
        layer.values = torch.cat([layer.values, layer.values[:, :, :1]], dim=2)
        return refused(
            lambda: model(**next_step(batch), **cache_kwargs(model, cache)),
            "the cache was not pruned the way atp pruned the prefill",
            "report it with the output of `atp doctor`",
            error=compat.CompatibilityError,
        )


def model_compile() -> str:
    says = (r"atp does not support torch\.compile yet", "run the attached model uncompiled")
    try:
        model, batch = llava()
        model.compile(backend="eager")
        before = refused(lambda: fixed(model), *says)
        model, batch = llava()
        with fixed(model), torch.no_grad():
            model.compile(backend="eager")
            after = refused(lambda: model(**batch), *says, error=RuntimeError)
    finally:
        torch._dynamo.reset()
    return f"{before}\n{after}"


def attach_to_a_compiled_model() -> str:
    """``torch.compile(model)`` is an ``OptimizedModule``: attaching to it runs, but its
    ``generate`` (atp's guard) then fails with an AttributeError. Attach first, then wrap."""
    model, _ = llava()
    try:
        return refused(
            lambda: fixed(torch.compile(model, backend="eager")),
            r"torch\.compile",
            r"_orig_mod|uncompiled model",
        )
    finally:
        torch._dynamo.reset()


def attention(*implementations: str) -> Callable[[], str]:
    def scenario() -> str:
        messages = []
        for implementation in implementations:
            model, _ = llava()
            model.set_attn_implementation({"text_config": implementation})
            messages.append(
                refused(
                    functools.partial(atp.attach, model, layers=[1]),
                    re.escape(f"does not support the {implementation!r} attention implementation"),
                    "Load the model with attn_implementation='sdpa'",
                )
            )
        return "\n".join(messages)

    return scenario


def sliding_window() -> str:
    """Sliding-window language models other than Gemma 3 are refused; Gemma 3's are followed."""
    atp.attach(tiny_gemma3(), layers=[3]).remove()
    mistral = tiny_mistral3(num_layers=4)
    mistral.config.text_config.sliding_window = 8  # as Mistral 7B v0.1 (4096)
    qwen = tiny_qwen2_vl(num_layers=4)
    qwen.config.text_config.use_sliding_window, qwen.config.text_config.sliding_window = True, 8
    messages = []
    for model in (mistral, qwen):
        messages.append(
            refused(
                functools.partial(atp.attach, model, layers=[1]),
                "uses sliding-window attention layers",
                r"[;:] [^;]*\b(use|load|set|pass)\b",  # what to do
            )
        )
    return "\n".join(messages)


def inputs_embeds() -> str:
    model, batch = llava()
    embeds = model.get_input_embeddings()(batch["input_ids"])
    with fixed(model), torch.no_grad():
        return refused(
            lambda: model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]),
            "atp needs input_ids",
            r"pass input_ids \(and pixel_values\) instead of inputs_embeds",
        )


def placeholders_without_images() -> str:
    model, _ = llava()
    ids = torch.tensor([llava_prompt(model, [1, 5], [6, 7])])
    with fixed(model), torch.no_grad():
        return refused(
            lambda: model(input_ids=ids),
            "16 image placeholder tokens but no images",
            "pass the images, or leave the placeholders out",
        )


def not_grids_of_patches() -> str:
    """``vision_feature_select_strategy="full"`` keeps CLIP's CLS token: refused at attach."""
    says = ("vision_feature_select_strategy='full'", "atp supports the 'default' strategy")
    messages = []
    model = tiny_llava_next(num_layers=4)
    model.config.vision_feature_select_strategy = "full"
    messages.append(refused(functools.partial(atp.attach, model, layers=[1]), *says))
    model, _ = llava()
    model.config.vision_feature_select_strategy, model.config.image_seq_length = "full", 17
    messages.append(refused(functools.partial(atp.attach, model, layers=[1]), *says))
    # the config's image_seq_length left at the patch count (LlavaConfig's default 576 is a square),
    # while the processor adds the CLS token: each image is 17 tokens here
    model, _ = llava()
    model.config.vision_feature_select_strategy = "full"
    messages.append(refused(functools.partial(atp.attach, model, layers=[1]), *says))
    return "\n".join(messages)


def module_of_an_attached_model() -> str:
    model, _ = llava()
    with fixed(model):
        return refused(
            functools.partial(atp.attach, model.model),
            "already attached to a model this module belongs to",
            r"attach to that model once, or call handle\.remove\(\) on it first",
        )


def model_that_holds_one() -> str:
    model, _ = llava()
    with fixed(model):
        return refused(
            functools.partial(atp.attach, torch.nn.ModuleDict({"vlm": model})),
            "already attached to its submodule 'vlm'",
            r"call handle\.remove\(\) \(or atp\.detach\) on that model first",
        )


def layer_zero() -> str:
    model, _ = llava()
    return refused(
        functools.partial(atp.attach, model, layers=[0, 2]), "layer 0 cannot be an ATP layer", "Use 1 or more"
    )


def layer_out_of_range() -> str:
    model, _ = llava()
    return refused(
        functools.partial(atp.attach, model, layers=[4]),
        "layer 4 is out of range",
        r"ATP layers must be in 1\.\.3",
    )


def bad_layers() -> str:
    model, _ = llava()
    duplicates = refused(
        functools.partial(atp.attach, model, layers=[2, 2]), "duplicates", "give each layer once"
    )
    empty = refused(functools.partial(atp.attach, model, layers=[]), "layers is empty", r"e\.g\. layers=\[")
    return "\n".join([layer_zero(), layer_out_of_range(), duplicates, empty])


def unknown_policies_or_options() -> str:
    model, _ = llava()
    policy = refused(
        functools.partial(atp.attach, model, layers=[1], policy="fastvv"),
        "unknown policy 'fastvv'; registered: .*keep_all",
        "Run `atp plugins`",
    )
    option = refused(
        functools.partial(atp.attach, model, layers=[1], colour="red"),
        "does not take option.*colour",
        "its options are: temperature",
    )
    return f"{policy}\n{option}"


def wrong_type_or_range() -> str:
    model, _ = llava()
    kind = refused(
        functools.partial(atp.attach, model, layers=[1, 2], policy="fixed", keep="0.5"),
        "option keep must be a list",
        r"e\.g\. keep=\[0\.5, 0\.5\]",
        error=TypeError,
    )
    bounds = refused(
        functools.partial(atp.attach, model, layers=[1], init_theta_r=1.0),
        r"option init_theta_r must be a number in \(0, 1\), got 1\.0",
    )
    return f"{kind}\n{bounds}"


def unsupported_model() -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=64
    )
    return refused(
        functools.partial(atp.attach, LlamaForCausalLM(config), layers=[1]),
        "atp supports: .*llava",
        "Pass the full vision-language model",
    )


def keep_grows() -> str:
    model, _ = llava()
    return refused(
        functools.partial(atp.attach, model, layers=[1, 2], policy="fixed", keep=[4, 8]),
        "counts can only shrink or stay",
        r"e\.g\. keep\[1\] = 4, or a fraction of those alive",
    )


def untrained_heads() -> str:
    model, _ = llava()
    with pytest.warns(UserWarning, match="threshold heads are untrained") as record:
        atp.attach(model, layers=[1]).remove()
    message = next(str(w.message) for w in record if "untrained" in str(w.message))
    assert "Train them or load trained weights" in message
    return message


def several_images_for_the_paper_head() -> str:
    model, _ = llava()
    two = llava_batch(model, [([1, 5], [6, 7], 2)])
    with atp.attach(model, layers=[1, 2]), torch.no_grad():
        return refused(
            lambda: model(**two),
            "built for 16 visual tokens per sample, got 32",
            "attach with threshold_head='binned'",
        )


def checkpoint_does_not_fit() -> str:
    model, _ = llava()
    with tempfile.TemporaryDirectory() as folder:
        with atp.attach(model, layers=[1, 2]) as handle:  # the paper's head
            handle.save_pretrained(folder)
        return refused(
            functools.partial(atp.attach, model, from_pretrained=folder, threshold_head="binned"),
            "does not fit this policy",
            # what to do: attach it with its own settings
            r"(options|settings) it was (saved|trained) with|leave \w+ out",
        )


def not_a_multiple_of_image_seq_length() -> str:
    """transformers itself refuses a prompt whose image tokens do not match the image features,
    so this is a config at odds with its tower: ``image_seq_length`` 9 (a square, so attach takes
    it), while the tower makes 16 features per image."""
    model, _ = llava()
    model.config.image_seq_length = 9
    ids = torch.tensor([[1, 5] + [model.config.image_token_id] * 16 + [6, 7]])
    with fixed(model), torch.no_grad():
        return refused(
            lambda: model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32)),
            "a sample has 16 image tokens, not a multiple of image_seq_length=9",
        )


def rope2d_counts_the_padding() -> str:
    model, batch = llava()
    with atp.attach(model, layers=[2], policy="keep_all", positions="rope2d"), torch.no_grad():
        return refused(
            lambda: model(**batch),
            "needs position ids that skip the left padding",
            re.escape("pass position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0)"),
        )


def pickle_after_a_forward() -> str:
    """Not atp's message: transformers' output hooks, installed by the first forward, are local
    functions. Before the first forward an attached model pickles."""
    model, batch = llava()
    with fixed(model):
        pickle.loads(pickle.dumps(model))
        with torch.no_grad():
            model(**batch)
        return refused(
            lambda: pickle.dumps(model),
            "Can't pickle local object",
            error=(AttributeError, pickle.PicklingError),
        )


# docs/concepts.md, "What is refused, and why": key (part of the item) -> scenario
REFUSED: dict[str, Callable[[], str]] = {
    "beam search": generation_mode("beam search", num_beams=2),
    "group beam search": generation_mode(
        "group beam search", num_beams=4, num_beam_groups=2, diversity_penalty=1.0
    ),
    "constrained beam search": generation_mode("constrained beam search", num_beams=2, force_words_ids=[[5]]),
    "contrastive search": generation_mode("contrastive search", penalty_alpha=0.6, top_k=4),
    "DoLa": generation_mode("dola generation", dola_layers="low"),
    "assisted generation": generation_mode(
        "assisted generation", assistant_model=lambda: tiny_llava(num_layers=2)
    ),
    "prompt-lookup generation": generation_mode("assisted generation", prompt_lookup_num_tokens=2),
    "prefill_chunk_size": generate_refused(
        "prefill_chunk_size=4 is not supported", "use prefill_chunk_size=None", prefill_chunk_size=4
    ),
    "images in a forward that continues a cache": images_after_the_prefill(encoded=False),
    "mm_encoder_outputs": images_after_the_prefill(encoded=True),
    "use_cache=False": generate_refused(
        r"generate\(use_cache=False\) would re-prune", "atp needs use_cache=True", use_cache=False
    ),
    "guidance_scale": generate_refused(
        "classifier-free guidance", "leave guidance_scale unset", guidance_scale=2.0
    ),
    "custom_generate": generate_refused(
        "custom_generate is not supported",
        "use the built-in greedy or sampling generation",
        custom_generate=lambda *args, **kwargs: None,
    ),
    "StaticCache": static_cache,
    "cache_implementation": other_cache_implementations,
    "the last prefill filled": another_prefills_cache,
    "widths differ": cache_widths_differ,
    "model.compile()": model_compile,
    "`torch.compile(model)` wrapper": attach_to_a_compiled_model,
    "attention implementations other than SDPA": attention("eager", "flex_attention", "paged|eager"),
    "sliding-window language models": sliding_window,
    "inputs_embeds": inputs_embeds,
    "placeholder tokens without images": placeholders_without_images,
    "not grids of patches": not_grids_of_patches,
    "module of an attached model": module_of_an_attached_model,
    "a model that holds one": model_that_holds_one,
    "bad layers": bad_layers,
    "unknown policies or options": unknown_policies_or_options,
    "wrong type or range": wrong_type_or_range,
}

# docs/troubleshooting.md, the quoted messages: key (part of the quote) -> scenario
TROUBLESHOOTING: dict[str, Callable[[], str]] = {
    "layer 0 cannot be an ATP layer": layer_zero,
    "is out of range": layer_out_of_range,
    "unsupported model": unsupported_model,
    "'eager' attention implementation": attention("eager"),
    "uses sliding-window attention layers": sliding_window,
    "is more than keep": keep_grows,
    "the threshold heads are untrained": untrained_heads,
    "this threshold head was built for": several_images_for_the_paper_head,
    "does not fit this policy": checkpoint_does_not_fit,
    "image placeholder tokens but no images": placeholders_without_images,
    "not a multiple of image_seq_length": not_a_multiple_of_image_seq_length,
    "beam search is not supported": REFUSED["beam search"],
    "use_cache=False": REFUSED["use_cache=False"],
    "visual inputs arrived after the prefill": REFUSED["images in a forward that continues a cache"],
    "needs position ids that skip the left padding": rope2d_counts_the_padding,
    "torch.compile yet": model_compile,
    "Can't pickle local object": pickle_after_a_forward,
}


# the tests ---------------------------------------------------------------------------------
@pytest.mark.parametrize("item", refused_items(), ids=lambda item: scenario_key(item, REFUSED) or item)
def test_a_documented_refusal_raises_and_says_what_to_do(item):
    key = scenario_key(item, REFUSED)
    assert key is not None, (
        f"docs/concepts.md refuses {item!r}, but no scenario here checks it: add one to REFUSED"
    )
    REFUSED[key]()


@pytest.mark.parametrize(
    "quoted", quoted_messages(), ids=lambda quoted: scenario_key(quoted, TROUBLESHOOTING) or quoted
)
def test_a_quoted_message_is_what_atp_raises(quoted):
    key = scenario_key(quoted, TROUBLESHOOTING)
    assert key is not None, (
        f"docs/troubleshooting.md quotes {quoted!r}, but no scenario here raises it: add one to TROUBLESHOOTING"
    )
    message = TROUBLESHOOTING[key]()
    assert re.search(pattern(quoted), message, re.S), f"the page quotes {quoted!r}; atp says:\n{message}"


def test_every_troubleshooting_row_quotes_a_message():
    rows = troubleshooting_rows()
    assert len(rows) >= 15
    for cell in rows:
        assert "`" in cell, f"docs/troubleshooting.md: {cell!r} quotes no message to test"


@pytest.mark.parametrize(
    ("scenarios", "items"),
    [(REFUSED, refused_items()), (TROUBLESHOOTING, quoted_messages())],
    ids=["concepts", "troubleshooting"],
)
def test_every_scenario_checks_one_documented_item(scenarios, items):
    used = [scenario_key(item, scenarios) for item in items]
    stale = sorted(set(scenarios) - set(used))
    assert not stale, f"scenarios whose item is gone from the docs: {stale}"
    shared = sorted({key for key in used if key is not None and used.count(key) > 1})
    assert not shared, f"one scenario for several items: {shared}; give each item its own"


def test_the_parser_splits_items_outside_parentheses_and_backticks():
    assert split_outside("a, b (c, d), `e, f`, and g", ",") == ["a", "b (c, d)", "`e, f`", "and g"]
    assert re.fullmatch(pattern("the prompt has N image ... of 576"), "the prompt has 16 image tokens, of 16")
    assert "beam search" in refused_items() and "prompt-lookup generation" in refused_items()


# what the docs say works -------------------------------------------------------------------
@pytest.mark.parametrize("prune_mode", ["drop", "mask"])
def test_torch_compile_of_an_attached_model_gives_the_uncompiled_results(prune_mode):
    """docs/concepts.md: dynamo runs the frames that hold atp's hooks and attention eagerly
    (graph breaks); logits and kept counts equal the uncompiled model's."""
    model, batch = llava()
    with torch.no_grad():
        unattached = model(**batch).logits
    try:
        with fixed(model, prune_mode=prune_mode) as handle, torch.no_grad():
            eager = model(**batch).logits
            kept = handle.stats.kept.clone()
            compiled = torch.compile(model, backend="eager")
            for _ in range(2):  # the first call compiles, the second runs what was compiled
                assert torch.equal(compiled(**batch).logits, eager)
                assert torch.equal(handle.stats.kept, kept)
    finally:
        torch._dynamo.reset()
    assert kept.tolist() == [[8, 4], [8, 4]] and not torch.allclose(eager, unattached)  # it pruned
