#!/usr/bin/env bash
# The device run behind experiments/results/input_pipeline.md (issue 17, section 2a/2b), on a
# host with 1 or 2 GPUs, from the repository root:
#   1. tests/test_vae_attention.py on the GPU (the VAE loss's gradient through cuDNN)
#   2. the first steps of train_vae 'small' in bf16 with the default attention, batch 64
#   3. experiments/input_pipeline: VAE 'small' on 1 GPU, then if time is left the DiT
#      'small' (synthetic) on 1 GPU and the VAE on every GPU
# Logs and results go to $OUT (default ./input_pipeline_out). Wheels in .whl/ (if any) are
# installed first (the device image lacks grain, array_record, ml_collections, tensorboardX,
# trimesh, portpicker).
set -u
OUT=${OUT:-input_pipeline_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
# train_vae and the benchmark compile the same VAE step: share it through the cache
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
summary=$OUT/summary.txt
note() { echo "$(date -u +%T) [${SECONDS}s] $*" | tee -a "$summary"; }
{ nvidia-smi -L; nproc; python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
} >> "$summary" 2>&1

# 1. the GPU test (conftest defaults JAX_PLATFORMS to cpu: name the GPU)
JAX_PLATFORMS=cuda timeout 120 python3 -m pytest -q -p no:cacheprovider -rs -m gpu \
  tests/test_vae_attention.py > "$OUT/pytest_gpu.log" 2>&1
note "pytest tests/test_vae_attention.py rc=$? $(tail -1 "$OUT/pytest_gpu.log")"

# 2. train_vae 'small', bf16, attention 'auto', batch 64, one GPU, input workers auto
CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m experiments.train_vae \
  --config=experiments/configs/vae.py:small --config.model.dtype=bfloat16 \
  --config.batch_size=64 --config.num_steps=40 --config.log_every=10 \
  --config.eval.num_shapes=0 --config.eval.write_mesh=False --workdir=/tmp/w_vae \
  > "$OUT/train_vae.log" 2>&1
note "train_vae rc=$? $(tr '\r' '\n' < "$OUT/train_vae.log" | grep -a 'train:' | tail -1)"
cp /tmp/w_vae/metrics.jsonl "$OUT/train_vae_metrics.jsonl" 2>/dev/null

# 3. the benchmark, each part if time is left: the VAE on one GPU, the DiT on one GPU, the
#    VAE on every GPU. Only the .json files come back (8 files at most); the .md is written
#    again from them: python -m experiments.input_pipeline --from_json=...
bench() {  # bench NAME LIMIT_S ARGS...
  local name=$1 limit=$2
  shift 2
  timeout "$limit" python3 -m experiments.input_pipeline --out="/tmp/$name" "$@" \
    >> "$OUT/input_pipeline.log" 2>&1
  note "input_pipeline $name rc=$?"
  cp "/tmp/$name.json" "$OUT/" 2>/dev/null
}
bench input_pipeline_vae 130 --tasks=vae --devices=1
[ "$SECONDS" -lt 200 ] && bench input_pipeline_dit 120 --tasks=dit --devices=1
[ "$SECONDS" -lt 260 ] && [ "$(nvidia-smi -L | wc -l)" -gt 1 ] && \
  bench input_pipeline_all_gpus 80 --tasks=vae --devices=0 --seconds=8 --inline_seconds=3
note done
