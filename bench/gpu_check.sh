#!/usr/bin/env bash
# The GPU check (issues 12 and 20): every GPU path of pathgan and every GPU figure of
# BENCHMARKS.md in one run of at most 9 minutes on one H100/H200, on a bare machine with no
# network: the training loop with the decoded-patch cache on the device and with the stream,
# the networks alone and the plain fp32 loop; each shard format; `pathgan embed` from shards
# against the encoder's forward-only rate.
#
#   bench/gpu_check.sh             on a GPU machine (make gpu-check)
#   bench/gpu_check.sh --dry-run   the same steps at tiny sizes on the CPU (tests/test_gpu_check.py)
#
# Writes $OUT/gpu_check.json (every figure, the device, torch, the commit, each step's outcome
# and the targets, pass or fail) and $OUT/gpu_check.log; OUT defaults to ./gpu-check-out.
# PYTHON defaults to .venv/bin/python when there is one, else python3. Packages the machine
# lacks come from the wheels in .whl/ (make gpu-wheels, listed in bench/gpu_wheels.txt), pathgan
# from this checkout. Each step has a time limit; one that fails or runs out of time is recorded
# in the JSON and the next step runs; the exit code is 1 when a step failed.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DRY_RUN=0
case "${1:-}" in
    --dry-run) DRY_RUN=1 ;;
    "") ;;
    *) echo "usage: bench/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
if [[ -z ${PYTHON:-} ]]; then
    PYTHON=python3
    [[ -x $REPO/.venv/bin/python ]] && PYTHON=$REPO/.venv/bin/python
fi
if ! ((DRY_RUN)) && ! "$PYTHON" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null
then
    echo "gpu_check: $PYTHON has no torch that sees a CUDA device; on a CPU, use --dry-run" >&2
    exit 2
fi
STARTED=$(date +%s)
OUT=${OUT:-$REPO/gpu-check-out}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
exec > >(tee "$OUT/gpu_check.log") 2>&1
TEE=$!
export PYTHONPATH=$REPO PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled
export TMPDIR=$WORK  # pytest's and the benchmarks' scratch files, removed at the end
cd "$REPO" || exit 2

# The commit checked: git where .git came along, else what `make gpu-wheels` recorded.
COMMIT=$(git rev-parse HEAD 2>/dev/null) && [[ -n $(git status --porcelain 2>/dev/null) ]] \
    && COMMIT="$COMMIT (with uncommitted changes)"
[[ -n $COMMIT ]] || COMMIT="$(cat .whl/COMMIT 2>/dev/null || echo unknown) (from .whl/COMMIT)"

# Sizes and time limits (seconds). On the GPU the limits add up to 530 s (a cold Python on a
# fresh machine takes 10-20 s to import torch, timm and pytest; inductor compiles for a minute,
# later processes reuse its cache), so that the whole check takes at most 9 minutes;
# LIMIT_<STEP>=N in the environment moves time between steps for a rerun. On the CPU they only
# stop a hung step (a loaded 2-core machine is slow).
if ((DRY_RUN)); then
    LIMIT_SETUP=300 LIMIT_DATA=300 LIMIT_STACKING=300 LIMIT_PYTEST=900 LIMIT_TRAIN=900
    LIMIT_FORMATS=600 LIMIT_EMBED=600 LIMIT_EMBGAN=600 LIMIT_REPORT=120
    DATA_ARGS=(--stride 448 --device cpu --workers 1)
    STACKING_ARGS=(--batch-size 4 --workers 1 --batches 2 --rounds 1)
    TRAIN_ARGS=(--ngf 8 --ndf 8 --batch-size 4 --workers 1 --warmup-steps 1 --window-steps 1
                --windows 1 --networks-precision bf16
                --variants bf16-channels-last-cache,bf16-channels-last-stream)
    FORMATS_ARGS=(--batch-size 4 --batches 2 --rounds 1 --train --ngf 8 --workers 1)
    EMBED_ARGS=(--timm-model vit_tiny_patch16_224 --images 4 --per-shard 2 --batch-sizes 2,4
                --repeats 1 --matmul-size 256 --forward-iterations 1 --num-workers 1)
    EMBGAN_ARGS=(--batch-size 2 --ngf 8 --repeats 1
                 --torch-encoder timm:vit_tiny_patch16_224:random)
    export PATHGAN_GPU_TESTS_ON_CPU=1 OMP_NUM_THREADS=1
else
    : "${LIMIT_SETUP:=30}" "${LIMIT_DATA:=40}" "${LIMIT_STACKING:=20}" "${LIMIT_PYTEST:=140}"
    : "${LIMIT_TRAIN:=150}" "${LIMIT_FORMATS:=60}" "${LIMIT_EMBED:=60}" "${LIMIT_EMBGAN:=20}"
    : "${LIMIT_REPORT:=10}"
    LOADERS=$(($(nproc) - 1))  # one loader worker per core but the trainer's
    DATA_ARGS=(--stride 112 --workers 8)
    STACKING_ARGS=(--batch-size 128 --workers "$LOADERS" --batches 8 --rounds 1)
    # the plain fp32 loop, the networks alone (GPU defaults), the loop with the device cache
    # and with the stream; bf16-channels-last-compile: compiled like the networks alone
    TRAIN_ARGS=(--ngf 64 --ndf 64 --batch-size 128 --workers "$LOADERS" --warmup-steps 5
                --window-steps 5 --windows 3 --networks-precision bf16 --networks-compile
                --variants bf16-channels-last-compile-cache,bf16-channels-last-compile-stream)
    # each format's loop streams, uncompiled (compiles would not fit the step's limit)
    FORMATS_ARGS=(--batch-size 128 --batches 8 --rounds 1 --train --ngf 64
                  --workers "$LOADERS")
    # no compiled forward figure: inductor's compile of ViT-S would not fit the step's limit
    # (bench/embed_throughput.py --compile-backend inductor measures it on its own)
    EMBED_ARGS=(--images 4096 --plain-images 512 --per-shard 512 --batch-sizes 64,128,256,512
                --repeats 1 --num-workers 8 --compile-backend none)
    EMBGAN_ARGS=(--batch-size 128 --ngf 64 --repeats 3)
fi

# step NAME LIMIT COMMAND...: runs COMMAND under LIMIT; its stdout goes to WORK/NAME.out (and
# the log), its exit code and time to WORK/NAME.status. Never stops the script.
step() {
    local name=$1 limit=$2 started rc tenths
    shift 2
    echo "=== $name (limit ${limit} s): $*"
    started=$(date +%s%N)
    timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.out"
    rc=$?
    tenths=$((($(date +%s%N) - started) / 100000000))
    cat "$WORK/$name.out"
    printf '{"rc": %d, "elapsed_s": %d.%d, "limit_s": %d}\n' "$rc" $((tenths / 10)) \
        $((tenths % 10)) "$limit" >"$WORK/$name.status"
    printf '=== %s: exit %d after %d.%d s\n' "$name" "$rc" $((tenths / 10)) $((tenths % 10))
}

# The wheels of what this Python lacks, installed into the work folder.
install_missing_wheels() {
    local requirement name missing=()
    while read -r requirement; do
        name=${requirement%%==*}
        "$PYTHON" -c "import $name" 2>/dev/null && continue
        [[ -f $(echo .whl/"$name"-*.whl) ]] \
            || echo "gpu_check: $name is missing and .whl/ has no wheel of it (make gpu-wheels)"
        missing+=(.whl/"$name"-*.whl)
    done < <(grep -v '^#' bench/gpu_wheels.txt)
    ((${#missing[@]})) || return 0
    echo "installing ${missing[*]}"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$WORK/site" "${missing[@]}"
}

# A dry run hides from pathgan what the GPU machine does not have (see that sitecustomize.py).
if ((DRY_RUN)); then
    export PATHGAN_ABSENT_MODULES="tensorflow keras wandb tiffslide openslide torch_fidelity"
    PYTHONPATH=$REPO/bench/absent_modules:$PYTHONPATH
fi
export PYTHONPATH=$WORK/site:$PYTHONPATH  # the wheels, if any were needed

echo "gpu_check: $( ((DRY_RUN)) && echo 'CPU dry run' || echo 'GPU run'), $PYTHON, commit $COMMIT"
install_missing_wheels
step setup "$LIMIT_SETUP" "$PYTHON" -c "import pathgan.cli, pathgan.shards.stream, \
pathgan.shards.convert, pathgan.train.loop, pathgan.train.cache, pathgan.evaluation, \
pathgan.sample, pathgan.embed, timm, pytest
print('every module of the check imports')"
step data "$LIMIT_DATA" "$PYTHON" bench/gpu_data.py --out "$WORK/data" "${DATA_ARGS[@]}"
export PATHGAN_GPU_DATA=$WORK/data  # the tests use the shard set made by the data step
step batch_stacking "$LIMIT_STACKING" "$PYTHON" bench/batch_stacking.py \
    --shards "$WORK/data/shards" "${STACKING_ARGS[@]}"
# pytest prints failures at the end: a per-test limit (pytest-timeout, on the GPU machines)
# keeps one slow test from taking the whole step, and the report, with it.
PER_TEST_LIMIT=()
"$PYTHON" -c "import pytest_timeout" 2>/dev/null && PER_TEST_LIMIT=(--timeout 100)
step pytest "$LIMIT_PYTEST" "$PYTHON" -m pytest -m gpu tests/test_gpu.py -q --durations 5 \
    -p no:cacheprovider --basetemp "$WORK/pytest" --junitxml "$WORK/pytest.xml" \
    "${PER_TEST_LIMIT[@]}"
step train_throughput "$LIMIT_TRAIN" "$PYTHON" bench/train_throughput.py \
    --shards "$WORK/data/shards" "${TRAIN_ARGS[@]}"
step shard_formats "$LIMIT_FORMATS" "$PYTHON" bench/shard_formats.py \
    --shards "$WORK/data/shards" "${FORMATS_ARGS[@]}"
step embed_throughput "$LIMIT_EMBED" "$PYTHON" bench/embed_throughput.py --encoders timm \
    --precision bf16 "${EMBED_ARGS[@]}"
step embgan_throughput "$LIMIT_EMBGAN" "$PYTHON" bench/embgan_throughput.py --encoders torch \
    --precision bf16 "${EMBGAN_ARGS[@]}"
timeout "$LIMIT_REPORT" "$PYTHON" bench/gpu_report.py --work "$WORK" \
    --out "$OUT/gpu_check.json" --commit "$COMMIT" --started "$STARTED" \
    $( ((DRY_RUN)) && echo --dry-run)
rc=$?  # 1 when a step failed
rm -rf "$WORK"
exec >&- 2>&-  # let tee write the end of the log before the script ends
# ... but not for ever: a process a timed-out step left behind (a compile worker) may still
# hold the pipe open, and then tee never sees its end.
for _ in {1..50}; do kill -0 "$TEE" 2>/dev/null || break; sleep 0.1; done
exit $rc
