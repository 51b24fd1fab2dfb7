"""Training on several processes and with gradient checkpointing: what atp adds so that they work.

* DDP / FSDP / DeepSpeed ZeRO-3: every trainable ATP parameter (and the projector) joins the graph
  in every step, also without images (:func:`join_backward`, :func:`add_budget_terms`), so that
  every rank runs the same collectives; ZeRO-3 ranks agree on having images first
  (:func:`check_zero3_modalities`).
* Gradient checkpointing re-runs a layer's hooks in the backward pass: :func:`replay` runs the
  layer's prefill step again on the state it first saw.
* Saving and loading under FSDP2 / ZeRO-3: :func:`gathered_state`, :func:`zero3_gathered`.
* The budget terms (Eq. 12-13, weighted) join ``outputs.loss`` in training (:func:`add_budget_terms`).
"""

from __future__ import annotations

import contextlib

import torch

from atp.core.state import Prefill
from atp.host import compat


def joinable(params):
    """The parameters a zero term may read outside their module's forward: not a DTensor (a shard
    of another FSDP unit, one this forward does not gather) and not partitioned by DeepSpeed
    ZeRO-3 (an empty placeholder outside its module's forward; ZeRO-3 reduces a missing gradient
    as zero by itself)."""
    return (p for p in params if type(p).__name__ != "DTensor" and not hasattr(p, "ds_id"))


def zero3_params(module: torch.nn.Module) -> list:
    """``module``'s parameters partitioned by DeepSpeed ZeRO-3."""
    return [param for param in module.parameters() if hasattr(param, "ds_id")]


def check_zero3_modalities(has_images: bool, input_ids) -> None:
    """Under ZeRO-3 every module gathers its weights with a collective when it runs, so a rank
    whose micro-batch has images (the vision tower and ATP heads run) and one without would wait
    in different collectives. Agree on it first (two tiny all-reduces) and raise instead."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    flags = torch.tensor([float(has_images), -float(has_images)], device=input_ids.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if flags[0] != -flags[1]:
        raise RuntimeError(
            "under DeepSpeed ZeRO-3 the ranks' micro-batches of one step must all have images or all have "
            "none (each module gathers its partitioned weights with a collective when it runs, so mixed "
            "steps would hang); group batches by modality: `atp train --group-by-modality-length` or "
            "AtpTrainer(group_by_modality_length=True), or use FSDP (configs/accelerate/fsdp.yaml), "
            "which trains mixed steps"
        )


def join_backward(rt, args, kwargs):
    """A training batch without images: add a zero that depends on every trainable ATP
    parameter and every trainable parameter outside the language model (the projector, a
    vision tower that trains) to the hidden states entering the first ATP layer.

    FSDP needs both: each sharded decoder layer gathers its weights again in the backward
    pass, so every rank must run the backward through the same layers (in a batch with images
    the soft masks reach them); and a sharded unit reduces the gradients its parameters have,
    so a projector without a gradient on one rank only is a collective of another size. Either
    way a rank would wait for a collective the others never start. The values are unchanged;
    the unused parameters get a zero gradient instead of none (as under DeepSpeed ZeRO).
    """
    language = {id(param) for param in rt.adapter.language_model().parameters()}
    params = [param for param in joinable(rt.policy.parameters()) if param.requires_grad]
    atp = {id(param) for param in params}
    params += [
        param
        for param in joinable(rt.adapter.multimodal_model().parameters())
        if param.requires_grad and id(param) not in language | atp
    ]
    if not params:
        return None
    hidden = compat.layer_hidden(args, kwargs)
    zero = sum(param.sum() * 0.0 for param in params)
    return compat.with_layer_hidden(args, kwargs, hidden + zero.to(hidden.dtype))


def replay(rt, layer: int, p: Prefill, segment, args, kwargs):
    """Run a layer's prefill hook again on the state it first saw: the recompute performs the
    same differentiable ops (as checkpointing requires), and the current state is kept."""
    current = (p.snapshot(), rt.step_cache, rt.last_stats)
    state, step_cache = p.snapshots[layer]
    p.restore(state)
    rt.step_cache, rt.replaying = step_cache.copy(), True
    try:
        return rt.prefill_layer_input(layer, p, segment, args, kwargs)
    finally:
        p.restore(current[0])
        rt.step_cache, rt.last_stats, rt.replaying = current[1], current[2], False


def add_budget_terms(rt, module, kwargs, output):
    """Training with labels: add the weighted budget terms to ``outputs.loss``."""
    as_tuple = isinstance(output, tuple)
    if as_tuple:  # return_dict=False: the loss leads the tuple when labels were given
        loss = output[0] if kwargs.get("labels") is not None else None
    else:
        loss = getattr(output, "loss", None)
    if not (module.training and rt.budget.add_to_loss and loss is not None and rt.last_stats):
        return None
    losses = rt.last_stats.losses
    weighted = rt.budget.lambda_atp * losses["atp"] + rt.budget.lambda_target * losses["target"]
    # every ATP parameter joins the graph, also in batches without images (DDP needs it)
    touch = sum((param.sum() * 0.0 for param in joinable(rt.policy.parameters())), loss.new_zeros(()))
    if zero3_params(rt.policy) and loss.grad_fn is None:
        # ZeRO-3 reduces missing gradients as zeros by itself, but its engine refuses a loss
        # without a graph (a text-only batch with the language model frozen): give it one
        touch = touch + loss.new_zeros((), requires_grad=True)
    total = loss + (weighted * rt.budget_scale + touch).to(loss.dtype)
    if as_tuple:
        return (total, *output[1:])
    output.loss = total
    return output


def gathered_state(state: dict) -> tuple[dict, bool]:
    """``state`` with every DTensor (an FSDP2 shard) gathered into a full tensor, and whether this
    process writes it: the first rank when weights were sharded, every process otherwise."""
    import torch.distributed as dist

    if not dist.is_available():  # a torch built without distributed support has no shards
        return state, True
    from torch.distributed.tensor import DTensor

    if not any(isinstance(value, DTensor) for value in state.values()):
        return state, True

    full = {
        name: value.full_tensor().detach().cpu() if isinstance(value, DTensor) else value
        for name, value in state.items()
    }
    return full, not dist.is_initialized() or dist.get_rank() == 0


@contextlib.contextmanager
def zero3_gathered(module: torch.nn.Module, write: bool):
    """Inside, ``module``'s ZeRO-3-partitioned parameters hold their full values (a collective:
    every rank enters); with ``write``, what the first rank writes into them is partitioned
    again on exit. Nothing happens for parameters DeepSpeed does not manage."""
    params = zero3_params(module)
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if write else None):
        yield
