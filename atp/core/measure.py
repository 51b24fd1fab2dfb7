"""Measuring on a noisy machine: clocks, paired ratios with bootstrap intervals, verdicts on
targets, thread pinning and the process's peak memory.

Used by ``atp bench`` and the scaling run (:mod:`atp.cli.scaling`). Times are compared *within* a
round (each method once per round, interleaved), so a machine that speeds up or slows down
between rounds moves every method alike and the per-round ratios stay comparable.
"""

from __future__ import annotations

import functools
import os
import random
import statistics
import time
from collections.abc import Sequence

import torch


class Clock:
    """Wall clock on CPU, CUDA events on a GPU (after synchronising)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin

    def now(self) -> float:
        """A timestamp in seconds (synchronising first on a GPU)."""
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def pin_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count (default: the available cores) and return it."""
    threads = available_cores() if threads is None else threads
    if threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def threads_restored(function):
    """``function`` with torch's intra-op thread count put back afterwards (a benchmark pins it;
    the caller's process keeps its own)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        previous = torch.get_num_threads()
        try:
            return function(*args, **kwargs)
        finally:
            torch.set_num_threads(previous)

    return wrapper


def bootstrap_interval(
    samples: Sequence[float], level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """A percentile bootstrap interval of the median of ``samples`` (rounds resampled with
    replacement, seeded: the same samples give the same interval)."""
    values = [float(v) for v in samples]
    if not values:
        raise ValueError("no samples to summarise")
    if len(values) == 1:
        return values[0], values[0]
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    tail = (1.0 - level) / 2
    low = medians[int(tail * (resamples - 1))]
    high = medians[int(round((1.0 - tail) * (resamples - 1)))]
    return low, high


def summarize(samples: Sequence[float], level: float = 0.95, seed: int = 0) -> dict:
    """Median, bootstrap interval of the median, and the whole spread of ``samples``."""
    values = [float(v) for v in samples]
    low, high = bootstrap_interval(values, level, seed=seed)
    return {
        "median": statistics.median(values),
        "low": low,
        "high": high,
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "level": level,
    }


def verdict(summary: dict, limit: float) -> str:
    """``met`` when the whole interval is at or below ``limit``, ``missed`` when the whole
    interval is above it, ``undecided`` when the noise does not tell (the interval straddles it)."""
    if summary["high"] <= limit:
        return "met"
    if summary["low"] > limit:
        return "missed"
    return "undecided"


def paired_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Per-round ratios of two methods timed in the same rounds."""
    if len(numerator) != len(denominator):
        raise ValueError(f"{len(numerator)} rounds against {len(denominator)}: ratios need the same rounds")
    return [a / b for a, b in zip(numerator, denominator)]


def reset_peak_rss() -> bool:
    """Reset this process's resident-set high-water mark to its current size (Linux), so that
    :func:`peak_rss` reports the peak of what runs next; False where the OS cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def current_rss() -> int | None:
    """Bytes resident now (Linux), or None."""
    return _status_bytes("VmRSS")


def peak_rss() -> int:
    """Bytes: the process's resident-set high-water mark (since :func:`reset_peak_rss`)."""
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    import resource
    import sys

    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux kilobytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class HookTime:
    """Seconds spent inside atp's traced hooks (:func:`traced`) while this context is active,
    measured with the wall clock, without a profiler: ``total`` counts the outermost calls (a hook
    called inside another is not counted twice), ``by_name`` every call inclusively. On a GPU this
    is the host's time (kernels launch asynchronously), so it is meaningful on a CPU only."""

    def __init__(self):
        self.total = 0.0
        self.by_name: dict[str, float] = {}
        self.depth = 0

    def __enter__(self) -> HookTime:
        _HOOK_TIMES.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _HOOK_TIMES.remove(self)


_HOOK_TIMES: list[HookTime] = []


def traced(name: str):
    """Decorate a hook so that a running ``torch.profiler`` shows its time under ``name`` (the
    profile of ``atp bench --profile`` adds these up as atp's own share of a forward) and an
    active :class:`HookTime` adds it up; while neither is active, almost nothing is spent."""
    import functools

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            if _HOOK_TIMES:
                return _timed(name, fn, args, kwargs)
            if not torch.autograd._profiler_enabled():
                return fn(*args, **kwargs)
            with torch.profiler.record_function(name):
                return fn(*args, **kwargs)

        return inner

    return wrap


def _timed(name, fn, args, kwargs):
    timers = list(_HOOK_TIMES)
    for timer in timers:
        timer.depth += 1
    begin = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    finally:
        elapsed = time.perf_counter() - begin
        for timer in timers:
            timer.depth -= 1
            timer.by_name[name] = timer.by_name.get(name, 0.0) + elapsed
            if timer.depth == 0:
                timer.total += elapsed
