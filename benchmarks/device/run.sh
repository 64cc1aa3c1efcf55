#!/bin/bash
# The GPU checks in one device call (see README.md here): installs onnxruntime-gpu from the pieces
# carried earlier, then runs probe.py, benchmarks/serve.py, readers.py and benchmarks/wsi.py on CUDA
# (or the steps named in $STEPS).
# Everything it prints goes to $OUT/log.txt as well; results land in $OUT.
set -u
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/log.txt") 2>&1
T0=$(date +%s)
el() { echo "== $(($(date +%s) - T0)) s: $*"; }
el start
nvidia-smi -L
mkdir -p /tmp/site
DEPS=.dev/deps; [ -d "$DEPS" ] || DEPS=/tmp/deps  # carried with this call, or by an earlier one
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "$DEPS"/*.whl || exit 3
cp .dev/ortx/p4 /tmp/pc/ && cat /tmp/pc/p0 /tmp/pc/p1 /tmp/pc/p2 /tmp/pc/p3 /tmp/pc/p4 >/tmp/ort.tar.xz || exit 4
echo "$(cat .dev/ortx/SHA)  /tmp/ort.tar.xz" | sha256sum -c || exit 5
rm -rf /tmp/site/onnxruntime /tmp/site/onnxruntime-*.dist-info
tar -C /tmp/site -xJf /tmp/ort.tar.xz || exit 6
export PYTHONPATH=/tmp/site:$PWD HISTO_DEVICE=cuda
el installed
STEPS=${STEPS:-probe serve readers wsi}  # e.g. STEPS="probe wsi" for a shorter call
for step in $STEPS; do
  case $step in
    probe) timeout 150 python3 benchmarks/device/probe.py ;;
    serve)
      timeout 170 python3 benchmarks/serve.py --device cuda --seconds 8 --out "$OUT/serve.json"
      cp benchmarks/results/tmp/serve-http_batched.log "$OUT/" 2>/dev/null ;;
    readers) timeout 120 python3 benchmarks/device/readers.py ;;
    cluster)  # needs Ray installed first: see "The slide job on Ray" in README.md
      PYTHONPATH=/tmp/site:/tmp/raysite:$PWD timeout 420 python3 benchmarks/cluster.py --gpus 1 --slides 8 \
        --side 10000 --tissue 6000 --out "$OUT/cluster" ;;
    wsi)
      mkdir -p "$OUT/wsi"
      timeout 300 python3 benchmarks/wsi.py --readers processes threads --workers 8 --raw-tiles 4096 \
        --out "$OUT/wsi" ;;
  esac
  el "$step $?"
done
