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

from atp.evaluation.tiny_tasks import CHAT_TASK, RECORDS, TASKS, write_tiny_tasks
from atp.tiny import write_tiny_checkpoint

NUM_VISUAL = 16  # per image of the tiny LLaVA: 32 x 32 pixels, 8 x 8 patches
NUM_LAYERS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    checkpoint = write_tiny_checkpoint(root / "tiny-llava", family="llava", num_layers=NUM_LAYERS)
    return root, checkpoint, write_tiny_tasks(root / "tasks")


@pytest.fixture(scope="module")
def qwen_setup(setup):
    root, _, tasks = setup
    checkpoint = write_tiny_checkpoint(root / "tiny-qwen2-vl", family="qwen2_vl", num_layers=NUM_LAYERS)
    return root, checkpoint, tasks


def run_lmms_eval(
    setup, name: str, model_args: str, *launcher: str, model: str = "atp", tasks_run=TASKS
) -> tuple[dict, dict[str, list[dict]], str]:
    """lmms-eval on ``tasks_run``; the results file, the logged samples of each task and the log."""
    root, checkpoint, tasks = setup
    output = root / name
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(root / "datasets-cache"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [*(launcher or (sys.executable,)), "-m", "lmms_eval", "--model", model]
    command += ["--model_args", f"pretrained={checkpoint},dtype=float32,device=cpu,batch_size=2{model_args}"]
    command += ["--tasks", ",".join(tasks_run), "--include_path", str(tasks), "--batch_size", "2"]
    command += ["--log_samples", "--output_path", str(output), "--verbosity", "INFO"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=root)
    log = f"\n--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-6000:]}"
    results = sorted(output.rglob("*_results.json"))
    assert done.returncode == 0 and len(results) == 1, f"lmms-eval wrote {results}{log}"
    samples = {}
    for task in tasks_run:
        files = sorted(output.rglob(f"*_samples_{task}.jsonl"))
        assert len(files) == 1, f"no samples for {task}: {files}{log}"
        samples[task] = [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]
    return json.loads(results[0].read_text()), samples, done.stdout + done.stderr


def check_run(results: dict, samples: dict, expected, tasks_run=TASKS) -> None:
    """Scores present; every logged request holds ``expected(record) -> (kept_tokens, avg_tokens)``;
    the results' summary holds the mean over documents."""
    for task in {"atp_tiny_gen", CHAT_TASK} & set(tasks_run):
        assert "exact_match,none" in results["results"][task]
        assert all(isinstance(s["filtered_resps"][0], str) for s in samples[task])
    if "atp_tiny_mc" in tasks_run:
        assert "acc,none" in results["results"]["atp_tiny_mc"]
    for task in tasks_run:
        assert sorted(s["doc_id"] for s in samples[task]) == list(range(len(RECORDS)))
        for sample in samples[task]:
            kept, avg_tokens = expected(RECORDS[sample["doc_id"]])
            counts = sample["token_counts"]
            assert len(counts) == (2 if task == "atp_tiny_mc" else 1)  # one request per choice
            for entry in counts:
                assert entry["kept_tokens"] == kept
                assert entry["avg_tokens"] == pytest.approx(avg_tokens)
                assert entry["input_tokens"] > NUM_VISUAL * len(RECORDS[sample["doc_id"]]["images"])
    mean = sum(expected(record)[1] for record in RECORDS) / len(RECORDS)
    summary = results["throughput"]
    assert summary["avg_tokens"] == pytest.approx(mean)
    for task in tasks_run:
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


def input_tokens(samples: list[dict]) -> dict[int, int]:
    return {s["doc_id"]: s["token_counts"][0]["input_tokens"] for s in samples}


def check_chat(results: dict, samples: dict, expected) -> None:
    """A chat run over the plain task and the task with its own messages: kept tokens as expected;
    the own messages (a system turn before the question) made longer prompts of the same images."""
    check_run(results, samples, expected, tasks_run=("atp_tiny_gen", CHAT_TASK))
    assert results["config"]["model"] == "atp_chat"
    plain, own = input_tokens(samples["atp_tiny_gen"]), input_tokens(samples[CHAT_TASK])
    assert all(own[doc] > plain[doc] for doc in plain), (plain, own)


def test_chat_requests_follow_the_task_messages(setup):
    """``--model atp_chat``: lmms-eval's chat request type (messages from the task), batched."""
    chat = ("atp_tiny_gen", CHAT_TASK)
    results, samples, _ = run_lmms_eval(setup, "chat", FIXED, model="atp_chat", tasks_run=chat)
    check_chat(results, samples, fixed_half)
    _, simple, _ = run_lmms_eval(setup, "chat-simple", FIXED, tasks_run=("atp_tiny_gen",))
    answers = {s["doc_id"]: s["filtered_resps"] for s in samples["atp_tiny_gen"]}
    # the chat model's messages for a plain task are one user turn, images first: the simple
    # model's prompt, so the same answers
    assert answers == {s["doc_id"]: s["filtered_resps"] for s in simple["atp_tiny_gen"]}


def test_chat_model_refuses_log_likelihood_requests(setup):
    from types import SimpleNamespace

    from atp.evaluation.lmms import AtpChatLMM

    _, checkpoint, _ = setup
    model = AtpChatLMM.create_from_arg_string(f"pretrained={checkpoint},device=cpu")
    with pytest.raises(NotImplementedError, match="--model atp"):
        model.loglikelihood([SimpleNamespace(args=("q", "yes"))])


def qwen_visual_tokens(checkpoint, record) -> int:
    """Image tokens the tiny Qwen2-VL processor makes of the record's images (dynamic resolution)."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    images = [Image.new("RGB", (48, 40)) for _ in record["images"]]
    text = "".join("<|vision_start|><|image_pad|><|vision_end|>" for _ in images) + "hi"
    ids = processor(text=[text], images=images, return_tensors="pt")["input_ids"]
    return int((ids == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())


def test_qwen2_vl_runs_both_request_types(qwen_setup):
    """Qwen2-VL (dynamic resolution, M-RoPE) through lmms-eval: kept tokens half of its own count."""
    checkpoint = qwen_setup[1]
    results, samples, _ = run_lmms_eval(qwen_setup, "qwen", FIXED)

    def expected(record):
        visual = qwen_visual_tokens(checkpoint, record)
        first = round(visual * 0.5)
        second = round(first * 0.5)
        return [first, second], (visual + first + 2 * second) / NUM_LAYERS

    assert qwen_visual_tokens(checkpoint, RECORDS[0]) > 0
    check_run(results, samples, expected)
    chat = ("atp_tiny_gen", CHAT_TASK)
    results, samples, _ = run_lmms_eval(qwen_setup, "qwen-chat", FIXED, model="atp_chat", tasks_run=chat)
    check_chat(results, samples, expected)


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
    with pytest.raises(ValueError, match="layers must be an int >= 0, got 1,2x; give layers as ints"):
        parse_model_arguments(pretrained="x", policy="fixed", layers="1,2x")
    with pytest.raises(ValueError, match="pretrained"):
        parse_model_arguments(policy="fixed")


def test_missing_lmms_eval_names_the_extra():
    code = "import sys; sys.modules['lmms_eval'] = None; import atp.evaluation.lmms"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert 'pip install "atp[eval]"' in done.stderr, done.stderr[-2000:]


def atp_eval(tmp_path, *arguments: str) -> tuple[dict, str]:
    output = tmp_path / "eval"
    done = subprocess.run(
        [sys.executable, "-m", "atp", "eval", "--output-dir", str(output), *arguments],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (output / "table.md").read_text() in done.stdout
    return json.loads((output / "table.json").read_text()), done.stdout


def test_atp_eval_compares_methods_at_a_matched_token_metric(tmp_path):
    """``atp eval``: one lmms-eval run per method at half the visual tokens, the Table 1 layout."""
    record, table = atp_eval(
        tmp_path, "--methods", "unpruned,fastv,fixed", "--model-args", "dtype=float32,device=cpu,batch_size=2"
    )
    rows = {row["method"]: row for row in record["rows"]}
    assert list(rows) == ["unpruned", "fastv", "fixed"] and record["fraction"] == 0.5
    unpruned = sum(NUM_VISUAL * len(r["images"]) for r in RECORDS) / len(RECORDS)
    assert rows["unpruned"]["tokens"] == pytest.approx(unpruned)
    for name in ("fastv", "fixed"):  # matched: half, up to each image's rounding
        assert rows[name]["tokens"] == pytest.approx(unpruned / 2, rel=0.05)
    assert rows["unpruned"]["retention"] == pytest.approx(1.0)
    scores = [key for key in rows["unpruned"] if key not in ("method", "model_args", "tokens", "retention")]
    assert {"atp_tiny_gen exact_match", "atp_tiny_mc acc"} <= set(scores)
    assert all(key in rows["fixed"] for key in scores)
    assert "| fixed | `policy=fixed,layers=1;2;3," in table and "| Token |" in table


def test_atp_eval_runs_methods_of_your_own(tmp_path):
    record, _ = atp_eval(tmp_path, "--method", "unpruned=", "--method", "half=" + FIXED.lstrip(","))
    rows = {row["method"]: row for row in record["rows"]}
    assert rows["half"]["tokens"] == pytest.approx(sum(fixed_half(r)[1] for r in RECORDS) / len(RECORDS))
