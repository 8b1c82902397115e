#!/bin/bash
# Shared by the sbatch scripts in this folder: rendezvous, log folders, requeue on exit 75.
# Sourced, not run. Expects SLURM_* from the allocation; MEGADIFF_ROOT = the repository.

# megadiff's "checkpoint saved, run me again" exit code (SIGUSR1/SIGTERM or time budget).
EXIT_REQUEUE=75

megadiff_setup() {
    MEGADIFF_ROOT="${MEGADIFF_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
    cd "$MEGADIFF_ROOT" || exit 1
    # the first node of the allocation hosts the rendezvous; the port is derived from the job id
    MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
    MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
    export MASTER_ADDR MASTER_PORT
    # one folder per job (kept across requeues: the job id does not change)
    LOG_DIR="${LOG_DIR:-$MEGADIFF_ROOT/logs/${SLURM_JOB_NAME:-megadiff}-$SLURM_JOB_ID}"
    mkdir -p "$LOG_DIR"
    export LOG_DIR
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
    echo "megadiff: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NUM_NODES" \
        "node(s), rendezvous $MASTER_ADDR:$MASTER_PORT, logs in $LOG_DIR"
}

# For launchers that do not pass SIGUSR1 on by themselves (torchrun agents): with
# `#SBATCH --signal=B:USR1@...` the batch shell gets the signal, remembers it and sends it to
# every job step (scancel without --batch/--full leaves the batch shell out). The job is then
# requeued whatever exit code the launcher reports.
MEGADIFF_STOP=0
megadiff_forward_usr1() {
    trap 'MEGADIFF_STOP=1; echo "megadiff: SIGUSR1: asking all tasks to checkpoint and stop";
          scancel --signal=USR1 "$SLURM_JOB_ID"' USR1
}

# Run "$@" in the background so the batch shell can take signals, then requeue on exit 75.
megadiff_run_and_requeue() {
    "$@" &
    local pid=$!
    local rc=0
    wait "$pid" || rc=$?
    # a signal interrupts `wait` (status > 128) while the step still runs: wait again
    while kill -0 "$pid" 2>/dev/null; do
        rc=0
        wait "$pid" || rc=$?
    done
    echo "megadiff: step finished with exit code $rc"
    if [ "$rc" -eq "$EXIT_REQUEUE" ] || [ "$MEGADIFF_STOP" -eq 1 ]; then
        echo "megadiff: checkpoint saved before the time limit; requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$rc"
}
