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

KEYS = ("layers", "policy", "options", "checkpoint")


@dataclass
class AtpSettings:
    layers: tuple[int, ...]
    policy: str = "atp"
    options: dict = field(default_factory=dict)
    checkpoint: str | None = None


def read_settings(config, num_layers: int, identity: dict) -> AtpSettings:
    """The ``atp`` entry of the model's config, checked as ``atp.attach`` checks its arguments (the
    engine does not start on a bad one). ``identity``: the served model's family and sizes, which a
    checkpoint must agree with (:func:`atp.host.checkpoint.model_identity`'s keys)."""
    from atp.host.attach import policy_layers, saved_choices
    from atp.host.checkpoint import check_identity, read_config
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
        check_identity(saved["model"], identity, checkpoint)
        layers, policy, positions = saved_choices(saved, layers, policy, None)
        if positions != "keep":
            raise ValueError(
                f"the checkpoint {checkpoint} was trained with positions={positions!r}; atp-vllm keeps the "
                "original positions only (positions='keep')"
            )
        options = {**saved["options"], **options}
    policy = "atp" if policy is None else policy
    layers = policy_layers(registry().get("policy", policy).factory, policy, layers, num_layers)
    return AtpSettings(layers=layers, policy=policy, options=options, checkpoint=checkpoint)


def build_policy(settings: AtpSettings, num_layers: int, num_visual: int | None):
    """The policy module, as ``atp.attach`` builds it (weights from the checkpoint when given)."""
    from atp.host.attach import build_policy_module, check_options
    from atp.plugins import registry
    from atp.policies.base import PolicyContext

    factory = registry().get("policy", settings.policy).factory
    check_options(factory, settings.policy, settings.options)
    context = PolicyContext(settings.layers, num_layers, num_visual)
    return build_policy_module(factory, context, settings.options, settings.checkpoint).eval()
