"""Run by tests/test_distributed.py under ``accelerate launch`` with FSDP2 on two CPU processes.

``atp train``'s code path (``atp.cli.train.run``) on the tiny model; each rank then writes its
full ATP weights (and, when the base model trains, a few LM weights) to
``OUTPUT/final-rank{N}.safetensors`` so the test can compare ranks, runs and a single process.

accelerate turns FSDP on only for GPU-type process groups (``AcceleratorState`` upgrades
MULTI_GPU / MULTI_XPU / ... to FSDP, never MULTI_CPU). On CPU processes this script records the
group as MULTI_GPU right before the Trainer builds its Accelerator; from there on everything is
accelerate's and the Trainer's FSDP2 code: ``fully_shard`` per decoder layer and at the root,
the optimizer built after sharding, FULL_STATE_DICT saving, the FSDP resume path.
"""

import sys
import warnings

from accelerate import PartialState
from accelerate.utils import DistributedType
from safetensors.torch import save_file
from teardown import leave
from transformers import Trainer

from atp.cli.app import build_parser
from atp.cli.train import finish_distributed, run
from atp.training.data import LlavaCollator

warnings.simplefilter("ignore")
output, data, images, *extra = sys.argv[1:]
original = Trainer.create_accelerator_and_postprocess


def fsdp_on_cpu_processes(self):
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU  # see the docstring
    return original(self)


Trainer.create_accelerator_and_postprocess = fsdp_on_cpu_processes
modalities = []  # per micro-batch of this rank: did it hold an image?
collate = LlavaCollator.__call__
LlavaCollator.__call__ = lambda self, records: (
    batch := collate(self, records),
    modalities.append("pixel_values" in batch),
)[0]
args = build_parser().parse_args(
    ["train", "--model", "tiny", "--data", data, "--image-folder", images, "--output-dir", output]
    + ["--batch-size", "1", "--workers", "0", "--logging-steps", "1", "--lambda-target", "1.0"]
    + ["--target-tokens", "6", "--learning-rate", "0.01", "--atp-learning-rate", "0.05", "--warmup", "0"]
    + extra
)
trainer = run(args)
from torch.distributed.tensor import DTensor  # noqa: E402

handle, rank = trainer.atp_handle, trainer.args.process_index
sharded = all(isinstance(p, DTensor) for p in handle.policy.parameters())
state = {
    f"atp.{k}": v.full_tensor() if isinstance(v, DTensor) else v
    for k, v in handle.policy.state_dict().items()
}
language = handle.runtime.adapter.decoder_layers()
for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight"):
    weight = language[-1].get_parameter(name)
    state[f"lm.{name}"] = weight.full_tensor() if isinstance(weight, DTensor) else weight
save_file(
    {k: v.detach().cpu().contiguous() for k, v in state.items()}, f"{output}/final-rank{rank}.safetensors"
)
print(
    f"rank {rank} of {trainer.args.world_size} done, step {trainer.state.global_step}, "
    f"fsdp {trainer.is_fsdp_enabled}, sharded {sharded}, images {''.join('I' if m else 'T' for m in modalities)}",
    flush=True,
)
finish_distributed()
leave()
