"""Where the thresholds' gradient comes from, at the default settings: dL/dtheta of every ATP
layer's theta_r and theta_s from the answer (next-token) loss and from the budget terms.

One training-mode forward of a tiny random LLaVA with the study's shape (144 visual tokens, an
8-layer LM, ATP layers 1 / 4 / 6), two prompts, ``lambda_atp`` 0.05, ``lambda_target`` 0.2,
``target_tokens`` 36, every other option at the library's default. The gradient is taken with
respect to each threshold (the readout bias's gradient divided by d theta / d bias), so numbers
from heads parametrised differently compare. Prints a table, then JSON.

    python benchmarks/threshold_gradients.py
"""

import json
import warnings

import torch

import atp
from atp.tiny.models import left_pad, llava_prompt, tiny_llava

torch.manual_seed(0)
model = tiny_llava(num_layers=8, image_size=48, patch_size=4, hidden_size=96, seed=0)
prompts = [
    llava_prompt(model, [1, 5, 6], [7, 8, 9, 10, 11, 12]),
    llava_prompt(model, [1, 11], [12, 13, 14, 15, 16, 17]),
]
ids, mask = left_pad(prompts)
labels = ids.masked_fill(mask == 0, -100)
pixels = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
model.train()
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # untrained heads
    handle = atp.attach(model, layers=[1, 4, 6], lambda_atp=0.05, lambda_target=0.2, target_tokens=36.0)
out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
terms = handle.stats.losses
budget = 0.05 * terms["atp"] + 0.2 * terms["target"]
losses = {"answer": out.loss - budget, "budget": budget}
rows = {}
for index, head in enumerate(handle.policy.heads):
    gain = getattr(head, "GAIN", 1.0)  # logit = gain * readout
    for branch in ("theta_r", "theta_s"):
        bias = getattr(head, branch).bias
        theta = torch.sigmoid(gain * bias.detach().float())
        row = {"theta": float(theta)}
        for name, loss in losses.items():
            (grad,) = torch.autograd.grad(loss, bias, retain_graph=True, allow_unused=True)
            row[name] = 0.0 if grad is None else float(grad.abs().sum() / (gain * theta * (1 - theta)).sum())
        row["budget/answer"] = row["budget"] / row["answer"] if row["answer"] else float("inf")
        rows[f"layer {handle.layers[index]} {branch}"] = row
handle.remove()
print(f"atp {atp.__version__}: |dL/dtheta| at the default init")
print(f"{'':18s} {'theta':>6s} {'answer':>10s} {'budget':>10s} {'budget/answer':>14s}")
for key, r in rows.items():
    print(f"{key:18s} {r['theta']:6.3f} {r['answer']:10.3e} {r['budget']:10.3e} {r['budget/answer']:14.3g}")
print(json.dumps({"atp": atp.__version__, "rows": rows}))
