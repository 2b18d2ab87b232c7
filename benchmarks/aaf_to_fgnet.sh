#!/usr/bin/env bash
# Face-pretraining on All-Age-Faces, then FG-NET leave-one-person-out fine-tuned from it (issue 10).
#
#   bash benchmarks/aaf_to_fgnet.sh STAGE [STAGE ...]
#
# Stages, in order (each resumes where a killed run stopped: run the same command again):
#   shards      AAF and FG-NET shard sets, one per frame: each border in $BORDERS at each coverage in
#               $COVERAGES (shards/aaf-<frame>, shards/fgnet-<frame>; frame: reflect-cov1.0, reflect)
#   pretrain    one AAF model per frame: trained on the authors' train.txt, tested on val.txt
#               (runs/aaf-<frame>-pretrain-e<epochs>); val MAE chose the border (6 epochs), the
#               epochs (12 against 6), the input side and the coverage, nothing else did
#   carry       the recipe fixed, the model carried forward: the same training on all 13,318 AAF
#               faces (--fold none: both halves, no test), frame $BORDER at $COVERAGE (runs/aaf-<frame>-all-e<epochs>)
#   zeroshot    that model on all 1,002 FG-NET photos, no fine-tuning
#   lopo        FG-NET LOPO, all 82 folds, each fine-tuned from that model, one run per row of
#               $ROWS (runs/fgnet-<frame>-lopo-<row>-e<epochs>), pooled MAE over the 1,002 predictions;
#               each fold tested with the mirror as it finishes (--tta flip), the keep stage's folds
#               restored first (a row takes more than a session on a slow CPU)
#   select      the fine-tuning's length (FT_EPOCHS), chosen on FG-NET people outside each LOPO
#               fold's test person (nested: two halves, each chosen on the other); then lopo again
#   replay      FG-NET and AAF combined into one shard set (shards/fgnet+aaf-<border>), with splits
#               that add REPLAY x (a fold's FG-NET training faces) random AAF faces to every
#               training part (<split>-replay<REPLAY>); with REPLAY set, select and lopo fine-tune
#               on those (their folders end in -replay<REPLAY>): AAF's adults stay in view while
#               FG-NET's young faces are learnt; REPLAY_FROM=<age> replays only AAF faces of that
#               age and over (-replay<REPLAY>-from<age>)
#   flip        every finished model above scored again with each test face's mirror averaged in
#               (--tta flip) into <run>-flip: AAF val and the select stage's halves (where the
#               choice is made), then the LOPO rows; the fine-tuning is not repeated
#   wise        WiSE-FT: the select halves' models blended back towards the AAF model (agecl-eval
#               --wise-ft W, W of $WISE_CHOICES, with the mirror) into <run>-flip-wise<W>; with WISE set
#               (the choice), the LOPO rows too
#   calibrate   every prediction of the select halves (with the mirror) and of the LOPO rows mapped
#               by a line fitted on the other half's held-out predictions (benchmarks/calibrate.py;
#               agecl.calibration): one for each kind in $CAL_KINDS, into <run>-flip-cal-<kind>;
#               the select halves say whether it helps, with no LOPO test person in any fit
#   stack       the select halves and the LOPO rows (with the mirror) stacked with the AAF model's own
#               prediction of each photo (zero-shot, with the mirror; it never saw FG-NET): age = a +
#               b x fine-tuned + c x AAF model, the plane fitted on the other half's people
#               (benchmarks/calibrate.py --with), into <run>-flip-stack; the select halves, each
#               stacked by the other's plane, say whether it helps
#   ensemble    the AAF models of the seeds in $PRE_SEEDS (each pretrained with PRE_SEED=<seed>, and
#               its select halves and LOPO rows fine-tuned from it), their predictions with the mirror
#               averaged face by face (benchmarks/average_runs.py) into the same folder names with
#               -pseeds<a>+<b> for the pretraining's seed (…-e12-pseeds0+1-ft16-flip): the select
#               halves say whether averaging models trained apart helps; the LOPO rows when all ran.
#               An entry <coverage>:<seed> is the model of another face frame (PRE_SEEDS="1.0:0 1.4:0
#               1.4:1"); the average is then named -models<coverage>s<seed>+… (…-e12-models1.0s0+1.4s0-ft16-flip)
#   keep        the LOPO rows' pooled predictions (as trained, with the mirror, stacked) copied into
#               benchmarks/kept/<run folder>/ (benchmarks/keep_run.py; about 30 KB a row), for git:
#               runs/ has not outlived its machine, and later comparisons need the faces' predictions;
#               and every finished LOPO fold, row finished or not, into $KEPT_FOLDS/<run folder>/fold-<k>/
#               (about 6 KB a fold), which the lopo stage restores: run it, and commit, before a
#               session ends with a row unfinished
#   table       the rows side by side
#
# FREEZE=<stage> fine-tunes with the backbone held fixed from the stem up to that stage (agecl-train
# --freeze; select and lopo, folders ending in -freeze-<stage>): cheaper steps (the backward pass
# stops there), and the AAF model's early features kept.
# FT_SUPERVISE: the images the fine-tuning's cross-entropy and mean-variance supervise. triplet (the
# default; --set loss.supervise=triplet, as the pretraining does; folders end in -supervise-triplet):
# every image of a triplet, better than the anchors alone on both select halves with two seeds each
# (6.07-6.41 against 6.30-6.59, ninth session); anchor: the presets' and the paper's (no folder suffix).
# FT_BALANCE=<b> fine-tunes with the age terms weighted by (images of that age / mean)^-b
# (--set loss.balance=b; folders end in -balance<b>): FG-NET's few adults otherwise learn to be young.
# FT_LR=<lr> fine-tunes with another learning rate than 2e-4 (folders end in -lr<lr>).
# FT_GREY=<p> fine-tunes with each training image shown in greyscale with probability p (agecl-train
# --grey; folders end in -grey<p>): about a fifth of FG-NET's photos are greyscale scans.
# FT_SEED=<n> fine-tunes with another seed (folders end in -seed<n>): how far two seeds of one
# recipe differ is the yardstick for a difference between recipes.
# PRE_SEED=<n> pretrains the AAF model with another seed (its folder and every run fine-tuned from it
# carry -pseed<n>: aaf-reflect-all-e12-pseed1, fgnet-reflect-select-a-...-e12-pseed1-ft16): a second
# model trained apart, whose fine-tuned predictions can be averaged with the first's
# (benchmarks/average_runs.py).
# FROM=pretrain fine-tunes from the pretrain stage's model (trained on train.txt alone) rather than
# the carried-forward one (FROM=all, trained on all 13,318 faces): half the pretraining, for comparing
# pretraining recipes on FG-NET's select halves; folders name it (...-e3-s96-from-pretrain-ft8).
# SIZE=<px> pretrains and fine-tunes at that input side (the issue allows 64-128). The default, 96,
# was chosen on AAF val at 12 epochs (64 px 6.74, 96 px 6.00, 128 px 6.06 with the mirror; see
# benchmarks/RESULTS.md, thirteenth session). A side other than 64 px is named in every run folder
# after the pretraining's epochs (aaf-reflect-all-e12-s96, fgnet-reflect-lopo-...-e12-s96-ft8), so
# runs at two sizes never resume one another; SIZE=64 reproduces the earlier sessions' folders.
# Every choice is fixed here, before any FG-NET test fold is seen: the pretraining recipe ($SIZE px,
# $PRE_EPOCHS epochs, cosine, horizontal flips, the ternary loss with every image of a triplet
# supervised) and the fine-tuning one ($FT_EPOCHS epochs, Adam lr $FT_LR, cosine, batch
# $FT_BATCH, horizontal flips: the paper's vertical flips would show the AAF model upside-down faces
# it never saw). BORDER picks the carried-forward model; the default is the one with the lower AAF
# val MAE (see benchmarks/RESULTS.md). FT_EPOCHS is the select stage's choice: 16 for the ternary
# row, both halves, of 1, 2, 4, 8, 16 (the seventh session's 8-epoch row chose among 1-8; the
# sixth session's rows used 1, fixed a priori). The test faces are scored with their mirror
# averaged in (the flip stage; chosen on AAF val and the select halves).
# JOBS: on the 2-core AMX CPU one two-thread process (JOBS=1) fine-tunes about as fast as two
# one-thread ones (268 against 2 x 145 img/s at batch 16); on the 2-core Zen 5 EPYC two one-thread
# ones are 13 % faster at 96 px (2 x 157 against 276 img/s), hence the default, 2.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BORDERS=${BORDERS:-"reflect constant"}
BORDER=${BORDER:-reflect}
# The face frame's coverage (make_shards.py --coverage: how far the aligned frame reaches beyond the
# ArcFace template's tight face). COVERAGE picks the carried-forward model's; the shards and pretrain
# stages build and compare each of COVERAGES. The default, 1.0, was chosen on AAF val at 64 px
# (with the mirror: 1.8 7.77, 1.4 6.77, 1.2 6.50, 1.0 6.12, 0.8 6.04, the last two unresolved) and
# on FG-NET's select halves (1.4 5.55 / 5.94, 1.0 4.94 / 6.10, 0.8 5.34 / 6.24); every run before
# the twenty-third session used the builder's default, 1.4 (COVERAGE=1.4 reproduces them). A
# coverage other than 1.4 is named with the border in every shard set and run folder
# (aaf-reflect-cov1.0, fgnet-reflect-cov1.0-lopo-...), so frames never mix.
COVERAGE=${COVERAGE:-1.0}
COVERAGES=${COVERAGES:-$COVERAGE}
frame_of() { echo "$1$([ "$2" = 1.4 ] || echo "-cov$2")"; }  # border, coverage -> aaf-<frame>, fgnet-<frame>
FRAME=$(frame_of "$BORDER" "$COVERAGE")
ROWS=${ROWS:-"paper-fgnet-ternary paper-fgnet-binary mv"}
SIZE=${SIZE:-96}
PRE_EPOCHS=${PRE_EPOCHS:-12}
PRE_SEED=${PRE_SEED:-0}  # the pretraining's seed (the head's init, the triplets, the augmentation)
# The pretraining in run names: its epochs, its input side when not 64 px, its seed when not 0
# (e12, e12-s128, e12-pseed1); a name in place of the seed names an average of several (e12-pseeds0+1).
pre_of() {
  local seed=$1
  case $seed in (*[!0-9]*) ;; (0) seed= ;; (*) seed=pseed$seed ;; esac
  echo "e$PRE_EPOCHS$([ "$SIZE" = 64 ] || echo "-s$SIZE")${seed:+-$seed}"
}
PRE=$(pre_of "$PRE_SEED")
PRE_SEEDS=${PRE_SEEDS:-"0 1"}  # the ensemble stage's AAF models, by pretraining seed
FROM=${FROM:-all}  # the AAF model fine-tuned from: all (the carry stage's) or pretrain (train.txt alone)
SRC_RUN=runs/aaf-$FRAME-$FROM-$PRE  # that model's folder
# Its name in the fine-tuned runs' folders (e12, e12-s128-from-pretrain), for any pretraining seed.
src_of() { echo "$(pre_of "$1")$([ "$FROM" = all ] || echo "-from-$FROM")"; }
SRC=$(src_of "$PRE_SEED")
# The ensemble stage's runs: -pseeds0+1 for seeds of this frame, -models1.0s0+1.4s0 where frames are named.
case $PRE_SEEDS in
  (*:*) ENS_SRC=$(src_of "models$(for m in $PRE_SEEDS; do echo "${m%%:*}s${m#*:}"; done | paste -sd+)") ;;
  (*) ENS_SRC=$(src_of "pseeds$(echo $PRE_SEEDS | tr ' ' '+')") ;;
esac
FT_EPOCHS=${FT_EPOCHS:-16}
FT_LR=${FT_LR:-2e-4}
FT_BATCH=${FT_BATCH:-16}
JOBS=${JOBS:-2}
FT_CHOICES=${FT_CHOICES:-"1 2 4 8 16"}  # the select stage's candidates for FT_EPOCHS
SELECT_ROW=${SELECT_ROW:-paper-fgnet-ternary}
WISE=${WISE:-1}  # the wise stage's weight of the fine-tuned model (1: as fine-tuned)
WISE_CHOICES=${WISE_CHOICES:-"0.5 0.6 0.7 0.8 0.9"}  # its candidates, scored on the select halves
CAL_KINDS=${CAL_KINDS:-"linear log"}  # the calibrate stage's lines (agecl.calibration.KINDS)
FT_SUPERVISE=${FT_SUPERVISE:-triplet}  # fine-tuning: the images the age terms supervise (triplet: all three; anchor: the presets')
FT_BALANCE=${FT_BALANCE:-0}  # fine-tuning: the age balance's exponent (loss.balance; 0: every image alike)
FT_GREY=${FT_GREY:-0}  # fine-tuning: the probability of a greyscale training image (agecl-train --grey)
FT_SEED=${FT_SEED:-0}  # fine-tuning: the seed of the head's fresh rows, the triplets and the augmentation
FREEZE=${FREEZE:-}  # fine-tuning: the backbone held fixed up to this stage (agecl-train --freeze; "": none)
REPLAY=${REPLAY:-0}  # AAF faces replayed while fine-tuning, per FG-NET training face (0: none)
REPLAY_FROM=${REPLAY_FROM:-0}  # the youngest age among the AAF faces replayed (0: any age)
KEPT_FOLDS=${KEPT_FOLDS:-benchmarks/kept/folds}  # the keep stage's finished LOPO folds, restored by the lopo stage
AAF=${AAF:-../shared/data/aaf/images}
FGNET=${FGNET:-../shared/data/fgnet/images}

stage_shards() {
  local border cov frame
  for border in $BORDERS; do
    for cov in $COVERAGES; do
      frame=$(frame_of "$border" "$cov")
      $PY tools/make_shards.py --dataset aaf --root "$AAF" --out "shards/aaf-$frame" --border "$border" \
        --coverage "$cov" --workers 2 --device cpu --quiet
      $PY tools/make_shards.py --dataset fgnet --root "$FGNET" --out "shards/fgnet-$frame" --border "$border" \
        --coverage "$cov" --workers 2 --device cpu --quiet
    done
  done
}

stage_pretrain() {
  # The frames (border x coverage) side by side, one core each (two small-batch processes use two
  # cores better than one process with two threads); one frame alone gets both.
  local pids=() threads=1 frames=() border cov frame
  for border in $BORDERS; do for cov in $COVERAGES; do frames+=("$(frame_of "$border" "$cov")"); done; done
  [ "${#frames[@]}" -gt 1 ] || threads=2
  mkdir -p runs
  for frame in "${frames[@]}"; do
    OMP_NUM_THREADS=$threads $PY -m agecl.train --shards "shards/aaf-$frame" --protocol authors --fold 0 \
      --preset paper-fgnet-ternary --set loss.supervise=triplet --flip horizontal --image-size "$SIZE" \
      --epochs "$PRE_EPOCHS" --lr-schedule cosine --workers $threads --device cpu --seed "$PRE_SEED" \
      --out "runs/aaf-$frame-pretrain-$PRE" --resume --quiet > "runs/aaf-$frame-pretrain-$PRE.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
  for frame in "${frames[@]}"; do tail -n 4 "runs/aaf-$frame-pretrain-$PRE.log"; done
}

stage_carry() {
  $PY -m agecl.train --shards "shards/aaf-$FRAME" --protocol authors --fold none \
    --preset paper-fgnet-ternary --set loss.supervise=triplet --flip horizontal --image-size "$SIZE" \
    --epochs "$PRE_EPOCHS" --lr-schedule cosine --workers 2 --device cpu --seed "$PRE_SEED" \
    --out "runs/aaf-$FRAME-all-$PRE" --resume --quiet
}

stage_zeroshot() {
  $PY -m agecl.evaluate --checkpoint "$SRC_RUN/checkpoint.pt" --shards "shards/fgnet-$FRAME" \
    --all --device cpu
}

# The fine-tuning's shard set and split name: FG-NET's own, or the combined set's with AAF replayed.
fg_set() { if [ "$REPLAY" = 0 ]; then echo "shards/fgnet-$FRAME"; else echo "shards/fgnet+aaf-$FRAME"; fi; }
replay_name() { echo "replay$REPLAY$([ "$REPLAY_FROM" = 0 ] || echo "-from$REPLAY_FROM")"; }
fg_split() { if [ "$REPLAY" = 0 ]; then echo "$1"; else echo "$1-$(replay_name)"; fi; }
replay_tag() { [ "$REPLAY" = 0 ] || echo "-$(replay_name)"; }
# The fine-tuning's settings beyond its epochs, as a folder suffix: AAF replayed, the stages held
# fixed, the images supervised, the seed.
ft_tag() {
  printf "%s%s%s%s%s%s%s" "$(replay_tag)" "${FREEZE:+-freeze-$FREEZE}" "$([ "$FT_SUPERVISE" = anchor ] || echo "-supervise-$FT_SUPERVISE")" \
    "$([ "$FT_BALANCE" = 0 ] || echo "-balance$FT_BALANCE")" "$([ "$FT_GREY" = 0 ] || echo "-grey$FT_GREY")" "$([ "$FT_LR" = 2e-4 ] || echo "-lr$FT_LR")" "$([ "$FT_SEED" = 0 ] || echo "-seed$FT_SEED")"
}
ft_flags() { echo "${FREEZE:+--freeze $FREEZE} --set loss.supervise=$FT_SUPERVISE --set loss.balance=$FT_BALANCE --grey $FT_GREY --seed $FT_SEED"; }

# A LOPO row's folder: the row, the pretraining's epochs, the fine-tuning's when not 1, ft_tag.
lopo_dir() { echo "runs/fgnet-$FRAME-lopo-$1-$SRC$([ "$2" = 1 ] || echo "-ft$2")$(ft_tag)"; }

# A select stage's run: the half, the row, the pretraining's and the fine-tuning's epochs, ft_tag.
select_dir() { echo "runs/fgnet-$FRAME-select-$1-$SELECT_ROW-$SRC-ft$2$(ft_tag)"; }

stage_lopo() {
  # Each fold is tested with the mirror as it finishes (--tta flip), so that its predictions are
  # final without its checkpoint; the folds kept in git by the keep stage (KEPT_FOLDS) are put back
  # first and skipped: a row that takes longer than a session outlives a machine that loses runs/.
  local row run
  for row in $ROWS; do
    run=$(lopo_dir "$row" "$FT_EPOCHS")
    [ ! -d "$KEPT_FOLDS/${run#runs/}" ] || $PY benchmarks/keep_run.py --restore --into "$KEPT_FOLDS" "$run"
    $PY -m agecl.train --shards "$(fg_set)" --protocol "$(fg_split lopo)" --all-folds --jobs "$JOBS" \
      --init-from "$SRC_RUN/checkpoint.pt" --preset "$row" --flip horizontal \
      --image-size "$SIZE" --epochs "$FT_EPOCHS" --lr "$FT_LR" --lr-schedule cosine --batch-size "$FT_BATCH" \
      $(ft_flags) --tta flip --workers 1 --device cpu --out "$run" --resume --quiet
  done
}

stage_select() {
  # The fine-tuning's length, chosen with no LOPO test person in the choice made for its fold.
  # FG-NET's 82 people are cut in two halves by person (seed 0). The choice for the folds of half
  # A's people is made on half B alone: B's people in two groups, fine-tune on one, test on the
  # other, both ways (split inner-a; inner-b the other way round), pooled MAE over B's photos, for
  # each of $FT_CHOICES epochs; half A's people are in no fold of inner-a. Then run the lopo stage
  # with FT_EPOCHS set to the choice of each half (the same epochs for both: one run; otherwise
  # one run each, and each half's folds are read from its own).
  $PY - "shards/fgnet-$FRAME" <<'PY'
import sys
import numpy as np
from agecl.reader import ShardSet
from agecl.shards import write_split
root = sys.argv[1]
ids = ShardSet(root).identities  # (N,) position of each photo's person
people = np.random.default_rng(0).permutation(ids.max() + 1)
half = {"a": people[: len(people) // 2], "b": people[len(people) // 2 :]}
for name, (mine, other) in {"inner-a": ("a", "b"), "inner-b": ("b", "a")}.items():
    folds = np.full(len(ids), -1, np.int16)  # the half the choice is for: in no fold
    group = half[other]
    folds[np.isin(ids, group[: len(group) // 2])] = 0
    folds[np.isin(ids, group[len(group) // 2 :])] = 1
    write_split(root, name, folds, {"protocol": name, "level": "person", "seed": 0,
                "rule": f"the fine-tuning choice for the LOPO folds of half {mine}: half {other}'s people in two folds",
                "half_" + mine: sorted(int(p) for p in half[mine])})
    print(f"{name}: {int((folds == 0).sum())} + {int((folds == 1).sum())} photos of half {other}; "
          f"half {mine} ({len(half[mine])} people) left out")
PY
  for h in a b; do
    for e in $FT_CHOICES; do
      local run; run=$(select_dir "$h" "$e")
      $PY -m agecl.train --shards "$(fg_set)" --protocol "$(fg_split "inner-$h")" --all-folds \
        --init-from "$SRC_RUN/checkpoint.pt" --preset "$SELECT_ROW" --flip horizontal \
        --image-size "$SIZE" --epochs "$e" --lr "$FT_LR" --lr-schedule cosine --batch-size "$FT_BATCH" \
        $(ft_flags) --workers 2 --device cpu --out "$run" --resume --quiet > "$run.log" 2>&1
    done
  done
  $PY - "$FRAME" "$SRC" "$SELECT_ROW" "$(ft_tag)" $FT_CHOICES <<'PY'
import json, sys
from pathlib import Path
border, pre, row, tag, choices = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
for h in "ab":
    maes = {e: json.loads(Path(f"runs/fgnet-{border}-select-{h}-{row}-{pre}-ft{e}{tag}/results.json").read_text())["pooled"]["mae"]
            for e in choices}
    best = min(maes, key=maes.get)
    print(f"for the LOPO folds of half {h}: " + "  ".join(f"{e} epochs {m:.2f}" for e, m in maes.items()) + f"  -> {best}")
PY
}

stage_replay() {
  [ -f "shards/fgnet+aaf-$FRAME/manifest.json" ] ||
    $PY tools/make_shards.py --combine "shards/fgnet-$FRAME" "shards/aaf-$FRAME" --out "shards/fgnet+aaf-$FRAME" --quiet
  $PY - "shards/fgnet+aaf-$FRAME" "fgnet-$FRAME" "aaf-$FRAME" "$REPLAY" "$REPLAY_FROM" "$(replay_name)" <<'PY'
import sys
import numpy as np
from agecl import format as fmt
from agecl.reader import ShardSet
from agecl.shards import write_split
root, fgnet, aaf, suffix = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[6]
ratio, youngest = float(sys.argv[4]), int(sys.argv[5])
s = ShardSet(root)
from_aaf = np.array([s.identity_names[i].startswith(aaf + "/") for i in s.identities])
aaf_rows = np.flatnonzero(from_aaf & (s.ages >= youngest))
for split in ("lopo", "inner-a", "inner-b"):
    folds = s.split(f"{fgnet}-{split}").copy()
    k = int(folds.max()) + 1
    per_fold = np.mean([((folds >= 0) & (folds != f)).sum() for f in range(k)])  # FG-NET training faces a fold
    n = int(round(ratio * per_fold))
    # The same random AAF faces in every fold's training part (seed 0), never tested.
    folds[np.random.default_rng(0).choice(aaf_rows, n, replace=False)] = fmt.EVERY_TRAIN_PART
    name = f"{split}-{suffix}"
    write_split(root, name, folds, {"protocol": name, "seed": 0, "from": f"{fgnet}-{split}", "replayed": n,
                "rule": f"{fgnet}'s {split} folds; {n} random {aaf} faces aged {youngest} or more ({ratio:g} x "
                        f"the {per_fold:.0f} FG-NET training faces of a fold) in every training part"})
    print(f"{root}: split {name}: {k} folds, {n} {aaf} faces in every training part")
PY
}

stage_flip() {
  local runs=("runs/aaf-$FRAME-pretrain-$PRE")
  for h in a b; do runs+=("$(select_dir "$h" "$FT_EPOCHS")"); done
  for row in $ROWS; do runs+=("$(lopo_dir "$row" "$FT_EPOCHS")"); done
  $PY benchmarks/rescore.py --suffix flip --eval "--tta flip" "${runs[@]}"
}

stage_wise() {
  # WiSE-FT: every fine-tuned model moved back towards the AAF model it started from, weight by
  # weight (agecl-eval --wise-ft W: W x fine-tuned + (1 - W) x AAF), each test face with its mirror.
  # W is chosen on the select stage's halves (each half's choice on the other half's people); then
  # the LOPO rows are scored with WISE, the choice (1: as fine-tuned, nothing to do). No training.
  local w runs=()
  for h in a b; do runs+=("$(select_dir "$h" "$FT_EPOCHS")"); done
  for w in $WISE_CHOICES; do
    $PY benchmarks/rescore.py --suffix "flip-wise$w" --eval "--tta flip --wise-ft $w" "${runs[@]}"
  done
  [ "$WISE" = 1 ] && return
  runs=()
  for row in $ROWS; do runs+=("$(lopo_dir "$row" "$FT_EPOCHS")"); done
  $PY benchmarks/rescore.py --suffix "flip-wise$WISE" --eval "--tta flip --wise-ft $WISE" "${runs[@]}"
}

stage_calibrate() {
  # Each half's line is fitted on the select run made for it (the other half's people, with the
  # mirror); both select runs are then calibrated too, each by the other's line: the check.
  local kind runs=() fit_a fit_b
  fit_a="$(select_dir a "$FT_EPOCHS")-flip" fit_b="$(select_dir b "$FT_EPOCHS")-flip"
  runs=("$fit_a" "$fit_b")
  for row in $ROWS; do
    [ -f "$(lopo_dir "$row" "$FT_EPOCHS")-flip/results.json" ] && runs+=("$(lopo_dir "$row" "$FT_EPOCHS")-flip")
  done
  for kind in $CAL_KINDS; do
    $PY benchmarks/calibrate.py --shards "shards/fgnet-$FRAME" --fit-a "$fit_a" --fit-b "$fit_b" --kind "$kind" \
      --suffix "cal-$kind" "${runs[@]}"
  done
}

stage_stack() {
  # The fine-tuned models forget what the AAF model knew of adults (zero-shot it is nearer the truth
  # on FG-NET's 30-49 than any fine-tuned row, and 10 years off on its children): a plane over both
  # predictions, fitted on held-out people, can weigh the one against the other by age. Measured on
  # the 64 px 16-epoch select halves: no gain (4.96 and 5.81 against 4.86 and 5.81; RESULTS.md).
  local zs="$SRC_RUN/eval-fgnet-$FRAME-all-flip" fit_a fit_b row runs=()
  [ -f "$zs/results.json" ] || $PY -m agecl.evaluate --checkpoint "$SRC_RUN/checkpoint.pt" \
    --shards "shards/fgnet-$FRAME" --all --tta flip --device cpu --out "$zs"
  fit_a="$(select_dir a "$FT_EPOCHS")-flip" fit_b="$(select_dir b "$FT_EPOCHS")-flip"
  runs=("$fit_a" "$fit_b")
  for row in $ROWS; do
    [ -f "$(lopo_dir "$row" "$FT_EPOCHS")-flip/results.json" ] && runs+=("$(lopo_dir "$row" "$FT_EPOCHS")-flip")
  done
  $PY benchmarks/calibrate.py --shards "shards/fgnet-$FRAME" --fit-a "$fit_a" --fit-b "$fit_b" --with "$zs" \
    --suffix stack "${runs[@]}"
}

# One of the ensemble stage's targets under the current SRC, with the mirror: select-a, select-b, lopo:<row>.
target_dir() {
  case $1 in
    select-*) echo "$(select_dir "${1#select-}" "$FT_EPOCHS")-flip" ;;
    lopo:*) echo "$(lopo_dir "${1#lopo:}" "$FT_EPOCHS")-flip" ;;
  esac
}

stage_ensemble() {
  # Fine-tunings of one AAF model err alike (0.96-0.97 face by face), two AAF models trained apart
  # less (0.87-0.90), and only their average gains (RESULTS.md, twentieth and twenty-first sessions).
  local what seed run runs name row made=0 missing
  for what in select-a select-b $(for row in $ROWS; do echo "lopo:$row"; done); do
    runs=() missing=""
    for seed in $PRE_SEEDS; do
      case $seed in
        (*:*) runs+=("$(FRAME=$(frame_of "$BORDER" "${seed%%:*}"); SRC=$(src_of "${seed#*:}"); target_dir "$what")") ;;
        (*) runs+=("$(SRC=$(src_of "$seed"); target_dir "$what")") ;;
      esac
    done
    name=$(SRC=$ENS_SRC; target_dir "$what")
    for run in "${runs[@]}"; do [ -f "$run/results.json" ] || missing="$missing $run"; done
    if [ -n "$missing" ]; then echo "$name: not yet (unfinished:$missing)"; continue; fi
    $PY benchmarks/average_runs.py "${runs[@]}" --out "$name" > "$name.json"
    made=$((made + 1))
  done
  echo "ensemble: $made averaged (seeds $PRE_SEEDS)"
}

stage_keep() {
  local row d runs=() rows=()
  for row in $ROWS; do
    d=$(lopo_dir "$row" "$FT_EPOCHS")
    [ -z "$(ls "$d"/fold-*/results.json 2>/dev/null)" ] || rows+=("$d")
    for d in "$d"{,-flip,-flip-stack}; do
      [ ! -f "$d/results.json" ] || runs+=("$d")
    done
  done
  if [ ${#runs[@]} -gt 0 ]; then $PY benchmarks/keep_run.py --into benchmarks/kept "${runs[@]}"; fi
  # Every finished fold too, finished row or not: the lopo stage puts them back on a new machine.
  if [ ${#rows[@]} -gt 0 ]; then $PY benchmarks/keep_run.py --folds --into "$KEPT_FOLDS" "${rows[@]}"; fi
}

stage_table() {
  $PY - "$FRAME" "$SRC" "$FT_EPOCHS" "$(ft_tag)" "$WISE" "$SRC_RUN" "$ENS_SRC" $ROWS <<'PY'
import json, sys
from pathlib import Path
border, pre, ft, tag, wise, src, ens, rows = *sys.argv[1:8], sys.argv[8:]
z = Path(f"{src}/eval-fgnet-{border}-all/results.json")
if z.is_file():
    r = json.loads(z.read_text())
    print(f"{'zero-shot (AAF model)':24s} MAE {r['test_mae']:.2f}  CS(5) {100 * r['test_cs5']:.1f}%  n {r['n_test']}")
for row in rows:
    f = Path(f"runs/fgnet-{border}-lopo-{row}-{pre}{'' if ft == '1' else '-ft' + ft}{tag}/results.json")
    if not f.is_file():
        print(f"{row:24s} not run")
        continue
    first = json.loads(next(iter(sorted(f.parent.glob("fold-*/results.json"))), f).read_text())
    trained = row + (" (tested with mirror)" if first.get("config", {}).get("test_tta") == "flip" else "")
    for name, f in ((trained, f), (row + " + mirror", f.parent.with_name(f.parent.name + "-flip") / f.name),
                    (row + f" + mirror, wise-ft {wise}", f.parent.with_name(f.parent.name + f"-flip-wise{wise}") / f.name),
                    (row + " + mirror, stacked with the AAF model", f.parent.with_name(f.parent.name + "-flip-stack") / f.name)):
        if f.is_file():
            r = json.loads(f.read_text())
            p = r["pooled"]
            base = r.get("mean_age_baseline")  # optional, as agecl-eval's report has it
            print(f"{name:24s} MAE {p['mae']:.2f}  CS(5) {100 * p['cs5']:.1f}%  n {p['n']}  "
                  + (f"baseline {base:.2f}  " if base is not None else "") + r["status"])
            for problem in r.get("problems") or []:  # a row resumed on a rebuilt AAF model says so here
                print(f"{'':24s} warning: {problem}")
    f = Path(f"runs/fgnet-{border}-lopo-{row}-{ens}{'' if ft == '1' else '-ft' + ft}{tag}-flip/results.json")
    if f.is_file():  # the ensemble stage's average of AAF models trained apart
        r = json.loads(f.read_text())
        print(f"{row + ' + mirror, ' + next(p for p in ens.split('-') if p.startswith(('pseeds', 'models'))) + ' averaged':24s} MAE {r['test_mae']:.2f}  "
              f"CS(5) {100 * r['test_cs5']:.1f}%  n {r['n_test']}")
PY
}

[ $# -gt 0 ] || { sed -n '2,/^set /p' "$0" | sed '$d'; exit 2; }
for stage in "$@"; do
  "stage_$stage"
done
