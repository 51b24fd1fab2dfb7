"""The handle returned by :func:`atp.attach`: statistics, parameters, removal."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from atp.core.stats import PruningStats
from atp.host.distributed import gathered_state, zero3_gathered, zero3_params
from atp.host.runtime import Runtime

CONTAINER_NAME = "atp"


class AtpModules(nn.Module):
    """The ATP part of a model, registered as ``model.atp`` so it moves, trains and
    shards with the model. Holds the policy (and its learned heads).

    On a model not materialised yet (built on the meta device) the policy goes to the meta
    device too, and its weights (loaded from a checkpoint, or as initialised) wait on the CPU in
    ``kept`` until ``model.to_empty`` gives the policy storage: then they are copied in.
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        self.handle: AttachHandle | None = None
        self.kept: dict[str, torch.Tensor] | None = None  # the weights while the policy is on the meta device

    def place(self, device: torch.device) -> None:
        """Move the policy to the model's ``device``; onto the meta device, keep its weights first."""
        state = self.policy.state_dict()
        onto_meta = torch.device(device).type == "meta"
        if onto_meta and state and not any(value.is_meta for value in state.values()):
            self.kept = {name: value.detach().to("cpu", copy=True) for name, value in state.items()}
        self.policy.to(device)

    def _apply(self, fn, recurse: bool = True):
        """Every move of the model passes here (``to``, ``to_empty``, ``half``): once the policy
        has storage again, the kept weights are copied into it."""
        out = super()._apply(fn, recurse)
        if self.kept is not None and not any(value.is_meta for value in self.policy.state_dict().values()):
            from atp.host.checkpoint import restore_weights

            kept, self.kept = self.kept, None
            restore_weights(self.policy, kept, "kept since atp.attach on the meta device")
        return out


class AttachHandle:
    """What :func:`atp.attach` returns. Use as a context manager to remove on exit."""

    def __init__(self, model: nn.Module, runtime: Runtime, restore: dict, spec: dict):
        self.model = model
        self.runtime = runtime
        self._restore = restore
        self._spec = spec  # policy name and options, for save_pretrained
        self.removed = False

    @property
    def layers(self) -> tuple[int, ...]:
        return self.runtime.layers

    @property
    def policy(self) -> nn.Module:
        return self.runtime.policy

    @property
    def stats(self) -> PruningStats:
        """Statistics of the last prefill forward (raises before the first one)."""
        if self.runtime.last_stats is None:
            raise RuntimeError("no forward has run since atp.attach; call the model (or generate) first")
        return self.runtime.last_stats

    def parameters(self) -> Iterator[nn.Parameter]:
        """The ATP parameters (the threshold heads of the atp policy; none for fixed rules)."""
        return self.runtime.policy.parameters()

    def base_parameters(self) -> Iterator[nn.Parameter]:
        """The model's own parameters (everything but ATP)."""
        atp = {id(p) for p in self.parameters()}
        return (p for p in self.model.parameters() if id(p) not in atp)

    def freeze_base_model(self) -> None:
        """Frozen-LM regime: only ATP parameters train (``requires_grad`` off for the rest)."""
        for param in self.base_parameters():
            param.requires_grad_(False)
        for param in self.parameters():
            param.requires_grad_(True)

    def param_groups(self, lr: float = 2e-5, atp_lr: float = 1e-4, weight_decay: float = 0.0) -> list[dict]:
        """Optimizer parameter groups with their own learning rates (paper: 1e-4 ATP, 2e-5 LM).

        Only parameters with ``requires_grad`` are included, so a frozen base model gives one group,
        and a policy without parameters (``keep_all``, ``fixed``, ...) gives only the base model's:
        the Trainer logs the first group's learning rate, which is then the one that trains.
        """
        own = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": own, "lr": atp_lr, "weight_decay": 0.0}] if own else []
        base = [p for p in self.base_parameters() if p.requires_grad]
        if base:
            groups.append({"params": base, "lr": lr, "weight_decay": weight_decay})
        return groups

    @property
    def budget(self):
        return self.runtime.budget

    def config(self) -> dict:
        """What ``save_pretrained`` writes next to the weights."""
        from atp._version import __version__
        from atp.host.checkpoint import model_identity

        budget = self.runtime.budget
        return {
            "atp_version": __version__,
            "layers": list(self.layers),
            "policy": self._spec["policy"],
            "options": self._spec["options"],
            "positions": self._spec.get("positions", "keep"),
            "budget_loss": self._spec.get("budget_loss", "paper"),
            "budget": {
                "lambda_atp": budget.lambda_atp,
                "lambda_target": budget.lambda_target,
                "target_tokens": budget.target_tokens,
            },
            "model": model_identity(self.runtime.adapter),
        }

    def save_pretrained(self, path, state_dict: dict | None = None) -> None:
        """Write the ATP part only: ``atp_config.json`` and ``atp_model.safetensors``.

        ``state_dict`` (keys relative to the policy) replaces the live weights, e.g. a
        gathered copy under DeepSpeed ZeRO-3 or FSDP. Weights sharded by FSDP2 (``fully_shard``:
        DTensors) or partitioned by DeepSpeed ZeRO-3 are gathered first, which is a collective:
        every rank calls this, and the first rank alone writes the full weights.
        """
        from atp.host.checkpoint import save_checkpoint

        kept = getattr(self.model._modules.get(CONTAINER_NAME), "kept", None)
        if state_dict is not None:
            state = state_dict
        elif kept is not None:  # a model not materialised yet: the weights it will get
            state = kept
        else:
            with zero3_gathered(self.policy, write=False):  # DeepSpeed ZeRO-3: every rank calls this
                state = {name: value.detach().clone() for name, value in self.policy.state_dict().items()}
        state, writer = gathered_state(state)
        if zero3_params(self.policy) and torch.distributed.is_initialized():
            writer = writer and torch.distributed.get_rank() == 0
        if writer:
            save_checkpoint(path, self.config(), state)

    def remove(self) -> None:
        """Remove hooks, the ATP modules and the attention function; the model is as before."""
        if self.removed:
            return
        self.runtime.remove()
        model = self.model
        model.set_attn_implementation(self._restore["attn_implementation"])
        if CONTAINER_NAME in model._modules:
            del model._modules[CONTAINER_NAME]
        if self._restore.get("generate_patched"):
            del model.__dict__["generate"]
        ignored = self._restore.get("keys_to_ignore_on_save", "missing")
        if ignored == "missing":
            model.__dict__.pop("_keys_to_ignore_on_save", None)
        else:
            model._keys_to_ignore_on_save = ignored
        self.removed = True

    def __enter__(self) -> AttachHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self.removed else "attached"
        return (
            f"AttachHandle({self.runtime.adapter.family}, layers={list(self.layers)}, "
            f"policy={type(self.policy).__name__}, prune_mode={self.runtime.prune_mode!r}, {state})"
        )
