"""Training ATP: soft masks, budget loss, gradients, regimes, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

import atp
from atp.components.budget_loss import PaperBudgetLoss
from atp.tiny.models import tiny_llava

pytestmark = pytest.mark.filterwarnings("ignore:atp.attach")


def with_labels(batch: dict, model) -> dict:
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    labels[labels == model.config.image_token_id] = -100
    return {**batch, "labels": labels}


def test_budget_loss_matches_the_paper_equations():
    soft = [torch.tensor([[1.0, 1.0, 0.5, 0.0]]), torch.tensor([[1.0, 0.5, 0.0, 0.0]])]
    losses = PaperBudgetLoss(target_tokens=2.0)(soft, torch.tensor([4]), layers=(1, 3), num_layers=4)
    assert losses["atp"].item() == pytest.approx(2.5 / 4 * 1 + 1.5 / 4 * 3)
    n_bar = (1 * 4 + 2 * 2.5 + 1 * 1.5) / 4
    assert losses["target"].item() == pytest.approx(abs(n_bar - 2.0))
    text_only = PaperBudgetLoss(2.0)([torch.zeros(1, 0)] * 2, torch.tensor([0]), (1, 3), 4)
    assert text_only["atp"].item() == 0.0 and text_only["target"].item() == 0.0


def test_budget_terms_are_added_to_the_loss_with_labels_in_training(model, batch):
    inputs = with_labels(batch, model)
    model.train()
    losses = {}
    for add in (False, True):
        with atp.attach(
            model, layers=[1, 3], lambda_atp=0.05, lambda_target=0.2, target_tokens=6.0, add_budget_loss=add
        ) as handle:
            torch.manual_seed(0)
            losses[add] = (model(**inputs).loss, handle.stats.losses)
    terms = losses[True][1]
    assert set(terms) == {"atp", "target"} and terms["atp"].requires_grad
    expected = losses[False][0] + 0.05 * terms["atp"] + 0.2 * terms["target"]
    torch.testing.assert_close(losses[True][0], expected)
    model.eval()
    with atp.attach(model, layers=[1, 3], lambda_atp=0.05), torch.no_grad():
        out = model(**inputs)  # eval: the loss is the plain next-token loss
    shifted = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].flatten(0, 1), inputs["labels"][:, 1:].flatten(), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, shifted)


def test_gradients_reach_every_atp_parameter_and_the_lm(model, batch):
    inputs = with_labels(batch, model)
    model.train()
    # Both mask branches active. 16 visual tokens sit about 1/16 apart on each score, so at the
    # default T = 100 a branch may have no token inside its sigmoid's transition (float32 rounds
    # sigmoid(x > 17) to exactly 1): T = 10 spreads the transition over several tokens.
    handle = atp.attach(
        model,
        layers=[1, 3],
        lambda_atp=0.05,
        lambda_target=0.2,
        target_tokens=6.0,
        init_theta_r=0.3,
        init_theta_s=0.2,
        temperature=10.0,
    )
    optimizer = torch.optim.SGD(handle.param_groups(lr=1e-3, atp_lr=1e-2))
    for _ in range(2):  # the output layers start at zero, so the first step only moves them
        optimizer.zero_grad()
        model(**inputs).loss.backward()
        optimizer.step()
    for name, param in handle.policy.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert model.model.language_model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    assert model.lm_head.weight.grad.abs().sum() > 0
    handle.remove()


def test_frozen_mode_leaves_the_lm_bitwise_unchanged(model, batch):
    inputs = with_labels(batch, model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handle = atp.attach(model, layers=[1, 3], lambda_atp=0.05, init_theta_r=0.3)
    handle.freeze_base_model()
    groups = handle.param_groups()
    assert len(groups) == 1 and groups[0]["lr"] == 1e-4
    model.train()
    optimizer = torch.optim.AdamW(groups)
    heads_before = [p.clone() for p in handle.parameters()]
    for _ in range(3):
        optimizer.zero_grad()
        model(**inputs).loss.backward()
        optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(heads_before, handle.parameters()))
    handle.remove()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_budget_moves_the_token_count_to_the_target_and_drop_agrees_with_soft(batch):
    model = tiny_llava(num_layers=4)
    handle = atp.attach(model, layers=[1, 2, 3], lambda_target=1.0, target_tokens=5.0)
    handle.freeze_base_model()
    model.train()
    optimizer = torch.optim.Adam(handle.parameters(), lr=0.01)
    tokens, losses = [], []
    for _ in range(60):
        model(**batch)  # a custom loop: the terms are read from the stats
        loss = handle.stats.losses["target"]
        tokens.append(handle.stats.avg_tokens)  # the hard Token metric: what inference would keep
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # the term is the squared error as a fraction of the 16 visual tokens, of the hard counts
    assert losses[0] == pytest.approx(((tokens[0] - 5.0) / 16) ** 2, rel=1e-5)
    assert tokens[0] > 8.0 and abs(tokens[-1] - 5.0) < 1.0
    model(**batch)
    soft_kept = handle.stats.soft_kept.detach()
    model.eval()
    with torch.no_grad():
        model(**batch)
    assert handle.runtime.prefill.mode == "drop"
    assert (handle.stats.kept.float() - soft_kept).abs().max() <= 1.0
    assert abs(handle.stats.avg_tokens - 5.0) < 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_soft_masks_never_produce_nan(batch, dtype):
    model = tiny_llava(num_layers=4).to(dtype)
    inputs = with_labels({**batch, "pixel_values": batch["pixel_values"].to(dtype)}, model)
    handle = atp.attach(
        model,
        layers=[1, 2, 3],
        lambda_atp=0.1,
        lambda_target=0.2,
        target_tokens=2.0,
        init_theta_r=0.9,
        init_theta_s=0.95,
        temperature=200.0,
    )
    model.train()
    loss = model(**inputs).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert handle.stats.soft_masks[-1].min() < 1e-3  # some tokens are (softly) pruned hard
    for param in model.parameters():
        if param.grad is not None:
            assert torch.isfinite(param.grad).all()
    handle.remove()


def test_checkpoint_round_trip_is_bitwise(tmp_path, batch):
    model = tiny_llava(num_layers=4)
    handle = atp.attach(model, layers=[1, 3], init_theta_r=0.4, temperature=80.0, lambda_atp=0.03)
    with torch.no_grad():
        for param in handle.parameters():
            param.add_(torch.randn_like(param) * 0.01)
        model(**batch)
    kept, state = handle.stats.kept, {k: v.clone() for k, v in handle.policy.state_dict().items()}
    handle.save_pretrained(tmp_path)
    handle.remove()
    config = json.loads((tmp_path / "atp_config.json").read_text())
    assert config["layers"] == [1, 3] and config["policy"] == "atp"
    assert config["options"] == {"init_theta_r": 0.4, "temperature": 80.0}
    assert config["model"]["num_visual_tokens"] == 16 and config["atp_version"] == atp.__version__
    fresh = tiny_llava(num_layers=4)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # trained weights: no "untrained" warning
        restored = atp.attach(fresh, from_pretrained=tmp_path)
    assert restored.layers == (1, 3) and restored.budget.lambda_atp == 0.03
    assert all(torch.equal(v, state[k]) for k, v in restored.policy.state_dict().items())
    with torch.no_grad():
        fresh(**batch)
    assert torch.equal(restored.stats.kept, kept)


def test_mismatched_checkpoints_name_the_mismatch(tmp_path):
    handle = atp.attach(tiny_llava(num_layers=4), layers=[1, 3])
    handle.save_pretrained(tmp_path)
    for model, message in [
        (tiny_llava(num_layers=6), "num_layers: checkpoint 4, model 6"),
        (tiny_llava(num_layers=4, hidden_size=32), "hidden_size: checkpoint 64, model 32"),
        (tiny_llava(num_layers=4, image_size=48), "num_visual_tokens: checkpoint 16, model 36"),
    ]:
        with pytest.raises(ValueError, match=message):
            atp.attach(model, from_pretrained=tmp_path)
        assert "atp" not in dict(model.named_children())
    with pytest.raises(ValueError, match=r"layers=\[2\] differ from the checkpoint's \[1, 3\]"):
        atp.attach(tiny_llava(num_layers=4), layers=[2], from_pretrained=tmp_path)
    with pytest.raises(FileNotFoundError, match="is not an atp checkpoint"):
        atp.attach(tiny_llava(num_layers=4), from_pretrained=tmp_path / "missing")
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "atp_model.safetensors")
    weights.pop("heads.1.theta_s.bias")
    weights["heads.9.extra"] = torch.zeros(1)
    save_file(weights, tmp_path / "atp_model.safetensors")
    with pytest.raises(
        ValueError, match=r"missing keys \['heads.1.theta_s.bias'\]; unexpected keys \['heads.9.extra'\]"
    ):
        atp.attach(tiny_llava(num_layers=4), from_pretrained=tmp_path)


def test_options_that_cannot_be_saved_are_refused(tmp_path, model):
    masks = [torch.ones(1, 16, dtype=torch.bool)]
    handle = atp.attach(model, layers=[1], policy="manual", keep_masks=masks)
    with pytest.raises(ValueError, match="cannot be saved as JSON"):
        handle.save_pretrained(tmp_path)
    handle.remove()


def test_budget_options_are_validated(model):
    with pytest.raises(ValueError, match="lambda_target > 0 needs target_tokens"):
        atp.attach(model, layers=[1], lambda_target=0.2)
    with pytest.raises(ValueError, match="lambda_atp must be a finite number >= 0"):
        atp.attach(model, layers=[1], lambda_atp=-1)
    assert "atp" not in dict(model.named_children())


def test_budget_terms_reach_tuple_outputs(model, batch):
    inputs = with_labels(batch, model)
    model.train()
    with atp.attach(model, layers=[1, 3], lambda_atp=0.05, init_theta_r=0.3) as handle:
        torch.manual_seed(0)
        as_dict = model(**inputs).loss
        torch.manual_seed(0)
        as_tuple = model(**inputs, return_dict=False)[0]
        assert handle.stats.losses["atp"] > 0
    torch.testing.assert_close(as_tuple, as_dict)


def test_unsaveable_options_leave_no_folder(tmp_path, model):
    handle = atp.attach(model, layers=[1], policy="manual", keep_masks=[torch.ones(1, 16, dtype=torch.bool)])
    with pytest.raises(ValueError, match="cannot be saved as JSON"):
        handle.save_pretrained(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    handle.remove()
