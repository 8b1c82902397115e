#!/bin/bash
# sbatch, after checking that this cluster can ever run the request (Slurm would otherwise
# leave an impossible shape PENDING forever without a word).
#   slurm/submit.sh [sbatch options] slurm/<script>.sbatch CONFIG.yaml [key=value ...]
# Exit code 2 and the cluster's node shapes when the request cannot run; else sbatch's output.
set -euo pipefail
if ! out="$(sbatch --test-only "$@" 2>&1)"; then
    {
        echo "megadiff: this cluster cannot run the job as requested: ${out#*error: }"
        echo "partitions here (nodes, CPUs per node, memory MB, generic resources):"
        sinfo -o '  %P nodes=%D cpus=%c mem=%m gres=%G'
        echo "adjust --nodes / --ntasks-per-node / --cpus-per-task / --gpus-per-node" \
            "(--gpus-per-node=0 on CPU nodes) and submit again"
    } >&2
    exit 2
fi
exec sbatch "$@"
