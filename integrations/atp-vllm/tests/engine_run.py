"""Run one vLLM engine on a request spec and print what it generated (one JSON line).

``python engine_run.py SPEC_JSON``; SPEC: ``model`` (a folder), ``atp`` (the hf_overrides entry, or
null for vLLM's own class), ``prompts`` and ``images`` (seeds of random 32 x 32 pictures),
``sizes`` (their (height, width), 32 x 32 by default), ``architecture`` (atp's model class, LLaVA's by
default), ``max_tokens``, ``mode`` ("batch": all requests at once; "staggered": a request joins while the
others decode) and ``engine`` (more engine arguments). Each run is its own process: vLLM's engine
holds process-wide state.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def picture(seed: int, size: tuple[int, int] = (32, 32)):
    """A random picture, ``size`` = (height, width) in pixels."""
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.default_rng(seed).random((*size, 3)) * 255).astype("uint8"))


def engine(spec: dict):
    from atp_vllm import ENGINE_ARGUMENTS
    from vllm import LLM

    arguments = {
        "model": spec["model"],
        "dtype": "float32",
        "max_model_len": 1024,
        "limit_mm_per_prompt": {"image": 1},
        "seed": 0,
        "enforce_eager": True,  # starts in half the time; the compile-mode tests turn it off
        **ENGINE_ARGUMENTS,
        **spec.get("engine", {}),
    }
    if spec.get("atp") is not None:
        arguments["hf_overrides"] = {
            "architectures": [spec.get("architecture", "AtpLlavaForConditionalGeneration")],
            "atp": spec["atp"],
        }
    return LLM(**arguments)


def outputs(results) -> list[dict]:
    return [
        {
            "prompt_logprobs": [
                None if step is None else step[token].logprob
                for step, token in zip(result.prompt_logprobs, result.prompt_token_ids)
            ]
            if result.prompt_logprobs is not None
            else None,
            "tokens": list(result.outputs[0].token_ids),
            "logprobs": [
                step[token].logprob
                for step, token in zip(result.outputs[0].logprobs, result.outputs[0].token_ids)
            ],
        }
        for result in results
    ]


def staggered(llm, requests, params) -> list[dict]:
    """The first request alone for three steps, then the others join while it decodes."""
    engine_core = llm.llm_engine
    engine_core.add_request("0", requests[0], params)
    for _ in range(3):
        engine_core.step()
    for index, request in enumerate(requests[1:], start=1):
        engine_core.add_request(str(index), request, params)
    finished = {}
    while engine_core.has_unfinished_requests():
        for result in engine_core.step():
            if result.finished:
                finished[result.request_id] = result
    return outputs([finished[str(index)] for index in range(len(requests))])


def atp_graphs(llm) -> int:
    """The graphs dynamo holds for atp's compiled layer runs."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    return sum(len(_debug_get_cache_entry_list(code)) for code in model.atp.runs.codes.values())


def main() -> None:
    from vllm import SamplingParams

    spec = json.loads(sys.argv[1])
    llm = engine(spec)
    in_process = os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and spec.get("atp") is not None
    graphs_at_start = atp_graphs(llm) if in_process else None  # compiled while the engine started
    requests = [
        {"prompt": prompt, "multi_modal_data": {"image": picture(seed, size)}}
        for prompt, seed, size in zip(spec["prompts"], spec["images"], spec.get("sizes") or [(32, 32)] * 3)
    ]
    params = SamplingParams(
        max_tokens=spec.get("max_tokens", 8),
        temperature=0.0,
        logprobs=0,
        prompt_logprobs=0 if spec.get("prompt_logprobs") else None,
    )
    if spec.get("mode", "batch") == "staggered":
        results = staggered(llm, requests, params)
    else:
        results = outputs(llm.generate(requests, params, use_tqdm=False))
    kept, compiled = None, None
    if in_process:
        model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
        kept = model.atp.kept_log
        compiled = {  # the layer runs atp built, and the graphs dynamo holds for them
            "runs": sorted(model.atp.runs.runs),
            "graphs_at_start": graphs_at_start,
            "graphs": atp_graphs(llm),
        }
    print("ATP-RESULT " + json.dumps({"outputs": results, "kept": kept, "compiled": compiled}), flush=True)


if __name__ == "__main__":
    main()
