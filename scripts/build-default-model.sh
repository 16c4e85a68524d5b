#!/usr/bin/env bash
# Build the shipped default model from scratch with one command, from the repository root:
#
#   bash scripts/build-default-model.sh [OUT]          # OUT defaults to runs/default
#
# 1. the classifier: dermscreen train --config configs/default.yaml on the sharp 224 px copy (+ the 200x150
#    copy for training only, as the recipe says): two members, joined, prior-corrected, calibrated, exported;
# 2. the 80 px lesion segmenter on the masks, attached to that bundle;
# 3. both "cannot assess" thresholds re-chosen on both copies of the validation lesions (refit-ood);
# 4. the held-out test split evaluated (OUT/test/metrics.md: the numbers docs/model-card.md reports).
# The result is OUT/bundle; copy its files into src/dermscreen/models/default/ to ship it.
#
# On this project's 2-core CPU: ~60-85 min for the classifier, ~21 min for the segmenter, ~3 min for refit-ood
# (docs/model-card.md). Rerun the same command after an interruption: finished steps are kept, an interrupted
# classifier run is resumed. CPU training is not bit-for-bit deterministic, so a rebuild is another model of
# the same recipe and data, not the shipped file (docs/model-card.md says how far reruns spread).
#
# The environment can point it elsewhere (tests use it for a small smoke build):
#   DERMSCREEN_BUILD_CONFIG       recipe (default configs/default.yaml)
#   DERMSCREEN_BUILD_DATA         labels the split is made on
#                                 (default ../shared/data/ham10000_224/HAM10000_metadata.csv)
#   DERMSCREEN_BUILD_EXTRA        second copy: segmenter masks and refit-ood (default ../shared/data/ham10000/...)
#   DERMSCREEN_BUILD_TRAIN_ARGS   more options for dermscreen train (e.g. --max-images 200)
#   DERMSCREEN_BUILD_SEGMENTER_ARGS  options for dermscreen train-segmenter (default: the shipped segmenter's)
#   DERMSCREEN_BUILD_BOOTSTRAP    bootstrap resamples of the test evaluation (default 1000)
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-runs/default}
CONFIG=${DERMSCREEN_BUILD_CONFIG:-configs/default.yaml}
DATA=${DERMSCREEN_BUILD_DATA:-../shared/data/ham10000_224/HAM10000_metadata.csv}
EXTRA=${DERMSCREEN_BUILD_EXTRA:-../shared/data/ham10000/HAM10000_metadata.csv}
TRAIN_ARGS=${DERMSCREEN_BUILD_TRAIN_ARGS:-}
SHIPPED_SEGMENTER="--max-images 5000 --epochs 5 --image-size 80 --zoom-out 0.5 --threads 1 --num-workers 1"
SEGMENTER_ARGS=${DERMSCREEN_BUILD_SEGMENTER_ARGS:-$SHIPPED_SEGMENTER}
BOOTSTRAP=${DERMSCREEN_BUILD_BOOTSTRAP:-1000}

for f in "$CONFIG" "$DATA" "$EXTRA"; do
  [ -f "$f" ] || { echo "build-default-model: $f not found (run it in a checkout with ../shared/data beside it)." >&2
                   exit 2; }
done
if ! command -v dermscreen >/dev/null; then
  echo "build-default-model: install dermscreen with the train extra first (README)." >&2
  exit 2
fi
mkdir -p "$OUT"
step() { echo; echo "== $(date -u +%H:%M:%S) $*"; }

# Each step is skipped when its result is already there, so a rerun continues where the last one stopped.
if [ ! -f "$OUT/classifier/bundle/manifest.json" ]; then
  resume=()
  # a split.csv means a run (or an ensemble member) has started: continue it instead of refusing to overwrite
  if [ -d "$OUT/classifier" ] && find "$OUT/classifier" -name split.csv | grep -q .; then resume=(--resume); fi
  step "1/4 classifier: dermscreen train --config $CONFIG"
  # shellcheck disable=SC2086  # TRAIN_ARGS is a list of options
  dermscreen train --config "$CONFIG" --data "$DATA" --out "$OUT/classifier" --no-progress "${resume[@]}" $TRAIN_ARGS
fi
if [ ! -f "$OUT/segmenter/segmenter.onnx" ]; then
  step "2/4 segmenter: dermscreen train-segmenter $SEGMENTER_ARGS"
  # shellcheck disable=SC2086
  dermscreen train-segmenter --data "$EXTRA" --out "$OUT/segmenter" $SEGMENTER_ARGS
fi
if [ ! -f "$OUT/bundle/manifest.json" ]; then
  step "3/4 attach the segmenter and re-choose the OOD thresholds on both copies"
  rm -rf "$OUT/bundle-seg"
  dermscreen add-segmenter --bundle "$OUT/classifier/bundle" --segmenter "$OUT/segmenter" --out "$OUT/bundle-seg"
  dermscreen refit-ood --bundle "$OUT/bundle-seg" --data "$DATA" --split "$OUT/classifier/split.csv" \
    --extra "$EXTRA" --out "$OUT/bundle"
  rm -rf "$OUT/bundle-seg"
fi
step "4/4 held-out test split"
dermscreen evaluate --model "$OUT/bundle" --labels "$DATA" --split test --bootstrap "$BOOTSTRAP" \
  --out "$OUT/test" --overwrite
echo
echo "Built $OUT/bundle (test metrics in $OUT/test/metrics.md)."
echo "To ship it: cp $OUT/bundle/* src/dermscreen/models/default/"
