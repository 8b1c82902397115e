#!/usr/bin/env bash
# Install megadiff into the current Python environment without ever replacing torch.
#
#   bash tools/install.sh          # runtime
#   bash tools/install.sh --dev    # + test/lint tools and transformers/safetensors
#   bash tools/install.sh --hf     # + transformers/safetensors (megadiff convert)
#   bash tools/install.sh --gpu    # + Transformer Engine (CUDA boxes only)
#   bash tools/install.sh --wandb  # + Weights & Biases (logging.wandb)
#   bash tools/install.sh --slurm  # + Debian's Slurm and munge (as root; the real-Slurm tests)
#
# CPU boxes get the pinned CPU wheel torch==2.13.0 first (with numpy, which torch does not
# require but warns about when it is missing); a torch that is already installed (e.g. a CUDA
# build on a GPU box) is kept and pinned for every later install, so nothing pulls a different
# torch or its CUDA packages. Each long step says what it is doing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export DS_BUILD_OPS=${DS_BUILD_OPS:-0}  # --deepspeed: no CUDA ops compiled at install time
extras=()
slurm=0
for arg in "$@"; do
  case "$arg" in
    --dev) extras+=(dev) ;;
    --hf) extras+=(hf) ;;
    --gpu) extras+=(gpu) ;;
    --deepspeed) extras+=(deepspeed) ;;
    --wandb) extras+=(wandb) ;;
    --slurm) slurm=1 ;;
    *) echo "install.sh: unknown option '$arg' (use --dev, --hf, --gpu, --deepspeed, --wandb, --slurm)" >&2; exit 2 ;;
  esac
done
if [[ " ${extras[*]} " == *" gpu "* ]] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "install.sh: --gpu needs a CUDA build of torch and a GPU; Transformer Engine is never installed on CPU boxes" >&2
  exit 2
fi
# Slurm for tests/test_slurm.py, which starts a local single-node cluster (skipped without it)
if ((slurm)) && ! command -v slurmctld >/dev/null; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "install.sh: installing slurmctld slurmd slurm-client munge (apt-get) ..."
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      slurmctld slurmd slurm-client munge >/dev/null
  else
    echo "install.sh: --slurm needs root and apt-get; the real-Slurm tests will be skipped" >&2
  fi
fi
say() { echo "install.sh: $*"; }
# the installed torch's version, read without importing torch (nothing is imported before numpy
# is in: torch imported without it warns "Failed to initialize NumPy")
installed_torch() {
  "$PY" -c "from importlib.metadata import version; print(version('torch').split('+')[0])" 2>/dev/null
}
if ! torch_version=$(installed_torch); then
  say "installing torch==2.13.0 and numpy (the CPU wheel, ~200 MB: about a minute) ..."
  "$PY" -m pip install -q "torch==2.13.0" "numpy>=1.24"
  torch_version=$(installed_torch)
else
  say "keeping the installed torch ${torch_version}"
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==${torch_version}" >"$constraints"
spec="."
if ((${#extras[@]})); then
  spec=".[$(IFS=,; echo "${extras[*]}")]"
fi
# Run pip quietly; drop its resolver notes about mosaicml-streaming's declared dependencies,
# which are left out on purpose (below); print everything if pip fails.
pip_install() {
  local log status=0
  log=$(mktemp)
  "$PY" -m pip install -q "$@" >"$log" 2>&1 || status=$?
  if ((status)); then
    cat "$log" >&2
  else
    grep -v -e "^mosaicml-streaming .* requires " -e "dependency resolver does not currently" \
      -e "Running pip as the 'root' user" "$log" || true
  fi
  rm -f "$log"
  return "$status"
}
# mosaicml-streaming without its declared dependencies (a CUDA torchvision that breaks imports
# on CPU torch, and ~500 MB of cloud SDKs); its real needs are in setup.py.
say "installing mosaicml-streaming (without its declared dependencies) ..."
pip_install --no-deps "mosaicml-streaming==0.13.0"
say "installing megadiff and its dependencies (megatron-core, tiktoken, ...; extras: ${extras[*]:-none}): about a minute ..."
PIP_CONSTRAINT="$constraints" pip_install -e "$spec"
echo "megadiff installed (torch ${torch_version}, extras: ${extras[*]:-none})"
