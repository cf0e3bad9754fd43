#!/usr/bin/env bash
# One prepared GPU session (see benchmarks/gpu_session.py): every native check of vlcore within a time budget.
#
#   bash benchmarks/gpu_session.sh "$OUT" --budget 530          # on the GPU machine (carry .whl/)
#   bash benchmarks/gpu_session.sh /tmp/session --dry-run        # CPU counterpart of every stage, here
#
# Before the Python session starts, the wheels carried in .whl/ (benchmarks/fetch_wheels.sh: xformers,
# open_clip_torch and the pure deps the device image lacks) are installed with --no-index --no-deps into a
# --target folder put on PYTHONPATH, so every stage sees them and the image's own packages stay untouched.
set -u
OUT_DIR="${1:-}"
if [ -z "$OUT_DIR" ] || [ "${OUT_DIR#-}" != "$OUT_DIR" ]; then
  echo "usage: bash benchmarks/gpu_session.sh OUT [--budget SECONDS] [--only STAGES] [--dry-run]" >&2
  exit 2
fi
shift
mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)" || exit 2  # absolute before leaving the caller's folder
cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-$(command -v python3 || command -v python)}"
DRY=0
for a in "$@"; do [ "$a" = "--dry-run" ] && DRY=1; done
mkdir -p "$OUT_DIR/stages/wheels"
shopt -s nullglob
WHEELS=(.whl/*.whl)
if [ "$DRY" = 0 ] && [ "${#WHEELS[@]}" -gt 0 ]; then
  SITE="${VLCORE_WHEEL_SITE:-/tmp/vlcore_site}"
  if timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
       --target "$SITE" "${WHEELS[@]}" > "$OUT_DIR/stages/wheels/install.log" 2>&1; then
    echo "installed ${#WHEELS[@]} wheels into $SITE: ${WHEELS[*]}" >> "$OUT_DIR/stages/wheels/install.log"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "wheel install FAILED (see above); the peers are missing in this session" >> "$OUT_DIR/stages/wheels/install.log"
  fi
fi
exec "$PY" benchmarks/gpu_session.py "$OUT_DIR" "$@"
