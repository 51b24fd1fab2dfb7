"""Measuring on a noisy machine: bootstrap intervals, verdicts, thread pinning, peak memory, traced hooks."""

import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atp.core.measure import (
    bootstrap_interval,
    paired_ratios,
    peak_rss,
    pin_threads,
    reset_peak_rss,
    summarize,
    traced,
    verdict,
)

samples = st.lists(st.floats(0.01, 100.0, allow_nan=False), min_size=1, max_size=30)


@given(samples, st.integers(0, 5))
@settings(max_examples=60, deadline=None)
def test_the_interval_brackets_the_median_within_the_spread_and_is_reproducible(values, seed):
    summary = summarize(values, seed=seed)
    assert min(values) <= summary["low"] <= summary["median"] <= summary["high"] <= max(values)
    assert summary["median"] == statistics.median(values) and summary["n"] == len(values)
    assert bootstrap_interval(values, seed=seed) == (summary["low"], summary["high"])


def test_more_rounds_narrow_the_interval():
    import random

    rng = random.Random(0)
    few = [1.0 + rng.gauss(0, 0.1) for _ in range(5)]
    many = [1.0 + rng.gauss(0, 0.1) for _ in range(200)]
    width = lambda values: bootstrap_interval(values)[1] - bootstrap_interval(values)[0]  # noqa: E731
    assert width(many) < width(few) / 2


@given(st.floats(0, 2), st.floats(0, 2), st.floats(0, 2))
def test_a_verdict_is_decided_only_when_the_whole_interval_is_on_one_side(a, b, limit):
    low, high = min(a, b), max(a, b)
    status = verdict({"low": low, "high": high}, limit)
    assert status == ("met" if high <= limit else "missed" if low > limit else "undecided")


def test_paired_ratios_need_the_same_rounds():
    assert paired_ratios([2.0, 3.0], [1.0, 2.0]) == [2.0, 1.5]
    with pytest.raises(ValueError, match="3 rounds against 2"):
        paired_ratios([1.0, 1.0, 1.0], [1.0, 1.0])


def test_threads_are_pinned_and_a_bad_count_is_refused():
    before = torch.get_num_threads()
    try:
        assert pin_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="--threads must be at least 1"):
        pin_threads(0)


def test_the_peak_memory_after_a_reset_is_what_ran_since():
    assert reset_peak_rss()  # Linux: /proc/self/clear_refs
    start = peak_rss()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    grown = peak_rss()
    del block
    assert grown - start >= 48 * 2**20
    assert reset_peak_rss() and peak_rss() < grown  # the freed block no longer counts


def test_traced_hooks_show_under_the_profiler_and_cost_nothing_without_it():
    calls = []

    @traced("atp.test_range")
    def hook(x):
        calls.append(torch.autograd._profiler_enabled())
        return x * 2

    assert hook(torch.ones(2)).tolist() == [2.0, 2.0] and calls == [False]
    with torch.profiler.profile() as prof:
        hook(torch.ones(2))
    assert calls == [False, True]
    assert "atp.test_range" in {event.key for event in prof.key_averages()}
