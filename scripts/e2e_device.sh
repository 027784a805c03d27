#!/usr/bin/env bash
# End-to-end runs of the glm_image configs on a bare GPU machine (docs/performance.md, "Whole jobs at release
# shape"). Run from the repository root; expects the packed site-packages (ray + the packages the machine
# lacks) in $WHL; writes the release-shaped pipeline once to $REL (reused while the machine stays up).
#   WHL=.whl12 OUT=/tmp/out scripts/e2e_device.sh ARGS-FOR-benchmarks.end_to_end...
set -uo pipefail
WHL=${WHL:-.whl12}; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ ! -d /tmp/site/ray ]; then
  mkdir -p /tmp/site && for f in "$WHL"/*.tar.xz; do tar -xJf "$f" -C /tmp/site; done
fi
mkdir -p /tmp/pkg/tandem
for d in rl policies rewards core configs data; do ln -sfn "$PWD/$d" "/tmp/pkg/tandem/$d"; done
export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_AUTH_MODE=disabled
# The pipeline (34 GB bf16) goes to RAM-backed /dev/shm when it has room, else to disk.
avail=$(df -BG --output=avail /dev/shm | tail -1 | tr -dc 0-9)
base=$([ "${avail:-0}" -gt 60 ] && echo /dev/shm || echo /tmp)
REL=${REL:-$base/rel}
if [ ! -f "$REL/model_index.json" ]; then
  rm -rf "$REL" "$REL.partial" "$REL-x"
  /usr/bin/time -v python3 scripts/make_release_pipeline.py "$REL" --extras "$REL-x" 2>"$OUT/make.err" | tee "$OUT/make.json"
  grep -E "Elapsed|Maximum resident" "$OUT/make.err"; du -sh "$REL" "$REL-x"
fi
[ "${1:-}" = "--build-only" ] && exit 0
python3 -m benchmarks.end_to_end --model "$REL" --extras "$REL-x" "$@"
