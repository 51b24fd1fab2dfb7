"""Backbone adapters: all model-family knowledge lives here, one file per family."""

from atp.backbones.base import BackboneAdapter
from atp.backbones.llava import LlavaAdapter
from atp.hookspecs import hookimpl

__all__ = ["BackboneAdapter", "LlavaAdapter"]


@hookimpl
def atp_register_backbones(register):
    register("llava", LlavaAdapter)
