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
    plain = evaluate(model, examples)
    assert plain.avg_tokens() == n
    with torch.no_grad():  # the accuracy is the argmax at the last prompt position
        from atp.study.evaluate import prompt_batch

        logits = model(**prompt_batch(examples[:4], n)).logits[:, -1]
    right = sum(VOCAB[p] == e.answer for p, e in zip(logits.argmax(-1).tolist(), examples[:4]))
    assert evaluate(model, examples[:4]).accuracy() == right / 4


def test_the_toy_study_runs_every_stage_resumes_and_reports_its_own_numbers(tmp_path):
    from atp.study.report import summary
    from atp.study.run import run, toy_config

    lines = []
    record = run(toy_config(), tmp_path, progress=False, log=lines.append)
    report = (tmp_path / "report.md").read_text()
    rows = summary(record)
    assert set(rows) >= {"unpruned", "atp_frozen", "atp_full", "fixed_trained", "fastv", "pdrop", "random"}
    for method, row in rows.items():
        assert f"| {method} |" in report
        values = [
            json.loads((tmp_path / f"seed{s}" / _stage(method) / "result.json").read_text()) for s in (0, 1)
        ]
        mean = sum(v["avg_tokens"] for v in values) / 2
        assert row["avg_tokens"][0] == pytest.approx(mean)  # a mean of the same doubles: a few 2**-53
        assert f"{mean:.1f} ±" in report
    assert "after layer 1" in report and (tmp_path / "accuracy.png").exists()
    # a second run finds every stage done and gives the same numbers
    again = []
    assert run(toy_config(), tmp_path, progress=False, log=again.append)["seeds"] == json.loads(
        json.dumps(record["seeds"])
    )
    assert again and all("skipped" in line for line in again)


def _stage(method: str) -> str:
    return "base" if method == "unpruned" else method
