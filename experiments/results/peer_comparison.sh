#!/usr/bin/env bash
# Issue 13's side-by-side run, one device call on one GPU (from the repository root, with
# the peer copied into an ignored folder and carried: `cp -r ../shared/peer .peer`,
# carry [".peer", ".whl"]; .whl holds the project's wheels the GPU image lacks, see
# bundle_train.sh; a 2026-12-01 call without it failed at `import ml_collections`):
#   bash experiments/results/peer_comparison.sh
# 1. PartCrafter's own DiT (../shared/peer/bench_partcrafter.py): eager and torch.compile,
#    N = 4..64 (about 50 s of compilation per N for the compiled rows);
# 2. this project's forward and MoC core at the same sizes (experiments/benchmark_attention.py
#    --jobs core,forward, L = 1024, run first), then the fused Pallas kernel in processes of
#    its own (core, and the forward with gather='fused'), then a kernel profile of the
#    forward at N = 4 and 32 (experiments/profile_forward.py; PROFILE=0 skips it);
# 3. optionally (E2E=1) image -> GLB at 16 parts (experiments/benchmark_e2e.py, hierarchical
#    extraction against the two-level one);
# then experiments/peer_comparison.py joins them (the fused runs through --extra) (plus an earlier benchmark_train.json, TRAIN=)
# into $OUT/peer_comparison.{md,json}, the file issue 13 asks for.
set -u
OUT=${OUT:-peer_out}
NS=${NS:-4,8,16,32,64}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/peer_site .peer/wheels/*.whl
if ! python3 -c "import ml_collections, grain" 2>/dev/null; then  # the project's own wheels
  [ -d .whl ] || { echo "missing .whl (carry it): ml_collections/grain are not installed" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_project .whl/*.whl
  PROJECT_SITE=/tmp/site_project
fi
export PYTHONPATH=$PWD:${PROJECT_SITE:-}:${PYTHONPATH:-}
# ours first: benchmark_attention saves after every job, so a cut call keeps what finished
timeout ${OURS_S:-220} python3 experiments/benchmark_attention.py --ns "$NS" --seq_lens 1024 \
  --jobs core,forward --fused off --out "$OUT" --name attention_scaling > "$OUT/ours.log" 2>&1
echo "ours rc=$?"
PYTHONPATH=/tmp/peer_site python3 .peer/bench_partcrafter.py --ns "$NS" --compile \
  --max-num-parts 64 --out "$OUT" > "$OUT/peer.log" 2>&1
echo "peer rc=$? $(ls "$OUT"/partcrafter_bench_*.json 2>/dev/null | tr '\n' ' ')"
# The fused Pallas kernel in processes of their own (a fault of a new GPU kernel can poison
# the CUDA context): its core timings and a whole forward with gather='fused'.
timeout ${FUSED_S:-90} python3 experiments/benchmark_attention.py --ns "$NS" --seq_lens 1024 \
  --jobs core --fused on --out "$OUT" --name attention_fused > "$OUT/fused.log" 2>&1
echo "fused core rc=$?"
timeout ${FUSED_S:-90} python3 experiments/benchmark_attention.py --ns "$NS" --seq_lens 1024 \
  --jobs forward --modes moc --gather fused --out "$OUT" --name forward_fused \
  > "$OUT/forward_fused.log" 2>&1
echo "fused forward rc=$?"
if [ "${PROFILE:-1}" = 1 ]; then  # where the forward's time goes at small and large N
  timeout ${PROFILE_S:-90} python3 -m experiments.profile_forward --ns=4,32 --modes=moc,dense \
    --out="$OUT/forward_profile" > "$OUT/profile.log" 2>&1
  echo "profile rc=$?"
fi
extra=()
if [ "${E2E:-0}" = 1 ]; then
  python3 -m experiments.benchmark_e2e --size=paper --components=16 --repeats=2 \
    --out="$OUT/e2e_latency" > "$OUT/e2e.log" 2>&1
  echo "e2e rc=$?"
  extra+=(--e2e="$OUT/e2e_latency.json")
fi
[ -n "${TRAIN:-}" ] && extra+=(--train="$TRAIN")
peer_json=$(ls -t "$OUT"/partcrafter_bench_*.json 2>/dev/null | head -1)
fused_jsons=$(ls "$OUT"/attention_fused.json "$OUT"/forward_fused.json 2>/dev/null | paste -sd,)
python3 -m experiments.peer_comparison --ours="$OUT/attention_scaling.json" \
  --peer="$peer_json" --extra="$fused_jsons" "${extra[@]}" --out="$OUT/peer_comparison"
