"""Two CPU processes under ``accelerate launch`` (gloo) end with identical ATP weights."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from atp.testing import write_toy_conversations

pytestmark = pytest.mark.filterwarnings("ignore:atp.attach")
ROOT = Path(__file__).resolve().parent.parent


def toy_dataset(folder: Path, images: int = 4, text_only: int = 4) -> Path:
    return write_toy_conversations(folder, images, text_only)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_cpu_processes_train_to_identical_atp_weights(tmp_path):
    data = toy_dataset(tmp_path)
    output = tmp_path / "out"
    output.mkdir()
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(ROOT / "tests" / "scripts" / "distributed_train.py"),
        str(output),
        str(data),
        str(tmp_path / "images"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = re.findall(r"rank (\d) of 2 done, step 6, text-only batches (\d+)", done.stdout)
    assert sorted(rank for rank, _ in reports) == ["0", "1"], done.stdout[-2000:]
    assert sum(int(count) for _, count in reports) > 0  # a rank had a batch without any image
    first, second = load_file(output / "rank0.safetensors"), load_file(output / "rank1.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    start = load_file(output / "atp_model.safetensors")  # saved once, by the main process
    assert all(torch.equal(start[k], first[k]) for k in first)
    import atp
    from atp.testing import tiny_llava

    fresh = tiny_llava(num_layers=4)
    heads = atp.attach(fresh, layers=[1, 2, 3])  # the untrained starting point
    assert any(not torch.equal(heads.policy.state_dict()[k], first[k]) for k in first)  # training moved them
    heads.remove()


def test_save_pretrained_gathers_fsdp2_shards_and_writes_them_once(tmp_path):
    """FSDP2 (``fully_shard``) on two CPU processes: the ATP heads are DTensor shards; saving
    gathers them (every rank calls it) and the first rank writes the full weights."""
    output = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(ROOT / "tests" / "scripts" / "fsdp2_save.py"),
        str(output),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(re.findall(r"rank (\d) saved", done.stdout)) == ["0", "1"]
    from atp.checkpoint import read_config

    saved = load_file(output / "atp_model.safetensors")
    first, second = load_file(output / "rank0.safetensors"), load_file(output / "rank1.safetensors")
    assert saved.keys() == first.keys() == second.keys()
    assert all(torch.equal(saved[k], first[k]) and torch.equal(first[k], second[k]) for k in saved)
    assert read_config(output)["layers"] == [1, 2, 3]
    import atp
    from atp.testing import tiny_llava

    heads = atp.attach(tiny_llava(num_layers=4), layers=[1, 2, 3], init_theta_r=0.3, init_theta_s=0.9)
    expected = heads.policy.state_dict()
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    heads.remove()
