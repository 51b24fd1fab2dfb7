"""LLaVA-format conversations (the llava_v1_5_mix665k format) for training ATP.

A record is ``{"id": ..., "image": "coco/train2017/x.jpg" (optional), "conversations":
[{"from": "human", "value": "<image>\\nQuestion"}, {"from": "gpt", "value": "Answer"}, ...]}``.
Prompts follow the LLaVA-1.5 (vicuna v1) template; only the assistant answers (and their
end-of-sequence token) are labelled, everything the user said is masked with -100.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
IMAGE_PLACEHOLDER = "<image>"
IGNORE = -100


class ConversationDataset(torch.utils.data.Dataset):
    """The records of a LLaVA-format JSON file (a list of conversations)."""

    def __init__(self, path: str | os.PathLike):
        records = json.loads(Path(path).read_text())
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of conversations, got {type(records).__name__}")
        for index, record in enumerate(records):
            turns = record.get("conversations") if isinstance(record, dict) else None
            if not turns or not all(isinstance(t, dict) and {"from", "value"} <= set(t) for t in turns):
                raise ValueError(f"{path}: record {index} has no valid 'conversations' list")
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return self.records[index]


def encode_conversation(
    record: dict,
    tokenize: Callable[[str], list[int]],
    bos_id: int,
    eos_id: int,
    image_token_id: int,
    image_seq_length: int,
) -> tuple[list[int], list[int]]:
    """Token ids and labels of one conversation (LLaVA-1.5 template, user turns masked).

    ``SYSTEM USER: <question> ASSISTANT: <answer></s>USER: ...``; ``<image>`` in a user turn
    becomes ``image_seq_length`` image tokens (prepended to the first turn when the record
    has an image but no placeholder).
    """
    turns = record["conversations"]
    has_image = bool(record.get("image"))
    ids, labels = [bos_id], [IGNORE]
    placed = False
    for position, turn in enumerate(turns):
        role, text = turn["from"], str(turn["value"])
        if role in ("human", "user"):
            if has_image and not placed and IMAGE_PLACEHOLDER not in text and position == 0:
                text = IMAGE_PLACEHOLDER + "\n" + text
            prefix = SYSTEM + " USER: " if position == 0 else "USER: "
            pieces = (prefix + text + " ASSISTANT:").split(IMAGE_PLACEHOLDER)
            if len(pieces) > 1 and not has_image:
                raise ValueError(f"record {record.get('id')!r} has {IMAGE_PLACEHOLDER} but no 'image'")
            if len(pieces) > 2 or (len(pieces) == 2 and placed):
                raise ValueError(f"record {record.get('id')!r} has more than one {IMAGE_PLACEHOLDER}")
            for index, piece in enumerate(pieces):
                if index:
                    ids += [image_token_id] * image_seq_length
                    labels += [IGNORE] * image_seq_length
                    placed = True
                tokens = tokenize(piece)
                ids += tokens
                labels += [IGNORE] * len(tokens)
        elif role in ("gpt", "assistant"):
            tokens = tokenize(" " + text) + [eos_id]
            ids += tokens
            labels += tokens
        else:
            raise ValueError(f"record {record.get('id')!r}: unknown speaker {role!r} (use 'human' / 'gpt')")
    if has_image and not placed:
        raise ValueError(f"record {record.get('id')!r} has an image but no human turn to place it in")
    return ids, labels


class LlavaCollator:
    """Turns records into a right-padded training batch for a LLaVA model.

    Parameters
    ----------
    tokenizer : a transformers tokenizer (``tokenizer(text, add_special_tokens=False)``).
    image_processor : ``image_processor(images=[PIL images], return_tensors="pt")["pixel_values"]``.
    image_token_id, image_seq_length : from the model config.
    image_folder : where the records' ``image`` paths are relative to.
    max_length : longer conversations are cut (never inside the image tokens).
    pad_to_square : LLaVA-1.5's ``image_aspect_ratio=pad`` (expand to a square with the mean colour).
    """

    def __init__(
        self,
        tokenizer,
        image_processor,
        image_token_id: int,
        image_seq_length: int,
        image_folder: str | os.PathLike = ".",
        max_length: int = 2048,
        pad_to_square: bool = True,
    ):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token_id = image_token_id
        self.image_seq_length = image_seq_length
        self.image_folder = Path(image_folder)
        self.max_length = max_length
        self.pad_to_square = pad_to_square
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def _tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _image(self, relative: str):
        from PIL import Image

        path = self.image_folder / relative
        if not path.is_file():
            raise FileNotFoundError(f"image {relative!r} not found under {self.image_folder}")
        image = Image.open(path).convert("RGB")
        if self.pad_to_square and image.width != image.height:
            side = max(image.size)
            mean = tuple(int(255 * m) for m in getattr(self.image_processor, "image_mean", (0.5, 0.5, 0.5)))
            square = Image.new("RGB", (side, side), mean)
            square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
            image = square
        return image

    def __call__(self, records: Sequence[dict]) -> dict[str, torch.Tensor]:
        encoded, images = [], []
        for record in records:
            ids, labels = encode_conversation(
                record,
                self._tokenize,
                self.tokenizer.bos_token_id,
                self.tokenizer.eos_token_id,
                self.image_token_id,
                self.image_seq_length,
            )
            if len(ids) > self.max_length:
                image_end = max((i for i, t in enumerate(ids) if t == self.image_token_id), default=-1) + 1
                if image_end > self.max_length:
                    raise ValueError(
                        f"record {record.get('id')!r}: max_length={self.max_length} would cut the image tokens"
                    )
                ids, labels = ids[: self.max_length], labels[: self.max_length]
                if all(label == IGNORE for label in labels):
                    raise ValueError(
                        f"record {record.get('id')!r}: max_length={self.max_length} cuts every answer token; "
                        "raise --max-length or drop the record"
                    )
            encoded.append((ids, labels))
            if record.get("image"):
                images.append(self._image(record["image"]))
        width = max(len(ids) for ids, _ in encoded)
        batch = {
            "input_ids": torch.full((len(encoded), width), self.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(encoded), width), dtype=torch.long),
            "labels": torch.full((len(encoded), width), IGNORE, dtype=torch.long),
        }
        for row, (ids, labels) in enumerate(encoded):
            batch["input_ids"][row, : len(ids)] = torch.tensor(ids)
            batch["attention_mask"][row, : len(ids)] = 1
            batch["labels"][row, : len(ids)] = torch.tensor(labels)
        if images:
            batch["pixel_values"] = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return batch
