"""atp inside vLLM: the pruning core of :mod:`atp.core` run in vLLM's model forward.

``LLM(model, **ENGINE_ARGUMENTS, hf_overrides={"architectures": [...], "atp": {...}})``: the engine
settings atp needs (others are refused at engine start, :func:`atp_vllm.models.check_engine`).
"""

ENGINE_ARGUMENTS = {"enable_prefix_caching": False, "enable_chunked_prefill": False}
