"""Benchmarks through lmms-eval: atp registers an lmms-eval model named ``atp``.

``pip install "atp[eval]"`` installs lmms-eval; then

    lmms-eval --model atp --model_args pretrained=PATH,policy=fixed,layers=4;14;24,option.keep=[0.5,0.5,0.5] \
        --tasks gqa --batch_size 8 --log_samples --output_path results/

runs any lmms-eval task with atp attached (docs/evaluation.md). lmms-eval finds the model through
the ``lmms_eval.models`` entry point below, which imports nothing from lmms-eval's models.
"""

from __future__ import annotations

MODEL_CLASS = "atp.evaluation.lmms.AtpLMM"
CHAT_MODEL_CLASS = "atp.evaluation.lmms.AtpChatLMM"


def lmms_eval_models():
    """The ``lmms_eval.models`` entry point: ``atp`` (lmms-eval's simple requests: generation and
    log-likelihood) and ``atp_chat`` (its chat requests: the task's messages, generation only).
    Two names rather than one with both classes, so that ``--model atp`` runs every task type
    without ``--force_simple``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [
        ModelManifest(model_id="atp", simple_class_path=MODEL_CLASS),
        ModelManifest(model_id="atp_chat", chat_class_path=CHAT_MODEL_CLASS),
    ]
