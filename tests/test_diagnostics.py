"""Training diagnostics (atp/training/diagnostics.py): the numbers are what they summarize, each warning
fires on a run built to have its problem and not on a healthy one, AtpTrainer logs them, and
``atp train --check`` says so in its exit status. Every ATP option a test depends on is set."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import TrainingArguments

import atp
from atp.tiny.models import TinyImageProcessor, TinyTokenizer, llava_batch, tiny_llava
from atp.training import AtpTrainer, ConversationDataset, LlavaCollator
from atp.training.diagnostics import DiagnosticWarning, Recorder, measure_gradients, summarize, warnings_for
from tests.test_distributed import toy_dataset

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:atp.attach")]

HEALTHY = dict(init_theta_r=0.3, init_theta_s=0.7, temperature=50.0, lambda_sample=1.0)
SAMPLES = [([1, 5], [7, 8, 9], 1), ([1, 5, 6, 4], [7, 8], 1), ([1, 6], [9, 10, 11], 0), ([1, 4, 4], [7], 1)]


def attached(layers=(1, 3), lambda_atp=0.01, lambda_target=0.0, target_tokens=8.0, **options):
    model = tiny_llava(num_layers=4)
    handle = atp.attach(
        model,
        layers=list(layers),
        lambda_atp=lambda_atp,
        lambda_target=lambda_target,
        target_tokens=target_tokens,
        **{**HEALTHY, **options},
    )
    return model, handle


def train_forward(model, samples=SAMPLES):
    """A training forward with labels (every position labelled but the padding)."""
    batch = llava_batch(model, samples)
    model.train()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return model(**batch, labels=labels)


def weighted_budget(handle) -> torch.Tensor:
    losses, budget = handle.stats.losses, handle.budget
    return budget.lambda_atp * losses["atp"] + budget.lambda_target * losses["target"]


def vary_heads(handle, seed: int = 0) -> None:
    """Random readout weights, so the thresholds differ from sample to sample."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in handle.policy.heads:
            for output in (head.theta_r, head.theta_s):
                output.weight.copy_(torch.randn(output.weight.shape, generator=generator) * 10)


def test_the_summary_is_what_the_stats_hold():
    model, handle = attached()
    vary_heads(handle)
    train_forward(model)
    stats = handle.stats
    diag = summarize(stats)

    images = stats.num_visual > 0  # the text-only sample is left out
    assert images.tolist() == [True, True, False, True] and diag.samples == 3
    soft = torch.stack([mask.detach().sum(1) for mask in stats.soft_masks], 1)[images].double()
    kept, visual = stats.kept[images].double(), stats.num_visual[images].double()
    # layers 0 see every visual token, 1-2 what ATP layer 1 kept, 3 what ATP layer 3 kept

    def token(counts):
        return ((visual + 2 * counts[:, 0] + counts[:, 1]) / 4).mean().item()

    assert diag.token_hard == pytest.approx(token(kept), abs=1e-6)
    assert diag.token_soft == pytest.approx(token(soft), abs=1e-5)
    assert diag.kept_hard == pytest.approx(kept.mean(0).tolist()) and diag.num_visual == 16
    assert diag.kept_soft == pytest.approx(soft.mean(0).tolist(), abs=1e-5)
    for name in ("theta_r", "theta_s"):
        values = stats.thresholds[name][images].double()
        for k, summary in enumerate(diag.thresholds[name]):
            column = sorted(values[:, k].tolist())
            mean = sum(column) / len(column)
            std = (sum((v - mean) ** 2 for v in column) / len(column)) ** 0.5
            assert (summary.mean, summary.std) == (pytest.approx(mean), pytest.approx(std, abs=1e-9))
            assert (summary.min, summary.max) == (pytest.approx(column[0]), pytest.approx(column[-1]))
        assert max(s.std for s in diag.thresholds[name]) > 1e-3  # the heads read each input
    logs = diag.logs()
    assert logs["atp/theta_r/std/layer3"] == round(diag.thresholds["theta_r"][1].std, 6)
    assert logs["atp/kept_soft/layer1"] == round(diag.kept_soft[0], 6)
    assert {"atp/token_soft", "atp/token_hard", "atp/theta_s/max/layer1"} <= set(logs)
    assert "atp/grad_share_budget" not in logs  # nothing measured


def test_a_forward_without_images_has_nothing_to_summarize():
    model, handle = attached()
    train_forward(model, [([1, 6], [9, 10], 0)])
    assert summarize(handle.stats) is None


def test_a_healthy_model_gets_no_warning():
    model, handle = attached()
    outputs = train_forward(model)
    weighted = weighted_budget(handle)
    diag = summarize(handle.stats, measure_gradients(handle.policy, weighted, outputs.loss - weighted))
    assert 0 < diag.gradients.share < 0.99
    assert warnings_for(diag) == []


def test_a_saturated_threshold_is_named():
    model, handle = attached()
    with torch.no_grad():
        handle.policy.heads[0].theta_r.bias.fill_(20.0)  # sigmoid(20): 1 - 2e-9 for every input
    train_forward(model)
    diag = summarize(handle.stats)
    assert [f.key for f in warnings_for(diag) if f.kind == "saturated"] == ["saturated/theta_r/layer1"]
    assert "theta_r at ATP layer 1 is saturated" in str(warnings_for(diag)[0])
    train_forward(model, SAMPLES[:1])  # one sample: no spread to judge
    assert not [f for f in warnings_for(summarize(handle.stats)) if f.kind == "saturated"]


def test_soft_and_hard_token_disagree_at_a_low_temperature():
    found = {}
    for temperature in (1.0, 50.0):
        model, handle = attached(temperature=temperature, init_theta_r=0.05, init_theta_s=0.05)
        train_forward(model)
        diag = summarize(handle.stats)
        found[temperature] = ([f.kind for f in warnings_for(diag)], diag.token_hard - diag.token_soft)
    assert found[1.0][0] == ["soft_hard"] and found[1.0][1] > 2  # sigmoid(0.95 * 1) < 0.73: soft < hard
    assert found[50.0][0] == [] and abs(found[50.0][1]) <= 1


def test_the_gradient_parts_add_up_to_the_step_and_the_budget_share_is_judged():
    shares = {}
    for lambda_target in (0.0, 1e6):
        model, handle = attached(lambda_atp=0.0, lambda_target=lambda_target)
        handle.freeze_base_model()
        vary_heads(handle)
        outputs = train_forward(model)
        weighted = weighted_budget(handle)
        grads = measure_gradients(handle.policy, weighted, outputs.loss - weighted)
        assert all(p.grad is None for p in handle.parameters())  # measuring leaves .grad alone
        outputs.loss.backward()  # the step's own backward still runs through the kept graph
        for name in ("theta_r", "theta_s"):
            for k, head in enumerate(handle.policy.heads):
                step = sum(p.grad.double().pow(2).sum() for p in getattr(head, name).parameters()) ** 0.5
                assert grads.thresholds[name][k] == pytest.approx(float(step), rel=1e-4)
        total = sum(p.grad.double().pow(2).sum() for p in handle.parameters()) ** 0.5
        assert float(total) <= grads.budget + grads.answer + 1e-12  # the triangle inequality
        shares[lambda_target] = grads.share, [f.kind for f in warnings_for(summarize(handle.stats, grads))]
    assert shares[0.0] == (0.0, [])  # no budget weight: no budget gradient at all
    assert shares[1e6][0] > 0.99 and "budget_dominates" in shares[1e6][1]


def test_a_threshold_without_gradient_is_named_and_a_switched_off_branch_is_not():
    model, handle = attached(use_spatial=False)
    with torch.no_grad():
        handle.policy.heads[1].theta_r.bias.fill_(100.0)  # sigmoid(100) == 1.0: a flat sigmoid
    outputs = train_forward(model)
    weighted = weighted_budget(handle)
    grads = measure_gradients(handle.policy, weighted, outputs.loss - weighted)
    assert grads.thresholds["theta_s"] == [None, None]  # the spatial branch is off
    assert grads.thresholds["theta_r"][0] > 0 and grads.thresholds["theta_r"][1] == 0.0
    keys = [f.key for f in warnings_for(summarize(handle.stats, grads)) if f.kind == "no_gradient"]
    assert keys == ["no_gradient/theta_r/layer3"]


def test_the_recorder_keeps_one_step_and_warns_once_per_problem():
    model, handle = attached()
    with torch.no_grad():
        handle.policy.heads[0].theta_r.bias.fill_(20.0)
    recorder = Recorder()
    train_forward(model, SAMPLES[:2])
    recorder.record(handle.stats, step=0)
    train_forward(model, SAMPLES[2:])
    recorder.record(handle.stats, step=1)  # a new step: the first one's samples go
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        diag, found = recorder.flush()
        assert diag.samples == 1 and not found  # one sample with images: no spread to judge
        train_forward(model, SAMPLES[:2])
        recorder.record(handle.stats, step=1)  # the same step, another micro-batch
        diag, found = recorder.flush()
        diag, again = recorder.flush()
    assert diag.samples == 3 and [f.key for f in found] == ["saturated/theta_r/layer1"]
    assert again == found
    said = [str(w.message) for w in caught if issubclass(w.category, DiagnosticWarning)]
    assert len(said) == 1 and said[0] == found[0].message


def make_trainer(tmp_path, diagnostics, saturate=False, **settings):
    data = toy_dataset(tmp_path, images=4, text_only=0)
    torch.manual_seed(0)
    model, handle = attached(lambda_atp=0.05, lambda_target=0.2, target_tokens=4.0, temperature=50.0)
    if saturate:
        with torch.no_grad():
            handle.policy.heads[0].theta_r.bias.fill_(20.0)
    handle.freeze_base_model()
    args = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        max_steps=4,
        logging_steps=2,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        use_cpu=True,
        dataloader_pin_memory=False,
        disable_tqdm=True,
        seed=0,
    )
    trainer = AtpTrainer(
        model=model,
        args=TrainingArguments(**{**args, **settings}),
        train_dataset=ConversationDataset(data),
        data_collator=LlavaCollator(TinyTokenizer(), TinyImageProcessor(32), 127, 16, tmp_path / "images"),
        atp_learning_rate=1e-3,
        atp_diagnostics=diagnostics,
    )
    return trainer, handle


def test_the_trainer_logs_the_diagnostics_and_measures_gradients_only_on_logged_steps(tmp_path, monkeypatch):
    import atp.training.trainer as trainer_module

    measured = []
    original = trainer_module.measure_gradients
    trainers = []

    def spy(*args):  # the step (steps done before it) each measurement is made in
        measured.append(trainers[-1].state.global_step)
        return original(*args)

    monkeypatch.setattr(trainer_module, "measure_gradients", spy)
    trainer, handle = make_trainer(tmp_path, True)
    trainers.append(trainer)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [2, 4] and measured == [1, 3]  # in the logged steps
    keys = {"atp/token_soft", "atp/token_hard", "atp/grad_share_budget", "atp/warnings"}
    keys |= {
        f"atp/{name}/{s}/layer{k}" for name in ("theta_r", "theta_s") for s in ("mean", "std") for k in (1, 3)
    }
    assert all(keys <= set(entry) for entry in logged)
    step, diag, found = trainer.atp_recorder.last
    assert step == 3 and diag.samples == 2 and logged[-1]["atp/warnings"] == len(found)  # the last step's
    assert {key: logged[-1][key] for key in diag.logs()} == diag.logs()

    weights = {}
    for mode in (True, "stats", "off"):
        trainer, handle = make_trainer(tmp_path / str(mode), mode, max_steps=2)
        trainers.append(trainer)
        trainer.train()
        weights[mode] = [p.detach().clone() for p in handle.parameters()]
        logged = [entry for entry in trainer.state.log_history if "loss" in entry]
        assert ("atp/token_soft" in logged[-1], "atp/grad_share_budget" in logged[-1]) == {
            True: (True, True),
            "stats": (True, False),
            "off": (False, False),
        }[mode]
    assert measured == [1, 3, 1]  # "stats" and "off" measured nothing
    assert all(torch.equal(a, b) for a, b in zip(weights[True], weights["off"]))  # measuring changes no step


def test_measuring_under_gradient_checkpointing_changes_no_step(tmp_path):
    from atp.host import compat

    weights = {}
    for mode in ("gradients", "off"):
        checkpointing = compat.checkpointing_arguments(True)
        trainer, handle = make_trainer(tmp_path / mode, mode, max_steps=2, logging_steps=1, **checkpointing)
        trainer.train()
        weights[mode] = [p.detach().clone() for p in handle.parameters()]
    assert trainer.atp_recorder.last is None  # "off" records nothing
    assert all(torch.equal(a, b) for a, b in zip(weights["gradients"], weights["off"]))


def test_the_trainer_warns_once_about_a_saturated_head(tmp_path):
    trainer, handle = make_trainer(tmp_path, "stats", saturate=True, logging_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    said = [str(w.message) for w in caught if issubclass(w.category, DiagnosticWarning)]
    assert len([text for text in said if "is saturated" in text]) == 1
    assert any(text.startswith("theta_r at ATP layer 1 is saturated") for text in said)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 4 and all(entry["atp/warnings"] >= 1 for entry in logged)  # at every log


def test_the_trainer_refuses_an_unknown_diagnostics_mode(tmp_path):
    with pytest.raises(ValueError, match="atp_diagnostics must be 'stats', 'gradients'"):
        make_trainer(tmp_path, "verbose")


@pytest.mark.parametrize(
    ("options", "status"),
    [
        (["--option", "init_theta_r=0.3", "--option", "init_theta_s=0.7"], 0),
        (["--option", "init_theta_r=0.9999", "--option", "init_theta_s=0.7"], 1),
    ],
    ids=["healthy", "saturated"],
)
def test_atp_train_check_exits_by_its_verdicts_and_saves_nothing(tmp_path, capsys, options, status):
    from atp.cli import main

    data = toy_dataset(tmp_path, images=4, text_only=0)
    argv = ["train", "--check", "--check-steps", "2", "--model", "tiny", "--data", str(data)]
    argv += ["--image-folder", str(tmp_path / "images"), "--output-dir", str(tmp_path / "run")]
    argv += ["--batch-size", "2", "--workers", "0", "--freeze-lm", "--temperature", "50"]
    argv += ["--lambda-sample", "1", "--lambda-atp", "0.01", "--lambda-target", "0", *options]
    assert main(argv) == status
    out = capsys.readouterr().out
    assert out.startswith("atp train --check: step 2 of 2, 2 samples with images")
    assert "theta_r mean +- std [min, max]" in out and "budget share" in out
    verdicts = [line for line in out.splitlines() if line.startswith(("OK ", "WARN "))]
    if status == 0:
        assert len(verdicts) == 4 and all(line.startswith("OK ") for line in verdicts)
    else:
        assert "WARN theta_r at ATP layer 1 is saturated" in out
    assert not (tmp_path / "run").exists()


def test_atp_train_check_refuses_resume(tmp_path, capsys):
    from atp.cli import main

    data = toy_dataset(tmp_path, images=2, text_only=0)
    argv = ["train", "--check", "--data", str(data), "--image-folder", str(tmp_path / "images")]
    assert main([*argv, "--resume", "latest"]) == 2
    assert "--check trains from the start" in capsys.readouterr().err
