#!/usr/bin/env bash
# The GPU check of the "triton" executor, in one command on one GPU, from a plain checkout:
#
#     bash benchmarks/gpu_check.sh [RESULTS_FILE]          # default: gpu_check_results.md
#     bash benchmarks/gpu_check.sh --self-check [FILE]     # the same steps at toy sizes on the CPU, under
#                                                         # Triton's interpreter: proves the script runs
#
# What it needs is what the GPU machines have (SPEC section 8): `python3` with torch, triton (>= 3.6),
# numpy, transformers, accelerate and pytest; nothing of ours installed (the checkout goes on PYTHONPATH),
# no `datasets`, no `evaluate`, no network. Worst case (the sum of the sections' timeouts) 7 minutes.
#
# It writes every result into one markdown file:
#   0. every kernel launch compiled for this GPU's architecture (tests/triton_compile.py): it stops here,
#      saying so, when a kernel does not compile (or spills);
#   1. the CUDA tests (tests/test_triton_cuda.py): decisions equal to the "torch" executor's on CUDA
#      tensors, no synchronisation under torch.cuda.set_sync_debug_mode("error"), CUDA-graph capture
#      (capturable=True) replaying like eager steps. (The rule matrix holds the same kernels to the SPEC
#      reference in CI, under the interpreter.);
#   2. benchmarks/step_time.py --device cuda: GPT-2-small shapes (topc 5/10/20, fp32 and bf16 memory,
#      admitting and rarely admitting) and a 1.01B-parameter set (topc 5/10), against torch's fused,
#      foreach and for-loop AdamW, timed in alternating rounds (tensors drawn on the GPU);
#   3. benchmarks/trainer_throughput.py --synthetic: Trainer samples/s, memopt_adamw against
#      adamw_torch_fused (a 25M-parameter GPT-2-style LM from a config on random tokens: nothing to load).
# Targets (issue 21), on an H100/H200: fp32 memory topc=10 admitting <= 1.8x fused AdamW; bf16 <= 1.65x;
# rarely admitting <= 1.35x; flat across topc; Trainer throughput >= 0.97x.
set -uo pipefail
cd "$(dirname "$0")/.."
# the checkout itself, not an installed copy: the GPU machines have none
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

SELF_CHECK=0
if [[ "${1:-}" == "--self-check" ]]; then
    SELF_CHECK=1
    shift
fi
OUT=${1:-gpu_check_results.md}
export PYTHONUNBUFFERED=1
status=0

section() { printf '\n## %s\n\n' "$1" >>"$OUT"; }
# run TITLE TIMEOUT CMD...: the command's output into the results file, inside a code block
run() {
    local title=$1 limit=$2
    shift 2
    section "$title"
    printf '`%s`\n\n```\n' "$*" >>"$OUT"
    local start=$SECONDS
    timeout "$limit" "$@" >>"$OUT" 2>&1
    local rc=$?
    printf '```\nexit %s, %s s\n' "$rc" "$((SECONDS - start))" >>"$OUT"
    if [[ $rc -ne 0 ]]; then status=1; fi
}

if [[ $SELF_CHECK == 1 ]]; then
    export TRITON_INTERPRET=1
    DEVICE=cpu
    ARCH=90
    SMALL=(--model tiny --topc 2 --steps 2 --rounds 1 --warmup 3)
    LARGE=(--model tiny --topc 2 --steps 2 --rounds 1 --warmup 3)
    TRAINER=(--synthetic --layers 1 --steps 3 --batch 2 --length 32 --repeats 1)
    TESTS=(tests/test_triton_executor.py -k "reads_nothing and AdamW-unsharded")
    SLOW=4  # the interpreter and a CPU compile: the GPU's time limits, four times over
else
    DEVICE=cuda
    ARCH=$("$PY" -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())))") || ARCH=90
    SMALL=(--model gpt2-124m --topc 5 10 20 --steps 30 --rounds 3 --warmup 25)
    LARGE=(--model gpt-1b --topc 5 10 --steps 10 --rounds 2 --warmup 10)
    TRAINER=(--synthetic --steps 40 --batch 16 --length 256 --repeats 2)
    TESTS=(tests/test_triton_cuda.py)
    SLOW=1
fi

{
    echo "# benchmarks/gpu_check.sh$([[ $SELF_CHECK == 1 ]] && echo ' --self-check (CPU, interpreter: no GPU numbers)')"
    echo
    date -u
    echo
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.cuda.is_available())"
} >"$OUT" 2>&1

# Timeouts: 90 + 60 + 70 + 45 + 70 + 85 = 420 s at most on a GPU; typically about 4 minutes on an H100.
run "0. kernels compiled for sm_$ARCH" $((90 * SLOW)) "$PY" tests/triton_compile.py --arch "$ARCH"
if [[ $status -ne 0 ]]; then
    msg="the Triton kernels do not compile cleanly for sm_$ARCH (section 0 of $OUT): nothing else was run"
    printf '\n**Stopped: %s.**\n' "$msg" >>"$OUT"
    echo "gpu_check: $msg" >&2
    exit 1
fi
run "1. CUDA tests: decisions, sync debug mode, graph capture" $((60 * SLOW)) "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
run "2a. step time, GPT-2-small shapes, admitting" $((70 * SLOW)) \
    "$PY" benchmarks/step_time.py --device "$DEVICE" --executor triton --buffer-dtype fp32 bf16 "${SMALL[@]}"
run "2b. step time, GPT-2-small shapes, rarely admitting" $((45 * SLOW)) \
    "$PY" benchmarks/step_time.py --device "$DEVICE" --executor triton --buffer-dtype fp32 bf16 --admit rarely "${SMALL[@]}"
run "2c. step time, 1.01B parameters, admitting" $((70 * SLOW)) \
    "$PY" benchmarks/step_time.py --device "$DEVICE" --executor triton --buffer-dtype fp32 bf16 "${LARGE[@]}"
run "3. Trainer throughput" $((85 * SLOW)) "$PY" benchmarks/trainer_throughput.py "${TRAINER[@]}"

echo "results: $OUT (exit $status)"
exit $status
