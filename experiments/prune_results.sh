#!/bin/bash
# Regenerates every result of docs/results/pruning.md (about 2 hours on 2 CPU cores, two one-thread
# jobs side by side): trains the dense ResNet and ViT on all of Fashion-MNIST, runs the pruning grids,
# the MiniLM runs (needs `pip install -e '.[hf]'`) and the ridge check, then rebuilds the page.
# Run from the repository root: bash experiments/prune_results.sh
set -euo pipefail
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1
R=docs/results

$PY -m nmsparse train --model resnet --nm dense --epochs 8 --lr 0.1 --weight-decay 5e-4 --batch-size 128 \
    --threads 1 --seed 0 --out runs/fm_full_resnet --overwrite --no-progress &
$PY -m nmsparse train --model vit --nm dense --optimizer adamw --epochs 8 --lr 1e-3 --weight-decay 0.05 \
    --batch-size 128 --threads 1 --seed 0 --out runs/fm_full_vit --overwrite --no-progress &
wait

grid() {
    local m=$1 c=runs/fm_full_$1/final.safetensors
    $PY experiments/prune_fmnist.py --checkpoint $c --threads 1 --part 1 --calib 10,100 --transposable no,yes \
        --finetune-epochs 1 --out $R/pruning_fmnist_${m}_part1.json
    $PY experiments/prune_fmnist.py --checkpoint $c --threads 1 --part 2 --calib 100 --finetune-epochs 1 \
        --out $R/pruning_fmnist_${m}_part2.json
}
grid resnet &
grid vit &
wait

$PY experiments/prune_minilm.py --calib 128 --eval 500 --nm 2:4,4:8 \
    --methods magnitude,wanda,sparsegpt,adaprune-exact --out $R/pruning_minilm.json &
$PY experiments/prune_minilm.py --calib 128 --eval 500 --nm 2:4,4:8 \
    --methods adaprune-adam --iterations 1000 --out $R/pruning_minilm_adam.json &
wait

$PY experiments/adaprune_damp.py runs/fm_full_vit/final.safetensors runs/fm_full_resnet/final.safetensors \
    > $R/pruning_adaprune_damp.md
$PY experiments/prune_results_doc.py > $R/pruning.md
