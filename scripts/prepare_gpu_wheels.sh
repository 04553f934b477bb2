#!/usr/bin/env bash
# Download, on the development machine, the wheels the GPU image lacks, into wheel sets under .whl/ (ignored
# by git; never commit them) that scripts/gpu_checks.sh installs on the device machine. That machine has no
# network; its image has Python 3.12, torch 2.11.0+cu130 (CUDA 13), accelerate, einops, protobuf,
# cuda-bindings and transformers 5.17 (ragkit needs the transformers installed here), but no bitsandbytes,
# faiss, datasets or flash-attention. A device call carries at most 64 MiB, working tree included.
#
#   bash scripts/prepare_gpu_wheels.sh                 # sets base and fa4 (the calls in scripts/gpu_checks.sh)
#   bash scripts/prepare_gpu_wheels.sh base            # only base
#   bash scripts/prepare_gpu_wheels.sh faissgpu        # faiss-gpu-cu12: useful only if the image has CUDA 12 cuBLAS
#
# Sets (sizes as of the pinned versions):
#   .whl/base      transformers, bitsandbytes (CUDA 13 and CPU libraries only: 43 -> 7 MB), faiss-cpu, datasets,
#                  dill, multiprocess: about 39 MiB.
#   .whl/fa4a      the first part of nvidia-cutlass-dsl-libs-cu13, the CuTe DSL compiler flash-attn-4 needs: its
#   .whl/fa4b      wheel is 88 MiB (a 184 MiB MLIR library), over one call's 64 MiB, so its files travel as one
#                  xz-compressed tar (about 59 MiB) split in two; fa4a fills call 1 up to FIRST_CALL_MIB with the
#                  base set, fa4b holds the rest and the other flash-attn-4 wheels (flash-attn-4, quack-kernels,
#                  nvidia-cutlass-dsl, -libs-base, -libs-core, apache-tvm-ffi, torch-c-dlpack-ext: about 9 MiB).
#                  Call 1 stages fa4a in /tmp on the device machine; call 2, while it is still warm, joins them.
#   .whl/faissgpu  faiss-gpu-cu12 and nvidia-cuda-runtime-cu12 (about 50 MiB). Not in the default plan: both faiss
#                  GPU wheels on PyPI (faiss-gpu-cu12 1.14.1.post1, faiss-gpu 1.15.1) link libcublas.so.12 and
#                  libcublasLt.so.12, which a CUDA 13 image lacks, and nvidia-cublas-cu12 is a 554 MiB wheel.
#
# Downloads are cached in .whl/download (never carried), and so is the compressed cutlass payload, whose
# compression takes minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
FIRST_CALL_MIB=${FIRST_CALL_MIB:-61}  # call 1 carries the tree, .whl/base and .whl/fa4a: keep it under 64 MiB
sets=("$@")
[ ${#sets[@]} -gt 0 ] || sets=(base fa4)

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
mkdir -p .whl/download

platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
fetch() {  # fetch NAME==VERSION...: wheels for the image's CPython 3.12 on x86-64 into .whl/download
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .whl/download "$@"
}
wheel() {  # wheel PATTERN: the one downloaded wheel matching PATTERN
    # shellcheck disable=SC2206  # $1 is a glob pattern, expanded on purpose
    local matches=(.whl/download/$1)
    [ ${#matches[@]} -eq 1 ] && [ -f "${matches[0]}" ] || { echo "expected one wheel $1, found: ${matches[*]}" >&2; exit 1; }
    echo "${matches[0]}"
}
mib() { echo $(( ($1 + 1048575) / 1048576 )); }
tree_bytes() {  # what a device call sends besides the carried paths: tracked and untracked-not-ignored files
    git ls-files -z -co --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}'
}
set_bytes() { du -cb "$1"/* | tail -1 | cut -f1; }

make_base() {
    local transformers_version
    transformers_version=$("$PYTHON" -c 'import transformers; print(transformers.__version__)')
    fetch "transformers==${transformers_version}" "bitsandbytes==0.50.2" "faiss-cpu==1.15.1" \
        "datasets==5.2.0" "dill==0.4.1" "multiprocess==0.70.19"
    rm -rf .whl/base && mkdir -p .whl/base
    for pattern in "transformers-${transformers_version}-*.whl" "bitsandbytes-0.50.2-*.whl" "faiss_cpu-1.15.1-*.whl" \
        "datasets-5.2.0-*.whl" "dill-0.4.1-*.whl" "multiprocess-0.70.19-*.whl"; do
        cp "$(wheel "$pattern")" .whl/base/
    done
    "$PYTHON" - <<'PY'
"""Rewrite the bitsandbytes wheel without the native libraries the GPU image cannot use."""
import glob
import os
import re
import zipfile

(path,) = glob.glob(".whl/base/bitsandbytes-*.whl")
keep = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")
drop = lambda name: name.endswith(".so") and "libbitsandbytes_" in name and not keep.search(name)
slim = path + ".slim"
with zipfile.ZipFile(path) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as target:
    for info in source.infolist():
        if drop(info.filename):
            continue
        data = source.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines(keepends=True)
            data = "".join(line for line in lines if not drop(line.split(",")[0])).encode()
        target.writestr(info, data)
os.replace(slim, path)
PY
}

CUTLASS=4.8.1
make_fa4() {
    fetch "flash-attn-4==4.0.0b36" "quack-kernels==0.6.5" "apache-tvm-ffi==0.1.15.post2" "torch-c-dlpack-ext==0.1.5" \
        "nvidia-cutlass-dsl==${CUTLASS}" "nvidia-cutlass-dsl-libs-base==${CUTLASS}" \
        "nvidia-cutlass-dsl-libs-core==${CUTLASS}" "nvidia-cutlass-dsl-libs-cu13==${CUTLASS}"
    local payload=.whl/download/cutlass_dsl_libs_cu13-${CUTLASS}.tar.xz
    if [ ! -s "$payload" ]; then
        # The wheel's files, as pip would install them (the .so files and the dist-info), in one tar: xz
        # compresses the 236 MB of libraries to about 59 MiB (the wheel's deflate: 88 MiB).
        local unpacked
        unpacked=$(mktemp -d)
        "$PYTHON" -m zipfile -e "$(wheel "nvidia_cutlass_dsl_libs_cu13-${CUTLASS}-*.whl")" "$unpacked"
        echo "compressing the cutlass CUDA 13 libraries with xz -9e (a few minutes)"
        tar -C "$unpacked" -cf - . | xz -9e -T0 >"$payload.partial"
        mv "$payload.partial" "$payload"
        rm -rf "$unpacked"
    fi
    rm -rf .whl/fa4a .whl/fa4b && mkdir -p .whl/fa4a .whl/fa4b
    for pattern in "flash_attn_4-4.0.0b36-*.whl" "quack_kernels-0.6.5-*.whl" "apache_tvm_ffi-0.1.15.post2-*.whl" \
        "torch_c_dlpack_ext-0.1.5-*.whl" "nvidia_cutlass_dsl-${CUTLASS}-*.whl" \
        "nvidia_cutlass_dsl_libs_base-${CUTLASS}-*.whl" "nvidia_cutlass_dsl_libs_core-${CUTLASS}-*.whl"; do
        cp "$(wheel "$pattern")" .whl/fa4b/
    done
    [ -d .whl/base ] || { echo "make the base set first: call 1 carries it with fa4a" >&2; exit 1; }
    local first=$(( FIRST_CALL_MIB * 1048576 - $(tree_bytes) - $(set_bytes .whl/base) ))
    local total
    total=$(stat -c %s "$payload")
    [ "$first" -gt 0 ] && [ "$first" -lt "$total" ] || { echo "no room for fa4a in call 1 ($first bytes)" >&2; exit 1; }
    head -c "$first" "$payload" >.whl/fa4a/cutlass_cu13.tar.xz.part1
    tail -c "+$((first + 1))" "$payload" >.whl/fa4b/cutlass_cu13.tar.xz.part2
    (cd .whl/download && sha256sum "$(basename "$payload")" | cut -d' ' -f1) >.whl/fa4b/cutlass_cu13.tar.xz.sha256
}

make_faissgpu() {
    fetch "faiss-gpu-cu12==1.14.1.post1" "nvidia-cuda-runtime-cu12==12.9.79"
    rm -rf .whl/faissgpu && mkdir -p .whl/faissgpu
    cp "$(wheel "faiss_gpu_cu12-1.14.1.post1-*.whl")" "$(wheel "nvidia_cuda_runtime_cu12-12.9.79-*.whl")" .whl/faissgpu/
}

for name in "${sets[@]}"; do
    case "$name" in
        base) make_base ;;
        fa4) make_fa4 ;;
        faissgpu) make_faissgpu ;;
        *) echo "unknown wheel set '$name': use base, fa4 or faissgpu" >&2; exit 2 ;;
    esac
done

tree=$(tree_bytes)
status=0
echo "working tree (travels with every call): $(mib "$tree") MiB"
for name in base fa4a fa4b faissgpu; do
    [ -d ".whl/$name" ] || continue
    echo ".whl/$name: $(mib "$(set_bytes ".whl/$name")") MiB"
    ls -l ".whl/$name"
done
check_call() {  # check_call NAME SET...: the call's carry and the tree under 64 MiB
    local bytes=$tree set
    for set in "${@:2}"; do
        [ -d "$set" ] || return 0
        bytes=$((bytes + $(set_bytes "$set")))
    done
    echo "$1 carries $(mib "$bytes") MiB of 64"
    [ "$bytes" -le $((63 * 1048576)) ] || { echo "$1 is too large for one device call" >&2; status=1; }
}
check_call "call 1 (.whl/base .whl/fa4a)" .whl/base .whl/fa4a
check_call "call 2 (.whl/fa4b)" .whl/fa4b
check_call "a faiss-gpu call (.whl/faissgpu)" .whl/faissgpu
exit $status
