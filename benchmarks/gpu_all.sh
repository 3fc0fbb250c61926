#!/usr/bin/env bash
# The GPU benchmarks in one go, most important first, each under its own time limit so that one slow or
# failing benchmark does not cost the others:
#
#     benchmarks/gpu_all.sh [sd15] [train] [sdxl]      # default: all three, in this order
#
# sd15  : SD1.5 512², 50 DDIM steps, batch 1 and 4, ours vs diffusers (random weights of the real architecture)
# train : stage-1 train step, SD1.5 architecture, 512², batch 8, bf16: step time, MFU, vs a PyTorch reference
# sdxl  : SDXL 1024², 20 Euler steps, batch 1, ours vs diffusers (random weights of the real architecture)
#
# Results go to benchmarks/results/ (and a copy to $RESULTS_COPY if set); logs to $LOG_DIR (default /tmp).
# Needs: jax with CUDA, flax, optax, orbax-checkpoint, torch, diffusers, transformers on `${PYTHON:-python3}`.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG_DIR=${LOG_DIR:-/tmp}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# JAX and PyTorch share the card inside one process: give JAX half of it instead of its default 75 %.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}
MARK=$(mktemp); WHICH=("$@")
[ ${#WHICH[@]} -eq 0 ] && WHICH=(sd15 train sdxl)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY - <<'EOF'
import importlib
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "torch", "diffusers", "transformers"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '?')}")
    except Exception as exc:  # report every missing package at once
        print(f"{name} MISSING: {exc}")
import jax
print("jax devices:", jax.devices())
EOF

run() {  # run NAME LIMIT_S ARGS...: one benchmark under its limit, its log kept
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
    local start=$SECONDS
    timeout "$limit" $PY "$@" 2>&1 | grep -v -E "Loading (weights|pipeline)|it/s\]$" | tee "$LOG_DIR/bench_$name.log"
    echo "=== $name exit ${PIPESTATUS[0]} after $((SECONDS - start))s"
}

for which in "${WHICH[@]}"; do
    case $which in
        sd15) run sd15 230 benchmarks/sampling_gpu.py --random-sd15 /tmp/sd15-random --steps 50 --batches 1,4 \
                  --repeats 2 --save ;;
        train) run train 230 benchmarks/train_step.py --size 512 --batch 8 --steps 5 --save ;;
        sdxl) run sdxl 215 benchmarks/sampling_gpu.py --random-sdxl /tmp/sdxl-random --size 1024 --steps 20 \
                  --batches 1 --repeats 2 --save ;;
        *) echo "unknown benchmark '$which' (expected sd15, train or sdxl)"; exit 2 ;;
    esac
    if [ -n "${RESULTS_COPY:-}" ]; then
        mkdir -p "$RESULTS_COPY"
        find benchmarks/results "$LOG_DIR" -maxdepth 1 -newer "$MARK" \( -name '*.json' -o -name 'bench_*.log' \) \
            -exec cp {} "$RESULTS_COPY"/ \;
    fi
done
