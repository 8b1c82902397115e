#!/bin/bash
# Shared by the sbatch scripts in this folder: environment, rendezvous, logs, stop signals and
# requeue on exit 75. Sourced, not run. Expects SLURM_* from the allocation.
#
# Environment read here (all optional):
#   MEGADIFF_ROOT    the repository (default: the submit directory)
#   MEGADIFF_PYTHON  the python of the environment megadiff is installed in (default: the
#                    `python` on the PATH the job inherits from sbatch)
#   LOG_DIR          folder for the per-task logs (default: logs/<job name>-<job id>)
#   MASTER_ADDR/MASTER_PORT, OMP_NUM_THREADS  override the derived values

# megadiff's "checkpoint saved, run me again" exit code (SIGUSR1/SIGTERM or time budget).
EXIT_REQUEUE=75
# the scripts' own "this cannot run" exit code (bad environment or time limit), never requeued
EXIT_CONFIG=2
# seconds of warning before the time limit (the scripts' `--signal=...@120`)
MEGADIFF_SIGNAL_LEAD="${MEGADIFF_SIGNAL_LEAD:-120}"
# a job must run at least this long past the warning signal to make progress; shorter
# --time values would save, requeue and stop again at once, forever
MEGADIFF_MIN_RUN_S="${MEGADIFF_MIN_RUN_S:-180}"

megadiff_fail() {
    echo "megadiff: error: $*" >&2
    exit "$EXIT_CONFIG"
}

# Seconds in a Slurm time string ([days-]hours:minutes:seconds, minutes:seconds, minutes);
# empty for UNLIMITED/NOT_SET.
megadiff_seconds() {
    local t="$1" days=0 h=0 m=0 s=0
    case "$t" in UNLIMITED | NOT_SET | INVALID | "") return ;; esac
    if [[ "$t" == *-* ]]; then days="${t%%-*}"; t="${t#*-}"; fi
    IFS=: read -r -a parts <<<"$t"
    case "${#parts[@]}" in
        3) h="${parts[0]}"; m="${parts[1]}"; s="${parts[2]}" ;;
        2) m="${parts[0]}"; s="${parts[1]}" ;;
        1) m="${parts[0]}" ;;
    esac
    echo $(( ((10#$days * 24 + 10#$h) * 60 + 10#$m) * 60 + 10#$s ))
}

megadiff_check_time_limit() {
    local limit seconds
    limit="$(squeue -h -j "$SLURM_JOB_ID" -o %l 2>/dev/null || true)"
    seconds="$(megadiff_seconds "$limit")"
    if [ -n "$seconds" ] && [ "$seconds" -lt $((MEGADIFF_SIGNAL_LEAD + MEGADIFF_MIN_RUN_S)) ]; then
        megadiff_fail "the job's time limit ($limit) leaves less than ${MEGADIFF_MIN_RUN_S} s" \
            "of training before the warning signal ${MEGADIFF_SIGNAL_LEAD} s before the limit;" \
            "each requeue would stop again at once. Submit with --time of at least" \
            "$(( (MEGADIFF_SIGNAL_LEAD + MEGADIFF_MIN_RUN_S + 59) / 60 )) minutes."
    fi
}

megadiff_setup() {
    MEGADIFF_ROOT="${MEGADIFF_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
    cd "$MEGADIFF_ROOT" || megadiff_fail "cannot enter MEGADIFF_ROOT=$MEGADIFF_ROOT"
    MEGADIFF_PYTHON="${MEGADIFF_PYTHON:-python}"
    local version
    if ! version="$("$MEGADIFF_PYTHON" -c 'import megadiff; print(megadiff.__version__)' 2>&1)"
    then
        megadiff_fail "'$MEGADIFF_PYTHON' cannot import megadiff ($version). Submit from the" \
            "environment megadiff is installed in, or set MEGADIFF_PYTHON=/path/to/venv/bin/python."
    fi
    export MEGADIFF_PYTHON
    megadiff_check_time_limit
    # the first node of the allocation hosts the rendezvous; the port is derived from the job id
    MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
    MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
    export MASTER_ADDR MASTER_PORT
    # one folder per job (kept across requeues: the job id does not change)
    LOG_DIR="${LOG_DIR:-$MEGADIFF_ROOT/logs/${SLURM_JOB_NAME:-megadiff}-$SLURM_JOB_ID}"
    mkdir -p "$LOG_DIR" || megadiff_fail "cannot create the log folder LOG_DIR=$LOG_DIR"
    export LOG_DIR
    # one thread per CPU Slurm gave each task
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
    # rank 0 writes megadiff's exit code here (launchers such as torchrun do not pass it on)
    MEGADIFF_EXIT_FILE="$LOG_DIR/exit-code"
    rm -f "$MEGADIFF_EXIT_FILE"
    export MEGADIFF_EXIT_FILE
    echo "megadiff: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on" \
        "$SLURM_JOB_NUM_NODES node(s), megadiff $version from $MEGADIFF_PYTHON," \
        "rendezvous $MASTER_ADDR:$MASTER_PORT, OMP_NUM_THREADS=$OMP_NUM_THREADS, logs in $LOG_DIR"
}

# The batch shell takes the stop signals instead of dying of them:
# * SIGUSR1 (`--signal=B:USR1@...`, `scancel --signal=USR1 --batch` or `--full`): passed on to
#   every job step (`scancel --signal=USR1` without --batch reaches the steps only);
# * SIGTERM/SIGINT (`scancel`, `scontrol requeue`, preemption): Slurm signals the steps itself;
#   the shell keeps waiting for them to save.
megadiff_trap_stop_signals() {
    trap 'echo "megadiff: batch shell got SIGUSR1: asking all tasks to checkpoint and stop";
          scancel --signal=USR1 "$SLURM_JOB_ID"' USR1
    trap 'echo "megadiff: batch shell got SIGTERM: waiting for the tasks to checkpoint"' TERM
    trap 'echo "megadiff: batch shell got SIGINT: waiting for the tasks to checkpoint"' INT
}

# megadiff's exit code: the launcher's, or what rank 0 wrote to MEGADIFF_EXIT_FILE when the
# launcher reports a failure of its own (torchrun exits 1 whatever its workers' codes).
megadiff_exit_code() {
    local rc="$1"
    if [ "$rc" -ne 0 ] && [ "$rc" -ne "$EXIT_REQUEUE" ] && [ -s "$MEGADIFF_EXIT_FILE" ]; then
        rc="$(cat "$MEGADIFF_EXIT_FILE")"
    fi
    echo "$rc"
}

# Run "$@" in the background so the batch shell can take signals, then requeue on exit 75.
megadiff_run_and_requeue() {
    megadiff_trap_stop_signals
    "$@" &
    local pid=$!
    local rc=0
    wait "$pid" || rc=$?
    # a signal interrupts `wait` (status > 128) while the step still runs: wait again
    while kill -0 "$pid" 2>/dev/null; do
        rc=0
        wait "$pid" || rc=$?
    done
    rc="$(megadiff_exit_code "$rc")"
    if [ "$rc" -eq "$EXIT_REQUEUE" ]; then
        # `scancel` and Slurm's own requeues (`scontrol requeue`, preemption) have already
        # moved the job out of RUNNING: requeue only a job that still runs (warning signal)
        local state
        state="$(squeue -h -j "$SLURM_JOB_ID" -o %T 2>/dev/null || true)"
        if [ "$state" != RUNNING ]; then
            echo "megadiff: checkpoint saved (exit code 75); job $SLURM_JOB_ID is" \
                "${state:-gone} (cancelled or requeued by Slurm): not requeueing"
            return 0
        fi
        echo "megadiff: checkpoint saved, training stopped early (exit code 75); requeueing" \
            "job $SLURM_JOB_ID to continue"
        scontrol requeue "$SLURM_JOB_ID"
        # the job is requeued: end this run of the batch script as a success
        return 0
    fi
    if [ "$rc" -eq 0 ]; then
        echo "megadiff: training finished"
    else
        echo "megadiff: training failed with exit code $rc; not requeueing (see $LOG_DIR)" >&2
    fi
    return "$rc"
}
