#!/usr/bin/env bash
# The main job on an embedded default, end to end on the CPU:
#   1. create .venv and install shardflow (+ DALI, used on the CPU here);
#   2. generate a small labelled image dataset (no download);
#   3. pack it into verified tar shards with `shard pack`;
#   4. train seed_cnn with `torchrun --nproc-per-node 2 -m train` (gloo, DALI CPU);
#   5. print a short summary.
# Everything goes under .demo/ (delete it to start over). Set EPOCHS or
# BACKEND (dali-cpu | torch) to change the run.
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS="${EPOCHS:-8}"
BACKEND="${BACKEND:-dali-cpu}"
DEMO=.demo
start=$(date +%s)

bash scripts/bootstrap.sh dali
export PATH="$PWD/.venv/bin:$PATH"

echo "== 1/3 generating 10 classes x 600 images (32 px) and 10 x 100 for validation"
rm -rf "$DEMO"
shard synth "$DEMO/images/train" --classes 10 --per-class 600 --size 32 --seed 0
shard synth "$DEMO/images/val" --classes 10 --per-class 100 --size 32 --seed 1

echo "== 2/3 packing shards"
shard pack "$DEMO/images/train" "$DEMO/shards/train" --max-count 1000 --shuffle --seed 0 --workers 2
shard pack "$DEMO/images/val" "$DEMO/shards/val" --max-count 1000 --workers 2
shard verify "$DEMO/shards/train"

echo "== 3/3 training: torchrun --nproc-per-node 2 -m train (CPU, gloo, $BACKEND)"
OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 --standalone -m train \
  --data "$DEMO/shards/train" --val-data "$DEMO/shards/val" \
  --model seed_cnn --backend "$BACKEND" --epochs "$EPOCHS" --batch-size 128 \
  --optimizer sgd --lr 0.05 --schedule onecycle --num-workers 1 \
  --out "$DEMO/run"

python - "$DEMO" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
from pathlib import Path
from shard_tools.format import read_manifest
demo, wall = Path(sys.argv[1]), sys.argv[2]
m = read_manifest(str(demo / "shards" / "train"))
events = [json.loads(line) for line in (demo / "run" / "metrics.jsonl").read_text().splitlines()]
summary = [e for e in events if e["event"] == "summary"][-1]
print("\n== summary")
print(f"dataset   {m.samples} training samples in {len(m.shards)} shards, {m.num_classes} classes, {m.bytes / 1e6:.1f} MB")
acc = summary.get("top1")
print(f"accuracy  {acc * 100:.1f}% top-1 on {read_manifest(str(demo / 'shards' / 'val')).samples} validation images" if acc is not None else "accuracy  n/a")
print(f"speed     {summary.get('train_img_per_s', float('nan')):,.0f} img/s (2 ranks, CPU)")
print(f"run dir   {demo / 'run'} (metrics.jsonl, config.json, checkpoints/)")
print(f"wall      {wall} s in all")
PY
