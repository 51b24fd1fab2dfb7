"""GLM-4.6V (``Glm46VForConditionalGeneration``): GLM-4.1V's vision tower, prompt layout and 3D
M-RoPE around a language model built from ``text_config`` by ``AutoModel``.

The layout is GLM-4.1V's (image blocks between ``<|begin_of_image|>`` / ``<|end_of_image|>``, a
video's frames written as image blocks told apart by ``mm_token_type_ids``; GLM-4.6V only moves a
frame's timestamp after its block, which is text either way), so the adapter reads it as
:class:`Glm4vAdapter` does. What differs is the language model: transformers picks its class from
``text_config.model_type``, and atp follows the dense GLM-4.1V text model only (the one the suite
tests); another text model, e.g. the mixture of experts ``glm4v_moe_text``, is refused until the
suite covers it.
"""

from __future__ import annotations

from atp.backbones.glm4v import Glm4vAdapter

DENSE_TEXT = "glm4v_text"


class Glm46vAdapter(Glm4vAdapter):
    family = "glm46v"
    model_types = ("glm46v",)

    def check(self) -> None:
        found = getattr(self.text_config(), "model_type", None)
        if found != DENSE_TEXT:
            raise ValueError(
                f"this GLM-4.6V model's language model is {found!r}; atp follows GLM-4.6V with the dense GLM-4.1V "
                f"text model ({DENSE_TEXT!r}) only: a mixture-of-experts text model is not in "
                "atp's tested suite yet"
            )
