#!/usr/bin/env bash
# Reproduce the transfer / distillation / pruning table on CIFAR-10 (CPU is enough).
#
#   train/experiments/article_techniques.sh [WORK_DIR]
#
# Budgets (environment, equal across compared runs): PRE_EPOCHS (pretraining on
# classes 0-4, for each of TL_MODELS), FT_EPOCHS (10% of classes 5-9: scratch/features/finetune), KD_EPOCHS
# (student with/without teacher), TEACHER_EPOCHS, LONG_TEACHER_EPOCHS, PRUNE_FT_EPOCHS, SEEDS ("0 1"),
# BACKEND (dali-cpu), NPROC (1 = plain process; >1 = torchrun), STAGES (a subset of
# "transfer distill prune"). Results land in
# WORK_DIR/results.md (and per-run metrics.jsonl under WORK_DIR/runs).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PY:-$REPO/.venv/bin/python}
SHARD=${SHARD:-$(dirname "$PY")/shard}
WORK=${1:-$(mktemp -d /tmp/article-techniques.XXXX)}
DATA_TGZ=${DATA_TGZ:-$REPO/../shared/data/cifar10-jpeg.tar.gz}
PRE_EPOCHS=${PRE_EPOCHS:-30}            # seed_cnn (15 epochs: features +3.75, finetune +5.12)
PRE_EPOCHS_WIDE=${PRE_EPOCHS_WIDE:-15}  # other TL_MODELS: ~10x the compute per image
FT_EPOCHS=${FT_EPOCHS:-10}
KD_EPOCHS=${KD_EPOCHS:-30}  # 5 epochs: +0.36, 15: +0.25 (alpha 0.5, T 2)
# alpha 0.7 at T 4 (soft term weighted 11x) killed seed_cnn's ReLUs at this lr: 10% top-1.
KD_ALPHA=${KD_ALPHA:-0.5}
KD_T=${KD_T:-2}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-5}
# A second, longer-trained teacher for the same students (0 = skip); the pruning
# rows use the first.
LONG_TEACHER_EPOCHS=${LONG_TEACHER_EPOCHS:-15}
PRUNE_FT_EPOCHS=${PRUNE_FT_EPOCHS:-1}       # global magnitude (masks kept), lr 0.01
# Removing whole filters costs more than zeroing weights: 1 epoch at lr 0.01
# left seed_cnn 6.7 points down, 2 epochs at lr 0.05 4.0; it gets as many
# epochs as its dense training had (KD_EPOCHS) at the training lr.
PRUNE_CH_FT_EPOCHS=${PRUNE_CH_FT_EPOCHS:-$KD_EPOCHS}
PRUNE_CH_LR=${PRUNE_CH_LR:-0.05}
SEEDS=${SEEDS:-"0 1"}
BACKEND=${BACKEND:-dali-cpu}
NPROC=${NPROC:-1}
BATCH=${BATCH:-128}
LR=${LR:-0.05}
TEACHER_MODEL=${TEACHER_MODEL:-cifar_fast_s}
TL_MODELS=${TL_MODELS:-"seed_cnn cifar_fast_s"}
STAGES=${STAGES:-"transfer distill prune"}  # a subset runs only those parts
stage() { [[ " $STAGES " == *" $1 "* ]]; }

SRC_CLASSES=airplane,automobile,bird,cat,deer
TGT_CLASSES=dog,frog,horse,ship,truck
mkdir -p "$WORK/runs" "$WORK/data"
cd "$REPO"

if [ ! -d "$WORK/cifar/train" ]; then
    mkdir -p "$WORK/cifar"
    tar xzf "$DATA_TGZ" -C "$WORK/cifar"
fi
C="$WORK/cifar"
D="$WORK/data"

pack() {  # DEST SRC [pack flags...]
    local dest=$1 src=$2; shift 2
    [ -f "$dest/manifest.json" ] || "$SHARD" pack "$src" "$dest" --workers 2 --no-validate "$@" >/dev/null
}
# Training sets are packed shuffled: the loader's shard shuffle and 4096-sample
# buffer cannot mix shards that each hold one class.
pack "$D/src-train" "$C/train" --classes "$SRC_CLASSES" --shuffle --seed 0
pack "$D/tgt-test" "$C/test" --classes "$TGT_CLASSES"
pack "$D/all-train" "$C/train" --shuffle --seed 0
pack "$D/all-test" "$C/test"
for s in $SEEDS; do pack "$D/tgt-train-10pct-s$s" "$C/train" --classes "$TGT_CLASSES" --fraction 0.1 --shuffle --seed "$s"; done

train() {  # OUT [trainer flags...]: skipped when the run already finished
    local out=$1; shift
    if grep -q '"event": "summary"' "$out/metrics.jsonl" 2>/dev/null; then return; fi
    rm -rf "$out"
    local launcher=("$PY" -m train)
    [ "$NPROC" -gt 1 ] && launcher=("$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m train)
    # The CIFAR recipe (SGD + Nesterov, weight decay, one-cycle, pad+crop+flip) for
    # every run; the flags after it override its model, budget and batch.
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} "${launcher[@]}" --config "$REPO/train/recipes/cifar_seed_cnn.toml" \
        --backend "$BACKEND" --num-workers 2 \
        --batch-size "$BATCH" --lr "$LR" --log-every-steps 1000 --keep-checkpoints 1 --out "$out" "$@" \
        > "$out.log" 2>&1 || { echo "failed: $out (see $out.log)"; tail -3 "$out.log"; exit 1; }
}
last_ckpt() { ls "$1"/checkpoints/step-*.pt | tail -1; }
# The classifier's lr multiplier when it trains alone on frozen features.
# cifar_fast* scale their logits by 1/9, so a head trained alone moves 81x slower
# than a plain linear layer would (5-epoch source, seed 0: x1 68.3%, x10 73.3%,
# x81 75.2%); seed_cnn's has no such scale (x1 62.9%, x10 62.8%, fc3 alone).
features_head_lr() { case $1 in cifar_fast*) echo 81 ;; *) echo 1 ;; esac; }
R="$WORK/runs"

# Transfer: pretrain on classes 0-4, then 10% of classes 5-9 three ways, for
# each model in TL_MODELS (the article's tiny seed_cnn learns little it could
# not learn again from 2,500 images; a wider net is where transfer pays).
if stage transfer; then
    for m in $TL_MODELS; do
        pre_epochs=$PRE_EPOCHS
        [ "$m" = seed_cnn ] || pre_epochs=$PRE_EPOCHS_WIDE
        train "$R/pretrain-$m" --model "$m" --data "$D/src-train" --epochs "$pre_epochs" --eval-every-epochs 0
        PRE=$(last_ckpt "$R/pretrain-$m")
        for s in $SEEDS; do
            common=(--model "$m" --data "$D/tgt-train-10pct-s$s" --val-data "$D/tgt-test" --epochs "$FT_EPOCHS" --seed "$s" --eval-every-epochs 0)
            train "$R/tl-$m-scratch-s$s" "${common[@]}"
            train "$R/tl-$m-features-s$s" "${common[@]}" --init-from "$PRE" --transfer features --head-lr-mult "$(features_head_lr "$m")"
            train "$R/tl-$m-finetune-s$s" "${common[@]}" --init-from "$PRE" --transfer finetune --backbone-lr-mult 0.1
            train "$R/tl-$m-finetune1x-s$s" "${common[@]}" --init-from "$PRE" --transfer finetune --backbone-lr-mult 1
        done
    done
fi

if stage distill || stage prune; then
# Distillation: a stronger teacher, then seed_cnn with and without it.
train "$R/teacher" --model "$TEACHER_MODEL" --data "$D/all-train" --val-data "$D/all-test" --epochs "$TEACHER_EPOCHS" --eval-every-epochs 0
TEACHER=$(last_ckpt "$R/teacher")
for s in $SEEDS; do
    common=(--model seed_cnn --data "$D/all-train" --val-data "$D/all-test" --epochs "$KD_EPOCHS" --seed "$s" --eval-every-epochs 0)
    train "$R/kd-none-s$s" "${common[@]}"
    train "$R/kd-teacher-s$s" "${common[@]}" --teacher "$TEACHER" --kd-alpha "$KD_ALPHA" --kd-temperature "$KD_T"
done
if [ "$LONG_TEACHER_EPOCHS" -gt 0 ]; then
    train "$R/teacher-long" --model "$TEACHER_MODEL" --data "$D/all-train" --val-data "$D/all-test" --epochs "$LONG_TEACHER_EPOCHS" --eval-every-epochs 0
    for s in $SEEDS; do
        train "$R/kd-teacher-long-s$s" --model seed_cnn --data "$D/all-train" --val-data "$D/all-test" --epochs "$KD_EPOCHS" --seed "$s" --eval-every-epochs 0 \
            --teacher "$(last_ckpt "$R/teacher-long")" --kd-alpha "$KD_ALPHA" --kd-temperature "$KD_T"
    done
fi
fi

if stage prune; then
# Pruning: the teacher at 50% global sparsity + a short fine-tune with masks kept;
# seed_cnn (the no-teacher seed-0 run) with 30% of its channels removed + its fine-tune.
# CPU inference is timed on 1 thread: 2 threads run seed_cnn slower than 1 here.
"$PY" -m train.prune --checkpoint "$TEACHER" --method global-magnitude --sparsity 0.5 \
    --out "$WORK/teacher-gm50.pt" --threads 1 --bench-repeats 9 --json > "$WORK/prune-gm50.json"
train "$R/prune-gm50-ft" --model "$TEACHER_MODEL" --data "$D/all-train" --val-data "$D/all-test" \
    --epochs "$PRUNE_FT_EPOCHS" --init-from "$WORK/teacher-gm50.pt" --keep-masks --backbone-lr-mult 1 --lr 0.01
# The teacher with 30% of the channels of each conv removed (a smaller dense net)
# and fine-tuned for its own training budget at the training lr.
"$PY" -m train.prune --checkpoint "$TEACHER" --method structured-channels --sparsity 0.3 \
    --out "$WORK/teacher-ch30.pt" --threads 1 --bench-repeats 9 --json > "$WORK/prune-teacher-ch30.json"
train "$R/prune-teacher-ch30-ft" --model "$TEACHER_MODEL" --data "$D/all-train" --val-data "$D/all-test" \
    --epochs "$TEACHER_EPOCHS" --init-from "$WORK/teacher-ch30.pt" --backbone-lr-mult 1 --lr "$PRUNE_CH_LR"
S0=$(last_ckpt "$R/kd-none-s${SEEDS%% *}")
"$PY" -m train.prune --checkpoint "$S0" --method structured-channels --sparsity 0.3 \
    --out "$WORK/seed-ch30.pt" --threads 1 --bench-repeats 9 --json > "$WORK/prune-ch30.json"
train "$R/prune-ch30-ft" --model seed_cnn --data "$D/all-train" --val-data "$D/all-test" \
    --epochs "$PRUNE_CH_FT_EPOCHS" --init-from "$WORK/seed-ch30.pt" --backbone-lr-mult 1 --lr "$PRUNE_CH_LR"
fi

"$PY" "$REPO/train/experiments/table.py" "$WORK" --seeds $SEEDS > "$WORK/results.md"
cat "$WORK/results.md"
