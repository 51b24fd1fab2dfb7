"""A transformers processor for the study's model, so the library's commands (``atp visualize``,
``atp eval``) can prompt it like any hub model: its word-level vocabulary (:data:`VOCAB`) as a
tokenizer and the study's pixel scaling as an image processor, saved beside the weights.

A prompt is the question alone, e.g. ``what colour is the background ?``: the processor's chat
template places it and the image as the study's layout does (``<s> <image> * n q : ... a :`` or,
with the question first, ``<s> q : ... <image> * n a :``), the ids
:func:`atp.study.shapes.encode` gives (tested). Words outside the vocabulary read as ``<pad>``
(the model has no unknown-word token).
"""

from __future__ import annotations

from pathlib import Path

from atp.study.shapes import BOS, EOS, IMAGE, LAYOUTS, PAD, VOCAB


def chat_template(layout: str) -> str:
    """A Jinja chat template: the text of the messages as the question, placed with the image
    as ``layout`` (:data:`atp.study.shapes.LAYOUTS`) places them."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    image, question = VOCAB[IMAGE], "q : {{ ns.text | trim }}"
    body = f"{question} {image} a :" if layout == "question_first" else f"{image} {question} a :"
    return (
        "{%- set ns = namespace(text='') -%}"
        "{%- for message in messages -%}{%- for item in message['content'] -%}"
        "{%- if item['type'] == 'text' -%}{%- set ns.text = ns.text + ' ' + item['text'] -%}{%- endif -%}"
        "{%- endfor -%}{%- endfor -%}" + body
    )


def processor(image_size: int, patch_size: int, layout: str = "image_first"):
    """A ``LlavaProcessor`` for the study's model: images of ``image_size`` pixels on patches of
    ``patch_size`` (the CLIP tower's class token is dropped, LLaVA's "default" strategy), prompts
    in ``layout``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    words = {word: index for index, word in enumerate(VOCAB)}
    core = Tokenizer(models.WordLevel(words, unk_token=VOCAB[PAD]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single=f"{VOCAB[BOS]} $A", special_tokens=[(VOCAB[BOS], BOS)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=VOCAB[BOS],
        eos_token=VOCAB[EOS],
        pad_token=VOCAB[PAD],
        unk_token=VOCAB[PAD],
        padding_side="left",
        extra_special_tokens={"image_token": VOCAB[IMAGE]},
    )
    images = CLIPImageProcessor(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        do_center_crop=False,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,  # x / 127.5 - 1, as atp.study.shapes.pixels
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=patch_size,
        num_additional_image_tokens=1,  # the class token, which "default" drops again
        vision_feature_select_strategy="default",
        image_token=VOCAB[IMAGE],
        chat_template=chat_template(layout),
    )


def save_processor(folder: str | Path, image_size: int, patch_size: int, layout: str = "image_first") -> None:
    """Write the study's processor files into a model folder (``from_pretrained`` reads them)."""
    processor(image_size, patch_size, layout).save_pretrained(str(folder))
