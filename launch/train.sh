#!/usr/bin/env bash
# Launch pathgan training with the right Accelerate config for this machine.
#
#   launch/train.sh CONFIG [--resume latest|PATH] [key=value ...]
#
# It counts this node's GPUs and picks one of
#   launch/cpu.yaml        no GPU (fp32; PATHGAN_PROCS_PER_NODE=2 runs 2 ranks over gloo)
#   launch/1gpu.yaml       one GPU
#   launch/node.yaml       all GPUs of this node, one process each (DDP, NCCL)
#   launch/multinode.yaml  several nodes: one train.sh per node (srun --ntasks-per-node=1),
#                          the per-job values filled from SLURM_* / MASTER_* (below)
# then runs `accelerate launch --config_file ... -m pathgan train --config CONFIG ...`.
# GPU runs use bf16, or fp16 (with loss scaling) on GPUs without bf16. (pathgan train passes its
# own train.mixed_precision to Accelerator, default auto = the same rule, and that wins.)
#
# Examples (from the repository root):
#   launch/train.sh configs/dcgan-smoke.yaml run.dir=runs/smoke          # CPU or one GPU
#   launch/train.sh configs/dcgan.yaml --resume latest run.dir=runs/dcgan # all GPUs of the node
#   srun --ntasks-per-node=1 launch/train.sh configs/dcgan.yaml ...       # every node of a job
#                                                                          # (slurm/train.sbatch)
# Environment (all optional):
#   PATHGAN_ACCELERATE_CONFIG  use this accelerate config file instead of picking one
#   PATHGAN_GPUS_PER_NODE      GPUs of this node to use (default: all that torch sees)
#   PATHGAN_PROCS_PER_NODE     processes per node (default: the GPU count, 1 on CPU)
#   PATHGAN_MIXED_PRECISION    no|fp16|bf16 for accelerate launch (pathgan train: use the
#                              train.mixed_precision=... override instead)
#   PATHGAN_NUM_MACHINES       nodes (default: SLURM_STEP_NUM_NODES inside an srun step, else 1)
#   PATHGAN_MACHINE_RANK       this node's rank (default: SLURM_NODEID, else 0)
#   PATHGAN_VENV               the virtualenv to activate when none is (default: .venv here)
#   MASTER_ADDR, MASTER_PORT   rendezvous of rank 0 (default: first host of SLURM_JOB_NODELIST,
#                              and a port derived from SLURM_JOB_ID and SLURM_RESTART_COUNT
#                              by launch/env.sh, else 127.0.0.1:29500)
#   PATHGAN_TRAIN_MODULE       a python module to launch instead of `pathgan train` (tests swap it)
#
# Signals: inside a SLURM job (or with PATHGAN_SHIELD_LAUNCHER=1) the accelerate/torchrun
# launcher is made to ignore SIGUSR1 and SIGTERM, so that a signal sent to the whole job step
# (scancel --signal=USR1 JOB, srun forwarding, SLURM's SIGTERM before a kill) reaches only the
# training processes: they install their own handlers (which replace the inherited "ignore"),
# finish the step, checkpoint and exit 0, and the launcher then exits normally. Without this the
# launcher dies on SIGUSR1 (default action) and torchrun answers SIGTERM by killing its workers
# after 30 s, possibly in the middle of writing a checkpoint.
set -euo pipefail

die() { echo "launch/train.sh: error: $*" >&2; exit 2; }

# First thing, so that an early signal cannot kill this script or the launcher (see above).
if [ -n "${SLURM_JOB_ID:-}" ] || [ "${PATHGAN_SHIELD_LAUNCHER:-0}" = 1 ]; then
    trap '' USR1 TERM
    # torchrun's agent installs its own SIGTERM handler unless told otherwise.
    export TORCHELASTIC_SIGNALS_TO_HANDLE=${TORCHELASTIC_SIGNALS_TO_HANDLE:-SIGINT,SIGHUP,SIGQUIT}
fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[ $# -ge 1 ] || die "usage: launch/train.sh CONFIG [--resume latest|PATH] [key=value ...]"
CONFIG=$1
shift
[ -f "$CONFIG" ] || die "config $CONFIG: no such file"

# shellcheck source=launch/env.sh
. "$ROOT/launch/env.sh"
pathgan_activate_venv "$ROOT"
PYTHON=${PYTHON:-python}

# --- this node's GPUs and precision -------------------------------------------------------------
# pathgan decides (pathgan/train/precision.py: bf16 on compute capability >= 8.0, fp16 below,
# no on CPU), so that this script and pathgan train never disagree. A failed probe stops here:
# guessing "no GPU" would quietly train on the CPU of a GPU node.
probe=$("$PYTHON" -m pathgan.train.precision 2>&1) \
    || die "cannot ask $PYTHON for this node's GPUs (is pathgan installed?): ${probe##*$'\n'}"
read -r found_gpus auto_precision <<<"${probe##*$'\n'}"
gpus=${PATHGAN_GPUS_PER_NODE:-$found_gpus}
[ "$gpus" -le "$found_gpus" ] || die "PATHGAN_GPUS_PER_NODE=$gpus but torch sees $found_gpus GPUs"

# --- machines ----------------------------------------------------------------------------------
if [ -n "${SLURM_STEP_ID:-}" ] && [ -n "${SLURM_STEP_NUM_NODES:-}" ]; then
    default_machines=$SLURM_STEP_NUM_NODES
else
    default_machines=1
fi
machines=${PATHGAN_NUM_MACHINES:-$default_machines}
machine_rank=${PATHGAN_MACHINE_RANK:-${SLURM_NODEID:-0}}
if [ "$machines" -le 1 ]; then machine_rank=0; fi
if [ -z "${MASTER_ADDR:-}" ]; then
    if [ "$machines" -gt 1 ] && [ -n "${SLURM_JOB_NODELIST:-}" ]; then
        MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    else
        MASTER_ADDR=127.0.0.1
    fi
fi
if [ -z "${MASTER_PORT:-}" ]; then
    if [ -n "${SLURM_JOB_ID:-}" ]; then
        MASTER_PORT=$(pathgan_master_port)
    else
        MASTER_PORT=29500
    fi
fi

# --- accelerate config -------------------------------------------------------------------------
flags=()
if [ "$gpus" -eq 0 ]; then
    config_file=$ROOT/launch/cpu.yaml
    procs=${PATHGAN_PROCS_PER_NODE:-1}
    # accelerate's multi-process launcher does not tell its workers to use the CPU; without
    # this every rank would start alone as "rank 0 of 1".
    if [ $((procs * machines)) -gt 1 ]; then export ACCELERATE_USE_CPU=true; fi
else
    procs=${PATHGAN_PROCS_PER_NODE:-$gpus}
    if [ "$machines" -gt 1 ]; then
        config_file=$ROOT/launch/multinode.yaml
    elif [ "$procs" -gt 1 ]; then
        config_file=$ROOT/launch/node.yaml
    else
        config_file=$ROOT/launch/1gpu.yaml
    fi
    if [ "$gpus" -lt "$found_gpus" ] && [ -z "${CUDA_VISIBLE_DEVICES:-}" ]; then
        CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((gpus - 1)))
        export CUDA_VISIBLE_DEVICES
    fi
fi
config_file=${PATHGAN_ACCELERATE_CONFIG:-$config_file}
precision=${PATHGAN_MIXED_PRECISION:-$auto_precision}
total=$((procs * machines))
flags+=(--config_file "$config_file" --num_processes "$total" --mixed_precision "$precision")
if [ "$total" -gt 1 ]; then
    flags+=(--multi_gpu --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT")
fi
if [ "$machines" -gt 1 ]; then
    flags+=(--num_machines "$machines" --machine_rank "$machine_rank")
fi

echo "launch/train.sh: $(hostname -s) machine $machine_rank/$machines, $procs process(es) per" \
     "node ($gpus GPU(s)), $(basename "$config_file"), mixed precision $precision," \
     "rendezvous $MASTER_ADDR:$MASTER_PORT" >&2

if [ -n "${PATHGAN_TRAIN_MODULE:-}" ]; then trainer=("$PATHGAN_TRAIN_MODULE"); else trainer=(pathgan train); fi
exec accelerate launch "${flags[@]}" -m "${trainer[@]}" --config "$CONFIG" "$@"
