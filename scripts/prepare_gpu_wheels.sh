#!/usr/bin/env bash
# Download, on the development machine, the wheels the GPU image lacks into .whl/ (ignored by git), for
# scripts/gpu_checks.sh. The device machine has no network; its image has torch, accelerate and
# transformers 5.17 (ragkit needs the transformers installed here), but no bitsandbytes, faiss or datasets.
#
#   bash scripts/prepare_gpu_wheels.sh        # then, with the device tool, the calls in scripts/gpu_checks.sh
#
# bitsandbytes' wheel (43 MB) carries one library per CUDA/ROCm/XPU release; only the CUDA 13 ones (the
# image's torch is cu130) and the CPU one are kept, so that everything fits the 64 MiB a device call
# can carry. flash-attn has no wheel on PyPI: the flash-attention test skips unless one is added here.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
rm -rf .whl && mkdir -p .whl

transformers_version=$("$PYTHON" -c 'import transformers; print(transformers.__version__)')
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl \
    "transformers==${transformers_version}" \
    "bitsandbytes==0.50.2" \
    "faiss-cpu==1.15.1" \
    "datasets==5.2.0" "dill==0.4.1" "multiprocess==0.70.19"

"$PYTHON" - <<'PY'
"""Rewrite the bitsandbytes wheel without the native libraries the GPU image cannot use."""
import glob
import os
import re
import zipfile

(path,) = glob.glob(".whl/bitsandbytes-*.whl")
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

total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
ls -l .whl
echo "total: $((total / 1048576)) MiB (a device call carries at most 64 MiB with the working tree)"
if [ "$total" -gt $((60 * 1048576)) ]; then
    echo "too large for one device call" >&2
    exit 1
fi
