"""Two tiny local lmms-eval tasks (a JSON file, PNG images, task YAMLs): no download.

``atp_tiny_gen`` (generate_until, exact match) and ``atp_tiny_mc`` (multiple_choice over
yes / no, accuracy) read :data:`RECORDS`; pass the folder to lmms-eval with ``--include_path``.
``atp_tiny_chat`` is ``atp_tiny_gen`` with its own ``doc_to_messages`` (a system turn, then the
question before its images), for lmms-eval's chat models.
"""

from __future__ import annotations

import json
from pathlib import Path

TASKS = ("atp_tiny_gen", "atp_tiny_mc")
CHAT_TASK = "atp_tiny_chat"
SYSTEM = "answer the question about the picture with one short word or a number , please ."
RECORDS = [
    {"question": "what colour is the image ?", "answer": "red", "label": 0, "images": ["red.png"]},
    {"question": "is there a cat in the picture ?", "answer": "no", "label": 1, "images": ["blue.png"]},
    {"question": "what is shown in the image ?", "answer": "a tree", "label": 0, "images": ["green.png"]},
    {"question": "is the sky blue ?", "answer": "yes", "label": 0, "images": ["red.png", "blue.png"]},
    {"question": "how many dogs ?", "answer": "two", "label": 1, "images": ["blue.png"]},
]
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}

UTILS = """from pathlib import Path

from PIL import Image

HERE = Path(__file__).parent


def doc_to_visual(doc):
    return [Image.open(HERE / name).convert("RGB") for name in doc["images"]]


def doc_to_text(doc):
    return doc["question"]


def doc_to_messages(doc):
    images = [{"type": "image", "url": image} for image in doc_to_visual(doc)]
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
        {"role": "user", "content": [{"type": "text", "text": doc["question"]}, *images]},
    ]
"""

COMMON = """dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
"""

GENERATE = """task: atp_tiny_gen
output_type: generate_until
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  until: ["\\n"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

CHAT = GENERATE.replace("task: atp_tiny_gen", "task: atp_tiny_chat") + (
    "doc_to_messages: !function utils.doc_to_messages\n"
)

CHOICE = """task: atp_tiny_mc
output_type: multiple_choice
doc_to_choice: ["yes", "no"]
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_tiny_tasks(folder) -> Path:
    """Write the tasks into ``folder`` (created if missing); returns it."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, colour in COLOURS.items():
        Image.new("RGB", (48, 40), colour).save(folder / f"{name}.png")
    data = folder / "records.json"
    data.write_text(json.dumps(RECORDS))
    (folder / "utils.py").write_text(UTILS.replace("SYSTEM", repr(SYSTEM)))
    (folder / "atp_tiny_gen.yaml").write_text(COMMON.format(data=data.resolve()) + GENERATE)
    (folder / "atp_tiny_mc.yaml").write_text(COMMON.format(data=data.resolve()) + CHOICE)
    (folder / "atp_tiny_chat.yaml").write_text(COMMON.format(data=data.resolve()) + CHAT)
    return folder
