"""Backbone adapters: all model-family knowledge lives here, one file per family."""

from atp.backbones.aya_vision import AyaVisionAdapter
from atp.backbones.base import BackboneAdapter, VisualLayout
from atp.backbones.gemma3 import Gemma3Adapter
from atp.backbones.gemma4 import Gemma4Adapter
from atp.backbones.glm4v import Glm4vAdapter
from atp.backbones.glm46v import Glm46vAdapter
from atp.backbones.idefics3 import Idefics3Adapter, SmolVLMAdapter
from atp.backbones.internvl import InternVLAdapter
from atp.backbones.lfm2_vl import Lfm2VlAdapter
from atp.backbones.llava import LlavaAdapter
from atp.backbones.llava_next import LlavaNextAdapter
from atp.backbones.llava_next_video import LlavaNextVideoAdapter
from atp.backbones.llava_onevision import LlavaOneVisionAdapter
from atp.backbones.mistral3 import Mistral3Adapter
from atp.backbones.ovis2 import Ovis2Adapter
from atp.backbones.qwen2_vl import Qwen2VLAdapter, Qwen25VLAdapter
from atp.backbones.qwen3_5 import Qwen3_5Adapter, Qwen3_5MoeAdapter
from atp.backbones.qwen3_vl import Qwen3VLAdapter, Qwen3VLMoeAdapter
from atp.hookspecs import hookimpl

__all__ = [
    "AyaVisionAdapter",
    "BackboneAdapter",
    "Gemma3Adapter",
    "Gemma4Adapter",
    "Glm4vAdapter",
    "Glm46vAdapter",
    "Idefics3Adapter",
    "Lfm2VlAdapter",
    "LlavaAdapter",
    "LlavaNextAdapter",
    "LlavaNextVideoAdapter",
    "LlavaOneVisionAdapter",
    "Ovis2Adapter",
    "Qwen25VLAdapter",
    "Qwen2VLAdapter",
    "Qwen3_5Adapter",
    "Qwen3_5MoeAdapter",
    "Qwen3VLAdapter",
    "Qwen3VLMoeAdapter",
    "SmolVLMAdapter",
    "VisualLayout",
]


@hookimpl
def atp_register_backbones(register):
    register("llava", LlavaAdapter)
    register("llava_next", LlavaNextAdapter)
    register("llava_next_video", LlavaNextVideoAdapter)
    register("llava_onevision", LlavaOneVisionAdapter)
    register("internvl", InternVLAdapter)
    register("mistral3", Mistral3Adapter)
    register("qwen2_vl", Qwen2VLAdapter)
    register("qwen2_5_vl", Qwen25VLAdapter)
    register("qwen3_vl", Qwen3VLAdapter)
    register("qwen3_vl_moe", Qwen3VLMoeAdapter)
    register("qwen3_5", Qwen3_5Adapter)
    register("qwen3_5_moe", Qwen3_5MoeAdapter)
    register("gemma3", Gemma3Adapter)
    register("gemma4", Gemma4Adapter)
    register("glm4v", Glm4vAdapter)
    register("glm46v", Glm46vAdapter)
    register("idefics3", Idefics3Adapter)
    register("smolvlm", SmolVLMAdapter)
    register("ovis2", Ovis2Adapter)
    register("aya_vision", AyaVisionAdapter)
    register("lfm2_vl", Lfm2VlAdapter)
