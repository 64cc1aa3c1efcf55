#!/usr/bin/env bash
# Time the README's two setup commands on a fresh clone of this repository (not the working tree's
# .venv): the serving install + the slide job, then the full test install. Prints the figures and
# writes them to benchmarks/results/install.txt (or $OUT). The test suite itself is not run here.
#
#   bash benchmarks/install.sh [CLONE_DIR]
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$REPO/benchmarks/results/install.txt}"
CLONE="${1:-$(mktemp -d /tmp/histo-robust-fresh-XXXX)}"
git clone -q "$REPO" "$CLONE"
cd "$CLONE"
commit="$(git rev-parse --short HEAD)"

start=$(date +%s.%N)
bash setup.sh >/dev/null 2>"$CLONE/setup-serve.log"
.venv/bin/histo-robust slides tests/fixtures/CMU-1-Small-Region.svs --out runs/demo --no-progress 2>>"$CLONE/setup-serve.log"
first=$(echo "$(date +%s.%N) - $start" | bc)
torch=$(.venv/bin/python -c 'import importlib.util as u; print("yes" if u.find_spec("torch") else "no")')
serve_size=$(du -sh .venv | cut -f1)
outputs=$(ls runs/demo/CMU-1-Small-Region | tr '\n' ' ')

start=$(date +%s.%N)
bash setup.sh --dev >/dev/null 2>"$CLONE/setup-dev.log"
dev=$(echo "$(date +%s.%N) - $start" | bc)
dev_size=$(du -sh .venv | cut -f1)

{
  echo "fresh clone of $commit, $(nproc) cores, load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
  printf 'bash setup.sh && histo-robust slides (bundled slide): %.0f s; torch installed: %s; .venv %s; outputs: %s\n' \
    "$first" "$torch" "$serve_size" "$outputs"
  printf 'bash setup.sh --dev (after the first command): %.0f s; .venv %s\n' "$dev" "$dev_size"
} | tee "$OUT"
