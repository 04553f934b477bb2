#!/usr/bin/env bash
# The GPU checks of ragkit, on the device machine (one H200, CUDA 13 image, no network), in two calls of the
# device tool. Prepare the wheels here first, in the repository root of the checkout the device tool sends:
#
#   bash scripts/prepare_gpu_wheels.sh      # .whl/base (39 MiB), .whl/fa4a (21 MiB), .whl/fa4b (49 MiB)
#
# then make the two calls back to back (call 2 joins what call 1 staged in /tmp, so it must reach the same
# machine: it stays warm only 30 s after a call; issue call 2 at once):
#
#   run(command="PHASE=main bash scripts/gpu_checks.sh", carry=[".whl/base", ".whl/fa4a"], timeout_s=400)
#   run(command="PHASE=fa4 bash scripts/gpu_checks.sh", carry=[".whl/fa4b"], timeout_s=330)
#
# PHASE=main (call 1; about 4 minutes, at most 370 s by the timeouts below): installs .whl/base into /tmp/site,
#   stages .whl/fa4a in /tmp/ragkit_stage, records the environment (and whether CUDA 12 cuBLAS exists, which
#   faiss-gpu needs), runs tests/gpu (TEST_TIMEOUT, 120 s; about 30-60 s), then
#   benchmarks/bench_generation.py --size gpu --contexts padded --memory: rag-*-nq shapes in bf16, contexts
#   filled 50-70% of max_combined_length=300, RAG-Sequence/RAG-Token generate at batch 32 and the training
#   step at batch 8, ragkit against Transformers, with peak memory (GENERATION_TIMEOUT, 200 s; about 2-2.5
#   minutes, scaled from the full-context run of 2026-11-26).
# PHASE=fa4 (call 2; about 1.5-3 minutes, at most 300 s): joins the cutlass payload, installs flash-attn-4 into
#   /tmp/fa4site and runs the flash_attention_4 test of tests/gpu (FA4_TEST_TIMEOUT, 240 s: its kernels are
#   compiled at first use, tens of seconds each).
# PHASE=all runs both in one call where one call can carry everything (another machine, or a local GPU).
# PHASE=faissgpu (optional, only if call 1's env.txt shows libcublas.so.12): carry=[".whl/faissgpu"].
#
# Files in $OUT (the device tool brings back at most 8): env.txt, gpu_tests.log, bench_generation.json,
# bench_generation.log, summary.txt (call 1); fa4_env.txt, fa4_tests.log, summary.txt (call 2). summary.txt has
# one line per target: the measured value, the target, met / NOT met / NOT verified; call 2's repeats call 1's.
#
# Environment: PHASE (main), TEST_TIMEOUT, GENERATION_TIMEOUT, FA4_TEST_TIMEOUT (s), GENERATION_ARGS (extra
# arguments of the decoding benchmark; default "--questions-per-batch 8 16", the speed/memory trade-off of
# RAG-Sequence generate; GENERATION_ARGS= for none), BENCH_GPU=1 (also benchmarks/bench_gpu.py: 4-bit, 170 s more; not
# needed by these targets), PYTHON (python3). For a dry run on a CPU: WHEELS=0 (use the installed packages),
# GENERATION_SIZE=cpu, OUT/STAGE/SITE/FA4_SITE (folders).
set -uo pipefail
cd "$(dirname "$0")/.." || exit
OUT=${OUT:-$PWD/gpu_checks_out}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
PHASE=${PHASE:-main}
STAGE=${STAGE:-/tmp/ragkit_stage}  # survives between calls while the machine is warm
SITE=${SITE:-/tmp/site}
FA4_SITE=${FA4_SITE:-/tmp/fa4site}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD/src"
mkdir -p "$STAGE"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }

install_wheels() {  # install_wheels TARGET WHEEL...: into TARGET (no index, no dependencies)
    local target=$1
    shift
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" "$@"
}

install_base() {
    if [ "${WHEELS:-1}" = 0 ]; then
        return 0
    elif [ -f "$STAGE/base_installed" ] && [ -d "$SITE" ]; then
        echo "using the base wheels an earlier call installed in $SITE"
    elif compgen -G ".whl/base/*.whl" >/dev/null; then
        install_wheels "$SITE" .whl/base/*.whl || { note "installing .whl/base failed"; exit 1; }
        touch "$STAGE/base_installed"
    else
        echo "no .whl/base: transformers is the image's (ragkit may need a newer one); bitsandbytes, faiss and" \
            "datasets tests will skip (bash scripts/prepare_gpu_wheels.sh)"
    fi
    [ -d "$SITE" ] && export PYTHONPATH="$SITE:$PYTHONPATH"
}

# flash-attn-4: the wheels of .whl/fa4b plus the cutlass CUDA 13 libraries, whose xz tar is split between
# .whl/fa4a (staged by call 1) and .whl/fa4b. Returns 1 with the reason in $FA4_MISSING.
install_fa4() {
    FA4_MISSING=""
    if [ -f "$STAGE/fa4_installed" ]; then
        :
    elif ! compgen -G ".whl/fa4b/*.whl" >/dev/null; then
        FA4_MISSING="not carried (.whl/fa4b)"
        return 1
    else
        local part1=""
        [ -f .whl/fa4a/cutlass_cu13.tar.xz.part1 ] && part1=.whl/fa4a/cutlass_cu13.tar.xz.part1
        [ -z "$part1" ] && [ -f "$STAGE/cutlass_cu13.tar.xz.part1" ] && part1="$STAGE/cutlass_cu13.tar.xz.part1"
        if [ -z "$part1" ]; then
            FA4_MISSING="the first part of the cutlass libraries (.whl/fa4a, staged by call 1 in $STAGE) is not on this machine: it was given back between the calls; rerun call 1, then call 2 at once"
            return 1
        fi
        local sum
        sum=$(cat "$part1" .whl/fa4b/cutlass_cu13.tar.xz.part2 | sha256sum | cut -d' ' -f1)
        if [ "$sum" != "$(cat .whl/fa4b/cutlass_cu13.tar.xz.sha256)" ]; then
            FA4_MISSING="the joined cutlass payload does not match its sha256 (parts of different prepare runs?)"
            return 1
        fi
        rm -rf "$FA4_SITE"
        install_wheels "$FA4_SITE" .whl/fa4b/*.whl || { FA4_MISSING="pip could not install .whl/fa4b"; return 1; }
        # The wheel's files go in after pip's, into the same nvidia_cutlass_dsl folder (pip --target would
        # replace that folder, so the tar is not a wheel pip installs).
        cat "$part1" .whl/fa4b/cutlass_cu13.tar.xz.part2 | "$PYTHON" -c '
import sys, tarfile
with tarfile.open(fileobj=sys.stdin.buffer, mode="r|xz") as archive:
    archive.extractall(sys.argv[1], filter="tar")
' "$FA4_SITE" || { FA4_MISSING="unpacking the cutlass payload failed"; return 1; }
        touch "$STAGE/fa4_installed"
    fi
    # --target does not run nvidia_cutlass_dsl_packages.pth, which puts the cutlass package on the path.
    export PYTHONPATH="$FA4_SITE:$FA4_SITE/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH"
    return 0
}

record_env() {  # record_env FILE [cuda12]: versions; with cuda12, also the CUDA 12 libraries faiss-gpu needs
    {
        nvidia-smi
        if [ "${2:-}" = cuda12 ]; then
            echo "CUDA 12 libraries (faiss-gpu-cu12 and faiss-gpu need libcublas.so.12, libcublasLt.so.12, libcudart.so.12):"
            { ldconfig -p 2>/dev/null | grep -E 'lib(cublas|cublasLt|cudart)\.so\.12';
              timeout 30 find /usr /opt /lib /lib64 "$SITE" \( -name 'libcublas.so.12*' -o -name 'libcublasLt.so.12*' \
                  -o -name 'libcudart.so.12*' \) 2>/dev/null | head -20; } | sort -u | sed 's/^/  /'
            echo "(end of CUDA 12 libraries)"
        fi
        "$PYTHON" - <<'PY'
import importlib, sys
print("python", sys.version.split()[0])
names = ("torch", "transformers", "accelerate", "bitsandbytes", "faiss", "datasets", "pyarrow", "flash_attn.cute", "cutlass")
for name in names:
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"), getattr(module, "__file__", ""))
    except Exception as error:  # report, do not stop: the tests skip what is missing
        print(name, "unavailable:", type(error).__name__, str(error)[:300])
import torch
print("cuda", torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(),
      torch.cuda.is_available() and torch.cuda.get_device_capability())
try:
    from ragkit._accelerators import _module_distributions
    print("flash_attn distributions:", _module_distributions("flash_attn"))
    from ragkit.retrieval._devices import faiss_gpu_count
    print("faiss GPUs:", faiss_gpu_count())
except Exception as error:
    print("ragkit probes failed:", type(error).__name__, error)
PY
    } >"$1" 2>&1
    cat "$1"
}

# summarize KIND...: one line per target from the JSON/XML results in $OUT and $STAGE (see below)
summarize() {
    "$PYTHON" - "$OUT" "$STAGE" "$@" <<'PY' | tee -a "$SUMMARY"
"""One line per target of the GPU checks: measured, target, met / NOT met / NOT verified."""
import json
import os
import sys
import xml.etree.ElementTree as ElementTree

out, stage, kinds = sys.argv[1], sys.argv[2], sys.argv[3:]


def verdict(ok):
    return "met" if ok else "NOT met"


def test_outcomes(path):
    """{test name (with parameters): passed / failed / skipped: reason}, and counts."""
    outcomes = {}
    if not os.path.exists(path):
        return outcomes
    for case in ElementTree.parse(path).iter("testcase"):
        name = case.get("name")
        status = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                status = "failed"
            elif child.tag == "skipped":
                status = "skipped: " + (child.get("message") or "").strip()
        outcomes[name] = status
    return outcomes


def counts(outcomes):
    passed = sum(v == "passed" for v in outcomes.values())
    failed = sum(v == "failed" for v in outcomes.values())
    skipped = sum(v.startswith("skipped") for v in outcomes.values())
    return passed, failed, skipped


def pick(outcomes, prefix):
    return {name: status for name, status in outcomes.items() if name.startswith(prefix)}


def feature_line(label, outcomes, prefix, why_missing=None):
    chosen = pick(outcomes, prefix)
    if why_missing:
        return f"{label}: NOT verified ({why_missing})"
    if not chosen:
        return f"{label}: NOT verified (the test did not run)"
    passed, failed, skipped = counts(chosen)
    if failed:
        return f"{label}: FAILED ({failed} of {len(chosen)} failed; see the tests' log)"
    if skipped:
        reason = next(v for v in chosen.values() if v.startswith("skipped"))[len("skipped: ") :]
        return f"{label}: NOT verified (test skipped: {reason})"
    return f"{label}: verified ({passed} passed)"


if "tests" in kinds:
    outcomes = test_outcomes(os.path.join(stage, "gpu_tests.xml"))
    if outcomes:
        passed, failed, skipped = counts(outcomes)
        state = "NOT met" if failed else ("met" if passed else "NOT verified (nothing ran)")
        print(f"tests/gpu: {passed} passed, {failed} failed, {skipped} skipped: {state}")
        print(feature_line("faiss-gpu search (faiss.index_cpu_to_gpu) vs faiss-cpu", outcomes,
                           "test_faiss_gpu_index_finds_what_faiss_cpu_finds"))
    else:
        print("tests/gpu: NOT verified (no results: timed out or did not start)")

if "generation" in kinds:
    path = os.path.join(out, "bench_generation.json")
    if not os.path.exists(path):
        print("generation benchmark: NOT verified (no bench_generation.json: timed out or failed; see its log)")
    else:
        result = json.load(open(path))
        shapes = result["shapes"]
        if not result.get("complete"):
            print("generation benchmark: stopped early (time limit?); the lines below are what it measured")
        fill = result.get("context_fill")
        where = f"{shapes.get('dtype', '?')}, {result.get('contexts', 'full')} contexts of {shapes['context_length']}"
        if fill is not None:
            where += f" ({fill:.0%} filled)"
        for head in ("sequence", "token"):
            speedup = result.get(f"training_{head}_speedup")
            if speedup is not None:
                print(f"training step RAG-{head.capitalize()}, batch {shapes['train_batch_size']}, {where}: "
                      f"ragkit {speedup:.2f}x faster than Transformers (target >= 1.5x): {verdict(speedup >= 1.5)}")
        speedup = result.get("ratios", {}).get("sequence_speedup")
        medians = result.get("decoding_median_s", {})
        if speedup is not None:
            print(f"RAG-Sequence generate, batch {shapes['batch_size']}, {where}: ragkit "
                  f"{medians['ragkit_sequence']:.3f} s vs Transformers {medians['reference_sequence']:.3f} s, "
                  f"{speedup:.1f}x faster (target >= 10x): {verdict(speedup >= 10)}")
        peaks = result.get("peak_memory_mib", {})
        if "ragkit_sequence" in peaks and "reference_sequence" in peaks:
            ours, theirs = peaks["ragkit_sequence"], peaks["reference_sequence"]
            print(f"RAG-Sequence generate peak memory, batch {shapes['batch_size']}, default settings: ragkit "
                  f"{ours:.0f} MiB vs Transformers {theirs:.0f} MiB beyond the weights (target <=): "
                  f"{verdict(ours <= theirs)}")
        token = result.get("ratios", {}).get("token_speedup")
        if token is not None:
            memory = ""
            if "ragkit_token" in peaks and "reference_token" in peaks:
                memory = f"; peak {peaks['ragkit_token']:.0f} vs {peaks['reference_token']:.0f} MiB"
            print(f"(RAG-Token generate, batch {shapes['batch_size']}: {token:.1f}x faster than Transformers{memory})")
        # The speed/memory trade-off at the default settings: the same decoding k questions per call.
        reference = medians.get("reference_sequence")
        for name in sorted(medians):
            if name.startswith("ragkit_sequence_qpb") and reference:
                k = name[len("ragkit_sequence_qpb"):]
                peak = f", peak {peaks[name]:.0f} MiB" if name in peaks else ""
                print(f"(RAG-Sequence generate, questions_per_batch={k}: {reference / medians[name]:.1f}x faster "
                      f"than Transformers{peak})")

if "fa4" in kinds:
    missing = os.environ.get("FA4_MISSING") or None
    outcomes = test_outcomes(os.path.join(stage, "fa4_tests.xml"))
    print(feature_line("flash_attention_4 (flash-attn-4) vs sdpa, bf16, generate of both heads", outcomes,
                       "test_flash_attention_4_on_the_generator", missing))
elif "fa4-later" in kinds:
    print("flash_attention_4: NOT verified in this call (call 2: PHASE=fa4 with .whl/fa4b)")
PY
}

run_tests() {  # run_tests LOG XML TIMEOUT PYTEST-ARGS... (paths included)
    local log=$1 xml=$2 limit=$3
    shift 3
    timeout "$limit" "$PYTHON" -m pytest -v -rs -p no:cacheprovider --junitxml="$xml" "$@" 2>&1 | tee "$log"
    return "${PIPESTATUS[0]}"
}

phase_main() {
    install_base
    if compgen -G ".whl/fa4a/*" >/dev/null; then
        cp .whl/fa4a/* "$STAGE/"  # for call 2, which cannot carry both parts
    fi
    record_env "$OUT/env.txt" cuda12
    rm -f "$STAGE/gpu_tests.xml"
    run_tests "$OUT/gpu_tests.log" "$STAGE/gpu_tests.xml" "${TEST_TIMEOUT:-120}" tests/gpu -k "not flash_attention_4"
    local tests_rc=$?
    if [ "${BENCH_GPU:-0}" = 1 ]; then
        timeout 260 "$PYTHON" benchmarks/bench_gpu.py --budget-s 170 --out "$OUT/bench_gpu.json" \
            --markdown "$OUT/bench_gpu.md" 2>&1
    fi
    rm -f "$OUT/bench_generation.json"
    # shellcheck disable=SC2086  # GENERATION_ARGS is a list of arguments
    timeout "${GENERATION_TIMEOUT:-200}" "$PYTHON" benchmarks/bench_generation.py --size "${GENERATION_SIZE:-gpu}" --contexts padded \
        --repeats 3 --train-repeats 10 --memory ${GENERATION_ARGS---questions-per-batch 8 16} --json "$OUT/bench_generation.json" 2>&1 \
        | tee "$OUT/bench_generation.log"
    local generation_rc=${PIPESTATUS[0]}
    echo "tests exit $tests_rc, generation benchmark exit $generation_rc"
    summarize tests generation fa4-later
    cp "$SUMMARY" "$STAGE/summary_main.txt"
    [ "$tests_rc" -eq 0 ] && [ "$generation_rc" -eq 0 ]
}

phase_fa4() {
    install_base
    if [ -f "$STAGE/summary_main.txt" ]; then
        grep -v '^flash_attention_4' "$STAGE/summary_main.txt" >>"$SUMMARY"
    fi
    install_fa4
    export FA4_MISSING
    local rc=0
    if [ -z "$FA4_MISSING" ]; then
        record_env "$OUT/fa4_env.txt"
        rm -f "$STAGE/fa4_tests.xml"
        run_tests "$OUT/fa4_tests.log" "$STAGE/fa4_tests.xml" "${FA4_TEST_TIMEOUT:-240}" tests/gpu -k "flash_attention_4" -s
        rc=$?
    fi
    summarize fa4
    [ "$rc" -eq 0 ] && [ -z "$FA4_MISSING" ]
}

phase_faissgpu() {
    install_base
    compgen -G ".whl/faissgpu/*.whl" >/dev/null || { note "faiss-gpu: NOT verified (.whl/faissgpu not carried)"; return 1; }
    # faiss-gpu replaces faiss-cpu's module; its CUDA 12 runtime comes from the nvidia-cuda-runtime-cu12 wheel.
    install_wheels /tmp/faissgpu_site .whl/faissgpu/*.whl || { note "faiss-gpu: installing failed"; return 1; }
    export PYTHONPATH="/tmp/faissgpu_site:$PYTHONPATH"
    export LD_LIBRARY_PATH="/tmp/faissgpu_site/nvidia/cuda_runtime/lib:${LD_LIBRARY_PATH:-}"
    record_env "$OUT/faissgpu_env.txt"
    rm -f "$STAGE/gpu_tests.xml"
    run_tests "$OUT/faissgpu_tests.log" "$STAGE/gpu_tests.xml" 120 tests/gpu/test_gpu_search.py
    local rc=$?
    summarize tests
    return $rc
}

case "$PHASE" in
    main) phase_main ;;
    fa4) phase_fa4 ;;
    all)
        phase_main
        main_rc=$?
        : >"$SUMMARY"
        phase_fa4
        fa4_rc=$?
        [ "$main_rc" -eq 0 ] && [ "$fa4_rc" -eq 0 ]
        ;;
    faissgpu) phase_faissgpu ;;
    summary) summarize tests generation fa4 ;;  # again, from the results already in $OUT and $STAGE
    *) echo "PHASE must be main, fa4, all, faissgpu or summary, not '$PHASE'" >&2; exit 2 ;;
esac
