"""Run by tests/test_distributed.py under ``torch.distributed.run --nproc_per_node 2`` (gloo, CPU).

The tiny LLaVA with atp attached is sharded with FSDP2 (``fully_shard`` per decoder layer and
at the root, so the ATP heads are DTensor shards), runs a training forward and backward, and
saves with ``handle.save_pretrained``; each rank also writes its gathered heads for comparison.
"""

import sys
import warnings

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from teardown import leave
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import atp
from atp.tiny.models import llava_batch, tiny_llava

warnings.simplefilter("ignore")
output = sys.argv[1]
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = tiny_llava(num_layers=4)
handle = atp.attach(model, layers=[1, 2, 3], prune_mode="mask", init_theta_r=0.3, init_theta_s=0.9)
for layer in model.model.language_model.layers:
    fully_shard(layer)
fully_shard(model)
assert all(isinstance(p, DTensor) for p in handle.policy.parameters()), "the heads were not sharded"
model.train()
batch = llava_batch(model, [([5, 6], [7, 8, 9], 1), ([5], [7, 8, 10, 11], 1)], seeds=[rank, rank + 10])
labels = batch["input_ids"].clone()
labels[(labels == model.config.image_token_id) | (batch["attention_mask"] == 0)] = -100
model(**batch, labels=labels).loss.backward()
handle.save_pretrained(output)
gathered = {k: v.full_tensor().detach().contiguous() for k, v in handle.policy.state_dict().items()}
save_file(gathered, f"{output}/rank{rank}.safetensors")
dist.barrier()
print(f"rank {rank} saved", flush=True)
dist.destroy_process_group()
leave()
