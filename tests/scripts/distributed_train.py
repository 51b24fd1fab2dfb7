"""Run by tests/test_distributed.py under ``accelerate launch --cpu --num_processes 2``.

Trains the tiny model with ``atp train``'s code path, then each rank writes its ATP weights
to ``OUTPUT/rank{N}.safetensors`` so the test can check that the ranks agree.
"""

import sys
import warnings

from safetensors.torch import save_file
from teardown import leave

from atp.cli.app import build_parser
from atp.cli.train import run

warnings.simplefilter("ignore")
output, data, images = sys.argv[1:4]
args = build_parser().parse_args(
    [
        "train",
        "--model",
        "tiny",
        "--data",
        data,
        "--image-folder",
        images,
        "--output-dir",
        output,
        "--max-steps",
        "6",
        "--batch-size",
        "1",
        "--freeze-lm",
        "--atp-learning-rate",
        "0.05",
        "--workers",
        "0",
        "--save-steps",
        "100",
        "--logging-steps",
        "1",
        "--lambda-target",
        "1.0",
        "--target-tokens",
        "6",
    ]
)
text_only_batches = []
original_collator = __import__("atp.training.data", fromlist=["LlavaCollator"]).LlavaCollator.__call__


def counting(self, records):
    batch = original_collator(self, records)
    text_only_batches.append("pixel_values" not in batch)
    return batch


__import__("atp.training.data", fromlist=["LlavaCollator"]).LlavaCollator.__call__ = counting
trainer = run(args)
rank = trainer.args.process_index
state = {k: v.detach().contiguous() for k, v in trainer.atp_handle.policy.state_dict().items()}
save_file(state, f"{output}/rank{rank}.safetensors")
print(
    f"rank {rank} of {trainer.args.world_size} done, step {trainer.state.global_step}, "
    f"text-only batches {sum(text_only_batches)}"
)
__import__("atp.cli.train", fromlist=["finish_distributed"]).finish_distributed()
leave()
