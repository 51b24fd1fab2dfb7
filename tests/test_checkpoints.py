"""Tiny checkpoint folders with a real processor, loaded with the Auto classes as a hub model is,
and the processor's outputs given straight to ``generate`` with and without atp."""

from __future__ import annotations

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

import atp
from atp.cli import main
from atp.tiny import FAMILIES, tiny_model_and_processor, write_tiny_checkpoint

CLASSES = {
    "llava": ("LlavaForConditionalGeneration", "LlavaProcessor"),
    "llava_next": ("LlavaNextForConditionalGeneration", "LlavaNextProcessor"),
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
}
FILES = {
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
}
# each processor's own extra outputs, given to generate unchanged
EXTRA_INPUTS = {"llava_next": {"image_sizes"}, "qwen2_vl": {"image_grid_thw", "mm_token_type_ids"}}
EXTRA_INPUTS["qwen2_5_vl"] = EXTRA_INPUTS["qwen2_vl"]


@pytest.fixture(scope="module", autouse=True)
def offline():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


def load(folder):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoProcessor.from_pretrained(folder), AutoModelForImageTextToText.from_pretrained(folder)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """family -> (folder, processor, model): written once per family, loaded with the Auto classes."""
    loaded = {}

    def get(family: str):
        if family not in loaded:
            folder = write_tiny_checkpoint(tmp_path_factory.mktemp(family), family)
            loaded[family] = (folder, *load(folder))
        return loaded[family]

    return get


def picture(height: int, width: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def newline_rows(model, inputs: dict) -> list[int]:
    """LLaVA-NeXT: the ``image_newline`` features of each image (structural, not visual for atp),
    counted in the model's own packed image features."""
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
    newline = model.model.image_newline
    return [int((image == newline).all(dim=-1).sum()) for image in features.pooler_output]


def expected_visual(model, inputs: dict, images_per_sample: list[int]) -> list[int]:
    """Visual tokens per sample: the image (and video) placeholders the processor wrote, less
    LLaVA-NeXT's newline features."""
    ids, config = inputs["input_ids"], model.config
    placeholders = (ids == config.image_token_id) | (ids == getattr(config, "video_token_id", -1))
    placeholders = placeholders.sum(dim=1).tolist()
    if model.config.model_type != "llava_next":
        return placeholders
    rows, start = newline_rows(model, inputs), 0
    for b, count in enumerate(images_per_sample):
        placeholders[b] -= sum(rows[start : start + count])
        start += count
    return placeholders


def generate_both(model, processor, inputs: dict, images_per_sample: list[int]):
    """Greedy ``generate`` on the processor's outputs unattached and with atp (fixed 1/2, 1/2 at
    layers 1, 2); checks the visual counts and that the new ids decode one word per id."""
    before = {name: value.clone() for name, value in inputs.items()}
    width = inputs["input_ids"].shape[1]
    with torch.no_grad():
        full = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        with atp.attach(model, layers=[1, 2], policy="fixed", keep=[0.5, 0.5]) as handle:
            pruned = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    stats = handle.stats
    visual = expected_visual(model, inputs, images_per_sample)
    assert stats.num_visual.tolist() == visual and min(visual) > 0
    first = torch.round(stats.num_visual.double() * 0.5).long()
    assert stats.kept.tolist() == torch.stack([first, torch.round(first.double() * 0.5).long()], 1).tolist()
    for name, value in before.items():  # passed through unchanged
        assert torch.equal(inputs[name], value), name
    for sequences in (full, pruned):
        assert sequences.shape[0] == inputs["input_ids"].shape[0] and sequences.shape[1] > width
        assert torch.equal(sequences[:, :width], inputs["input_ids"])
        for ids in sequences[:, width:]:
            text = processor.decode(ids, skip_special_tokens=False)
            assert len(text.split()) == len(ids)
        assert all(isinstance(text, str) for text in processor.batch_decode(sequences[:, width:]))
    return full, pruned


@pytest.mark.parametrize("family", FAMILIES)
def test_folder_loads_like_a_hub_checkpoint(family, checkpoint):
    folder, processor, model = checkpoint(family)
    assert {path.name for path in folder.iterdir()} == FILES  # safetensors, no pickle
    assert (type(model).__name__, type(processor).__name__) == CLASSES[family]
    tokenizer, config, text = processor.tokenizer, model.config, model.config.text_config
    assert len(tokenizer) == text.vocab_size
    assert tokenizer.convert_tokens_to_ids(processor.image_token) == config.image_token_id
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (text.pad_token_id, text.eos_token_id)
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.eos_token_id in np.atleast_1d(model.generation_config.eos_token_id)
    if family.startswith("qwen"):
        for name in ("video_token", "vision_start_token", "vision_end_token"):
            assert tokenizer.convert_tokens_to_ids(getattr(tokenizer, name)) == getattr(config, f"{name}_id")
        assert tokenizer.bos_token is None and text.bos_token_id == tokenizer.pad_token_id  # as Qwen2-VL
    else:
        assert tokenizer.bos_token_id == text.bos_token_id
    original, _ = tiny_model_and_processor(family)
    loaded = model.state_dict()
    assert all(torch.equal(value, loaded[name]) for name, value in original.state_dict().items())


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_with_two_images_generates_with_atp(family, checkpoint):
    _, processor, model = checkpoint(family)
    images = [picture(40, 52, seed=1), picture(24, 16, seed=2)]  # different sizes
    content = [{"type": "image", "image": image} for image in images]
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": "what is shown here?"}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert EXTRA_INPUTS.get(family, set()) <= set(inputs)
    if family.startswith("qwen"):
        assert inputs["image_grid_thw"].shape == (2, 3) and not torch.equal(*inputs["image_grid_thw"])
    generate_both(model, processor, dict(inputs), [2])


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_batch_of_two_prompts_left_padded(family, checkpoint):
    _, processor, model = checkpoint(family)
    image = "<|vision_start|><|image_pad|><|vision_end|>" if family.startswith("qwen") else "<image>\n"
    questions = ["what is shown?", "describe the colour of the sky and the water in this picture"]
    prompts = [f"USER: {image}{question} ASSISTANT:" for question in questions]
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        inputs = processor(
            text=prompts, images=[picture(32, 32), picture(36, 60, seed=3)], padding=True, return_tensors="pt"
        )
    finally:
        tokenizer.padding_side = side
    assert inputs["attention_mask"][0, 0] == 0 and bool(inputs["attention_mask"][:, -1].all())
    assert EXTRA_INPUTS.get(family, set()) <= set(inputs)
    generate_both(model, processor, dict(inputs), [1, 1])


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_image_and_video_in_one_prompt(family, checkpoint):
    _, processor, model = checkpoint(family)
    frames = np.stack([np.asarray(picture(16, 20, seed)) for seed in range(4)])  # (T, H, W, 3)
    text = (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>and"
        "<|vision_start|><|video_pad|><|vision_end|>what is shown?<|im_end|>\n<|im_start|>assistant\n"
    )
    inputs = processor(text=[text], images=[picture(24, 16)], videos=[frames], return_tensors="pt")
    assert {"image_grid_thw", "video_grid_thw", "pixel_values_videos", "mm_token_type_ids"} <= set(inputs)
    assert bool((inputs["input_ids"] == model.config.video_token_id).any())
    generate_both(model, processor, dict(inputs), [1])


def test_cli_writes_a_checkpoint_the_auto_classes_load(tmp_path, capsys):
    folder = tmp_path / "tiny-qwen"
    assert main(["tiny-checkpoint", str(folder), "--family", "qwen2_vl", "--layers", "3", "--seed", "1"]) == 0
    assert "wrote a tiny random qwen2_vl (3 layers, seed 1)" in capsys.readouterr().out
    processor, model = load(folder)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert model.config.text_config.num_hidden_layers == 3
    assert type(processor).__name__ == "Qwen2VLProcessor"
    assert main(["tiny-checkpoint", str(folder)]) == 2
    assert "atp tiny-checkpoint: error:" in (err := capsys.readouterr().err) and "--force" in err
    assert main(["tiny-checkpoint", str(folder), "--force", "--num-layers", "2"]) == 0
    assert load(folder)[1].config.model_type == "llava"
    (tmp_path / "file").write_text("x")
    assert main(["tiny-checkpoint", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):  # argparse refuses the value before the command runs
        main(["tiny-checkpoint", str(tmp_path / "new"), "--num-layers", "0"])
    assert "argument --num-layers/--layers: must be an int >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_llava_weights_are_named_as_on_the_hub_and_load_as_written(tmp_path, family):
    """Serving engines read the hub's names (``vision_tower.vision_model.*``); transformers reads both."""
    from safetensors import safe_open

    folder = write_tiny_checkpoint(tmp_path, family, num_layers=2, head_dim=32)
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        names = list(handle.keys())
    tower = [name for name in names if name.startswith("vision_tower.")]
    assert tower and all(name.startswith("vision_tower.vision_model.") for name in tower)
    written, _ = tiny_model_and_processor(family, num_layers=2, head_dim=32)
    loaded = load(folder)[1]
    expected, found = written.state_dict(), loaded.state_dict()
    assert expected.keys() == found.keys() and all(torch.equal(expected[k], found[k]) for k in expected)
    assert loaded.config.text_config.hidden_size == 128  # 4 heads of 32


def test_llava_takes_its_image_and_patch_size():
    """LLaVA-1.5's 576 visual tokens (336 px, 14 px patches), for benchmarks at the paper's shape."""
    import numpy as np
    from PIL import Image

    model, processor = tiny_model_and_processor("llava", num_layers=1, image_size=336, patch_size=14)
    image = Image.fromarray(np.zeros((40, 50, 3), dtype=np.uint8))
    inputs = processor(text="USER: <image>\nWhat is it ? ASSISTANT:", images=image, return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 576
    assert inputs["pixel_values"].shape[-2:] == (336, 336)
    with pytest.raises(ValueError, match="LLaVA-1.5's options"):
        tiny_model_and_processor("qwen2_vl", image_size=64)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        tiny_model_and_processor("llava", image_size=30, patch_size=8)


def test_cli_sets_the_head_width(tmp_path, capsys):
    folder = tmp_path / "wide"
    assert main(["tiny-checkpoint", str(folder), "--family", "qwen2_5_vl", "--head-dim", "32"]) == 0
    assert "head_dim 32" in capsys.readouterr().out
    text = load(folder)[1].config.text_config
    assert (text.hidden_size, text.num_attention_heads) == (128, 4)
    assert sum(text.rope_parameters["mrope_section"]) == 32 // 2  # M-RoPE covers the rotary half
    assert main(["tiny-checkpoint", str(tmp_path / "odd"), "--head-dim", "33"]) == 2
    assert "--head-dim must be even" in capsys.readouterr().err and not (tmp_path / "odd").exists()


def test_bad_arguments_name_the_choices(tmp_path):
    with pytest.raises(ValueError, match="choose one of llava, llava_next, qwen2_vl, qwen2_5_vl"):
        write_tiny_checkpoint(tmp_path, "gpt2")
    with pytest.raises(ValueError, match="num_layers must be an int >= 1"):
        write_tiny_checkpoint(tmp_path, "llava", num_layers=0)
    assert not any(tmp_path.iterdir())


SIDES = st.integers(min_value=2, max_value=600)


@pytest.mark.parametrize("family", FAMILIES)
@settings(
    max_examples=6,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(sizes=st.lists(st.tuples(SIDES, SIDES), min_size=2, max_size=2))
@example(sizes=[(400, 8), (8, 400)])  # a tall image first: its high-resolution grid unpads to no column
@example(sizes=[(1000, 12), (5, 5)])
def test_the_processor_s_own_layout_at_extreme_aspect_ratios(family, checkpoint, sizes):
    """Two images of drawn sizes (aspect ratios up to 300:1 either way) in one prompt, laid out by
    the family's real processor: atp reads the grids transformers lays out (LLaVA-NeXT's tall
    images unpad to rows of newlines only) and generates with them."""
    _, processor, model = checkpoint(family)
    image = "<|vision_start|><|image_pad|><|vision_end|>" if family.startswith("qwen") else "<image>\n"
    inputs = processor(
        text=[f"USER: {image}and {image}what is shown? ASSISTANT:"],
        images=[picture(height, width, seed=k) for k, (height, width) in enumerate(sizes)],
        return_tensors="pt",
    )
    generate_both(model, processor, dict(inputs), [2])
