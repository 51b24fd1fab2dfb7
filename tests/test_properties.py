"""Property tests of DESIGN.md section 7 over prompt layouts, for every family and policy.

Each family x policy is its own test (so every pair is covered and a failure names it);
hypothesis draws the rest: one prompt layout per sample (1-3 samples; images or videos at the
start, in the middle or at the very end of the prompt, up to three of them, text of any length
around them or none), extra left padding, pixels, the policy's options (options that prune), its
ATP layers, the prune mode and a position keeper. The properties:

* drop == mask with the same binary masks (logits at text and kept visual positions, greedy
  tokens and their scores, masks and kept counts);
* a left-padded batch == each sample alone (the same, per sample);
* keep_all == the unattached model (prefill logits bitwise but for routed experts, greedy tokens
  and their scores).

"==" between logits is up to the rounding of another reduction order (tests/numerics.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
from hypothesis import Phase, event, given, settings
from hypothesis import strategies as st

import atp
from tests.families import BY_NAME_FAMILIES, FAMILIES, TEXT_IDS, Media, visual_mask
from tests.numerics import REORDERED, assert_same_continuation

pytestmark = [pytest.mark.filterwarnings("ignore:atp.attach"), pytest.mark.usefixtures("one_thread")]

NEW_TOKENS = 3
FAMILY_NAMES = [family.key for family in FAMILIES]
PHASES = [phase for phase in Phase if phase != Phase.explain]  # explaining failures costs many more runs


@functools.cache
def tiny_model(family: str) -> torch.nn.Module:
    return BY_NAME_FAMILIES[family].model(seed=3)


# policies and their options -----------------------------------------------------------------
@dataclass(frozen=True)
class RandomMasks:
    """``keep_masks`` of the manual policy, made once the batch is known: at ATP layer k a
    visual token is kept with probability ``keep[k]`` (seeded; the runtime makes them cumulative)."""

    seed: int
    keep: tuple[float, ...]

    def tensors(self, batch: int, width: int) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        return [torch.rand(batch, width, generator=generator) < keep for keep in self.keep]


def per_layer(strategy, layers) -> st.SearchStrategy:
    return st.lists(strategy, min_size=len(layers), max_size=len(layers))


BUDGETS = st.sampled_from([0.25, 0.5, 0.75, 1.0]) | st.sampled_from([0, 1, 3, 8])  # fractions, counts


def shrinking(budgets: list) -> list:
    """Counts that never grow from one ATP layer to the next (a larger one could never be met)."""
    out, least = [], None
    for budget in budgets:
        if isinstance(budget, int):
            budget = budget if least is None else min(budget, least)
            least = budget
        out.append(budget)
    return out


OPTIONS = {  # policy -> (ATP layers -> its options); every registered policy has a line
    "manual": lambda layers: st.builds(
        RandomMasks,
        st.integers(0, 999),
        per_layer(st.sampled_from([0.0, 0.3, 0.6, 0.9, 1.0]), layers).map(tuple),
    ).map(lambda masks: {"keep_masks": masks}),
    "fixed": lambda layers: st.fixed_dictionaries({"keep": per_layer(BUDGETS, layers).map(shrinking)}),
    "random": lambda layers: st.fixed_dictionaries(
        {"keep": per_layer(BUDGETS, layers).map(shrinking), "seed": st.integers(0, 99)}
    ),
    "atp": lambda layers: st.fixed_dictionaries(  # untrained heads: these thresholds prune
        {
            "init_theta_r": st.sampled_from([0.45, 0.3, 0.6]),
            "init_theta_s": st.sampled_from([0.9, 0.8]),
            "temperature": st.just(200.0),
            "threshold_head": st.sampled_from(["auto", "binned"]),
        }
    ),
    "fastv": lambda layers: st.fixed_dictionaries({"ratio": st.sampled_from([0.5, 0.0, 0.25, 0.75])}),
    "pdrop": lambda layers: st.fixed_dictionaries({"ratio": st.sampled_from([0.5, 0.25, 1.0])}),
    "spatial": lambda layers: st.fixed_dictionaries(
        {"strides": per_layer(st.sampled_from([2, 1, 4]), layers).map(sorted)}  # each a multiple of the last
    ),
    "pool": lambda layers: st.fixed_dictionaries({"stride": st.sampled_from([2, 3])}),
    "keep_all": lambda layers: st.just({}),
}
POLICIES = list(OPTIONS)
ATP_LAYERS = st.lists(st.integers(1, 3), min_size=1, max_size=3, unique=True).map(
    lambda ks: tuple(sorted(ks))
)
LAYERS = {"fastv": st.integers(1, 3).map(lambda k: (k,))}  # fastv prunes once
BATCH_DEPENDENT = {
    "random"
}  # one generator draws the whole batch's sets: a sample's set depends on its batch


# what is drawn ------------------------------------------------------------------------------
@dataclass
class Case:
    """One drawn example: the inputs, the attach arguments and the prune mode."""

    family: str
    layouts: list  # one generic layout per sample (tests/families.py)
    padding: int  # pad columns added on the left of the whole batch
    seed: int  # the pixels of sample b come from seed + b
    policy: str
    layers: tuple[int, ...] | None  # None: a pre-LLM policy
    options: dict
    prune_mode: str  # "both": the test runs both
    positions: str

    def inputs(self, model, b: int | None = None) -> dict:
        """The padded batch, or sample ``b`` alone without padding."""
        family = BY_NAME_FAMILIES[self.family]
        if b is None:
            seeds = [self.seed + i for i in range(len(self.layouts))]
            return family.layout_batch(model, self.layouts, seeds, self.padding)
        return family.layout_batch(model, [self.layouts[b]], [self.seed + b])

    def attach_options(self, batch: int, width: int, row: int | None = None) -> dict:
        """The options, drawn masks made for a (batch, width) batch (or only its row ``row``)."""
        out = {}
        for name, value in self.options.items():
            if isinstance(value, RandomMasks):
                value = value.tensors(batch, width)
                value = value if row is None else [mask[row : row + 1] for mask in value]
            out[name] = value
        return out


@st.composite
def layouts(draw, family) -> list:
    """Text segments (each maybe empty) around 1-3 media of the family's kinds and sizes."""
    media = draw(
        st.lists(
            st.sampled_from(sorted(family.media)).flatmap(
                lambda kind: st.builds(Media, st.just(kind), st.integers(0, len(family.media[kind]) - 1))
            ),
            min_size=1,
            max_size=3,
        )
    )
    text = st.lists(st.sampled_from(TEXT_IDS), max_size=4)
    texts = draw(st.lists(text, min_size=len(media) + 1, max_size=len(media) + 1))
    parts = [texts[0]]
    for item, after in zip(media, texts[1:]):
        parts += [item, after]
    return [part for part in parts if part != []]


def keepers(family: str, mode: str, same_model: bool) -> list[str]:
    """Registered position keepers that apply to the family in ``mode`` ("both": in either);
    ``same_model`` leaves out those that change the model (positions from layer 0 on)."""
    components = atp.registry()
    rope = components.get("backbone", BY_NAME_FAMILIES[family].name).factory.positions
    out = []
    for name in components.names("position_keeper"):
        keeper = components.get("position_keeper", name).factory
        if rope not in keeper.positions or (keeper.drop_only and mode != "drop"):
            continue
        if not (same_model and keeper.from_layer_zero):
            out.append(name)
    return out


@st.composite
def cases(draw, family: str, policy: str, modes: tuple[str, ...], same_model: bool = False) -> Case:
    samples = draw(st.lists(layouts(BY_NAME_FAMILIES[family]), min_size=1, max_size=3))
    padding, seed = draw(st.integers(0, 2)), draw(st.integers(0, 50))
    layers = (
        None if atp.registry().get("policy", policy).factory.pre_llm else draw(LAYERS.get(policy, ATP_LAYERS))
    )
    options = draw(OPTIONS[policy](layers or (0,)))
    if options.get("threshold_head") == "auto" and any(
        sum(isinstance(p, Media) for p in s) > 1 for s in samples
    ):
        options["threshold_head"] = "binned"  # the paper's head is built for one image per sample
    mode = draw(st.sampled_from(modes))
    positions = draw(st.sampled_from(keepers(family, mode, same_model)))
    return Case(family, samples, padding, seed, policy, layers, options, mode, positions)


# running and comparing ----------------------------------------------------------------------
@dataclass
class Run:
    logits: torch.Tensor  # (B, L, V) of a forward
    stats: atp.PruningStats | None  # of that forward (None: unattached)
    tokens: torch.Tensor  # (B, T) greedy new tokens
    scores: torch.Tensor  # (B, T, V) their step scores
    generate_stats: atp.PruningStats | None  # of generate's prefill


def run(model, inputs: dict, case: Case | None, options: dict | None = None, mode: str | None = None) -> Run:
    """A forward and a greedy generate, attached as ``case`` says (``case=None``: unattached)."""
    handle = None
    if case is not None:
        handle = atp.attach(
            model,
            layers=case.layers,
            policy=case.policy,
            prune_mode=mode or case.prune_mode,
            positions=case.positions,
            **options,
        )
    forward = dict(inputs)
    if (
        case is not None and case.positions == "rope2d"
    ):  # absolute 2D positions: skip the padding, as generate
        forward["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    try:
        with torch.no_grad():
            logits = model(**forward).logits
            stats = handle.stats if handle else None
            out = model.generate(
                **inputs,
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
            )
    finally:
        if handle is not None:
            handle.remove()
    new = out.sequences[:, inputs["input_ids"].shape[1] :]
    return Run(logits, stats, new, torch.stack(out.scores, dim=1), handle.stats if handle else None)


def comparable(visual: torch.Tensor, attention_mask: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """BoolTensor (B, L): text (non-pad) positions and the visual positions ``kept`` (B, N) keeps,
    where the output is meaningful (a pruned token's output is unspecified)."""
    out = ~visual & attention_mask.bool()
    for b in range(visual.shape[0]):
        positions = visual[b].nonzero().flatten()
        out[b, positions[kept[b, : len(positions)]]] = True
    return out


def assert_same_masks(first: atp.PruningStats, second: atp.PruningStats, row: int | None = None) -> None:
    """Equal visual counts, kept counts and cumulative masks (B, N); with ``row``, ``first`` is
    sample ``row`` of ``second`` run alone (its masks cover its own visual tokens)."""
    if row is None:
        assert torch.equal(first.num_visual, second.num_visual)
        assert torch.equal(first.kept, second.kept)
        assert all(torch.equal(a, b) for a, b in zip(first.masks, second.masks, strict=True))
        return
    count = int(first.num_visual[0])
    assert int(second.num_visual[row]) == count
    assert torch.equal(first.kept[0], second.kept[row])
    for alone, batched in zip(first.masks, second.masks, strict=True):
        assert torch.equal(alone[0], batched[row, :count])
        assert not batched[row, count:].any()


def note_pruning(stats: atp.PruningStats) -> None:
    event(f"pruned: {bool((stats.kept[:, -1] < stats.num_visual).any())}")


# the properties -----------------------------------------------------------------------------
def test_every_registered_policy_is_drawn():
    assert sorted(POLICIES) == atp.registry().names("policy")


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("family", FAMILY_NAMES)
@settings(max_examples=4, deadline=None, phases=PHASES)
@given(data=st.data())
def test_drop_equals_mask(family, policy, data):
    case = data.draw(cases(family, policy, modes=("both",)), label="case")
    model = tiny_model(family)
    inputs = case.inputs(model)
    visual = visual_mask(model, inputs)
    options = case.attach_options(visual.shape[0], int(visual.sum(1).max()))
    drop, mask = (run(model, inputs, case, options, mode) for mode in ("drop", "mask"))
    note_pruning(drop.stats)
    assert_same_masks(drop.stats, mask.stats)
    assert_same_masks(drop.generate_stats, mask.generate_stats)
    compare = comparable(visual, inputs["attention_mask"], drop.stats.masks[-1])
    torch.testing.assert_close(drop.logits[compare], mask.logits[compare], **REORDERED)
    for b in range(visual.shape[0]):
        assert_same_continuation((drop.tokens[b], drop.scores[b]), (mask.tokens[b], mask.scores[b]))


@pytest.mark.parametrize("policy", [p for p in POLICIES if p not in BATCH_DEPENDENT])
@pytest.mark.parametrize("family", FAMILY_NAMES)
@settings(max_examples=4, deadline=None, phases=PHASES)
@given(data=st.data())
def test_batch_equals_each_sample_alone(family, policy, data):
    case = data.draw(cases(family, policy, modes=("drop", "mask")), label="case")
    model = tiny_model(family)
    inputs = case.inputs(model)
    visual = visual_mask(model, inputs)
    size, width = visual.shape[0], int(visual.sum(1).max())
    batched = run(model, inputs, case, case.attach_options(size, width))
    note_pruning(batched.stats)
    total = inputs["input_ids"].shape[1]
    for b in range(size):
        single = case.inputs(model, b)
        alone = run(model, single, case, case.attach_options(size, width, row=b))
        assert_same_masks(alone.stats, batched.stats, row=b)
        assert_same_masks(alone.generate_stats, batched.generate_stats, row=b)
        length = single["input_ids"].shape[1]
        own = visual[b : b + 1, total - length :]  # the sample's visual tokens (the counts agree, above)
        compare = comparable(own, single["attention_mask"], alone.stats.masks[-1])[0]
        torch.testing.assert_close(
            batched.logits[b, total - length :][compare], alone.logits[0][compare], **REORDERED
        )
        assert_same_continuation((batched.tokens[b], batched.scores[b]), (alone.tokens[0], alone.scores[0]))


@pytest.mark.parametrize("family", FAMILY_NAMES)
@settings(max_examples=10, deadline=None, phases=PHASES)
@given(data=st.data())
def test_keep_all_equals_unattached(family, data):
    case = data.draw(cases(family, "keep_all", modes=("drop", "mask"), same_model=True), label="case")
    model = tiny_model(family)
    inputs = case.inputs(model)
    plain = run(model, inputs, None)
    attached = run(model, inputs, case, {})
    real = inputs["attention_mask"].bool()  # a padding row's output is unspecified
    # bitwise: the same operations in the same order, except where experts are routed (mask mode
    # changes the padding rows, and their routing the experts' matmul shapes: a reordering)
    exact = {"rtol": 0, "atol": 0}
    tolerance = REORDERED if BY_NAME_FAMILIES[family].routed else exact
    torch.testing.assert_close(attached.logits[real], plain.logits[real], **tolerance)
    # decode steps: an all-zero bias instead of no mask may take another SDPA kernel (a reordering)
    for b in range(real.shape[0]):
        assert_same_continuation((attached.tokens[b], attached.scores[b]), (plain.tokens[b], plain.scores[b]))
    for stats in (attached.stats, attached.generate_stats):
        assert torch.equal(stats.kept, stats.num_visual[:, None].expand_as(stats.kept))
