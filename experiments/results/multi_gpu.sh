#!/usr/bin/env bash
# The device run behind experiments/results/multi_gpu.md, on a host with 2 GPUs:
#   experiments/results/multi_gpu.sh checks   the reported hang, (a) one process / (b) two
#                                             processes, resume, 2-GPU == 1-GPU
#   experiments/results/multi_gpu.sh scale    paper-size DiT step time and memory
#   experiments/results/multi_gpu.sh run2     the 2026-12-01 call: every compile at once with
#                                             a persistent compilation cache, then timings
# Logs and a summary go to $OUT (default ./multi_gpu_out). Wheels in .whl/ (if any) are
# installed first (the device image lacks grain, ml_collections, tensorboardX).
set -u
OUT=${OUT:-multi_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
summary=$OUT/summary.txt
note() { echo "$(date -u +%T) $*" | tee -a "$summary"; }
run() {  # run NAME LIMIT_S CMD...: SIGABRT at the limit (faulthandler prints every thread)
  local name=$1 limit=$2 t0
  shift 2
  t0=$(date +%s)
  timeout -s ABRT "$limit" "$@" >> "${LOGS:-$OUT}/$name.log" 2>&1
  local rc=$?
  note "$name rc=$rc $(($(date +%s) - t0))s ${XLA_FLAGS:-}"
  return $rc
}
small="--config=experiments/configs/dit.py:small --config.data.source=synthetic \
 --config.batch_size=16 --config.log_every=5 --verbosity=-1"

if [ "${1:-checks}" = checks ]; then
  { nvidia-smi -L; nvidia-smi topo -m; python3 -c "import jax, flax, orbax.checkpoint as o
print('jax', jax.__version__, 'flax', flax.__version__, 'orbax', o.__version__, jax.devices())"
  } >> "$summary" 2>&1
  # 1. as reported: one process, 2 GPUs, NCCL's default kernel launch mode
  NCCL_LAUNCH_MODE=PARALLEL run hang_parallel 90 python3 -m experiments.train_dit $small \
    --config.mesh.data=2 --config.num_steps=60 --config.checkpoint.every=1000 --workdir=/tmp/w_par
  # 2. (a) one process, 2 GPUs, NCCL_LAUNCH_MODE=GROUP (NVIDIA's remedy for one process
  #    driving several GPUs; the entry point set it in the 2026-11-30 run)
  export NCCL_LAUNCH_MODE=GROUP
  run one_process 120 python3 -m experiments.train_dit $small --config.mesh.data=2 \
    --config.num_steps=60 --config.checkpoint.every=1000 --workdir=/tmp/w_d2
  run one_process 120 python3 -m experiments.train_dit $small --config.mesh.data=1 \
    --config.mesh.fsdp=2 --config.num_steps=60 --config.checkpoint.every=1000 --workdir=/tmp/w_f2
  # 3. (b) two processes, one GPU each; 20 steps, then a restart resumes to 30
  MOCA_LOG_DIR=$OUT run two_process 120 experiments/launch_multi.sh 2 experiments.train_dit \
    $small --config.mesh.data=2 --config.num_steps=20 --config.checkpoint.every=10 \
    --workdir=/tmp/w_p2
  MOCA_LOG_DIR=/tmp run two_process 120 experiments/launch_multi.sh 2 experiments.train_dit \
    $small --config.mesh.data=2 --config.num_steps=30 --config.checkpoint.every=10 \
    --workdir=/tmp/w_p2
  ls /tmp/w_p2/checkpoints >> "$summary"; cat /tmp/w_p2/eval.json >> "$summary"
  unset NCCL_LAUNCH_MODE
  # 4. 2 GPUs == 1 GPU on the same global batches
  run equal 200 python3 -m experiments.multi_gpu equal --size=small --components=16 --batch=8 \
    --steps=4
  grep '^{' "$OUT/equal.log" >> "$summary"
elif [ "$1" = diag ]; then
  # The reported hang is a train-step compile that does not finish once the mesh has 2 GPUs
  # (one process or two). Which XLA autotuning setting unblocks it?
  run diag 45 python3 -c "
import time, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
m = Mesh(np.array(jax.devices()), ('d',))
x = jax.device_put(jnp.ones((4096, 4096), jnp.bfloat16), NamedSharding(m, P('d')))
w = jax.device_put(jnp.ones((4096, 4096), jnp.bfloat16), NamedSharding(m, P()))
f = jax.jit(jax.grad(lambda w, x: jnp.sum(jnp.tanh(x @ w).astype(jnp.float32))))
t = time.time(); f.lower(w, x).compile(); print('2-device grad compile s', time.time() - t)"
  export NCCL_LAUNCH_MODE=GROUP
  for flags in "--xla_gpu_shard_autotuning=false" "--xla_gpu_autotune_level=0"; do
    XLA_FLAGS="$flags" run "diag" 110 python3 -m experiments.train_dit $small \
      --config.mesh.data=2 --config.num_steps=30 --config.checkpoint.every=1000 \
      --workdir=/tmp/w_$RANDOM && { note "works with $flags"; ok=$flags; break; }
  done
  if [ -n "${ok:-}" ]; then
    XLA_FLAGS="$ok" MOCA_LOG_DIR=$OUT run two_process 110 experiments/launch_multi.sh 2 \
      experiments.train_dit $small --config.mesh.data=2 --config.num_steps=20 \
      --config.checkpoint.every=10 --workdir=/tmp/w_p2
  fi
elif [ "$1" = diag2 ]; then
  # The 2-device train-step compile, 4 variants at once (compiles are CPU work; no
  # preallocation so the 4 processes share the GPUs). NCCL's default launch mode throughout.
  export XLA_PYTHON_CLIENT_PREALLOCATE=false NCCL_LAUNCH_MODE=PARALLEL
  v() {  # v NAME ENV...: 25 steps of the reported command under the extra environment
    local name=$1; shift
    env "$@" timeout -s ABRT 75 python3 -m experiments.train_dit $small --config.mesh.data=2 \
      --config.num_steps=25 --config.checkpoint.every=1000 --workdir=/tmp/w_$name \
      > "$OUT/$name.log" 2>&1
    note "$name rc=$? $*"
  }
  v default TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=hlo_pass_pipeline=1 &
  v no_lhs XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=false &
  v gspmd JAX_USE_SHARDY_PARTITIONER=false &
  v no_lhs_gspmd XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=false \
    JAX_USE_SHARDY_PARTITIONER=false &
  wait
  grep -h -i "pass" "$OUT/default.log" | tail -n 8 >> "$summary"
  for f in "$OUT"/*.log; do
    echo "$f: $(tr '\r' '\n' < "$f" | grep -E '^train:' | tail -n 1)" >> "$summary"
  done
elif [ "$1" = run2 ]; then
  # Phase 1, all at once (compiles are CPU work; 32 cores; no preallocation so the processes
  # share the GPUs): the small DiT on 1 GPU, data=2, fsdp=2, two processes; the same data=2
  # job with the MoC gather / top-k of main at 1976608 (old/); the 2-GPU == 1-GPU check;
  # and the paper-size layouts compiled into the cache. Phase 2, one at a time: timings.
  export JAX_COMPILATION_CACHE_DIR=/tmp/jaxcache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
  export JAX_LOG_COMPILES=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
  LOGS=/tmp/mlogs  # at most 8 files come back: the logs travel as one archive
  mkdir -p $LOGS
  t_start=$(date +%s)
  left() { echo $((${BUDGET:-555} - $(date +%s) + t_start)); }
  s2="--config=experiments/configs/dit.py:small --config.data.source=synthetic \
 --config.batch_size=16 --config.log_every=5 --verbosity=0 --config.checkpoint.every=1000"
  pt="--size=paper --components=${N:-16} --batch_per_device=${BPD:-2}"
  { nvidia-smi -L; nvidia-smi topo -m
    python3 -c "import jax; print(jax.__version__, jax.devices())"; } >> "$summary" 2>&1
  P1=${P1:-250}
  CUDA_VISIBLE_DEVICES=0 run gpu1 $P1 python3 -m experiments.train_dit $s2 \
    --config.num_steps=80 --workdir=/tmp/w_gpu1 &
  run data2 $P1 python3 -m experiments.train_dit $s2 --config.mesh.data=2 \
    --config.num_steps=80 --workdir=/tmp/w_data2 &
  run fsdp2 $P1 python3 -m experiments.train_dit $s2 --config.mesh.data=1 \
    --config.mesh.fsdp=2 --config.num_steps=80 --workdir=/tmp/w_fsdp2 &
  MOCA_LOG_DIR=$LOGS run proc2 $P1 experiments/launch_multi.sh 2 experiments.train_dit $s2 \
    --config.mesh.data=2 --config.num_steps=40 --config.checkpoint.every=20 \
    --workdir=/tmp/w_proc2 &
  if [ -d old ]; then  # optional: moca_jax, data_pipeline, experiments with moc.py of 1976608
    (cd old && PYTHONPATH=$PWD:$PYTHONPATH JAX_COMPILATION_CACHE_DIR=/tmp/jaxcache_old \
      run data2_old $P1 python3 -m experiments.train_dit $s2 --config.mesh.data=2 \
      --config.num_steps=80 --workdir=/tmp/w_data2_old) &
  fi
  run equal $P1 python3 -m experiments.multi_gpu equal --size=small --components=16 \
    --batch=8 --steps=4 &
  CUDA_VISIBLE_DEVICES=1 JAX_ENABLE_COMPILATION_CACHE=false run init_compile $P1 python3 -m \
    experiments.multi_gpu init --size=small --components=16 --batch=16 &
  for l in ${LAYOUTS:-1x1 2x1 1x2}; do
    run "warm_$l" $P1 python3 -m experiments.multi_gpu one $pt --layouts=$l --compile_only &
  done
  wait
  note "phase 1 done"
  (sleep $(($(left) + 15)); tar czf "$OUT/logs.tgz" -C /tmp mlogs) &
  grep -h '^{' "$LOGS/equal.log" >> "$summary"
  grep -h 'RESULT' "$LOGS"/warm_*.log "$LOGS"/init_compile.log >> "$summary"
  for f in gpu1 data2 fsdp2 proc2 data2_old; do
    pat="compiled in|init [0-9.]+ s|Finished XLA compilation of jit\((train_step|init_state)"
    grep -h -E "$pat" \
      "$LOGS/$f.log" | sed "s/^/$f: /" >> "$summary"
    echo "$f: $(tr '\r' '\n' < "$LOGS/$f.log" | grep -E '^train:' | tail -n 1)" >> "$summary"
  done
  for m in "gpu1_t 1" "data2_t 2"; do
    set -- $m; lim=$(left); ((lim < 30)) && { note "$1 blocked: ${lim}s left"; continue; }
    ((lim > 45)) && lim=45
    CUDA_VISIBLE_DEVICES=$([ $2 = 1 ] && echo 0 || echo 0,1) run $1 $lim python3 -m \
      experiments.train_dit $s2 --config.num_steps=60 --workdir=/tmp/w_$1
    echo "$1: $(tr '\r' '\n' < "$LOGS/$1.log" | grep -E '^train:' | tail -n 1)" >> "$summary"
  done
  for l in ${LAYOUTS:-1x1 2x1 1x2}; do
    lim=$(left); ((lim < 30)) && { note "scale_$l blocked: ${lim}s left"; continue; }
    ((lim > 70)) && lim=70
    run "scale_$l" $lim python3 -m experiments.multi_gpu one $pt --layouts=$l --steps=8
    grep -h 'RESULT' "$LOGS/scale_$l.log" >> "$summary"
  done
  tar czf "$OUT/logs.tgz" -C /tmp mlogs
else
  run scale 560 python3 -m experiments.multi_gpu scale --size=paper --components=${N:-16} \
    --layouts=${LAYOUTS:-1x1,2x1,1x2} --batch_per_device=${BPD:-2} --steps=6 \
    --per_run_timeout_s=${PER_RUN:-240} --out="$OUT/scale.json"
fi
