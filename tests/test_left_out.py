"""Families looked at and left out: each is refused by its model type with the reason, and the
reason is on the supported-models page (atp.host.attach.NOT_SUPPORTED, docs/backbones.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import atp
from atp.host.attach import NOT_SUPPORTED
from atp.tiny.models import tiny_llava

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("model_type", sorted(NOT_SUPPORTED))
def test_a_family_left_out_is_refused_with_its_reason_before_anything_is_touched(model_type):
    model = tiny_llava()
    model.config.model_type = model_type  # the refusal reads the config's model type only
    reason = re.escape(NOT_SUPPORTED[model_type])
    with pytest.raises(ValueError, match=f"model_type '{model_type}'\\): {reason}"):
        atp.attach(model, layers=[1])
    assert "atp" not in dict(model.named_children())


@pytest.mark.parametrize("model_type", sorted(NOT_SUPPORTED))
def test_a_family_left_out_is_named_on_the_supported_models_page(model_type):
    page = (ROOT / "docs" / "backbones.md").read_text()
    left_out = page[page.index("**Looked at and left out**") :].split("\n- ")[0]
    assert f"`{model_type}`" in left_out
