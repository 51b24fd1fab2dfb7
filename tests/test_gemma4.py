"""Gemma 4's own paths: per-layer inputs at the kept tokens, KV-shared layers reading the pruned keys
of their writer, the token grid of a non-square image read from the patch positions, generate's
shortened prefill of the shared layers, and what is refused. (The invariant suite covers the rest.)

The tiny model's layers are S, S, F, S, F, S, F; layers 5 (S) and 6 (F) read the keys and values of
layers 3 (S) and 4 (F)."""

from __future__ import annotations

import pytest
import torch

import atp
from atp.host.attach import resolve_adapter
from atp.host.compat import output_cache
from atp.tiny.models import GEMMA4_IDS, gemma4_batch, tiny_gemma4
from tests.numerics import REORDERED, assert_same_greedy, greedy_steps

pytestmark = pytest.mark.filterwarnings("ignore:atp.attach")

# a 4 x 3 grid (8 x 6 patches) and, back to back, a 2 x 4 one and a 2 x 2 one
SAMPLES = [
    [[1, 5, 6], ("image", 8, 6), [7, 8, 9, 10]],
    [[1], ("image", 4, 8), ("image", 4, 4), [4, 5, 6, 7, 8]],
]
GRIDS = [[(4, 3)], [(2, 4), (2, 2)]]


def _layer_inputs(model, batch: dict, **generate) -> dict[int, tuple]:
    """Per decoder layer, the first call's (hidden states, per-layer input, shared keys or None)."""
    seen: dict[int, tuple] = {}

    def record(layer):
        def hook(module, args, kwargs):
            shared = kwargs["shared_kv_states"].get(module.self_attn.layer_type) if layer >= 5 else None
            keys = shared[0].clone() if shared is not None else None
            seen.setdefault(layer, (args[0].clone(), args[1].clone(), keys))

        return hook

    layers = model.model.language_model.layers
    hooks = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
    with torch.no_grad():
        model.generate(**batch, **generate) if generate else model(**batch)
    for hook in hooks:
        hook.remove()
    return seen


def _visual(batch: dict) -> torch.Tensor:
    return batch["input_ids"] == GEMMA4_IDS["image"]


def test_per_layer_inputs_follow_the_kept_tokens():
    """Drop mode: each layer from the ATP layer on gets the per-layer input rows of the kept tokens,
    in order (text and kept image tokens, fillers of the shorter sample on the left): the rows the
    unattached model gives those tokens. Without the gather the layer would get every row (or, cut to
    length, another token's)."""
    model = tiny_gemma4()
    batch = gemma4_batch(SAMPLES)
    full = _layer_inputs(model, batch)  # atp's hooks come first when attached: these are the originals
    visual = _visual(batch)
    width = int(visual.sum(1).max())
    keep = torch.arange(width) % 3 == 0  # every third image token of each sample
    with atp.attach(model, layers=[2], policy="manual", keep_masks=[keep.expand(2, -1)], prune_mode="drop"):
        pruned = _layer_inputs(model, batch)
    for b in range(2):
        positions = visual[b].nonzero().flatten()
        dropped = positions[~keep[: len(positions)]]
        kept = torch.ones(visual.shape[1], dtype=torch.bool)
        kept[dropped] = False
        slots = kept.nonzero().flatten()
        for layer in range(2, 7):
            got = pruned[layer][1][b, -len(slots) :]
            assert got.shape[0] < visual.shape[1]
            assert torch.equal(got, full[layer][1][b, slots]), f"layer {layer}, sample {b}"
        assert torch.equal(pruned[1][1][b], full[1][1][b])  # before the ATP layer: every token


def test_shared_layers_read_the_pruned_keys_of_their_writer():
    """Layers 5 and 6 attend to the keys layers 3 and 4 computed: in drop mode those are the kept
    tokens' (as many as the queries and the cache of the writer hold), and the result equals mask
    mode, where every key stays and the pruned ones are masked."""
    model = tiny_gemma4()
    batch = gemma4_batch(SAMPLES)
    width = int(_visual(batch).sum(1).max())
    masks = [torch.arange(width) % 2 == 0, torch.arange(width) % 4 == 0]
    masks = [mask.expand(2, -1) for mask in masks]
    out = {}
    for mode in ("drop", "mask"):
        with atp.attach(model, layers=[1, 3], policy="manual", keep_masks=masks, prune_mode=mode) as handle:
            seen = _layer_inputs(model, batch)
            with torch.no_grad():
                result = model(**batch, use_cache=True)
            kept = handle.stats.kept
        cache = output_cache(result).layers
        for reader, writer in ((5, 3), (6, 4)):
            keys, hidden = seen[reader][2], seen[reader][0]
            assert keys.shape[2] == hidden.shape[1]  # keys of the same slots as the queries
            if mode == "drop":
                assert hidden.shape[1] == batch["input_ids"].shape[1] - int((width - kept[:, 1]).min())
            if writer == 4:  # the full layer's cache holds every key it computed: the ones shared
                assert torch.equal(cache[writer].keys, keys)
        out[mode] = result.logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out["drop"][:, -1][real[:, -1]], out["mask"][:, -1][real[:, -1]], **REORDERED)


@pytest.mark.parametrize("layers", [[4], [5], [6], [2, 5]])
def test_atp_layers_inside_a_sharing_group_are_refused_with_the_layers_that_work(layers):
    model = tiny_gemma4()
    with pytest.raises(ValueError, match=r"at or before layer 3 \(e\.g\. layers=\[1, 2, 3\]\)"):
        atp.attach(model, layers=layers)
    assert "atp" not in dict(model.named_children())


def test_the_default_layers_stay_before_the_sharing_groups():
    """The paper's layers scaled to 7 layers (1, 3, 5) would split a group: they are scaled again into
    layers 1..3. (E2B-like: 35 layers whose keys are shared from layer 15 on, written by 13 and 14,
    get 2, 6, 10.)"""
    model = tiny_gemma4()
    with atp.attach(model, policy="fixed", keep=[0.5, 0.5, 0.5]) as handle:
        assert handle.layers == (1, 2, 3)
    assert resolve_adapter(model).default_layers([1, 3, 5]) == [1, 2, 3]
    large = tiny_gemma4(num_layers=35, kv_shared=20)  # layers 13 (S) and 14 (F) write, 15..34 read
    adapter = resolve_adapter(large)
    assert min(adapter.shared_from().values()) == 13
    assert adapter.default_layers([4, 15, 26]) == [2, 6, 10]


def test_generate_keeps_the_shortened_prefill_of_the_shared_layers():
    """From transformers 5.24 generate's prefill hands the shared layers the last token only; attached,
    they get the same lengths as unattached (the optimization stays) and the continuation equals mask
    mode's, where every token stays in place."""
    model = tiny_gemma4()
    batch = gemma4_batch(SAMPLES)
    settings = {"max_new_tokens": 1, "do_sample": False}
    lengths = {layer: inputs[0].shape[1] for layer, inputs in _layer_inputs(model, batch, **settings).items()}
    with atp.attach(model, layers=[2], policy="fixed", keep=[0.5]):
        attached = _layer_inputs(model, batch, **settings)
    # 5.24 on: the last token; before: the writer's kept slots
    expected = 1 if lengths[5] == 1 else attached[4][0].shape[1]
    assert lengths[5] in (1, lengths[0]) and attached[4][0].shape[1] < lengths[0]
    assert attached[5][0].shape[1] == attached[6][0].shape[1] == attached[5][1].shape[1] == expected
    runs = {}
    for mode in ("drop", "mask"):
        with atp.attach(model, layers=[1, 3], policy="fixed", keep=[0.5, 0.5], prune_mode=mode):
            runs[mode] = greedy_steps(model, batch, 12)
    assert_same_greedy(runs["drop"], runs["mask"])


def test_the_grid_of_each_image_is_read_from_its_patch_positions():
    """Non-square grids (4 x 3, 2 x 4, 2 x 2), in a forward (image_position_ids given) and in generate
    (which encodes the images first and passes no positions: read from the vision tower's input)."""
    model = tiny_gemma4()
    batch = gemma4_batch(SAMPLES)
    with atp.attach(model, layers=[2], policy="fixed", keep=[0.5]) as handle:
        with torch.no_grad():
            model(**batch)
        assert handle.stats.grids == GRIDS
        greedy_steps(model, batch, 2)
        assert handle.stats.grids == GRIDS


def test_grid_pixels_put_each_image_back_together_from_its_patches():
    """``atp visualize`` draws on the pixels of each grid: patch (x, y) of an image of 8 x 6 patches of
    4 px sits at rows 4y.., columns 4x.. of a 32 x 24 picture (4 x 3 tokens of 8 px)."""
    model = tiny_gemma4()
    batch = gemma4_batch(SAMPLES)
    pictures = resolve_adapter(model).grid_pixels(batch, GRIDS)
    assert [[tuple(p.shape) for p in sample] for sample in pictures] == [
        [(3, 32, 24)],
        [(3, 16, 32), (3, 16, 16)],
    ]
    patch = batch["pixel_values"][0, 6 * 2 + 5].reshape(4, 4, 3).permute(2, 0, 1)  # x = 5, y = 2
    assert torch.equal(pictures[0][0][:, 8:12, 20:24], patch)


def test_an_image_whose_tokens_do_not_fill_its_grid_is_refused():
    model = tiny_gemma4()
    batch = gemma4_batch(SAMPLES)
    positions = batch["image_position_ids"].clone()
    positions[0, positions[0, :, 1] >= 6] = -1  # the first image's last two patch rows as padding: 3 x 3
    adapter = resolve_adapter(model)
    with pytest.raises(ValueError, match=r"12 tokens does not match the next image's patch grid \(3, 3\)"):
        adapter.visual_layout(batch["input_ids"], {"image_position_ids": positions}, {})
    assert adapter.visual_layout(batch["input_ids"], batch, {}).grids == GRIDS


@pytest.mark.parametrize("placeholder", ["video", "audio"])
def test_video_and_audio_placeholders_are_refused(placeholder):
    model = tiny_gemma4()
    batch = gemma4_batch(SAMPLES)
    ids = batch["input_ids"].clone()
    ids[0, -1] = GEMMA4_IDS[placeholder]
    with (
        atp.attach(model, layers=[2], policy="fixed", keep=[0.5]),
        pytest.raises(ValueError, match="image tokens only"),
    ):
        model(**{**batch, "input_ids": ids})


@pytest.mark.parametrize(
    ("setting", "value", "reason"),
    [
        ("use_bidirectional_attention", "all", "both ways over the whole text"),
        ("num_kv_shared_layers", 6, "a layer type"),
    ],
)
def test_config_variants_atp_cannot_follow_are_refused(setting, value, reason):
    model = tiny_gemma4()
    setattr(model.config.text_config, setting, value)  # layers 1..6 share: no full layer computes keys
    with pytest.raises(ValueError, match=reason):
        atp.attach(model, layers=[1])
    assert "atp" not in dict(model.named_children())
