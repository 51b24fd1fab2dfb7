"""A procedurally generated visual question answering set: shapes on a background.

Every example is made on the fly from ``(seed, split, index)``: nothing is downloaded or stored.
An image is a ``size x size`` canvas of one background colour with 0-4 shapes (square, circle,
triangle), each of a colour and a size (small shapes cover about one or two patches). Questions
come in two granularities:

* **coarse** (``background``: "what colour is the background ?"; ``any``: "are there any
  shapes ?"): answered from any part of the image;
* **fine** (``exists``: "is there a red shape ?"; ``count``: "how many red shapes ?";
  ``colour``: "what colour is the small shape ?"): answered from small regions, so which visual
  tokens are kept matters. ``left`` ("is the red shape left of the blue shape ?") is generated
  too but not in the study's mix (:data:`HARDER`).

Answers are one word of a small vocabulary. Token ids are word indices in :data:`VOCAB`; the
image is ``image_tokens`` copies of :data:`IMAGE` (the model's image placeholder).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 70, 220), "yellow": (230, 210, 40)}
BACKGROUNDS = {"black": (20, 20, 20), "gray": (128, 128, 128), "white": (235, 235, 235)}
KINDS = ("square", "circle", "triangle")
SIZES = {"small": 0.1, "large": 0.2}  # side as a fraction of the canvas
COARSE = ("background", "any")
FINE = ("exists", "count", "colour")
TYPES = COARSE + FINE  # the study's mix
HARDER = ("left",)  # generated, but not learned by the CPU study's model in its budget (docs/study.md)
SPECIALS = ("<pad>", "<s>", "</s>", "<image>")
WORDS = (
    [
        "what",
        "colour",
        "is",
        "the",
        "background",
        "are",
        "there",
        "any",
        "shapes",
        "how",
        "many",
        "is",
        "left",
        "of",
        "shape",
        "small",
        "large",
        "?",
        "q",
        ":",
        "a",
        ":",
    ]
    + [f"{k}s" for k in KINDS]
    + list(KINDS)
    + list(COLOURS)
    + list(BACKGROUNDS)
)
ANSWERS = ("yes", "no", "0", "1", "2", "3", *COLOURS, *BACKGROUNDS)
VOCAB = tuple(dict.fromkeys([*SPECIALS, *WORDS, *ANSWERS]))
IDS = {word: index for index, word in enumerate(VOCAB)}
PAD, BOS, EOS, IMAGE = (IDS[s] for s in SPECIALS)
LAYOUTS = ("image_first", "question_first")  # where the question sits (:func:`encode`)


@dataclass
class Shape:
    kind: str
    colour: str
    size: str
    x: int  # centre, pixels
    y: int


@dataclass
class Example:
    image: np.ndarray  # (size, size, 3) uint8
    question: list[str]
    answer: str
    kind: str  # the question type
    shapes: list[Shape]
    background: str
    layout: str = "image_first"  # where the question sits in the prompt (:data:`LAYOUTS`)


def _place(rng, shapes: list[Shape], side: int, size: int) -> tuple[int, int] | None:
    for _ in range(50):
        x, y = (int(v) for v in rng.integers(side // 2 + 1, size - side // 2 - 1, size=2))
        if all(
            abs(x - s.x) > side and abs(y - s.y) > side or abs(x - s.x) > side + 2 or abs(y - s.y) > side + 2
            for s in shapes
        ):
            return x, y
    return None


def scene(rng, size: int) -> tuple[str, list[Shape]]:
    background = str(rng.choice(list(BACKGROUNDS)))
    shapes: list[Shape] = []
    for _ in range(int(rng.integers(1, 6))):
        kind, colour = str(rng.choice(KINDS)), str(rng.choice(list(COLOURS)))
        grain = str(rng.choice(list(SIZES)))
        spot = _place(rng, shapes, max(3, round(SIZES[grain] * size)), size)
        if spot is not None:
            shapes.append(Shape(kind, colour, grain, *spot))
    return background, shapes


def render(background: str, shapes: list[Shape], size: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        half = max(3, round(SIZES[shape.size] * size)) // 2
        box = (shape.x - half, shape.y - half, shape.x + half, shape.y + half)
        fill = COLOURS[shape.colour]
        if shape.kind == "square":
            draw.rectangle(box, fill=fill)
        elif shape.kind == "circle":
            draw.ellipse(box, fill=fill)
        else:
            draw.polygon([(shape.x, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
    return np.array(image)  # writable: torch.from_numpy takes it


def question(rng, kind: str, background: str, shapes: list[Shape]) -> tuple[list[str], str] | None:
    """The question of type ``kind`` about the scene and its answer, or None when the scene
    cannot ask it (e.g. no unique circle and triangle for ``left``)."""
    if kind == "background":
        return ["what", "colour", "is", "the", "background", "?"], background
    if kind == "any":
        return ["are", "there", "any", "shapes", "?"], "yes" if shapes else "no"
    if kind == "exists":
        colour = str(rng.choice(list(COLOURS)))
        return f"is there a {colour} shape ?".split(), "yes" if any(
            s.colour == colour for s in shapes
        ) else "no"
    if kind == "count":
        colour = str(rng.choice(list(COLOURS)))
        if shapes and rng.random() < 0.75:  # mostly about a colour that is there: counts 1-3 are common
            colour = shapes[int(rng.integers(len(shapes)))].colour
        count = sum(s.colour == colour for s in shapes)
        return f"how many {colour} shapes ?".split(), str(min(count, 3))
    if kind == "left":
        pairs = [(a, b) for a in COLOURS for b in COLOURS if a != b]
        for index in rng.permutation(len(pairs)):
            a, b = pairs[index]
            first = [s for s in shapes if s.colour == a]
            second = [s for s in shapes if s.colour == b]
            if len(first) == 1 and len(second) == 1 and first[0].x != second[0].x:
                return f"is the {a} shape left of the {b} shape ?".split(), "yes" if first[0].x < second[
                    0
                ].x else "no"
        return None
    if kind == "colour":
        for grain in rng.permutation(list(SIZES)):
            same = [s for s in shapes if s.size == grain]
            if len(same) == 1:
                return f"what colour is the {grain} shape ?".split(), same[0].colour
        return None
    raise ValueError(f"unknown question type {kind!r}; choose from {', '.join(TYPES + HARDER)}")


def example(
    seed: int, split: str, index: int, size: int = 64, kind: str | None = None, layout: str = "image_first"
) -> Example:
    """The ``index``-th example of a split (``kind`` fixes the question type; default: types in
    turn; ``layout``: see :func:`encode`). Deterministic in ``(seed, split, index, kind)``."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    salt = {"train": 0, "val": 1, "test": 2}[split]
    kind = kind or TYPES[index % len(TYPES)]
    rng = np.random.default_rng([seed, salt, index, (TYPES + HARDER).index(kind)])
    while True:
        background, shapes = scene(rng, size)
        if kind == "any" and rng.random() < 0.5:  # as many empty canvases as not
            shapes = []
        asked = question(rng, kind, background, shapes)
        if asked is not None:
            image = render(background, shapes, size)
            return Example(image, asked[0], asked[1], kind, shapes, background, layout)


def encode(example: Example, image_tokens: int, answer: bool = True) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)``: ``<s> <image>*n q : QUESTION a : ANSWER </s>`` (``image_first``)
    or ``<s> q : QUESTION <image>*n a : ANSWER </s>`` (``question_first``), labels only on the
    answer and ``</s>`` (-100 elsewhere); without ``answer``, the prompt up to ``a :``.

    With the question first, decoder layer 0 cannot read the image for the question at the
    answer position: the text after the image (``a :``) is the same for every question, so its
    attention over the visual tokens cannot depend on the question, and the question's own
    tokens come before the image (causal attention). What a question needs from the image is
    read by later layers from the visual tokens, which is what pruning after layer 0 removes."""
    question = [IDS["q"], IDS[":"]] + [IDS[w] for w in example.question]
    visual = [IMAGE] * image_tokens
    if example.layout == "question_first":
        prompt = [BOS] + question + visual + [IDS["a"], IDS[":"]]
    else:
        prompt = [BOS] + visual + question + [IDS["a"], IDS[":"]]
    if not answer:
        return prompt, [-100] * len(prompt)
    ids = prompt + [IDS[example.answer], EOS]
    return ids, [-100] * len(prompt) + [IDS[example.answer], EOS]


def pixels(image: np.ndarray) -> torch.Tensor:
    """(3, H, W) float in [-1, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1.0


class ShapesDataset(torch.utils.data.Dataset):
    """``length`` examples of a split, made on demand (a record per example, for a collator)."""

    def __init__(
        self,
        seed: int,
        split: str,
        length: int,
        size: int = 64,
        kind: str | None = None,
        layout: str = "image_first",
    ):
        self.seed, self.split, self.length, self.size, self.kind = seed, split, length, size, kind
        self.layout = layout

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Example:
        return example(self.seed, self.split, index, self.size, self.kind, self.layout)


class ShapesCollator:
    """Examples -> a right-padded training batch (``input_ids``, ``attention_mask``, ``labels``,
    ``pixel_values``) for a LLaVA model with ``image_tokens`` tokens per image."""

    def __init__(self, image_tokens: int):
        self.image_tokens = image_tokens

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        encoded = [encode(e, self.image_tokens) for e in examples]
        width = max(len(ids) for ids, _ in encoded)
        batch = {
            "input_ids": torch.full((len(encoded), width), PAD, dtype=torch.long),
            "attention_mask": torch.zeros((len(encoded), width), dtype=torch.long),
            "labels": torch.full((len(encoded), width), -100, dtype=torch.long),
        }
        for row, (ids, labels) in enumerate(encoded):
            batch["input_ids"][row, : len(ids)] = torch.tensor(ids)
            batch["attention_mask"][row, : len(ids)] = 1
            batch["labels"][row, : len(ids)] = torch.tensor(labels)
        batch["pixel_values"] = torch.stack([pixels(e.image) for e in examples])
        return batch
