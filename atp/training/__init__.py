"""Training ATP modules: a Trainer subclass, LLaVA-format data, the ``atp train`` entry point."""

from atp.training.data import ConversationDataset, LlavaCollator, encode_conversation
from atp.training.trainer import AtpTrainer

__all__ = ["AtpTrainer", "ConversationDataset", "LlavaCollator", "encode_conversation"]
