#!/usr/bin/env bash
# Every GPU check and benchmark of agecl in one command, for a session lent the H200
# (see ../shared/GPU.md). It writes JSON lines and logs under $OUT (or ./gpu-out) and prints a
# short table last.
#
# The GPU image lacks DALI, webdataset and facenet-pytorch: benchmarks/gpu_carry.sh carries them
# (and FG-NET) in four calls, each doing GPU work while the next part waits. On our machine, once:
#   bash benchmarks/gpu_carry.sh prepare          (about 3 minutes: xz)
# Then on the device, back to back (the machine keeps carried files only while warm, 30 s). The tenth
# session ran exactly these (seconds of command: 217, 60, 0, 399; 726 s of device time held in all,
# the start included; benchmarks/RESULTS.md):
#   1. carry .gpuwheels-0:  bash benchmarks/gpu_carry.sh early && export PYTHONPATH=/tmp/agecl-site0:$PWD &&
#                           SYNTH=4000 NO_DALI=1 STAGES="predict train" bash benchmarks/gpu_suite.sh
#   2. carry .gpuwheels-1:  export PYTHONPATH=/tmp/agecl-site0:$PWD && NO_DALI=1 STAGES="align build" bash benchmarks/gpu_suite.sh
#   3. carry .gpuwheels-2:  true (or more work without DALI)
#   4. carry .gpuwheels-3:  bash benchmarks/gpu_carry.sh install && export PYTHONPATH=/tmp/agecl-site:$PWD &&
#                           TRAIN_VARIANTS=compiled-bf16-dali,compiled-bf16-torch TRAIN_BIG_VARIANTS=compiled-bf16-dali
#                           STAGES="tests loader train fgnet" FGNET_SECONDS=90 bash benchmarks/gpu_suite.sh
# The fgnet stage needs minutes of its own: 8 folds at once from scratch finished none in 90 s.
# Stages: predict (the CUDA predictor test), tests (every test marked gpu: DALI's GPU decoder too),
# loader, train, align (MTCNN on CUDA over FG-NET), build (FG-NET shards on CUDA), fgnet (LOPO of
# the ternary preset on those shards), alltests (the whole suite there, CUDA visible, -x, 8 min).
# Default: "tests loader train align build fgnet". NO_DALI=1: the preflight does not ask for DALI and
# the train stage measures on-device data only (the compiled step itself, no loader).
#
# SMOKE=1 runs every stage on this CPU with tiny settings, to check the script itself before a GPU
# session spends its minutes on it (this is not a measurement).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
WORK=${WORK:-/tmp/agecl-gpu}
mkdir -p "$WORK"
STAGES=${STAGES:-"tests loader train align build fgnet"}
NO_DALI=${NO_DALI:-0}
PY=${PY:-python3}
FGNET=${FGNET:-.gpuwheels-0/fgnet}
if [ "${SMOKE:-0}" = 1 ]; then
  DEVICE=cpu; SYNTH=${SYNTH:-240}; WORKERS=2; SIZE=64; BATCHES="16"
  LOADER_ARGS="--steps 4 --rounds 1"
  TRAIN_ARGS="--steps 2 --windows 1 --warmup 1 --variants eager-fp32-real,eager-fp32-synthetic"
  TRAIN_BIG_ARGS="--steps 2 --windows 1 --warmup 1 --variants eager-fp32-real"
  ALIGN_ARGS="--limit 16"; LOPO_ARGS="--epochs 1 --image-size 64 --batch-size 16"
  FGNET_JOBS=${FGNET_JOBS:-2}; FGNET_SECONDS=${FGNET_SECONDS:-90}
else
  DEVICE=cuda; SYNTH=${SYNTH:-8000}; WORKERS=12; SIZE=224; BATCHES="64 256"
  LOADER_ARGS="--rounds 2 --steps 60"; TRAIN_ARGS=""; TRAIN_BIG_ARGS="--variants compiled-bf16-real,compiled-bf16-synthetic"
  ALIGN_ARGS=""; LOPO_ARGS="--epochs 100"
fi
if [ "$NO_DALI" = 1 ]; then  # the compiled step on on-device data only: no loader
  TRAIN_ARGS="--variants eager-fp32-synthetic,eager-bf16-synthetic,compiled-fp32-synthetic,compiled-bf16-synthetic"
  TRAIN_BIG_ARGS="--variants eager-bf16-synthetic,compiled-bf16-synthetic"
  [ "${SMOKE:-0}" = 1 ] && TRAIN_ARGS="$TRAIN_ARGS --steps 2 --windows 1 --warmup 1" TRAIN_BIG_ARGS="$TRAIN_BIG_ARGS --steps 2 --windows 1 --warmup 1"
fi
# Variants chosen by hand (comma-separated, as bench_train's --variants), for the small and the big batch.
[ -n "${TRAIN_VARIANTS:-}" ] && TRAIN_ARGS="${TRAIN_ARGS%%--variants*} --variants $TRAIN_VARIANTS"
[ -n "${TRAIN_BIG_VARIANTS:-}" ] && TRAIN_BIG_ARGS="${TRAIN_BIG_ARGS%%--variants*} --variants $TRAIN_BIG_VARIANTS"
log() { echo "== $(date +%T) $*" | tee -a "$OUT/suite.log"; }
has() { [[ " $STAGES " == *" $1 "* ]]; }

log "device ($DEVICE)"
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/device.txt"
# Fail in seconds, naming what is missing, rather than minutes into a stage.
if ! DEVICE=$DEVICE NO_DALI=$NO_DALI $PY - <<'PY' 2>&1 | tee -a "$OUT/device.txt"; then
import importlib, os, sys
missing = []
for name in ("torch", "torchvision", "numpy", "numba", "cv2", "PIL", "tqdm", "webdataset", "facenet_pytorch",
             "matplotlib", "pytest", "hypothesis", "agecl.train") + (() if os.environ["NO_DALI"] == "1" else ("nvidia.dali",)):
    try:
        importlib.import_module(name)
    except Exception as e:
        missing.append(f"{name} ({type(e).__name__}: {e})")
if missing:
    sys.exit("gpu_suite: cannot import " + "; ".join(missing) + " -- were the .gpuwheels parts installed "
             "and .gpusite put on PYTHONPATH?")
import numba, numpy, torch, torchvision
if os.environ["DEVICE"] == "cuda" and not torch.cuda.is_available():
    sys.exit("gpu_suite: torch sees no CUDA device")
dali = "-" if os.environ["NO_DALI"] == "1" else importlib.import_module("nvidia.dali").__version__
print(f"torch {torch.__version__} cuda {torch.version.cuda} cudnn {torch.backends.cudnn.version()} "
      f"torchvision {torchvision.__version__} dali {dali} numba {numba.__version__} numpy {numpy.__version__}")
PY
  log "preflight failed: see above"; exit 3
fi

if [ ! -f "$WORK/synthetic/manifest.json" ]; then
  log "building $SYNTH synthetic samples"
  $PY tools/make_shards.py --synthetic "$SYNTH" --out "$WORK/synthetic" --workers "$WORKERS" --quiet 2>&1 | tail -5 | tee -a "$OUT/suite.log"
fi

if has predict; then
  log "the CUDA predictor against the CPU's"
  $PY -m pytest -q -x -p no:cacheprovider -m "gpu" tests/test_predict.py 2>&1 | tail -15 | tee "$OUT/tests_predict.log"
fi

if has tests; then
  log "GPU tests"
  $PY -m pytest -q -x -p no:cacheprovider -m "gpu" tests 2>&1 | tail -15 | tee "$OUT/tests_gpu.log"
fi

if has alltests; then
  log "the whole test suite, CUDA visible"
  timeout 480 $PY -m pytest -q -x -p no:cacheprovider tests 2>&1 | tail -25 | tee "$OUT/tests_all.log"
fi

if has loader; then
  log "loader benchmark (DALI vs torch DataLoader)"
  for bs in $BATCHES; do
    # shellcheck disable=SC2086
    $PY benchmarks/bench_loader.py --shards "$WORK/synthetic" --device "$DEVICE" --batch-size "$bs" --workers "$WORKERS" \
      --image-size "$SIZE" $LOADER_ARGS 2>>"$OUT/loader.err" | tee -a "$OUT/loader.jsonl"
  done
fi

if has train; then
  log "training benchmark (eager/compiled, fp32/bf16, real loader vs on-device ceiling)"
  set -- $BATCHES
  # shellcheck disable=SC2086
  $PY benchmarks/bench_train.py --shards "$WORK/synthetic" --device "$DEVICE" --image-size "$SIZE" --crop "$SIZE" \
    --batch-size "$1" --workers "$WORKERS" $TRAIN_ARGS --out "$OUT/train.jsonl" 2>>"$OUT/train.err" | tail -3
  # shellcheck disable=SC2086
  $PY benchmarks/bench_train.py --shards "$WORK/synthetic" --device "$DEVICE" --image-size "$SIZE" --crop "$SIZE" \
    --batch-size "${!#}" --workers "$WORKERS" $TRAIN_BIG_ARGS --out "$OUT/train.jsonl" 2>>"$OUT/train.err" | tail -3
fi

if has align && [ -d "$FGNET/images" ]; then
  log "alignment on $DEVICE over FG-NET"
  # shellcheck disable=SC2086
  $PY benchmarks/bench_align.py --root "$FGNET" --device "$DEVICE" $ALIGN_ARGS 2>>"$OUT/align.err" | tee "$OUT/align.jsonl"
fi

if has build && [ -d "$FGNET/images" ]; then
  log "FG-NET shards on $DEVICE (MTCNN, $WORKERS workers)"
  rm -rf "$WORK/fgnet"
  start=$(date +%s.%N)
  $PY tools/make_shards.py --dataset fgnet --root "$FGNET/images" --out "$WORK/fgnet" \
    --device "$DEVICE" --workers "$WORKERS" --quiet 2> "$OUT/fgnet_build.err" | tail -5 | tee -a "$OUT/suite.log"
  log "FG-NET shards built in $($PY -c 'import sys; print(round(float(sys.argv[1]) - float(sys.argv[2]), 1))' "$(date +%s.%N)" "$start") s"
fi

if has fgnet && [ -f "$WORK/fgnet/manifest.json" ]; then
  # LOPO is 82 tiny folds: --jobs trains several at once on the one GPU. The stage stops after
  # FGNET_SECONDS and prints the folds finished, to extrapolate the 82-fold time (the issue's
  # target: 30 minutes); run it again (STAGES=fgnet) to go on: finished folds are skipped.
  jobs=${FGNET_JOBS:-8}
  log "LOPO of the paper's ternary preset on the FG-NET shards, $jobs folds at once"
  start=$(date +%s)
  # shellcheck disable=SC2086
  timeout "${FGNET_SECONDS:-420}" $PY -m agecl.train --shards "$WORK/fgnet" --protocol lopo --all-folds --jobs "$jobs" \
    --preset paper-fgnet-ternary $LOPO_ARGS --device "$DEVICE" --out "$WORK/runs/fgnet-lopo" --resume --quiet \
    > "$OUT/fgnet_train.log" 2>&1
  rc=$?
  done_folds=$(ls "$WORK"/runs/fgnet-lopo/fold-*/results.json 2>/dev/null | wc -l)
  log "LOPO: $done_folds of 82 folds finished after $(( $(date +%s) - start )) s in this call (jobs $jobs, exit $rc)"
  tail -25 "$OUT/fgnet_train.log" | tee -a "$OUT/suite.log"
  # The workers' own logs (epochs, img/s) stay on the machine otherwise: one file comes back.
  tar -C "$WORK/runs/fgnet-lopo" -czf "$OUT/fgnet_jobs.tgz" jobs 2>/dev/null
  tail -3 "$WORK"/runs/fgnet-lopo/jobs/*.log 2>/dev/null | tail -40 | tee -a "$OUT/suite.log"
fi

log "summary"
$PY - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for name in ("loader.jsonl", "train.jsonl", "align.jsonl"):
    p = out / name
    if not p.exists():
        continue
    for line in p.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        keys = [k for k in ("bench", "loader", "stage", "variant", "batch_size", "images_per_sec", "images_per_s", "loader_efficiency") if k in r]
        print("  ".join(f"{k}={r[k]}" for k in keys))
PY
