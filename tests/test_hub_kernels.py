"""Hub kernels (transformers >= 5.25 kernelizes a model on load when ``kernels`` is installed).

The kernels here come from this machine, not the hub: a repository object whose layer is plain
torch code, handed to the ``kernels`` package's own ``kernelize`` through a mapping, so the swap
is the one a downloaded kernel makes. The layers are marked for kernels the way transformers'
decorators mark them (``kernels.use_kernel_forward_from_hub`` on the class), so the test is the
same at both ends of the supported range (before 5.25 transformers marks nothing itself).
"""

from __future__ import annotations

import pytest
import torch
from kernels import Mode, kernelize, use_kernel_forward_from_hub, use_kernel_mapping

import atp
from atp.host import compat
from atp.host.attach import CONTAINER_NAME
from atp.tiny.models import llava_batch, tiny_llava

pytestmark = pytest.mark.filterwarnings("ignore:atp.attach", "ignore::UserWarning:kernels")


class LocalRepository:
    """A kernel repository on this machine: ``load`` returns the layer whose forward is swapped in."""

    def __init__(self, layer: type):
        self.layer = layer

    def load(self) -> type:
        return self.layer


class RMSNormKernel(torch.nn.Module):
    """The RMSNorm arithmetic of the tiny model's own layer, as a kernel would compute it."""

    def forward(self, hidden_states):
        variance = hidden_states.float().pow(2).mean(-1, keepdim=True)
        normed = hidden_states.float() * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * normed.to(hidden_states.dtype)


class SiLUKernel(torch.nn.Module):
    def forward(self, input):
        return torch.nn.functional.silu(input)


class MLPKernel(torch.nn.Module):
    """A fused MLP: the matmuls move into the kernel (what atp must not silently count as 0)."""

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def mark(module: torch.nn.Module, layer_name: str) -> None:
    """Mark ``module`` for hub kernels under ``layer_name``, as transformers' decorator does."""
    module.__class__ = use_kernel_forward_from_hub(layer_name)(
        type(type(module).__name__, (type(module),), {})
    )


def kernelized(model, mapping: dict) -> None:
    with use_kernel_mapping({name: {"cpu": LocalRepository(layer)} for name, layer in mapping.items()}):
        kernelize(model, mode=Mode.INFERENCE, device="cpu")


def marked_model(*, mlp: bool = False):
    model = tiny_llava(num_layers=4)
    for name, module in model.model.language_model.named_modules():
        if name.endswith("layernorm") or name == "norm":
            mark(module, "RMSNorm")
        elif name.endswith("act_fn"):
            mark(module, "SiLU")
        elif mlp and name == "layers.1.mlp":
            mark(module, "LlamaMLP")
    return model


@pytest.fixture
def batch():
    return llava_batch(tiny_llava(num_layers=4), [([1, 5], [7, 8, 9], 1), ([1, 5, 6, 4], [7, 8], 1)])


def test_checked_kernels_keep_every_promise_and_the_flop_count(batch):
    plain, model = tiny_llava(num_layers=4), marked_model()
    kernelized(model, {"RMSNorm": RMSNormKernel, "SiLU": SiLUKernel})
    swapped = compat.hub_kernels(model)
    assert len(swapped) == 4 * 2 + 1 + 4 and set(swapped.values()) == {"RMSNorm", "SiLU"}
    with torch.no_grad():
        reference = model(**batch).logits
    torch.testing.assert_close(reference, plain(**batch).logits.detach(), rtol=0, atol=0)
    with atp.attach(model, layers=[2], policy="keep_all"), torch.no_grad():
        assert torch.equal(model(**batch).logits, reference)
    flops, logits = {}, {}
    for name, candidate in (("plain", plain), ("kernels", model)):
        for mode in ("drop", "mask"):
            with (
                atp.attach(candidate, layers=[2], policy="fixed", keep=[4], prune_mode=mode),
                torch.no_grad(),
            ):
                counter = compat.flop_counter(display=False)
                with counter:
                    logits[name, mode] = candidate(**batch).logits
                flops[name, mode] = counter.get_total_flops()
    assert flops["plain", "drop"] == flops["kernels", "drop"] < flops["kernels", "mask"]
    assert torch.equal(logits["plain", "drop"], logits["kernels", "drop"])
    assert torch.equal(logits["plain", "mask"], logits["kernels", "mask"])


def test_unchecked_kernels_are_refused_at_attach_and_at_the_next_forward(batch):
    model = marked_model(mlp=True)
    kernelized(model, {"RMSNorm": RMSNormKernel, "LlamaMLP": MLPKernel})
    with pytest.raises(ValueError, match=r"language_model.layers.1.mlp \(LlamaMLP\).*use_kernels=False"):
        atp.attach(model, layers=[2])
    assert CONTAINER_NAME not in model._modules  # refused before the model was touched

    later = marked_model(mlp=True)
    handle = atp.attach(later, layers=[2], policy="fixed", keep=[4])
    kernelized(later, {"LlamaMLP": MLPKernel})  # as model.train() / eval() re-kernelizes
    with pytest.raises(ValueError, match="hub kernels atp has not checked"), torch.no_grad():
        later(**batch)
    handle.remove()


def test_the_loader_says_when_kernels_is_missing_not_what_a_folder_needs(tmp_path, monkeypatch):
    """transformers 5.25 needs ``kernels`` to load a model; its error must reach the user as it is,
    not wrapped in a hint about the folder's contents."""
    from atp.cli import loading
    from atp.tiny import write_tiny_checkpoint

    folder = write_tiny_checkpoint(tmp_path / "model", "llava", num_layers=2)

    def missing(*args, **kwargs):
        raise ValueError("Kernels are not available. Please install a compatible version (0.19.1 <= version)")

    monkeypatch.setattr("transformers.AutoModelForImageTextToText.from_pretrained", missing)
    with pytest.raises(ValueError) as error:
        loading.load(str(folder))
    assert "Kernels are not available" in str(error.value)
    assert "a folder needs config.json" not in str(error.value)
    assert "USE_HUB_KERNELS=0" in str(error.value)
