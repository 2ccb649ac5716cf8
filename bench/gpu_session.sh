#!/usr/bin/env bash
# The performance page's GPU figures in one call of the device tool: the sync check, then every benchmark.
#
#   bash bench/gpu_session.sh wheels   # here, once per session: what the device image lacks, as wheels in .whl/
#   bash bench/gpu_session.sh run      # there: the device tool's `run` with carry [".whl"]; results land in $OUT
#
# The device image holds Python 3.12 with PyTorch (CUDA), transformers, safetensors, torchdiffeq, click, pillow
# and tqdm, but not diffusers: `wheels` downloads the diffusers of this checkout's environment (and the
# importlib_metadata it names) for that Python. `run` installs them beside the image's packages, checks that
# no step synchronises (bench/sync_check.py), then runs bench/run_all.py at full size, each benchmark stopped
# after SCRIPT_LIMIT seconds (default 55, so the whole call stays inside the tool's 10 minutes; a stopped one
# says so in its rows). $OUT receives versions.txt, sync_check.log, run_all.log, run_all.json (written after
# each benchmark) and run_all_gpu.md, the page to copy to docs/benchmarks/run_all_gpu.md.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  wheels)  # with the environment `make setup` made (.venv), else the python3 on the PATH
    py=python3
    [ -x .venv/bin/python ] && py=.venv/bin/python
    version=$("$py" -c "import importlib.metadata as m; print(m.version('diffusers'))")
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux2014_x86_64 -d .whl "diffusers==$version" importlib_metadata
    ls -l .whl
    ;;
  run)
    out=${OUT:-/tmp/superdiff-gpu-session}
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    device=${DEVICE:-cuda}  # DEVICE=cpu tries the plumbing on a machine without a GPU
    python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers',
      diffusers.__version__, 'transformers', transformers.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')" | tee "$out/versions.txt"
    # exit status 1 means a step synchronised: recorded in the log, and the benchmarks still run
    (cd bench && python3 sync_check.py --device "$device") 2>&1 | tee "$out/sync_check.log" || true
    python3 bench/run_all.py --device "$device" --script-limit "${SCRIPT_LIMIT:-55}" --out "$out/run_all.json" \
      --markdown "$out/run_all_gpu.md" 2>&1 | tee "$out/run_all.log"
    ;;
  *)
    echo "usage: bash bench/gpu_session.sh wheels | run" >&2
    exit 2
    ;;
esac
