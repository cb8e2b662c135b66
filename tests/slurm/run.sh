#!/usr/bin/env bash
# The real-SLURM tests: a one-node SLURM cluster on this machine runs the scripts of slurm/.
#
#   tests/slurm/run.sh            (as root; `make test` calls it after pytest)
#
# Installs slurm (Debian: slurmctld slurmd slurm-client munge) when missing, or prints
# "slurm: SKIP (reason)" and exits 0 when that is impossible (not root, no apt-get, no registry).
# Then starts munged + slurmctld + slurmd under a temp dir (tests/slurm/cluster.sh) and checks:
#   1. a trivial batch job runs;
#   2. slurm/pack.sbatch as a 2-task array packs two slides and merges one shard set;
#   3. slurm/train.sbatch trains the CPU smoke config to the end (checkpoint, metrics, weights);
#   4. slurm/embed.sbatch as a 2-task array embeds every shard exactly once (verify passes);
#   5. preemption: SIGUSR1 to a running training job's batch shell -> the trainer checkpoints
#      and exits, the job is requeued, the requeued job resumes at the saved step and finishes.
#      This one runs two training processes (gloo DDP on CPU), so the ranks must agree to stop.
# The daemons are always torn down (trap). Exit status 1 when any check failed; the last line is
# "slurm: N passed, M failed". Keeps the temp dir (logs) when something failed.
# Env: PATHGAN_SLURM_KEEP=1 keeps the temp dir; PATHGAN_SLURM_FAKE_TRAINER=1 swaps the trainer
# for tests/slurm/fake_trainer.py (to debug the plumbing alone).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT" || exit 1
STARTED=$(date +%s)
skip() { echo "slurm: SKIP ($*)"; exit 0; }
say() { echo "[slurm-test +$(( $(date +%s) - STARTED ))s] $*"; }

# --- packages ------------------------------------------------------------------------------------
have_slurm() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null
}
if ! have_slurm; then
    [ "$(id -u)" = 0 ] || skip "slurm is not installed and installing it needs root"
    command -v apt-get >/dev/null || skip "slurm is not installed and there is no apt-get"
    say "installing slurmctld slurmd slurm-client munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
            slurmctld slurmd slurm-client munge; } >/tmp/pathgan-slurm-apt.log 2>&1; then
        skip "apt-get install slurm failed: $(tail -n 1 /tmp/pathgan-slurm-apt.log)"
    fi
    have_slurm || skip "slurm commands still missing after apt-get install"
fi
[ "$(id -u)" = 0 ] || skip "the test cluster runs slurmctld/slurmd as root; run as root"

PY=$ROOT/.venv/bin/python
[ -x "$PY" ] || { echo "slurm: no $PY (run make venv)"; echo "slurm: 0 passed, 1 failed"; exit 1; }

# --- cluster -------------------------------------------------------------------------------------
# shellcheck source=tests/slurm/cluster.sh
. "$ROOT/tests/slurm/cluster.sh"
T=$(mktemp -d /tmp/pathgan-slurm.XXXXXX)
mkdir -p "$T/logs"
PASSED=0
FAILED=0
# shellcheck disable=SC2317  # called from the trap
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    cluster_stop "$T/cluster"   # cancels and waits for leftover jobs first
    if [ "$FAILED" -gt 0 ] || [ "${PATHGAN_SLURM_KEEP:-0}" = 1 ]; then
        echo "slurm: logs kept in $T"
    else
        rm -rf "$T"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

pass() { PASSED=$((PASSED + 1)); say "ok - $1"; }
fail() {
    FAILED=$((FAILED + 1)); say "FAIL - $1"
    local log
    for log in "${@:2}"; do
        [ -f "$log" ] && { echo "---- tail of $log"; tail -n 40 "$log"; echo "----"; }
    done
}

finish() {
    echo "slurm: $PASSED passed, $FAILED failed ($(( $(date +%s) - STARTED )) s)"
    [ "$FAILED" -eq 0 ]
    exit $?
}

say "starting a one-node cluster in $T/cluster"
if ! cluster_start "$T/cluster"; then
    fail "cluster start" "$T/cluster/log/slurmctld.log" "$T/cluster/log/slurmd.log" \
        "$T/cluster/log/munged.log"
    finish
fi
pass "cluster start: $(sinfo -h -o '%D node, %c CPUs, gres %G')"

export WANDB_MODE=offline HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export WANDB_DIR=$T/wandb
mkdir -p "$WANDB_DIR"
if [ "${PATHGAN_SLURM_FAKE_TRAINER:-0}" = 1 ]; then
    export PATHGAN_TRAIN_MODULE=fake_trainer PYTHONPATH=$ROOT/tests/slurm${PYTHONPATH:+:$PYTHONPATH}
    say "NOTE: training checks use tests/slurm/fake_trainer.py"
    SMOKE=$T/fake-smoke.yaml
    echo "fake: true" >"$SMOKE"
    PREEMPT_PROCS=1
else
    SMOKE=configs/dcgan-smoke.yaml
    PREEMPT_PROCS=2
fi

# wait_job JOBID SECONDS -> prints the final state(s) of the job (every array task), one line
wait_job() {
    local job=$1 limit=$2 i
    for ((i = 0; i < limit; i++)); do
        [ -z "$(squeue -h -j "$job" 2>/dev/null)" ] && break
        sleep 1
    done
    if [ -n "$(squeue -h -j "$job" 2>/dev/null)" ]; then
        echo "TIMEOUT"
        scancel "$job" 2>/dev/null
        return 1
    fi
    scontrol -o show job "$job" | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p' | sort -u | tr '\n' ' '
}
job_field() { scontrol -o show job "$1" | head -n1 | tr ' ' '\n' | sed -n "s/^$2=//p"; }

# --- 1. a trivial job ------------------------------------------------------------------------------
# shellcheck disable=SC2016  # expanded in the job
j=$(sbatch --parsable --output="$T/logs/hello-%j.out" --wrap 'echo hello from $SLURM_JOB_ID')
state=$(wait_job "$j" 60)
if [ "$state" = "COMPLETED " ] && grep -q "hello from $j" "$T/logs/hello-$j.out"; then
    pass "trivial batch job"
else
    fail "trivial batch job (state $state)" "$T/logs/hello-$j.out" "$T/cluster/log/slurmd.log"
fi

# --- 2. pack array -----------------------------------------------------------------------------------
mkdir -p "$T/in"
cp shards/cmu_small_region.svs "$T/in/slide_a.svs"
cp shards/cmu_small_region.svs "$T/in/slide_b.svs"
SHARDS=$T/shards
j=$(sbatch --parsable --array=0-1 --cpus-per-task=1 --output="$T/logs/pack-%A_%a.out" \
    slurm/pack.sbatch "$SHARDS" "$T/in/slide_a.svs" "$T/in/slide_b.svs" \
    -- --patch-sizes 512 --max-count 3)
state=$(wait_job "$j" 180)
if [ "$state" = "COMPLETED " ] && "$PY" - "$SHARDS" <<'PY' && "$PY" -m pathgan shards verify "$SHARDS" >"$T/logs/verify.out" 2>&1
import json, os, sys
from pathlib import Path
out = Path(sys.argv[1])
merged = json.loads((out / "manifest.json").read_text())
parts = [json.loads((out / "parts" / f"task-{i}" / "manifest.json").read_text()) for i in (0, 1)]
assert merged["total_samples"] == sum(p["total_samples"] for p in parts) > 0, "totals"
assert len(merged["shards"]) == sum(len(p["shards"]) for p in parts) >= 2, "shard count"
names = [s["name"] for s in merged["shards"]]
assert len(set(names)) == len(names) and all((out / n).is_file() for n in names), names
for shard in merged["shards"]:
    assert os.path.samefile(out / shard["name"], out / "parts" / shard["part"]), shard
print(f"pack: {merged['total_samples']} samples in {len(names)} shards")
PY
then
    pass "pack.sbatch 2-task array + merge ($(grep -c '"name"' "$SHARDS/manifest.json") shards)"
else
    fail "pack.sbatch array (state $state)" "$T"/logs/pack-"$j"_0.out "$T"/logs/pack-"$j"_1.out \
        "$T/logs/verify.out"
fi

# --- 3. train to the end ---------------------------------------------------------------------------
STEPS=6
RUN1=$T/runs/smoke
j=$(sbatch --parsable --output="$T/logs/train-%j.out" slurm/train.sbatch "$SMOKE" \
    run.dir="$RUN1" data.shards="$SHARDS" train.max_steps=$STEPS ckpt.every=3 log.every=1)
state=$(wait_job "$j" 240)
if [ "$state" = "COMPLETED " ] && [ "$(job_field "$j" ExitCode)" = "0:0" ] \
    && "$PY" - "$RUN1" "$STEPS" <<'PY'
import json, sys
from pathlib import Path
run, steps = Path(sys.argv[1]), int(sys.argv[2])
assert (run / "checkpoints" / f"checkpoint-{steps:06d}").is_dir(), sorted((run / "checkpoints").iterdir())
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
assert rows and rows[-1]["step"] == steps, rows[-1:]
assert all("Loss_D" in r and "Loss_G" in r for r in rows), rows[0]
assert (run / "generator.safetensors").is_file(), "no generator.safetensors"
assert not (run / "PREEMPTED").exists(), "PREEMPTED left behind"
PY
then
    pass "train.sbatch: smoke config trained to step $STEPS (checkpoint, metrics, generator)"
else
    fail "train.sbatch smoke run (state $state, exit $(job_field "$j" ExitCode))" "$T/logs/train-$j.out"
fi

# --- 4. embed array ------------------------------------------------------------------------------
ENCODER=timm:vit_tiny_patch16_224:random
j=$(sbatch --parsable --array=0-1 --output="$T/logs/embed-%A_%a.out" \
    slurm/embed.sbatch "$SHARDS" "$ENCODER" --batch-size 8)
state=$(wait_job "$j" 240)
if [ "$state" = "COMPLETED " ] \
    && "$PY" -m pathgan embed verify "$SHARDS" --encoder "$ENCODER" >"$T/logs/embed-verify.out" 2>&1 \
    && "$PY" - "$SHARDS" "$T"/logs/embed-"$j"_0.out "$T"/logs/embed-"$j"_1.out <<'PY'
import json, re, sys
from pathlib import Path
shards = Path(sys.argv[1])
n = len(json.loads((shards / "manifest.json").read_text())["shards"])
assigned = written = 0
for log in sys.argv[2:]:
    m = re.search(r"shards: (\d+) assigned, (\d+) written, (\d+) already done", Path(log).read_text())
    assert m, f"no summary in {log}"
    a, w, s = map(int, m.groups())
    assert a == w and s == 0, f"{log}: {m.group(0)}"
    assigned, written = assigned + a, written + w
files = list(shards.glob("embeddings/*/*.npz"))
assert assigned == written == n == len(files), (assigned, written, n, len(files))
print(f"embed: {n} shards, each embedded once")
PY
then
    pass "embed.sbatch 2-task array: every shard embedded exactly once, verify passes"
else
    fail "embed.sbatch array (state $state)" "$T"/logs/embed-"$j"_0.out "$T"/logs/embed-"$j"_1.out \
        "$T/logs/embed-verify.out"
fi

# --- 5. preemption: SIGUSR1 -> checkpoint -> requeue -> resume -> finish ----------------------------
STEPS=40
RUN2=$T/runs/preempt
j=$(PATHGAN_PROCS_PER_NODE=$PREEMPT_PROCS sbatch --parsable --output="$T/logs/preempt-%j.out" \
    slurm/train.sbatch "$SMOKE" run.dir="$RUN2" data.shards="$SHARDS" \
    train.max_steps=$STEPS ckpt.every=1000 log.every=1)
# Wait until it is really training (a few steps logged), then preempt it by hand.
for _ in $(seq 240); do
    [ -f "$RUN2/metrics.jsonl" ] && [ "$(wc -l <"$RUN2/metrics.jsonl")" -ge 3 ] && break
    [ -z "$(squeue -h -j "$j")" ] && break
    sleep 0.5
done
scancel --signal=USR1 --batch "$j"
say "sent SIGUSR1 to job $j's batch shell; waiting for checkpoint, requeue and resume"
state=$(wait_job "$j" 300)
log=$T/logs/preempt-$j.out
if [ "$state" = "COMPLETED " ] && [ "$(job_field "$j" Restarts)" = 1 ] \
    && "$PY" - "$RUN2" "$STEPS" "$log" <<'PY'
import json, re, sys
from pathlib import Path
run, steps, log = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]).read_text()
m = re.search(r"preempted at step (\d+)", log)
assert m, "no 'preempted at step N' in the job log"
saved = int(m.group(1))
assert 0 < saved < steps, saved
assert (run / "checkpoints" / f"checkpoint-{saved:06d}").is_dir(), "no checkpoint at the preempted step"
assert "requeueing job" in log and "(restart 1)" in log, "no requeue in the log"
rows = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
assert rows[-1] == steps, rows[-5:]
# Resumed, not restarted: steps never go back (the second attempt starts after `saved`).
assert all(b > a for a, b in zip(rows, rows[1:])), rows
assert not (run / "PREEMPTED").exists(), "PREEMPTED left behind"
print(f"preempted at step {saved}, resumed and finished at step {steps}")
PY
then
    pass "preemption: USR1 -> checkpoint at step $(grep -o 'preempted at step [0-9]*' "$log" | head -n1 | grep -o '[0-9]*$') -> requeued -> resumed -> finished"
else
    fail "preemption (state $state, restarts $(job_field "$j" Restarts))" "$log"
fi

finish
