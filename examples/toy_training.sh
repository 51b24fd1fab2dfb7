#!/usr/bin/env bash
# A toy run of the whole training story on one CPU, nothing downloaded (about 20 s):
# write a tiny LLaVA-format dataset, train the ATP heads of the embedded tiny model with the
# budget loss, resume, and reload the result for pruned generation.
set -euo pipefail
out=${1:-runs/toy}
python=${PYTHON:-python}  # the interpreter of the environment atp is installed in (e.g. .venv/bin/python)
"$python" -c "from atp.tiny.models import write_toy_conversations as w; print(w('$out/data'))"
"$python" -m atp train --model tiny --data "$out/data/data.json" --image-folder "$out/data/images" --output-dir "$out/run" \
  --max-steps 20 --save-steps 10 --batch-size 2 --workers 0 --freeze-lm --atp-learning-rate 0.01 \
  --target-tokens 8 --lambda-target 1.0
"$python" -m atp train --model tiny --data "$out/data/data.json" --image-folder "$out/data/images" --output-dir "$out/run" \
  --max-steps 30 --save-steps 10 --batch-size 2 --workers 0 --freeze-lm --atp-learning-rate 0.01 \
  --target-tokens 8 --lambda-target 1.0 --resume latest
"$python" - "$out/run" <<'PY'
import sys
import torch
import atp
from atp.tiny.models import llava_batch, tiny_llava

model = tiny_llava(num_layers=4)
handle = atp.attach(model, from_pretrained=sys.argv[1])
batch = llava_batch(model, [([1, 5], [7, 8, 9], 1)])
with torch.no_grad():
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
print("reloaded", handle, "kept", handle.stats.kept.tolist(), "Token", round(handle.stats.avg_tokens, 2))
PY
