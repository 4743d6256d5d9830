#!/usr/bin/env bash
# Steps of the H100 session, run on the lent GPU machine from the repo root, after the offline
# vLLM kit is installed into /tmp/site (../shared/gpu/README.md). Logs and results go to $OUT.
#   bash bench/gpu_session.sh model          # GaMS-9B-shaped random weights + copy bandwidth
#   bash bench/gpu_session.sh starts         # worker cold start, warm start, eager start (handler.py)
#   bash bench/gpu_session.sh suite MODE...  # bench/gpu_suite.py per graph mode (full, eager, piecewise, fp8)
#   bash bench/gpu_session.sh ladder         # injected unsupported-PTX failure: worker falls back and serves
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 \
  DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RUNPOD_SKIP_AUTO_SYSTEM_CHECKS=true
MODEL=/tmp/gams-9b-shaped
OUT=${OUT:-/tmp/out}
JOB='{"input": {"prompt": "Kaj je vredno videti v Ljubljani?", "stream": true, "sampling_params": {"max_tokens": 256, "ignore_eos": true, "temperature": 0}}}'

# One worker process from start to its first job served; wall time and the job's last output.
worker_run() {  # name, then extra env assignments
  local name=$1; shift
  local t0; t0=$(date +%s.%N)
  env MODEL_NAME=$MODEL "$@" python3 handler.py --test_input "$JOB" >"$OUT/$name.log" 2>&1
  local rc=$?
  local t1; t1=$(date +%s.%N)
  echo "== $name: exit $rc, process start to job done and exit: $(python3 -c "print(round($t1 - $t0, 1))") s"
  grep -E '"usage"' "$OUT/$name.log" | head -1 | python3 -c '
import json, sys
line = sys.stdin.read().strip()
if line:
    out = json.loads(line)
    print("   usage:", json.dumps(out["usage"]), "\n   engine:", json.dumps(out["engine"]))
    print("   startup:", json.dumps(out.get("startup")))'
  grep -E "doctor|verdict|driver|fell back|rung|classified|start-up:" "$OUT/$name.log" | grep -v "^{" | head -40
}

case ${1:-} in
  model)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
    python3 -c 'import torch, vllm; print("torch", torch.__version__, "cuda", torch.version.cuda, "| vllm", vllm.__version__)' | tee -a "$OUT/gpu.txt"
    time python3 -m builder.shaped_model gams-9b $MODEL --device cuda 2>&1 | tail -2
    du -sh $MODEL
    python3 -m bench.gpu_suite bandwidth | tee -a "$OUT/gpu.txt"
    ;;
  starts)
    rm -rf ~/.cache/vllm
    worker_run cold-start
    worker_run warm-start
    worker_run eager-start ENFORCE_EAGER=true
    ;;
  suite)
    shift
    bw=$(grep -oE '[0-9]+ GB/s' "$OUT/../gpu.txt" 2>/dev/null | grep -oE '[0-9]+' || true)
    for mode in "$@"; do
      extra=()
      [ "$mode" = fp8 ] && extra=(--quantization fp8) && engine_mode=full || engine_mode=$mode
      python3 -m bench.gpu_suite run --model $MODEL --mode "$engine_mode" "${extra[@]}" \
        ${BANDWIDTH_GBS:+--bandwidth-gbs $BANDWIDTH_GBS} --out "$OUT/suite-$mode.json" >"$OUT/suite-$mode.log" 2>&1
      echo "== suite $mode: exit $?"; grep -E '^\{"path"|^SUMMARY' "$OUT/suite-$mode.log"
    done
    ;;
  ladder)
    # The seed's failure, as the engine prints it: FULL decode capture dies on unsupported PTX.
    cat > /tmp/ptx-fault.txt <<'EOF_FAULT'
torch.AcceleratorError: CUDA error: the provided PTX was compiled with an unsupported toolchain.
Search for the following error message `cudaErrorUnsupportedPtxVersion'
INFO Capturing CUDA graphs (mixed prefill-decode, PIECEWISE): 100%|##########| 51/51
INFO Capturing CUDA graphs (decode, FULL):   0%|          | 0/35
EOF_FAULT
    worker_run ladder-ptx GAMS_TEST_INJECT_START_FAILURE=/tmp/ptx-fault.txt
    ;;
  *) sed -n 2,8p "$0"; exit 2 ;;
esac
