#!/usr/bin/env bash
# The device run behind experiments/results/multi_gpu.md, on a host with 2 GPUs:
#   experiments/results/multi_gpu.sh checks   the reported hang, (a) one process / (b) two
#                                             processes, resume, 2-GPU == 1-GPU
#   experiments/results/multi_gpu.sh scale    paper-size DiT step time and memory
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
  timeout -s ABRT "$limit" "$@" >> "$OUT/$name.log" 2>&1
  note "$name rc=$? $(($(date +%s) - t0))s"
}
small="--config=experiments/configs/dit.py:small --config.data.source=synthetic \
 --config.batch_size=16 --config.log_every=5 --verbosity=-1"

if [ "${1:-checks}" = checks ]; then
  { nvidia-smi -L; nvidia-smi topo -m; python3 -c "import jax, flax, orbax.checkpoint as o
print('jax', jax.__version__, 'flax', flax.__version__, 'orbax', o.__version__, jax.devices())"
  } >> "$summary" 2>&1
  # 1. as reported: one process, 2 GPUs, NCCL's default kernel launch mode
  NCCL_LAUNCH_MODE=PARALLEL run hang_parallel 100 python3 -m experiments.train_dit $small \
    --config.mesh.data=2 --config.num_steps=60 --config.checkpoint.every=1000 --workdir=/tmp/w_par
  # 2. (a) one process, 2 GPUs, as the entry point now starts (NCCL_LAUNCH_MODE=GROUP)
  run one_process 150 python3 -m experiments.train_dit $small --config.mesh.data=2 \
    --config.num_steps=60 --config.checkpoint.every=1000 --workdir=/tmp/w_d2
  run one_process 150 python3 -m experiments.train_dit $small --config.mesh.data=1 \
    --config.mesh.fsdp=2 --config.num_steps=60 --config.checkpoint.every=1000 --workdir=/tmp/w_f2
  # 3. (b) two processes, one GPU each; 20 steps, then a restart resumes to 30
  MOCA_LOG_DIR=$OUT run two_process 150 experiments/launch_multi.sh 2 experiments.train_dit \
    $small --config.mesh.data=2 --config.num_steps=20 --config.checkpoint.every=10 --workdir=/tmp/w_p2
  MOCA_LOG_DIR=/tmp run two_process 150 experiments/launch_multi.sh 2 experiments.train_dit \
    $small --config.mesh.data=2 --config.num_steps=30 --config.checkpoint.every=10 --workdir=/tmp/w_p2
  ls /tmp/w_p2/checkpoints >> "$summary"; cat /tmp/w_p2/eval.json >> "$summary"
  # 4. 2 GPUs == 1 GPU on the same global batches
  run equal 200 python3 -m experiments.multi_gpu equal --size=small --components=16 --batch=8 \
    --steps=4
  grep '^{' "$OUT/equal.log" >> "$summary"
else
  run scale 560 python3 -m experiments.multi_gpu scale --size=paper --components=${N:-16} \
    --layouts=${LAYOUTS:-1x1,2x1,1x2} --batch_per_device=${BPD:-2} --steps=6 \
    --per_run_timeout_s=${PER_RUN:-240} --out="$OUT/scale.json"
fi
