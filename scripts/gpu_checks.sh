#!/usr/bin/env bash
# The device run, in one call: install the carried wheels, run tests/gpu, run benchmarks/bench_gpu.py.
# Results go to $OUT (the device tool fetches them): env.txt, gpu_tests.log, gpu_tests.xml,
# bench_gpu.log, bench_gpu.json, bench_gpu.md, summary.txt. See docs/gpu.md.
#
#   bash scripts/prepare_gpu_wheels.sh                                      # here, once
#   run(command="bash scripts/gpu_checks.sh", carry=[".whl"], timeout_s=480)  # device tool
#
# Environment: TEST_TIMEOUT (s, default 180), BENCH_BUDGET (s of benchmark cases, default 170),
# BENCH_ARGS (extra benchmark arguments, e.g. "--batches 8"), PYTHON (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_checks_out}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

export PYTHONPATH="$PWD/src"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "installing the carried wheels failed" | tee "$OUT/summary.txt"; exit 1; }
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
else
    echo "no .whl/ carried: bitsandbytes, faiss and datasets tests will skip (scripts/prepare_gpu_wheels.sh)"
fi

{
    nvidia-smi
    "$PYTHON" - <<'PY'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "transformers", "accelerate", "bitsandbytes", "faiss", "datasets", "pyarrow", "flash_attn"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"), getattr(module, "__file__", ""))
    except Exception as error:  # report, do not stop: the tests skip what is missing
        print(name, "unavailable:", type(error).__name__, error)
import torch
print("cuda", torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())
PY
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

timeout "${TEST_TIMEOUT:-180}" "$PYTHON" -m pytest tests/gpu -v -rs -p no:cacheprovider \
    --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

# shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
timeout $(( ${BENCH_BUDGET:-170} + 90 )) "$PYTHON" benchmarks/bench_gpu.py --budget-s "${BENCH_BUDGET:-170}" \
    --out "$OUT/bench_gpu.json" --markdown "$OUT/bench_gpu.md" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_gpu.log"
bench_rc=${PIPESTATUS[0]}

echo "gpu tests exit $tests_rc; benchmark exit $bench_rc" | tee "$OUT/summary.txt"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
