"""lmms-eval's ``--model_args`` (``key=value`` pairs split on commas) -> atp's load and attach settings."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from atp.arguments import COUNT, LAYER

OPTION_PREFIX = "option."


@dataclass
class ModelArguments:
    """What the ``atp`` lmms-eval model takes.

    ``layers`` is ``"4;14;24"`` (lmms-eval splits ``--model_args`` on commas) or one int;
    ``options`` are the ``option.KEY=VALUE`` pairs, VALUE read as JSON like ``--option``.
    No ``policy`` and no ``atp_checkpoint``: the unpruned model (nothing attached).
    """

    pretrained: str
    atp_checkpoint: str | None = None
    policy: str | None = None
    layers: list[int] | None = None
    dtype: str = "float32"
    device: str | None = None
    attn_implementation: str = "sdpa"
    batch_size: int = 1
    max_new_tokens: int | None = None
    options: list[str] = field(default_factory=list)

    @property
    def prunes(self) -> bool:
        return self.policy is not None or self.atp_checkpoint is not None


def parse_model_arguments(pretrained: str | None = None, **kwargs) -> ModelArguments:
    """The keyword arguments lmms-eval passes (already split and typed) -> :class:`ModelArguments`."""
    if not pretrained:
        raise ValueError(
            "the atp model needs pretrained=PATH_OR_ID, e.g. --model_args pretrained=llava-hf/llava-1.5-7b-hf"
        )
    options = [
        _option_pair(key[len(OPTION_PREFIX) :], kwargs.pop(key))
        for key in list(kwargs)
        if key.startswith(OPTION_PREFIX)
    ]
    known = set(ModelArguments.__dataclass_fields__) - {"pretrained", "options"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(
            f"the atp model does not take {', '.join(unknown)}; it takes pretrained, {', '.join(sorted(known))} "
            "and policy options as option.KEY=VALUE (e.g. option.keep=[144,72,36])"
        )
    if options and kwargs.get("policy") is None and kwargs.get("atp_checkpoint") is None:
        raise ValueError("option.KEY=VALUE needs policy=NAME (or atp_checkpoint=DIR)")
    if kwargs.get("layers") is not None:
        kwargs["layers"] = _layers(kwargs["layers"])
    for name in ("batch_size", "max_new_tokens"):
        if kwargs.get(name) is not None:
            kwargs[name] = COUNT.check(kwargs[name], name)  # as --batch-size: 2.7 is refused, not cut to 2
    return ModelArguments(str(pretrained), options=options, **kwargs)


def split_model_args(text: str) -> dict[str, str]:
    """``key=value`` pairs of a ``--model_args`` string, split on the commas outside ``[...]``
    (as lmms-eval splits them), values left as text."""
    return dict(part.split("=", 1) for part in re.split(r",(?![^\[]*\])", text) if part)


def _layers(value) -> list[int]:
    """``4;14;24`` or one layer (lmms-eval has turned ``4`` into an int) -> ``[4, 14, 24]``."""
    parts = [part for part in value.split(";") if part.strip()] if isinstance(value, str) else [value]
    try:
        return [LAYER.check(part, "layers") for part in parts]
    except (TypeError, ValueError) as error:
        raise ValueError(f"{error}; give layers as ints separated by ';' (e.g. layers=4;14;24)") from None


def _option_pair(key: str, value) -> str:
    """``KEY=VALUE`` for :func:`atp.cli.options.parse_options` (lmms-eval has turned true / 0.5 into Python)."""
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"
