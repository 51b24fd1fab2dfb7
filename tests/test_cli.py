"""The command line: demo, plugins, models."""

from __future__ import annotations

import json

import pytest

from atp.cli import main


def test_demo_prunes_the_tiny_llava_and_reports_consistent_numbers(capsys):
    assert main(["demo", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["visual_tokens"] == 576 and result["layers"] == [4, 14, 24] and result["num_layers"] == 32
    kept = result["kept"]
    assert 576 > kept[0] >= kept[1] >= kept[2] > 0
    expected = (4 * 576 + 10 * kept[0] + 10 * kept[1] + 8 * kept[2]) / 32
    assert result["avg_tokens"] == pytest.approx(expected)
    assert result["kv_cache_bytes"] < result["kv_cache_bytes_full"]
    assert len(result["generated"]) == 8


def test_demo_table_and_bad_arguments(capsys):
    assert main(["demo", "--policy", "fixed"]) == 2  # fixed needs keep=[...]
    assert "needs keep" in capsys.readouterr().err
    assert main(["demo", "--layers", "4", "14"]) == 0
    out = capsys.readouterr().out
    assert "the paper's 'Token' metric" in out and "KV cache after generate" in out and "4-13" in out


def test_plugins_and_models_list_the_registry(capsys):
    assert main(["plugins"]) == 0
    listing = capsys.readouterr().out
    assert "policy" in listing and "keep_all" in listing and "threshold_head" in listing
    assert main(["models", "--json"]) == 0
    families = {entry["family"] for entry in json.loads(capsys.readouterr().out)}
    assert {"llava", "qwen2_vl", "mistral3"} <= families
