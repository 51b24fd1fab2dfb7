"""The scaling run at toy size: shapes, paired ratios, FLOPs ratios and peak memory per method."""

import json

import pytest

from atp.cli.bench import BenchConfig
from atp.cli.scaling import SHAPES, format_table, main, measure_memory, run


def tiny() -> BenchConfig:
    return BenchConfig(num_layers=4, hidden_size=64, heads=4, repeats=2, warmup=0, new_tokens=2, threads=1)


def test_the_scaling_record_holds_every_shape_with_ratios_from_its_rounds(tmp_path):
    record = run(tiny(), shapes=("llava-1.5", "video", "batch-4"), memory=False, log=lambda _: None)
    shapes = {shape["shape"]: shape for shape in record["shapes"]}
    assert shapes["llava-1.5"]["visual_tokens"] == 576
    assert shapes["video"]["visual_tokens"] == 8 * 196 and shapes["video"]["batch"] == 1
    assert shapes["batch-4"]["batch"] == 4
    for shape in shapes.values():
        rows = shape["methods"]
        assert set(rows) == {"unpruned", "atp", "fastv"}
        assert rows["unpruned"]["flops_ratio"] == 1.0 and rows["unpruned"]["time_ratio"]["median"] == 1.0
        for method in ("atp", "fastv"):
            assert 0 < rows[method]["flops_ratio"] < 1 and 0 < rows[method]["kv_ratio"] < 1
            ratio = rows[method]["time_ratio"]
            assert ratio["n"] == 2 and ratio["low"] <= ratio["median"] <= ratio["high"]
        # the same Token metric, up to FastV keeping a whole number of tokens (a rounding of the solved ratio)
        assert abs(rows["atp"]["avg_tokens"] - rows["fastv"]["avg_tokens"]) < 2
        for method in ("atp", "fastv"):  # FLOPs per sample; a padded batch computes at least those
            # (up to double sums of the same ratios <= 1 in another order: a few 2**-53 ~ 1e-16)
            assert rows[method]["flops_ratio"] <= rows[method]["flops_ratio_padded"] + 1e-12
            if shape["batch"] == 1:  # the same ratio, its doubles summed in another order (a few 2**-53)
                assert rows[method]["flops_ratio"] == pytest.approx(rows[method]["flops_ratio_padded"])
    # FastV keeps one count in every sample: its batch needs no padding; FLOPs stay per sample (the
    # same ratio, as above)
    four = shapes["batch-4"]["methods"]["fastv"]
    assert four["flops_ratio"] == pytest.approx(four["flops_ratio_padded"]) and four["flops_ratio"] < 1
    text = format_table(record)
    assert "video" in text and "2flops-per-mac" in text


def test_peak_memory_is_measured_in_a_subprocess_and_grows_with_the_batch():
    options = {"policy": None, "layers": None, "options": {}}
    small = measure_memory("llava-1.5", "unpruned", options, tiny(), "cpu")
    large = measure_memory("batch-16", "unpruned", options, tiny(), "cpu")
    assert 0 < small["rise_bytes"] < large["rise_bytes"]
    assert small["peak_bytes"] >= small["start_bytes"] + small["rise_bytes"] - 1


def test_the_command_writes_its_record_and_refuses_unknown_shapes(tmp_path, capsys):
    out = tmp_path / "scaling.json"
    argv = ["--shapes", "llava-1.5", "--num-layers", "2", "--hidden-size", "32", "--heads", "2"]
    argv += ["--repeats", "1", "--warmup", "0", "--new-tokens", "1", "--threads", "1", "--output", str(out)]
    assert main([*argv, "--methods", "unpruned", "atp"]) == 0
    record = json.loads(out.read_text())
    assert [shape["shape"] for shape in record["shapes"]] == ["llava-1.5"]
    assert set(record["shapes"][0]["methods"]) == {"unpruned", "atp"}
    assert "memory" in record["shapes"][0]["methods"]["atp"]
    with pytest.raises(ValueError, match="unknown shape 'huge'"):
        run(tiny(), shapes=("huge",), memory=False)
    with pytest.raises(ValueError, match="must include 'unpruned'"):
        run(tiny(), shapes=("llava-1.5",), methods=("atp",), memory=False)
    assert set(SHAPES) >= {"llava-1.5", "llava-next", "multi-image", "video", "batch-4", "batch-16"}
