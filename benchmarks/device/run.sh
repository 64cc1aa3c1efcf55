#!/bin/bash
# The GPU checks in one device call (see README.md here): installs onnxruntime-gpu from the pieces
# carried earlier, then runs probe.py, benchmarks/serve.py, readers.py and benchmarks/wsi.py on CUDA.
# Everything it prints goes to $OUT/log.txt as well; results land in $OUT.
set -u
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/log.txt") 2>&1
T0=$(date +%s)
el() { echo "== $(($(date +%s) - T0)) s: $*"; }
el start
nvidia-smi -L
mkdir -p /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .dev/deps/*.whl || exit 3
cp .dev/ortx/p4 /tmp/pc/ && cat /tmp/pc/p0 /tmp/pc/p1 /tmp/pc/p2 /tmp/pc/p3 /tmp/pc/p4 >/tmp/ort.tar.xz || exit 4
echo "$(cat .dev/ortx/SHA)  /tmp/ort.tar.xz" | sha256sum -c || exit 5
rm -rf /tmp/site/onnxruntime /tmp/site/onnxruntime-*.dist-info
tar -C /tmp/site -xJf /tmp/ort.tar.xz || exit 6
export PYTHONPATH=/tmp/site:$PWD HISTO_DEVICE=cuda
el installed
timeout 90 python3 benchmarks/device/probe.py
el probe $?
timeout 170 python3 benchmarks/serve.py --device cuda --seconds 8 --out "$OUT/serve.json"
el serve $?
cp benchmarks/results/tmp/serve-http_batched.log "$OUT/" 2>/dev/null
timeout 120 python3 benchmarks/device/readers.py
el readers $?
mkdir -p "$OUT/wsi"
timeout 200 python3 benchmarks/wsi.py --workers 8 --raw-tiles 4096 --out "$OUT/wsi"
el wsi $?
