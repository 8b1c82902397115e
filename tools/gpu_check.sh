#!/usr/bin/env bash
# The GPU check: one prepared run for a GPU machine without network access (about 6 minutes
# on one H200). It needs no megadiff install there: megatron-core comes from a wheel in .whl/,
# everything else megadiff trains with (torch, numpy, pyyaml, tiktoken, tensorboard, psutil)
# is on the machine; the repository root goes on PYTHONPATH. Then it
#   1. runs the GPU-marked tests (tests/test_gpu.py: bf16 and FP8 losses against fp32, the FP8
#      GEMM against the CPU path),
#   2. times tools/bench_mfu.py on examples/tiny_cpu.yaml and examples/1b_gpu.yaml in bf16 (local
#      spec, torch SDPA) with the bare PyTorch twin eager and under torch.compile,
#   3. trains the 1B shape 50 steps in bf16 and with megadiff's FP8 GEMMs (tokens/s, final loss),
# and writes everything under the output folder (--out DIR; default $OUT if set, else
# runs/gpu_check/):
# results.jsonl (one bench_mfu line per run), summary.md (the table for docs/benchmarks.md),
# tests.xml (JUnit), gpu_check.log (everything printed). A step that fails is logged and the
# next one still runs.
#
#   bash tools/gpu_check.sh --fetch-wheels 3.12   # here, before the call: megatron-core into .whl/
#   bash tools/gpu_check.sh                       # there, with .whl/ copied into the checkout
#   bash tools/gpu_check.sh --cpu-dry             # rehearsal on a CPU box: same steps, small
#                                                 # shapes, fp32 for bf16, FP8 emulated (~3 min)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MEGATRON_CORE=megatron-core==0.16.1
mode=gpu
out=${OUT:-runs/gpu_check}

fetch_wheels() {  # the megatron-core wheel for CPython $1 on x86-64 Linux
  local plats=()
  for p in manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_31; do
    plats+=(--platform "${p}_x86_64")
  done
  mkdir -p .whl
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$1" \
    --implementation cp "${plats[@]}" -d .whl "$MEGATRON_CORE" && ls -l .whl
}

while (($#)); do
  case $1 in
    --cpu-dry) mode=cpu ;;
    --out) out=$2; shift ;;
    --fetch-wheels) fetch_wheels "${2:-3.12}"; exit ;;
    -h | --help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option '$1' (use --cpu-dry, --out DIR, --fetch-wheels PYVER)" >&2; exit 2 ;;
  esac
  shift
done
if [[ $mode == gpu ]] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check.sh: no CUDA GPU here; use --cpu-dry to rehearse on a CPU box" >&2
  exit 2
fi
need_wheel=0
if ! "$PY" -c "import megatron.core" 2>/dev/null; then
  need_wheel=1
  ls .whl/megatron_core-* >/dev/null 2>&1 || {
    echo "gpu_check.sh: megatron-core is not installed and .whl/ has no wheel of it; run 'bash tools/gpu_check.sh --fetch-wheels PYVER' first and copy .whl/ here" >&2
    exit 2
  }
fi
mkdir -p "$out"
log=$out/gpu_check.log results=$out/results.jsonl
: >"$results"
exec > >(tee -a "$log") 2>&1
say() { echo "gpu_check [$(date -u +%H:%M:%S)] $*"; }
run_step() {  # run_step SECONDS NAME COMMAND...: a failing or hung step is logged, not fatal
  local limit=$1 name=$2 t0=$SECONDS rc
  shift 2
  say "$name ..."
  timeout "$limit" "$@"
  rc=$?
  say "$name: exit $rc after $((SECONDS - t0)) s"
}

export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ((need_wheel)); then
  say "installing $MEGATRON_CORE from .whl/ into /tmp/megadiff-site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/megadiff-site --find-links .whl "$MEGATRON_CORE" || exit 1
  export PYTHONPATH=/tmp/megadiff-site:$PYTHONPATH
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
"$PY" - <<'EOF'
import platform, torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"gpu_check: python {platform.python_version()}, torch {torch.__version__}, GPU {gpu}")
EOF

bench=("$PY" tools/bench_mfu.py --out "$results")
ONE_B=examples/1b_gpu.yaml
if [[ $mode == gpu ]]; then
  half=bf16 shrink=() fp8_steps=(--warmup 3 --steps 47) long=(--warmup 3 --steps 8)
else  # the same steps on a shape a CPU trains in seconds
  half=fp32 fp8_steps=(--warmup 1 --steps 4) long=(--warmup 1 --steps 2)
  shrink=(model.num_layers=2 model.hidden_size=128 model.num_attention_heads=4
    model.ffn_hidden_size=256 model.seq_length=128 model.vocab_size=512 train.micro_batch=2)
fi

run_step 240 "GPU tests" "$PY" -m pytest tests/test_gpu.py -q -rs -p no:cacheprovider \
  --junit-xml="$out/tests.xml"
run_step 150 "tiny, $half, twin eager + compiled" \
  "${bench[@]}" examples/tiny_cpu.yaml --twin --compile train.precision=$half
run_step 300 "1B, $half, twin eager + compiled" \
  "${bench[@]}" "$ONE_B" "${long[@]}" --twin --compile train.precision=$half "${shrink[@]}"
for prec in $half fp8; do
  run_step 120 "1B, $prec, 50 steps of one micro-batch" "${bench[@]}" "$ONE_B" "${fp8_steps[@]}" \
    train.precision=$prec model.transformer_impl=local train.global_batch=4 "${shrink[@]}"
done
"$PY" tools/bench_mfu.py --summary "$results" | tee "$out/summary.md"
say "done: $out"
