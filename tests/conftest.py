"""Shared fixtures: tiny random LLaVA models and batches (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

from atp.tiny.models import left_pad, llava_prompt, tiny_llava

settings.register_profile("ci", deadline=None, max_examples=40, derandomize=True)
settings.load_profile("ci")


def pytest_configure(config):
    """Under pytest-xdist (``-n``) each worker gets its share of the cores: workers that each
    spread their matmuls over every core would only wait on one another."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        threads = max(1, (os.cpu_count() or 1) // int(workers))
        torch.set_num_threads(threads)
        # processes a test starts use as many, so that results compared across them round alike
        os.environ["OMP_NUM_THREADS"] = str(threads)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread, and do not stall when the cores are busy (a module
    takes it with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model():
    return tiny_llava(num_layers=4)


@pytest.fixture
def batch(model):
    """Two samples of different lengths, left padded, different images."""
    prompts = [
        llava_prompt(model, [1, 5, 6], [7, 8, 9, 10]),
        llava_prompt(model, [1, 11], [12, 13, 14, 15, 16, 17]),
    ]
    ids, mask = left_pad(prompts)
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 3, 32, 32, generator=generator)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def single(batch: dict, b: int) -> dict:
    """Sample ``b`` of a left-padded batch, with its padding removed."""
    keep = batch["attention_mask"][b].bool()
    return {
        "input_ids": batch["input_ids"][b : b + 1, keep],
        "attention_mask": batch["attention_mask"][b : b + 1, keep],
        "pixel_values": batch["pixel_values"][b : b + 1],
    }


@pytest.fixture(scope="module")
def offline():
    """No hub access for the module's tests (checkpoint folders load as hub models do)."""
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield
