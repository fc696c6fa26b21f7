#!/usr/bin/env bash
# The device runs behind assets/moca-small (issue 17): the bundled model trained on one GPU in
# calls of at most 10 minutes, each resuming from the files of the previous one (the machine
# keeps /root/bw while it stays warm). From the repository root:
#   bash experiments/results/bundle_train.sh data_vae   # build the 'small' split (CPU workers)
#                                                       # while the VAE trains, then encode it
# INIT_BUNDLE=assets/moca-small (or any bundle) makes both trainings params-only warm restarts
# from that bundle (fresh optimizer): the VAE as a decoder-only fine-tune (its encoder frozen,
# so the latents the bundle's DiT learned stay the same) that decodes posterior means half
# of the time, the DiT continuing from the bundle's weights.
# Round 6 (2026-12-02), three chained calls on one warm machine (the data call, then the same
# dit call twice; the second resumed and finished the schedule):
#   INIT_BUNDLE=assets/moca-small bash experiments/results/bundle_train.sh data   # 382 s
#   INIT_BUNDLE=assets/moca-small DIT_NAME=r6 DIT_SECONDS=900 DIT_CALL_S=565 \
#     DIT_EXTRA="--config.batch_size=64 --config.num_steps=14000 \
#     --config.optim.total_steps=14000 --config.optim.schedule=cosine --config.optim.lr=3e-4 \
#     --config.optim.final_lr_fraction=0.05 --config.optim.warmup_steps=100 \
#     --config.flow.t_shift=3.0 --config.data.num_workers=0 --config.data.in_memory=true \
#     --config.data.read_threads=8 --config.checkpoint.every=1000" \
#     bash experiments/results/bundle_train.sh dit
# Round 7 (2026-12-02), the same warm machine, three chained calls (data 310 s; dit 492 s;
# bench_input then the same dit call resumed, 354 s): a params-only warm restart from round 6
#   INIT_BUNDLE=assets/moca-small bash experiments/results/bundle_train.sh data
#   CALL_START=$(date +%s) INIT_BUNDLE=assets/moca-small DIT_NAME=r7 DIT_CALL_S=575 \
#     DIT_EXTRA="--config.batch_size=64 --config.num_steps=9000 \
#     --config.optim.total_steps=9000 --config.optim.schedule=cosine --config.optim.lr=2e-4 \
#     --config.optim.final_lr_fraction=0.05 --config.optim.warmup_steps=100 \
#     --config.flow.t_shift=3.0 --config.data.num_workers=0 --config.data.in_memory=true \
#     --config.data.read_threads=8 --config.checkpoint.every=1000" \
#     bash experiments/results/bundle_train.sh dit
# Round 8 (2026-12-02, not shipped: experiments/results/round8_val.md), a fresh machine,
# three chained calls (data then bench_input in one call, 483 s; dit 512 s; the same dit
# call resumed, 256 s): round 7's recipe from round 7 with the flow times shifted by 5
#   CALL_START=$(date +%s) INIT_BUNDLE=assets/moca-small OUT=$OUT/data \
#     bash experiments/results/bundle_train.sh data
#   INIT_BUNDLE=assets/moca-small OUT=$OUT/bench bash experiments/results/bundle_train.sh bench_input
#   CALL_START=$(date +%s) INIT_BUNDLE=assets/moca-small DIT_NAME=r8 DIT_CALL_S=575 \
#     DIT_EXTRA="<round 7's, with --config.num_steps=11000 --config.optim.total_steps=11000 \
#     --config.flow.t_shift=5.0>" bash experiments/results/bundle_train.sh dit
#   (the second dit call: the same with DIT_CALL_S=540)
# An exported bundle carries its training config's sampling defaults, not the warm-start
# bundle's: set them again before shipping (export_bundle --update --scene_cfg_scale=1
# --cfg_interval=0.8,1 ...).
#   INIT_BUNDLE=assets/moca-small bash experiments/results/bundle_train.sh vae_parts
#                                     # a decoder-only fine-tune of the bundle's VAE on the
#                                     # split's real parts (VAE_SHARDS=16 built with SDF
#                                     # samples), swapped into a copy of the bundle; then
#                                     # `evaluate --reconstruct` on the CPU
# Round 9 (2026-12-02, shipped: experiments/results/round9_vae_parts.md), a fresh machine,
# three chained calls, each a fresh fine-tune from the bundle (the previous one's workdir
# moved aside), at 62-63 steps/s: 16 shards / 8,000 steps (324 s), 32 / 20,000 (476 s),
# 48 / 24,000 (543 s, stopped by the deadline at 23,800; this one shipped)
#   mv /root/bw/vae_parts /root/bw/vae_parts_20k; CALL_START=$(date +%s) \
#     INIT_BUNDLE=assets/moca-small OUT=$OUT/vp3 VAE_CALL_S=575 VAE_SHARDS=48 \
#     VAE_STEPS=24000 bash experiments/results/bundle_train.sh vae_parts
# Round 10 (2026-12-02, experiments/results/round10_vae_mixed.md), a fresh machine: round 9's
# call with half of every batch random primitives (VAE_SOURCE=mixed), a fresh fine-tune from
# the round-9 bundle. The first call (557 s: the 48 shards took 145 s to build) was stopped
# by its deadline at step 11,100 and its evaluation cut by the timeout; the second resumed
# it with VAE_WORKERS=16 and failed at once (grain's worker-count-bound state, since
# replaced by a position); the third, with 14 workers again, resumed and finished (346 s).
# 36-42 steps/s against round 9's 62: 2 of the 14 workers sampled the primitives, too few
# (`vae_task.mixed_workers` now gives them 5):
#   CALL_START=$(date +%s) INIT_BUNDLE=assets/moca-small OUT=$OUT/mix50 VAE_CALL_S=575 \
#     VAE_SHARDS=48 VAE_STEPS=20000 VAE_SOURCE=mixed VAE_RUN=vae_mix50 VAE_WORKERS=14 \
#     VAE_EXTRA="--config.data.analytic_fraction=0.5" bash experiments/results/bundle_train.sh vae_parts
#   (then the same with OUT=$OUT/mix50c VAE_CALL_S=430)
# Round 11 (2026-12-02, experiments/results/round11_fresh_data.md), a fresh machine: the DiT
# on new objects, the `small` split built again with generator seed 1 (10,598 other items)
# plus seed 0's first 16 shards, a params-only warm restart from round 10's bundle with
# round 7's recipe. The data call took 398 s (seed 1: build 151 s, encode 128 s; seed 0's 16
# shards: 108 s); the first dit call trained 6,580 of the planned 14,000 steps (22 steps/s);
# the machine was given back before the second (an idle gap over 30 s), so the data and
# the checkpoint were lost and round 11 is that first call's export:
#   CALL_START=$(date +%s) INIT_BUNDLE=assets/moca-small OUT=$OUT/s1 DATA_SEED=1 \
#     bash experiments/results/bundle_train.sh data
#   INIT_BUNDLE=assets/moca-small OUT=$OUT/s0 DATA_SHARDS=16 bash experiments/results/bundle_train.sh data
#   CALL_START=$(date +%s) INIT_BUNDLE=assets/moca-small DIT_NAME=r11 DIT_CALL_S=575 \
#     DIT_DATA=/root/bw/latents_seed1,/root/bw/latents DIT_EXTRA="<round 7's, with \
#     --config.num_steps=14000 --config.optim.total_steps=14000>" \
#     bash experiments/results/bundle_train.sh dit
# The data stage now also encodes the `val` split into $W/latents_val (encode_val), and the
# dit stage evaluates its flow loss there (eval.json's eval_split 'val'); before, with no
# data.val_dir, it was the loss on the first training batches.
# VAE_SOURCE=mixed (with VAE_EXTRA="--config.data.analytic_fraction=0.5") mixes random
# primitives into every batch of the fine-tune, so the decoder keeps the shapes the split
# lacks; VAE_RUN names the fine-tune's folder under $W (default vae_parts).
#   DIT_SECONDS=300 bash experiments/results/bundle_train.sh dit          # one DiT chunk (a
#       2026-12-01 call with 360 s ran past 600 s on a cold machine: 44 s start-up, 44 s init
#       and 70 s train-step compilation, then 75 s of evaluation). Training also stops and
#       saves at a wall-clock deadline, DIT_RESERVE_S (150 s) before the call's end
#       (CALL_START + DIT_CALL_S, 570 s), compilation included, so the evaluation and the
#       export fit; the hard timeout at the call's end is only a backstop. (Round 5, same
#       day: with the old timeout of DIT_SECONDS + 170 s alone, a slow start-up got the run
#       killed mid-training, in an unfinished checkpoint save, twice losing steps.)
#   DIT_SECONDS=300 EVAL=1 bash experiments/results/bundle_train.sh dit   # + evaluation
#   INIT_BUNDLE=assets/moca-small bash experiments/results/bundle_train.sh data   # the split,
#                                     # encoded with the bundle's VAE (no VAE training);
#                                     # DATA_SHARDS=16: only the first 16 of its 48 shards
#   DIT_NAME=probe DIT_EXTRA="--config.init.bundle_parts=('dit',)" ... dit   # another run
#   INIT_BUNDLE=assets/moca-small bash experiments/results/bundle_train.sh bench_input
#                                     # after data: the DiT's input feeds against the step
#                                     # fed from memory (experiments/input_pipeline.py)
#   INIT_BUNDLE=assets/moca-small bash experiments/results/bundle_train.sh study
#                                     # the section-5 study: training stops at STUDY_TRAIN_S
#                                     # (440) s into the call, everything at STUDY_CALL_S
#                                     # (570); repeat the call on the warm machine until
#                                     # every variant's bundle came back (8 x ~19 MiB, 3 a
#                                     # call). Seen on an H200 (2026-12-01, 8 variants,
#                                     # batch 32): build + encode 127 s, eight concurrent
#                                     # train-step compilations 254-293 s, then 4.1-5.2
#                                     # steps/s per variant; 2000 steps took 2 calls
#                                     # (STUDY_TRAIN_S=520 in the first)
#   INIT_BUNDLE=assets/moca-small STUDY_FROM="/work/.device/1 /work/.device/2" \
#     W=/tmp/study OUT=/tmp/study_out bash experiments/results/bundle_train.sh study_eval
#                                     # here, on the CPU: evaluates the shipped bundles and
#                                     # writes experiments/results/quality_study.*
# Every call ends with what the next session needs in $OUT (at most 8 files of 16 MiB):
#   logs.tar.gz             logs, metrics.jsonl, runs.jsonl, eval.json, loss curves, tables
#   vae.tar.part-*          the VAE workdir (orbax checkpoint, optimizer state included)
#   bundle.tar.part-*       (dit) the exported bundle (experiments.export_bundle), split
#   jax_cache.tar.gz        (dit) the compilation cache when it fits in 15 MiB: unpack it
#                           into .jax_cache (git-ignored) and carry it next time
#   study_bundles.tar.part-* (study) exported variant bundles without their VAE (study_eval)
# Reassemble with `cat bundle.tar.part-* | tar -x -C assets`.
# TINY=1 runs the same sequence with the tiny configs and the tiny split (a CPU dry run).
set -u
CALL_START=${CALL_START:-$(date +%s)}  # the device call's start (the study's deadlines)
stage=${1:?"stage: data_vae | data | vae_parts | bench_input | dit | study | study_eval"}
OUT=${OUT:-bundle_out}
W=${W:-/root/bw}
# DATA_SEED=k (data): the split built with generator seed k (data_pipeline.build
# --base_seed: other objects and scenes than seed 0's, none shared with val or test) into
# $W/data_seed$k and $W/latents_seed$k; seed 0 keeps $W/data and $W/latents. DIT_DATA (dit):
# the latent folders the DiT trains on, comma-separated (default $W/latents).
DATA_SEED=${DATA_SEED:-0}
if [ "$DATA_SEED" = 0 ]; then DATA=$W/data LATENTS=$W/latents
else DATA=$W/data_seed$DATA_SEED LATENTS=$W/latents_seed$DATA_SEED; fi
mkdir -p "$OUT/logs" "$W"
export PYTHONUNBUFFERED=1
# The modules the GPU image lacks, carried as wheels (.whl, carry=[".whl"]), made here with
#   ../shared/tools/device-wheels.sh grain==0.2.18 array-record==0.8.6 trimesh==4.12.2 \
#     ml-collections==1.1.0 tensorboardX==2.6.5 portpicker pymeshfix==0.18.1 \
#     embreex==2.17.7.post7 rtree
# (24 MiB; the working tree with the bundle is 38 MiB of the 64 sent). Without embreex and
# rtree the renders' ray casts fail and the data build stops (2026-12-02). They go into
# /tmp/site_bundle, installed again whenever something there is missing (a warm machine may
# hold an older set).
modules="grain, array_record, trimesh, ml_collections, tensorboardX, embreex, rtree"
[ -d /tmp/site_bundle ] && export PYTHONPATH=/tmp/site_bundle:${PYTHONPATH:-}
if [ -d .whl ] && ! python3 -c "import $modules" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site_bundle .whl/*.whl
  export PYTHONPATH=/tmp/site_bundle:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
case "$stage" in  # the stages that build or render here need them all; study_eval does not
  data_vae|data|vae_parts|study)
    if ! missing=$(python3 -c "import $modules" 2>&1); then
      echo "bundle_train.sh $stage: missing Python modules: $(echo "$missing" | tail -1)" >&2
      [ "${TINY:-0}" = 1 ] || exit 3
    fi;;
esac
export JAX_COMPILATION_CACHE_DIR=$W/jax_cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
# A compilation cache brought back by an earlier call (jax_cache.tar.gz, unpacked into the
# ignored folder .jax_cache and carried) spares a fresh machine the DiT's init and train-step
# compilations (88 s on 2026-12-01); entries of another jax or GPU are simply not hit.
if [ -d .jax_cache ] && [ ! -d "$W/jax_cache" ]; then cp -r .jax_cache "$W/jax_cache"; fi
summary=$OUT/logs/summary_$stage.txt
note() { echo "$(date -u +%T) [${SECONDS}s] $*" | tee -a "$summary"; }
last_line() { tr '\r' '\n' < "$1" | grep -a "$2" | tail -1; }
gpu=$(nvidia-smi -L 2>/dev/null | head -1)
note "stage $stage on ${gpu:-no GPU}, $(nproc) cores"

if [ "${TINY:-0}" = 1 ]; then
  SRC=procedural:tiny; VAL_SRC=procedural:test_tiny; VAE_CFG=${VAE_CFG:-tiny}; IMG=56; SHARDS=${SHARDS:-2}; BUILD_WORKERS=0
  VAE_FLAGS="--config.num_steps=20 --config.eval.num_shapes=4"
  DIT_CFG=${DIT_CFG:-tiny}  # DIT_CFG=bundle with INIT_BUNDLE: the bundle-size DiT on the tiny split
  DIT_FLAGS="--config.num_steps=${DIT_STEPS:-20} --config.batch_size=4 --config.checkpoint.every=10"
  EVAL_FLAGS="--steps=2"; EVAL_OBJECTS=2; EVAL_SCENES=1
else
  SRC=procedural:small; VAL_SRC=procedural:val; VAE_CFG=bundle; IMG=112; SHARDS=48; BUILD_WORKERS=11
  ENCODE_GROUPS=${ENCODE_GROUPS:-14}
  VAE_FLAGS="--config.model.dtype=bfloat16 --config.data.num_workers=4 \
    --config.time_limit_s=${VAE_SECONDS:-330}"
  DIT_CFG=bundle
  DIT_FLAGS="--config.model.dit.dtype=bfloat16 --config.model.encoder.dtype=bfloat16 \
    --config.data.num_workers=12 --config.time_limit_s=${DIT_SECONDS:-360}"
  EVAL_FLAGS=""; EVAL_OBJECTS=${EVAL_OBJECTS:-50}; EVAL_SCENES=${EVAL_SCENES:-10}
fi
if [ -n "${INIT_BUNDLE:-}" ]; then
  VAE_FLAGS="$VAE_FLAGS --config.init.from_bundle=$INIT_BUNDLE --config.train_encoder=false \
    --config.model.decode_mean_fraction=0.5"
  [ "${TINY:-0}" = 1 ] || VAE_FLAGS="$VAE_FLAGS --config.num_steps=${VAE_STEPS:-8000} \
    --config.warmup_steps=200 --config.learning_rate=5e-4"
  DIT_FLAGS="$DIT_FLAGS --config.init.from_bundle=$INIT_BUNDLE"
fi

pack() {  # name dir: dir as name.tar.part-* (15 MiB pieces) in $OUT
  rm -f "$OUT/$1".tar.part-*
  tar -C "$(dirname "$2")" -cf - "$(basename "$2")" | split -b 15M - "$OUT/$1.tar.part-"
}

study_flags() {  # STUDY_COMMON: the config every variant shares; STUDY_EVAL_FLAGS: evaluation
  if [ "${TINY:-0}" = 1 ]; then
    STUDY_COMMON="--config.num_steps=${STUDY_STEPS:-3} --config.batch_size=4 --time_steps=2 \
      --variants=${STUDY_VARIANTS:-G,dense}"
    STUDY_EVAL_FLAGS="--eval_split=test_tiny --eval_limit=1 --eval_steps=2 \
      --eval_num_samples=2000 --eval_voxel_resolution=16"
  else
    STUDY_COMMON="--config.model.dit.dtype=bfloat16 --config.model.encoder.dtype=bfloat16 \
      --config.num_steps=${STUDY_STEPS:-2000} --config.checkpoint.every=${STUDY_STEPS:-2000} \
      --config.batch_size=${STUDY_BATCH:-32} --variants=${STUDY_VARIANTS:-A,B,C,D,E,F,G,dense}"
    STUDY_EVAL_FLAGS="--eval_split=test --eval_limit=${STUDY_EVAL:-16} --eval_image_size=$IMG \
      --eval_steps=25 --eval_num_samples=20000"
  fi
}

ship_bundles() {  # the exported variant bundles not shipped by an earlier call, as many as
  # fit in SHIP_MIB (58) MiB: what comes back from a call is at most 8 files of 16 MiB and
  # 64 MiB together (2026-12-01: 5 bundles, 94 MiB, were packed and the pieces past 64 MiB
  # did not come back), logs.tar.gz included; without vae.npz (the same VAE for all:
  # study_eval copies it back); $W/study_shipped.txt lists what went (about 19 MiB a
  # variant at the bundle size: 3 per call)
  local limit=$(( ${SHIP_MIB:-58} * 1048576 )) total=0 size v b list=() left=()
  touch "$W/study_shipped.txt"
  for b in "$W"/study/*/bundle; do
    [ -f "$b/bundle.json" ] || continue
    v=$(basename "$(dirname "$b")")
    grep -qx "$v" "$W/study_shipped.txt" && continue
    size=$(find "$b" -type f ! -name vae.npz -printf '%s\n' | awk '{s += $1 + 1024} END {print s}')
    if [ $((total + size)) -le $limit ]; then list+=("$v/bundle"); total=$((total + size))
    else left+=("$v"); fi
  done
  [ ${#list[@]} -gt 0 ] || { note "no new bundle to ship"; return 0; }
  tar -C "$W/study" --exclude=vae.npz -cf - "${list[@]}" | split -b 15M - "$OUT/study_bundles.tar.part-"
  printf '%s\n' "${list[@]%/bundle}" >> "$W/study_shipped.txt"
  note "shipped bundles ${list[*]%/bundle} ($((total / 1048576)) MiB); next call: ${left[*]:-none}"
}

build_first_shards() {  # n [dir] [n_near] [n_volume]: the split's first n shards into dir
  # ($DATA), one process per shard (all at once); SDF samples per part only where asked
  # (the DiT's shards need surface points alone, a VAE's training needs both)
  local n=$1 dir=${2:-$DATA} near=${3:-0} volume=${4:-0} i
  for i in $(seq 0 $((n - 1))); do
    JAX_PLATFORMS=cpu python3 -m data_pipeline.build --source=$SRC --out="$dir" \
      --num_shards=$SHARDS --shard_index=$i --base_seed=$DATA_SEED --n_surface=2048 --n_near=$near --n_volume=$volume \
      --image_size=$IMG --num_views=2 --num_previews=0 --progress=false \
      > "$OUT/logs/build_$(basename "$dir")_$i.log" 2>&1 &
  done
  wait
  note "built $n of $SHARDS shards into $dir: $(ls "$dir"/shard-*.json | wc -l) finished"
}

encode() {  # the built shards through the frozen VAE encoder (finished shards are kept):
  # ENCODE_GROUPS processes on the CPU cores encode disjoint shards (the per-record work is
  # host-bound), then one run checks every shard and writes the manifest
  local args=(--vae_checkpoint="${VAE_DIR:-$W/vae}" --input="$DATA" --output="$LATENTS"
              --progress=false)
  local k=${ENCODE_GROUPS:-1}
  if [ "$k" -gt 1 ]; then
    for i in $(seq 0 $((k - 1))); do
      JAX_PLATFORMS=cpu python3 -m data_pipeline.encode_latents "${args[@]}" --batch_size=64 \
        --shard_group=$i/$k > "$OUT/logs/encode_$i.log" 2>&1 &
    done
    wait
  fi
  python3 -m data_pipeline.encode_latents "${args[@]}" --batch_size=512 \
    > "$OUT/logs/encode.log" 2>&1
  note "encode_latents rc=$? ($k groups) $(tail -1 "$OUT/logs/encode.log")"
}

encode_val() {  # the held-out split ($VAL_SRC: val, or test_tiny for TINY) through the same
  # encoder into $W/latents_val, once per machine: the dit stage's eval.json is then the flow
  # loss on held-out items (config.data.val_dir) instead of on the first training batches
  [ -f "$W/latents_val/manifest.json" ] && return 0
  JAX_PLATFORMS=cpu python3 -m data_pipeline.build --source=$VAL_SRC --out="$W/data_val" \
    --num_shards=2 --workers=$BUILD_WORKERS --n_surface=2048 --n_near=0 --n_volume=0 \
    --image_size=$IMG --num_views=2 --num_previews=0 --progress=false > "$OUT/logs/build_val.log" 2>&1
  JAX_PLATFORMS=cpu python3 -m data_pipeline.encode_latents --vae_checkpoint="${VAE_DIR:-$W/vae}" \
    --input="$W/data_val" --output="$W/latents_val" --progress=false > "$OUT/logs/encode_val.log" 2>&1
  note "val latents rc=$? $(tail -1 "$OUT/logs/encode_val.log")"
}

if [ "$stage" = data_vae ]; then
  JAX_PLATFORMS=cpu python3 -m data_pipeline.build --source=$SRC --out="$W/data" --num_shards=$SHARDS \
    --workers=$BUILD_WORKERS --n_surface=2048 --n_near=0 --n_volume=0 --image_size=$IMG \
    --num_views=2 --num_previews=2 --progress=false > "$OUT/logs/build.log" 2>&1 &
  build_pid=$!
  python3 -m experiments.train_vae --config=experiments/configs/vae.py:$VAE_CFG $VAE_FLAGS \
    --workdir="$W/vae" > "$OUT/logs/train_vae.log" 2>&1
  note "train_vae rc=$? $(last_line "$OUT/logs/train_vae.log" 'train:')"
  wait $build_pid
  note "build rc=$? $(grep -c . "$W/data/manifest.json" >/dev/null 2>&1 && python3 -c "
import json; m = json.load(open('$W/data/manifest.json')); print(m['count'], 'items', len(m['skipped']), 'skipped')")"
  encode
  encode_val
  cp "$W"/vae/{eval.json,loss_curve.png,metrics.jsonl,runs.jsonl} "$OUT/logs/" 2>/dev/null
  cp "$W"/data/manifest.json "$OUT/logs/data_manifest.json" 2>/dev/null
  cp "$W"/data/previews/*.png "$OUT/logs/" 2>/dev/null
  pack vae "$W/vae"
elif [ "$stage" = data ]; then
  # The split built and encoded with the VAE of INIT_BUNDLE (no VAE training); the dit and
  # study stages then use that VAE (VAE_DIR) for this machine's latents.
  # DATA_SHARDS=n builds only the first n shards (a short call: 16 shards, 3,616 items, were
  # built in 60 s and encoded in 67 s on an H200 host's 16 cores, 2026-12-01).
  VAE_DIR=${INIT_BUNDLE:?"the data stage encodes with a bundle's VAE: set INIT_BUNDLE"}
  if [ -n "${DATA_SHARDS:-}" ]; then build_first_shards "$DATA_SHARDS"; else
    JAX_PLATFORMS=cpu python3 -m data_pipeline.build --source=$SRC --out="$DATA" --num_shards=$SHARDS \
      --base_seed=$DATA_SEED --workers=$((BUILD_WORKERS + 4)) --n_surface=2048 --n_near=0 --n_volume=0 --image_size=$IMG \
      --num_views=2 --num_previews=2 --progress=false > "$OUT/logs/build.log" 2>&1
    note "build rc=$? $(tail -1 "$OUT/logs/build.log")"
  fi
  encode
  encode_val
  echo "$VAE_DIR" > "$W/latents_vae.txt"
elif [ "$stage" = vae_parts ]; then
  # A decoder-only fine-tune of INIT_BUNDLE's VAE on the split's real parts (its encoder
  # frozen, so the bundle's DiT keeps its latents): the first VAE_SHARDS (16) shards built
  # here with SDF samples (2048 near-surface + 1024 uniform points per part), train_vae on
  # them (data.source=records) until VAE_STEPS or the deadline VAE_RESERVE_S (90 s) before
  # the call's end (CALL_START + VAE_CALL_S, 570 s), then swapped into a copy of the bundle
  # (export_bundle --update --vae) and packed. Why: `evaluate --reconstruct` (2026-12-02)
  # found the bundle's VAE, trained on analytic primitives only, the ceiling of generation
  # (thin panels come back as rings), while a latent fitted to a panel's SDF through the
  # same decoder reconstructs it. Re-running the call resumes the fine-tune.
  : ${INIT_BUNDLE:?"the vae_parts stage fine-tunes the VAE of a bundle: set INIT_BUNDLE"}
  n=${VAE_SHARDS:-16}; [ "$n" -le "$SHARDS" ] || n=$SHARDS
  vae_run=$W/${VAE_RUN:-vae_parts}  # VAE_RUN: another fine-tune on the same shards
  build_first_shards "$n" "$W/vae_data" 2048 1024  # finished shards: skipped
  # one more pass over shard 0 (finished: skipped) merges the manifest after every process
  # is done (the concurrent ones each merged what was finished when they ended)
  JAX_PLATFORMS=cpu python3 -m data_pipeline.build --source=$SRC --out="$W/vae_data" \
    --num_shards=$SHARDS --shard_index=0 --n_surface=2048 --n_near=2048 --n_volume=1024 \
    --image_size=$IMG --num_views=2 --num_previews=0 --progress=false > /dev/null 2>&1
  left=$(( CALL_START + ${VAE_CALL_S:-570} - 30 - $(date +%s) ))
  timeout --kill-after=10 $(( left > 30 ? left : 30 )) \
    python3 -m experiments.train_vae --config=experiments/configs/vae.py:$VAE_CFG $VAE_FLAGS \
    --config.data.source=${VAE_SOURCE:-records} --config.data.dir="$W/vae_data" \
    --config.time_limit_s=0 \
    --config.stop_at_unix=$(( CALL_START + ${VAE_CALL_S:-570} - ${VAE_RESERVE_S:-90} )) \
    --config.data.num_workers=${VAE_WORKERS:-12} --config.data.parts_per_element=4 \
    ${VAE_EXTRA:-} --workdir="$vae_run" > "$OUT/logs/train_vae_parts_$(date -u +%H%M).log" 2>&1
  note "train_vae rc=$? $(last_line "$(ls -t "$OUT"/logs/train_vae_parts_*.log | head -1)" 'train:')"
  if [ "$(realpath "$INIT_BUNDLE")" = "$(realpath -m "$W/moca-small")" ]; then
    note "INIT_BUNDLE is $W/moca-small, the copy this stage writes: give another folder"; exit 2
  fi
  rm -rf "$W/moca-small" && cp -r "$INIT_BUNDLE" "$W/moca-small"
  python3 -m experiments.export_bundle --update="$W/moca-small" --vae="$vae_run" \
    > "$OUT/logs/export.log" 2>&1
  swapped=$?
  note "export rc=$swapped $(tail -1 "$OUT/logs/export.log")"
  cp "$vae_run"/{eval.json,loss_curve.png,metrics.jsonl,runs.jsonl} "$OUT/logs/" 2>/dev/null
  # packed only when the swap succeeded: an unchanged copy of INIT_BUNDLE must not come back
  # looking like a fine-tuned bundle
  [ "$swapped" = 0 ] && pack bundle "$W/moca-small"
elif [ "$stage" = dit ]; then
  VAE_DIR=${VAE_DIR:-$(cat "$W/latents_vae.txt" 2>/dev/null || echo "$W/vae")}
  [ -f "$W/latents/manifest.json" ] || [ -n "${DIT_DATA:-}" ] || encode  # data_vae ran out of time
  DIT=$W/${DIT_NAME:-dit}  # DIT_NAME / DIT_EXTRA: another run on the same data (a probe)
  # The checkpoint is saved when the time limit or the deadline hits, whichever is first;
  # the flow-loss evaluation after it can take 70 s (2026-12-01: three fresh compilations)
  # and the export 15 s, hence the deadline DIT_RESERVE_S before the call's end. The hard
  # timeout (the call's end less 20 s for the export) is a backstop that should not fire.
  deadline=$(( CALL_START + ${DIT_CALL_S:-570} - ${DIT_RESERVE_S:-150} ))
  left=$(( CALL_START + ${DIT_CALL_S:-570} - 20 - $(date +%s) ))
  timeout --kill-after=10 $(( left > 30 ? left : 30 )) \
    python3 -m experiments.train_dit --config=experiments/configs/dit.py:$DIT_CFG \
    --config.data.dir="${DIT_DATA:-$W/latents}" --config.vae.workdir="$VAE_DIR" $DIT_FLAGS ${DIT_EXTRA:-} \
    $([ -f "$W/latents_val/manifest.json" ] && echo "--config.data.val_dir=$W/latents_val") \
    --config.stop_at_unix=$deadline --workdir="$DIT" \
    > "$OUT/logs/train_dit_$(date -u +%H%M).log" 2>&1
  note "train_dit rc=$? $(last_line "$(ls -t "$OUT"/logs/train_dit_*.log | head -1)" 'train:')"
  evals=""
  if [ "${EVAL:-0}" = 1 ]; then
    for kind in object scene; do
      n=$EVAL_OBJECTS; [ $kind = scene ] && n=$EVAL_SCENES
      python3 -m experiments.evaluate --checkpoint_dir="$DIT" --split=test --kind=$kind \
        --limit=$n --image_size=$IMG $EVAL_FLAGS --out_dir="$W/eval_${kind}s" \
        > "$OUT/logs/eval_${kind}s.log" 2>&1
      note "evaluate $kind rc=$? $(tail -1 "$OUT/logs/eval_${kind}s.log")"
      cp "$W/eval_${kind}s/table.md" "$OUT/logs/eval_${kind}s_table.md" 2>/dev/null
      cp "$W/eval_${kind}s/metrics.json" "$OUT/logs/eval_${kind}s_metrics.json" 2>/dev/null
      [ -f "$W/eval_${kind}s/metrics.json" ] && evals="$evals,$W/eval_${kind}s"
    done
  fi
  rm -rf "$W/moca-small"
  python3 -m experiments.export_bundle --dit="$DIT" --out="$W/moca-small" \
    --eval_dirs="${evals#,}" > "$OUT/logs/export.log" 2>&1
  note "export rc=$? $(tail -1 "$OUT/logs/export.log")"
  cp "$DIT"/{loss_curve.png,metrics.jsonl,runs.jsonl,eval.json} "$OUT/logs/" 2>/dev/null
  [ -f "$W/moca-small/bundle.json" ] && pack bundle "$W/moca-small"
elif [ "$stage" = bench_input ]; then
  # The DiT row of experiments/results/input_pipeline.md: the bundle-size train step (bf16) on
  # this machine's latents ($W/latents, a data call before), fed from memory, by the grain
  # worker processes the dit stage used before (BENCH_WORKERS, 12), inline, and from the
  # records decoded once into memory (data.in_memory, BENCH_THREADS threads)
  timeout --kill-after=10 ${BENCH_S:-240} python3 -m experiments.input_pipeline --tasks=dit \
    --dit_size=$DIT_CFG --dit_bundle="${INIT_BUNDLE:-}" --dit_data="$W/latents" \
    --dit_batch=${BENCH_BATCH:-64} --dit_workers=${BENCH_WORKERS:-12} \
    --dit_read_threads=${BENCH_THREADS:-8} --seconds=${BENCH_SECONDS:-10} \
    --inline_seconds=5 --out="$OUT/logs/input_pipeline_dit" > "$OUT/logs/input_pipeline.log" 2>&1
  note "input_pipeline rc=$? $(grep -a "'in_memory_steps_per_s'" "$OUT/logs/input_pipeline.log" | tail -1)"
elif [ "$stage" = study ]; then
  # The quality study (issue 17 section 5): full MoC, dense and ablations A-F on the same
  # latents, trained as concurrent processes (experiments.ablations --jobs). Data: this warm
  # machine's $W/latents (a data_vae call before), else the first STUDY_SHARDS of the split's
  # shards, built here in parallel and encoded with the VAE of INIT_BUNDLE (a bundle's
  # frozen encoder: the bundled DiT's latent space). Re-running the same call resumes
  # (variants stopped by the deadline continue from their checkpoints).
  # STUDY_EVAL_ON=cpu (default): the GPU trains, times each step alone and exports every
  # variant's EMA weights as a bundle (--export_bundles, no evaluation here: 2026-12-01, 8
  # processes evaluating on the GPU had not finished after 6 minutes when the call ended);
  # the bundles come back over as many calls as they need (ship_bundles) and the stage
  # study_eval below evaluates them on the CPU. STUDY_EVAL_ON=gpu evaluates here instead.
  VAE_DIR=${VAE_DIR:-$(cat "$W/latents_vae.txt" 2>/dev/null || echo "$W/vae")}
  if [ ! -f "$W/latents/manifest.json" ]; then
    VAE_DIR=${INIT_BUNDLE:?"a study on a fresh machine needs INIT_BUNDLE (the VAE to encode with)"}
    build_first_shards "${STUDY_SHARDS:-16}"
    encode
    echo "$VAE_DIR" > "$W/latents_vae.txt"  # a re-run (the next call) encodes nothing
  fi
  study_flags
  if [ "${STUDY_EVAL_ON:-cpu}" = gpu ]; then WHERE=$STUDY_EVAL_FLAGS; else
    WHERE="--eval_split= --export_bundles"; fi
  # Training stops (and saves) at a wall-clock deadline STUDY_TRAIN_S seconds after this
  # call began (compilation included), leaving the rest of the call for the step timing,
  # the export and packing; the whole run is cut at STUDY_CALL_S (a re-run resumes
  # unfinished training and exports what was not exported).
  left=$(( CALL_START + ${STUDY_CALL_S:-570} - $(date +%s) ))
  timeout --kill-after=10 $(( left > 30 ? left : 30 )) \
    python3 -m experiments.ablations --config=experiments/configs/dit.py:$DIT_CFG \
    --config.data.dir="$W/latents" --config.vae.workdir="$VAE_DIR" $STUDY_COMMON $WHERE \
    --config.data.num_workers=1 --config.time_limit_s=${STUDY_SECONDS:-0} \
    --config.stop_at_unix=$((CALL_START + ${STUDY_TRAIN_S:-440})) --jobs=${STUDY_JOBS:-8} \
    --workdir="$W/study" --results_dir="$OUT/logs/study" --results_name=quality_study \
    > "$OUT/logs/study.log" 2>&1
  note "study rc=$? $(tail -1 "$OUT/logs/study.log")"
  pkill -f "experiments.ablations" 2>/dev/null  # children of a parent cut by the timeout
  mkdir -p "$OUT/logs/study"
  echo "$STUDY_COMMON" > "$OUT/logs/study/flags.txt"  # study_eval uses the same config
  cp "$W/study/table3.md" "$W/study/ablations.json" "$OUT/logs/study/" 2>/dev/null
  for v in "$W"/study/*/; do  # each variant's records (small), as laid out in $W/study
    v=$(basename "$v"); [ -f "$W/study/$v/config.json" ] || continue
    mkdir -p "$OUT/logs/study/$v"
    for f in train_result.json variant_result.json ablation_result.json runs.jsonl \
      metrics.jsonl eval.json loss_curve.png config.json; do
      cp "$W/study/$v/$f" "$OUT/logs/study/$v/" 2>/dev/null
    done
    tail -c 300000 "$W/study/$v/log.txt" > "$OUT/logs/study/$v/log.txt" 2>/dev/null
  done
  ship_bundles
  if ! ls "$OUT"/study_bundles.tar.part-* > /dev/null 2>&1 && [ -d "$W/jax_cache" ]; then
    # no bundles this call: the compilation cache (the 8 train steps, 293 s of compiling on
    # a fresh machine) comes back instead when it fits; carry it as .jax_cache next time
    tar -C "$W" -czf "$OUT/jax_cache.tar.gz" jax_cache
    [ "$(stat -c %s "$OUT/jax_cache.tar.gz")" -le 15728640 ] || rm -f "$OUT/jax_cache.tar.gz"
  fi
  [ -f "$OUT/logs/study/quality_study_grid.png" ] && cp "$OUT/logs/study/quality_study_grid.png" "$OUT/"
elif [ "$stage" = study_eval ]; then
  # Here, on the CPU: the study calls' files (STUDY_FROM="folder ...", each holding a
  # call's logs.tar.gz and study_bundles.tar.part-*, in call order) laid out again as
  # $W/study had them on the GPU, the VAE (left out of the shipped bundles) copied from
  # INIT_BUNDLE (bundle.json's sha256 checks it is the same), then every variant evaluated
  # from its bundle on the same held-out items; the study goes to STUDY_RESULTS
  # (default experiments/results/quality_study.{md,json} + _grid.png). STUDY_NOTES=file adds
  # the study's reading (markdown); a re-run with evaluated variants only rewrites the study.
  VAE_DIR=${INIT_BUNDLE:?"study_eval needs INIT_BUNDLE (the study's VAE)"}
  mkdir -p "$W/study"
  for d in ${STUDY_FROM:?"STUDY_FROM: the folders the study calls brought back"}; do
    tmp=$(mktemp -d)
    tar -xzf "$d/logs.tar.gz" -C "$tmp"
    cp "$tmp"/logs/study/flags.txt "$W/study/" 2>/dev/null
    for v in "$tmp"/logs/study/*/; do  # a variant evaluated by an earlier study_eval is kept
      v=$(basename "$v")
      [ -f "$W/study/$v/eval/metrics.json" ] || cp -r "$tmp/logs/study/$v" "$W/study/"
    done
    rm -rf "$tmp"
    if ls "$d"/study_bundles.tar.part-* > /dev/null 2>&1; then
      cat "$d"/study_bundles.tar.part-* | tar -x -C "$W/study"
    fi
  done
  for b in "$W"/study/*/bundle; do [ -f "$b/vae.npz" ] || cp "$VAE_DIR/vae.npz" "$b/"; done
  note "bundles: $(ls -d "$W"/study/*/bundle 2>/dev/null | wc -l)"
  study_flags
  STUDY_COMMON=$(cat "$W/study/flags.txt" 2>/dev/null || echo "$STUDY_COMMON")
  JAX_PLATFORMS=cpu python3 -m experiments.ablations --config=experiments/configs/dit.py:$DIT_CFG \
    --config.vae.workdir="$VAE_DIR" $STUDY_COMMON $STUDY_EVAL_FLAGS --jobs=1 \
    --workdir="$W/study" --results_dir="${STUDY_RESULTS:-experiments/results}" \
    --results_name=quality_study ${STUDY_NOTES:+--study_notes=$STUDY_NOTES} 2>&1 \
    | tee "$OUT/logs/study_eval.log" | grep -a "^\["
  note "study_eval rc=${PIPESTATUS[0]}"
else
  echo "unknown stage $stage" >&2; exit 2
fi
tar -C "$OUT" -czf "$OUT/logs.tar.gz" logs && rm -rf "$OUT/logs"
if [ "$stage" = dit ] && [ -d "$W/jax_cache" ]; then  # for the next fresh machine (<= 15 MiB)
  tar -C "$W" -czf "$OUT/jax_cache.tar.gz" jax_cache
  [ "$(stat -c %s "$OUT/jax_cache.tar.gz")" -le 15728640 ] || rm -f "$OUT/jax_cache.tar.gz"
fi
ls -la "$OUT"
