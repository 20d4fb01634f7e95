#!/usr/bin/env bash
# The one GPU check: run from the repository root on a machine with a CUDA GPU (H100 / H200).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh          # default OUT: ./gpu_check_out
#
# About 10 minutes. Nothing is downloaded: wheels for optional libraries that the machine lacks
# (transformer-engine, flash-attn) can be carried in ./wheels/ and are installed first. Steps, each
# under its own time limit so that a slow step cannot eat the others:
#   1. environment: nvidia-smi, torch / CUDA versions, the backend probe and the auto choice;
#   2. build the C++ data helper in place (the data tests need it; the checks below do not);
#   3. the GPU tests (pytest -m gpu): every backend against the plain path within bf16 tolerance,
#      Transformer Engine's fused LayerNormLinear path in BF16 and FP8 (delayed and current
#      scaling), the fake TE's signatures against the real ones, and with 2+ GPUs tensor 2 + SP
#      with TE against one GPU;
#   4. benchmarks/gpu_throughput.py on one GPU: andromeda-1b / 100m / 500m x every variant at hand
#      (TE rows: bf16-te with the fused modules, bf16-te-unfused, fp8-delayed, fp8-current);
#   5. with 2+ GPUs: the same under torchrun at tensor 2 with sequence parallelism (andromeda-1b).
# The summary states which TE rows and which tensor-parallel run ran, and why the others did not.
# Results, at most 8 files in $OUT: summary.txt (rc and timing of each step, the throughput tables
# and target lines), env.txt, build.txt, gpu_tests.txt, gpu_tests.xml, throughput.txt,
# throughput.json, tp2.txt.
set -uo pipefail

OUT=${OUT:-gpu_check_out}
source examples/launch/find_python.sh  # the venv's python (`make install`), not PATH's python3
PY=${PYTHON:-$ANDROMEDA_PYTHON}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$SUMMARY"; }

step() {  # step NAME LIMIT_S LOGFILE CMD...: run with a time limit, record rc and duration
    local name=$1 limit=$2 logfile=$3
    shift 3
    local start=$SECONDS
    timeout "$limit" "$@" >"$logfile" 2>&1
    local rc=$?
    log "$name: rc=$rc in $((SECONDS - start)) s$([[ $rc == 124 ]] && echo " (timed out after $limit s)")"
    return 0
}

log "gpu_check start in $PWD, python: $(command -v "$PY")"

# 1. environment
{
    nvidia-smi || echo "nvidia-smi failed"
    "$PY" - <<'EOF'
import torch
from megatron_andromeda.kernels import BackendConfig, probe_environment, select_backends
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
device = torch.device("cuda", 0)
print("device", torch.cuda.get_device_name(device), "capability", torch.cuda.get_device_capability(device))
print(probe_environment(device))
print("auto choice:", select_backends(BackendConfig(), device).describe())
EOF
} >"$OUT/env.txt" 2>&1
log "environment: $(grep -m1 '^device' "$OUT/env.txt" || echo 'no CUDA device found (see env.txt)')"
grep -m1 '^auto choice' "$OUT/env.txt" | tee -a "$SUMMARY"

if compgen -G "wheels/*.whl" >/dev/null; then
    step "install wheels/" 120 "$OUT/build.txt" "$PY" -m pip install --no-index --no-deps wheels/*.whl
fi

# 2. the C++ helper (appends to build.txt)
step "build_ext" 60 "$OUT/build_ext.log" "$PY" setup.py build_ext --inplace
cat "$OUT/build_ext.log" >>"$OUT/build.txt" && rm -f "$OUT/build_ext.log"

# 3. GPU tests: the files that have any
mapfile -t GPU_TESTS < <(grep -l "pytest.mark.gpu" tests/*.py)
step "gpu tests (${GPU_TESTS[*]})" 180 "$OUT/gpu_tests.txt" \
    "$PY" -m pytest -q -m gpu -p no:cacheprovider -rs --junitxml="$OUT/gpu_tests.xml" "${GPU_TESTS[@]}"
tail -n 15 "$OUT/gpu_tests.txt" >>"$SUMMARY"

# 4. throughput on one GPU (andromeda-1b first: its rows carry the targets)
step "throughput" 300 "$OUT/throughput.txt" "$PY" benchmarks/gpu_throughput.py \
    --models andromeda-1b,andromeda-100m,andromeda-500m --json "$OUT/throughput.json"
sed -n '/^model /,$p' "$OUT/throughput.txt" >>"$SUMMARY"
log "Transformer Engine rows on one GPU (ok, skipped or failed, with the reason):"
grep -E '^andromeda-[0-9a-z]+ (bf16-te|bf16-te-unfused|fp8-delayed|fp8-current): ' "$OUT/throughput.txt" \
    | tee -a "$SUMMARY" || log "  none reached (see throughput.txt)"

# 5. tensor 2 + sequence parallelism under torchrun, where two GPUs exist
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [[ "$GPUS" -ge 2 ]]; then
    step "tensor 2 + SP under torchrun ($GPUS GPUs)" 150 "$OUT/tp2.txt" \
        "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/gpu_throughput.py \
        --tensor 2 --sequence-parallel --models andromeda-1b \
        --variants bf16-sdpa,bf16-te,fp8-delayed,fp8-current
    sed -n '/^model /,$p' "$OUT/tp2.txt" >>"$SUMMARY"
else
    log "tensor 2 + SP under torchrun: skipped ($GPUS GPU on this machine; it needs 2)"
fi

log "gpu_check done"
