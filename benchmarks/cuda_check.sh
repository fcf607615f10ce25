#!/usr/bin/env bash
# The CUDA path end to end, on a machine with a GPU: the CUDA tests (training on the GPU, roots and bases
# on the host CPU through pinned copies, bf16 storage, a GPU checkpoint resumed on the CPU, a Lightning
# Trainer with bf16 autocast), then the benchmark figures with `--device cuda` and the main recipe on the
# GPU. One call, within a time budget: each step gets what is left of it, the last ones may be cut.
#
#   bash benchmarks/cuda_check.sh OUT_DIR [BUDGET_SECONDS]
#
# Everything lands in OUT_DIR (one log per step, the figures under OUT_DIR/results), packed at the end
# into OUT_DIR/cuda.tar.gz. Installs the checkout with --no-deps: the machine's torch, Lightning and
# Accelerate are used as they are; wheels in .whl/ (e.g. jsonargparse for the console script) are added.
set -uo pipefail
OUT="${1:?usage: cuda_check.sh OUT_DIR [BUDGET_SECONDS]}"
DEADLINE=$((SECONDS + ${2:-500}))
RESERVE=20  # for packing the results
mkdir -p "$OUT/results"
export PYTHONUNBUFFERED=1
DEVICE=${DEVICE:-cuda} ACCELERATOR=${ACCELERATOR:-gpu}  # DEVICE=cpu ACCELERATOR=cpu: a dry run of this script

step() {  # step NAME LIMIT COMMAND...: run COMMAND for at most LIMIT seconds (less if the budget is short)
    local name=$1 limit=$2 left=$((DEADLINE - SECONDS - RESERVE))
    shift 2
    if ((left < 15)); then echo "=== $name: skipped, budget spent"; return; fi
    ((limit > left)) && limit=$left
    echo "=== $name (limit ${limit} s) at $(date +%T)"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "=== $name: exit $? after $((SECONDS - start)) s"
    tail -n "${TAIL:-12}" "$OUT/$name.log"
}
read -ra BENCH_EXTRA <<<"${BENCH_EXTRA:-}"  # --quick for a dry run
figure() {  # figure NAME LIMIT: one benchmark figure, merged into OUT/results
    step "figure_$1" "$2" python3 -m benchmarks.run --device "$DEVICE" --only "$1" --out "$OUT/results" "${BENCH_EXTRA[@]}"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import os, torch, lightning, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda,
  'lightning', lightning.__version__, 'accelerate', accelerate.__version__, 'threads', torch.get_num_threads(),
  'cpus', os.cpu_count(), 'load', os.getloadavg()[0])"
if compgen -G ".whl/*.whl" >/dev/null; then  # wheels the machine lacks (e.g. jsonargparse), carried along
    step wheels 60 python3 -m pip install --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
step install 120 python3 -m pip install --no-deps --no-build-isolation --no-index -e .
TAIL=40 step tests 180 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
figure refresh_hiding 150
figure step_time 180
read -ra RECIPE_EXTRA <<<"${RECIPE_EXTRA:-}"  # e.g. --trainer.max_steps=4 for a dry run
RECIPE=(python3 -m lightning_shampoo fit --config recipes/char_lm_shampoo.yaml --trainer.accelerator="$ACCELERATOR"
        --trainer.devices=1 --trainer.precision=bf16-mixed --trainer.enable_progress_bar=false --plot=false)
step recipe_sync 150 "${RECIPE[@]}" "${RECIPE_EXTRA[@]}"
step recipe_async 100 "${RECIPE[@]}" --twin=null --model.init_args.optimizer.init_args.refresh=async "${RECIPE_EXTRA[@]}"
figure memory 40
figure inverse_root 120
figure convergence 400
tar -czf /tmp/cuda.tar.gz -C "$OUT" . && mv /tmp/cuda.tar.gz "$OUT/" && echo "packed $(du -h "$OUT/cuda.tar.gz" | cut -f1)"
