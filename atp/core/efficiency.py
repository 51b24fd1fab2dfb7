"""Analytic efficiency report: FLOPs, KV-cache bytes and the "Token" metric from kept counts.

Two FLOPs conventions (DESIGN.md section 8), always stated next to the numbers:

* ``"paper"``: the paper's Eq. 15 per layer, ``4 L d^2 + 2 L^2 d + 2 L d m`` (FastV's
  multiply-accumulate count with a 2-matrix FFN; no GQA, no causal discount);
* ``"2flops-per-mac"``: 2 FLOPs per multiply-accumulate with the model's real layers (q / o
  projections ``2 L d (H hd)`` each, k / v projections ``2 L d (H_kv hd)`` each, attention
  ``4 L^2 (H hd)`` ignoring the causal mask, a 3-matrix FFN ``6 L d m``), which is what
  ``torch.utils.flop_counter.FlopCounterMode`` counts for matmuls and attention.

``L`` at a layer is the text tokens plus the visual tokens alive at its input.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from atp.policies.options import described, plain_number

CONVENTIONS = ("paper", "2flops-per-mac")


@dataclass(frozen=True)
class VisionShape:
    """A ViT image encoder: ``layers`` blocks of width ``hidden`` and MLP ``intermediate`` over ``tokens``."""

    layers: int
    hidden: int
    intermediate: int
    tokens: int


@dataclass(frozen=True)
class LinearShape:
    """The linear-attention (Gated-DeltaNet) layers of a hybrid language model (Qwen3.5): which
    layers, their key / value heads and widths, and the depthwise conv's width."""

    layers: tuple[int, ...]
    key_heads: int
    value_heads: int
    key_dim: int
    value_dim: int
    conv_kernel: int = 4

    @property
    def conv_channels(self) -> int:
        return 2 * self.key_heads * self.key_dim + self.value_heads * self.value_dim

    def state_elements(self) -> int:
        """Per sample: the conv window (channels x kernel) and one key x value matrix per value head,
        whatever the number of tokens."""
        return self.conv_channels * self.conv_kernel + self.value_heads * self.key_dim * self.value_dim


@dataclass(frozen=True)
class ModelShape:
    """What the analytic count needs from a language model (no weights)."""

    name: str
    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    visual_tokens: int  # per image, for presets
    vision: VisionShape | None = None
    linear: LinearShape | None = None  # hybrid models: the linear-attention layers
    output_gate: bool = False  # full attention's query projection also makes a sigmoid gate (Qwen3.5)


PRESETS = {
    # published configs: Vicuna-7B / 13B v1.5 with CLIP ViT-L/14-336 (llava-hf/llava-1.5-*-hf)
    "llava-1.5-7b": ModelShape(
        "llava-1.5-7b", 32, 4096, 11008, 32, 32, 128, 32064, 576, VisionShape(24, 1024, 4096, 577)
    ),
    "llava-1.5-13b": ModelShape(
        "llava-1.5-13b", 40, 5120, 13824, 40, 40, 128, 32064, 576, VisionShape(24, 1024, 4096, 577)
    ),
    # Qwen/Qwen2-VL-7B-Instruct: 28 layers, GQA 28/4; a 448 x 448 image -> 32 x 32 patches -> 256 tokens
    "qwen2-vl-7b": ModelShape(
        "qwen2-vl-7b", 28, 3584, 18944, 28, 4, 128, 152064, 256, VisionShape(32, 1280, 5120, 1024)
    ),
    # Qwen/Qwen3-VL-4B-Instruct: 36 layers, GQA 32/8, head 128; vision 27 x 1152 (patch 16, merge 2):
    # a 512 x 512 image -> 32 x 32 patches -> 256 tokens
    "qwen3-vl-4b": ModelShape(
        "qwen3-vl-4b", 36, 2560, 9728, 32, 8, 128, 151936, 256, VisionShape(27, 1152, 4304, 1024)
    ),
    # GLM-4.1V-9B: transformers' Glm4vTextConfig defaults (40 layers, GQA 32/2); a 448 x 448 image
    # (patch 14, merge 2) -> 256 tokens. The language model only: the vision tower's MLP is not a
    # 2-matrix one this table can describe
    "glm-4.1v-9b": ModelShape("glm-4.1v-9b", 40, 4096, 13696, 32, 2, 128, 151552, 256),
    # google/gemma-3-4b-it: 34 layers, GQA 8/4, head 256; SigLIP 27 x 1152 at 896 px / 14 -> 4096 patches
    # pooled to 256 tokens. Attention FLOPs count every key: the sliding layers' 1024-token window
    # (5 of every 6 layers) is not taken off, so long prompts are overestimated.
    "gemma-3-4b": ModelShape(
        "gemma-3-4b", 34, 2560, 10240, 8, 4, 256, 262208, 256, VisionShape(27, 1152, 4304, 4096)
    ),
    # Qwen/Qwen3.5-35B-A3B: transformers' Qwen3_5MoeConfig defaults (named after that checkpoint; the
    # same numbers as public training recipes): 40 layers, 3 Gated-DeltaNet linear-attention layers
    # then 1 full one (GQA 16/2, head 256, output gate); linear layers 16 key / 32 value heads of 128,
    # conv 4. MoE: the FFN counted is the active one, 8 experts of 512 plus a shared one of 512 (the
    # router's d x 256 matmul is left out). Vision 27 x 1152 (patch 16, merge 2): a 512 x 512 image ->
    # 32 x 32 patches -> 256 tokens
    "qwen3.5-35b-a3b": ModelShape(
        "qwen3.5-35b-a3b",
        40,
        2048,
        8 * 512 + 512,
        16,
        2,
        256,
        248320,
        256,
        VisionShape(27, 1152, 4304, 1024),
        LinearShape(tuple(i for i in range(40) if i % 4 != 3), 16, 32, 128, 128, 4),
        output_gate=True,
    ),
}


def shape_from_config(config, name: str = "") -> ModelShape:
    """A ModelShape from any transformers (VLM or text) config object."""
    text = getattr(config, "text_config", None) or config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    # a fixed count only for LLaVA-1.5 (CLIP tower); tiled / dynamic families depend on the input
    vision_type = getattr(getattr(config, "vision_config", None), "model_type", "")
    fixed = getattr(config, "model_type", None) == "llava" and vision_type != "pixtral"
    visual = (getattr(config, "image_seq_length", None) or 0) if fixed else 0
    intermediate = getattr(text, "intermediate_size", None)
    if intermediate is None and getattr(text, "moe_intermediate_size", None):  # MoE only: the active FFN
        intermediate = text.num_experts_per_tok * text.moe_intermediate_size
        intermediate += getattr(text, "shared_expert_intermediate_size", 0) or 0
    types = list(getattr(text, "layer_types", None) or [])
    linear = None
    if "linear_attention" in types:
        linear = LinearShape(
            tuple(i for i, kind in enumerate(types) if kind == "linear_attention"),
            text.linear_num_key_heads,
            text.linear_num_value_heads,
            text.linear_key_head_dim,
            text.linear_value_head_dim,
            text.linear_conv_kernel_dim,
        )
    return ModelShape(
        name or getattr(config, "model_type", "model"),
        text.num_hidden_layers,
        text.hidden_size,
        intermediate,
        heads,
        getattr(text, "num_key_value_heads", None) or heads,
        head_dim,
        text.vocab_size,
        int(visual),
        linear=linear,
        output_gate=getattr(text, "model_type", "") in GATED_ATTENTION,
    )


# text models whose full-attention query projection also makes the output gate (twice its width)
GATED_ATTENTION = ("qwen3_5_text", "qwen3_5_moe_text")


def layer_flops(tokens: float, shape: ModelShape, convention: str, layer: int | None = None) -> float:
    """FLOPs of decoder layer ``layer`` (None: a full-attention one) over ``tokens`` tokens (prefill).

    A linear-attention layer (``shape.linear``) mixes tokens in time linear in their number: the
    paper's convention drops its ``2 L^2 d`` attention term; 2 FLOPs per MAC counts its projections
    (q, k, v, the gate z, a and b in, the output out), its depthwise conv and the recurrent form's
    state update (``S^T k``, ``S += k delta^T``, ``S^T q``: 3 key x value MACs per token and value
    head; transformers' chunked prefill kernel does more per token, a decode step this)."""
    length, d, m = float(tokens), shape.hidden, shape.intermediate
    linear = shape.linear if shape.linear is not None and layer in shape.linear.layers else None
    if convention == "paper":
        mixing = 0.0 if linear is not None else 2 * length * length * d
        return 4 * length * d * d + mixing + 2 * length * d * m
    if convention == "2flops-per-mac":
        if linear is not None:
            value_width = linear.value_heads * linear.value_dim
            widths = linear.conv_channels + 2 * value_width + 2 * linear.value_heads  # qkv, z, out, a, b
            conv = 2 * length * linear.conv_channels * linear.conv_kernel
            state = 6 * length * linear.value_heads * linear.key_dim * linear.value_dim
            return 2 * length * d * widths + conv + state + 6 * length * d * m
        q_width, kv_width = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
        q_out = 3 * q_width if shape.output_gate else 2 * q_width  # queries (and the gate), output
        projections = 2 * length * d * (q_out + 2 * kv_width)
        attention = 4 * length * length * q_width
        return projections + attention + 6 * length * d * m
    raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")


def vision_flops(vision: VisionShape) -> float:
    """2 FLOPs per MAC of a ViT with a 2-matrix MLP (one image)."""
    n, d, m = vision.tokens, vision.hidden, vision.intermediate
    return vision.layers * (8 * n * d * d + 4 * n * n * d + 4 * n * d * m)


def check_kept(
    layers: Sequence[int], kept: Sequence[float], visual: float, fractions: bool = False
) -> list[float]:
    """``kept`` as plain floats, checked: each a finite count between 0 and the tokens alive
    before its ATP layer (the visual tokens, then the previous count), so counts can only
    shrink or stay from one ATP layer to the next.

    ``fractions=True`` reads a value in (0, 1) as a fraction of the tokens alive before its
    layer, rounded as the fixed policy rounds (``atp flops --kept``).
    """
    if len(layers) != len(kept):
        raise ValueError(
            f"{len(layers)} ATP layers but {len(kept)} kept counts; give one kept count per ATP layer"
        )
    out, alive, source = [], float(visual), f"the {visual:g} visual tokens"
    for index, (layer, value) in enumerate(zip(layers, kept)):
        given = count = plain_number(value)
        if count is None:
            raise TypeError(f"kept[{index}] must be a number (a token count), got {described(value)}")
        if fractions and 0 < count < 1:
            count = round(alive * count)
        where = f"kept[{index}] = {given:g} (after ATP layer {layer})"
        if not math.isfinite(count):
            raise ValueError(f"{where} is not a finite number; give a token count between 0 and {source}")
        if index > 0 and count > alive:
            raise ValueError(
                f"{where} is more than {source}: kept counts can only shrink or stay from one ATP layer "
                f"to the next; give at most {alive:g}"
                + (" (a fraction in (0, 1) keeps a share of the tokens alive)" if fractions else "")
            )
        if not 0 <= count <= alive:
            raise ValueError(f"{where} must be a token count between 0 and {source}")
        out.append(float(count))
        alive, source = float(count), f"the {count:g} tokens kept at ATP layer {layer}"
    return out


def check_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    """``layers`` as plain ints, checked: increasing decoder layer indices in 0..num_layers-1."""
    indices = [plain_number(layer) for layer in layers]
    if any(not isinstance(layer, int) for layer in indices):
        raise TypeError(f"layers must be ints (decoder layer indices), got {list(layers)}")
    if indices != sorted(set(indices)) or not all(0 <= layer < num_layers for layer in indices):
        raise ValueError(f"layers must be increasing indices in 0..{num_layers - 1}, got {indices}")
    return indices


def tokens_per_layer(
    num_layers: int, layers: Sequence[int], kept: Sequence[float], visual: float
) -> list[float]:
    """Visual tokens at the input of every decoder layer (``kept`` checked by :func:`check_kept`)."""
    layers = check_layers(layers, num_layers)
    out, current, schedule = [], float(visual), dict(zip(layers, check_kept(layers, kept, visual)))
    for i in range(num_layers):
        current = schedule.get(i, current)
        out.append(current)
    return out


@dataclass
class EfficiencyReport:
    """Per-layer and total numbers for one configuration, with the unpruned ones beside them."""

    model: str
    flops_convention: str
    layers: list[int]
    kept: list[float]
    visual_tokens: float
    text_tokens: float
    avg_tokens: float
    visual_per_layer: list[float]
    flops_per_layer: list[float]
    flops: float
    flops_full: float
    kv_cache_bytes_per_layer: list[float]
    kv_cache_bytes: float
    kv_cache_bytes_full: float
    includes: list[str] = field(default_factory=list)
    # linear-attention layers' conv windows and recurrent states (one sample): a fixed size that
    # pruning does not change, outside the KV cache (whose per-layer entries are 0 for those layers)
    state_bytes: float = 0.0

    @property
    def flops_ratio(self) -> float:
        return self.flops / self.flops_full

    @property
    def kv_ratio(self) -> float:
        return self.kv_cache_bytes / self.kv_cache_bytes_full

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(flops_ratio=self.flops_ratio, kv_cache_ratio=self.kv_ratio)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def table(self) -> str:
        rows = [
            f"{self.model}: {self.visual_tokens:g} visual + {self.text_tokens:g} text tokens; "
            f"FLOPs convention: {self.flops_convention}"
            + (f" (+ {', '.join(self.includes)})" if self.includes else ""),
            f"{'layers':>9} | {'visual':>7} | {'TFLOPs/layer':>12} | {'KV MiB/layer':>11}",
        ]
        start = 0
        for end in [*[layer for layer in self.layers if layer > 0], len(self.visual_per_layer)]:
            rows.append(
                f"{f'{start}-{end - 1}':>9} | {self.visual_per_layer[start]:>7.1f} | "
                f"{self.flops_per_layer[start] / 1e12:>12.4f} | {self.kv_cache_bytes_per_layer[start] / 2**20:>11.2f}"
            )
            start = end
        rows += [
            f"average visual tokens per layer (the paper's Token metric): {self.avg_tokens:.1f} of {self.visual_tokens:g}",
            f"FLOPs: {self.flops / 1e12:.3f} T of {self.flops_full / 1e12:.3f} T ({self.flops_ratio:.1%}, "
            f"saves {1 - self.flops_ratio:.1%}) [{self.flops_convention}]",
            f"KV cache: {self.kv_cache_bytes / 2**20:.1f} MiB of {self.kv_cache_bytes_full / 2**20:.1f} MiB "
            f"({self.kv_ratio:.1%}, saves {1 - self.kv_ratio:.1%})",
        ]
        if self.state_bytes:
            rows.append(
                f"linear-attention state: {self.state_bytes / 2**20:.1f} MiB per sample, whatever is pruned "
                "(not in the KV cache above)"
            )
        return "\n".join(rows)


def report(
    shape: ModelShape,
    layers: Sequence[int],
    kept: Sequence[float],
    visual_tokens: float | None = None,
    text_tokens: float = 64,
    convention: str = "paper",
    include_vision: bool = False,
    include_lm_head: bool = False,
    kv_bytes_per_element: int = 2,
    images: int = 1,
    fractions: bool = False,
) -> EfficiencyReport:
    """The report of one schedule: ``kept[k]`` visual tokens alive after ATP layer ``layers[k]``
    (``fractions=True``: a value in (0, 1) is a fraction of the tokens alive before the layer).

    ``include_vision`` adds the image encoder (2 FLOPs per MAC, ``images`` of them);
    ``include_lm_head`` adds ``2 d V`` per prompt token (a full forward's logits). KV bytes use
    ``kv_bytes_per_element`` (2 for bf16 / fp16).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    images = _checked("images", images, integer=True, low=1)
    visual = shape.visual_tokens * images if visual_tokens is None else visual_tokens
    visual = _checked("visual_tokens", visual)
    text_tokens = _checked("text_tokens", text_tokens)
    kv_bytes_per_element = _checked("kv_bytes_per_element", kv_bytes_per_element, integer=True, low=1)
    if visual + text_tokens <= 0:
        raise ValueError(
            f"{shape.name} has no visual token count in its config; give visual_tokens (--visual-tokens)"
        )
    layers = check_layers(layers, shape.num_layers)
    kept = check_kept(layers, list(kept), visual, fractions)
    per_layer_visual = tokens_per_layer(shape.num_layers, layers, kept, visual)
    per_layer = [layer_flops(text_tokens + v, shape, convention, i) for i, v in enumerate(per_layer_visual)]
    full = sum(layer_flops(text_tokens + visual, shape, convention, i) for i in range(shape.num_layers))
    flops, includes = sum(per_layer), []
    if include_vision and shape.vision is not None:
        extra = vision_flops(shape.vision) * images
        flops, full = flops + extra, full + extra
        includes.append("vision tower")
    if include_lm_head:
        extra = 2 * shape.hidden * shape.vocab * (text_tokens + visual)
        flops, full = flops + extra, full + extra
        includes.append("LM head")
    kv_width = 2 * shape.kv_heads * shape.head_dim * kv_bytes_per_element  # K and V per token
    keyed = [shape.linear is None or i not in shape.linear.layers for i in range(shape.num_layers)]
    kv_per_layer = [(text_tokens + v) * kv_width * k for v, k in zip(per_layer_visual, keyed)]
    state = 0 if shape.linear is None else len(shape.linear.layers) * shape.linear.state_elements()
    return EfficiencyReport(
        model=shape.name,
        flops_convention=convention,
        layers=layers,
        kept=kept,
        visual_tokens=visual,
        text_tokens=float(text_tokens),
        avg_tokens=sum(per_layer_visual) / shape.num_layers,
        visual_per_layer=per_layer_visual,
        flops_per_layer=per_layer,
        flops=flops,
        flops_full=full,
        kv_cache_bytes_per_layer=kv_per_layer,
        kv_cache_bytes=sum(kv_per_layer),
        kv_cache_bytes_full=(text_tokens + visual) * kv_width * sum(keyed),
        includes=includes,
        state_bytes=float(state * kv_bytes_per_element),
    )


def _checked(name: str, value, integer: bool = False, low: float = 0):
    """A plain finite number >= ``low`` (an int when ``integer``), else a message naming ``name``."""
    number, expected = plain_number(value), f"a finite {'int' if integer else 'number'} >= {low}"
    if number is None or (integer and not isinstance(number, int)):
        raise TypeError(f"{name} must be {expected}, got {described(value)}")
    if not (math.isfinite(number) and number >= low):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return number if integer else float(number)


def report_from_stats(stats, model, text_tokens: float, sample: int = 0, **options) -> EfficiencyReport:
    """The report of one sample of the last forward (``handle.stats``) of ``model``."""
    shape = shape_from_config(model.config)
    return report(
        shape,
        list(stats.layers),
        stats.kept[sample].tolist(),
        visual_tokens=float(stats.num_visual[sample]),
        text_tokens=text_tokens,
        **options,
    )
