"""Tiny random models built from configs (no download), for tests, docs, the demo and benchmarks.

* :mod:`atp.tiny.models`: one builder per family (``tiny_llava``, ``tiny_qwen2_vl``, ...) and the
  prompts and batches they take.
* :mod:`atp.tiny.checkpoint`: a tiny model saved with a real processor, loaded like a hub model.
"""

from atp.tiny.checkpoint import FAMILIES, tiny_model_and_processor, write_tiny_checkpoint

__all__ = ["FAMILIES", "tiny_model_and_processor", "write_tiny_checkpoint"]
