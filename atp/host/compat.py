"""The seam to transformers and torch: the only module that knows their internal names and shapes.

Everything atp needs from transformers beyond its public model classes goes through here: the
KV cache (found by type among a forward's arguments, whatever the release calls it), its
lengths and layers, the cache field of outputs, the attention and mask registries, the
decoder layers' keyword arguments, rotary layouts, the Trainer internals the trainer mirrors,
and the FLOP counter's view of SDPA. Backbone adapters are the only other place that knows a
family's modules.

A new transformers release is added by changing this module (if it renamed something),
raising ``TRANSFORMERS_RANGE``'s upper bound and pyproject's pin to the next untested minor,
and running the suite at both ends of the range (``docs/compatibility.md``).
"""

from __future__ import annotations

import functools
import inspect
from importlib import metadata

import torch
from packaging.version import Version
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: F401 (atp.host.attention calls it)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

# the releases CI tests: lowest supported, first untested (keep pyproject.toml in step)
TRANSFORMERS_RANGE = ("5.18.0", "5.26")
TORCH_RANGE = ("2.13.0", "2.16")

# the keyword arguments a decoder layer receives from the language model's loop
HIDDEN_STATES = "hidden_states"
ATTENTION_MASK = "attention_mask"
POSITION_EMBEDDINGS = "position_embeddings"  # (cos, sin) of the rotary embedding
POSITION_IDS = "position_ids"
CACHE_ARGUMENTS = ("cache", "past_key_values")  # the cache's names in generate and top-level forwards


# versions ------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    """Versions of python, torch and transformers (as imported) and atp (as installed)."""
    import platform

    import transformers

    # torch and transformers as imported (what runs), atp as installed
    out = {"python": platform.python_version(), "torch": torch.__version__}
    out["transformers"] = transformers.__version__
    try:
        out["atp"] = metadata.version("atp")
    except metadata.PackageNotFoundError:
        out["atp"] = "not installed"
    return out


def _in(version: str, bounds: tuple[str, str]) -> bool:
    try:
        parsed = Version(Version(version).base_version)
    except Exception:  # "not installed" or a malformed version
        return False
    return Version(bounds[0]) <= parsed < Version(bounds[1])


def tested() -> dict[str, bool]:
    """Whether the installed torch and transformers are in the range CI tests."""
    found = versions()
    return {
        "torch": _in(found["torch"], TORCH_RANGE),
        "transformers": _in(found["transformers"], TRANSFORMERS_RANGE),
    }


@functools.cache
def version_note() -> str:
    """``transformers 5.25.0, torch 2.15.0 (atp is tested with transformers >=5.18.0,<5.26 and torch
    >=2.13.0,<2.16)``."""
    found = versions()
    return (
        f"transformers {found['transformers']}, torch {found['torch']} (atp is tested with "
        f"transformers {_bounds(TRANSFORMERS_RANGE)} and torch {_bounds(TORCH_RANGE)})"
    )


def _bounds(bounds: tuple[str, str]) -> str:
    return f">={bounds[0]},<{bounds[1]}"


class UntestedVersionWarning(UserWarning):
    """An imported torch or transformers is outside the range atp is tested with."""


def warn_if_untested(stacklevel: int = 3) -> None:
    """One line when the imported torch or transformers is outside the tested range: not an error
    (the user may know the release works), but results are then not covered by atp's suite.
    ``stacklevel`` points the warning at the frame that called atp (3: the caller of its caller)."""
    import warnings

    found = versions()
    outside = [
        f"{name} {found[name]} (tested {_bounds(bounds)})"
        for name, bounds in (("transformers", TRANSFORMERS_RANGE), ("torch", TORCH_RANGE))
        if not _in(found[name], bounds)
    ]
    if outside:
        warnings.warn(
            f"atp {found['atp']} is not tested with {' and '.join(outside)}; `atp doctor` checks this "
            "environment, docs/compatibility.md says how a release is added",
            UntestedVersionWarning,
            stacklevel=stacklevel,
        )


class CompatibilityError(RuntimeError):
    """atp could not find what it needs in a transformers forward: a result would be wrong."""

    def __init__(self, message: str):
        super().__init__(
            f"{message}. Installed: {version_note()}. If this release is outside that range, install "
            "one inside it; otherwise please report it with the output of `atp doctor`"
        )


# the KV cache ----------------------------------------------------------------------------
def find_cache(args: tuple, kwargs: dict) -> Cache | None:
    """The transformers ``Cache`` among a forward's arguments, found by type, not by name
    (``past_key_values`` up to 5.23, ``cache`` from 5.24). None when there is none."""
    found = [value for value in (*args, *kwargs.values()) if isinstance(value, Cache)]
    if len({id(value) for value in found}) > 1:
        raise CompatibilityError(
            f"a forward received {len(found)} different KV caches; atp cannot tell which one is used"
        )
    return found[0] if found else None


def cache_length(cache: Cache, layer: int | None = None) -> int:
    """Tokens held by ``cache`` in ``layer`` (default: layer 0, which atp never prunes). A recurrent
    layer's state (linear attention: a conv window and a fixed-size matrix) holds no tokens: 0 in
    every release (5.18 gives its layer no length, later releases count the tokens it took in)."""
    if layer is None:
        return int(cache.get_seq_length())
    layers = cache.layers
    if layer >= len(layers) or not isinstance(layers[layer], CacheLayerMixin):
        return 0
    return int(layers[layer].get_seq_length())


def cache_layer_types(cache: Cache) -> list[str]:
    """Class names of the cache's per-layer stores (``DynamicLayer``, ``StaticLayer``, ...)."""
    return [type(layer).__name__ for layer in cache.layers]


def is_dynamic_cache(cache: object, layer_types: tuple[str, ...]) -> bool:
    """A ``DynamicCache`` whose layers are all of ``layer_types``."""
    return isinstance(cache, DynamicCache) and all(name in layer_types for name in cache_layer_types(cache))


def cache_tensors(cache: Cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of every layer that holds any; (B, H, S, D) each."""
    out = []
    for layer in getattr(cache, "layers", []):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor):
            out.append((keys, values))
    return out


def output_cache(outputs) -> Cache | None:
    """The cache a model output carries (``cache`` from 5.24, ``past_key_values`` before), read
    without triggering the deprecation warning of the old attribute."""
    fields = outputs.keys() if hasattr(outputs, "keys") else ()
    for name in ("cache", "past_key_values"):
        if name in fields:
            return outputs[name]
    found = [value for value in (outputs.values() if hasattr(outputs, "values") else outputs)]
    found = [value for value in found if isinstance(value, Cache)]
    return found[0] if found else None


def cache_argument(model: torch.nn.Module) -> str:
    """The keyword ``model.forward`` takes its cache by in the installed release."""
    parameters = inspect.signature(inspect.unwrap(type(model).forward)).parameters
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    raise CompatibilityError(f"{type(model).__name__}.forward takes no cache argument atp knows")


# attention ------------------------------------------------------------------------------
def generation_mode(config, assistant_model=None) -> str:
    """The decoding mode generate picks for a ``GenerationConfig`` ("greedy_search", "sample", ...)."""
    return str(config.get_generation_mode(assistant_model).value)


# the generate arguments whose values are models, processors or tensors, not generation settings
_GENERATE_OBJECTS = ("inputs", "generation_config", "logits_processor", "stopping_criteria", "streamer")


def resolved_generation_config(model, given: dict):
    """The ``GenerationConfig`` that ``generate`` will run with for the arguments ``given``, resolved
    by transformers itself: the checkpoint's generation config, the global defaults, the keyword
    arguments and the release's own rewrites (e.g. a hub config's ``cache_implementation="hybrid"``
    means the default dynamic cache). atp must refuse what generate will do, not what a config
    file says."""
    prepare = getattr(model, "_prepare_generation_config", None)
    if not callable(prepare):
        raise CompatibilityError(
            f"{type(model).__name__} has no _prepare_generation_config; atp reads the generation settings "
            "generate resolves through it"
        )
    settings = {name: value for name, value in given.items() if name not in _GENERATE_OBJECTS}
    config, _ = prepare(given.get("generation_config"), **settings)
    return config


# forward arguments that carry already encoded images / videos (generate encodes them before the
# prefill, and chunked prefill hands each chunk the features of its placeholders)
ENCODED_VISUAL_ARGUMENTS = ("mm_encoder_outputs",)


def register_attention(name: str, function) -> None:
    """Register an attention function and the SDPA mask builder under ``name`` (without the mask
    builder, padding masks are silently not built)."""
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, sdpa_mask)


def attention_implementation(config) -> str | None:
    return getattr(config, "_attn_implementation", None)


# decoder layer inputs -------------------------------------------------------------------
def layer_hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states (B, L, D) a decoder layer receives."""
    return args[0] if args else kwargs[HIDDEN_STATES]


def with_layer_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    kwargs[HIDDEN_STATES] = hidden
    return args, kwargs


def rotary_seq_dim(cos: torch.Tensor, position_seq_dim: int) -> int:
    """Sequence axis of a rotary cos / sin: (B, L, D) in every supported release (Qwen2-VL's
    M-RoPE was (3, B, L, D) up to 5.15; those releases are below the supported range)."""
    if cos.dim() != 3:
        raise CompatibilityError(
            f"the rotary embedding has shape {tuple(cos.shape)}, atp expects (batch, length, head_dim)"
        )
    return position_seq_dim


def rotary_bands(rotary: torch.nn.Module) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (D/2,) and attention scaling of a language model's rotary embedding."""
    inv_freq = getattr(rotary, "inv_freq", None)
    if not isinstance(inv_freq, torch.Tensor):
        raise CompatibilityError(f"the rotary embedding {type(rotary).__name__} has no inv_freq buffer")
    return inv_freq, float(getattr(rotary, "attention_scaling", 1.0))


def model_from_config(model_class, config, dtype: torch.dtype):
    """A randomly initialised model of ``model_class`` in ``dtype``, built where torch's default
    device points (``with torch.device(...)``)."""
    return model_class._from_config(config, dtype=dtype)


# gradient checkpointing and the Trainer ------------------------------------------------
def reentrant_checkpointing(layers) -> bool:
    """Whether any decoder layer runs under reentrant gradient checkpointing."""
    for layer in layers:
        function = getattr(layer, "_gradient_checkpointing_func", None)
        if getattr(layer, "gradient_checkpointing", False) and function is not None:
            return getattr(function, "keywords", {}).get("use_reentrant", True) is not False
    return False


def checkpointing_replays_hooks(layers) -> bool:
    """Whether gradient checkpointing is on and the recompute runs the layers' forward hooks again:
    up to 5.22 transformers checkpoints ``__call__`` (hooks inside), from 5.23 ``forward``."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    active = any(getattr(layer, "gradient_checkpointing", False) and layer.training for layer in layers)
    return active and "__call__" in vars(GradientCheckpointingLayer)


def enable_checkpointing(model, use_reentrant: bool = False) -> None:
    """Turn on gradient (activation) checkpointing, under the installed release's name."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": use_reentrant})


def disable_checkpointing(model) -> None:
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    disable()


def checkpointing_arguments(enabled: bool) -> dict:
    """``TrainingArguments`` keywords for non-reentrant checkpointing in the installed release
    (``activation_checkpointing`` from 5.23, ``gradient_checkpointing`` before)."""
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    prefix = "activation" if "activation_checkpointing" in fields else "gradient"
    return {f"{prefix}_checkpointing": enabled, f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}


TRAINER_OVERRIDES = (
    "create_optimizer",
    "compute_loss",
    "log",
    "_save",
    "_load_best_model",
    "_load_from_checkpoint",
)


def check_trainer(trainer_class) -> None:
    """The ``Trainer`` methods ``AtpTrainer`` overrides must exist in the installed release: a
    renamed one would silently skip saving or loading the ATP weights."""
    missing = [name for name in TRAINER_OVERRIDES if not callable(getattr(trainer_class, name, None))]
    if missing:
        raise CompatibilityError(
            f"transformers' Trainer has no {', '.join(missing)}; AtpTrainer overrides them to save, load "
            "and log the ATP modules"
        )


def loss_scaled_for_accumulation(trainer, num_items_in_batch) -> bool:
    """Whether ``Trainer.training_step`` leaves the loss undivided by the accumulation steps
    (it was normalised over the accumulated batch): the rule of every supported release."""
    flag = getattr(trainer, "loss_is_scaled_for_ga", None)  # from 5.20
    if flag is not None:
        return bool(flag)
    return bool(
        (trainer.model_accepts_loss_kwargs and num_items_in_batch is not None) or trainer.compute_loss_func
    )


# FLOP counting ---------------------------------------------------------------------------
def flop_counter(**kwargs):
    """``torch.utils.flop_counter.FlopCounterMode`` that also counts the CPU flash-attention
    kernel SDPA dispatches to on CPU (torch registers no formula for it and counts it as 0); it
    gets the formula of the other SDPA kernels."""
    from torch.utils import flop_counter as fc

    mapping = dict(kwargs.pop("custom_mapping", None) or {})
    cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_flash is not None and cpu_flash not in fc.flop_registry:

        def cpu_flash_flop(query, key, value, *args, out_shape=None, **rest) -> int:
            return fc.sdpa_flop_count(query, key, value)  # shapes in; 2 FLOPs per multiply-accumulate

        mapping[cpu_flash] = cpu_flash_flop
    return fc.FlopCounterMode(custom_mapping=mapping, **kwargs)


# hub kernels ------------------------------------------------------------------------------
# From 5.25 ``from_pretrained`` kernelizes a model when the ``kernels`` package is installed (a
# required dependency from 5.25) unless ``USE_HUB_KERNELS=0``: layers and functions marked for the
# hub get their forward swapped for a downloaded kernel (``model.train()`` / ``eval()`` swap again
# for the new mode; on a CPU, or offline, every layer falls back to its own forward). In the
# supported families the marked layers are RMSNorm, the rotary embedding, ``apply_rotary_pos_emb``
# and the activations: elementwise work outside the decoder-layer hooks and the attention
# function atp installs, whose outputs atp reads with the same layout (the rotary layout is
# checked at every prefill), and which has no FLOPs in atp's convention (matmuls and attention).
# Any other kernel could replace what atp hooks or counts, so it is refused.
KERNELS_ATP_CHECKED = frozenset(
    {
        "RMSNorm",
        "rotary_pos_emb",
        "apply_rotary_pos_emb",
        "SiLU",
        "GeLU",
        "GeluTanh",
        "NewGELU",
        "FastGELU",
        "QuickGELU",
    }
)


def kernel_targets(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The layers and kernel functions of ``model`` marked for hub kernels (their class has a
    ``kernel_layer_name``), with their qualified names: what a kernelization can swap."""
    found = []
    for name, module in model.named_modules():
        functions = getattr(module, "_kernel_funcs", None) or {}
        for where, target in [(name, module), *((f"{name}.{key}", f) for key, f in functions.items())]:
            if getattr(type(target), "kernel_layer_name", None) is not None:
                found.append((where.lstrip("."), target))
    return found


def hub_kernels(model: torch.nn.Module, targets: list | None = None) -> dict[str, str]:
    """Layers and functions of ``model`` (or of ``targets``, from :func:`kernel_targets`) that run
    a forward other than their class's own: qualified name -> the kernel's layer name. Read from
    the modules, not from the ``kernels`` package, so it holds for every release of it (and
    without it: empty)."""
    found = {}
    for where, target in kernel_targets(model) if targets is None else targets:
        forward = getattr(vars(target).get("forward"), "__func__", None)  # set on the instance
        if forward is not None and forward is not type(target).forward:
            found[where] = str(type(target).kernel_layer_name)
    return found


def check_hub_kernels(model: torch.nn.Module, targets: list | None = None) -> None:
    """Refuse hub kernels atp has not checked (see ``KERNELS_ATP_CHECKED``), naming them and how to
    turn them off; ``targets`` as for :func:`hub_kernels`."""
    swapped = hub_kernels(model, targets)
    unchecked = {name: kernel for name, kernel in swapped.items() if kernel not in KERNELS_ATP_CHECKED}
    if unchecked:
        listed = ", ".join(f"{name} ({kernel})" for name, kernel in sorted(unchecked.items())[:4])
        more = f" and {len(unchecked) - 4} more" if len(unchecked) > 4 else ""
        raise ValueError(
            f"this model runs hub kernels atp has not checked: {listed}{more}; they may replace what atp "
            "hooks or counts. Load the model with use_kernels=False (or USE_HUB_KERNELS=0 in the "
            "environment), or call model.set_use_kernels(False) before atp.attach. Installed: "
            f"{version_note()}"
        )


def kv_cache_bytes(cache) -> int:
    """Bytes held by the keys and values of every layer of a transformers cache."""
    return sum(tensor.numel() * tensor.element_size() for pair in cache_tensors(cache) for tensor in pair)


def is_pretrained_model(model) -> bool:
    """A transformers model (not a bare module or a part without its own head)."""
    import transformers

    return isinstance(model, transformers.PreTrainedModel)


def image_text_to_text_class(model_type: str | None) -> str | None:
    """The class name AutoModelForImageTextToText loads for ``model_type`` (None if unknown)."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as names
    except ImportError:  # a transformers without the mapping: name the loader only
        return None
    return names.get(model_type)
