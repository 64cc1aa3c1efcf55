#!/usr/bin/env bash
# Create .venv and install histo-robust into it (editable).
#
#   bash setup.sh         the serving install: ONNX Runtime, BentoML, OpenSlide, Pillow; no torch.
#                         Enough for `histo-robust slides` and `histo-robust serve`.
#   bash setup.sh --dev   everything: training (torch, timm, onnx), the test tools, and the system
#                         packages the tests need (apt, as root or through sudo).
#
# Re-running it is cheap: pip skips what is already installed. A serving install never removes
# what a --dev install added.
set -euo pipefail
cd "$(dirname "$0")"

MODE=serve
case "${1:-}" in
  "") ;;
  --dev) MODE=dev ;;
  -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "setup.sh: unknown option '$1' (use --dev for the full test install)" >&2; exit 2 ;;
esac

# System packages the test suite needs (--dev only), one entry per line.
DEV_SYSTEM_PACKAGES=(
  chromium         # tests/test_review.py: the review page in a real headless browser
  chromium-driver
)

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip

if [ "$MODE" = serve ]; then
  .venv/bin/python -m pip install --quiet -e ".[serve]"
  echo "setup done (serving): $(.venv/bin/python --version), onnxruntime $(.venv/bin/python -c 'import onnxruntime; print(onnxruntime.__version__)')"
  exit 0
fi

if [ "${#DEV_SYSTEM_PACKAGES[@]}" -gt 0 ]; then
  missing=()
  for pkg in "${DEV_SYSTEM_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
fi
.venv/bin/python -m pip install --quiet -e ".[all]"
echo "setup done (dev): $(.venv/bin/python --version), torch $(.venv/bin/python -c 'import torch; print(torch.__version__)')"
