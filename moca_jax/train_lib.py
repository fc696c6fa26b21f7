"""The training loop shared by the DiT and VAE tasks (moca_jax.dit_task, moca_jax.vae_task).

Top to bottom:
  optimizer     AdamW (warmup -> constant | cosine), global-norm clipping, weight-decay mask
                (decay only on dense/conv kernels), optional trainable mask (frozen params)
  TrainState    step, params (fp32), opt_state, ema_params
  state         created abstract-first: eval_shape -> logical shardings -> jit(init,
                out_shardings)
  train_step    a pure module-level function; `compile_train_step` jits it with in/out
                shardings and a donated state and compiles it ahead of the loop, logging
                XLA's memory analysis
  loop          `run_training`: resume check and config.json (moca_jax.checkpointing),
                progress bar, TensorBoard metrics, non-finite guard (names the step and the
                batch; a step's loss and the params are checked before its checkpoint is
                written, so nothing non-finite is ever saved), resume from the latest
                checkpoint. Multi-process ready: batches enter through `sharding.shard_batch`
                (make_array_from_process_local_data), only process 0 writes events; the
                caller runs `jax.distributed.initialize()` first (dit_task does when
                config.distributed is set).
Checkpoints (orbax, the stored config and its comparison on resume) are in
moca_jax.checkpointing.

A task is `Task(model, init_fn, loss_fn)`: `init_fn(rng, batch) -> variables` (flax init,
params boxed with logical names) and `loss_fn(params, batch, rng) -> (loss, metrics)`. Every
random draw of a step comes from fold_in(seed key, step), so a resumed run replays the same
randomness.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from typing import Any, Callable, NamedTuple, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from moca_jax import checkpointing, io, sharding

Array = jax.Array
PyTree = Any
LossFn = Callable[[PyTree, PyTree, Array], tuple[Array, dict]]
InitFn = Callable[[Array, PyTree], PyTree]


class Task(NamedTuple):
  """A model task for `run_training` (see the module docstring)."""

  model: Any
  init_fn: InitFn
  loss_fn: LossFn


log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------


def default_optim_config() -> ml_collections.ConfigDict:
  """Optimizer fields read by `make_schedule` / `make_optimizer`."""
  return ml_collections.ConfigDict(
      dict(
          lr=1e-4,
          warmup_steps=100,
          schedule="constant",
          total_steps=10_000,
          final_lr_fraction=0.1,
          b1=0.9,
          b2=0.999,
          eps=1e-8,
          weight_decay=0.01,
          grad_clip=1.0,
          ema_decay=0.9999,
      )
  )


def make_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup 0 -> lr over warmup_steps, then 'constant' or 'cosine' (down to
  lr * final_lr_fraction at total_steps)."""
  warm = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
  if cfg.schedule == "constant":
    after = optax.constant_schedule(cfg.lr)
  elif cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(
        cfg.lr, max(cfg.total_steps - cfg.warmup_steps, 1), alpha=cfg.final_lr_fraction
    )
  else:
    raise ValueError(f"optim.schedule must be 'constant' or 'cosine', got {cfg.schedule!r}")
  return optax.join_schedules([warm, after], [cfg.warmup_steps])


_DECAYED = ("kernel", "lora_a", "lora_b")


def weight_decay_mask(params: PyTree) -> PyTree:
  """True for dense/conv kernels (and LoRA factors); False for biases, norm scales,
  embeddings, position tables, learned tokens and layer-scale gammas."""

  def one(path, leaf):
    name = getattr(path[-1], "key", None) if path else None
    return name in _DECAYED and np.ndim(leaf) >= 2

  return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(
    cfg: ml_collections.ConfigDict, trainable: Optional[PyTree] = None
) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW(schedule, decay mask). `trainable` (bool pytree like the
  params) zeroes the updates of frozen params (they get no Adam state either)."""
  tx = optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip else optax.identity(),
      optax.adamw(
          make_schedule(cfg),
          b1=cfg.b1,
          b2=cfg.b2,
          eps=cfg.eps,
          weight_decay=cfg.weight_decay,
          mask=weight_decay_mask,
      ),
  )
  if trainable is None:
    return tx
  labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable)
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def ema_decay_at(step: Array, decay: float) -> Array:
  """EMA decay with warm-up: min(decay, (1 + step) / (10 + step)), so short runs average
  over their own trajectory instead of staying at the initial weights."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


# ----------------------------------------------------------------------------------------
# Train state, created abstract-first
# ----------------------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
  """step: int32 scalar; params, ema_params: fp32 pytrees; opt_state: optax state."""

  step: Array
  params: PyTree
  opt_state: PyTree
  ema_params: PyTree


def _zeros_like_spec(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)


def abstract(tree: PyTree) -> PyTree:
  """ShapeDtypeStructs (with shardings where known) for a tree of arrays or specs."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
  )


@dataclasses.dataclass
class StateSetup:
  """What `create_train_state` returns besides the state."""

  shardings: TrainState  # NamedSharding tree like the state
  abstract_state: TrainState  # ShapeDtypeStructs with shardings
  param_names: PyTree  # logical names per parameter (None: unannotated)


def state_shardings(
    init_fn: InitFn,
    tx: optax.GradientTransformation,
    batch_spec: PyTree,
    rng: Array,
    mesh: jax.sharding.Mesh,
    rules=sharding.LOGICAL_AXIS_RULES,
) -> tuple[TrainState, PyTree, Callable]:
  """Shardings of the TrainState, from `jax.eval_shape` only (nothing is allocated).

  Returns (state shardings, logical names of the params, init function rng -> TrainState).
  """

  def init_params(r):
    return init_fn(r, _zeros_like_spec(batch_spec))["params"]

  def init_state(r):
    params = nn.meta.unbox(init_params(r))
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), ema_params=params
    )

  boxed = jax.eval_shape(init_params, rng)
  param_sh = sharding.tree_shardings(boxed, mesh, rules)
  abstract_state = jax.eval_shape(init_state, rng)
  repl = sharding.replicated(mesh)
  # Frozen params (a `trainable` mask) have no optimizer state: optax.MaskedNode stays one.
  opt_sh = optax.tree_map_params(
      tx,
      lambda p, s: p if isinstance(p, optax.MaskedNode) else s,
      abstract_state.opt_state,
      param_sh,
      transform_non_params=lambda _: repl,
      is_leaf=lambda x: isinstance(x, (jax.sharding.Sharding, optax.MaskedNode)),
  )
  shardings = TrainState(step=repl, params=param_sh, opt_state=opt_sh, ema_params=param_sh)
  return shardings, sharding.logical_names(boxed), init_state


def create_train_state(
    init_fn: InitFn,
    tx: optax.GradientTransformation,
    batch_spec: PyTree,
    rng: Array,
    mesh: jax.sharding.Mesh,
    rules=sharding.LOGICAL_AXIS_RULES,
) -> tuple[TrainState, StateSetup]:
  """Abstract-first creation: eval_shape -> shardings -> jit(init, out_shardings).

  Args:
    init_fn: (rng, batch) -> flax variables (params with logical partitioning).
    batch_spec: pytree of ShapeDtypeStruct (or arrays) shaped like one global batch.
  """
  shardings, names, init_state = state_shardings(init_fn, tx, batch_spec, rng, mesh, rules)
  state = jax.jit(init_state, out_shardings=shardings)(rng)
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      jax.eval_shape(lambda: state),
      shardings,
  )
  return state, StateSetup(shardings=shardings, abstract_state=abstract_state, param_names=names)


def start_from_params(params: PyTree) -> Callable[["TrainState", StateSetup], "TrainState"]:
  """`run_training`'s start_state_fn for a params-only warm restart: a fresh run starts from
  `params` (a dict shaped like the state's params, e.g. a bundle's weights,
  `moca_jax.bundle.params_for_training`) as both its params and its EMA params, cast to the
  state's dtypes and placed like them; step 0 and the freshly initialised optimizer state.
  `params` may hold only some top-level entries (e.g. {'dit': ...}): the others keep their
  fresh initialisation."""

  def fn(state: TrainState, setup: StateSetup) -> TrainState:
    def place(fresh):
      out = dict(fresh)
      for key, tree in params.items():
        # jnp.array copies: params and EMA params must be distinct buffers (both are donated)
        out[key] = jax.tree.map(lambda x, ref, sh: jax.device_put(jnp.array(x, ref.dtype), sh),
                                tree, fresh[key], setup.shardings.params[key])
      return type(fresh)(out) if not isinstance(fresh, dict) else out

    return state.replace(params=place(state.params), ema_params=place(state.ema_params))

  return fn


def count_params(params: PyTree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


# ----------------------------------------------------------------------------------------
# Train step
# ----------------------------------------------------------------------------------------


def train_step(
    state: TrainState,
    batch: PyTree,
    rng: Array,
    *,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    ema_decay: float,
) -> tuple[TrainState, dict]:
  """One optimizer step (pure). The step's key is fold_in(rng, state.step).

  Returns (new state, metrics): loss, grad_norm, param_norm, lr, ema_decay and the loss
  function's own metrics (all scalars or small arrays, fp32).
  """
  step_rng = jax.random.fold_in(rng, state.step)
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, step_rng)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = ema_decay_at(state.step, ema_decay)
  # e + (1 - d)(p - e), not d e + (1 - d) p: the same average, but exact where the params
  # stay put (a frozen encoder's EMA is its weights, bit for bit, so that a float32-stored
  # bundle's exact encoder check in export_bundle.replace_vae holds)
  ema = jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), state.ema_params, params)
  metrics = {
      "loss": loss,
      "grad_norm": optax.global_norm(grads),
      "param_norm": optax.global_norm(params),
      "lr": schedule(state.step),
      "ema_decay": decay,
      **aux,
  }
  new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
  return new_state, metrics


def memory_summary(compiled) -> dict[str, float]:
  """XLA's memory analysis of a compiled executable, in MiB (empty if unavailable)."""
  try:
    mem = compiled.memory_analysis()
  except Exception:  # some backends do not implement it
    return {}
  if mem is None:
    return {}
  fields = (
      "argument_size_in_bytes",
      "output_size_in_bytes",
      "temp_size_in_bytes",
      "alias_size_in_bytes",
      "generated_code_size_in_bytes",
  )
  return {
      f.replace("_in_bytes", "_mib"): getattr(mem, f) / 2**20 for f in fields if hasattr(mem, f)
  }


def compile_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    ema_decay: float,
    setup: StateSetup,
    batch_spec: PyTree,
    mesh: jax.sharding.Mesh,
    rules=sharding.LOGICAL_AXIS_RULES,
    donate: bool = True,
):
  """Jits `train_step` with in/out shardings (state donated) and compiles it ahead of time.

  Returns (compiled step (state, batch, rng) -> (state, metrics), memory summary dict).
  """
  step = functools.partial(
      train_step, loss_fn=loss_fn, tx=tx, schedule=schedule, ema_decay=ema_decay
  )
  repl = sharding.replicated(mesh)
  batch_sh = sharding.batch_shardings(batch_spec, mesh, rules)
  jitted = jax.jit(
      step,
      in_shardings=(setup.shardings, batch_sh, repl),
      out_shardings=(setup.shardings, repl),
      donate_argnums=(0,) if donate else (),
  )
  batch_abs = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), batch_spec, batch_sh
  )
  rng_abs = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=repl)
  compiled = jitted.lower(setup.abstract_state, batch_abs, rng_abs).compile()
  mem = memory_summary(compiled)
  if mem:
    log.info("train step memory (MiB): %s", {k: round(v, 1) for k, v in mem.items()})
  return compiled, mem


# ----------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------


def _iterator_state(it) -> Any:
  return it.get_state() if hasattr(it, "get_state") else None


class NonFiniteLossError(FloatingPointError):
  """Raised when a step produces a NaN/inf loss (or non-finite parameters)."""


@jax.jit
def all_finite(*trees: PyTree) -> Array:
  """bool scalar: every floating-point leaf of `trees` is finite."""
  leaves = [
      jnp.all(jnp.isfinite(x))
      for x in jax.tree.leaves(trees)
      if jnp.issubdtype(x.dtype, jnp.floating)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _scalar_metrics(metrics: dict) -> dict[str, float]:
  out = {}
  for k, v in metrics.items():
    v = np.asarray(v)
    if v.ndim == 0:
      out[k] = float(v)
  return out


@dataclasses.dataclass
class LoopResult:
  state: TrainState
  history: list[dict]  # scalar metrics per step (host floats)
  batch_log: list[Any]  # what `batch_id_fn` returned per step (data order)
  memory: dict[str, float]
  compiled_step: Any = None  # the compiled train step (its .as_text() is XLA's optimised HLO)
  stopped_early: bool = False  # config.time_limit_s ended the run before num_steps


def run_training(
    *,
    config: ml_collections.ConfigDict,
    workdir: str,
    init_fn: InitFn,
    loss_fn: LossFn,
    make_iterator: Callable[[], Any],
    mesh: Optional[jax.sharding.Mesh] = None,
    trainable_fn=None,
    batch_id_fn: Optional[Callable[[Any], Any]] = None,
    num_steps: Optional[int] = None,
    array_metrics_fn=None,
    prepare_fn: Optional[Callable[[Any], PyTree]] = None,
    show_progress: bool = True,
    start_state_fn: Optional[Callable[[TrainState, StateSetup], TrainState]] = None,
) -> LoopResult:
  """The generic training loop (DiT and VAE).

  Config fields read: seed, batch_size, num_steps, optim (see `default_optim_config`),
  mesh.{data, fsdp}, checkpoint.{every, keep, async_save}, log_every, time_limit_s,
  stop_at_unix.

  Chunked training: with time_limit_s > 0 the loop stops at the first log step (a multiple
  of log_every) after that many seconds of training (compilation excluded), saves a
  checkpoint there and returns (`LoopResult.stopped_early`); the next call resumes from it
  exactly, the schedule still following num_steps. stop_at_unix > 0 does the same at a
  wall-clock deadline (time.time() seconds; start-up and compilation count), for machines
  lent for a fixed time. All processes stop at the same step (process 0's clock decides).

  Before anything is written, the config is compared with the one stored in the latest
  checkpoint (`checkpointing.prepare_workdir`: ConfigMismatchError naming the fields), then
  workdir/config.json is written. Every save first checks that step's loss and the params,
  so no checkpoint ever holds non-finite values.

  Args:
    init_fn / loss_fn: the task (see module docstring).
    make_iterator: () -> iterator of host batches (numpy pytrees) with `get_state()` /
      `set_state()` (grain); its state is checkpointed.
    trainable_fn: optional params -> bool pytree of trainable params.
    batch_id_fn: optional batch -> a small host value logged per step (e.g. record ids),
      returned in `LoopResult.batch_log` (lets tests check the data order).
    num_steps: stop after this global step (default config.num_steps).
    array_metrics_fn: optional (writer, step, metrics) -> None for non-scalar metrics.
    prepare_fn: optional host batch -> model batch (e.g. drops record ids), applied after
      `batch_id_fn`.
    start_state_fn: optional (freshly initialised state, setup) -> the state a fresh run
      starts from, placed like `setup.shardings` (e.g. params from a pretrained prior,
      `moca_jax.prior_init`); not called when the run resumes from a checkpoint.
  Returns:
    LoopResult.
  Raises:
    checkpointing.ConfigMismatchError: a resume with a config that must not change.
    NonFiniteLossError: a non-finite loss (or params), naming the step and the batch.
  """
  from tensorboardX import SummaryWriter  # local: keep the library importable without it
  from tqdm.auto import tqdm

  os.makedirs(workdir, exist_ok=True)
  checkpointing.prepare_workdir(workdir, config)  # resume check before anything is written
  num_steps = config.num_steps if num_steps is None else num_steps
  mesh = mesh or sharding.make_mesh(config.mesh.get("data", -1), config.mesh.get("fsdp", 1))
  sharding.check_batch_divisible(config.batch_size, mesh)
  prepare_fn = prepare_fn or (lambda b: b)
  # A throwaway iterator gives the shapes; it is closed so that its read-ahead (and worker
  # processes) do not compete with the real iterator's.
  throwaway = iter(make_iterator())
  try:
    first = next(throwaway)
  except StopIteration:
    from data_pipeline.loader import EmptyDataError  # pylint: disable=g-import-not-at-top

    if hasattr(throwaway, "close"):
      throwaway.close()
    raise EmptyDataError(
        "the training data gave no batch: the dataset is empty (was every item skipped by "
        "the data build? see its log)"
    ) from None
  batch_spec = sharding.global_batch_spec(prepare_fn(first))  # local rows x procs
  if hasattr(throwaway, "close"):
    throwaway.close()
  del throwaway
  iterator = make_iterator()

  rng = jax.random.PRNGKey(config.seed)
  init_rng, step_rng = jax.random.split(rng)
  schedule = make_schedule(config.optim)
  trainable = None
  if trainable_fn is not None:
    abstract_params = nn.meta.unbox(
        jax.eval_shape(lambda r: init_fn(r, _zeros_like_spec(batch_spec))["params"], init_rng)
    )
    trainable = trainable_fn(abstract_params)
  tx = make_optimizer(config.optim, trainable)
  # Compiling for a multi-device mesh can take minutes: say so, with the time it took.
  log.info("compiling and running the sharded init (mesh %s, %d process(es))...",
           dict(mesh.shape), jax.process_count())
  t_compile = time.perf_counter()
  state, setup = create_train_state(init_fn, tx, batch_spec, init_rng, mesh)
  log.info("parameters: %d (init %.1f s)", count_params(state.params),
           time.perf_counter() - t_compile)

  ckpt = checkpointing.Checkpointer(
      os.path.join(workdir, "checkpoints"),
      config.checkpoint.every,
      config.checkpoint.keep,
      config.checkpoint.get("async_save", True),
  )
  latest = ckpt.latest_step()
  if latest is not None:
    state, data_state, _ = ckpt.restore(latest, setup.abstract_state)
    if data_state is not None:
      iterator.set_state(data_state)
    log.info("resumed from step %d", latest)
  elif start_state_fn is not None:
    state = start_state_fn(state, setup)

  log.info("compiling the train step...")
  t_compile = time.perf_counter()
  compiled, mem = compile_train_step(loss_fn, tx, schedule, config.optim.ema_decay, setup,
                                     batch_spec, mesh)
  log.info("train step compiled in %.1f s", time.perf_counter() - t_compile)
  writer = SummaryWriter(os.path.join(workdir, "tb")) if jax.process_index() == 0 else None
  if writer is not None:
    writer.add_text("config", "```\n" + str(config) + "\n```", int(state.step))
    for k, v in mem.items():
      writer.add_scalar(f"memory/{k}", v, int(state.step))

  start = int(state.step)
  history, batch_log = [], []
  pending = None  # (step, batch_id, metrics): checked one step late, keeps dispatch async
  log_every = config.get("log_every", 10)
  bar = tqdm(
      total=num_steps, initial=start, desc="train", disable=not show_progress, dynamic_ncols=True
  )

  def finish(p):
    step_i, bid, metrics = p
    host = jax.device_get(metrics)
    loss = float(host["loss"])
    if not math.isfinite(loss):
      raise NonFiniteLossError(
          f"non-finite loss {loss} at step {step_i} "
          f"(batch {bid if bid is not None else step_i - start})"
      )
    scalars = _scalar_metrics(host)
    history.append({"step": step_i, **scalars})
    if writer is not None and (step_i % log_every == 0 or step_i == num_steps - 1):
      for k, v in scalars.items():
        writer.add_scalar(f"train/{k}", v, step_i)
      if array_metrics_fn is not None:
        array_metrics_fn(writer, step_i, host)
    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

  time_limit = float(config.get("time_limit_s", 0) or 0)
  stop_at = float(config.get("stop_at_unix", 0) or 0)
  t_loop = time.monotonic()
  t_loop_start = time.perf_counter()
  stopped_early = False
  try:
    for step_i in range(start, num_steps):
      batch = next(iterator)
      bid = batch_id_fn(batch) if batch_id_fn is not None else None
      batch_log.append(bid)
      device_batch = sharding.shard_batch(prepare_fn(batch), mesh)
      state, metrics = compiled(state, device_batch, step_rng)
      if pending is not None:
        finish(pending)
      pending = (step_i, bid, metrics)
      bar.update(1)
      done = step_i + 1
      stopped_early = done < num_steps and _out_of_time(done, log_every, t_loop, time_limit,
                                                             stop_at)
      if done % config.checkpoint.every == 0 or done == num_steps or stopped_early:
        # Nothing non-finite is ever saved: this step's loss is checked first (it raises
        # naming the step and the batch), then the params themselves.
        finish(pending)
        pending = None
        if not bool(all_finite(state.params, state.ema_params)):
          raise NonFiniteLossError(
              f"non-finite parameters after step {step_i} (batch "
              f"{bid if bid is not None else step_i - start}); not saved"
          )
        ckpt.save(done, state, _iterator_state(iterator), config,
                  force=done == num_steps or stopped_early)
        if stopped_early:
          log.info("time limit (%.0f s of training, deadline %s) reached: stopped and saved "
                   "at step %d of %d", time_limit,
                   time.strftime("%H:%M:%S", time.localtime(stop_at)) if stop_at else "none",
                   done, num_steps)
          break
    if pending is not None:
      finish(pending)
  finally:
    bar.close()
    ckpt.close()
    if writer is not None:
      writer.close()
  if jax.process_index() == 0:
    append_run_record(workdir, dict(
        start_step=start, end_step=int(state.step), batch_size=int(config.batch_size),
        examples=(int(state.step) - start) * int(config.batch_size),
        train_seconds=round(time.monotonic() - t_loop, 1),
        compile_seconds=round(t_loop_start - t_compile, 1), devices=int(mesh.size),
        device_kind=jax.devices()[0].device_kind, stopped_early=stopped_early,
        finished_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())))
  return LoopResult(state=state, history=history, batch_log=batch_log, memory=mem,
                    compiled_step=compiled, stopped_early=stopped_early)


def append_run_record(workdir: str, record: dict) -> None:
  """Appends one line to workdir/runs.jsonl: what one `run_training` call did (steps from
  and to, examples seen, seconds of training and compilation, devices), so a model trained
  in chunks over several jobs can say how it was trained (experiments/export_bundle.py)."""
  path = os.path.join(workdir, "runs.jsonl")
  old = ""
  if os.path.exists(path):
    with open(path) as f:
      old = f.read()
  io.atomic_write_text(path, old + json.dumps(record) + "\n")


def read_run_records(workdir: str) -> list[dict]:
  """The records `append_run_record` wrote (oldest first); [] when there are none."""
  path = os.path.join(workdir, "runs.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def write_metrics_jsonl(
    path, history: list, start: int, log_every: int, num_steps: int
) -> None:
  """Writes workdir's metrics.jsonl after a (resumed) run: keeps the lines of steps <= start
  (earlier runs), appends this run's log steps of `LoopResult.history` ('step' = steps
  done), one JSON object per line."""
  kept = []
  if os.path.exists(path):
    with open(path) as f:
      kept = [line for line in f.read().splitlines() if line and json.loads(line)["step"] <= start]
  for h in history:
    done = h["step"] + 1
    if done % log_every == 0 or done == num_steps:
      kept.append(json.dumps({**h, "step": done}))
  io.atomic_write_text(path, "".join(line + "\n" for line in kept))


def _out_of_time(done: int, log_every: int, t_loop: float, time_limit: float,
                 stop_at: float = 0.0) -> bool:
  """Whether a time-limited loop stops after step `done`: `time_limit` seconds since the
  monotonic time `t_loop`, or the wall-clock deadline `stop_at` (time.time(); 0: none).
  Checked at log steps only, and decided by process 0 in a multi-process job (so every
  process stops at the same step)."""
  if (time_limit <= 0 and stop_at <= 0) or done % max(int(log_every), 1):
    return False
  late = ((time_limit > 0 and time.monotonic() - t_loop > time_limit)
          or (stop_at > 0 and time.time() > stop_at))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    late = bool(multihost_utils.broadcast_one_to_all(np.bool_(late)))
  return late
