# What launch/train.sh and the slurm/*.sbatch scripts share; sourced, never run:
#
#   . launch/env.sh
#   pathgan_activate_venv ROOT    activate PATHGAN_VENV (default ROOT/.venv) unless a virtualenv
#                                 is active already (VIRTUAL_ENV)
#   MASTER_PORT=$(pathgan_master_port)    the rendezvous port of this SLURM job

pathgan_activate_venv() {
    local venv=${PATHGAN_VENV:-$1/.venv}
    if [ -z "${VIRTUAL_ENV:-}" ] && [ -f "$venv/bin/activate" ]; then
        # shellcheck disable=SC1091
        . "$venv/bin/activate"
    fi
}

# From the job id, so two jobs sharing a node never fight over one port, and from the restart
# count, so a requeued job on the same node never waits for the previous attempt's socket.
pathgan_master_port() {
    echo $((20000 + (SLURM_JOB_ID * 7 + ${SLURM_RESTART_COUNT:-0}) % 20000))
}
