"""The study's data, evaluation loop and pipeline (a toy run of every stage in seconds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atp.study.shapes import (
    BACKGROUNDS,
    COLOURS,
    HARDER,
    IDS,
    IMAGE,
    SIZES,
    TYPES,
    VOCAB,
    ShapesCollator,
    encode,
    example,
)


def recomputed_answer(e) -> str:
    """The answer from the scene alone, read off the question's words."""
    words = e.question
    if e.kind == "background":
        return e.background
    if e.kind == "any":
        return "yes" if e.shapes else "no"
    if e.kind == "exists":
        return "yes" if any(s.colour == words[3] for s in e.shapes) else "no"
    if e.kind == "count":
        colour = words[2]
        return str(min(3, sum(s.colour == colour for s in e.shapes)))
    if e.kind == "left":
        a, b = words[2], words[7]
        (first,) = [s for s in e.shapes if s.colour == a]
        (second,) = [s for s in e.shapes if s.colour == b]
        return "yes" if first.x < second.x else "no"
    size = words[4]
    (target,) = [s for s in e.shapes if s.size == size]
    return target.colour


@settings(max_examples=150, deadline=None)
@given(
    st.integers(0, 3),
    st.sampled_from(["train", "val", "test"]),
    st.integers(0, 10_000),
    st.sampled_from(TYPES + HARDER),
)
def test_every_answer_follows_from_its_scene(seed, split, index, kind):
    e = example(seed, split, index, 48, kind)
    assert e.kind == kind and e.answer == recomputed_answer(e)
    assert e.image.shape == (48, 48, 3) and e.image.dtype == np.uint8
    assert all(word in IDS for word in [*e.question, e.answer])
    # the pixels show the scene: the background colour at a corner not covered by a shape
    assert tuple(e.image[0, 0]) == BACKGROUNDS[e.background] or e.shapes


def test_examples_are_deterministic_and_splits_differ():
    a, b = example(0, "train", 5), example(0, "train", 5)
    assert np.array_equal(a.image, b.image) and a.question == b.question and a.answer == b.answer
    others = [example(0, "test", i) for i in range(20)]
    trains = [example(0, "train", i) for i in range(20)]
    assert any(not np.array_equal(x.image, y.image) for x, y in zip(others, trains))


def test_fine_questions_are_about_small_regions():
    """A small shape is at most 2 x 2 patches of 4 pixels on a 48-pixel canvas."""
    assert round(SIZES["small"] * 48) <= 8
    colours = {tuple(c) for c in COLOURS.values()}
    e = next(
        example(0, "test", i, 48, "colour")
        for i in range(50)
        if "small" in example(0, "test", i, 48, "colour").question
    )
    target = [s for s in e.shapes if s.size == "small"][0]
    patch = e.image[target.y - 2 : target.y + 2, target.x - 2 : target.x + 2].reshape(-1, 3)
    assert any(tuple(p) in colours for p in patch)


def test_encoding_labels_only_the_answer():
    e = example(1, "train", 3)
    ids, labels = encode(e, 9)
    assert ids.count(IMAGE) == 9
    assert [VOCAB[t] for t, label in zip(ids, labels) if label != -100] == [e.answer, "</s>"]
    batch = ShapesCollator(9)([e, example(1, "train", 4)])
    assert batch["pixel_values"].shape == (2, 3, 64, 64)
    assert (batch["labels"] != -100).sum() == 4


def test_evaluation_counts_kept_tokens_from_the_forward():
    import atp
    from atp.study.evaluate import evaluate
    from atp.study.run import build_model, toy_config

    config = toy_config()
    model = build_model(config, 0)
    examples = [example(0, "test", i, config.image_size, kind) for kind in TYPES for i in range(3)]
    with atp.attach(model, layers=[2], policy="fixed", keep=[0.5]) as handle:
        scores = evaluate(model, examples, handle, batch_size=4)
    n = config.visual_tokens
    assert sum(scores.total.values()) == len(examples)
    for kind in TYPES:
        assert scores.kept[kind] == [3 * n / 2]  # summed over the 3 questions of the type
        expected = (2 * n + (config.num_layers - 2) * n / 2) / config.num_layers
        assert scores.tokens[kind] / 3 == pytest.approx(expected)  # float32 / n layers vs double: 2**-24
    busy = scores.by_shapes()  # a fixed ratio ignores the image: the same Token for every canvas
    assert sum(busy["count"].values()) == len(examples) and busy["slope"] == pytest.approx(0.0, abs=1e-9)
    assert set(busy["tokens"]) == {str(len(e.shapes)) for e in examples}
    plain = evaluate(model, examples)
    assert plain.avg_tokens() == n
    with torch.no_grad():  # the accuracy is the argmax at the last prompt position
        from atp.study.evaluate import prompt_batch

        logits = model(**prompt_batch(examples[:4], n)).logits[:, -1]
    right = sum(VOCAB[p] == e.answer for p, e in zip(logits.argmax(-1).tolist(), examples[:4]))
    assert evaluate(model, examples[:4]).accuracy() == right / 4


def test_the_toy_study_runs_every_stage_resumes_and_reports_its_own_numbers(tmp_path, capsys):
    from atp.study.report import summary
    from atp.study.run import run, toy_config

    lines = []
    record = run(toy_config(), tmp_path, progress=False, log=lines.append)
    report = (tmp_path / "report.md").read_text()
    rows = summary(record)
    assert set(rows) >= {
        "unpruned",
        "atp_frozen",
        "atp_full",
        "control",
        "fixed_trained",
        "fastv",
        "pdrop",
        "random",
    }
    assert "oracle" not in rows and all("oracle" in seed for seed in record["seeds"].values())
    for method, row in rows.items():
        assert f"| {method} |" in report
        values = [
            json.loads((tmp_path / f"seed{s}" / _stage(method) / "result.json").read_text()) for s in (0, 1)
        ]
        mean = sum(v["avg_tokens"] for v in values) / 2
        assert row["avg_tokens"][0] == pytest.approx(mean)  # a mean of the same doubles: a few 2**-53
        assert f"{mean:.1f} ±" in report
    assert "after layer 1" in report and (tmp_path / "accuracy.png").exists()
    slopes = [
        json.loads((tmp_path / f"seed{s}" / "control" / "result.json").read_text())["by_shapes"]["slope"]
        for s in (0, 1)
    ]
    assert "Token by the number of shapes" in report and "| control |" in report
    assert f"{sum(slopes) / 2:+.2f} ±" in report
    _check_new_sections(tmp_path, record, report, rows)
    _check_figure(tmp_path, capsys)
    # a second run finds every stage done and gives the same numbers
    again = []
    assert run(toy_config(), tmp_path, progress=False, log=again.append)["seeds"] == json.loads(
        json.dumps(record["seeds"])
    )
    stages = [line for line in again if line.startswith("seed")]  # then the verdicts, printed again
    assert stages and all("skipped" in line for line in stages)


def _stage(method: str) -> str:
    return "base" if method == "unpruned" else method


def _check_figure(folder, capsys):
    """The Fig. 4 picture: atp visualize on the study's model (its own processor), twice, side by side."""
    from PIL import Image

    from atp.study.figure import main as figure

    output = folder / "fig4.png"
    capsys.readouterr()
    assert figure(["--study", str(folder), "--stage", "atp_frozen", "--output", str(output)]) == 0
    printed = capsys.readouterr().out.splitlines()
    commands = [line for line in printed if line.startswith("atp visualize")]
    assert len(commands) == 2 and all(f"{folder}/seed0/atp_frozen/atp" in c for c in commands)
    halves = [Image.open(folder / f"fig4-{kind}.png") for kind in ("background", "colour")]
    assert Image.open(output).width == halves[0].width + halves[1].width + 10


def _check_new_sections(folder, record, report, rows):
    """The oracle, the thresholds, the soft / hard Token and the verdicts in the report are the
    result files' numbers."""
    from atp.study.oracle import markdown as oracle_table
    from atp.study.report import oracle_mean, verdicts

    results = {
        (s, stage): json.loads((folder / f"seed{s}" / stage / "result.json").read_text())
        for s in (0, 1)
        for stage in ("oracle", "atp_frozen", "control", "fixed_trained")
    }
    # the oracle: each number the mean of the two seeds' result files
    mean = oracle_mean(record)
    for index, row in enumerate(mean["rows"]):
        pair = [results[(s, "oracle")]["rows"][index] for s in (0, 1)]
        assert (row["policy"], row["layer"], row["fraction"]) == tuple(
            pair[0][k] for k in ("policy", "layer", "fraction")
        )
        assert row["fine"] == pytest.approx((pair[0]["fine"] + pair[1]["fine"]) / 2)
        assert row["avg_tokens"] == pytest.approx((pair[0]["avg_tokens"] + pair[1]["avg_tokens"]) / 2)
    assert oracle_table(mean).strip() in report
    # the control's thresholds read no input: one value for every question (no spread)
    for s in (0, 1):
        for entry in results[(s, "control")]["per_type"].values():
            assert set(entry["thresholds"]) == {"theta_r", "theta_s"}
            for name in ("theta_r", "theta_s"):
                assert entry["thresholds"][name]["std"] == pytest.approx([0.0] * 3, abs=1e-6)
        assert results[(s, "control")]["threshold_head"] == "constant"
        assert results[(s, "atp_frozen")]["threshold_head"] == "paper"
    # the soft and hard Token of a training batch, in the budget table
    budget = [results[(s, "atp_frozen")]["budget"] for s in (0, 1)]
    assert rows["atp_frozen"]["budget"]["hard"][0] == pytest.approx(
        (budget[0]["hard"] + budget[1]["hard"]) / 2
    )
    assert f"| atp_frozen | {rows['atp_frozen']['budget']['target'][0]:.1f}" in report
    fixed = [results[(s, "fixed_trained")]["budget"] for s in (0, 1)]
    assert all(b["hard"] == pytest.approx(b["soft"]) for b in fixed)  # binary masks: soft == hard
    # the verdicts: recorded, printed in the report, and recomputed from the result files
    written = json.loads((folder / "study.json").read_text())
    assert written["verdicts"] == json.loads(json.dumps(verdicts(written)))
    assert set(record["verdicts"]) >= {
        "layerwise/atp_full",
        "layerwise/atp_frozen",
        "instancewise/atp_frozen",
    }
    for verdict in record["verdicts"].values():
        assert f"- {verdict['sentence']}" in report


def test_the_oracle_keeps_its_fraction_from_the_first_atp_layer_on():
    from atp.study.oracle import losses, measure, separating
    from atp.study.run import build_model, toy_config

    config = toy_config()
    model = build_model(config, 0)
    examples = [example(0, "test", i, config.image_size, kind) for kind in TYPES for i in range(2)]
    result = measure(model, examples, first_layers=(1, 3), fractions=(1.0, 0.5, 0.0), strides=(2,))
    n, depth = config.visual_tokens, config.num_layers
    got = {(r["policy"], r["layer"], r["fraction"]): r for r in result["rows"]}
    assert set(got) == {
        *((p, layer, f) for p in ("random", "fixed") for layer in (1, 3) for f in (1.0, 0.5, 0.0)),
        ("spatial", 1, 0.25),
        ("spatial", 3, 0.25),
    }
    for (policy, layer, fraction), row in got.items():
        # layers before the first ATP layer see every token, the others round(f * n) of them
        expected = (layer * n + (depth - layer) * round(fraction * n)) / depth
        assert row["avg_tokens"] == pytest.approx(expected, rel=1e-6), (policy, layer, fraction)
    assert got[("random", 1, 1.0)]["per_type"] == result["unpruned"]["per_type"]
    lost = losses(result)
    assert all(r["fine_loss"] == pytest.approx(100 * (result["unpruned"]["fine"] - r["fine"])) for r in lost)
    picked = separating(result, fine_loss=-1000.0, coarse_loss=1000.0)
    assert len(picked) == len(result["rows"])
    assert separating(result, fine_loss=1000.0) == []


def test_evaluation_records_the_thresholds_of_each_question():
    import atp
    from atp.study.evaluate import evaluate, prompt_batch
    from atp.study.run import build_model, toy_config

    config = toy_config()
    model = build_model(config, 0)
    examples = [
        example(0, "test", i, config.image_size, kind) for kind in ("any", "colour") for i in range(3)
    ]
    with pytest.warns(UserWarning):  # untrained heads
        handle = atp.attach(model, layers=[1, 4], policy="atp", threshold_head="paper", init_theta_r=0.3)
    with torch.no_grad():
        model.eval()
        model(**prompt_batch(examples, config.visual_tokens))
        every = {name: value.double() for name, value in handle.stats.thresholds.items()}  # (6, 2)
    scores = evaluate(model, examples, handle, batch_size=4).to_dict()
    handle.remove()
    for index, kind in enumerate(("any", "colour")):
        for name, values in every.items():
            rows = values[3 * index : 3 * index + 3]
            spread = scores["per_type"][kind]["thresholds"][name]
            assert spread["mean"] == pytest.approx(rows.mean(0).tolist(), abs=1e-6)
            assert spread["std"] == pytest.approx(rows.std(0, correction=0).tolist(), abs=1e-6)


def test_spread_is_the_paired_differences_against_twice_their_std():
    from atp.study.report import beyond_spread

    assert beyond_spread([1.0, 1.0, 1.0]) is True  # no spread at all
    assert beyond_spread([0.0, 0.0, 0.0]) is False
    assert beyond_spread([3.0, 2.0, 4.0]) is True  # mean 3 > 2 x 1
    assert beyond_spread([3.0, -1.0, 4.0]) is False  # mean 2 < 2 x 2.6
    assert beyond_spread([5.0]) is None  # one seed: no spread to compare with


LAYERS = [1, 4, 6]
FIXED = [[39.0, 11.0, 3.0]] * 3


@pytest.mark.parametrize(
    "learned, learned_accuracy, fixed_accuracy, verdict",
    [
        # a steeper schedule than the fixed ratios', every seed; accuracy the same within noise
        (
            [[50.0, 5.0, 2.0], [48.0, 6.0, 2.5], [52.0, 4.0, 2.0]],
            [0.80, 0.82, 0.78],
            [0.81, 0.80, 0.80],
            "schedule only",
        ),
        # the same schedule, and more accurate on every seed
        (
            [[50.0, 5.0, 2.0], [48.0, 6.0, 2.5], [52.0, 4.0, 2.0]],
            [0.84, 0.85, 0.86],
            [0.80, 0.80, 0.81],
            "yes",
        ),
        (
            [[50.0, 5.0, 2.0], [48.0, 6.0, 2.5], [52.0, 4.0, 2.0]],
            [0.74, 0.75, 0.76],
            [0.80, 0.80, 0.81],
            "worse",
        ),
        # the fixed ratios' counts up to noise larger than the mean difference
        (
            [[45.0, 12.0, 3.0], [33.0, 10.0, 3.0], [40.0, 11.5, 3.2]],
            [0.84, 0.85, 0.86],
            [0.80, 0.80, 0.81],
            "no",
        ),
        # beyond the spread but under a token: no different schedule
        (
            [[39.5, 11.0, 3.0], [39.4, 11.0, 3.0], [39.6, 11.0, 3.0]],
            [0.80, 0.80, 0.80],
            [0.80, 0.80, 0.80],
            "no",
        ),
    ],
)
def test_the_layerwise_verdict(learned, learned_accuracy, fixed_accuracy, verdict):
    from atp.study.report import layerwise_verdict

    got = layerwise_verdict(learned, FIXED, learned_accuracy, fixed_accuracy, LAYERS)
    assert got["verdict"] == verdict
    assert f"**{verdict}**" in got["sentence"] and "3 seeds" in got["sentence"]
    if verdict != "no":
        assert got["schedule_differs"][0] and "layer 1: 50.0 against 39.0 (+11.0 ± 2.0)" in got["sentence"]
    assert (
        layerwise_verdict(learned[:1], FIXED[:1], learned_accuracy[:1], fixed_accuracy[:1], LAYERS)["verdict"]
        == "one seed"
    )


@pytest.mark.parametrize(
    "learned_gap, control_gap, learned_accuracy, control_accuracy, verdict",
    [
        # fine questions get about 5 tokens more than coarse ones; the control's gap is about 0.5
        ([5.0, 6.0, 5.5], [0.5, 0.4, 0.6], [0.83, 0.84, 0.85], [0.80, 0.80, 0.81], "yes"),
        ([5.0, 6.0, 5.5], [0.5, 0.4, 0.6], [0.83, 0.77, 0.82], [0.80, 0.80, 0.81], "tokens only"),
        ([0.6, 0.3, 0.6], [0.5, 0.4, 0.6], [0.83, 0.84, 0.85], [0.80, 0.80, 0.81], "accuracy only"),
        # the coarse questions get more: the opposite of the paper's claim
        ([-5.0, -6.0, -5.5], [0.5, 0.4, 0.6], [0.80, 0.80, 0.81], [0.80, 0.80, 0.81], "opposite"),
        # a gap that the control shows too (the scores differ by question type, not the thresholds)
        ([3.0, 1.0, 5.0], [2.5, 1.5, 4.0], [0.81, 0.79, 0.80], [0.80, 0.80, 0.81], "no"),
    ],
)
def test_the_instancewise_verdict(learned_gap, control_gap, learned_accuracy, control_accuracy, verdict):
    from atp.study.report import instancewise_verdict

    got = instancewise_verdict(learned_gap, control_gap, learned_accuracy, control_accuracy)
    assert got["verdict"] == verdict and f"**{verdict}**" in got["sentence"]
    assert instancewise_verdict(learned_gap[:1], control_gap[:1], [0.8], [0.8])["verdict"] == "one seed"


def test_verdicts_read_the_per_seed_results():
    """From a record of synthetic result files: the kept counts per layer, the per-type Token and
    the thresholds the verdicts compare are the records'."""
    from atp.study.report import verdicts
    from atp.study.shapes import COARSE, FINE

    def result(accuracy, kept, fine_tokens, coarse_tokens, theta=None):
        per_type = {}
        for kind in TYPES:
            tokens = fine_tokens if kind in FINE else coarse_tokens
            entry = {"accuracy": accuracy, "avg_tokens": tokens, "kept": kept, "count": 100}
            if theta is not None:
                value = theta + (0.1 if kind in FINE else 0.0)
                entry["thresholds"] = {
                    n: {"mean": [value] * 3, "std": [0.0] * 3} for n in ("theta_r", "theta_s")
                }
            per_type[kind] = entry
        return {"accuracy": accuracy, "avg_tokens": (fine_tokens + coarse_tokens) / 2, "per_type": per_type}

    seeds = {}
    for s, noise in enumerate((0.0, 0.5, -0.5)):
        seeds[str(s)] = {
            "atp_frozen": result(0.80, [50 + noise, 5.0, 2.0], 40 + noise, 32.0, theta=0.3),
            "atp_full": result(0.82, [50 + noise, 5.0, 2.0], 36.0, 36.0, theta=0.3),
            "control": result(0.80, [45.0, 8.0, 3.0], 36.0 + noise, 36.0, theta=0.3),
            "fixed": result(0.78, [39.0, 11.0, 3.0], 36.0, 36.0),
            "fixed_trained": result(0.82 + noise / 50, [39.0, 11.0, 3.0], 36.0, 36.0),  # within
        }
    got = verdicts({"config": {"layers": LAYERS}, "seeds": seeds})
    assert got["instancewise/atp_frozen"]["verdict"] == "tokens only"  # 8 tokens to the control's 0
    assert got["instancewise/atp_frozen"]["gap_difference"][0] == pytest.approx(8.0)
    assert got["instancewise/atp_frozen"]["theta_r_gap"]["learned"][0] == pytest.approx(0.1)
    assert got["layerwise/atp_frozen"]["verdict"] == "yes"  # 80 against 78 on every seed
    assert got["layerwise/atp_full"]["verdict"] == "schedule only"
    assert got["layerwise/atp_full"]["kept_differences"][0][0] == pytest.approx(11.0)
    assert len(COARSE) == 2


def test_the_oracle_names_the_types_that_need_tokens_and_the_verdict_reads_them():
    """``needy_types`` takes the oracle's random row at the first ATP layer nearest the target Token;
    the needy verdict compares the learned policy's Token on those types with the control's."""
    from atp.study.report import needy_types, verdicts

    def per_type(values):
        return dict(zip(TYPES, values))

    def oracle(any_lost):
        unpruned = {"policy": "unpruned", "layer": 0, "fraction": 1.0, "per_type": per_type([1.0] * 5)}
        rows = [  # Token 24.1 is nearest the target 0.17 * 144 = 24.48; the 30.2 row costs nothing
            {
                "policy": "random",
                "layer": 1,
                "fraction": 0.1,
                "avg_tokens": 30.2,
                "per_type": per_type([1.0] * 5),
            },
            {
                "policy": "random",
                "layer": 1,
                "fraction": 0.05,
                "avg_tokens": 24.1,
                "per_type": per_type([0.98, 1.0 - any_lost, 0.95, 1.0, 0.92]),
            },
            {
                "policy": "random",
                "layer": 2,
                "fraction": 0.05,
                "avg_tokens": 24.5,
                "per_type": per_type([0.0] * 5),
            },
        ]
        for row in [unpruned, *rows]:
            row.update(accuracy=0.0, coarse=0.0, fine=0.0, avg_tokens=row.get("avg_tokens", 144.0))
        return {"unpruned": unpruned, "rows": rows}

    def result(accuracy, tokens):  # tokens: the Token metric of the "any" questions; 20 for the others
        rows = {
            k: {
                "accuracy": accuracy,
                "avg_tokens": tokens if k == "any" else 20.0,
                "kept": [1.0] * 3,
                "count": 1,
            }
            for k in TYPES
        }
        return {"accuracy": accuracy, "avg_tokens": 21.0, "per_type": rows}

    config = {"layers": [1, 4, 6], "fraction": 0.17, "image_size": 48, "patch_size": 4}
    seeds = {
        str(s): {
            "oracle": oracle(any_lost=0.3 + 0.02 * s),
            "atp_frozen": result(0.8, 30.0 + s),
            "control": result(0.8, 20.0),
            "fixed": result(0.8, 20.0),
        }
        for s in range(3)
    }
    record = {"config": config, "seeds": seeds}
    needy, lost, row = needy_types(record)
    assert needy == ["any"] and row["avg_tokens"] == pytest.approx(24.1)
    assert lost["any"] == pytest.approx(32.0) and lost["colour"] == pytest.approx(8.0)  # 8 < 10: not needy
    got = verdicts(record)["instancewise-needy/atp_frozen"]
    assert got["verdict"] == "tokens only" and got["needy"] == ["any"]
    assert got["gap_difference"][0] == pytest.approx(11.0)  # any gets 31 on average, the others 20, control 0
    for s in seeds.values():  # no type is costed 10 points: no contrast, no verdict
        s["oracle"] = oracle(any_lost=0.05)
    assert verdicts(record)["instancewise-needy/atp_frozen"]["verdict"] == "no contrast"


def test_the_token_metric_by_shapes_is_a_least_squares_slope():
    from atp.study.evaluate import Scores

    scores = Scores(busy=[(0, 10.0), (1, 12.0), (2, 14.0), (2, 14.0), (4, 18.0)])
    got = scores.by_shapes()
    assert got["slope"] == pytest.approx(2.0, rel=1e-12)  # tokens = 10 + 2 * shapes; float64 sums of 5 terms
    assert got["tokens"] == {"0": 10.0, "1": 12.0, "2": 14.0, "4": 18.0} and got["count"]["2"] == 2


def test_the_imagewise_verdict_compares_the_slopes_seed_by_seed():
    from atp.study.report import imagewise_verdict

    def seed(learned, control):
        return {"atp_frozen": {"by_shapes": {"slope": learned}}, "control": {"by_shapes": {"slope": control}}}

    got = imagewise_verdict([seed(1.0, 0.2), seed(1.2, 0.3), seed(0.9, 0.1)], "atp_frozen")
    assert got["verdict"] == "yes" and got["slope_difference"][0] == pytest.approx(0.8333333333333334)
    assert (
        imagewise_verdict([seed(0.1, 0.2), seed(0.3, 0.1), seed(0.2, 0.2)], "atp_frozen")["verdict"] == "no"
    )
    assert (
        imagewise_verdict([seed(-1.0, 0.0), seed(-1.1, 0.0), seed(-0.9, 0.0)], "atp_frozen")["verdict"]
        == "opposite"
    )
    assert (
        imagewise_verdict([{"atp_frozen": {}, "control": {}}], "atp_frozen") is None
    )  # older results: no slope
