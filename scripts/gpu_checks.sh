#!/usr/bin/env bash
# The device run, in one call: install the carried wheels, run tests/gpu, benchmarks/bench_gpu.py and
# benchmarks/bench_generation.py --size gpu. Results go to $OUT (the device tool fetches at most 8 files):
# env.txt, gpu_tests.log, bench_gpu.json, bench_gpu.md, bench_generation_{bf16,fp32}.json,
# bench_generation.log, summary.txt. See docs/gpu.md.
#
# With every step on, the worst case (180 + 260 + 2 x 240 s) exceeds one device call's 600 s, so run it as
# two calls (what the H200 runs of 2026-11-26 did, 120 s and 299 s of command time; docs/gpu.md):
#
#   bash scripts/prepare_gpu_wheels.sh                                                     # here, once
#   run(command="BENCH_GENERATION=0 bash scripts/gpu_checks.sh", carry=[".whl"], timeout_s=480)
#   run(command="BENCH_GPU=0 TEST_TIMEOUT=120 GENERATION_TIMEOUT=150 bash scripts/gpu_checks.sh",
#       carry=[".whl"], timeout_s=450)
#
# summary.txt gets one line per finished step, so a call cut short still says how far it got.
# bench_gpu.py's progress goes to the call's output only (its results are in bench_gpu.json/.md).
#
# Environment: TEST_TIMEOUT (s, default 180), BENCH_BUDGET (s of benchmark cases, default 170),
# BENCH_ARGS (extra benchmark arguments, e.g. "--batches 8"), BENCH_GPU=0 / BENCH_GENERATION=0 (skip one),
# GENERATION_TIMEOUT (s per decoding benchmark, default 240), GENERATION_ARGS (extra arguments of the bf16
# decoding benchmark, e.g. "--questions-per-batch 1 4"), PYTHON (default python3).
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

timeout "${TEST_TIMEOUT:-180}" "$PYTHON" -m pytest tests/gpu -v -rs -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
echo "gpu tests exit $tests_rc" >"$OUT/summary.txt"

bench_rc=0
if [ "${BENCH_GPU:-1}" = 1 ]; then
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
    timeout $(( ${BENCH_BUDGET:-170} + 90 )) "$PYTHON" benchmarks/bench_gpu.py --budget-s "${BENCH_BUDGET:-170}" \
        --out "$OUT/bench_gpu.json" --markdown "$OUT/bench_gpu.md" ${BENCH_ARGS:-} 2>&1
    bench_rc=$?
    echo "gpu benchmark exit $bench_rc" >>"$OUT/summary.txt"
fi

# Decoding against Transformers at the rag-*-nq shapes (issue: fast decoding): bf16 with peak memory, then
# float32 without training steps, where the identity check is exact.
generation_rc=0
if [ "${BENCH_GENERATION:-1}" = 1 ]; then
    # shellcheck disable=SC2086  # GENERATION_ARGS is a list of arguments
    timeout "${GENERATION_TIMEOUT:-240}" "$PYTHON" benchmarks/bench_generation.py --size gpu --repeats 3 --memory \
        ${GENERATION_ARGS:-} --json "$OUT/bench_generation_bf16.json" 2>&1 | tee "$OUT/bench_generation.log"
    generation_rc=${PIPESTATUS[0]}
    timeout "${GENERATION_TIMEOUT:-240}" "$PYTHON" benchmarks/bench_generation.py --size gpu --dtype float32 \
        --repeats 2 --warmup 1 --skip-training --json "$OUT/bench_generation_fp32.json" 2>&1 \
        | tee -a "$OUT/bench_generation.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || generation_rc=1
    echo "generation benchmark exit $generation_rc" >>"$OUT/summary.txt"
fi

cat "$OUT/summary.txt"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$generation_rc" -eq 0 ]
