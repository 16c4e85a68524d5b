#!/usr/bin/env bash
# Build the shipped default model from scratch with one command, from the repository root:
#
#   bash scripts/build-default-model.sh [OUT]          # OUT defaults to runs/build-default
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

# Paths given by the caller are theirs (relative to where the command was typed); the defaults are the repository's.
here=$(pwd)
repo=$(cd "$(dirname "$0")/.." && pwd)
given() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s' "$here/$1" ;; esac; }
OUT=$( [ -n "${1:-}" ] && given "$1" || printf '%s' "$repo/runs/build-default" )
CONFIG=$( [ -n "${DERMSCREEN_BUILD_CONFIG:-}" ] && given "$DERMSCREEN_BUILD_CONFIG" \
          || printf '%s' "$repo/configs/default.yaml" )
DATA=$( [ -n "${DERMSCREEN_BUILD_DATA:-}" ] && given "$DERMSCREEN_BUILD_DATA" \
        || printf '%s' "$repo/../shared/data/ham10000_224/HAM10000_metadata.csv" )
EXTRA=$( [ -n "${DERMSCREEN_BUILD_EXTRA:-}" ] && given "$DERMSCREEN_BUILD_EXTRA" \
         || printf '%s' "$repo/../shared/data/ham10000/HAM10000_metadata.csv" )
TRAIN_ARGS=${DERMSCREEN_BUILD_TRAIN_ARGS:-}
SHIPPED_SEGMENTER="--max-images 5000 --epochs 5 --image-size 80 --zoom-out 0.5 --threads 1 --num-workers 1"
SEGMENTER_ARGS=${DERMSCREEN_BUILD_SEGMENTER_ARGS:-$SHIPPED_SEGMENTER}
BOOTSTRAP=${DERMSCREEN_BUILD_BOOTSTRAP:-1000}
cd "$repo"  # the recipe's relative paths (extra_train) are the repository's

fail() { echo "build-default-model: $*" >&2; exit 2; }
for f in "$CONFIG" "$DATA" "$EXTRA"; do
  [ -f "$f" ] || fail "$f not found. The data lives in ../shared/data beside the repository (see its README); \
the DERMSCREEN_BUILD_* variables at the top of this script point elsewhere."
done
command -v dermscreen >/dev/null || fail "install dermscreen with the train extra first (README)."
[ -e "$OUT" ] && [ ! -d "$OUT" ] && fail "$OUT is a file, not a folder: give another output folder."
mkdir -p "$OUT" 2>/dev/null && [ -w "$OUT" ] || fail "cannot write to $OUT: give a folder you can write to."
# Steps below replace what they find in OUT: only in a folder this script made (marked), never in someone's runs
MARK="$OUT/.build-default-model"
if [ -n "$(ls -A "$OUT")" ] && [ ! -f "$MARK" ]; then
  fail "$OUT already holds files this script did not make: give a new folder, or the one an earlier build used."
fi
touch "$MARK"
step() { echo; echo "== $(date -u +%H:%M:%S) $*"; }

# Each step is skipped when its result is already there, so a rerun continues where the last one stopped.
if [ ! -f "$OUT/classifier/bundle/manifest.json" ]; then
  resume=()
  # a checkpoint means a run (or an ensemble member) got through an epoch: continue it; a run stopped before its
  # first checkpoint simply starts again
  if [ -d "$OUT/classifier" ] && find "$OUT/classifier" -name last.pt | grep -q .; then resume=(--resume); fi
  step "1/4 classifier: dermscreen train --config $CONFIG"
  # shellcheck disable=SC2086  # TRAIN_ARGS is a list of options
  dermscreen train --config "$CONFIG" --data "$DATA" --out "$OUT/classifier" --no-progress "${resume[@]}" $TRAIN_ARGS
fi
if [ ! -f "$OUT/segmenter/segmenter.onnx" ]; then
  step "2/4 segmenter: dermscreen train-segmenter $SEGMENTER_ARGS"
  # shellcheck disable=SC2086
  dermscreen train-segmenter --data "$EXTRA" --out "$OUT/segmenter" $SEGMENTER_ARGS
fi
# redone whenever the classifier or the segmenter is newer than the finished bundle (or it is missing)
if [ ! -f "$OUT/bundle/manifest.json" ] || [ "$OUT/classifier/bundle/manifest.json" -nt "$OUT/bundle/manifest.json" ] \
    || [ "$OUT/segmenter/segmenter.onnx" -nt "$OUT/bundle/manifest.json" ]; then
  step "3/4 attach the segmenter and re-choose the OOD thresholds on both copies"
  rm -rf "$OUT/bundle-seg" "$OUT/bundle"
  dermscreen add-segmenter --bundle "$OUT/classifier/bundle" --segmenter "$OUT/segmenter" --out "$OUT/bundle-seg"
  dermscreen refit-ood --bundle "$OUT/bundle-seg" --data "$DATA" --split "$OUT/classifier/split.csv" \
    --extra "$EXTRA" --out "$OUT/bundle"
  rm -rf "$OUT/bundle-seg"
fi
step "4/4 held-out test split"
dermscreen evaluate --model "$OUT/bundle" --labels "$DATA" --split test --bootstrap "$BOOTSTRAP" \
  --out "$OUT/test" --overwrite
# the test results travel beside the bundle, keyed by its sha256 (the model card shows them: API, info)
python -m dermscreen.evaluation.held_out "$OUT/test/metrics.json" > "$OUT/held-out.json"
echo
echo "Built $OUT/bundle (test metrics in $OUT/test/metrics.md)."
printf 'To ship it: cp %q/* src/dermscreen/models/default/ && python -m dermscreen.evaluation.held_out %q --into %s\n' \
  "$OUT/bundle" "$OUT/test/metrics.json" "src/dermscreen/models/held-out.json"
