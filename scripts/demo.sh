#!/usr/bin/env bash
# `make demo`: the whole pipeline on built-in synthetic data, on local Ray, in a few minutes on a
# 2-core CPU. Usage: scripts/demo.sh VENV_BIN OUTPUT_DIR
set -euo pipefail
bin=${1:-.venv/bin}
out=${2:-demo_output}
mkdir -p "$out"
out=$(cd "$out" && pwd)

echo "== 1/5 synthetic DSB2018-layout data -> $out/data/stage1_train"
"$bin/unet-ray" synth "$out/data/stage1_train" --count 24 --seed 0 --min-side 96 --max-side 320

echo "== 2/5 prepare Parquet tiles (128 px) -> $out/prepared"
"$bin/unet-ray" prepare "$out/data/stage1_train" "$out/prepared" --tile 128 --val-fraction 0.2

echo "== 3/5 train on Ray Train (2 workers, CPU) -> $out/train"
echo "   (--encoder-weights none: the demo runs offline and fast; real training uses the ImageNet"
echo "    encoder, the default, downloaded once into torch's hub cache)"
"$bin/unet-ray" train --data "$out/prepared" --output "$out/train" --image-size 128 \
    --epochs 4 --batch-size 8 --workers 2 --max-lr 0.05 --scheduler warm-restart \
    --encoder-weights none --min-steps-per-epoch 10

echo "== 4/5 evaluate the best checkpoint on the validation images (whole, per image)"
"$bin/unet-ray" evaluate "$out/train/best" "$out/prepared" | tee "$out/evaluate.json"

echo "== 5/5 segment a fresh image collection on Ray Data -> $out/segment"
"$bin/unet-ray" synth "$out/collection_raw" --count 4 --seed 99 --min-side 200 --max-side 700
mkdir -p "$out/collection"
for image in "$out"/collection_raw/*/images/*.png; do cp "$image" "$out/collection/"; done
"$bin/unet-ray" segment "$out/train/best" "$out/collection" "$out/segment" --workers 2

cat <<TXT

Demo finished. Outputs:
  $out/train/metrics.csv     one row per epoch        $out/train/curves.png  loss and F1 curves
  $out/train/best/           best checkpoint by validation DSB score (model.pt + config.json,
                             loads without Ray; instance settings searched on the validation images)
  $out/train/tensorboard/    tensorboard --logdir $out/train/tensorboard
  $out/evaluate.json         pixel F1, IoU, DSB2018 score of the best checkpoint, per image too
  $out/train/val_images.csv  per-image validation scores of the last epoch
  $out/segment/              per image: .mask.png .labels.tif .geojson .nuclei.csv .overlay.png; manifest.csv
TXT
