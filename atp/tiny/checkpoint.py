"""Tiny random checkpoints with a real processor, written offline, loaded like a hub model.

:func:`write_tiny_checkpoint` saves one of the tiny models of :mod:`atp.tiny.models` together with
a tokenizer (a word-level vocabulary built with ``tokenizers``: no download), the family's image
processor sized for the tiny vision tower and its chat template, so that
``AutoProcessor.from_pretrained(folder)`` and ``AutoModelForImageTextToText.from_pretrained(folder)``
read the folder exactly as they read ``llava-hf/llava-1.5-7b-hf`` or ``Qwen/Qwen2-VL-7B-Instruct``.
"""

from __future__ import annotations

from pathlib import Path

# the words every tiny tokenizer knows (the rest of the text reads as the unknown token)
_WORD_TEXT = (
    "USER ASSISTANT system user assistant You are a helpful What Describe The This . , : ; ? ! ' \" ( ) - "
    "0 1 2 3 4 5 6 7 8 9 what is shown in the image picture photo video this that these those "
    "describe and or of to on at with from by for it its there here one two three four five six seven "
    "eight nine ten red green blue black white yellow colour color left right top bottom middle "
    "up down big small large many few cat dog car tree house person people sky water road table "
    "how where which who why do does can see look show tell me please answer question short yes no "
    "not very more less first second last next than as be has have was were an all some each other "
    "same different inside outside near far behind front over under between around light dark bright"
)
WORDS: tuple[str, ...] = tuple(_WORD_TEXT.split())

# LLaVA-1.5's template (llava-hf): "USER: <image>\n<text> ASSISTANT:"
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{{ content['text'] + ' ' }}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Qwen2-VL-Instruct's template
QWEN_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = "
    "video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")


def word_tokenizer(specials: dict[int, str], vocab_size: int, unk: str, bos: str | None = None, **roles):
    """A ``PreTrainedTokenizerFast`` of exactly ``vocab_size`` ids: ``specials`` at their ids, the
    :data:`WORDS` in the free ids (as many as fit), split on whitespace and punctuation.

    ``roles`` name the special tokens (``eos_token="</s>"``, ``image_token="<image>"``, ...);
    ``bos``, when given, starts every encoded text.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    free = [i for i in range(vocab_size) if i not in specials]
    words = [word for word in WORDS if word not in specials.values()]
    if len(words) < len(free):
        raise ValueError(f"{len(free)} free ids but only {len(words)} words; give a smaller vocab_size")
    vocab = {**{token: i for i, token in specials.items()}, **dict(zip(words, free))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    standard = {"bos_token", "eos_token", "pad_token", "unk_token"}
    extra = {name: token for name, token in roles.items() if name not in standard}
    tokenizer.add_special_tokens(list(specials.values()))  # never split, skipped when decoding
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        unk_token=unk,
        extra_special_tokens=extra,
        **{name: token for name, token in roles.items() if name in standard},
    )
    if len(fast) != vocab_size:
        raise RuntimeError(f"the tiny tokenizer has {len(fast)} ids, not {vocab_size}")
    return fast


def _llava(num_layers: int, seed: int, tiled: bool, hidden_size: int = 64, image: tuple[int, int] = (32, 8)):
    """A tiny LLaVA-1.5 (``tiled``: LLaVA-NeXT) and its processor, the CLIP tower's CLS token
    counted and dropped as the "default" feature strategy does."""
    from transformers import CLIPImageProcessor, LlavaNextImageProcessor, LlavaNextProcessor, LlavaProcessor

    from atp.tiny.models import tiny_llava, tiny_llava_next

    if tiled:
        model = tiny_llava_next(num_layers, seed, hidden_size=hidden_size)
    else:
        model = tiny_llava(
            num_layers, seed=seed, hidden_size=hidden_size, image_size=image[0], patch_size=image[1]
        )
    config, text, vision = model.config, model.config.text_config, model.config.vision_config
    specials = {text.pad_token_id: "<pad>", text.bos_token_id: "<s>", text.eos_token_id: "</s>"}
    specials.update({3: "<unk>", config.image_token_id: "<image>"})
    tokenizer = word_tokenizer(
        specials, text.vocab_size, "<unk>", "<s>", eos_token="</s>", pad_token="<pad>", image_token="<image>"
    )
    sizes = {"size": {"shortest_edge": vision.image_size}, "crop_size": vision.image_size}
    if tiled:
        image_processor = LlavaNextImageProcessor(image_grid_pinpoints=config.image_grid_pinpoints, **sizes)
    else:
        image_processor = CLIPImageProcessor(**sizes)
    return model, (LlavaNextProcessor if tiled else LlavaProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )


def _qwen(num_layers: int, seed: int, version: str, hidden_size: int = 64):
    """A tiny Qwen2-VL (``version="2"``) or Qwen2.5-VL and its processor: an image is resized to
    h x w pixels, multiples of 4 with 64 <= h * w <= 1024, and gives (h / 2) x (w / 2) patches
    merged 2 x 2 (h * w / 16 tokens)."""
    from transformers import (
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    from atp.tiny.models import tiny_qwen2_vl

    model = tiny_qwen2_vl(num_layers, seed, version, hidden_size=hidden_size)
    config, text, vision = model.config, model.config.text_config, model.config.vision_config
    roles = {
        "image_token": (config.image_token_id, "<|image_pad|>"),
        "video_token": (config.video_token_id, "<|video_pad|>"),
        "vision_start_token": (config.vision_start_token_id, "<|vision_start|>"),
        "vision_end_token": (config.vision_end_token_id, "<|vision_end|>"),
        "eos_token": (text.eos_token_id, "<|im_end|>"),
        "pad_token": (text.pad_token_id, "<|endoftext|>"),
    }
    specials = {i: token for i, token in roles.values()}
    # Qwen's other special tokens: <|im_start|> where the tiny config has bos, the rest at the end
    others = ["<|vision_pad|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>"]
    specials.update({text.bos_token_id: "<|im_start|>", 3: "[UNK]"})
    specials.update(zip(range(text.vocab_size - len(others), text.vocab_size), others))
    tokenizer = word_tokenizer(
        specials, text.vocab_size, "[UNK]", **{name: token for name, (_, token) in roles.items()}
    )
    # as Qwen2-VL-Instruct: no bos is added, <|endoftext|> pads, either end token stops generation
    text.bos_token_id = model.generation_config.bos_token_id = text.pad_token_id
    model.generation_config.eos_token_id = [text.eos_token_id, text.pad_token_id]
    shapes = {
        "patch_size": vision.patch_size,
        "merge_size": vision.spatial_merge_size,
        "temporal_patch_size": vision.temporal_patch_size,
        "size": {"shortest_edge": 8 * 8, "longest_edge": 32 * 32},
    }
    return model, (Qwen2VLProcessor if version == "2" else Qwen2_5_VLProcessor)(
        image_processor=Qwen2VLImageProcessor(**shapes),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(cap_pixels_per_frame=True, **shapes),  # as qwen-vl-utils
        chat_template=QWEN_TEMPLATE,
    )


def tiny_model_and_processor(
    family: str = "llava",
    num_layers: int = 4,
    seed: int = 0,
    head_dim: int = 16,
    *,
    image_size: int = 32,
    patch_size: int = 8,
):
    """``(model, processor)``: what :func:`write_tiny_checkpoint` writes, in memory. The language
    model has 4 heads of ``head_dim`` (hidden ``4 * head_dim``); LLaVA-1.5's images are
    ``image_size`` pixels square in ``patch_size`` patches (336 / 14: LLaVA-1.5's 576 tokens)."""
    if family not in FAMILIES:
        raise ValueError(f"no tiny checkpoint for family {family!r}; choose one of {', '.join(FAMILIES)}")
    for name, value, least in (("num_layers", num_layers, 1), ("seed", seed, 0), ("head_dim", head_dim, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even (rotary positions rotate pairs), got {head_dim}")
    if (image_size, patch_size) != (32, 8):
        if family != "llava":
            raise ValueError(f"image_size and patch_size are LLaVA-1.5's options, not {family}'s")
        if patch_size < 1 or image_size % patch_size:
            raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
    if family.startswith("qwen"):
        return _qwen(num_layers, seed, "2" if family == "qwen2_vl" else "2.5", hidden_size=4 * head_dim)
    return _llava(num_layers, seed, family == "llava_next", 4 * head_dim, (image_size, patch_size))


def write_tiny_checkpoint(
    folder,
    family: str = "llava",
    num_layers: int = 4,
    seed: int = 0,
    head_dim: int = 16,
    *,
    image_size: int = 32,
    patch_size: int = 8,
) -> Path:
    """Write a tiny random ``family`` model with its processor to ``folder`` and return the path.

    The folder holds what a hub checkpoint holds: ``config.json``, ``generation_config.json``,
    ``model.safetensors`` (random weights from ``seed``), ``tokenizer.json``,
    ``tokenizer_config.json``, ``processor_config.json`` (the image processor and the token
    counts; Qwen's also the video processor) and ``chat_template.jinja``. Files of the same name
    already in ``folder`` are overwritten. The weights are named as on the hub: the LLaVA families'
    vision tower under ``vision_tower.vision_model.`` (transformers 5 writes ``vision_tower.`` and
    reads both; serving engines read the hub's names).

    Parameters
    ----------
    folder : where to write (created if missing).
    family : one of :data:`FAMILIES` (``llava``, ``llava_next``, ``qwen2_vl``, ``qwen2_5_vl``).
    num_layers : decoder layers of the language model.
    seed : seed of the random weights.
    head_dim : width of the language model's attention heads (4 heads; serving engines' CPU
        attention kernels take 32 and more).
    image_size, patch_size : LLaVA-1.5's picture and patch sizes in pixels (``image_size /
        patch_size`` squared visual tokens per image; 336 and 14 give LLaVA-1.5's 576).
    """
    model, processor = tiny_model_and_processor(
        family, num_layers, seed, head_dim, image_size=image_size, patch_size=patch_size
    )
    folder = Path(folder)
    model.save_pretrained(folder)  # safetensors
    processor.save_pretrained(folder)
    if family.startswith("llava"):
        _hub_vision_names(folder / "model.safetensors")
    return folder


def _hub_vision_names(path: Path) -> None:
    """Rename a LLaVA checkpoint's ``vision_tower.*`` weights to the hub's ``vision_tower.vision_model.*``."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    weights = load_file(str(path))
    prefix, hub = "vision_tower.", "vision_tower.vision_model."
    renamed = {
        hub + name[len(prefix) :] if name.startswith(prefix) and not name.startswith(hub) else name: value
        for name, value in weights.items()
    }
    save_file(renamed, str(path), metadata=metadata)
