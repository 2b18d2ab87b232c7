#!/usr/bin/env bash
# The paper's Table 6 rows on FG-NET (MV, MV + cosine, MV + triplet, MV + cosine + triplet), every
# fold of a protocol, from random initialisation, then one aggregated table per row.
#
#   bash benchmarks/fgnet_ablation.sh SHARDS [PROTOCOL] [EPOCHS] [IMAGE_SIZE] [extra agecl-train flags...]
#
# Defaults are the paper's protocol and schedule (lopo, 100 epochs, 224 px). On a 2-core CPU we ran
# a reduced version (kfold, 20 epochs, 64 px, bf16, cosine learning rate): see README.md and benchmarks/RESULTS.md.
# PRESETS="mv paper-fgnet-binary" runs only those rows. The runs go to runs/<shard folder name>-<protocol>-<preset>.
set -euo pipefail
cd "$(dirname "$0")/.."
shards=${1:?usage: fgnet_ablation.sh SHARDS [PROTOCOL] [EPOCHS] [IMAGE_SIZE] [flags...]}
protocol=${2:-lopo}
epochs=${3:-100}
size=${4:-224}
shift $(( $# < 4 ? $# : 4 ))
PY=${PY:-.venv/bin/python}
name=$(basename "$shards")
presets=${PRESETS:-"mv paper-fgnet-binary mv-triplet paper-fgnet-ternary"}
for preset in $presets; do
  # The paper flips vertically in every row; so do all four rows here (a flag after "$@" would win).
  $PY -m agecl.train --shards "$shards" --protocol "$protocol" --all-folds --preset "$preset" \
    --flip vertical --epochs "$epochs" --image-size "$size" --out "runs/$name-$protocol-$preset" --quiet "$@"
done
for preset in $presets; do
  $PY - "$preset" "runs/$name-$protocol-$preset/results.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[2]))
p = r["pooled"]
print(f"{sys.argv[1]:22s} MAE {r['test_mae']:.2f} +- {r.get('test_mae_std') or 0:.2f} (pooled {p['mae']:.2f})  "
      f"CS(5) {100 * p['cs5']:.1f}%  baseline {r['mean_age_baseline']:.2f}  {r['status']}")
PY
done
