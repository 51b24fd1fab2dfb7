"""Run by tests/test_distributed.py under ``torch.distributed.run`` with DeepSpeed ZeRO-3 on two
CPU processes (DeepSpeed's CPU accelerator, gloo).

``atp train --deepspeed configs/deepspeed/zero3.json`` on the tiny model (``atp.cli.train.run``;
``--model FOLDER`` among the extra arguments loads a checkpoint instead, which ZeRO-3 partitions as
it loads). Each rank reports whether the base model's weights were partitioned at loading.
Each rank then gathers the partitioned weights and writes its full ATP weights (and a few LM
weights) to ``OUTPUT/final-rank{N}.safetensors``; it also calls ``handle.save_pretrained`` on the
partitioned model (into ``OUTPUT/direct``) and loads that back, to check saving and loading
outside the Trainer.
"""

import os
import sys
import warnings

import deepspeed
import torch
from safetensors.torch import save_file
from teardown import leave

import atp.cli.train
from atp.cli.app import build_parser
from atp.cli.train import finish_distributed, run
from atp.training.data import LlavaCollator

warnings.simplefilter("ignore")
if "ATP_TEST_TORCH" in os.environ:  # run as if this torch were installed (the lock check's test)
    import atp.training.trainer

    atp.training.trainer._torch_version = lambda: tuple(map(int, os.environ["ATP_TEST_TORCH"].split(".")))
output, data, images, config, *extra = sys.argv[1:]
modalities = []  # per micro-batch of this rank: did it hold an image?
collate = LlavaCollator.__call__


def counting(self, records):
    batch = collate(self, records)
    modalities.append("pixel_values" in batch)
    return batch


LlavaCollator.__call__ = counting
loaded_partitioned = []  # were the base model's weights partitioned as they loaded (zero.Init)?
load_model = atp.cli.train.load_model


def loading(*args, **kwargs):
    model, *rest = load_model(*args, **kwargs)
    loaded_partitioned.append(all(hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters()))
    return (model, *rest)


atp.cli.train.load_model = loading
args = build_parser().parse_args(
    ["train", "--model", "tiny", "--data", data, "--image-folder", images, "--output-dir", output]
    + ["--batch-size", "1", "--workers", "0", "--logging-steps", "1", "--lambda-target", "1.0"]
    + ["--target-tokens", "6", "--learning-rate", "0.01", "--atp-learning-rate", "0.05", "--warmup", "0"]
    + ["--deepspeed", config]
    + extra
)
trainer = run(args)
handle, rank = trainer.atp_handle, trainer.args.process_index
partitioned = all(hasattr(p, "ds_id") and p.numel() == 0 for p in handle.policy.parameters())
last = handle.runtime.adapter.decoder_layers()[-1]
lm = {name: last.get_parameter(name) for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight")}
with deepspeed.zero.GatheredParameters([*handle.policy.parameters(), *lm.values()]):
    state = {f"atp.{k}": v.detach().clone() for k, v in handle.policy.state_dict().items()}
    state.update({f"lm.{k}": v.detach().clone() for k, v in lm.items()})
save_file({k: v.contiguous() for k, v in state.items()}, f"{output}/final-rank{rank}.safetensors")

handle.save_pretrained(f"{output}/direct")  # a collective on the partitioned heads
torch.distributed.barrier()
with deepspeed.zero.GatheredParameters(list(handle.policy.parameters()), modifier_rank=0):
    for p in handle.policy.parameters():
        p.data.zero_()
from atp.host.checkpoint import load_weights  # noqa: E402

load_weights(handle.policy, f"{output}/direct")  # back into the partitioned heads
with deepspeed.zero.GatheredParameters(list(handle.policy.parameters())):
    reloaded = all(torch.equal(v, state[f"atp.{k}"]) for k, v in handle.policy.state_dict().items())
print(
    f"rank {rank} of {trainer.args.world_size} done, step {trainer.state.global_step}, "
    f"deepspeed {trainer.is_deepspeed_enabled}, loaded partitioned {loaded_partitioned[0]}, "
    f"partitioned {partitioned}, reloaded {reloaded}, "
    f"images {''.join('I' if m else 'T' for m in modalities)}",
    flush=True,
)
finish_distributed()
leave()
