"""The LLaVA-format data pipeline, AtpTrainer and ``atp train`` on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainingArguments

import atp
from atp.host import compat
from atp.tiny.models import TinyImageProcessor, TinyTokenizer, tiny_llava
from atp.training import AtpTrainer, ConversationDataset, LlavaCollator, encode_conversation
from atp.training.data import IGNORE, SYSTEM
from tests.test_distributed import toy_dataset

pytestmark = pytest.mark.filterwarnings("ignore:atp.attach", "ignore:.*pin_memory")


def word_tokenize(text: str) -> list[int]:
    return [len(word) + 10 for word in text.split()]  # readable fake ids


def test_user_turns_are_masked_and_the_image_expands():
    record = {
        "id": "a",
        "image": "x.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is it ?"},
            {"from": "gpt", "value": "A cat"},
            {"from": "human", "value": "Colour ?"},
            {"from": "gpt", "value": "Black"},
        ],
    }
    ids, labels = encode_conversation(
        record, word_tokenize, bos_id=1, eos_id=2, image_token_id=99, image_seq_length=4
    )
    assert len(ids) == len(labels) and ids[0] == 1
    assert ids.count(99) == 4 and all(labels[i] == IGNORE for i, t in enumerate(ids) if t == 99)
    labelled = [t for t in labels if t != IGNORE]
    assert labelled == word_tokenize(" A cat") + [2] + word_tokenize(" Black") + [2]
    first_prompt = word_tokenize(SYSTEM + " USER: ")
    assert ids[1 : 1 + len(first_prompt)] == first_prompt


def test_records_without_image_and_bad_records():
    text_only = {
        "id": "t",
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
    }
    ids, labels = encode_conversation(text_only, word_tokenize, 1, 2, 99, 4)
    assert 99 not in ids and labels[-1] == 2
    implicit = {"id": "i", "image": "x.png", "conversations": text_only["conversations"]}
    assert encode_conversation(implicit, word_tokenize, 1, 2, 99, 4)[0].count(99) == 4  # placeholder added
    with pytest.raises(ValueError, match="has <image> but no 'image'"):
        encode_conversation(
            {"id": "b", "conversations": [{"from": "human", "value": "<image> x"}]},
            word_tokenize,
            1,
            2,
            99,
            4,
        )
    with pytest.raises(ValueError, match="unknown speaker 'robot'"):
        encode_conversation(
            {"id": "c", "conversations": [{"from": "robot", "value": "x"}]}, word_tokenize, 1, 2, 99, 4
        )


def test_collator_batches_images_and_text_only_samples(tmp_path):
    data = toy_dataset(tmp_path, images=2, text_only=1)
    dataset = ConversationDataset(data)
    collate = LlavaCollator(TinyTokenizer(), TinyImageProcessor(32), 127, 16, tmp_path / "images")
    batch = collate([dataset[0], dataset[2], dataset[1]])
    assert batch["pixel_values"].shape == (2, 3, 32, 32)  # images of samples 0 and 1 only, in order
    assert (batch["input_ids"] == 127).sum(1).tolist() == [16, 0, 16]
    assert ((batch["labels"] != IGNORE) <= batch["attention_mask"].bool()).all()
    assert (batch["labels"][batch["input_ids"] == 127] == IGNORE).all()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": 1}]))
    with pytest.raises(ValueError, match="record 0 has no valid 'conversations'"):
        ConversationDataset(bad)


def make_trainer(tmp_path, budget_loss=None, **overrides):
    data = toy_dataset(tmp_path, images=4, text_only=2)
    model = tiny_llava(num_layers=4)
    handle = atp.attach(
        model,
        layers=[1, 3],
        lambda_atp=0.05,
        lambda_target=0.2,
        target_tokens=4.0,
        init_theta_r=0.2,
        budget_loss=budget_loss,
    )
    model.model.vision_tower.requires_grad_(False)
    settings = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        max_steps=4,
        learning_rate=1e-3,
        logging_steps=2,
        save_steps=2,
        report_to="none",
        remove_unused_columns=False,
        use_cpu=True,
        dataloader_pin_memory=False,
        seed=0,
    )
    settings.update(overrides)
    dataset = ConversationDataset(data)
    trainer = AtpTrainer(
        model=model,
        args=TrainingArguments(**settings),
        train_dataset=dataset,
        eval_dataset=dataset if settings.get("eval_strategy") else None,
        data_collator=LlavaCollator(TinyTokenizer(), TinyImageProcessor(32), 127, 16, tmp_path / "images"),
        atp_learning_rate=5e-3,
    )
    return trainer, handle


def test_trainer_groups_logs_and_saves_atp_only(tmp_path):
    trainer, handle = make_trainer(tmp_path)
    handle.freeze_base_model()
    trainer.train()
    groups = trainer.optimizer.param_groups
    assert [g["initial_lr"] for g in groups] == [5e-3]  # frozen base: one group, the ATP rate
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all({"atp_loss", "target_loss", "avg_tokens"} <= set(entry) for entry in logged)
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / "atp_model.safetensors").is_file() and (checkpoint / "atp_config.json").is_file()
    assert not (checkpoint / "model.safetensors").exists()  # ATP weights only
    restored = atp.attach(tiny_llava(num_layers=4), from_pretrained=tmp_path / "out" / "checkpoint-4")
    assert all(
        torch.equal(a, b)
        for a, b in zip(restored.policy.state_dict().values(), handle.policy.state_dict().values())
    )


def test_trainer_full_finetune_uses_two_learning_rates_and_saves_the_model(tmp_path):
    trainer, handle = make_trainer(tmp_path, max_steps=2)
    trainer.train()
    rates = sorted(g["initial_lr"] for g in trainer.optimizer.param_groups)
    assert rates == [1e-3, 5e-3]
    assert (tmp_path / "out" / "checkpoint-2" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "checkpoint-2" / "atp_model.safetensors").is_file()


def test_budget_terms_are_scaled_inside_training_and_reset_after(tmp_path):
    trainer, handle = make_trainer(tmp_path, gradient_accumulation_steps=2, max_steps=1)
    handle.freeze_base_model()
    seen = []
    runtime = handle.runtime
    original = runtime._on_model_output

    def spy(module, args, kwargs, output):  # the scale the budget terms get, as the model adds them
        seen.append(runtime.budget_scale)
        return original(module, args, kwargs, output)

    runtime._on_model_output = spy
    runtime.hooks[-2].remove()  # re-register the output hook with the spy
    runtime.hooks[-2] = runtime.adapter.model.register_forward_hook(spy, with_kwargs=True)
    trainer.train()
    assert seen == [0.5, 0.5]  # LM loss normalised over the window: budget / 2 per micro-batch
    assert runtime.budget_scale == 1.0  # a forward outside the Trainer adds the full terms


@pytest.mark.filterwarnings("ignore:training with prune_mode='drop'")
@pytest.mark.parametrize("mode", ["mask", "drop"])
@pytest.mark.parametrize("twice", [False, True], ids=["once", "grad-then-backward"])
def test_gradient_checkpointing_gives_the_same_gradients(batch, mode, twice):
    """Up to transformers 5.22 the recompute re-runs atp's layer hooks, from 5.23 it does not:
    either way every gradient (ATP heads in mask mode, the whole LM in drop mode) is the same.
    ``twice``: a gradient taken before the backward (as the training diagnostics take one)
    recomputes each checkpointed layer once more; the second replay must see the same state."""
    grads = []
    for checkpointing in (False, True):
        model = tiny_llava(num_layers=4)
        handle = atp.attach(
            model, layers=[1, 3], prune_mode=mode, lambda_atp=0.1, init_theta_r=0.3, init_theta_s=0.2
        )
        if checkpointing:
            compat.enable_checkpointing(model, use_reentrant=False)
        model.train()
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        trained = list(handle.parameters() if mode == "mask" else handle.base_parameters())
        if twice:
            wanted = [p for p in trained if p.requires_grad]
            torch.autograd.grad(loss, wanted, retain_graph=True, allow_unused=True)
        loss.backward()
        assert 0 < handle.stats.kept.sum() < handle.stats.num_visual.sum() * 2  # something was pruned
        grads.append([p.grad.clone() for p in trained if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for plain, checkpointed in zip(*grads):  # the recompute runs the same operations in the same order
        torch.testing.assert_close(plain, checkpointed, rtol=0, atol=0)


def test_atp_train_cli_runs_and_resumes(tmp_path, capsys):
    from atp.cli import main

    data = toy_dataset(tmp_path, images=4, text_only=2)
    common = [
        "train",
        "--model",
        "tiny",
        "--data",
        str(data),
        "--image-folder",
        str(tmp_path / "images"),
        "--output-dir",
        str(tmp_path / "run"),
        "--batch-size",
        "2",
        "--save-steps",
        "2",
        "--workers",
        "0",
        "--freeze-lm",
        "--logging-steps",
        "1",
    ]
    assert main([*common, "--max-steps", "2"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["global_step"] == 2
    assert main([*common, "--max-steps", "4", "--resume", "latest"]) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["global_step"] == 4
    state = json.loads((tmp_path / "run" / "checkpoint-4" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3, 4]
    assert (tmp_path / "run" / "atp_config.json").is_file()


def test_atp_train_initialises_the_heads_from_its_seed(tmp_path, monkeypatch):
    """The heads start from ``--seed``, not from whatever the model's loading drew from torch's
    generator (it differs between a folder, a ZeRO-3 partitioned load and the tiny model)."""
    from atp.cli.app import build_parser
    from atp.cli.train import run

    class Started(Exception):
        pass

    def started(self, *args, **kwargs):
        raise Started({k: v.clone() for k, v in self.atp_handle.policy.state_dict().items()})

    monkeypatch.setattr(AtpTrainer, "train", started)
    data = toy_dataset(tmp_path, images=2, text_only=0)
    heads = []
    for seed, draws in (("1", 0), ("1", 5), ("2", 0)):
        torch.rand(draws)  # what loading a model might draw
        args = ["train", "--model", "tiny", "--data", str(data), "--image-folder", str(tmp_path / "images")]
        args += ["--output-dir", str(tmp_path / "run"), "--seed", seed]
        with pytest.raises(Started) as start:
            run(build_parser().parse_args(args))
        heads.append(start.value.args[0])
    same = [all(torch.equal(a[k], b[k]) for k in a) for a, b in ((heads[0], heads[1]), (heads[0], heads[2]))]
    assert same == [True, False]


@pytest.mark.parametrize("name", ["ddp", "zero3", "fsdp"])
def test_shipped_accelerate_configs_load(name):
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(
        str(Path(__file__).resolve().parent.parent / "configs" / "accelerate" / f"{name}.yaml")
    )
    assert config.num_processes == 8 and config.mixed_precision == "bf16"
    if name == "zero3":
        assert (
            config.deepspeed_config["zero_stage"] == 3 and config.deepspeed_config["zero3_save_16bit_model"]
        )
    if name == "fsdp":
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
        assert config.fsdp_config["fsdp_version"] == 2  # FSDP1 is deprecated in transformers 5


def test_gradient_accumulation_gives_the_gradients_of_the_full_batch(tmp_path):
    """Two micro-batches of one sample (GA=2) accumulate the same ATP gradients as one batch of two.

    With the paper's budget terms, linear in the counts on one side of the target: the default
    ``normalized`` target term squares each micro-batch's mean error, which no accumulation of
    micro-batches reproduces (docs/training.md says so); its L_ATP is linear like the paper's."""
    grads = {}
    cases = ((1, [[0, 1]], None), (2, [[0], [1]], None), ("unscaled", [[0], [1]], 1.0))
    for accumulation, micro_batches, forced_scale in cases:
        steps = 1 if accumulation == 1 else 2
        trainer, handle = make_trainer(
            tmp_path / str(accumulation), budget_loss="paper", gradient_accumulation_steps=steps
        )
        if forced_scale is not None:  # a negative control: the budget terms not scaled for accumulation
            trainer.budget_scale = lambda num_items_in_batch, _scale=forced_scale: _scale
        handle.freeze_base_model()
        dataset, collate = trainer.train_dataset, trainer.data_collator
        batches = [collate([dataset[i] for i in indices]) for indices in micro_batches]
        items = sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in batches)
        trainer.current_gradient_accumulation_steps = steps
        trainer.model.train()
        for batch in batches:
            trainer.training_step(trainer.model, batch, num_items_in_batch=torch.tensor(items))
        grads[accumulation] = [p.grad.clone() for p in handle.parameters()]
        handle.remove()
    assert any(g.abs().sum() > 0 for g in grads[1])
    # a batch of two vs two of one: the float32 backward in other shapes sums each gradient's token
    # contributions (of both signs) in another order, ~1e-6 of their magnitudes, up to ~1e-4 of these
    # ~0.1 gradients after cancellation; a wrong budget scale moves them by > 1e-3 (checked below):
    # rtol 1e-3 sits between the two
    for full, accumulated in zip(grads[1], grads[2]):
        torch.testing.assert_close(accumulated, full, rtol=1e-3, atol=1e-5)
    unscaled = max(float((a - b).abs().max()) for a, b in zip(grads["unscaled"], grads[1]))
    assert unscaled > 1e-3  # the check above would see a wrong scale


def test_budget_scale_follows_accumulation_and_process_count(tmp_path, monkeypatch):
    trainer, handle = make_trainer(tmp_path, gradient_accumulation_steps=4)
    trainer.current_gradient_accumulation_steps = 4
    assert trainer.budget_scale(torch.tensor(10)) == 0.25
    monkeypatch.setattr(type(trainer.accelerator), "num_processes", property(lambda self: 8))
    assert trainer.budget_scale(torch.tensor(10)) == 1 / 32  # the Trainer multiplies the loss by 8 before DDP
    assert trainer.budget_scale(None) == 1.0  # no global token count: plain per-batch means
    handle.remove()


def test_records_that_cannot_train_are_refused_with_their_id(tmp_path):
    assistant_first = {
        "id": "g",
        "image": "x.png",
        "conversations": [
            {"from": "gpt", "value": "Hello"},
            {"from": "human", "value": "<image> what"},
            {"from": "gpt", "value": "a"},
        ],
    }
    with pytest.raises(ValueError, match="has more than one|no human turn to place it in|has <image>"):
        encode_conversation(
            {**assistant_first, "conversations": assistant_first["conversations"][:1]},
            word_tokenize,
            1,
            2,
            99,
            4,
        )
    data = toy_dataset(tmp_path, images=0, text_only=1)
    collate = LlavaCollator(
        TinyTokenizer(), TinyImageProcessor(32), 127, 16, tmp_path / "images", max_length=10
    )
    with pytest.raises(ValueError, match="max_length=10 cuts every answer token"):
        collate([ConversationDataset(data)[0]])


def test_the_best_checkpoint_restores_the_atp_weights(tmp_path):
    trainer, handle = make_trainer(
        tmp_path,
        max_steps=4,
        save_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=False,
    )
    handle.freeze_base_model()
    trainer.train()
    from safetensors.torch import load_file

    best = load_file(f"{trainer.state.best_model_checkpoint}/atp_model.safetensors")
    assert all(torch.equal(best[k], v) for k, v in handle.policy.state_dict().items())


def test_a_policy_without_parameters_gives_only_the_base_group():
    """keep_all / fixed have no ATP parameters: no empty first group, so the learning rate the
    Trainer logs (its first group's) is the one that trains."""
    for policy, options in (("keep_all", {}), ("fixed", {"keep": [0.5]})):
        model = tiny_llava(num_layers=4)
        with atp.attach(model, layers=[1], policy=policy, **options) as handle:
            groups = handle.param_groups(lr=1e-3, atp_lr=5e-3)
            assert [g["lr"] for g in groups] == [1e-3] and all(g["params"] for g in groups)


@pytest.mark.parametrize("where", ["default", "TORCH_EXTENSIONS_DIR"])
def test_stale_extension_locks_are_named_for_torch_before_2_14(tmp_path, monkeypatch, where):
    import os
    from pathlib import Path

    from torch.utils import cpp_extension

    import atp.training.trainer as trainer

    if where == "default":
        monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
        monkeypatch.setattr(cpp_extension, "get_default_build_root", lambda: str(tmp_path))
        assert trainer.extension_root().parent == tmp_path  # py<version>_<accelerator>
    else:
        monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    op = trainer.extension_root() / "deepspeed_shm_comm"
    assert Path(cpp_extension._get_build_directory(op.name, False)) == op  # where torch builds it
    for folder in (op, tmp_path / "py39_other" / "cpu_adam"):  # the second is not torch's: ignored
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "lock").touch()
        (folder / f"{folder.name}.so").write_bytes(b"")
        os.utime(folder / "lock", (1_000, 1_000))  # older than the library it guarded: left by torch >= 2.14
    monkeypatch.setattr(trainer, "_torch_version", lambda: (2, 14))
    trainer.check_extension_locks()  # torch 2.14 locks with the OS: the file is harmless
    monkeypatch.setattr(trainer, "_torch_version", lambda: (2, 13))
    with pytest.raises(ValueError, match="1 stale lock file") as error:
        trainer.check_extension_locks()
    assert str(op / "lock") in str(error.value) and "TORCH_EXTENSIONS_DIR" in str(error.value)
    os.utime(op / "lock")  # newer than the library: a rebuild in progress, which torch 2.13 awaits
    trainer.check_extension_locks()
    (op / "lock").unlink()
    (op / "lock").touch()
    (op / f"{op.name}.so").unlink()  # a first build in progress
    trainer.check_extension_locks()
