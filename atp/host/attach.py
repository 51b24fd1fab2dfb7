"""``atp.attach`` / ``atp.detach``: validate everything, then install ATP on a model."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from atp.components.budget_loss import Budget
from atp.host import checkpoint, compat
from atp.host.attention import ATTENTION_NAME, COMPILE_MESSAGE, register_attention
from atp.host.generate import GuardedGenerate
from atp.host.handle import CONTAINER_NAME, AtpModules, AttachHandle
from atp.host.runtime import Runtime
from atp.plugins import registry
from atp.policies.base import PolicyContext
from atp.policies.options import plain_number, plain_options

PRUNE_MODES = ("auto", "drop", "mask")
PAPER_LAYERS = (4, 14, 24)  # for a 32-layer language model


def supported_models() -> list[dict[str, object]]:
    """The model families atp can attach to: family, config model types, positions."""
    out = []
    for entry in registry().entries():
        if entry.kind == "backbone":
            cls = entry.factory
            out.append(
                {
                    "family": cls.family or entry.name,
                    "model_types": list(cls.model_types),
                    "positions": cls.positions,
                    "attention": list(cls.attention_implementations),
                    "cache_layers": list(cls.cache_layers),
                    "origin": entry.origin,
                }
            )
    return out


def default_layers(num_layers: int) -> list[int]:
    """The paper's [4, 14, 24] for 32 layers, scaled to ``num_layers`` (at least layer 1)."""
    scaled = {max(1, round(layer * num_layers / 32)) for layer in PAPER_LAYERS}
    return sorted(layer for layer in scaled if layer < num_layers)


# families looked at and left out, with the reason users get (docs/backbones.md)
NOT_SUPPORTED = {
    "gemma3n": "its decoder layers take per-layer inputs and AltUp hidden states (an extra leading axis), "
    "and later layers reuse earlier layers' keys and values, which pruned and unpruned layers would mix",
    "glm4v_moe": "it is not in atp's tested suite yet (GLM-4.1V, model_type 'glm4v', is)",
    "lfm3_vl": "it is not in atp's tested suite yet (transformers >= 5.25): images and videos laid out by "
    "grid_thw, and an LFM3 language model that mixes sliding-window and full attention (a rotary each) with "
    "short-convolution layers (LFM2-VL, model_type 'lfm2_vl', is supported)",
    "llama4": "its language model attends within chunks of attention_chunk_size tokens on the RoPE layers, and "
    "on every no-RoPE layer scales the queries by their slot in the sequence (attn_temperature_tuning), which "
    "after pruning is not the token's original position; with its mixture-of-experts layers, not in atp's "
    "tested suite yet",
    "minicpmv4_6": "an image is a thumbnail and slices of different token counts (grids from target_sizes, "
    "slice markers the config does not name) around a Qwen3.5 hybrid language model (Gated-DeltaNet "
    "linear-attention layers): not in atp's tested suite yet",
    "minicpmv4_7": "an image is a thumbnail and slices of different token counts (grids from target_sizes, "
    "slice markers the config does not name, 3D positions) around a Qwen3.5 hybrid language model "
    "(Gated-DeltaNet linear-attention layers): not in atp's tested suite yet",
    "phi4_multimodal": "the image (and audio) features are embedded inside the language model's own forward "
    "(no separate language model receives them), and the released checkpoints run the vision LoRA adapter "
    "on the language model's layers",
    "kimi_k25": "its language model is DeepSeek-V3's (multi-head latent attention, whose keys carry a separate "
    "rotary part and a width other than the values', and mixture-of-experts layers): not in atp's tested "
    "suite yet",
}


def resolve_adapter(model: nn.Module):
    components = registry()
    claimed = components.resolve_backbone(model)
    if claimed is not None:
        return components.get("backbone", claimed).factory(model)
    for entry in components.entries():
        if entry.kind == "backbone" and entry.factory.matches(model):
            return _whole_model(entry.factory(model))
    config = getattr(model, "config", None)
    found = getattr(config, "model_type", None) if config is not None else None
    if found in NOT_SUPPORTED:
        raise ValueError(
            f"atp does not support {type(model).__name__} (model_type {found!r}): {NOT_SUPPORTED[found]}"
        )
    families = ", ".join(f"{m['family']} ({', '.join(m['model_types'])})" for m in supported_models())
    raise ValueError(
        f"unsupported model {type(model).__name__} (config.model_type={found!r}). "
        f"atp supports: {families}. Pass the full vision-language model (e.g. LlavaForConditionalGeneration), "
        "or add a backbone adapter plugin for this family."
    )


def _whole_model(adapter):
    """``adapter`` when its model is a whole vision-language model. A part of one that carries its
    config (the inner ``LlavaModel`` of ``LlavaForConditionalGeneration``, a projector) matches the
    family too, but attached there atp would not see ``generate`` (its guards), the labels (kept
    tokens that predict them) or ``outputs.loss`` (the budget loss) of the model it sits in."""
    model = adapter.model
    name = type(model).__name__
    instead = f"pass the full vision-language model ({_full_model_name(model)}) instead"
    if compat.is_pretrained_model(model) and not callable(getattr(model, "generate", None)):
        raise ValueError(
            f"{name} is the {adapter.family} model without its language-model head: attached to it, atp would "
            f"not guard generate, see the labels or add the budget loss to the loss; {instead}"
        )
    try:
        adapter.decoder_layers()
    except AttributeError:
        raise ValueError(
            f"{name} is a part of a {adapter.family} model (it carries the model's config), not the model; {instead}"
        ) from None
    return adapter


def _full_model_name(model: nn.Module) -> str:
    """The class AutoModelForImageTextToText loads for ``model``'s config, e.g. LlavaForConditionalGeneration."""
    found = compat.image_text_to_text_class(getattr(getattr(model, "config", None), "model_type", None))
    loads = "as AutoModelForImageTextToText loads it"
    return f"{found}, {loads}" if found else loads


def validate_layers(layers: object, num_layers: int) -> tuple[int, ...]:
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise TypeError(f"layers must be a list of ints, got {layers!r}")
    if not layers:
        raise ValueError("layers is empty; give at least one decoder layer index, e.g. layers=[4, 14, 24]")
    given = list(layers)
    layers = [plain_number(layer) for layer in given]  # numpy and 0-dim tensor ints count
    for layer, original in zip(layers, given):
        if not isinstance(layer, int):
            raise TypeError(f"layers must be ints, got {original!r} in {given!r}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers has duplicates: {list(layers)!r}; give each layer once")
    for layer in layers:
        if layer == 0:
            raise ValueError(
                "layer 0 cannot be an ATP layer: layers are pruned before their input using the previous "
                "layer's attention, and layer 0 must see every token. Use 1 or more."
            )
        if not 0 < layer < num_layers:
            raise ValueError(
                f"layer {layer} is out of range: the language model has {num_layers} decoder layers, "
                f"so ATP layers must be in 1..{num_layers - 1}"
            )
    return tuple(sorted(layers))


def attach(
    model: nn.Module,
    layers: Sequence[int] | None = None,
    policy: str | None = None,
    *,
    prune_mode: str = "auto",
    hard_masks: bool | None = None,
    lambda_atp: float | None = None,
    lambda_target: float | None = None,
    target_tokens: float | None = None,
    add_budget_loss: bool = True,
    from_pretrained: str | os.PathLike | None = None,
    observe: bool = False,
    positions: str | None = None,
    budget_loss: str | None = None,
    **options,
) -> AttachHandle:
    """Attach adaptive token pruning to a transformers vision-language model.

    Parameters
    ----------
    model : a supported model, e.g. ``LlavaForConditionalGeneration`` (see ``supported_models()``).
    layers : 0-based decoder layers before whose input visual tokens are pruned, using the
        attention of the layer before (the paper's convention). Default: [4, 14, 24] scaled
        to the model's depth.
    policy : a registered policy name: "atp" (learned, the default), "keep_all", "fixed", "manual", ...
    prune_mode : "auto" (mask while ``model.training``, drop otherwise), "drop" (pruned
        tokens are removed from the sequence and the KV cache) or "mask" (nothing is removed;
        the cumulative mask enters every later attention as a log bias over visual keys).
    hard_masks : in mask mode, use binary masks (default: when not training).
    lambda_atp, lambda_target, target_tokens : the budget loss (Eq. 12-14): weights of L_ATP
        and L_target and N_target (default 0, 0, None: no budget terms).
    add_budget_loss : when the model is called with labels in training mode, add the
        weighted budget terms to ``outputs.loss`` (default True).
    budget_loss : a registered budget loss: "normalized" (the default: Eq. 12-13 as fractions of
        the visual tokens, the target error squared) or "paper" (Eq. 12-13 as printed); it is
        built with ``target_tokens`` and called with the cumulative masks of each ATP layer.
    from_pretrained : a folder written by ``handle.save_pretrained``: restores layers, policy,
        options, budget and weights (explicit arguments must agree or override the budget).
    observe : call the plugins' ``atp_observe`` hook with every ATP layer's decision.
    positions : a registered position keeper: "keep" (original positions, default), "renumber"
        (contiguous after pruning; drop mode) or "rope2d" (the paper's PP: 2D rotary positions
        for visual tokens; changes the model, needs fine-tuning).
    **options : options of the policy (e.g. ``keep=[...]`` for "fixed").

    Returns
    -------
    AttachHandle with ``stats``, ``parameters()``, ``save_pretrained()`` and ``remove()``;
    also a context manager. Everything is validated before the model is touched.
    """
    adapter = _checked_model(model)
    num_layers = len(adapter.decoder_layers())
    budget_given = {"lambda_atp": lambda_atp, "lambda_target": lambda_target, "target_tokens": target_tokens}
    budget_given = {key: value for key, value in budget_given.items() if value is not None}
    if from_pretrained is not None:
        saved = checkpoint.read_config(from_pretrained)
        checkpoint.check_identity(saved["model"], checkpoint.model_identity(adapter), from_pretrained)
        layers, policy, positions = saved_choices(saved, layers, policy, positions)
        budget_loss = saved.get("budget_loss", "normalized") if budget_loss is None else budget_loss
        options = {**saved["options"], **options}
        budget_given = {**saved.get("budget", {}), **budget_given}
    policy = "atp" if policy is None else policy
    entry = registry().get("policy", policy)
    layers = policy_layers(entry.factory, policy, layers, num_layers, adapter)
    if prune_mode not in PRUNE_MODES:
        raise ValueError(f"prune_mode must be one of {PRUNE_MODES}, got {prune_mode!r}")
    if hard_masks is not None and not isinstance(hard_masks, bool):
        raise TypeError(f"hard_masks must be True, False or None, got {hard_masks!r}")
    budget = Budget(**budget_given, add_to_loss=bool(add_budget_loss))
    check_options(entry.factory, policy, options)
    implementation = _checked_attention(adapter)
    budget_loss = "normalized" if budget_loss is None else budget_loss
    loss_factory = registry().get("budget_loss", budget_loss).factory
    positions = "keep" if positions is None else positions
    keeper = _position_keeper(adapter, positions, prune_mode)
    context = PolicyContext(layers, num_layers, adapter.num_visual_tokens())
    policy_module = build_policy_module(entry.factory, context, options, from_pretrained)
    check_scored_layers(adapter, layers, policy_module)

    # validated: from here on the model is modified ----------------------------------------
    observers = registry().observers() if observe else []
    runtime = Runtime(
        adapter, policy_module, layers, prune_mode, hard_masks, budget, observers, keeper, loss_factory
    )
    spec = {
        "policy": policy,
        "options": plain_options(options),
        "positions": positions,
        "budget_loss": budget_loss,
    }
    handle = _install(model, runtime, implementation, spec)
    if policy_module.untrained:
        warnings.warn(
            f"atp.attach(policy={policy!r}): the threshold heads are untrained, so every input gets their "
            "initial thresholds. Train them or load trained weights before relying on the pruning.",
            UserWarning,
            stacklevel=2,
        )
    return handle


def build_policy_module(factory, context: PolicyContext, options: dict, from_pretrained) -> nn.Module:
    """The policy's module, with a checkpoint's weights when ``from_pretrained`` names one."""
    with torch.device("cpu"):  # weights that exist (under an ambient meta device there would be none)
        module = factory(context, **options)
    if from_pretrained is not None:
        checkpoint.load_weights(module, from_pretrained)
        module.untrained = False
    return module


def _checked_model(model: nn.Module):
    """The adapter of a model atp can attach to (not attached, not compiled, a supported family)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"attach expects a torch.nn.Module, got {type(model).__name__}")
    compat.warn_if_untested(stacklevel=4)  # at the caller of attach
    existing = model._modules.get(CONTAINER_NAME)
    if isinstance(existing, AtpModules):
        raise ValueError(
            "atp is already attached to this model; call handle.remove() or atp.detach(model) first"
        )
    if existing is not None or CONTAINER_NAME in model.__dict__:
        raise ValueError(
            f"the model already has an attribute {CONTAINER_NAME!r}; atp cannot attach its modules"
        )
    if getattr(model, "_compiled_call_impl", None) is not None:
        raise ValueError(COMPILE_MESSAGE)
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile(model)'s wrapper
        raise ValueError(
            "atp.attach received a torch.compile wrapper; attach to the uncompiled model (model._orig_mod), "
            "then call torch.compile on it if you want"
        )
    _check_not_attached_elsewhere(model)
    adapter = resolve_adapter(model)
    adapter.check()
    compat.check_hub_kernels(model)
    return adapter


def saved_choices(saved: dict, layers, policy, positions) -> tuple:
    """A checkpoint's layers, policy and position keeper; explicit arguments must agree with them."""
    if layers is not None and list(layers) != saved["layers"]:
        raise ValueError(
            f"layers={list(layers)} differ from the checkpoint's {saved['layers']}; leave layers out"
        )
    if policy is not None and policy != saved["policy"]:
        raise ValueError(
            f"policy={policy!r} differs from the checkpoint's {saved['policy']!r}; leave policy out"
        )
    if positions is not None and positions != saved.get("positions", "keep"):
        raise ValueError(f"positions={positions!r} differs from the checkpoint's {saved.get('positions')!r}")
    return saved["layers"], saved["policy"], saved.get("positions", "keep")


def policy_layers(factory, policy: str, layers, num_layers: int, adapter=None) -> tuple[int, ...]:
    """The ATP layers: ``(0,)`` for a policy acting before the language model, else the given or
    default layers (the paper's scaled, moved where the family's ``adapter`` needs it), validated
    (and, given the ``adapter``, checked against the layers it cannot prune before)."""
    if factory.pre_llm:
        if layers not in (None, [0], (0,)):
            raise ValueError(
                f"policy {policy!r} acts before the language model: leave layers out (or pass [0])"
            )
        return (0,)
    if layers is None:
        layers = default_layers(num_layers)
        layers = adapter.default_layers(layers) if adapter is not None else layers
    checked = validate_layers(layers, num_layers)
    if adapter is not None:
        adapter.check_layers(checked)
    return checked


def check_scored_layers(adapter, layers: tuple[int, ...], policy) -> None:
    """A policy with a scorer reads the attention of the layer before each ATP layer: refuse a layer
    that has none (a recurrent layer, e.g. linear attention), naming the ATP layers that work."""
    if policy.scorer is None:
        return
    unscored = [layer for layer in layers if layer > 0 and adapter.recurrent(layer - 1)]
    if unscored:
        num_layers = len(adapter.decoder_layers())
        allowed = [i + 1 for i in range(num_layers - 1) if not adapter.recurrent(i)]
        raise ValueError(
            f"ATP layer(s) {unscored} follow a {adapter.family} layer without attention (a recurrent, "
            f"linear-attention layer: no queries and keys), which the policy's scorer reads; put each ATP "
            f"layer right after an attention layer ({', '.join(map(str, allowed))}), or use a policy that "
            "does not score (fixed keep masks: policy='manual')"
        )


def check_options(factory, policy: str, options: dict) -> None:
    """Every option is one the policy takes (its constructor checks the values)."""
    known = factory.option_names()
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"policy {policy!r} does not take option(s) {', '.join(unknown)}; "
            f"its options are: {', '.join(known) or 'none'}"
        )


def _checked_attention(adapter) -> str:
    """The language model's attention implementation, if atp supports it for this family."""
    implementation = compat.attention_implementation(adapter.text_config())
    if implementation not in adapter.attention_implementations:
        raise ValueError(
            f"atp does not support the {implementation!r} attention implementation of this {adapter.family} "
            f"model; supported: {', '.join(adapter.attention_implementations)}. Load the model with "
            "attn_implementation='sdpa' or call model.set_attn_implementation('sdpa') first."
        )
    if adapter.uses_sliding_window():
        raise ValueError(
            f"this {adapter.family} model's language model uses sliding-window attention layers, which atp "
            "does not support yet for this family (Gemma 3's are supported); when prompt and answer fit in "
            "the window, load the model with the window off (sliding_window=None, or use_sliding_window=False)"
        )
    return implementation


def _position_keeper(adapter, positions: str, prune_mode: str):
    """The registered position keeper ``positions``, if it works with this model and mode."""
    keeper = registry().get("position_keeper", positions).factory(adapter)
    if adapter.positions not in keeper.positions:
        raise ValueError(
            f"positions={positions!r} works with {', '.join(keeper.positions)} models; this {adapter.family} model "
            f"uses {adapter.positions} (keep its positions with positions='keep')"
        )
    if keeper.drop_only and prune_mode == "mask":
        raise ValueError(f"positions={positions!r} needs prune_mode='drop' (or 'auto' in eval mode)")
    return keeper


def _install(model: nn.Module, runtime: Runtime, implementation: str, spec: dict) -> AttachHandle:
    """Modify the model (validated before): the ATP modules, atp's attention, the hooks, a guarded
    ``generate``; what ``handle.remove()`` restores is recorded."""
    adapter, policy_module = runtime.adapter, runtime.policy
    container = AtpModules(policy_module)
    container.place(next(adapter.language_model().parameters()).device)  # meta: kept until to_empty
    policy_module.train(model.training)
    restore = {"attn_implementation": {adapter.text_config_key(): implementation}}
    ignored = {f"{CONTAINER_NAME}.{key}" for key in container.state_dict()}
    restore["keys_to_ignore_on_save"] = model.__dict__.get("_keys_to_ignore_on_save", _MISSING)
    model.add_module(CONTAINER_NAME, container)
    # model.save_pretrained writes the base model only; atp's weights go where handle.save_pretrained puts them
    model._keys_to_ignore_on_save = set(getattr(model, "_keys_to_ignore_on_save", None) or ()) | ignored
    model.set_attn_implementation({adapter.text_config_key(): register_attention()})
    runtime.install()
    if callable(getattr(model, "generate", None)) and "generate" not in model.__dict__:
        model.__dict__["generate"] = GuardedGenerate(model, runtime)
        restore["generate_patched"] = True
    handle = AttachHandle(model, runtime, restore, spec)
    container.handle = handle
    return handle


_MISSING = "missing"  # restore marker: the attribute was not in the model's __dict__


def _check_not_attached_elsewhere(model: nn.Module) -> None:
    """A module of an attached model (or a model holding one) shares its layers and config:
    attaching again would stack a second runtime on the same layers."""
    for name, module in model.named_modules():
        if isinstance(module, AtpModules):
            where = f"its submodule {name.rsplit('.', 1)[0]!r}" if "." in name else "it"
            raise ValueError(
                f"atp is already attached to {where}; call handle.remove() (or atp.detach) on that model first"
            )
    config = getattr(model, "config", None)
    for part in (config, getattr(config, "text_config", None)):
        if part is not None and compat.attention_implementation(part) == ATTENTION_NAME:
            raise ValueError(
                "atp is already attached to a model this module belongs to (its config uses atp's attention "
                f"{ATTENTION_NAME!r}); attach to that model once, or call handle.remove() on it first"
            )


def detach(model: nn.Module) -> None:
    """Remove atp from ``model`` (same as ``handle.remove()``)."""
    container = model._modules.get(CONTAINER_NAME)
    if not isinstance(container, AtpModules) or container.handle is None:
        raise ValueError("atp is not attached to this model")
    container.handle.remove()
