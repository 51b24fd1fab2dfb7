"""Every command that runs a model takes ``--model PATH_OR_ID`` (a checkpoint folder, loaded as a
hub model is) and the ATP options; here on tiny checkpoint folders, offline."""

from __future__ import annotations

import json

import pytest

from atp.cli import main
from atp.tiny import write_tiny_checkpoint
from atp.tiny.models import write_toy_conversations

pytestmark = pytest.mark.usefixtures("offline")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        family: write_tiny_checkpoint(root / family, family, num_layers=4) for family in ("llava", "qwen2_vl")
    }


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_demo_runs_a_checkpoint_folder_with_its_processor(folders, family, capsys):
    argv = ["demo", "--model", str(folders[family]), "--json", "--max-new-tokens", "3"]
    assert main([*argv, "--policy", "fixed", "--layers", "1", "2", "--option", "keep=[0.5,0.5]"]) == 0
    record = last_json(capsys)
    visual = record["visual_tokens"]
    assert record["model"] == str(folders[family]) and visual > 0
    assert record["kept"] == [round(visual / 2), round(round(visual / 2) / 2)]
    assert record["kv_cache_bytes"] < record["kv_cache_bytes_full"]
    assert isinstance(record["text"], str) and len(record["generated"]) == 3


def test_demo_restores_an_atp_checkpoint(folders, tmp_path, capsys):
    import atp
    from atp.cli.loading import load

    loaded = load(str(folders["llava"]))
    handle = atp.attach(loaded.model, layers=[2], policy="fixed", keep=[5])
    handle.save_pretrained(tmp_path / "atp")
    assert (
        main(["demo", "--model", str(folders["llava"]), "--atp-checkpoint", str(tmp_path / "atp"), "--json"])
        == 0
    )
    record = last_json(capsys)
    assert record["policy"] == "fixed" and record["layers"] == [2] and record["kept"] == [5]


def test_bench_runs_a_checkpoint_folder(folders, capsys):
    argv = ["bench", "--model", str(folders["qwen2_vl"]), "--repeats", "1", "--new-tokens", "2", "--json"]
    assert main([*argv, "--layers", "1", "3", "--policy", "fixed", "--option", "keep=[0.5,0.5]"]) == 0
    record = last_json(capsys)
    assert record["model"] == str(folders["qwen2_vl"]) and record["config"]["num_layers"] == 4
    atp_row = record["methods"]["atp"]
    assert atp_row["layers"] == [1, 3] and atp_row["kept"] == [32, 16]
    assert record["methods"]["fixed"]["kept"] == [32, 16]  # the baselines match the row's counts
    assert record["methods"]["atp"]["kv_ratio"] < 1.0


def train_argv(folder, tmp_path, images: int, text_only: int) -> list[str]:
    """``atp train`` on ``folder`` over a fresh toy conversation set in ``tmp_path``."""
    data = write_toy_conversations(tmp_path, images=images, text_only=text_only)
    return ["train", "--model", str(folder), "--data", str(data), "--image-folder", str(tmp_path / "images"),
            "--output-dir", str(tmp_path / "run")]  # fmt: skip


def test_train_runs_a_checkpoint_folder_with_atp_options(folders, tmp_path, capsys):
    argv = train_argv(folders["llava"], tmp_path, images=2, text_only=1)
    options = ["--max-steps", "2", "--batch-size", "1", "--workers", "0", "--freeze-lm"]
    assert main([*argv, *options, "--layers", "2", "--option", "init_theta_r=0.3"]) == 0
    assert last_json(capsys)["global_step"] == 2
    saved = json.loads((tmp_path / "run" / "atp_config.json").read_text())
    assert saved["layers"] == [2] and saved["options"]["init_theta_r"] == 0.3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--model", "/nonexistent/folder"], "could not load '/nonexistent/folder'"),
        (["bench", "--model", "/nonexistent/folder", "--repeats", "1"], "atp tiny-checkpoint DIR"),
        (["demo", "--device", "cuda:0"], "no CUDA device"),
    ],
)
def test_model_arguments_fail_clearly(argv, message, capsys):
    import torch

    if "cuda" in " ".join(argv) and torch.cuda.is_available():
        argv = ["demo", "--model", "/nonexistent/folder"]
        message = "could not load"
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_train_refuses_a_family_its_data_pipeline_cannot_feed(folders, tmp_path, capsys):
    assert main(train_argv(folders["qwen2_vl"], tmp_path, images=1, text_only=0)) == 2
    assert "data pipeline is LLaVA-1.5's" in capsys.readouterr().err
