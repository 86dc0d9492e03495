#!/usr/bin/env bash
# The checks that need a CUDA device, as one run (about 6 minutes on one H200):
#   1. tests: the whole suite with CUDA visible. Every verifier's torch backend also runs on the
#      device (tests/conftest.py, BACKENDS), so do alpha*'s race quadrature on CUDA and the
#      engine's end-to-end G-tests with both models on the device
#      (tests/engine/test_sampling.py::test_engine_samples_follow_target_law_on_cuda).
#   2. bench_*: issue 12's decode bench (`mdsd bench`) on the bundled pair on CUDA, 8 held-out
#      prompts x 96 tokens: the default grid in bfloat16 and float32 at T = 0.7 and 1.0, and
#      `optimal` against `rrs_without_replacement` on 3x3 and 2x3 trees in bfloat16.
#   3. bound: benchmarks/bench_bound.py, whose GPU rows time the race quadrature on CUDA.
# Each step writes OUT_DIR/<step>.log and prints its exit status, time and last lines.
#
# Usage, from the repository root with the project importable (installed, or PYTHONPATH=src):
#   bash benchmarks/cuda_check.sh OUT_DIR
# DEVICE=cpu PROMPTS=2 TOKENS=16 runs the same steps on the CPU, small, to try the script.
set -u
out=${1:?usage: bash benchmarks/cuda_check.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
prompts=${PROMPTS:-8}
tokens=${TOKENS:-96}
workers=${WORKERS:-12}

step() {  # step NAME SECONDS COMMAND...: run COMMAND under a time limit, log to OUT_DIR/NAME.log
    local name=$1 limit=$2 start=$SECONDS status
    shift 2
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    status=$?
    echo "=== $name: exit $status after $((SECONDS - start)) s (limit $limit s)"
    tail -n "${TAIL:-25}" "$out/$name.log"
}

bench() {  # bench NAME DTYPE TEMPERATURE [OPTIONS...]: mdsd bench on the bundled pair
    local name=$1 dtype=$2 temperature=$3
    shift 3
    step "$name" 90 "$py" -c "from mdsd.cli import main; main()" bench --device "$device" \
        --dtype "$dtype" --temperature "$temperature" --prompts "$prompts" \
        --max-new-tokens "$tokens" --threads 1 "$@"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$out/machine.log"
"$py" -c "import numba, numpy, torch, transformers
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else '')
print('transformers', transformers.__version__, 'numba', numba.__version__, 'numpy', numpy.__version__)" \
    2>&1 | tee -a "$out/machine.log"

# ruff is a development tool, not a dependency of the library: the style test is left to CI
TAIL=15 step tests 180 "$py" -m pytest -n "$workers" -q -p no:cacheprovider \
    --deselect tests/test_style.py --durations=10
bench bench_bf16_t07 bfloat16 0.7
bench bench_f32_t07 float32 0.7
bench bench_bf16_t07_optimal bfloat16 0.7 --no-hf \
    -c without_replacement:rrs_without_replacement:3x3 -c without_replacement:optimal:3x3 \
    -c without_replacement:rrs_without_replacement:2x3 -c without_replacement:optimal:2x3
bench bench_bf16_t10 bfloat16 1.0
bench bench_f32_t10 float32 1.0
TAIL=40 step bound 40 "$py" benchmarks/bench_bound.py --repeats 3 --no-check
