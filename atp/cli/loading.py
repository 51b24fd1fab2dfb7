"""What every command that runs a model shares: where the model comes from, and how atp attaches.

Used by the commands in :mod:`atp.cli` (demo, visualize, bench, train) and by
:mod:`atp.evaluation` (the lmms-eval model); the ``--option`` flag itself is :mod:`atp.cli.options`.

``--model PATH_OR_ID`` loads a checkpoint folder or hub id the way a user loads
``llava-hf/llava-1.5-7b-hf`` (``AutoModelForImageTextToText`` + ``AutoProcessor``, safetensors
only, no code from the checkpoint); without it a command uses its embedded tiny model.
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTION = ("sdpa", "eager")  # atp runs SDPA in the language model; the vision tower may use either


@dataclass
class Loaded:
    """A model in eval mode, its processor (None for an embedded model without one) and a name."""

    model: torch.nn.Module
    processor: object | None
    name: str


def add_model_arguments(parser: argparse.ArgumentParser, default: str = "the embedded tiny model") -> None:
    parser.add_argument(
        "--model",
        default=None,
        metavar="PATH_OR_ID",
        help=f"a checkpoint folder or hub id loaded with AutoModelForImageTextToText (default: {default})",
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="weights' dtype (default float32)"
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)"
    )
    parser.add_argument(
        "--attn-implementation",
        choices=ATTENTION,
        default="sdpa",
        help="the vision tower's attention (the language model always runs atp's SDPA)",
    )


def add_atp_arguments(parser: argparse.ArgumentParser, policy: str = "atp") -> None:
    """``--policy``, ``--layers``, ``--option KEY=VALUE`` and ``--atp-checkpoint``."""
    from atp.arguments import LAYER
    from atp.cli.options import add_option_argument

    parser.add_argument("--policy", default=None, help=f"policy name (default {policy}; see `atp plugins`)")
    parser.add_argument(
        "--layers",
        type=LAYER,
        nargs="+",
        default=None,
        help="ATP layers (default: 4 14 24 scaled to the depth)",
    )
    add_option_argument(parser)
    parser.add_argument(
        "--atp-checkpoint",
        default=None,
        metavar="DIR",
        help="a folder written by handle.save_pretrained (restores layers, policy, options and weights)",
    )


def device_of(args: argparse.Namespace) -> str:
    device = getattr(args, "device", None)
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here; use --device cpu")
    return device


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def load(name: str, dtype: str = "float32", device: str = "cpu", attn_implementation: str = "sdpa") -> Loaded:
    """A checkpoint folder or hub id as ``AutoModelForImageTextToText`` and ``AutoProcessor`` load it."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(sorted(DTYPES))}, got {dtype!r}")
    if attn_implementation not in ATTENTION:
        raise ValueError(
            f"attn_implementation must be one of {', '.join(ATTENTION)}, got {attn_implementation!r}"
        )
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            name,
            dtype=DTYPES[dtype],
            attn_implementation={"text_config": "sdpa", "vision_config": attn_implementation},
            use_safetensors=True,
            trust_remote_code=False,
        )
        processor = AutoProcessor.from_pretrained(name, trust_remote_code=False)
    except (OSError, ValueError) as error:
        if "kernels" in str(error).lower():  # transformers >= 5.25 loads with hub kernels by default
            raise ValueError(
                f"could not load {name!r}: {error} (transformers {transformers_version()} switches hub kernels on "
                "when loading: install the kernels release it names, or set USE_HUB_KERNELS=0 to load "
                "without them)"
            ) from error
        raise ValueError(
            f"could not load {name!r} as an image-text-to-text model with its processor: {error} "
            "(a folder needs config.json, model.safetensors and the processor files; a hub id needs the "
            "network or the local cache; `atp tiny-checkpoint DIR` writes a tiny one offline)"
        ) from error
    model.generation_config.pad_token_id = model.generation_config.pad_token_id or getattr(
        getattr(processor, "tokenizer", None), "pad_token_id", None
    )
    return Loaded(model.to(device).eval(), processor, str(name))


def load_from_args(args: argparse.Namespace, embedded) -> Loaded:
    """``--model`` loaded, or ``embedded()`` (a Loaded) when none is given; moved to ``--device``."""
    device = device_of(args)
    if args.model is None:
        loaded = embedded()
        loaded.model.to(device=device, dtype=DTYPES[args.dtype or "float32"])
        return loaded
    return load(args.model, args.dtype or "float32", device, args.attn_implementation)


def attach_from_args(model, args: argparse.Namespace, policy: str = "atp", quiet: bool = True, **overrides):
    """``atp.attach`` with the ATP options of a command line; ``overrides`` are attach keywords
    (and policy options) the command adds. ``quiet`` hides the untrained-heads warning."""
    from atp.cli.options import parse_options
    from atp.host.attach import attach

    name = args.policy
    if args.atp_checkpoint is None:
        name = name or policy
    options = parse_options(args.option, name if name is not None else _saved_policy(args.atp_checkpoint))
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore", UserWarning)
        return attach(
            model,
            layers=args.layers,
            policy=name,
            from_pretrained=args.atp_checkpoint,
            **{**overrides, **options},
        )


def _saved_policy(folder) -> str:
    from atp.host.checkpoint import read_config

    return read_config(folder)["policy"]
