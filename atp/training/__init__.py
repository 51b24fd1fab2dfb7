"""Training ATP modules: a Trainer subclass, LLaVA-format data, the checks and plan of a run
(recipes, dry run, diagnostics); the ``atp train`` command is :mod:`atp.cli.train`."""

from atp.training.data import ConversationDataset, LlavaCollator, encode_conversation
from atp.training.trainer import AtpTrainer

__all__ = ["AtpTrainer", "ConversationDataset", "LlavaCollator", "encode_conversation"]
