"""The analytic efficiency report, cross-checked against FlopCounterMode and the real KV cache."""

from __future__ import annotations

import contextlib
import json
import re

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel

import atp
from atp.cli import main
from atp.core.efficiency import PRESETS, check_kept, layer_flops, report, report_from_stats, shape_from_config
from atp.host import compat
from atp.host.compat import output_cache
from atp.tiny.models import llava_prompt, tiny_llava

pytestmark = pytest.mark.filterwarnings("ignore:atp.attach")


def test_paper_example_numbers():
    result = report(PRESETS["llava-1.5-7b"], [4, 14, 24], [126, 88, 20], text_tokens=0)
    assert result.avg_tokens == 143.875  # DESIGN.md section 2; whole counts / 32: exact
    per_token = 32 * 2 * 4096 * 2  # layers x (K, V) x 32 heads x 128 x bf16
    assert result.kv_cache_bytes_full == 576 * per_token  # 302.0 MB: the paper's Table 6 upper bound
    assert result.kv_cache_bytes == 143.875 * per_token  # whole bytes, exact in a double
    d, m = 4096, 11008
    assert (
        layer_flops(576, PRESETS["llava-1.5-7b"], "paper")
        == 4 * 576 * d * d + 2 * 576**2 * d + 2 * 576 * d * m
    )
    assert result.flops_full == 32 * layer_flops(576, PRESETS["llava-1.5-7b"], "paper")
    assert (
        0 < result.flops_ratio < result.kv_ratio < 1
    )  # attention is quadratic: FLOPs fall faster than the cache
    qwen = report(PRESETS["qwen2-vl-7b"], [4], [64], text_tokens=0, convention="2flops-per-mac")
    assert qwen.kv_cache_bytes_full == 256 * 28 * 2 * 4 * 128 * 2  # GQA: 4 KV heads


def test_schedules_are_validated():
    with pytest.raises(ValueError, match="2 ATP layers but 3 kept counts"):
        report(PRESETS["llava-1.5-7b"], [4, 14], [1, 2, 3])
    with pytest.raises(ValueError, match="convention must be one of"):
        report(PRESETS["llava-1.5-7b"], [4], [100], convention="macs")


def pruned_forward(model, ids, pixels, masks, layers, backend=None):
    kernel = sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()
    with atp.attach(model, layers=layers, policy="manual", keep_masks=masks) as handle:
        counter = compat.flop_counter(display=False)
        with counter, kernel, torch.no_grad():
            out = model(input_ids=ids, pixel_values=pixels, use_cache=True)
        return handle.stats, counter.get_flop_counts(), output_cache(out)


@pytest.mark.parametrize("backend", [None, SDPBackend.MATH, SDPBackend.FLASH_ATTENTION])
def test_analytic_flops_equal_flop_counter_mode_on_a_pruned_forward(backend):
    """Whichever SDPA kernel runs (torch's own counter misses the CPU flash one), the counted
    decoder FLOPs equal the analytic formula exactly; the formula's attention term matters."""
    model = tiny_llava(num_layers=4)
    ids = torch.tensor([llava_prompt(model, [1, 5, 6], [7, 8, 9, 10, 11])])
    pixels = torch.randn(1, 3, 32, 32)
    masks = [torch.arange(16)[None] % 3 != 0, torch.arange(16)[None] % 3 == 1]  # 10 then 5 kept
    stats, counts, _ = pruned_forward(model, ids, pixels, masks, [1, 3], backend)
    layer_names = [name for name in counts if re.search(r"language_model\.layers\.\d+$", name)]
    measured = [sum(counts[name].values()) for name in sorted(layer_names)]
    expected = report_from_stats(stats, model, text_tokens=ids.shape[1] - 16, convention="2flops-per-mac")
    assert stats.kept.tolist() == [[10, 5]]
    assert measured == [int(f) for f in expected.flops_per_layer]  # exact: same convention
    assert sum(measured) == int(expected.flops)
    # negative control: the formula without its attention term (4 L^2 d at 2 FLOPs per MAC; what
    # torch's own counter reports for the CPU flash kernel) does not match
    lengths = [ids.shape[1] - pruned for pruned in (0, 6, 6, 11)]
    attention = [4 * length * length * shape_from_config(model.config).hidden for length in lengths]
    assert [int(f) - a for f, a in zip(expected.flops_per_layer, attention)] != measured


def test_analytic_kv_bytes_equal_the_dynamic_cache_after_a_pruned_prefill():
    model = tiny_llava(num_layers=4)
    ids = torch.tensor([llava_prompt(model, [1, 5], [7, 8, 9])])
    masks = [torch.arange(16)[None] < 9, torch.arange(16)[None] < 4]
    stats, _, cache = pruned_forward(model, ids, torch.randn(1, 3, 32, 32), masks, [2, 3])
    expected = report_from_stats(stats, model, text_tokens=ids.shape[1] - 16, kv_bytes_per_element=4)
    assert atp.kv_cache_bytes(cache) == expected.kv_cache_bytes
    assert [layer.keys.numel() * 4 * 2 for layer in cache.layers] == expected.kv_cache_bytes_per_layer


def test_shape_from_any_config():
    model = tiny_llava(num_layers=4)
    shape = shape_from_config(model.config)
    assert (
        shape.num_layers,
        shape.hidden,
        shape.heads,
        shape.kv_heads,
        shape.head_dim,
        shape.visual_tokens,
    ) == (4, 64, 4, 2, 16, 16)


def test_flops_cli_table_and_json(capsys):
    assert (
        main(["flops", "--preset", "llava-1.5-7b", "--layers", "4", "14", "24", "--kept", "126", "88", "20"])
        == 0
    )
    table = capsys.readouterr().out
    assert "143.9" in table and "FLOPs convention: paper" in table
    assert (
        main(
            [
                "flops",
                "--preset",
                "llava-1.5-7b",
                "--layers",
                "4",
                "14",
                "24",
                "--kept",
                "126",
                "88",
                "20",
                "--json",
                "--convention",
                "2flops-per-mac",
                "--include-vision",
            ]
        )
        == 0
    )
    record = json.loads(capsys.readouterr().out)
    assert {
        "avg_tokens",
        "kv_cache_bytes",
        "kv_cache_bytes_full",
        "flops",
        "flops_full",
        "flops_convention",
    } <= set(record)
    assert record["flops_convention"] == "2flops-per-mac" and record["includes"] == ["vision tower"]
    assert main(["flops", "--preset", "llava-1.5-7b", "--layers", "4", "--kept", "1", "2"]) == 2


def test_bench_runs_and_its_numbers_are_consistent(capsys):
    from atp.cli.bench import BenchConfig, format_table, run

    record = run(BenchConfig(num_layers=4, hidden_size=64, heads=4, repeats=1, warmup=0, new_tokens=2), "cpu")
    methods = record["methods"]
    assert set(methods) == {"unpruned", "keep_all", "atp", "fastv", "fixed"}
    assert methods["fixed"]["avg_tokens"] == methods["atp"]["avg_tokens"] < 576
    assert abs(methods["fastv"]["avg_tokens"] - methods["atp"]["avg_tokens"]) < 2  # FastV keeps whole tokens
    for name in ("atp", "fixed"):
        assert methods[name]["flops_ratio"] < 1 and methods[name]["kv_ratio"] < 1
        # exact bytes; two double divisions of them in other orders agree to a few 2**-53, under approx's 1e-6
        assert methods[name]["kv_ratio"] == pytest.approx(methods[name]["kv_ratio_analytic"])
    assert methods["keep_all"]["flops_ratio"] == 1.0 and 0 <= record["scoring_overhead_flops"] < 0.05
    assert "FLOPs: 2flops-per-mac" in format_table(record)


def test_bench_ratios_come_paired_from_the_rounds_with_intervals_targets_and_a_profile():
    import statistics

    from atp.cli.bench import TARGETS, BenchConfig, format_table, run

    config = BenchConfig(num_layers=4, hidden_size=64, heads=4, repeats=3, warmup=0, new_tokens=2, threads=1)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        record = run(config, "cpu", profile=True)
        assert torch.get_num_threads() == 2  # pinned for the run, the caller's count put back
    finally:
        torch.set_num_threads(before)
    assert record["threads"] == 1 and record["config"]["threads"] == 1
    methods = record["methods"]
    for result in methods.values():
        samples = result["samples"]
        assert {len(values) for values in samples.values()} == {3}
        ratios = [a / b for a, b in zip(samples["prefill"], methods["unpruned"]["samples"]["prefill"])]
        interval = result["intervals"]["prefill_ratio"]
        assert (  # the same double ratios, maybe divided in another order: a few 2**-53 apart
            interval["median"]
            == pytest.approx(statistics.median(ratios))
            == pytest.approx(result["prefill_ratio"])
        )
        assert interval["low"] <= interval["median"] <= interval["high"]
        assert result["prefill_ms"] == pytest.approx(statistics.median(samples["prefill"]))  # as above
    assert methods["unpruned"]["intervals"]["prefill_ratio"]["median"] == 1.0
    targets = {target["name"]: target for target in record["targets"]}
    assert set(targets) == set(TARGETS)
    for target in targets.values():
        assert target["status"] in {"met", "missed", "undecided"} and target["n"] == 3
    atp_ratios = [
        a / b / methods["atp"]["flops_ratio"]
        for a, b in zip(methods["atp"]["samples"]["prefill"], methods["unpruned"]["samples"]["prefill"])
    ]
    assert targets["prefill_vs_flops"]["median"] == pytest.approx(statistics.median(atp_ratios))  # as above
    profile = record["profile"]
    assert profile["unpruned"]["atp_ms"] == 0.0 and not profile["unpruned"]["ranges"]
    for name in ("keep_all", "atp"):  # the hooks and scoring of every attached method are timed
        assert {"atp.score", "atp.prune", "atp.layer_input"} <= set(profile[name]["ranges"])
        assert 0 < methods[name]["hooks_ms"] < methods[name]["prefill_ms"]
        assert 0 < profile[name]["atp_share"] < 1
    assert "aten::mm" in profile["unpruned"]["ops"]
    table = format_table(record)
    assert (
        "prefill time ratio within 1.10x of the FLOPs ratio" in table and "atp's hooks and scoring" in table
    )


def test_bench_plot_without_matplotlib_says_what_to_install(monkeypatch, tmp_path):
    import builtins

    from atp.cli.bench import plot

    real_import = builtins.__import__

    def blocked(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", blocked)
    with pytest.raises(ValueError, match=r'--plot needs matplotlib: pip install "atp\[viz\]"'):
        plot({"methods": {}, "device": "cpu"}, str(tmp_path / "bench.png"))


def test_out_of_range_schedules_and_missing_token_counts_are_refused(capsys):
    with pytest.raises(ValueError, match="layers must be increasing indices in 0..31"):
        report(PRESETS["llava-1.5-7b"], [4, 40], [10, 5])
    with pytest.raises(ValueError, match="layers must be increasing"):
        report(PRESETS["llava-1.5-7b"], [14, 4], [10, 5])
    with pytest.raises(
        ValueError,
        match=r"kept\[0\] = 600 \(after ATP layer 4\) must be a token count between 0 and the 576 visual",
    ):
        report(PRESETS["llava-1.5-7b"], [4], [600])
    shape = shape_from_config(tiny_llava(num_layers=4).config.text_config)  # a text config: no visual count
    with pytest.raises(ValueError, match="give visual_tokens"):
        report(shape, [1], [0], text_tokens=0)
    assert (
        main(["flops", "--preset", "llava-1.5-7b", "--layers", "4", "14", "40", "--kept", "1", "2", "3"]) == 2
    )
    assert "layers must be increasing" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kept", "error", "message"),
    [
        (
            [88, 126, 300],
            ValueError,
            r"kept\[1\] = 126 \(after ATP layer 14\) is more than the 88 tokens kept at ATP layer 4: "
            r"kept counts "
            r"can only shrink or stay from one ATP layer to the next; give at most 88",
        ),
        (
            [126, 88, float("nan")],
            ValueError,
            r"kept\[2\] = nan .* is not a finite number; give a token count between 0 and the 88",
        ),
        (
            [float("inf"), 88, 20],
            ValueError,
            r"kept\[0\] = inf .* not a finite number; give a token count between 0 and the 576 visual tokens",
        ),
        (
            [126, -1, 0],
            ValueError,
            r"kept\[1\] = -1 .* must be a token count between 0 and the 126 tokens kept",
        ),
        ([126, "88", 20], TypeError, r"kept\[1\] must be a number \(a token count\), got '88' \(type str\)"),
        ([126, 88], ValueError, "3 ATP layers but 2 kept counts; give one kept count per ATP layer"),
    ],
)
def test_impossible_schedules_are_refused_with_what_is_allowed(kept, error, message):
    with pytest.raises(error, match=message):
        report(PRESETS["llava-1.5-7b"], [4, 14, 24], kept)


def test_report_inputs_are_checked_and_numpy_numbers_give_plain_json():
    for options, message in [
        ({"text_tokens": float("nan")}, "text_tokens must be a finite number >= 0, got nan"),
        ({"visual_tokens": -1}, "visual_tokens must be a finite number >= 0, got -1"),
        ({"kv_bytes_per_element": 2.0}, "kv_bytes_per_element must be a finite int >= 1, got 2.0"),
        ({"images": True}, r"images must be a finite int >= 1, got True \(type bool\)"),
    ]:
        with pytest.raises((TypeError, ValueError), match=message):
            report(PRESETS["llava-1.5-7b"], [4], [100], **options)
    with pytest.raises(TypeError, match="layers must be ints"):
        report(PRESETS["llava-1.5-7b"], [4.0], [100])
    result = report(PRESETS["llava-1.5-7b"], [np.int64(4)], [np.float32(100)], text_tokens=torch.tensor(8))
    assert json.loads(result.to_json())["layers"] == [4] and result.kept == [100.0]


@given(st.lists(st.floats(0, 576, allow_nan=False), min_size=1, max_size=4))
def test_a_kept_schedule_is_accepted_exactly_when_it_never_grows(kept):
    layers = [4, 14, 24, 30][: len(kept)]
    if all(later <= earlier for earlier, later in zip(kept, kept[1:])):
        result = report(PRESETS["llava-1.5-7b"], layers, kept, text_tokens=0)
        assert result.kept == kept and result.avg_tokens <= 576
    else:
        with pytest.raises(
            ValueError, match="kept counts can only shrink or stay from one ATP layer to the next"
        ):
            report(PRESETS["llava-1.5-7b"], layers, kept)


@given(st.lists(st.floats(0.01, 0.99), min_size=1, max_size=4))
def test_fractions_of_the_tokens_alive_always_give_a_shrinking_schedule(fractions):
    counts = check_kept(list(range(len(fractions))), fractions, 576, fractions=True)
    assert all(0 <= later <= earlier <= 576 for earlier, later in zip([576.0, *counts], counts))
