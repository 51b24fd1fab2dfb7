"""ATP checkpoints: a JSON config plus safetensors weights of the ATP part only.

Nothing is ever unpickled and nothing in a checkpoint is executed: the config is plain JSON
(component names are looked up in the registry) and the weights are safetensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from atp.host.distributed import zero3_gathered

CONFIG_NAME = "atp_config.json"
WEIGHTS_NAME = "atp_model.safetensors"
FORMAT = "atp-checkpoint/2"
# format 1: threshold heads without the width scaling, the step-valued spatial score (Eq. 5 as
# printed) and soft budget counts; its weights would decide differently here
OLDER = {
    "atp-checkpoint/1": "atp 0.1 (before the per-instance learning fixes of the heads, spatial score and budget)"
}


def model_identity(adapter) -> dict:
    """What a checkpoint must agree with: family, sizes, visual tokens (no weights needed)."""
    text = adapter.text_config()
    return {
        "family": adapter.family,
        "model_type": getattr(adapter.model.config, "model_type", None),
        "hidden_size": getattr(text, "hidden_size", None),
        "num_layers": len(adapter.decoder_layers()),
        "num_visual_tokens": adapter.num_visual_tokens(),
        "name_or_path": getattr(adapter.model.config, "_name_or_path", "") or "",
    }


def save_checkpoint(path: str | os.PathLike, config: dict, state_dict: dict[str, torch.Tensor]) -> Path:
    """Write ``atp_config.json`` and ``atp_model.safetensors`` into the folder ``path``."""
    folder = Path(path)
    try:
        text = json.dumps({"format": FORMAT, **config}, indent=2, sort_keys=True)
    except TypeError as error:
        raise ValueError(
            f"the attach options cannot be saved as JSON ({error}); only policies with JSON options "
            "(numbers, strings, lists) can be saved"
        ) from None
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state_dict.items()}
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(text + "\n")
    return folder


def read_config(path: str | os.PathLike) -> dict:
    """The checkpoint's config, validated; a clear error for a missing or foreign folder."""
    folder = Path(path)
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_file.is_file() or not weights_file.is_file():
        raise FileNotFoundError(
            f"{folder} is not an atp checkpoint: expected {CONFIG_NAME} and {WEIGHTS_NAME} "
            "(written by handle.save_pretrained)"
        )
    from atp.arguments import read_json

    config = read_json(config_file, "atp checkpoint config")
    if config.get("format") in OLDER:
        raise ValueError(
            f"{config_file} has format {config.get('format')!r}, written by {OLDER[config['format']]}: its "
            f"threshold heads were trained for another parameterisation and would prune differently here "
            f"(this atp reads {FORMAT!r}); retrain the ATP modules (atp train), or load them with the atp "
            "release that wrote them"
        )
    if config.get("format") != FORMAT:
        raise ValueError(f"{config_file} has format {config.get('format')!r}; this atp reads {FORMAT!r}")
    for key in ("layers", "policy", "options", "model"):
        if key not in config:
            raise ValueError(f"{config_file} has no {key!r} entry; it is not a complete atp checkpoint")
    return config


def check_identity(saved: dict, current: dict, path) -> None:
    """Raise a ValueError naming every size that differs between checkpoint and model."""
    keys = ("family", "hidden_size", "num_layers", "num_visual_tokens")
    mismatches = [
        f"{key}: checkpoint {saved.get(key)!r}, model {current.get(key)!r}"
        for key in keys
        if saved.get(key) != current.get(key)
    ]
    if mismatches:
        raise ValueError(
            f"the atp checkpoint {path} was made for another model ({saved.get('name_or_path') or 'unnamed'}): "
            + "; ".join(mismatches)
        )


def load_weights(module: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load ``atp_model.safetensors`` into ``module`` strictly, naming offending keys."""
    file = Path(path) / WEIGHTS_NAME
    try:
        state = load_file(str(file))
    except (OSError, SafetensorError) as error:  # safetensors' own error has no path in it
        raise ValueError(
            f"the atp checkpoint weights {file} cannot be read ({error}); save the checkpoint again "
            "with handle.save_pretrained"
        ) from None
    with zero3_gathered(module, write=True):  # DeepSpeed ZeRO-3: full shapes inside, every rank loads
        _load_strict(module, state, path)


def restore_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` (full tensors) into ``module`` strictly, as :func:`load_weights` does with a file."""
    with zero3_gathered(module, write=True):
        _load_strict(module, state, source)


def _load_strict(module: torch.nn.Module, state: dict, path) -> None:
    expected = module.state_dict()
    if any(tensor.is_meta for tensor in expected.values()):
        raise ValueError(
            f"cannot load the atp weights {path}: the ATP heads are on the meta device (the model is not "
            "materialised), so nothing would be kept. Materialise the model first (model.to_empty(device=...) "
            "and load its weights), then load these; or attach with from_pretrained, which keeps the weights "
            "until model.to_empty"
        )
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{name}: checkpoint {tuple(state[name].shape)}, model {tuple(expected[name].shape)}"
        for name in sorted(set(state) & set(expected))
        if state[name].shape != expected[name].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if shapes:
            parts.append(f"shape mismatches {shapes}")
        raise ValueError(
            f"the atp checkpoint {path} does not fit this policy: "
            + "; ".join(parts)
            + "; attach it with the options it was saved with (leave policy options out, they are read "
            "from the checkpoint's atp_config.json)"
        )
    with torch.no_grad():
        for name, tensor in expected.items():
            tensor.copy_(_placed(state[name].to(tensor.dtype), tensor))


def _placed(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` (a full tensor) laid out as ``like``: an FSDP2 parameter is a DTensor shard, and
    each process keeps its own slice (every process read the same file: nothing is sent)."""
    if type(like).__name__ != "DTensor":
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
