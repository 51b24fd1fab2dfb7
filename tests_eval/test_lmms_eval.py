"""lmms-eval runs the atp model end to end on a local task (tiny random LLaVA, no network).

Run in a virtualenv with the eval extra (``pip install -e ".[dev,eval]"``), apart from the main
suite: lmms-eval pulls in latex2sympy2, which installs a top-level ``tests`` package that shadows
the project's ``tests`` folder.

Each test runs lmms-eval's own command line in a subprocess and reads its output files: lmms-eval
exits 0 even when the model fails to load, so the exit status alone proves nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from atp.evaluation.tiny_tasks import RECORDS, TASKS, write_tiny_tasks
from atp.tiny import write_tiny_checkpoint

NUM_VISUAL = 16  # per image of the tiny LLaVA: 32 x 32 pixels, 8 x 8 patches
NUM_LAYERS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    checkpoint = write_tiny_checkpoint(root / "tiny-llava", family="llava", num_layers=NUM_LAYERS)
    return root, checkpoint, write_tiny_tasks(root / "tasks")


def run_lmms_eval(
    setup, name: str, model_args: str, *launcher: str
) -> tuple[dict, dict[str, list[dict]], str]:
    """lmms-eval on both tasks; the results file, the logged samples of each task and the log."""
    root, checkpoint, tasks = setup
    output = root / name
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(root / "datasets-cache"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [*(launcher or (sys.executable,)), "-m", "lmms_eval", "--model", "atp"]
    command += ["--model_args", f"pretrained={checkpoint},dtype=float32,device=cpu,batch_size=2{model_args}"]
    command += ["--tasks", ",".join(TASKS), "--include_path", str(tasks), "--batch_size", "2"]
    command += ["--log_samples", "--output_path", str(output), "--verbosity", "INFO"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=root)
    log = f"\n--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-6000:]}"
    results = sorted(output.rglob("*_results.json"))
    assert done.returncode == 0 and len(results) == 1, f"lmms-eval wrote {results}{log}"
    samples = {}
    for task in TASKS:
        files = sorted(output.rglob(f"*_samples_{task}.jsonl"))
        assert len(files) == 1, f"no samples for {task}: {files}{log}"
        samples[task] = [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]
    return json.loads(results[0].read_text()), samples, done.stdout + done.stderr


def check_run(results: dict, samples: dict, expected) -> None:
    """Scores present; every logged request holds ``expected(record) -> (kept_tokens, avg_tokens)``;
    the results' summary holds the mean over documents."""
    assert "exact_match,none" in results["results"]["atp_tiny_gen"]
    assert "acc,none" in results["results"]["atp_tiny_mc"]
    for task in TASKS:
        assert sorted(s["doc_id"] for s in samples[task]) == list(range(len(RECORDS)))
        for sample in samples[task]:
            kept, avg_tokens = expected(RECORDS[sample["doc_id"]])
            counts = sample["token_counts"]
            assert len(counts) == (1 if task == "atp_tiny_gen" else 2)  # one request per choice
            for entry in counts:
                assert entry["kept_tokens"] == kept
                assert entry["avg_tokens"] == pytest.approx(avg_tokens)
                assert entry["input_tokens"] > NUM_VISUAL * len(RECORDS[sample["doc_id"]]["images"])
    assert all(isinstance(s["filtered_resps"][0], str) for s in samples["atp_tiny_gen"])
    mean = sum(expected(record)[1] for record in RECORDS) / len(RECORDS)
    summary = results["throughput"]
    assert summary["avg_tokens"] == pytest.approx(mean)
    for task in TASKS:
        assert summary[f"avg_tokens/{task}"] == pytest.approx(mean)


def fixed_half(record) -> tuple[list[int], float]:
    """fixed keep=[0.5, 0.5] at layers [1, 2]: 16 visual tokens per image, half kept before layer 1
    and half of those before layer 2; layer 0 sees 16, layer 1 sees 8, layers 2 and 3 see 4:
    (16 + 8 + 4 + 4) / 4 = 8 per image."""
    images = len(record["images"])
    return [8 * images, 4 * images], 8.0 * images


FIXED = ",policy=fixed,layers=1;2,option.keep=[0.5,0.5],max_new_tokens=4"


def test_fixed_policy_records_kept_tokens(setup):
    results, samples, _ = run_lmms_eval(setup, "fixed", FIXED)
    check_run(results, samples, fixed_half)
    assert results["config"]["model"] == "atp"


def test_unpruned_baseline_sees_every_visual_token(setup):
    results, samples, _ = run_lmms_eval(setup, "unpruned", "")
    check_run(results, samples, lambda record: ([], float(NUM_VISUAL * len(record["images"]))))


def test_data_parallel_run_with_two_processes(setup, monkeypatch):
    """``accelerate launch`` with two CPU processes: every document once, summary over both ranks."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    accelerate += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    results, samples, log = run_lmms_eval(setup, "data-parallel", FIXED, *accelerate)
    assert "Running on rank 1" in log, log[-3000:]
    check_run(results, samples, fixed_half)


def test_data_parallel_rank_and_world_size_come_from_accelerate(setup, monkeypatch):
    from types import SimpleNamespace

    from atp.evaluation import lmms

    _, checkpoint, _ = setup
    fake = SimpleNamespace(process_index=1, num_processes=2, local_process_index=1)
    monkeypatch.setattr(lmms, "_accelerator", lambda: fake)
    model = lmms.AtpLMM.create_from_arg_string(
        f"pretrained={checkpoint},policy=fixed,layers=1;2,option.keep=[0.5,0.5],device=cpu,batch_size=3",
        {"batch_size": "1", "max_batch_size": None, "device": None},
    )
    assert (model.rank, model.world_size) == (1, 2)
    assert model.batch_size == 3  # --model_args win over the command line's --batch_size
    assert model.handle.layers == (1, 2)
    model.handle.remove()


def test_model_arguments():
    from atp.evaluation.arguments import parse_model_arguments

    args = parse_model_arguments(
        pretrained="x", policy="fixed", layers="4;14;24", **{"option.keep": "[0.5,0.5,0.5]"}
    )
    assert args.layers == [4, 14, 24] and args.options == ["keep=[0.5,0.5,0.5]"] and args.prunes
    args = parse_model_arguments(
        pretrained="x", policy="fastv", layers=2, **{"option.ratio": 0.5, "option.x": False}
    )
    assert args.layers == [2] and args.options == ["ratio=0.5", "x=false"]
    assert not parse_model_arguments(pretrained="x").prunes
    with pytest.raises(TypeError, match="does not take layer"):
        parse_model_arguments(pretrained="x", layer="1")
    with pytest.raises(ValueError, match="needs policy"):
        parse_model_arguments(pretrained="x", **{"option.keep": "[1]"})
    with pytest.raises(ValueError, match="layers must be integers"):
        parse_model_arguments(pretrained="x", policy="fixed", layers="1,2x")
    with pytest.raises(ValueError, match="pretrained"):
        parse_model_arguments(policy="fixed")


def test_missing_lmms_eval_names_the_extra():
    code = "import sys; sys.modules['lmms_eval'] = None; import atp.evaluation.lmms"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert 'pip install "atp[eval]"' in done.stderr, done.stderr[-2000:]


def test_the_table_script_compares_methods_with_their_tokens_and_retention(tmp_path):
    """benchmarks/lmms_eval_table.py: one lmms-eval run per method, the Table 1 layout."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "lmms_eval_table.py"
    output = tmp_path / "table.json"
    methods = ["--method", "unpruned=", "--method", "fixed=policy=fixed,layers=1;2,option.keep=[0.5,0.5]"]
    done = subprocess.run(
        [sys.executable, str(script), *methods, "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["method"]: row for row in json.loads(output.read_text())["rows"]}
    assert set(rows) == {"unpruned", "fixed"}
    assert rows["fixed"]["tokens"] < rows["unpruned"]["tokens"]
    assert rows["unpruned"]["retention"] == pytest.approx(1.0)
    assert "| fixed |" in done.stdout and "retention" in done.stdout
    scores = [key for key in rows["unpruned"] if key not in ("method", "model_args", "tokens", "retention")]
    assert scores and all(key in rows["fixed"] for key in scores)
