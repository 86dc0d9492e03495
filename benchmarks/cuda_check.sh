#!/usr/bin/env bash
# The checks that need a CUDA device. Steps (all by default, or those named after OUT_DIR):
#   tests         the tests that run on the device: every verifier's torch backend on CUDA
#                 (tests/conftest.py, BACKENDS), alpha*'s race quadrature on CUDA, and the
#                 engine's end-to-end G-tests with both models on the device
#                 (tests/engine/test_sampling.py::test_engine_samples_follow_target_law_on_cuda).
#                 It also fills numba's on-disk cache, which the steps after it then load.
#   bench_bf16_t07, bench_bf16_t10, bench_f32_t07, bench_f32_t10
#                 issue 12's decode bench (`mdsd bench`, default grid) on the bundled pair on
#                 CUDA, 8 held-out prompts x 96 tokens, bfloat16 / float32, T = 0.7 / 1.0.
#   bench_optimal `optimal` against `rrs_without_replacement` on 3x3 and 2x3 trees, bfloat16.
#   bound         benchmarks/bench_bound.py, whose GPU rows time the race quadrature on CUDA.
# Each step writes OUT_DIR/<step>.log and prints its exit status, time and last lines.
#
# Times seen on one H200 (2026-12-04): the whole suite took over 180 s with 12 workers (the CUDA
# backend's statistical tests launch many small kernels); a bench run 45-60 s with numba's cache
# warm, about 95 s in bfloat16 with it cold. A device call runs at most 10 minutes: split the
# steps over calls, e.g. `tests bench_bf16_t07 bench_bf16_t10` then the rest.
#
# Usage, from the repository root with the project importable (installed, or PYTHONPATH=src):
#   bash benchmarks/cuda_check.sh OUT_DIR [STEP...]
# DEVICE=cpu PROMPTS=1 TOKENS=8 runs the benches on the CPU, small, to try the script.
set -u
out=${1:?usage: bash benchmarks/cuda_check.sh OUT_DIR [STEP...]}
shift
steps=${*:-tests bench_bf16_t07 bench_bf16_t10 bench_f32_t07 bench_f32_t10 bench_optimal bound}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
prompts=${PROMPTS:-8}
tokens=${TOKENS:-96}
workers=${WORKERS:-8}

step() {  # step NAME SECONDS COMMAND...: run COMMAND under a time limit, log to OUT_DIR/NAME.log
    local name=$1 limit=$2 start=$SECONDS status
    shift 2
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    status=$?
    echo "=== $name: exit $status after $((SECONDS - start)) s (limit $limit s)"
    tail -n "${TAIL:-6}" "$out/$name.log"
}

bench() {  # bench NAME DTYPE TEMPERATURE [OPTIONS...]: mdsd bench on the bundled pair
    local name=$1 dtype=$2 temperature=$3
    shift 3
    step "$name" 150 "$py" -c "from mdsd.cli import main; main()" bench --device "$device" \
        --dtype "$dtype" --temperature "$temperature" --prompts "$prompts" \
        --max-new-tokens "$tokens" --threads 1 "$@"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$out/machine.log"
"$py" -c "import numba, numpy, torch, transformers
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else '')
print('transformers', transformers.__version__, 'numba', numba.__version__, 'numpy', numpy.__version__)" \
    2>&1 | tee -a "$out/machine.log"

for name in $steps; do
    case $name in
        tests) step tests 300 "$py" -m pytest -n "$workers" -q -p no:cacheprovider -k cuda \
            --durations=10 tests ;;
        bench_bf16_t07) bench "$name" bfloat16 0.7 ;;
        bench_bf16_t10) bench "$name" bfloat16 1.0 ;;
        bench_f32_t07) bench "$name" float32 0.7 ;;
        bench_f32_t10) bench "$name" float32 1.0 ;;
        bench_optimal) bench "$name" bfloat16 0.7 --no-hf \
            -c without_replacement:rrs_without_replacement:3x3 -c without_replacement:optimal:3x3 \
            -c without_replacement:rrs_without_replacement:2x3 -c without_replacement:optimal:2x3 ;;
        bound) TAIL=40 step bound 60 "$py" benchmarks/bench_bound.py --repeats 3 --no-check ;;
        *) echo "unknown step: $name" >&2; exit 2 ;;
    esac
done
