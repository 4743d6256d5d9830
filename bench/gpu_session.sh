#!/usr/bin/env bash
# Steps of the GPU session (H100, H200), run on the lent GPU machine from the repo root, after the offline
# vLLM kit is installed into /tmp/site (../shared/gpu/README.md). Logs and results go to $OUT.
#   bash bench/gpu_session.sh model          # GaMS-9B-shaped random weights + copy bandwidth
#   bash bench/gpu_session.sh suite MODE...  # bench/gpu_suite.py per graph mode (full, eager, piecewise, fp8)
#   bash bench/gpu_session.sh ladder         # injected unsupported-PTX failure: worker falls back and serves
#   bash bench/gpu_session.sh imports        # seconds each big import takes on this host
#   bash bench/gpu_session.sh coldstart [spy] [VAR=value ...]
#                                            # worker start, empty then warm compile cache on a stand-in
#                                            # network volume; spy: py-spy dumps of the engine every 2 s
#   bash bench/gpu_session.sh warmstart NAME [VAR=value ...]   # one more start on that warm cache,
#                                            # e.g. warmstart eager ENFORCE_EAGER=true
#   bash bench/gpu_session.sh platform [option ...]   # issue 23, ~5 min: raw engine vs handler.py under the SDK
#                                            # loop + emulator, 1/8/32/64/128/256/512 streams of 256 tokens,
#                                            # MAX_NUM_SEQS=512, each engine alone at 0.90 of the GPU; ratios, POSTs/s,
#                                            # CPU shares (worker main process, engine, emulator). SPY=1: py-spy of the
#                                            # worker's main process at 512 streams (needs /tmp/spy/bin/py-spy)
#   bash bench/gpu_session.sh http [option ...]  # issue 30, < 9 min: raw AsyncLLM, the worker through the queue,
#                                            # the worker over HTTP (PORT) and vllm serve with its engine arguments,
#                                            # each alone at 0.90, 1..512 streams of 256 tokens (ROUNDS=1 rounds);
#                                            # tok/s, x raw, TTFC p50, process start -> first /ping answer;
#                                            # e.g. ROUNDS=3 ... http --no-queue --concurrency 1 8 32 64 (~5 min)
#   bash bench/gpu_session.sh platform-stats  # ~6 min: the same at 64/256/512, plus the worker with LOG_ENGINE_STATS=true
#   bash bench/gpu_session.sh platform-budget # ~6 min: 256/512 streams, STREAM_POSTS_PER_SECOND 250 / 500 / 1000 / 2000
#   bash bench/gpu_session.sh platform-before [DIR]  # ~6 min: raw, this worker and main's before issue 23 in
#                                            # DIR (default before/: `mkdir before; git archive 97da0c9 | tar -x -C
#                                            # before` in the checkout, untracked, so it travels) at 64/128/256/512
#   bash bench/gpu_session.sh platform-h100 [option ...]  # the issue-14 layout: both engines at once, 0.42 each,
#                                            # bursts 1/8/32/64, Poisson at 90 %
#   bash bench/gpu_session.sh openai         # one /v1/responses job (and its stream) and one chat job through
#                                            # the worker under the SDK loop, openai client, GaMS-9B preset (8192)
#   bash bench/gpu_session.sh faststarts cold|warm|table   # issue 17, each step < 10 min:
#       cold       empty compile cache, one worker start per artifact form (fills both cache folders)
#       warm       (a) warm worker starts through the platform, mega AOT artifact off/on, twice each;
#                  (b)+(c) bare processes (import torch + AsyncLLM, create it), greedy outputs, b1/c64
#       seed       cold starts without and with the image's model info (builder/seed_model_info.py)
#       table      the table of every run so far (each step also prints it)
#   bash bench/gpu_session.sh tp model|cards|suite  # issue 33, on 2 GPUs (nvidia-h100-x2), each < 10 min:
#                                            # model: GaMS-27B-shaped weights (~50 GB); cards: the worker with
#                                            # default settings on 48 GB cards emulated on both GPUs (TP 2), then the
#                                            # whole cards (TP 1; CARDS="48" or "full" for one), 1/8/32/64 streams,
#                                            # GPU processes left after SIGTERM; suite: raw engine and handler
#                                            # in-process at TP 2 (gpu_suite)
#   bash bench/gpu_session.sh levers main|branch|eagerbackend  # issue 29, ~5 min each: main's worker (the
#                                            # checkout in before29/: `mkdir before29; git archive MAIN | tar -x -C
#                                            # before29`, carried) or this one's: SIGTERM 8 s into a cold start; on
#                                            # a fresh stand-in volume a cold start, a warm one, one with the page
#                                            # cache dropped, then the bare engine's b1/c64/c256 (BARE=0: none);
#                                            # eagerbackend: this one without Inductor. Every start has the
#                                            # image's model info.
#   bash bench/gpu_session.sh startlevers     # issue 29, ~4 min, fresh volume: cold, warm, warm without vLLM's
#                                            # startup plan, the ladder (FULL fails early, PIECEWISE on the FULL
#                                            # rung's compile cache), page cache dropped with vLLM's default and
#                                            # its multi-thread loader
#   bash bench/gpu_session.sh loaders         # issue 29, ~3 min after `levers branch` (else a cold start first):
#                                            # page cache dropped: the worker (paced readahead), bare engines with
#                                            # the default loader and InstantTensor
#   bash bench/gpu_session.sh slowdisk        # issue 29, ~4 min after `levers branch` and `levers main` (else a cold
#                                            # start each): the weights on a loop device read at RATE_MBPS (300)
#                                            # through cgroup io.max; this worker and main's (before29/)
#   bash bench/gpu_session.sh readahead [--variants ...]  # issue 29, ~3 min: the weights readahead's ways of
#                                            # reading beside torch + vLLM's imports, page cache dropped each time
#   bash bench/gpu_session.sh lora            # issue 32, < 9 min: the raw engine without LoRA, then with 4 rank-16
#                                            # adapters (base only, 1, 4 in the mix) at 1/32/128 streams; KV tokens
#   bash bench/gpu_session.sh importfloor     # python -X importtime of torch + AsyncLLM, with and without bytecode
#   bash bench/gpu_session.sh starts [VAR=value ...]  # the worker's cold start (empty compile cache on the
#                                            # stand-in volume), then a warm one, default settings, each
#                                            # process start -> first chunk through the SDK loop
#   bash bench/gpu_session.sh cards [--cards 24 32 full]  # issue 31, < 9 min: 24 and 32 GB cards emulated
#                                            # (another process holds the rest of the GPU), the worker through
#                                            # the platform with default settings: plan line, start, tok/s 1/8/32
#   SUITE_ARGS="--max-num-seqs 512 --concurrency 1 8 64" bash bench/gpu_session.sh suite MODE...  # options
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD:/tmp/spy PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 \
  DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RUNPOD_SKIP_AUTO_SYSTEM_CHECKS=true
MODEL=${MODEL:-/tmp/gams-9b-shaped}
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
  grep -E "doctor|verdict|driver|fell back|rung|classified|start-up:|compile cache|took|Graph capturing|jit_monitor" \
    "$OUT/$name.log" | grep -v "^{" | cut -c1-220 | head -60
}

VOLUME=${VOLUME:-/tmp/runpod-volume}  # stands in for RunPod's network volume
SPY_BIN=/tmp/spy/bin/py-spy  # pip install --no-deps --target /tmp/spy py_spy-*.whl (also fastsafetensors, to try it)

# Stack dumps of the worker's processes every 2 s, into $1, until killed.
spy_loop() {
  while true; do
    for pid in $(pgrep -f "spawn_main|EngineCore|handler.py"); do
      { echo "=== $(date +%T.%N) pid $pid $(tr '\0' ' ' </proc/$pid/cmdline | cut -c1-80)"
        timeout 5 $SPY_BIN dump --pid "$pid" 2>&1; } >>"$1"
    done
    sleep 2
  done
}

spied_worker_run() {  # name, then env assignments
  spy_loop "$OUT/$1.spy.txt" & local spy=$!
  worker_run "$@"
  kill $spy 2>/dev/null; wait $spy 2>/dev/null
}

FAST=${FAST:-/tmp/faststarts}  # fast-start results, kept on the machine between steps (each $OUT is new)

# The model info the image computes at build time (Dockerfile: builder/seed_model_info.py), as users get it;
# once per machine, in /tmp/model-info (MODEL_INFO_SEED_DIR).
seed_model_info() {
  mkdir -p $FAST
  [ -d /tmp/model-info ] || python3 builder/seed_model_info.py --out /tmp/model-info >$FAST/seed.log 2>&1
}

# One fast-start run (worker or bare), its output in $FAST/NAME.out; prints its summary line.
fast() {
  local kind=$1 name=$2; shift 2
  python3 -m bench.fast_starts "$kind" "$name" "$@" --results $FAST >"$FAST/$name.out" 2>&1
  echo "== $kind $name: exit $?"; grep '^{"kind"' "$FAST/$name.out" | cut -c1-900
}

# The seed's failure, as the engine prints it: FULL decode capture dies on unsupported PTX (injected: the
# first engine start raises this text).
ptx_fault() {
  cat > /tmp/ptx-fault.txt <<'EOF_FAULT'
torch.AcceleratorError: CUDA error: the provided PTX was compiled with an unsupported toolchain.
Search for the following error message `cudaErrorUnsupportedPtxVersion'
INFO Capturing CUDA graphs (mixed prefill-decode, PIECEWISE): 100%|##########| 51/51
INFO Capturing CUDA graphs (decode, FULL):   0%|          | 0/35
EOF_FAULT
}

case ${1:-} in
  faststarts)
    common=(MODEL_NAME=$MODEL NETWORK_VOLUME_PATH=$VOLUME)
    mkdir -p $FAST
    case ${2:-} in
      cold)
        # The image ships bytecode (pip compiles on install); the kit is installed --no-compile.
        # In the GPU image on the CPU machine, the import floor took 8.2 s of CPU with it, 22.4 s without.
        python3 -m compileall -q -j 16 /tmp/site >/dev/null 2>&1; echo "kit byte-compiled (as in the image)"
        rm -rf $VOLUME ~/.cache/vllm ~/.triton ~/.cache/gams-worker $FAST; mkdir -p $VOLUME $FAST
        fast worker cold-mega-off "${common[@]}" VLLM_USE_MEGA_AOT_ARTIFACT=0
        fast worker cold-mega-on "${common[@]}" VLLM_USE_MEGA_AOT_ARTIFACT=1
        ;;
      warm)
        for round in 1 2; do  # alternated, so both forms meet the same host state
          fast worker warm-mega-off-$round "${common[@]}" VLLM_USE_MEGA_AOT_ARTIFACT=0
          fast worker warm-mega-on-$round "${common[@]}" VLLM_USE_MEGA_AOT_ARTIFACT=1
        done
        fast bare bare-mega-off "${common[@]}" VLLM_USE_MEGA_AOT_ARTIFACT=0
        fast bare bare-mega-on "${common[@]}" VLLM_USE_MEGA_AOT_ARTIFACT=1
        ;;
      seed)
        # Cold starts (empty compile cache) without and with the model info the image computes at build time.
        python3 -m compileall -q -j 16 /tmp/site >/dev/null 2>&1
        rm -rf $VOLUME ~/.cache/vllm ~/.triton ~/.cache/gams-worker; mkdir -p $VOLUME
        fast worker cold-seed-none "${common[@]}" MODEL_INFO_SEED_DIR=/nonexistent
        ( time python3 builder/seed_model_info.py --out /tmp/model-info ) 2>&1 | grep -v "^INFO\|^WARNING" | tail -5
        rm -rf $VOLUME ~/.cache/vllm ~/.triton ~/.cache/gams-worker; mkdir -p $VOLUME
        fast worker cold-seed-image "${common[@]}" MODEL_INFO_SEED_DIR=/tmp/model-info
        ;;
      table) ;;
      *) sed -n 2,48p "$0"; exit 2 ;;
    esac
    python3 -m bench.fast_starts table --results $FAST | tee "$OUT/faststarts-table.md"
    cp $FAST/*.json $FAST/*.log $FAST/*.out "$OUT/" 2>/dev/null
    ;;
  levers)
    which=${2:?main, branch or eagerbackend}
    root=$PWD; [ "$which" = main ] && root=$PWD/before29
    python3 -m compileall -q -j 16 /tmp/site >/dev/null 2>&1  # bytecode, as the image has it
    vol=/tmp/vol-$which; rm -rf $vol ~/.cache/vllm ~/.triton /tmp/torchinductor_*; mkdir -p $vol $FAST
    seed_model_info
    run_env=(MODEL_NAME=$MODEL NETWORK_VOLUME_PATH=$vol MODEL_INFO_SEED_DIR=/tmp/model-info)
    [ "$which" = eagerbackend ] && run_env+=('ENGINE_ARGS={"compilation_config": {"backend": "eager"}}')
    # A start cut short while vLLM compiles, on a volume of its own (a killed compile leaves its cache unfinished).
    rm -rf /tmp/vol-stop; fast stop $which-stop --after 8 --root $root "${run_env[@]}" NETWORK_VOLUME_PATH=/tmp/vol-stop
    fast worker $which-cold --root $root "${run_env[@]}"
    fast worker $which-warm --root $root "${run_env[@]}"
    python3 -m bench.fast_starts evict $MODEL /tmp/site $root
    fast worker $which-dropped --root $root "${run_env[@]}"
    [ "${BARE:-1}" = 1 ] && fast bare $which-bare --root $root "${run_env[@]}"
    python3 -m bench.fast_starts table --results $FAST | tee "$OUT/levers-table.md"
    cp $FAST/*.json "$OUT/" 2>/dev/null; cp $FAST/$which-*.log "$OUT/" 2>/dev/null
    ;;
  startlevers)
    # Issue 29 on a fresh stand-in volume: a cold start, a warm one, a warm one without vLLM's startup plan,
    # the ladder (FULL fails early, injected; PIECEWISE starts on what the FULL rung compiled), then with the
    # page cache dropped vLLM's default loader and its multi-thread loader.
    python3 -m compileall -q -j 16 /tmp/site >/dev/null 2>&1  # bytecode, as the image has it
    vol=/tmp/vol-levers; rm -rf $vol ~/.cache/vllm ~/.triton /tmp/torchinductor_*; mkdir -p $vol $FAST
    run_env=(MODEL_NAME=$MODEL NETWORK_VOLUME_PATH=$vol)
    loader='ENGINE_ARGS={"model_loader_extra_config": {"enable_multithread_load": true, "num_threads": 8}}'
    fast worker levers-cold "${run_env[@]}"
    fast worker levers-warm "${run_env[@]}"
    fast worker plan-off-warm "${run_env[@]}" VLLM_ENABLE_STARTUP_PLAN=0
    ptx_fault
    fast worker ladder-warm "${run_env[@]}" GAMS_TEST_INJECT_START_FAILURE=/tmp/ptx-fault.txt
    python3 -m bench.fast_starts evict $MODEL /tmp/site $PWD
    fast worker levers-dropped "${run_env[@]}"
    python3 -m bench.fast_starts evict $MODEL /tmp/site $PWD
    fast worker multithread-dropped "${run_env[@]}" "$loader"
    python3 -m bench.fast_starts table --results $FAST | tee "$OUT/startlevers-table.md"
    cp $FAST/*.json "$OUT/" 2>/dev/null; cp $FAST/ladder-warm.log $FAST/levers-warm.log "$OUT/" 2>/dev/null
    ;;
  tp)
    m27=/tmp/gams-27b-shaped
    case ${2:-} in
      model) nvidia-smi -L | tee "$OUT/tp-gpus.txt"
             time python3 -m builder.shaped_model gams-27b $m27 --device cuda 2>&1 | tail -2; du -sh $m27 ;;
      cards) timeout 560 python3 -m bench.card_emulation --model $m27 --preset cjvt/GaMS-27B-Instruct \
               --cards ${CARDS:-48 full} --concurrency 1 8 32 64 --start-timeout 400 --out "$OUT/tp-cards.json" \
               2>&1 | tee "$OUT/tp-cards.txt" ;;
      suite) timeout 560 python3 -m bench.gpu_suite run --model $m27 --mode full --tensor-parallel-size 2 \
               --concurrency 1 8 32 64 --out "$OUT/tp-suite.json" >"$OUT/tp-suite.log" 2>&1
             echo "== suite TP 2: exit $?"; grep -E '^\{"path"|^SUMMARY' "$OUT/tp-suite.log" ;;
      *) sed -n 2,60p "$0"; exit 2 ;;
    esac
    ;;
  loaders)
    # Issue 29: vLLM's weight loaders from a cold page cache, after a cold start that fills the compile cache: the
    # worker (default loader, its readahead paced during the imports), then bare engines (no readahead) with the
    # default loader and with InstantTensor (direct I/O). InstantTensor is in the lock but not in the kit: put its
    # wheel in .gpu/extra/ here and carry it (`pip download instanttensor==0.2.2 --no-deps --python-version 3.12
    # --only-binary=:all: --platform manylinux_2_28_x86_64 -d .gpu/extra`).
    for wheel in .gpu/extra/instanttensor-*.whl; do
      [ -f "$wheel" ] && python3 -m pip install -q --no-deps --no-index --target /tmp/site "$wheel"
    done
    python3 -c "import instanttensor" 2>/dev/null || echo "instanttensor missing: its run will fail"
    vol=/tmp/vol-branch; mkdir -p $vol $FAST  # levers branch's volume, when that step ran: no second cold start
    seed_model_info
    run_env=(MODEL_NAME=$MODEL NETWORK_VOLUME_PATH=$vol MODEL_INFO_SEED_DIR=/tmp/model-info)
    [ -f $FAST/branch-cold.json ] || fast worker loaders-cold "${run_env[@]}"
    python3 -m bench.fast_starts evict $MODEL /tmp/site $PWD
    fast worker loaders-dropped "${run_env[@]}"
    python3 -m bench.fast_starts evict $MODEL /tmp/site $PWD
    fast bare default-dropped "${run_env[@]}"
    python3 -m bench.fast_starts evict $MODEL /tmp/site $PWD
    fast bare instanttensor-dropped "${run_env[@]}" 'ENGINE_ARGS={"load_format": "instanttensor"}'
    python3 -m bench.fast_starts table --results $FAST | tee "$OUT/loaders-table.md"
    cp $FAST/loaders-*.json $FAST/*-dropped.json "$OUT/" 2>/dev/null
    ;;
  slowdisk)
    # Issue 29: the weights on a slow volume, page cache dropped: a loop device whose reads cgroup v2's io.max holds
    # to RATE_MBPS (default 300, a network volume's 200-400 MB/s), the imports on the local disk. This worker
    # (readahead during the imports) beside main's (none: before29/, carried). The slow copy is bind-mounted on
    # $MODEL, the path the compile cache's key holds, so each reuses its levers volume (else a cold start first).
    rate=$(( ${RATE_MBPS:-300} * 1000000 )); img=/tmp/slow.img; mnt=/tmp/slowvol; cg=/sys/fs/cgroup/gams-slow
    mountpoint -q $mnt || { truncate -s 22G $img && mkfs.ext4 -q -F $img && mkdir -p $mnt && mount -o loop $img $mnt; } \
      || { echo "slowdisk: no loop device mount here"; exit 1; }
    [ -d $mnt/model ] || cp -r $MODEL $mnt/model
    mountpoint -q $MODEL || mount --bind $mnt/model $MODEL || { echo "slowdisk: no bind mount here"; exit 1; }
    majmin=$(lsblk -no MAJ:MIN "$(findmnt -n -o SOURCE $mnt)" | tr -d ' ')
    if ! grep -qw io /sys/fs/cgroup/cgroup.subtree_control; then  # cgroup v2: only a cgroup without processes
      mkdir -p /sys/fs/cgroup/rest                               # may hand controllers to its children
      for pid in $(cat /sys/fs/cgroup/cgroup.procs); do echo $pid > /sys/fs/cgroup/rest/cgroup.procs 2>/dev/null; done
      echo +io > /sys/fs/cgroup/cgroup.subtree_control || { echo "slowdisk: cgroup v2's io controller refused"; exit 1; }
    fi
    mkdir -p $cg && echo "$majmin rbps=$rate" > $cg/io.max || { echo "slowdisk: io.max refused"; exit 1; }
    echo "slowdisk: $mnt/model on $majmin, reads held to $(cat $cg/io.max)"
    seed_model_info
    for which in branch main; do
      root=$PWD; [ "$which" = main ] && root=$PWD/before29
      vol=/tmp/vol-$which; mkdir -p $vol $FAST
      run_env=(MODEL_NAME=$MODEL NETWORK_VOLUME_PATH=$vol MODEL_INFO_SEED_DIR=/tmp/model-info)
      [ -f $FAST/$which-cold.json ] || fast worker slow-$which-cold --root $root "${run_env[@]}"
      python3 -m bench.fast_starts evict $MODEL /tmp/site $root
      ( echo $BASHPID > $cg/cgroup.procs && fast worker slow-$which-dropped --root $root "${run_env[@]}" )
    done
    umount $MODEL
    python3 -m bench.fast_starts table --results $FAST | tee "$OUT/slowdisk-table.md"
    cp $FAST/slow-*.json "$OUT/" 2>/dev/null
    ;;
  readahead)
    # Issue 29: the weights readahead's ways of reading against the imports, page cache dropped before each.
    timeout 540 python3 -m bench.readahead_contention $MODEL --out "$OUT/readahead-contention.json" "${@:2}"
    ;;
  lora)
    timeout 540 python3 -m bench.lora_cost --model $MODEL --out "$OUT/lora-cost.json" 2>&1 | tee "$OUT/lora-cost.txt"
    ;;
  starts)
    shift
    python3 -m compileall -q -j 16 /tmp/site >/dev/null 2>&1  # bytecode, as the image has it
    rm -rf $VOLUME ~/.cache/vllm ~/.triton ~/.cache/gams-worker $FAST; mkdir -p $VOLUME $FAST
    fast worker cold MODEL_NAME=$MODEL NETWORK_VOLUME_PATH=$VOLUME "$@"
    fast worker warm MODEL_NAME=$MODEL NETWORK_VOLUME_PATH=$VOLUME "$@"
    python3 -m bench.fast_starts table --results $FAST | tee "$OUT/starts-table.md"
    cp $FAST/*.json $FAST/*.out "$OUT/" 2>/dev/null
    ;;
  cards)
    shift
    [ -f "$MODEL/config.json" ] || bash "$0" model
    timeout 540 python3 -m bench.card_emulation --model $MODEL --out "$OUT/cards.json" "$@" 2>&1 | tee "$OUT/cards.txt"
    ;;
  importfloor)
    python3 -m compileall -q -j 16 /tmp/site >/dev/null 2>&1  # bytecode as the image has it (see cold)
    { python3 bench/import_floor.py --repeat 3; python3 bench/import_floor.py --repeat 2 --no-bytecode; } \
      2>&1 | tee "$OUT/import-floor.txt"
    ;;
  imports)
    python3 - <<'EOF_PY' | tee "$OUT/imports.txt"
import time
t = time.perf_counter()
def took(what):
    global t
    now = time.perf_counter(); print(f"{what:55s} {now - t:6.2f} s", flush=True); t = now
import torch; took("import torch")
import vllm; took("import vllm")
from vllm.v1.engine.async_llm import AsyncLLM; took("from vllm.v1.engine.async_llm import AsyncLLM")
from transformers import AutoTokenizer; took("from transformers import AutoTokenizer (after vllm)")
import runpod; took("import runpod (after vllm, transformers)")
EOF_PY
    ( time python3 -c "import runpod" ) 2>&1 | grep real | sed 's/^/import runpod alone: /' | tee -a "$OUT/imports.txt"
    ;;
  coldstart)
    shift
    run=worker_run; [ "${1:-}" = spy ] && run=spied_worker_run && shift
    rm -rf $VOLUME ~/.cache/vllm ~/.triton ~/.cache/gams-worker; mkdir -p $VOLUME
    $run coldstart-cold NETWORK_VOLUME_PATH=$VOLUME "$@"
    $run coldstart-warm NETWORK_VOLUME_PATH=$VOLUME "$@"
    du -sh $VOLUME/gams-worker/compile-cache/*/*/* | tee "$OUT/compile-cache-size.txt"
    ;;
  warmstart)
    name=$2; shift 2
    worker_run "warmstart-$name" NETWORK_VOLUME_PATH=$VOLUME "$@"
    ;;
  model)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
    python3 -c 'import torch, vllm; print("torch", torch.__version__, "cuda", torch.version.cuda, "| vllm", vllm.__version__)' | tee -a "$OUT/gpu.txt"
    time python3 -m builder.shaped_model gams-9b $MODEL --device cuda 2>&1 | tail -2
    du -sh $MODEL
    python3 -m bench.gpu_suite bandwidth | tee -a "$OUT/gpu.txt"
    ;;
  suite)
    shift
    bw=$(grep -oE '[0-9]+ GB/s' "$OUT/../gpu.txt" 2>/dev/null | grep -oE '[0-9]+' || true)
    for mode in "$@"; do
      extra=()
      [ "$mode" = fp8 ] && extra=(--quantization fp8) && engine_mode=full || engine_mode=$mode
      python3 -m bench.gpu_suite run --model $MODEL --mode "$engine_mode" "${extra[@]}" ${SUITE_ARGS:-} \
        ${BANDWIDTH_GBS:+--bandwidth-gbs $BANDWIDTH_GBS} --out "$OUT/suite-$mode.json" >"$OUT/suite-$mode.log" 2>&1
      echo "== suite $mode: exit $?"; grep -E '^\{"path"|^SUMMARY' "$OUT/suite-$mode.log"
    done
    ;;
  ladder)
    ptx_fault
    worker_run ladder-ptx GAMS_TEST_INJECT_START_FAILURE=/tmp/ptx-fault.txt
    ;;
  platform|platform-stats|platform-budget|platform-before)
    # Issue 23: each engine alone on the GPU (--engines one-at-a-time), as deployed: 512 streams of 256 tokens
    # need ~47 GB of KV cache. MAX_MODEL_LEN=4096; a warm compile cache (the raw engine's start warms the
    # worker's: same settings, same folder; max_num_seqs is part of vLLM's compile hash, so the first start at
    # 512 may compile). Options after the step's name win (--max-num-seqs 0: the worker sizes it; the log's
    # max_num_seqs: line says what the sizing gives on this card either way).
    step=$1; shift
    common=(--model $MODEL --engines one-at-a-time --max-model-len 4096 --gpu-memory-utilization 0.90
            --max-num-seqs 512 --max-concurrency 512 --tokens 256 --poisson-jobs 0 --log-dir "$OUT/$step-logs")
    case $step in
      platform)
        extra=(--concurrency 1 8 32 64 128 256 512 --rounds 3)
        [ -n "${SPY:-}" ] && extra+=(--py-spy $SPY_BIN --spy-at 512 --spy-seconds 15) ;;
      platform-stats)
        extra=(--concurrency 64 256 512 --rounds 3 --variant stats-on:LOG_ENGINE_STATS=true) ;;
      platform-budget)
        extra=(--concurrency 256 512 --rounds 2 --variant budget-250:STREAM_POSTS_PER_SECOND=250
               --variant budget-1000:STREAM_POSTS_PER_SECOND=1000 --variant budget-2000:STREAM_POSTS_PER_SECOND=2000) ;;
      platform-before)
        before=${1:-before}; [ $# -gt 0 ] && shift
        [ -f "$before/handler.py" ] || { echo "no $before/handler.py: mkdir $before; git archive 97da0c9 | tar -x -C $before"; exit 2; }
        extra=(--concurrency 64 128 256 512 --rounds 2 --baseline-worker "$before/handler.py") ;;
    esac
    log="$OUT/$step-$(date +%H%M%S).log"
    timeout 570 python3 -m bench platform "${common[@]}" "${extra[@]}" --out "$OUT/$step.json" "$@" >"$log" 2>&1
    echo "== $step: exit $?, log $log"; sed -n '/^platform suite/,/^wrote/p' "$log"
    grep -h -E "max_num_seqs:|concurrency:|stream chunks:" "$OUT/$step-logs"/*.log 2>/dev/null | cut -c1-300 | sort -u
    ;;
  http)
    shift
    log="$OUT/http-$(date +%H%M%S).log"
    # The servers' logs stay on the machine (/tmp/http-logs): a full folder of them kept $OUT from coming back.
    timeout 540 python3 -m bench platform --http --model $MODEL --engines one-at-a-time --max-model-len 4096 \
      --gpu-memory-utilization 0.90 --max-num-seqs 512 --max-concurrency 512 --tokens 256 --poisson-jobs 0 \
      --concurrency 1 8 32 64 128 256 512 --rounds ${ROUNDS:-1} --log-dir /tmp/http-logs --out "$OUT/http.json" \
      "$@" >"$log" 2>&1
    echo "== http: exit $?, log $log"; sed -n '/^platform suite/,/^wrote/p' "$log"
    ;;
  platform-h100)
    # The issue-14 layout: two engines on the one GPU (raw in-process, the worker's in handler.py), 0.42 each.
    shift
    log="$OUT/platform-suite-$(date +%H%M%S).log"
    python3 -m bench platform --model $MODEL --max-model-len 4096 --gpu-memory-utilization 0.42 \
      --max-concurrency 64 --concurrency 1 8 32 64 --tokens 256 --rounds 5 --poisson-jobs 512 \
      --out "$OUT/platform-suite.json" "$@" >"$log" 2>&1
    echo "== platform: exit $?, log $log"; sed -n '/^platform suite/,/^wrote/p' "$log"
    ;;
  openai)
    python3 -m bench openai --model $MODEL --preset cjvt/GaMS-9B-Instruct --log "$OUT/openai-session.log" \
      | tee "$OUT/openai-session.txt"
    ;;
  *) sed -n 2,48p "$0"; exit 2 ;;
esac
