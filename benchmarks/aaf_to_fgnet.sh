#!/usr/bin/env bash
# Face-pretraining on All-Age-Faces, then FG-NET leave-one-person-out fine-tuned from it (issue 10).
#
#   bash benchmarks/aaf_to_fgnet.sh STAGE [STAGE ...]
#
# Stages, in order (each resumes where a killed run stopped: run the same command again):
#   shards      AAF and FG-NET shard sets, one per border in $BORDERS (shards/aaf-<border>, shards/fgnet-<border>)
#   pretrain    one AAF model per border: trained on the authors' train.txt, tested on val.txt
#               (runs/aaf-<border>-pretrain-e<epochs>); val MAE chose the border (6 epochs) and
#               then the epochs (12 against 6), nothing else did
#   carry       the recipe fixed, the model carried forward: the same training on all 13,318 AAF
#               faces (--fold none: both halves, no test), border $BORDER (runs/aaf-<border>-all-e<epochs>)
#   zeroshot    that model on all 1,002 FG-NET photos, no fine-tuning
#   lopo        FG-NET LOPO, all 82 folds, each fine-tuned from that model, one run per row of
#               $ROWS (runs/fgnet-<border>-lopo-<row>-e<epochs>), pooled MAE over the 1,002 predictions
#   table       the rows side by side
#
# Every choice is fixed here, before any FG-NET test fold is seen: the pretraining recipe (64 px,
# $PRE_EPOCHS epochs, cosine, horizontal flips, the ternary loss with every image of a triplet
# supervised) and the fine-tuning one ($FT_EPOCHS epochs, Adam lr $FT_LR, cosine, batch
# $FT_BATCH, horizontal flips: the paper's vertical flips would show the AAF model upside-down faces
# it never saw). BORDER picks the carried-forward model; the default is the one with the lower AAF
# val MAE (see benchmarks/RESULTS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BORDERS=${BORDERS:-"reflect constant"}
BORDER=${BORDER:-reflect}
ROWS=${ROWS:-"paper-fgnet-ternary paper-fgnet-binary mv"}
SIZE=${SIZE:-64}
PRE_EPOCHS=${PRE_EPOCHS:-12}
FT_EPOCHS=${FT_EPOCHS:-1}
FT_LR=${FT_LR:-2e-4}
FT_BATCH=${FT_BATCH:-16}
JOBS=${JOBS:-2}
AAF=${AAF:-../shared/data/aaf/images}
FGNET=${FGNET:-../shared/data/fgnet/images}

stage_shards() {
  for border in $BORDERS; do
    $PY tools/make_shards.py --dataset aaf --root "$AAF" --out "shards/aaf-$border" --border "$border" \
      --workers 2 --device cpu --quiet
    $PY tools/make_shards.py --dataset fgnet --root "$FGNET" --out "shards/fgnet-$border" --border "$border" \
      --workers 2 --device cpu --quiet
  done
}

stage_pretrain() {
  # The borders side by side, one core each (two small-batch processes use two cores better than
  # one process with two threads); one border alone gets both.
  local pids=() threads=1
  [ "$(echo $BORDERS | wc -w)" -gt 1 ] || threads=2
  for border in $BORDERS; do
    OMP_NUM_THREADS=$threads $PY -m agecl.train --shards "shards/aaf-$border" --protocol authors --fold 0 \
      --preset paper-fgnet-ternary --set loss.supervise=triplet --flip horizontal --image-size "$SIZE" \
      --epochs "$PRE_EPOCHS" --lr-schedule cosine --workers $threads --device cpu \
      --out "runs/aaf-$border-pretrain-e$PRE_EPOCHS" --resume --quiet > "runs/aaf-$border-pretrain-e$PRE_EPOCHS.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
  for border in $BORDERS; do tail -n 4 "runs/aaf-$border-pretrain-e$PRE_EPOCHS.log"; done
}

stage_carry() {
  $PY -m agecl.train --shards "shards/aaf-$BORDER" --protocol authors --fold none \
    --preset paper-fgnet-ternary --set loss.supervise=triplet --flip horizontal --image-size "$SIZE" \
    --epochs "$PRE_EPOCHS" --lr-schedule cosine --workers 2 --device cpu \
    --out "runs/aaf-$BORDER-all-e$PRE_EPOCHS" --resume --quiet
}

stage_zeroshot() {
  $PY -m agecl.evaluate --checkpoint "runs/aaf-$BORDER-all-e$PRE_EPOCHS/checkpoint.pt" --shards "shards/fgnet-$BORDER" \
    --all --device cpu
}

stage_lopo() {
  for row in $ROWS; do
    $PY -m agecl.train --shards "shards/fgnet-$BORDER" --protocol lopo --all-folds --jobs "$JOBS" \
      --init-from "runs/aaf-$BORDER-all-e$PRE_EPOCHS/checkpoint.pt" --preset "$row" --flip horizontal \
      --image-size "$SIZE" --epochs "$FT_EPOCHS" --lr "$FT_LR" --lr-schedule cosine --batch-size "$FT_BATCH" \
      --workers 1 --device cpu --out "runs/fgnet-$BORDER-lopo-$row-e$PRE_EPOCHS" --resume --quiet
  done
}

stage_table() {
  $PY - "$BORDER" "$PRE_EPOCHS" $ROWS <<'PY'
import json, sys
from pathlib import Path
border, epochs, rows = sys.argv[1], sys.argv[2], sys.argv[3:]
z = Path(f"runs/aaf-{border}-all-e{epochs}/eval-fgnet-{border}-all/results.json")
if z.is_file():
    r = json.loads(z.read_text())
    print(f"{'zero-shot (AAF model)':24s} MAE {r['test_mae']:.2f}  CS(5) {100 * r['test_cs5']:.1f}%  n {r['n_test']}")
for row in rows:
    f = Path(f"runs/fgnet-{border}-lopo-{row}-e{epochs}/results.json")
    if not f.is_file():
        print(f"{row:24s} not run")
        continue
    r = json.loads(f.read_text())
    p = r["pooled"]
    print(f"{row:24s} MAE {p['mae']:.2f}  CS(5) {100 * p['cs5']:.1f}%  n {p['n']}  baseline "
          f"{r['mean_age_baseline']:.2f}  {r['status']}")
PY
}

[ $# -gt 0 ] || { sed -n '2,20p' "$0"; exit 2; }
for stage in "$@"; do
  "stage_$stage"
done
