"""LLaVA-format conversations (the llava_v1_5_mix665k format) for training ATP.

A record is ``{"id": ..., "image": "coco/train2017/x.jpg" or a list of paths (optional),
"conversations": [{"from": "human", "value": "<image>\\nQuestion"}, {"from": "gpt", "value":
"Answer"}, ...]}``. Each ``<image>`` takes the next image of the record. Prompts follow the
LLaVA-1.5 (vicuna v1) template; only the assistant answers (and their end-of-sequence token) are
labelled, everything the user said is masked with -100.

The file is indexed in one streaming pass (byte offset and length of each record, its image
count and an approximate length); a record is read back from disk when it is asked for, and its
images only in the collator.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from array import array
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
IMAGE_PLACEHOLDER = "<image>"
IGNORE = -100
HUMAN, ASSISTANT = ("human", "user"), ("gpt", "assistant")
MISSING_IMAGES = ("error", "skip")
_SPACE = re.compile(r"[ \t\n\r]*")
_UTF8_BOM = codecs.BOM_UTF8


def record_images(record: dict) -> list[str]:
    """The record's image paths in order: ``"image"`` is absent, a path or a list of paths."""
    images = record.get("image")
    if images is None or images == "" or images == []:
        return []
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise ValueError(f"has 'image' {record.get('image')!r}; give a path or a list of paths")
    return images


def check_record(record) -> tuple[list[str], int]:
    """The image paths and approximate length (characters of all turns) of a valid record.

    Raises ``ValueError`` with the problem (``"has <image> but no 'image'"``) otherwise: a dict
    with a ``conversations`` list of ``{"from", "value"}`` turns, speakers human/gpt, at least
    one answer, and either no ``<image>`` (one is put per image at the start of the first turn,
    which must then be the human's) or one per image, in human turns only.
    """
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list) or not turns:
        raise ValueError("has no valid 'conversations' list")
    for position, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or not isinstance(turn.get("value"), str):
            raise ValueError(
                "has no valid 'conversations' list: turn "
                f'{position} is not {{"from": "human" or "gpt", "value": text}}'
            )
        if turn["from"] not in HUMAN + ASSISTANT:
            raise ValueError(f"has an unknown speaker {turn['from']!r} (use 'human' / 'gpt')")
    images = record_images(record)
    if any(IMAGE_PLACEHOLDER in t["value"] for t in turns if t["from"] in ASSISTANT):
        raise ValueError(f"has {IMAGE_PLACEHOLDER} in an assistant turn; put it in a human turn")
    placeholders = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns)
    if placeholders and not images:
        raise ValueError(f"has {IMAGE_PLACEHOLDER} but no 'image'")
    if placeholders and placeholders != len(images):
        raise ValueError(
            f"has {placeholders} {IMAGE_PLACEHOLDER} placeholders but {len(images)} images; "
            "give one per image, or none to put them all at the start of the first turn"
        )
    if images and not placeholders and turns[0]["from"] not in HUMAN:
        raise ValueError("has an image but no human turn to place it in (the first turn is the assistant's)")
    if not any(turn["from"] in ASSISTANT for turn in turns):
        raise ValueError("has no assistant ('gpt') turn: nothing to learn from")
    return images, sum(len(t["value"]) for t in turns)


def _describe(record, index: int | None = None, problem: str = "") -> str:
    """``record 'id' problem``, or ``record 3 problem (id 'x')`` when the index is known."""
    name = record.get("id") if isinstance(record, dict) else None
    if index is None:
        return f"record {name!r} {problem}".rstrip()
    return f"record {index} {problem}".rstrip() + (f" (id {name!r})" if name is not None else "")


def iter_json_list(path: str | os.PathLike, chunk_size: int = 1 << 22) -> Iterator[tuple[int, int, object]]:
    """``(byte offset, byte length, value)`` of each element of a JSON list file.

    One streaming pass in chunks of ``chunk_size`` bytes, ``json.JSONDecoder.raw_decode`` element
    by element; memory is one chunk plus one element, whatever the file size.
    """
    with open(path, "rb") as file:
        reader = _Reader(file, chunk_size)
        if reader.skip_space() != "[":
            raise ValueError(f"{path}: expected a JSON list of conversations (the file must start with '[')")
        reader.advance(1)
        if reader.skip_space() == "]":
            reader.advance(1)
        else:
            while True:
                yield reader.value(path)
                separator = reader.skip_space()
                reader.advance(1)
                if separator == "]":
                    break
                if separator != ",":
                    raise ValueError(
                        f"{path}: expected ',' or ']' at byte {reader.offset - 1}, not valid JSON"
                    )
                reader.skip_space()
        if reader.skip_space():
            raise ValueError(f"{path}: unexpected data after the list at byte {reader.offset}")


class _Reader:
    """A window of decoded text over a binary file, with the byte offset of its position."""

    def __init__(self, file, chunk_size: int):
        self.file, self.chunk_size = file, chunk_size
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.decoder = json.JSONDecoder()
        self.text, self.pos, self.eof = "", 0, False
        self.offset = len(_UTF8_BOM) if file.read(len(_UTF8_BOM)) == _UTF8_BOM else 0
        file.seek(self.offset)

    def fill(self) -> bool:
        """Append the next chunk (dropping what was read); False at the end of the file."""
        if self.eof:
            return False
        chunk = self.file.read(self.chunk_size)
        self.eof = not chunk
        try:
            text = self.utf8.decode(chunk, final=self.eof)
        except UnicodeDecodeError:
            raise ValueError(
                f"{self.file.name}: not UTF-8 text after byte {self.offset}; save the conversations as UTF-8 JSON"
            ) from None
        self.text = self.text[self.pos :] + text
        self.pos = 0
        return True

    def advance(self, chars: int) -> None:  # over ASCII syntax: one byte per character
        self.pos += chars
        self.offset += chars

    def skip_space(self) -> str:
        """Skip whitespace; the next character, '' at the end of the file."""
        while True:
            self.advance(_SPACE.match(self.text, self.pos).end() - self.pos)
            if self.pos < len(self.text) or not self.fill():
                return self.text[self.pos : self.pos + 1]

    def value(self, path) -> tuple[int, int, object]:
        while True:
            try:
                value, end = self.decoder.raw_decode(self.text, self.pos)
                if end < len(self.text) or self.eof:  # complete: not cut at the window's end
                    break
            except json.JSONDecodeError as error:
                if self.eof:
                    raise ValueError(f"{path}: not valid JSON near byte {self.offset}: {error.msg}") from None
            self.fill()
        ascii_only = self.text.isascii()  # O(1): then a character is a byte
        size = end - self.pos if ascii_only else len(self.text[self.pos : end].encode("utf-8"))
        start, self.offset, self.pos = self.offset, self.offset + size, end
        return start, size, value


class ConversationDataset(torch.utils.data.Dataset):
    """The records of a LLaVA-format JSON file (a list of conversations), indexed, read lazily.

    Every record is validated while indexing (:func:`check_record`), so a bad record fails here,
    naming its index and id, not mid-epoch. The index keeps per record its byte ``offsets`` and
    ``sizes``, ``image_counts`` and approximate ``lengths`` (characters of all turns); ``dataset[i]``
    reads and parses record ``i`` (the file is opened once per process: DataLoader workers work).

    Parameters
    ----------
    path : the JSON file (a list of records).
    image_folder : when given, every image path is checked to exist under it.
    missing_images : ``"error"`` raises ``FileNotFoundError`` naming a few missing paths;
        ``"skip"`` drops the records with a missing image (``skipped`` counts them,
        ``missing`` lists ``(index, id, path)`` examples).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        image_folder: str | os.PathLike | None = None,
        missing_images: str = "error",
    ):
        if missing_images not in MISSING_IMAGES:
            raise ValueError(
                f"missing_images must be one of {', '.join(MISSING_IMAGES)}, got {missing_images!r}"
            )
        self.path = Path(path)
        offsets, sizes, counts, lengths = array("q"), array("q"), array("i"), array("i")
        self.missing, self.skipped, self.missing_paths = [], 0, 0
        self.indexed, self.multi_turn = 0, 0
        for index, (offset, size, record) in enumerate(iter_json_list(path)):
            try:
                images, length = check_record(record)
            except ValueError as error:
                raise ValueError(f"{path}: {_describe(record, index, str(error))}") from None
            self.indexed += 1
            gone = [
                p
                for p in images
                if image_folder is not None and not os.path.isfile(os.path.join(image_folder, p))
            ]
            if gone:
                self.missing_paths += len(gone)
                self.skipped += 1
                if len(self.missing) < 5:
                    self.missing.append((index, record.get("id"), gone[0]))
                continue
            self.multi_turn += sum(t["from"] in HUMAN for t in record["conversations"]) > 1
            offsets.append(offset)
            sizes.append(size)
            counts.append(len(images))
            lengths.append(length)
        if self.missing and missing_images == "error":
            examples = [path for _, _, path in self.missing[:3]]
            raise FileNotFoundError(
                f"{self.missing_paths} images not found under {image_folder} ({self.skipped} records), "
                f"e.g. {examples}; fix --image-folder, or pass --missing-images skip to drop those records"
            )
        self.offsets, self.sizes = np.asarray(offsets), np.asarray(sizes)
        self.image_counts, self.lengths = np.asarray(counts), np.asarray(lengths)
        self._file, self._pid = None, None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> dict:
        if self._file is None or self._pid != os.getpid():  # a forked worker opens its own
            self._file, self._pid = open(self.path, "rb"), os.getpid()  # noqa: SIM115
        self._file.seek(int(self.offsets[index]))
        return json.loads(self._file.read(int(self.sizes[index])))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None, "_pid": None}  # no open handle is pickled

    def summary(self) -> dict:
        """Counts for a run's plan: records, image / text-only / multi-image / multi-turn, lengths."""
        chars = self.lengths if len(self) else np.zeros(1, dtype=np.int32)
        return {
            "records_indexed": self.indexed,
            "records": len(self),
            "with_images": int((self.image_counts > 0).sum()),
            "text_only": int((self.image_counts == 0).sum()),
            "multi_image": int((self.image_counts > 1).sum()),
            "images": int(self.image_counts.sum()),
            "multi_turn": self.multi_turn,
            "skipped_missing_images": self.skipped,
            "missing_examples": [{"index": i, "id": n, "image": p} for i, n, p in self.missing],
            "characters": {
                "min": int(chars.min()),
                "mean": round(float(chars.mean()), 1),
                "max": int(chars.max()),
            },
        }


class ModalityLengthGroupedSampler(torch.utils.data.Sampler[int]):
    """LLaVA's ``group_by_modality_length``: text-only and image batches kept apart.

    Each modality (``image_counts > 0`` or not) is shuffled and cut into megabatches of
    ``batch_size * world_size`` indices, each sorted by decreasing length; the megabatches are
    shuffled together and the two incomplete ones (one per modality) come last. The order
    depends only on ``seed`` and the epoch (:meth:`set_epoch`), so every process draws the same.

    Parameters
    ----------
    image_counts, lengths : per record (N,), e.g. ``dataset.image_counts``, ``dataset.lengths``.
    batch_size : per process.
    world_size : processes (times gradient accumulation steps, for one optimizer step per megabatch).
    seed : the generator's seed; epoch ``e`` uses ``seed + e``.
    complete : fill each modality's last megabatch with repeated records of that modality, so
        that every step is one modality on every process (DeepSpeed ZeRO-3 needs it: a rank with
        images and one without would wait in different collectives). At most ``megabatch - 1``
        records per modality are seen twice in an epoch.
    """

    def __init__(
        self,
        image_counts,
        lengths,
        batch_size: int,
        world_size: int = 1,
        seed: int = 0,
        complete: bool = False,
    ):
        self.image_counts, self.lengths = np.asarray(image_counts), np.asarray(lengths)
        if self.image_counts.shape != self.lengths.shape or self.image_counts.ndim != 1:
            raise ValueError(
                f"image_counts {self.image_counts.shape} and lengths {self.lengths.shape} must be (N,) each"
            )
        for name, value in (("batch_size", batch_size), ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.megabatch = batch_size * world_size
        self.seed, self.epoch, self.complete = int(seed), 0, bool(complete)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if not self.complete:
            return len(self.lengths)
        sizes = (int((self.image_counts > 0).sum()), int((self.image_counts == 0).sum()))
        return sum(-(-size // self.megabatch) * self.megabatch for size in sizes)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        full, tails = [], []
        for indices in (np.flatnonzero(self.image_counts > 0), np.flatnonzero(self.image_counts == 0)):
            shuffled = indices[torch.randperm(len(indices), generator=generator).numpy()]
            if self.complete and len(shuffled) % self.megabatch:  # repeat records of this modality
                shuffled = np.resize(shuffled, -(-len(shuffled) // self.megabatch) * self.megabatch)
            for start in range(0, len(shuffled), self.megabatch):
                chunk = shuffled[start : start + self.megabatch]
                chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
                (full if len(chunk) == self.megabatch else tails).append(chunk)
        order = torch.randperm(len(full), generator=generator).tolist()
        return iter(np.concatenate([full[k] for k in order] + tails or [np.zeros(0, int)]).tolist())


def encode_conversation(
    record: dict,
    tokenize: Callable[[str], list[int]],
    bos_id: int,
    eos_id: int,
    image_token_id: int,
    image_seq_length: int,
) -> tuple[list[int], list[int]]:
    """Token ids and labels of one conversation (LLaVA-1.5 template, user turns masked).

    ``SYSTEM USER: <question> ASSISTANT: <answer></s>USER: ...``; each ``<image>`` in a user turn
    becomes ``image_seq_length`` image tokens (one ``<image>\\n`` per image is prepended to the
    first turn when the record has images but no placeholder).
    """
    try:
        images, _ = check_record(record)
    except ValueError as error:
        raise ValueError(_describe(record, problem=str(error))) from None
    placed = any(IMAGE_PLACEHOLDER in turn["value"] for turn in record["conversations"])
    ids, labels = [bos_id], [IGNORE]
    for position, turn in enumerate(record["conversations"]):
        text = turn["value"]
        if turn["from"] in ASSISTANT:
            tokens = tokenize(" " + text) + [eos_id]
            ids += tokens
            labels += tokens
            continue
        if position == 0 and images and not placed:
            text = (IMAGE_PLACEHOLDER + "\n") * len(images) + text
        prefix = SYSTEM + " USER: " if position == 0 else "USER: "
        for index, piece in enumerate((prefix + text + " ASSISTANT:").split(IMAGE_PLACEHOLDER)):
            if index:
                ids += [image_token_id] * image_seq_length
                labels += [IGNORE] * image_seq_length
            tokens = tokenize(piece)
            ids += tokens
            labels += [IGNORE] * len(tokens)
    return ids, labels


class LlavaCollator:
    """Turns records into a right-padded training batch for a LLaVA model.

    ``pixel_values`` (images, 3, H, W) holds every image of the batch in record order, which is
    the order of the image tokens in ``input_ids``.

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

    def _image(self, relative: str, record: dict):
        from PIL import Image

        path = self.image_folder / relative
        if not path.is_file():
            raise FileNotFoundError(
                f"{_describe(record)}: image {relative!r} not found under {self.image_folder}"
            )
        try:
            image = Image.open(path).convert("RGB")
        except OSError as error:  # truncated or not an image
            raise ValueError(
                f"{_describe(record)}: cannot read image {str(path)!r} ({error}); replace the file or drop the record"
            ) from error
        if self.pad_to_square and image.width != image.height:
            side = max(image.size)
            mean = tuple(int(255 * m) for m in getattr(self.image_processor, "image_mean", (0.5, 0.5, 0.5)))
            square = Image.new("RGB", (side, side), mean)
            square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
            image = square
        return image

    def encode(self, record: dict) -> tuple[list[int], list[int]]:
        """Token ids and labels of one record, cut to ``max_length`` (never inside image tokens)."""
        tokenizer = self.tokenizer
        ids, labels = encode_conversation(
            record,
            self._tokenize,
            tokenizer.bos_token_id,
            tokenizer.eos_token_id,
            self.image_token_id,
            self.image_seq_length,
        )
        if len(ids) > self.max_length:
            image_end = max((i for i, t in enumerate(ids) if t == self.image_token_id), default=-1) + 1
            if image_end > self.max_length:
                raise ValueError(
                    f"{_describe(record)}: max_length={self.max_length} would cut the image tokens"
                )
            ids, labels = ids[: self.max_length], labels[: self.max_length]
            if all(label == IGNORE for label in labels):
                raise ValueError(
                    f"{_describe(record)}: max_length={self.max_length} cuts every answer token; "
                    "raise --max-length or drop the record"
                )
        return ids, labels

    def __call__(self, records: Sequence[dict]) -> dict[str, torch.Tensor]:
        encoded = [self.encode(record) for record in records]
        images = [self._image(path, record) for record in records for path in record_images(record)]
        width = max(len(ids) for ids, _ in encoded)
        batch = {
            "input_ids": torch.full((len(encoded), width), self.pad_id, dtype=torch.long),  # (B, L)
            "attention_mask": torch.zeros((len(encoded), width), dtype=torch.long),
            "labels": torch.full((len(encoded), width), IGNORE, dtype=torch.long),
        }
        for row, (ids, labels) in enumerate(encoded):
            batch["input_ids"][row, : len(ids)] = torch.tensor(ids)
            batch["attention_mask"][row, : len(ids)] = 1
            batch["labels"][row, : len(ids)] = torch.tensor(labels)
        if images:  # (images, 3, H, W) in record order
            batch["pixel_values"] = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return batch
