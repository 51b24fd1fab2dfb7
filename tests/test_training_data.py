"""The streaming data pipeline, several images per record, missing images, the modality sampler,
and the paper's recipe (``configs/recipes``) resolved by ``atp train --dry-run``."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from atp.cli import main
from atp.tiny.models import TinyImageProcessor, TinyTokenizer
from atp.training.data import (
    IGNORE,
    ConversationDataset,
    LlavaCollator,
    ModalityLengthGroupedSampler,
    encode_conversation,
    iter_json_list,
)

pytestmark = pytest.mark.filterwarnings("ignore:atp.attach", "ignore:.*pin_memory")
ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "recipes" / "atp-llava-1.5-7b.yaml"


def turns(*values: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def write_sample(folder: Path) -> Path:
    """A small file in the llava_v1_5_mix665k layout: COCO-style image records (one multi-turn),
    two with several images, text-only ShareGPT-style records (one multi-turn, non-ASCII) and one
    record whose image file is missing. 10 records, 9 usable."""
    rng = np.random.default_rng(0)
    for i, name in enumerate(
        ["coco/train2017/0.jpg", "coco/train2017/1.jpg", "gqa/images/2.jpg", "vg/3.png"]
    ):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (30 + 4 * i, 40, 3), dtype=np.uint8)).save(folder / name)
    records = [
        {"id": "0", "image": "coco/train2017/0.jpg", "conversations": turns("<image>\nWhat is it?", "A cat")},
        {
            "id": "1",
            "image": "coco/train2017/1.jpg",
            "conversations": turns("What colour?\n<image>", "Red", "And the sky?", "Blue", "Left?", "A tree"),
        },
        {"id": "2", "image": "gqa/images/2.jpg", "conversations": turns("Is it big?", "Yes")},  # no <image>
        {
            "id": "multi",
            "image": ["vg/3.png", "coco/train2017/0.jpg"],
            "conversations": turns("<image>\nand <image>\nsame?", "No"),
        },
        {
            "id": "multi-implicit",
            "image": ["gqa/images/2.jpg", "vg/3.png"],
            "conversations": turns("Two?", "Yes"),
        },
        {
            "id": "lost",
            "image": "ocr_vqa/images/missing.jpg",
            "conversations": turns("<image>\nTitle?", "Moby"),
        },
        {"id": "t0", "conversations": turns("Count to three", "1 2 3")},
        {"id": "t1", "conversations": turns("Héllo, ça va ? 日本", "Très bien", "Et toi ?", "Oui")},
        {"id": "t2", "conversations": turns("Say yes", "yes")},
        {"id": "t3", "conversations": turns("Say no " * 20, "no")},
    ]
    path = folder / "llava_v1_5_mix665k.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


@pytest.mark.parametrize("chunk_size", [1, 7, 1 << 22])
def test_the_index_streams_records_by_byte_offset(tmp_path, chunk_size):
    path = write_sample(tmp_path)
    records = json.loads(path.read_text(encoding="utf-8"))
    raw = path.read_bytes()
    found = list(iter_json_list(path, chunk_size))
    assert [value for _, _, value in found] == records
    assert all(json.loads(raw[offset : offset + size]) == value for offset, size, value in found)


def test_the_dataset_reads_records_lazily_also_in_workers(tmp_path):
    path = write_sample(tmp_path)
    records = json.loads(path.read_text(encoding="utf-8"))
    dataset = ConversationDataset(path)  # no image folder: no existence check
    assert len(dataset) == 10 and [dataset[i] for i in range(10)] == records
    assert dataset.image_counts.tolist() == [1, 1, 1, 2, 2, 1, 0, 0, 0, 0]
    assert dataset.lengths[9] == len("Say no " * 20) + 2 and not hasattr(dataset, "records")
    assert pickle.loads(pickle.dumps(dataset))[7] == records[7]  # no open file in the pickle
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=list)
    assert [r for batch in loader for r in batch] == records


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"id": "a"}, "record 1 has no valid 'conversations' list (id 'a')"),
        (
            {"id": "b", "conversations": [{"from": "human"}]},
            "record 1 has no valid 'conversations' list: turn 0",
        ),
        (
            {"id": "c", "conversations": turns("<image> x", "y")},
            "record 1 has <image> but no 'image' (id 'c')",
        ),
        (
            {"id": "d", "image": ["x.png", "y.png"], "conversations": turns("<image> x", "y")},
            "record 1 has 1 <image> placeholders but 2 images; give one per image",
        ),
        ({"id": "e", "conversations": turns("x", "<image>")}, "has <image> in an assistant turn"),
        ({"id": "f", "conversations": [{"from": "robot", "value": "x"}]}, "unknown speaker 'robot'"),
        ({"id": "g", "conversations": turns("x")}, "has no assistant ('gpt') turn"),
        ({"id": "h", "image": 3, "conversations": turns("x", "y")}, "has 'image' 3; give a path or a list"),
        (
            {"id": "i", "image": "x.png", "conversations": [{"from": "gpt", "value": "x"}]},
            "no human turn to place it in",
        ),
    ],
)
def test_bad_records_fail_while_indexing_naming_index_and_id(tmp_path, record, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"id": "ok", "conversations": turns("x", "y")}, record]))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        ConversationDataset(path)


def test_missing_images_stop_or_are_skipped_and_counted(tmp_path):
    path = write_sample(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"1 images not found .* \['ocr_vqa/images/missing.jpg'\]"):
        ConversationDataset(path, tmp_path)
    dataset = ConversationDataset(path, tmp_path, missing_images="skip")
    assert (
        len(dataset) == 9
        and dataset.skipped == 1
        and dataset.missing == [(5, "lost", "ocr_vqa/images/missing.jpg")]
    )
    assert "lost" not in [dataset[i]["id"] for i in range(len(dataset))]
    summary = dataset.summary()
    assert (summary["with_images"], summary["text_only"], summary["multi_image"]) == (5, 4, 2)
    assert summary["multi_turn"] == 2 and summary["images"] == 7


def test_each_placeholder_takes_the_next_image_in_record_order(tmp_path):
    colours = {"red.png": (255, 0, 0), "green.png": (0, 255, 0), "blue.png": (0, 0, 255)}
    for name, colour in colours.items():
        Image.new("RGB", (32, 32), colour).save(tmp_path / name)
    records = [
        {"id": "two", "image": ["green.png", "red.png"], "conversations": turns("<image> vs <image>?", "a")},
        {"id": "text", "conversations": turns("hi", "b")},
        {
            "id": "implicit",
            "image": ["blue.png", "green.png"],
            "conversations": turns("which?", "c", "more", "d"),
        },
    ]
    ids, labels = encode_conversation(records[2], lambda t: [len(w) + 10 for w in t.split()], 1, 2, 99, 4)
    assert ids.count(99) == 8 and all(labels[i] == IGNORE for i, t in enumerate(ids) if t == 99)
    collate = LlavaCollator(TinyTokenizer(), TinyImageProcessor(32), 127, 16, tmp_path)
    batch = collate(records)
    assert (batch["input_ids"] == 127).sum(1).tolist() == [32, 0, 32]
    dominant = batch["pixel_values"].flatten(2).mean(-1).argmax(1).tolist()  # the brightest channel
    assert dominant == [1, 0, 2, 1]  # green, red | blue, green
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=r"record 'bad': cannot read image '.*broken.png'"):
        collate([{"id": "bad", "image": "broken.png", "conversations": turns("x", "y")}])


def check_modalities(order: list[int], image_counts, megabatch: int) -> None:
    """Every megabatch before the incomplete ones (at most one per modality, at the end) is of one."""
    images = sum(count > 0 for count in image_counts)
    full = images // megabatch + (len(image_counts) - images) // megabatch
    for start in range(0, full * megabatch, megabatch):
        assert len({image_counts[i] > 0 for i in order[start : start + megabatch]}) == 1, (start, order)


@settings(max_examples=60, deadline=None)
@given(
    image_counts=st.lists(st.integers(0, 2), min_size=0, max_size=80),
    batch_size=st.integers(1, 5),
    world_size=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_the_sampler_keeps_modalities_apart_and_draws_every_index_once(
    image_counts, batch_size, world_size, seed
):
    lengths = [(i * 7919) % 50 for i in range(len(image_counts))]
    sampler = ModalityLengthGroupedSampler(image_counts, lengths, batch_size, world_size, seed=seed)
    first = list(sampler)
    assert sorted(first) == list(range(len(image_counts))) and len(sampler) == len(image_counts)
    megabatch = batch_size * world_size
    check_modalities(first, image_counts, megabatch)
    for start in range(0, len(first), megabatch):  # lengths decrease inside a one-modality chunk
        chunk = first[start : start + megabatch]
        if len({image_counts[i] > 0 for i in chunk}) == 1 and len(chunk) == megabatch:
            assert [lengths[i] for i in chunk] == sorted((lengths[i] for i in chunk), reverse=True)
    again = ModalityLengthGroupedSampler(image_counts, lengths, batch_size, world_size, seed=seed)
    assert list(again) == first  # every process draws the same order
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == sorted(first)
    check_modalities(second, image_counts, megabatch)


def test_the_sampler_reshuffles_per_epoch_and_validates():
    counts, lengths = [1] * 40 + [0] * 40, list(range(80))
    sampler = ModalityLengthGroupedSampler(counts, lengths, batch_size=2, world_size=2, seed=0)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert orders[0] != orders[1] != orders[2]
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        ModalityLengthGroupedSampler(counts, lengths, batch_size=0)
    with pytest.raises(ValueError, match=r"must be \(N,\) each"):
        ModalityLengthGroupedSampler(counts, lengths[:3], batch_size=1)


def test_atp_train_with_the_modality_sampler_several_images_and_a_skip(tmp_path, capsys, monkeypatch):
    from atp.training import AtpTrainer

    path = write_sample(tmp_path)
    argv = ["train", "--model", "tiny", "--data", str(path), "--image-folder", str(tmp_path)]
    argv += ["--output-dir", str(tmp_path / "out"), "--layers", "1", "3", "--target-tokens", "8"]
    argv += ["--batch-size", "2", "--max-steps", "3", "--save-steps", "3", "--workers", "0", "--freeze-lm"]
    argv += ["--option", "threshold_head=binned"]  # a sample with two images has 32 visual tokens
    assert main([*argv, "--group-by-modality-length"]) == 2  # the missing image stops it first
    assert "1 images not found" in capsys.readouterr().err
    seen = []
    original = AtpTrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        seen.append(((inputs["input_ids"] == 127).sum(1) > 0).tolist())
        assert isinstance(self._get_train_sampler(), ModalityLengthGroupedSampler)
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(AtpTrainer, "compute_loss", spy)
    assert main([*argv, "--group-by-modality-length", "--missing-images", "skip"]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 records with missing images (e.g. ['ocr_vqa/images/missing.jpg'])" in captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["skipped_missing_images"] == 1 and summary["records"] == 9 and summary["global_step"] == 3
    assert len(seen) == 3 and all(len(set(batch)) == 1 for batch in seen)  # one modality per batch


def llava_7b_config_folder(folder: Path) -> Path:
    """config.json only, with LLaVA-1.5-7B's values (Llama-2-7B / Vicuna + CLIP ViT-L/14-336)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
        vocab_size=32064,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        pad_token_id=32001,
    )
    vision = CLIPVisionConfig(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=32000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    ).save_pretrained(folder)
    return folder


def dry_run(argv: list[str], capsys) -> dict:
    capsys.readouterr()  # what the test printed before (DeepSpeed announces itself on import)
    assert main(["train", *argv, "--dry-run"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_the_paper_recipe_resolves_for_llava_1_5_7b_without_weights(tmp_path, capsys):
    data = write_sample(tmp_path / "playground")
    model = llava_7b_config_folder(tmp_path / "llava-1.5-7b")
    recipe = ["--config", str(RECIPE), "--model", str(model), "--data", str(data)]
    recipe += ["--image-folder", str(tmp_path / "playground"), "--missing-images", "skip"]
    recipe += ["--accelerate-config", str(ROOT / "configs/accelerate/zero3.yaml")]
    assert main(["train", *recipe, "--dry-run"]) == 2  # two records have 2 x 576 visual tokens
    assert "2 records have several images (up to 2, 1152 visual tokens" in capsys.readouterr().err
    recipe += ["--option", "threshold_head=binned"]
    plan = dry_run(recipe, capsys)
    assert (  # the published size, 7.06B to 3 digits: within 0.005e9 (7.1e-4 relative)
        plan["model"]["parameters"] == pytest.approx(7.06e9, rel=7.1e-4)
        and plan["model"]["visual_tokens"] == 576
    )
    assert plan["model"]["num_layers"] == 32 and plan["atp"]["layers"] == [4, 14, 24]
    assert plan["atp"]["budget"] == {"lambda_atp": 0.05, "lambda_target": 0.2, "target_tokens": 144.0}
    assert plan["atp"]["options"] == {"lambda_sample": 1.0, "temperature": 100.0, "threshold_head": "binned"}
    assert plan["atp"]["budget_loss"] == "normalized"
    groups = {g["group"]: g for g in plan["optimizer"]}
    assert groups["atp"]["lr"] == 1e-4 and groups["base"]["lr"] == 2e-5
    assert groups["atp"]["parameters"] == plan["model"]["atp_parameters"] > 0
    assert plan["model"]["trainable"] == groups["atp"]["parameters"] + groups["base"]["parameters"]
    assert plan["data"]["records"] == 9 and plan["data"]["skipped_missing_images"] == 1
    assert (plan["data"]["multi_image"], plan["data"]["multi_turn"], plan["data"]["text_only"]) == (2, 2, 4)
    assert plan["tokens"]["processor"].startswith("not loaded")  # a config-only folder
    launch, steps = plan["launch"], plan["schedule"]
    assert launch["num_processes"] == 8 and launch["zero_stage"] == 3 and launch["mixed_precision"] == "bf16"
    assert (
        steps["global_batch"] == 128
        and steps["steps_per_epoch"] == math.ceil(9 / 128) == steps["total_steps"]
    )
    assert steps["sampler"] == "group_by_modality_length" and steps["checkpoints"] == 1
    assert any("ZeRO-3: every step is of one modality" in check for check in plan["checks"])
    ungrouped = tmp_path / "ungrouped.yaml"  # ZeRO-3 cannot train steps of mixed modalities
    ungrouped.write_text(
        RECIPE.read_text().replace("group-by-modality-length: true", "group-by-modality-length: false")
    )
    mixed = [*recipe[2:], "--config", str(ungrouped)]
    assert main(["train", *mixed, "--dry-run"]) == 2
    assert "needs --group-by-modality-length" in capsys.readouterr().err
    # flags override the recipe: 2 processes, batch 2, accumulation 2 (its DeepSpeed value must follow)
    small = [*recipe, "--num-processes", "2", "--batch-size", "2", "--grad-accum", "2", "--freeze-lm"]
    assert main(["train", *small, "--dry-run"]) == 2
    assert "DeepSpeed gradient_accumulation_steps is 1 but --grad-accum is 2" in capsys.readouterr().err
    plan = dry_run([*small, "--accelerate-config", str(ROOT / "configs/accelerate/ddp.yaml")], capsys)
    steps = plan["schedule"]
    assert steps["global_batch"] == 8 and steps["steps_per_epoch"] == math.ceil(math.ceil(9 / 2) / 2 / 2) == 2
    assert steps["warmup_steps"] == math.ceil(0.03 * 2) and [g["group"] for g in plan["optimizer"]] == ["atp"]
    assert plan["model"]["trainable"] == plan["model"]["atp_parameters"]


def test_the_dry_run_tokenises_with_a_local_processor(tmp_path, capsys):
    from atp.tiny import write_tiny_checkpoint

    data = write_sample(tmp_path)
    model = write_tiny_checkpoint(tmp_path / "tiny")
    argv = ["--model", str(model), "--data", str(data), "--image-folder", str(tmp_path), "--output-dir", "x"]
    argv += [
        "--layers",
        "1",
        "3",
        "--missing-images",
        "skip",
        "--max-length",
        "96",
        "--option",
        "threshold_head=binned",
    ]
    tokens = dry_run(argv, capsys)["tokens"]
    assert tokens["sampled"] == 9 and tokens["max"] > tokens["min"] > 0 and tokens["cut_by_max_length"] == 0
    assert main(["train", *argv, "--max-length", "20", "--dry-run"]) == 2
    assert "max_length=20 would cut the image tokens" in capsys.readouterr().err


def test_recipe_keys_are_the_long_options(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rate: 1e-5\nlayers: [1, 3]\ncolour: red\nbatch-sise: 2\n")
    with pytest.raises(SystemExit):
        main(["train", "--config", str(recipe), "--dry-run"])
    assert (
        "atp train: error: recipe" in (err := capsys.readouterr().err)
        and "unknown key(s) batch-sise, colour" in err
    )
    data = write_sample(tmp_path)
    recipe.write_text(
        f"learning_rate: 1e-5\nlayers: [1, 3]\ndata: {data}\nimage_folder: {tmp_path}\nmissing-images: skip\n"
        "output_dir: x\nbf16: true\noption: {threshold_head: binned}\n"
    )
    plan = dry_run(["--config", str(recipe), "--model", "tiny", "--layers", "1", "2"], capsys)
    assert plan["schedule"]["learning_rate"] == 1e-5 and plan["atp"]["layers"] == [1, 2]  # flags win
    assert plan["atp"]["options"]["threshold_head"] == "binned" and plan["data"]["records"] == 9
    recipe.write_text("bf16: 1\n")
    with pytest.raises(SystemExit):
        main(["train", "--config", str(recipe), "--dry-run"])
    assert "bf16 is a flag: give true or false" in capsys.readouterr().err


def test_the_trainer_hands_the_epoch_to_the_sampler(tmp_path):
    from transformers import TrainingArguments

    import atp
    from atp.tiny.models import tiny_llava
    from atp.training import AtpTrainer

    model = tiny_llava(num_layers=4)
    atp.attach(model, layers=[1, 3], threshold_head="binned")
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2)
    settings.update(report_to="none", use_cpu=True, remove_unused_columns=False, seed=5)
    dataset = ConversationDataset(write_sample(tmp_path), tmp_path, missing_images="skip")
    for grouped in (False, True):
        trainer = AtpTrainer(
            model=model,
            args=TrainingArguments(**settings),
            train_dataset=dataset,
            data_collator=list,
            group_by_modality_length=grouped,
        )
        loader = trainer.get_train_dataloader()
        sampler = loader.batch_sampler.sampler
        assert isinstance(sampler, ModalityLengthGroupedSampler) == grouped
    assert sampler.megabatch == 4 and sampler.seed == 5  # batch x processes x accumulation
    loader.set_epoch(3)  # what the Trainer calls at each epoch
    assert sampler.epoch == 3
