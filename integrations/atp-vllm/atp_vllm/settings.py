"""What a served model prunes: atp's settings read from the model's config, checked at engine start.

A model opts in with ``hf_overrides`` (``LLM(..., hf_overrides=...)`` or ``vllm serve
--hf-overrides '{...}'``)::

    {"architectures": ["AtpLlavaForConditionalGeneration"],
     "atp": {"layers": [2], "policy": "fastv", "options": {"ratio": 0.5}}}

``atp`` takes what ``atp.attach`` takes: ``layers``, ``policy``, ``options`` and ``checkpoint`` (a
folder written by ``handle.save_pretrained``: its layers, policy, options and weights). A policy that
acts before the language model (``pool``) runs at layer 0's input, as on transformers: its kept
tokens keep their original positions, and every layer computes only them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

KEYS = ("layers", "policy", "options", "checkpoint")


@dataclass
class AtpSettings:
    layers: tuple[int, ...]
    policy: str = "atp"
    options: dict = field(default_factory=dict)
    checkpoint: str | None = None


def read_settings(config, num_layers: int) -> AtpSettings:
    """The ``atp`` entry of the model's config, checked (the engine does not start on a bad one)."""
    from atp.host.attach import default_layers, validate_layers
    from atp.host.checkpoint import read_config
    from atp.plugins import registry

    given = getattr(config, "atp", None)
    if given is None:
        raise ValueError(
            "this model class prunes with atp but its config has no 'atp' entry; pass "
            "hf_overrides={'architectures': [...], 'atp': {'layers': [...], 'policy': ..., 'options': {...}}}"
        )
    if not isinstance(given, dict):
        raise TypeError(f"hf_overrides 'atp' must be a dict, got {type(given).__name__}")
    unknown = sorted(set(given) - set(KEYS))
    if unknown:
        raise ValueError(f"hf_overrides 'atp' does not take {', '.join(unknown)}; it takes {', '.join(KEYS)}")
    layers, policy, options = given.get("layers"), given.get("policy"), dict(given.get("options") or {})
    checkpoint = given.get("checkpoint")
    if checkpoint is not None:
        saved = read_config(checkpoint)
        if layers is not None and list(layers) != saved["layers"]:
            raise ValueError(
                f"layers {list(layers)} differ from the checkpoint's {saved['layers']}; leave them out"
            )
        if policy is not None and policy != saved["policy"]:
            raise ValueError(
                f"policy {policy!r} differs from the checkpoint's {saved['policy']!r}; leave it out"
            )
        layers, policy, options = saved["layers"], saved["policy"], {**saved["options"], **options}
    policy = "atp" if policy is None else policy
    if registry().get("policy", policy).factory.pre_llm:  # as atp.attach: it acts before layer 0
        if layers not in (None, [0], (0,)):
            raise ValueError(
                f"policy {policy!r} acts before the language model: leave layers out (or pass [0])"
            )
        return AtpSettings(layers=(0,), policy=policy, options=options, checkpoint=checkpoint)
    layers = validate_layers(default_layers(num_layers) if layers is None else layers, num_layers)
    return AtpSettings(layers=layers, policy=policy, options=options, checkpoint=checkpoint)


def build_policy(settings: AtpSettings, num_layers: int, num_visual: int):
    """The policy module, as ``atp.attach`` builds it (weights from the checkpoint when given)."""
    from atp.host.checkpoint import load_weights
    from atp.plugins import registry
    from atp.policies.base import PolicyContext

    entry = registry().get("policy", settings.policy)
    known = entry.factory.option_names()
    unknown = sorted(set(settings.options) - set(known))
    if unknown:
        raise ValueError(
            f"policy {settings.policy!r} does not take option(s) {', '.join(unknown)}; "
            f"its options are: {', '.join(known) or 'none'}"
        )
    with torch.device("cpu"):
        policy = entry.factory(PolicyContext(settings.layers, num_layers, num_visual), **settings.options)
    if settings.checkpoint is not None:
        load_weights(policy, settings.checkpoint)
        policy.untrained = False
    return policy.eval()
