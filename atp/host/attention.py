"""The attention function atp registers with transformers for the language model.

It is transformers' SDPA forward, plus one thing: when a decoder layer's pre-hook put a
score request into the kwargs (only at the layers that feed an ATP layer, only during
prefill), the request receives the query and key after RoPE and the layer's mask. The
function itself holds no state, so any number of attached models share it.
"""

from __future__ import annotations

import torch

from atp.host import compat

ATTENTION_NAME = "atp_sdpa"
SCORE_REQUEST = "atp_score_request"
COMPILE_MESSAGE = (
    "atp does not support torch.compile yet (its hooks change sequence lengths between layers); "
    "run the attached model uncompiled, or detach atp before compiling"
)


def atp_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """``sdpa_attention_forward`` that first hands (query, key, mask) to a pending score request."""
    if torch.compiler.is_compiling():
        raise RuntimeError(COMPILE_MESSAGE)
    request = kwargs.pop(SCORE_REQUEST, None)
    if request is not None:
        scale = kwargs.get("scaling")
        request(query, key, attention_mask, scale if scale is not None else query.shape[-1] ** -0.5)
    return compat.sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_attention() -> str:
    """Register the function and its (SDPA) mask builder under ``ATTENTION_NAME``; idempotent."""
    compat.register_attention(ATTENTION_NAME, atp_sdpa_attention)
    return ATTENTION_NAME
