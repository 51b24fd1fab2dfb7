"""Backbone adapters: all model-family knowledge lives here, one file per family."""

from atp.backbones.base import BackboneAdapter, VisualLayout
from atp.backbones.llava import LlavaAdapter
from atp.backbones.qwen2_vl import Qwen2VLAdapter, Qwen25VLAdapter
from atp.hookspecs import hookimpl

__all__ = ["BackboneAdapter", "LlavaAdapter", "Qwen25VLAdapter", "Qwen2VLAdapter", "VisualLayout"]


@hookimpl
def atp_register_backbones(register):
    register("llava", LlavaAdapter)
    register("qwen2_vl", Qwen2VLAdapter)
    register("qwen2_5_vl", Qwen25VLAdapter)
