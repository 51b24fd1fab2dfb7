"""Two CPU processes under ``accelerate launch`` (gloo) end with identical ATP weights."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from atp.tiny.models import write_toy_conversations

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
    from atp.tiny.models import tiny_llava

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
    from atp.host.checkpoint import read_config

    saved = load_file(output / "atp_model.safetensors")
    first, second = load_file(output / "rank0.safetensors"), load_file(output / "rank1.safetensors")
    assert saved.keys() == first.keys() == second.keys()
    assert all(torch.equal(saved[k], first[k]) and torch.equal(first[k], second[k]) for k in saved)
    assert read_config(output)["layers"] == [1, 2, 3]
    import atp
    from atp.tiny.models import tiny_llava

    heads = atp.attach(tiny_llava(num_layers=4), layers=[1, 2, 3], init_theta_r=0.3, init_theta_s=0.9)
    expected = heads.policy.state_dict()
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    heads.remove()


# FSDP2 through accelerate and the Trainer ----------------------------------------------------
FSDP_RUN = ["--max-steps", "6", "--save-steps", "3"]


def fsdp_config(tmp_path: Path) -> Path:
    """The shipped FSDP config for two CPU processes in float32."""
    text = (ROOT / "configs" / "accelerate" / "fsdp.yaml").read_text()
    assert "num_processes: 8" in text and "mixed_precision: bf16" in text
    path = tmp_path / "fsdp.yaml"
    path.write_text(text.replace("num_processes: 8", "num_processes: 2").replace("bf16", '"no"'))
    return path


def launch_fsdp(tmp_path: Path, output: Path, data: Path, *flags: str) -> list[str]:
    """``tests/scripts/fsdp_train.py`` on two CPU processes; returns each rank's modality string
    (``I`` / ``T`` per micro-batch: with or without an image)."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(fsdp_config(tmp_path)),
        "--main_process_port",
        str(free_port()),
        str(ROOT / "tests" / "scripts" / "fsdp_train.py"),
        str(output),
        str(data),
        str(data.parent / "images"),
        *FSDP_RUN,
        *flags,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, capture_output=True, text=True, timeout=400, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    reports = dict(
        re.findall(r"rank (\d) of 2 done, step 6, fsdp True, sharded True, images ([IT]+)", done.stdout)
    )
    assert sorted(reports) == ["0", "1"], done.stdout[-2000:]
    return [reports["0"], reports["1"]]


# How far a run sharded over two processes may end from one process with the same global batch.
# Not a rounding bound: AdamW divides each gradient by the root of its running square (plus eps), so
# where a weight's averaged gradient nears a sign change, or is as small as eps (the threshold heads'
# width-scaled readouts), a last-bit difference in the reduction order (the ranks' reduce-scatter
# against one process's accumulation, the sharded gradient norm) can move that weight's step by a
# sizeable part of the learning rate; how often depends on how the CPU's kernels round (AVX2 and
# AVX-512 differ). Seen: one readout weight of 256 off by 5.8e-4 (1.2% of a step) on AVX2 with
# torch 2.13. What the comparison must catch is a sharding bug: a rank's gradient dropped or counted
# twice, a micro-batch lost, a shard loaded into the wrong place -- each moves *every* weight of the
# affected tensor by O(lr) per step. So the comparison takes each tensor's mean absolute difference:
# isolated rounding flips average out over a tensor, a bug does not. The bound is 1% of one step at
# the largest learning rate of these runs (0.05, the heads').
LARGEST_LEARNING_RATE = 0.05
SHARDING_BOUND = 0.01 * LARGEST_LEARNING_RATE


def one_process(output: Path, data: Path, *flags: str) -> dict[str, torch.Tensor]:
    """The same run in this process with the same global batch: one sample per micro-batch and two
    accumulated micro-batches per step (the two ranks' micro-batches, in the same order), on one
    thread like each rank (``OMP_NUM_THREADS=1``): the same thread count keeps the kernels' blocking,
    and so their rounding, the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _one_process(output, data, *flags)
    finally:
        torch.set_num_threads(threads)


def _one_process(output: Path, data: Path, *flags: str) -> dict[str, torch.Tensor]:
    from atp.cli.app import build_parser
    from atp.cli.train import run

    args = build_parser().parse_args(
        ["train", "--model", "tiny", "--data", str(data), "--image-folder", str(data.parent / "images")]
        + ["--output-dir", str(output), "--batch-size", "1", "--grad-accum", "2", "--workers", "0"]
        + ["--logging-steps", "1", "--lambda-target", "1.0", "--target-tokens", "6"]
        + ["--learning-rate", "0.01", "--atp-learning-rate", str(LARGEST_LEARNING_RATE), "--warmup", "0"]
        + [*FSDP_RUN, *flags]
    )
    trainer = run(args)
    handle = trainer.atp_handle
    state = {f"atp.{k}": v.detach().clone() for k, v in handle.policy.state_dict().items()}
    last = handle.runtime.adapter.decoder_layers()[-1]
    for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight"):
        state[f"lm.{name}"] = last.get_parameter(name).detach().clone()
    handle.remove()
    return state


def untrained() -> dict[str, torch.Tensor]:
    import atp
    from atp.tiny.models import tiny_llava

    model = tiny_llava(num_layers=4)
    handle = atp.attach(model, layers=[1, 2, 3])
    state = {f"atp.{k}": v.detach().clone() for k, v in handle.policy.state_dict().items()}
    last = handle.runtime.adapter.decoder_layers()[-1]
    for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight"):
        state[f"lm.{name}"] = last.get_parameter(name).detach().clone()
    return state


def assert_close(first: dict, second: dict, atol: float) -> None:
    """Every tensor equal (``atol`` 0), or each tensor's mean absolute difference within ``atol``
    (see SHARDING_BOUND)."""
    assert first.keys() == second.keys()
    if atol == 0:
        assert all(torch.equal(first[k], second[k]) for k in first), [
            k for k in first if not torch.equal(first[k], second[k])
        ]
        return
    mean = {k: float((first[k].double() - second[k].double()).abs().mean()) for k in first}
    assert max(mean.values()) <= atol, sorted(mean.items(), key=lambda item: -item[1])[:4]


@pytest.mark.parametrize(
    "regime",
    [["--freeze-lm"], ["--gradient-checkpointing"]],
    ids=["frozen-lm", "full-finetune-checkpointing"],
)
def test_fsdp2_training_matches_one_process_resumes_and_saves_once(tmp_path, regime):
    """FSDP2 through ``accelerate launch`` and ``atp train`` on two CPU processes: the ranks end
    identical and equal to one process with the same global batch; a rank whose batch has no image
    while the other's has one does not hang; resuming from the mid-run checkpoint in a new launch
    ends where the uninterrupted run ended; the full ATP weights are written once."""
    data = toy_dataset(tmp_path / "data", images=6, text_only=6)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    modalities = launch_fsdp(tmp_path, full, data, *regime)
    assert any(a != b for a, b in zip(*modalities)), modalities  # one rank with an image, one without
    first, second = load_file(full / "final-rank0.safetensors"), load_file(full / "final-rank1.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)
    start = untrained()
    moved = {k for k in first if not torch.equal(first[k], start[k])}
    assert {k for k in moved if k.startswith("atp.")}, "the ATP heads did not train"
    assert bool({k for k in moved if k.startswith("lm.")}) == ("--freeze-lm" not in regime)

    saved = load_file(full / "atp_model.safetensors")  # written once, by the first rank, gathered
    assert all(torch.equal(saved[k], first[f"atp.{k}"]) for k in saved) and len(saved) == 18
    assert (full / "checkpoint-3" / "atp_model.safetensors").is_file()

    launch_fsdp(tmp_path, resumed, data, *regime, "--resume", str(full / "checkpoint-3"))
    assert_close(load_file(resumed / "final-rank0.safetensors"), first, atol=0)  # same processes, same order

    reference = one_process(tmp_path / "single", data, *regime)
    assert_close(reference, first, atol=SHARDING_BOUND)


def backward_footprint(model, handle, images: int) -> tuple[list[int], set[str]]:
    """The decoder layers a training backward runs through (outputs that need a gradient) and the
    trainable parameters outside the language model that get a gradient."""
    from atp.tiny.models import llava_batch

    layers, hooks = [], []
    for index, layer in enumerate(handle.runtime.adapter.decoder_layers()):
        hook = layer.register_forward_hook(
            lambda module, args, output, index=index: (
                layers.append(index)
                if (output[0] if isinstance(output, tuple) else output).requires_grad
                else None
            )
        )
        hooks.append(hook)
    model.zero_grad(set_to_none=True)
    model.train()
    batch = llava_batch(model, [([5, 6], [7, 8, 9], images), ([5], [7, 8, 10, 11], images)])
    labels = batch["input_ids"].clone()
    labels[(labels == model.config.image_token_id) | (batch["attention_mask"] == 0)] = -100
    model(**batch, labels=labels).loss.backward()
    for hook in hooks:
        hook.remove()
    language = {id(p) for p in handle.runtime.adapter.language_model().parameters()}
    outside = {
        name
        for name, p in handle.runtime.adapter.multimodal_model().named_parameters()
        if p.requires_grad and id(p) not in language and not name.startswith("atp.") and p.grad is not None
    }
    return layers, outside


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen-lm", "full-finetune"])
def test_batches_with_and_without_images_run_the_same_backward(frozen):
    """What FSDP needs from every rank: a text-only batch runs the backward through the same
    decoder layers as a batch with images, and the trainable parameters outside the language model
    (the projector) get a gradient (zero) even when no image used them."""
    import atp
    from atp.tiny.models import tiny_llava

    model = tiny_llava(num_layers=4)
    handle = atp.attach(model, layers=[2, 3], init_theta_r=0.3)
    model.model.vision_tower.requires_grad_(False)
    if frozen:
        handle.freeze_base_model()
    with_images, used = backward_footprint(model, handle, images=1)
    without, touched = backward_footprint(model, handle, images=0)
    assert with_images == without == ([2, 3] if frozen else [0, 1, 2, 3])
    assert (
        touched
        == used
        == (
            set()
            if frozen
            else {
                n
                for n, _ in model.model.multi_modal_projector.named_parameters(prefix="multi_modal_projector")
            }
        )
    )
    if not frozen:
        assert all(float(p.grad.abs().max()) == 0.0 for p in model.model.multi_modal_projector.parameters())
    assert all(p.grad is not None for p in handle.parameters())
    handle.remove()


# DeepSpeed ZeRO-3 through the Trainer --------------------------------------------------------
# Five steps: with this data and seed the one text-only step is the first. A text-only step after
# steps with images differs by design: ZeRO-3 gives the (unused) heads no gradient and AdamW leaves
# them, DDP / FSDP / one process give them a zero gradient and AdamW's momentum moves them (seen:
# 1.1e-3 on the heads after a sixth step).
ZERO3_RUN = ["--max-steps", "5", "--save-steps", "3"]


def zero3_config(tmp_path: Path) -> Path:
    """The shipped ZeRO-3 config, with every parameter partitioned (the tiny model's are all below
    the size ZeRO-3 would otherwise keep whole on every rank)."""
    config = json.loads((ROOT / "configs" / "deepspeed" / "zero3.json").read_text())
    assert config["zero_optimization"]["stage"] == 3
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps(config))
    return path


def launch_zero3(
    tmp_path: Path, output: Path, data: Path, *flags: str, **env: str
) -> subprocess.CompletedProcess:
    env.setdefault("TORCH_EXTENSIONS_DIR", extension_cache())
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(ROOT / "tests" / "scripts" / "zero3_train.py"),
        str(output),
        str(data),
        str(data.parent / "images"),
        str(zero3_config(tmp_path)),
        *ZERO3_RUN,
        *flags,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu", **env}
    return subprocess.run(command, capture_output=True, text=True, timeout=400, env=env, cwd=ROOT)


def extension_cache() -> str:
    """DeepSpeed's ops built once per torch: a build by torch >= 2.14 leaves a lock file that an
    older torch in another environment would wait on forever (see ``check_extension_locks``)."""
    from torch.utils.cpp_extension import get_default_build_root

    return str(Path(get_default_build_root()) / f"atp-tests-torch-{torch.__version__}")


def zero3_reports(done: subprocess.CompletedProcess, loaded_partitioned: bool = False) -> list[str]:
    """Each rank's modalities, one letter per micro-batch (I: images, T: text only)."""
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    pattern = (
        rf"rank (\d) of 2 done, step \d+, deepspeed True, loaded partitioned {loaded_partitioned}, "
        r"partitioned True, reloaded True, images ([IT]+)"
    )
    reports = dict(re.findall(pattern, done.stdout))
    assert sorted(reports) == ["0", "1"], done.stdout[-2000:]
    return [reports["0"], reports["1"]]


@pytest.mark.parametrize("regime", [["--freeze-lm"], []], ids=["frozen-lm", "full-finetune"])
def test_zero3_training_matches_one_process_resumes_and_saves(tmp_path, regime):
    """DeepSpeed ZeRO-3 (CPU accelerator, gloo) on two processes with ``atp train --deepspeed``:
    the ATP heads are created after the model and partitioned with it; modality-grouped steps of
    mixed data train; the ranks end identical and equal to one process with the same global batch;
    ``handle.save_pretrained`` gathers the partitioned heads and loading puts them back; resuming
    from the mid-run checkpoint ends where the uninterrupted run ended."""
    pytest.importorskip("deepspeed")
    data = toy_dataset(tmp_path / "data", images=8, text_only=6)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    grouped = [*regime, "--group-by-modality-length"]
    modalities = zero3_reports(launch_zero3(tmp_path, full, data, *grouped))
    assert modalities[0] == modalities[1] and "I" in modalities[0] and "T" in modalities[0]
    first, second = load_file(full / "final-rank0.safetensors"), load_file(full / "final-rank1.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)
    start = untrained()
    assert any(not torch.equal(first[k], start[k]) for k in first if k.startswith("atp."))
    assert any(not torch.equal(first[k], start[k]) for k in first if k.startswith("lm.")) == (not regime)
    for folder in (full, full / "direct"):  # by the Trainer from the gathered state, and by the handle
        saved = load_file(folder / "atp_model.safetensors")
        assert len(saved) == 18 and all(torch.equal(saved[k], first[f"atp.{k}"]) for k in saved)

    zero3_reports(launch_zero3(tmp_path, resumed, data, *grouped, "--resume", str(full / "checkpoint-3")))
    assert_close(load_file(resumed / "final-rank0.safetensors"), first, atol=0)  # same processes, same order

    reference = one_process(tmp_path / "single", data, *grouped, *ZERO3_RUN)
    # ZeRO-3 reduces partitioned, flattened gradients (another summation order): see SHARDING_BOUND
    # (measured on AVX-512: 1.5e-4 on heads that moved by about 0.1 in full fine-tuning)
    assert_close(reference, first, atol=SHARDING_BOUND)


def test_zero3_refuses_mixed_modality_steps_before_training(tmp_path):
    """Without modality grouping a step could give one rank images and the other none, which
    ZeRO-3 cannot run (the ranks would wait in different collectives): refused up front."""
    pytest.importorskip("deepspeed")
    data = toy_dataset(tmp_path / "data", images=8, text_only=6)
    done = launch_zero3(tmp_path, tmp_path / "out", data, "--freeze-lm")
    assert done.returncode != 0
    assert "mixes records with and without images" in done.stderr
    assert "--group-by-modality-length" in done.stderr
    assert not (tmp_path / "out" / "checkpoint-3").exists()


def test_zero3_refuses_a_stale_extension_lock_before_deepspeed_starts(tmp_path):
    """Every rank of a DeepSpeed run with torch 2.13 hung in ``deepspeed.initialize`` on the
    lock file a torch 2.14 build of its op had left in a shared cache (as in CI, whose newest stage
    runs first): ``atp train`` names the file and stops before DeepSpeed starts."""
    pytest.importorskip("deepspeed")
    data = toy_dataset(tmp_path / "data", images=2, text_only=0)
    cache = tmp_path / "torch_extensions"
    (cache / "deepspeed_shm_comm").mkdir(parents=True)
    (cache / "deepspeed_shm_comm" / "lock").touch()  # as torch >= 2.14 leaves it, before the library
    (cache / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"")
    done = launch_zero3(
        tmp_path,
        tmp_path / "out",
        data,
        "--freeze-lm",
        TORCH_EXTENSIONS_DIR=str(cache),
        ATP_TEST_TORCH="2.13",
    )
    assert done.returncode != 0
    assert "stale lock file(s)" in done.stderr and str(cache / "deepspeed_shm_comm" / "lock") in done.stderr
    assert "deepspeed_shm_comm_op built" not in done.stdout + done.stderr  # stopped before DeepSpeed's build
    assert not (tmp_path / "out" / "checkpoint-3").exists()


def test_zero3_partitions_a_checkpoint_as_it_loads_and_trains_like_one_process(tmp_path):
    """``atp train --deepspeed`` with a checkpoint folder: the Trainer's arguments come first, so
    ``from_pretrained`` runs under ``deepspeed.zero.Init`` and partitions the weights as they load;
    the ATP heads, attached after, are partitioned by ``deepspeed.initialize``. Full fine-tuning then
    ends on both ranks where one process ends."""
    pytest.importorskip("deepspeed")
    from atp.tiny import write_tiny_checkpoint

    folder = write_tiny_checkpoint(tmp_path / "model", "llava", num_layers=4)
    data = toy_dataset(tmp_path / "data", images=8, text_only=6)
    flags = ["--model", str(folder), "--group-by-modality-length"]
    modalities = zero3_reports(
        launch_zero3(tmp_path, tmp_path / "out", data, *flags), loaded_partitioned=True
    )
    assert modalities[0] == modalities[1] and "I" in modalities[0]
    first = load_file(tmp_path / "out" / "final-rank0.safetensors")
    second = load_file(tmp_path / "out" / "final-rank1.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)
    reference = one_process(tmp_path / "single", data, *flags, *ZERO3_RUN)
    (loaded,) = [
        v for k, v in load_file(folder / "model.safetensors").items() if "layers.3.self_attn.q_proj" in k
    ]
    assert not torch.equal(first["lm.self_attn.q_proj.weight"], loaded)  # the partitioned LM trained
    assert_close(reference, first, atol=SHARDING_BOUND)
