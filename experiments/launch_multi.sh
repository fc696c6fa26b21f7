#!/usr/bin/env bash
# One training job as N processes on this host, one per GPU, joined by jax.distributed with
# the coordinator on localhost: the layout of a multi-host job, on one machine.
#
#   experiments/launch_multi.sh N MODULE [FLAGS...]
#   experiments/launch_multi.sh 2 experiments.train_dit \
#       --config=experiments/configs/dit.py:small --config.mesh.data=2 --workdir=outputs/dit
#
# Process i runs `$PYTHON -m MODULE FLAGS --config.distributed.*` with process_id=i and
# local_device_ids=i (it sees GPU i only). Process 0 writes to this terminal, process i > 0 to
# $MOCA_LOG_DIR/process_i.log (default: the current directory). When one process fails the
# others are stopped and the script exits with the failing status.
# Environment: PYTHON (default python3), MOCA_COORDINATOR_PORT (default 12355), MOCA_LOG_DIR.
set -uo pipefail
if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NUM_PROCESSES MODULE [FLAGS...]" >&2
  exit 2
fi
n=$1
module=$2
shift 2
python=${PYTHON:-python3}
port=${MOCA_COORDINATOR_PORT:-12355}
log_dir=${MOCA_LOG_DIR:-.}
pids=()
for ((i = 0; i < n; i++)); do
  args=("$@" --config.distributed.enabled=True
        "--config.distributed.coordinator_address=localhost:${port}"
        "--config.distributed.num_processes=${n}" "--config.distributed.process_id=${i}"
        "--config.distributed.local_device_ids=${i}")
  if ((i == 0)); then
    "$python" -m "$module" "${args[@]}" &
  else
    "$python" -m "$module" "${args[@]}" > "${log_dir}/process_${i}.log" 2>&1 &
  fi
  pids+=($!)
done
status=0
for ((left = n; left > 0; left--)); do
  wait -n  # the next of our children to end (a pid list would name reaped ones again)
  rc=$?
  if ((rc != 0)); then
    status=$rc
    echo "launch_multi: a process exited with status $rc; stopping the others" >&2
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
    break
  fi
done
wait
exit $status
