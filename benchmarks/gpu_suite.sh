#!/usr/bin/env bash
# The GPU suite as one command (see benchmarks/gpu_suite.py for what it measures
# and its time budget: about 5 minutes on one H100).
#
#   benchmarks/gpu_suite.sh [--data DIR] [--wheels DIR] [--out DIR] [--dry-run] [suite options]
#
#   --data DIR    folder with imagenet-sample-500.tar and cifar10-jpeg.tar.gz
#                 (default: $SHARDFLOW_SHARED_DATA, else ../shared/data next to the repo)
#   --wheels DIR  install the Python wheels found there first, offline, into a temp
#                 folder: *.whl files, or the part-* files of a split wheel tar
#                 (as ../shared/device/dali-parts.sh makes), in DIR or one level down.
#                 A bare GPU machine needs DALI (CUDA 13 build), braceexpand and webdataset.
#   --out DIR     results folder (default: $OUT if set, else benchmarks/results)
#   --dry-run     the whole flow on the CPU with tiny sizes (no GPU needed)
#
# Nothing is downloaded: pip runs with --no-index. A missing GPU, DALI, package or
# dataset stops the run before any work, with one line saying what is missing.
set -euo pipefail

die() { echo "gpu_suite: $*" >&2; exit 2; }
abspath() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
wheels=""
out="${OUT:-}"
pass=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) [ $# -ge 2 ] || die "--wheels needs a folder"; wheels="$2"; shift 2 ;;
    --data) [ $# -ge 2 ] || die "--data needs a folder"
            [ -d "$2" ] || die "--data $2 is not a folder"
            export SHARDFLOW_SHARED_DATA; SHARDFLOW_SHARED_DATA="$(abspath "$2")"; shift 2 ;;
    --out) [ $# -ge 2 ] || die "--out needs a folder"; out="$2"; shift 2 ;;
    # Paths are the caller's, but the suite runs from the repository's root.
    --work-dir) [ $# -ge 2 ] || die "--work-dir needs a folder"
                pass+=("$1" "$(abspath "$2")"); shift 2 ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) pass+=("$1"); shift ;;
  esac
done
out="$(abspath "${out:-$repo/benchmarks/results}")"

if [ -n "${PYTHON:-}" ]; then py="$PYTHON"
elif [ -x "$repo/.venv/bin/python" ]; then py="$repo/.venv/bin/python"
else py="python3"; fi
command -v "$py" >/dev/null 2>&1 || die "no Python interpreter '$py' (set PYTHON)"

if [ -n "$wheels" ]; then
  [ -d "$wheels" ] || die "--wheels $wheels is not a folder"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  mkdir -p "$tmp/whl" "$tmp/site"
  # Parts of a split tar (dali-parts.sh): joined in the order of their names.
  mapfile -t parts < <(find "$wheels" -maxdepth 2 -type f -name 'part-*' -printf '%f\t%p\n' \
                       | sort | cut -f2-)
  if [ "${#parts[@]}" -gt 0 ]; then
    cat "${parts[@]}" | tar -x -C "$tmp/whl" || die "the part-* files in $wheels do not form a tar"
  fi
  find "$wheels" -maxdepth 2 -type f -name '*.whl' -exec cp {} "$tmp/whl/" \;
  compgen -G "$tmp/whl/*.whl" >/dev/null || die "no wheels (*.whl or part-*) in $wheels"
  "$py" -m pip install -q --no-index --no-deps --no-compile --target "$tmp/site" "$tmp"/whl/*.whl \
    || die "installing the wheels from $wheels failed (see pip's message above)"
  export PYTHONPATH="$tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  # DALI's CUDA 13 build finds nvJPEG/nvimgcodec there, and NPP in the toolkit.
  export LD_LIBRARY_PATH="$tmp/site/nvidia/cu13/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

cd "$repo"
export PYTHONUNBUFFERED=1
"$py" -m benchmarks gpu --out "$out" "${pass[@]}"
