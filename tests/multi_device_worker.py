"""One process of a CPU training job for tests/test_multi_device.py (run as a subprocess).

  python tests/multi_device_worker.py --out=OUT.json --workdir=W --steps=S \
      [--devices=D] [--data=-1] [--fsdp=1] [--eval_batches=1] \
      [--num_processes=P --process_id=I --port=PORT]

Sets the CPU platform with D simulated devices before JAX starts, trains the micro DiT of
`micro_config` through `moca_jax.dit_task.train_and_evaluate` (with
`jax.distributed.initialize` on localhost when P > 1) and writes OUT.json: the per-step
scalar history, the record ids of this process's batches, the final parameters
(gathered to the host, as lists) and the eval losses (eval.json; none with --eval_batches=0).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def micro_config(steps: int, data: int = -1, fsdp: int = 1):
  """A DiT small enough to compile and run a few steps on a shared CPU core."""
  from experiments.configs import dit as dit_configs  # pylint: disable=g-import-not-at-top
  c = dit_configs.get_config("tiny")
  c.data.source = "synthetic"
  c.data.max_components = 3
  c.data.synthetic_examples = 16
  c.model.dit.num_blocks = 2
  c.model.encoder.depth = 1
  c.batch_size = 4
  c.num_steps = steps
  c.log_every = 1
  c.optim.warmup_steps = 1
  c.checkpoint.every = 2
  c.checkpoint.async_save = False
  c.mesh.data, c.mesh.fsdp = data, fsdp
  return c


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--steps", type=int, default=2)
  ap.add_argument("--devices", type=int, default=1)
  ap.add_argument("--data", type=int, default=-1)
  ap.add_argument("--fsdp", type=int, default=1)
  ap.add_argument("--num_processes", type=int, default=1)
  ap.add_argument("--process_id", type=int, default=0)
  ap.add_argument("--port", type=int, default=0)
  ap.add_argument("--eval_batches", type=int, default=1)
  args = ap.parse_args()

  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={args.devices} "
                             "--xla_backend_optimization_level=0")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from moca_jax import dit_task  # pylint: disable=g-import-not-at-top
  from moca_jax import sharding  # pylint: disable=g-import-not-at-top

  config = micro_config(args.steps, args.data, args.fsdp)
  if args.num_processes > 1:
    config.distributed.enabled = True
    config.distributed.coordinator_address = f"localhost:{args.port}"
    config.distributed.num_processes = args.num_processes
    config.distributed.process_id = args.process_id
    config.distributed.initialization_timeout = 60
  result = dit_task.train_and_evaluate(config, args.workdir, show_progress=False,
                                        eval_batches=args.eval_batches)
  params = sharding.to_host(result.state.params)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  report = {
      "process_index": jax.process_index(), "process_count": jax.process_count(),
      "device_count": jax.device_count(), "mesh": dict(result.state.step.sharding.mesh.shape),
      "history": result.history, "batch_log": result.batch_log,
      "params": {jax.tree_util.keystr(k): np.asarray(v, np.float64).ravel().tolist()
                 for k, v in flat},
  }
  eval_path = os.path.join(args.workdir, "eval.json")
  if os.path.exists(eval_path):
    with open(eval_path) as f:
      report["eval"] = json.load(f)
  with open(args.out, "w") as f:  # test scratch output in tmp_path, read once by the test
    json.dump(report, f)


if __name__ == "__main__":
  main()
