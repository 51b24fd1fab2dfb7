"""The study model's processor: the library's commands prompt it as the study encodes its questions."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from atp.study.processor import save_processor
from atp.study.shapes import LAYOUTS, TYPES, encode, example, pixels


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", TYPES)
def test_processor_gives_the_study_encoding(kind, layout, tmp_path):
    from transformers import AutoProcessor

    save_processor(tmp_path, 48, 4, layout)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    e = example(0, "test", 1, 48, kind, layout)
    content = [{"type": "image"}, {"type": "text", "text": " ".join(e.question)}]  # as atp visualize asks
    text = loaded.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    out = loaded(text=[text], images=[Image.fromarray(e.image)], return_tensors="pt")
    assert out["input_ids"][0].tolist() == encode(e, 144, answer=False)[0]
    # CLIPImageProcessor's rescale then normalise against the study's x / 127.5 - 1 (float32: within a few ulps)
    torch.testing.assert_close(out["pixel_values"][0], pixels(e.image), rtol=0, atol=4 * 2**-23)


def test_unknown_layout_is_refused():
    with pytest.raises(
        ValueError, match="unknown layout 'sideways'; choose from image_first, question_first"
    ):
        save_processor(".", 48, 4, "sideways")
    with pytest.raises(ValueError, match="unknown layout"):
        example(0, "test", 1, 48, layout="sideways")
