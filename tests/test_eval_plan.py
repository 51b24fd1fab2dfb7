"""``atp eval`` without lmms-eval: the matched settings of every method, checked against the
policies themselves, and the command's plan (``--dry-run``) and errors."""

from __future__ import annotations

import shlex
from argparse import Namespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atp.cli import main
from atp.core.efficiency import tokens_per_layer
from atp.evaluation.arguments import parse_model_arguments, split_model_args
from atp.evaluation.matched import matched_methods, scaled_layers
from atp.tiny.models import llava_batch, tiny_llava


def settings_of(method) -> tuple[list[int], list[float]]:
    """The layers and the fraction alive after each, read back from the model args."""
    args = split_model_args(method.model_args)
    layers = [int(x) for x in args.get("layers", "0").split(";")]
    if args["policy"] == "fastv":
        return layers, [1 - float(args["option.ratio"])]
    if args["policy"] == "pdrop":
        ratio = float(args["option.ratio"])
        return layers, [ratio ** (k + 1) for k in range(len(layers))]
    if args["policy"] == "spatial":
        strides = [int(x) for x in args["option.strides"].strip("[]").split(",")]
        return layers, [s**-2 for s in strides]
    if args["policy"] == "pool":
        return [0], [int(args["option.stride"]) ** -2]
    keep = [float(x) for x in args["option.keep"].strip("[]").split(",")]
    alive, out = 1.0, []
    for q in keep:
        alive *= q
        out.append(alive)
    return layers, out


@settings(max_examples=60, deadline=None)
@given(st.integers(4, 80), st.floats(0.05, 0.95))
def test_matched_methods_reach_the_target(num_layers, fraction):
    methods = {m.name: m for m in matched_methods(num_layers, fraction)}
    assert list(methods) == ["unpruned", "fastv", "pdrop", "fixed", "random", "spatial", "pool"]
    for name, method in methods.items():
        if method.model_args is None:
            assert method.skipped and name != "unpruned"
            continue
        if name == "unpruned":
            assert method.model_args == "" and method.fraction == 1.0
            continue
        layers, kept = settings_of(method)
        measured = sum(tokens_per_layer(num_layers, layers, kept, 1.0)) / num_layers
        # the same fractions, products and sums of <= 80 doubles <= 1 maybe in another order: ~1e-14
        assert measured == pytest.approx(method.fraction, abs=1e-9)
        if name in ("fastv", "pdrop", "fixed", "random"):  # solved: up to the 4 decimals printed
            # a ratio printed to 4 decimals is off by <= 5e-5; the Token fraction, sum_k w_k q**k with
            # segment weights sum w_k <= 1 over k <= K pruning layers, moves by <= K * 5e-5 (its slope)
            assert method.fraction == pytest.approx(fraction, abs=len(layers) * 5e-5 + 1e-12)
        if name == "pool":
            assert abs(method.fraction - fraction) <= 0.1 * fraction
    # a solved method is left out only when its first layers alone exceed the target
    first = scaled_layers((2,), num_layers)[0]
    assert (methods["fastv"].model_args is None) == (first / num_layers >= fraction)


def test_the_paper_settings_at_144_of_576_tokens():
    """LLaVA-1.5-7B (32 layers) at a quarter: FastV's R = 0.8 at K = 2, PDrop's lambda = 0.5 at
    2 / 6 / 12, spatial strides at 2 and 24, 2 x 2 pooling."""
    methods = {m.name: m.model_args for m in matched_methods(32, 0.25, atp_checkpoint="ckpt")}
    assert methods["fastv"] == "policy=fastv,layers=2,option.ratio=0.8"
    assert methods["pdrop"] == "policy=pdrop,layers=2;6;12,option.ratio=0.5"
    assert methods["spatial"] == "policy=spatial,layers=2;24,option.strides=[2,4]"
    assert methods["pool"] == "policy=pool,option.stride=2"
    assert methods["fixed"].startswith("policy=fixed,layers=4;14;24,option.keep=[0.29")
    assert methods["atp"] == "atp_checkpoint=ckpt"


@pytest.mark.parametrize("num_layers,fraction", [(4, 0.5), (8, 0.25)])
def test_matched_settings_prune_a_model_as_predicted(num_layers, fraction):
    """Each method's model args, parsed as the lmms-eval model parses them and attached to a model
    with 144 visual tokens per image: the measured Token metric is the predicted one."""
    from atp.cli.loading import attach_from_args

    model = tiny_llava(num_layers=num_layers, image_size=96, patch_size=8)  # 12 x 12 = 144 tokens
    batch = llava_batch(model, [([5, 6], [7, 8, 9], 1), ([5], [7, 8], 2)])
    for method in matched_methods(num_layers, fraction):
        if not method.model_args:
            continue
        parsed = parse_model_arguments(pretrained="x", **split_model_args(method.model_args))
        namespace = Namespace(
            policy=parsed.policy, layers=parsed.layers, option=parsed.options, atp_checkpoint=None
        )
        handle = attach_from_args(model, namespace)
        with torch.no_grad():
            model(**batch)
        stats = handle.stats
        measured = (stats.tokens_per_sample / stats.num_visual).tolist()
        handle.remove()
        # each pruning layer rounds to whole tokens of 144 (or 288) and keeps the last token
        assert measured == pytest.approx([method.fraction] * 2, abs=0.02), method


def test_dry_run_prints_one_lmms_eval_command_per_method(tmp_path, capsys):
    assert main(["eval", "--dry-run", "--output-dir", str(tmp_path), "--model-args", "batch_size=2"]) == 0
    out = capsys.readouterr()
    commands = [shlex.split(line) for line in out.out.splitlines() if line.startswith("  ")]
    names = [line.split(":")[0] for line in out.out.splitlines() if not line.startswith("  ")]
    assert names == ["unpruned", "fastv", "pdrop", "fixed", "random", "spatial"]
    assert "pool: left out" in out.err
    for command in commands:
        assert command[1:5] == ["-m", "lmms_eval", "--model", "atp"]
        model_args = split_model_args(command[command.index("--model_args") + 1])
        assert model_args["pretrained"] == str(tmp_path / "tiny-llava") and model_args["batch_size"] == "2"
        assert command[command.index("--include_path") + 1] == str(tmp_path / "tiny-tasks")
    assert (tmp_path / "tiny-llava" / "config.json").exists()


def test_dry_run_for_a_hub_model_needs_no_download(tmp_path, capsys):
    argv = ["eval", "--dry-run", "--model", "llava-hf/llava-1.5-7b-hf", "--num-layers", "32"]
    argv += ["--tasks", "gqa,pope", "--methods", "unpruned,pdrop", "--output-dir", str(tmp_path)]
    argv += ["--launcher", "accelerate launch --num_processes 8", "--lmms-eval-args", "--limit 10"]
    assert main(argv) == 0
    lines = [shlex.split(line) for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert len(lines) == 2
    assert lines[1][:5] == ["accelerate", "launch", "--num_processes", "8", "-m"]
    assert "policy=pdrop,layers=2;6;12,option.ratio=0.5" in lines[1][lines[1].index("--model_args") + 1]
    assert lines[1][-2:] == ["--limit", "10"] and "--include_path" not in lines[1]


def test_tokens_count_reads_the_visual_tokens_from_the_config(tmp_path, capsys):
    from atp.tiny import write_tiny_checkpoint

    folder = write_tiny_checkpoint(tmp_path / "llava", "llava", num_layers=8)
    argv = [
        "eval",
        "--dry-run",
        "--model",
        str(folder),
        "--tasks",
        "t",
        "--tokens",
        "4",
        "--methods",
        "fastv",
    ]
    assert main([*argv, "--output-dir", str(tmp_path / "out")]) == 0  # 4 of 16 tokens: a quarter
    assert "option.ratio=0.8571" in capsys.readouterr().out  # (1 + 7 * kept) / 8 = 0.25


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--methods", "fastv,fast"], "unknown fast"),
        (["--methods", "atp"], "needs --atp-checkpoint"),
        (["--method", "nothing"], "NAME=MODEL_ARGS"),
        (["--tokens", "10", "--family-qwen"], "--visual-tokens"),
    ],
)
def test_bad_plans_are_refused_with_what_to_do(tmp_path, capsys, extra, message):
    argv = ["eval", "--dry-run", "--output-dir", str(tmp_path)]
    if "--family-qwen" in extra:
        from atp.tiny import write_tiny_checkpoint

        extra = [e for e in extra if e != "--family-qwen"]
        folder = write_tiny_checkpoint(tmp_path / "qwen", "qwen2_vl", num_layers=4)
        argv += ["--model", str(folder), "--tasks", "t"]
    assert main([*argv, *extra]) == 2
    assert message in capsys.readouterr().err


def test_a_model_needs_tasks(tmp_path, capsys):
    assert main(["eval", "--dry-run", "--model", "x", "--output-dir", str(tmp_path)]) == 2
    assert "--tasks is required" in capsys.readouterr().err


def test_without_lmms_eval_the_message_names_the_extra(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "lmms_eval" else find_spec(name, *a)
    )
    assert main(["eval", "--output-dir", str(tmp_path), "--methods", "unpruned"]) == 2
    assert 'pip install "atp[eval]"' in capsys.readouterr().err


def test_the_dry_run_s_stdout_is_the_commands_alone_in_a_new_process(tmp_path):
    """As a user pipes it (``atp eval --dry-run > commands.txt``): libraries' messages (DeepSpeed
    announces its accelerator when transformers >= 5.25 imports it) go to stderr."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "atp", "eval", "--dry-run", "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines and all(line.startswith("  ") or line.split(":")[0].isidentifier() for line in lines), lines[
        :3
    ]
