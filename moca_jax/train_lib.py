"""Training machinery shared by the DiT and VAE trainers.

Top to bottom:
  optimizer     AdamW (warmup -> constant | cosine), global-norm clipping, weight-decay mask
                (decay only on dense/conv kernels), optional trainable mask (frozen params)
  TrainState    step, params (fp32), opt_state, ema_params
  state         created abstract-first: eval_shape -> logical shardings -> jit(init,
                out_shardings)
  train_step    a pure module-level function; `compile_train_step` jits it with in/out
                shardings and a donated state and compiles it ahead of the loop, logging
                XLA's memory analysis
  checkpoints   orbax CheckpointManager, one Composite per step with items
                'state' (step, params, opt_state), 'ema', 'data' (iterator state, JSON),
                'config' (JSON); async, every K steps, keep N; restore onto abstract sharded
                targets
  loop          `run_training`: progress bar, TensorBoard metrics, non-finite-loss guard
                (names the step and the batch), resume from the latest checkpoint.
                Multi-process ready: batches enter through `sharding.shard_batch`
                (make_array_from_process_local_data), only process 0 writes events; the
                caller runs `jax.distributed.initialize()` first (train_dit does when
                config.distributed is set).
  DiT task      `ImageConditionedDiT` (image encoder + compositional DiT), its flow loss,
                router statistics and the sampler used by generation.

A task is two functions: `init_fn(rng, batch) -> variables` (flax init, params boxed with
logical names) and `loss_fn(params, batch, rng) -> (loss, metrics)`. Every random draw of a
step comes from fold_in(seed key, step), so a resumed run replays the same randomness.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from typing import Any, Callable, Iterator, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from moca_jax import flow, sharding

Array = jax.Array
PyTree = Any
LossFn = Callable[[PyTree, PyTree, Array], tuple[Array, dict]]
InitFn = Callable[[Array, PyTree], PyTree]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------

def default_optim_config() -> ml_collections.ConfigDict:
  """Optimizer fields read by `make_schedule` / `make_optimizer`."""
  return ml_collections.ConfigDict(dict(
      lr=1e-4, warmup_steps=100, schedule="constant", total_steps=10_000,
      final_lr_fraction=0.1, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
      grad_clip=1.0, ema_decay=0.9999))


def make_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup 0 -> lr over warmup_steps, then 'constant' or 'cosine' (down to
  lr * final_lr_fraction at total_steps)."""
  warm = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
  if cfg.schedule == "constant":
    after = optax.constant_schedule(cfg.lr)
  elif cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(cfg.lr, max(cfg.total_steps - cfg.warmup_steps, 1),
                                        alpha=cfg.final_lr_fraction)
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


def make_optimizer(cfg: ml_collections.ConfigDict, trainable: Optional[PyTree] = None
                   ) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW(schedule, decay mask). `trainable` (bool pytree like the
  params) zeroes the updates of frozen params (they get no Adam state either)."""
  tx = optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip else optax.identity(),
      optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.weight_decay, mask=weight_decay_mask))
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
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                     sharding=getattr(x, "sharding", None)), tree)


@dataclasses.dataclass
class StateSetup:
  """What `create_train_state` returns besides the state."""
  shardings: TrainState                   # NamedSharding tree like the state
  abstract_state: TrainState              # ShapeDtypeStructs with shardings
  param_names: PyTree                     # logical names per parameter (None: unannotated)


def state_shardings(init_fn: InitFn, tx: optax.GradientTransformation, batch_spec: PyTree,
                    rng: Array, mesh: jax.sharding.Mesh,
                    rules=sharding.LOGICAL_AXIS_RULES) -> tuple[TrainState, PyTree, Callable]:
  """Shardings of the TrainState, from `jax.eval_shape` only (nothing is allocated).

  Returns (state shardings, logical names of the params, init function rng -> TrainState).
  """
  def init_params(r):
    return init_fn(r, _zeros_like_spec(batch_spec))["params"]

  def init_state(r):
    params = nn.meta.unbox(init_params(r))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=params)

  boxed = jax.eval_shape(init_params, rng)
  param_sh = sharding.tree_shardings(boxed, mesh, rules)
  abstract_state = jax.eval_shape(init_state, rng)
  repl = sharding.replicated(mesh)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_state.opt_state, param_sh,
                                 transform_non_params=lambda _: repl,
                                 is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  shardings = TrainState(step=repl, params=param_sh, opt_state=opt_sh, ema_params=param_sh)
  return shardings, sharding.logical_names(boxed), init_state


def create_train_state(init_fn: InitFn, tx: optax.GradientTransformation, batch_spec: PyTree,
                       rng: Array, mesh: jax.sharding.Mesh,
                       rules=sharding.LOGICAL_AXIS_RULES) -> tuple[TrainState, StateSetup]:
  """Abstract-first creation: eval_shape -> shardings -> jit(init, out_shardings).

  Args:
    init_fn: (rng, batch) -> flax variables (params with logical partitioning).
    batch_spec: pytree of ShapeDtypeStruct (or arrays) shaped like one global batch.
  """
  shardings, names, init_state = state_shardings(init_fn, tx, batch_spec, rng, mesh, rules)
  state = jax.jit(init_state, out_shardings=shardings)(rng)
  abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                jax.eval_shape(lambda: state), shardings)
  return state, StateSetup(shardings=shardings, abstract_state=abstract_state, param_names=names)


def count_params(params: PyTree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


# ----------------------------------------------------------------------------------------
# Train step
# ----------------------------------------------------------------------------------------

def train_step(state: TrainState, batch: PyTree, rng: Array, *, loss_fn: LossFn,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               ema_decay: float) -> tuple[TrainState, dict]:
  """One optimizer step (pure). The step's key is fold_in(rng, state.step).

  Returns (new state, metrics): loss, grad_norm, param_norm, lr, ema_decay and the loss
  function's own metrics (all scalars or small arrays, fp32).
  """
  step_rng = jax.random.fold_in(rng, state.step)
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, step_rng)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = ema_decay_at(state.step, ema_decay)
  ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
             "param_norm": optax.global_norm(params), "lr": schedule(state.step),
             "ema_decay": decay, **aux}
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
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "alias_size_in_bytes", "generated_code_size_in_bytes")
  return {f.replace("_in_bytes", "_mib"): getattr(mem, f) / 2**20 for f in fields
          if hasattr(mem, f)}


def compile_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                       schedule: optax.Schedule, ema_decay: float, setup: StateSetup,
                       batch_spec: PyTree, mesh: jax.sharding.Mesh,
                       rules=sharding.LOGICAL_AXIS_RULES, donate: bool = True):
  """Jits `train_step` with in/out shardings (state donated) and compiles it ahead of time.

  Returns (compiled step (state, batch, rng) -> (state, metrics), memory summary dict).
  """
  step = functools.partial(train_step, loss_fn=loss_fn, tx=tx, schedule=schedule,
                           ema_decay=ema_decay)
  repl = sharding.replicated(mesh)
  batch_sh = sharding.batch_shardings(batch_spec, mesh, rules)
  jitted = jax.jit(step, in_shardings=(setup.shardings, batch_sh, repl),
                   out_shardings=(setup.shardings, repl),
                   donate_argnums=(0,) if donate else ())
  batch_abs = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                           batch_spec, batch_sh)
  rng_abs = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=repl)
  compiled = jitted.lower(setup.abstract_state, batch_abs, rng_abs).compile()
  mem = memory_summary(compiled)
  if mem:
    log.info("train step memory (MiB): %s", {k: round(v, 1) for k, v in mem.items()})
  return compiled, mem


# ----------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------

ITEMS = ("state", "ema", "data", "config")


def _encode_data_state(state: Any) -> dict:
  if state is None:
    return {"kind": "none"}
  if isinstance(state, bytes):
    return {"kind": "bytes", "value": state.decode("utf-8")}
  return {"kind": "json", "value": state}


def _decode_data_state(payload: dict) -> Any:
  kind = payload.get("kind")
  if kind == "bytes":
    return payload["value"].encode("utf-8")
  if kind == "json":
    return payload["value"]
  return None


def config_to_json(config: ml_collections.ConfigDict) -> dict:
  """A JSON-safe dict of the config (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


class Checkpointer:
  """Orbax CheckpointManager with the Composite items 'state', 'ema', 'data', 'config'.

  Saves every `save_every` steps (plus forced saves), keeps the last `keep`, asynchronously.
  Call `wait()` (or `close()`) before exiting.
  """

  def __init__(self, directory: str, save_every: int = 1000, keep: int = 3,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=max(save_every, 1),
        enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: TrainState, data_state: Any, config: ml_collections.ConfigDict,
           force: bool = False) -> bool:
    core = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(core),
        ema=ocp.args.StandardSave(state.ema_params),
        data=ocp.args.JsonSave(_encode_data_state(data_state)),
        config=ocp.args.JsonSave(config_to_json(config))), force=force)

  def restore(self, step: Optional[int], abstract_state: TrainState
              ) -> tuple[TrainState, Any, dict]:
    """Restores onto `abstract_state` (ShapeDtypeStructs with shardings).

    Returns (state, data iterator state, config dict).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    a = abstract_state
    core_abs = {"step": a.step, "params": a.params, "opt_state": a.opt_state}
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(core_abs),
        ema=ocp.args.StandardRestore(a.ema_params),
        data=ocp.args.JsonRestore(),
        config=ocp.args.JsonRestore()))
    core = out["state"]
    state = TrainState(step=core["step"], params=core["params"], opt_state=core["opt_state"],
                       ema_params=out["ema"])
    return state, _decode_data_state(out["data"]), out["config"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def read_checkpoint_config(directory: str, step: Optional[int] = None) -> tuple[dict, int]:
  """The config dict stored with a checkpoint (latest step by default).

  Raises FileNotFoundError (missing dir / no checkpoint) or ValueError (unreadable).
  """
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory does not exist: {directory}")
  manager = ocp.CheckpointManager(directory, item_names=ITEMS,
                                  options=ocp.CheckpointManagerOptions(create=False))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint steps in {directory}")
  try:
    cfg = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  except Exception as e:
    raise ValueError(f"corrupt or unreadable checkpoint config in {directory} step {step}: "
                     f"{type(e).__name__}: {e}") from e
  finally:
    manager.close()
  return cfg, step


def restore_params(directory: str, abstract_params: PyTree, step: Optional[int] = None,
                   item: str = "ema") -> PyTree:
  """Restores only the params ('ema' or the raw 'state' params) onto `abstract_params`.

  Raises FileNotFoundError / ValueError with the path on a missing or corrupt checkpoint.
  """
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory does not exist: {directory}")
  manager = ocp.CheckpointManager(directory, item_names=ITEMS,
                                  options=ocp.CheckpointManagerOptions(create=False))
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint steps in {directory}")
    if item == "ema":
      args = ocp.args.Composite(ema=ocp.args.StandardRestore(abstract_params))
      return manager.restore(step, args=args)["ema"]
    # Restore the 'state' item partially: params only.
    path = os.path.join(directory, str(step), "state")
    ckptr = ocp.PyTreeCheckpointer()
    restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(
        {"params": abstract_params}, restore_args=ocp.checkpoint_utils.construct_restore_args(
            {"params": abstract_params}), partial_restore=True))
    return restored["params"]
  except FileNotFoundError:
    raise
  except Exception as e:
    raise ValueError(f"corrupt or incompatible checkpoint in {directory} step {step}: "
                     f"{type(e).__name__}: {e}") from e
  finally:
    manager.close()


# ----------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------

def _iterator_state(it) -> Any:
  return it.get_state() if hasattr(it, "get_state") else None


class NonFiniteLossError(FloatingPointError):
  """Raised when a step produces a NaN/inf loss."""


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
  history: list[dict]            # scalar metrics per step (host floats)
  batch_log: list[Any]           # what `batch_id_fn` returned per step (data order)
  memory: dict[str, float]


def run_training(*, config: ml_collections.ConfigDict, workdir: str, init_fn: InitFn,
                 loss_fn: LossFn, make_iterator: Callable[[], Any],
                 mesh: Optional[jax.sharding.Mesh] = None, trainable_fn=None,
                 batch_id_fn: Optional[Callable[[Any], Any]] = None,
                 num_steps: Optional[int] = None, array_metrics_fn=None,
                 prepare_fn: Optional[Callable[[Any], PyTree]] = None,
                 show_progress: bool = True) -> LoopResult:
  """The generic training loop (DiT and VAE).

  Config fields read: seed, batch_size, num_steps, optim (see `default_optim_config`),
  mesh.{data, fsdp}, checkpoint.{every, keep, async_save}, log_every.

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
  Returns:
    LoopResult. Raises NonFiniteLossError naming the step and the batch.
  """
  from tensorboardX import SummaryWriter  # local: keep the library importable without it
  from tqdm.auto import tqdm

  num_steps = config.num_steps if num_steps is None else num_steps
  mesh = mesh or sharding.make_mesh(config.mesh.get("data", -1), config.mesh.get("fsdp", 1))
  sharding.check_batch_divisible(config.batch_size, mesh)
  prepare_fn = prepare_fn or (lambda b: b)
  first = prepare_fn(next(iter(make_iterator())))  # a throwaway iterator gives the shapes
  batch_spec = sharding.global_batch_spec(first)  # local rows x process count
  del first
  iterator = make_iterator()

  rng = jax.random.PRNGKey(config.seed)
  init_rng, step_rng = jax.random.split(rng)
  schedule = make_schedule(config.optim)
  trainable = None
  if trainable_fn is not None:
    abstract_params = nn.meta.unbox(jax.eval_shape(
        lambda r: init_fn(r, _zeros_like_spec(batch_spec))["params"], init_rng))
    trainable = trainable_fn(abstract_params)
  tx = make_optimizer(config.optim, trainable)
  # Compiling for a multi-device mesh can take minutes: say so, with the time it took.
  log.info("compiling and running the sharded init (mesh %s, %d process(es))...",
           dict(mesh.shape), jax.process_count())
  t_compile = time.perf_counter()
  state, setup = create_train_state(init_fn, tx, batch_spec, init_rng, mesh)
  log.info("parameters: %d (init %.1f s)", count_params(state.params),
           time.perf_counter() - t_compile)

  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint.every,
                      config.checkpoint.keep, config.checkpoint.get("async_save", True))
  latest = ckpt.latest_step()
  if latest is not None:
    state, data_state, _ = ckpt.restore(latest, setup.abstract_state)
    if data_state is not None:
      iterator.set_state(data_state)
    log.info("resumed from step %d", latest)

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
  bar = tqdm(total=num_steps, initial=start, desc="train", disable=not show_progress,
             dynamic_ncols=True)

  def finish(p):
    step_i, bid, metrics = p
    host = jax.device_get(metrics)
    loss = float(host["loss"])
    if not math.isfinite(loss):
      raise NonFiniteLossError(f"non-finite loss {loss} at step {step_i} "
                               f"(batch {bid if bid is not None else step_i - start})")
    scalars = _scalar_metrics(host)
    history.append({"step": step_i, **scalars})
    if writer is not None and (step_i % log_every == 0 or step_i == num_steps - 1):
      for k, v in scalars.items():
        writer.add_scalar(f"train/{k}", v, step_i)
      if array_metrics_fn is not None:
        array_metrics_fn(writer, step_i, host)
    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

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
      if done % config.checkpoint.every == 0 or done == num_steps:
        ckpt.save(done, state, _iterator_state(iterator), config, force=done == num_steps)
    if pending is not None:
      finish(pending)
  finally:
    bar.close()
    ckpt.close()
    if writer is not None:
      writer.close()
  return LoopResult(state=state, history=history, batch_log=batch_log, memory=mem)


# ----------------------------------------------------------------------------------------
# DiT task: image encoder + compositional DiT trained with rectified flow
# ----------------------------------------------------------------------------------------

class ImageConditionedDiT(nn.Module):
  """Image encoder + `CompositionalDiT` (moca_jax.dit).

  config: ConfigDict with `encoder` (see `image_encoder.encoder_config`) and `dit`
  (see `dit.dit_config`); dit.cond_dim must equal encoder.width.
  """
  config: Any

  def setup(self):
    from moca_jax.dit import CompositionalDiT
    from moca_jax.image_encoder import ImageEncoder
    if self.config.dit.cond_dim != self.config.encoder.width:
      raise ValueError(f"dit.cond_dim={self.config.dit.cond_dim} must equal encoder.width="
                       f"{self.config.encoder.width}")
    self.encoder = ImageEncoder(self.config.encoder)
    self.dit = CompositionalDiT(config=self.config.dit)

  def encode(self, images: Array) -> Array:
    """Preprocessed images -> condition tokens.

    images: [B, S, S, C] (object mode, shared by all components) -> [B, T, Dc], or
    [B, N, S, S, C] (scene mode, one input per component) -> [B, N, T, Dc].
    """
    if images.ndim == 5:
      b, n = images.shape[:2]
      tokens = self.encoder(images.reshape(b * n, *images.shape[2:]))
      return tokens.reshape(b, n, *tokens.shape[1:])
    return self.encoder(images)

  def velocity(self, x_t: Array, t: Array, cond: Array, component_mask: Optional[Array],
               ids: Optional[Array] = None, *, train: bool, return_routing: bool = False):
    """See `CompositionalDiT.__call__`."""
    return self.dit(x_t, t, cond, component_mask, ids, train=train,
                    return_routing=return_routing)

  def __call__(self, images: Array, x_t: Array, t: Array, component_mask: Array):
    """Used for init only: encode + velocity (eval mode)."""
    return self.velocity(x_t, t, self.encode(images), component_mask, train=False)


def prepare_images(images: Array, encoder_cfg) -> Array:
  """uint8 images [B, H, W, C] or [B, N, H, W, C] -> preprocessed float32 for the encoder."""
  from moca_jax.image_encoder import preprocess
  if images.ndim == 5:
    b, n = images.shape[:2]
    out = preprocess(images.reshape(b * n, *images.shape[2:]), encoder_cfg.image_size,
                     encoder_cfg.in_channels)
    return out.reshape(b, n, *out.shape[1:])
  return preprocess(images, encoder_cfg.image_size, encoder_cfg.in_channels)


def router_statistics(importances: Array, selections: Array, component_mask: Array
                      ) -> dict[str, Array]:
  """Load-balance statistics of MoC routing.

  Args:
    importances: [B, G, H, N, N] router importances s_ij (0 on the diagonal and padding).
    selections: [B, G, H, N, k] indices j selected at full resolution for query i.
    component_mask: [B, N].
  Returns:
    'router/selection_freq' [N]: fraction of all selections (over real queries, heads and
      blocks) that picked component slot j (sums to 1);
    'router/selection_max_over_uniform': max_j freq_j * (mean number of real components),
      1 for perfectly balanced routing in a batch of equal sizes;
    'router/importance_entropy': entropy of s_ij / sum_j s_ij over the real j != i,
      divided by log(n_real - 1) (1 = uniform), averaged over real queries with n_real > 2.
  """
  b, g, h, n, k = selections.shape
  maskf = component_mask.astype(jnp.float32)
  q_real = jnp.broadcast_to(maskf[:, None, None, :, None], selections.shape)
  onehot = jax.nn.one_hot(selections, n, dtype=jnp.float32) * q_real[..., None]
  counts = jnp.sum(onehot, axis=(0, 1, 2, 3, 4))                            # [N]
  freq = counts / jnp.maximum(jnp.sum(counts), 1.0)
  n_real = jnp.sum(maskf, axis=1)                                           # [B]
  p = importances / jnp.maximum(jnp.sum(importances, axis=-1, keepdims=True), 1e-12)
  ent = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.maximum(p, 1e-30)), 0.0), axis=-1)
  norm = jnp.log(jnp.maximum(n_real - 1.0, 2.0))[:, None, None, None]
  ent = ent / norm                                                          # [B, G, H, N]
  valid = (maskf[:, None, None, :] * (n_real > 2)[:, None, None, None]) * jnp.ones_like(ent)
  mean_ent = jnp.sum(ent * valid) / jnp.maximum(jnp.sum(valid), 1.0)
  return {"router/selection_freq": freq,
          "router/selection_max_over_uniform": jnp.max(freq) * jnp.mean(n_real),
          "router/importance_entropy": mean_ent}


def make_dit_task(config: ml_collections.ConfigDict):
  """(model, init_fn, loss_fn) for the image-conditioned DiT.

  Batch (host numpy, leading axis = global batch B):
    latents         f32 [B, N, L, C]   clean component latents (padding rows arbitrary)
    component_mask  bool [B, N]
    images          uint8 [B, H, W, 3] (objects) or [B, N, H, W, 7] (scenes)
  Config: model.encoder, model.dit, flow.{cfg_dropout, t_mean, t_std, t_shift}.
  The loss uses rng streams noise (t, eps), cfg (condition dropout), ids, routing.
  """
  model = ImageConditionedDiT(config.model)
  fcfg = config.flow

  def init_fn(rng, batch):
    images = prepare_images(batch["images"], config.model.encoder)
    x = batch["latents"]
    return model.init(rng, images, x, jnp.full((x.shape[0],), 0.5), batch["component_mask"])

  def loss_fn(params, batch, rng):
    noise_rng, cfg_rng, ids_rng, routing_rng = jax.random.split(rng, 4)
    variables = {"params": params}
    mask = batch["component_mask"]
    cond = model.apply(variables, prepare_images(batch["images"], config.model.encoder),
                       method=ImageConditionedDiT.encode)
    routing = {}

    def velocity_fn(x_t, t, c):
      v, aux = model.apply(variables, x_t, t, c, mask, train=True, return_routing=True,
                           rngs={"ids": ids_rng, "routing": routing_rng},
                           method=ImageConditionedDiT.velocity)
      routing.update(aux)
      return v

    loss, faux = flow.flow_loss(velocity_fn, batch["latents"].astype(jnp.float32), cond, mask,
                                noise_rng=noise_rng, cfg_rng=cfg_rng,
                                cfg_dropout=fcfg.cfg_dropout, t_mean=fcfg.t_mean,
                                t_std=fcfg.t_std, t_shift=fcfg.t_shift)
    metrics = {"t_mean": jnp.mean(faux["t"]),
               "cond_kept": jnp.mean(faux["cond_kept"].astype(jnp.float32)),
               "components": jnp.mean(jnp.sum(mask.astype(jnp.float32), axis=1))}
    if routing and routing["selections"].shape[1] > 0:
      metrics.update(router_statistics(routing["importances"], routing["selections"], mask))
    return loss, metrics

  return model, init_fn, loss_fn


def dit_sample(model: ImageConditionedDiT, params: PyTree, images: Array, rng: Array, *,
               num_components: int, component_mask: Optional[Array] = None, steps: int = 50,
               cfg_scale: Optional[float] = 7.0, method: str = "euler",
               time_shift: float = 1.0, return_routing: bool = True):
  """Generates component latents for preprocessed images (jit this whole function with
  `steps`, `num_components`, `method`, `return_routing` static).

  Args:
    images: preprocessed [B, S, S, C] (objects) or [B, N, S, S, C] (scenes).
    component_mask: [B, N] bool (default all True).
  Returns:
    (latents [B, N, L, C], routing) where routing is the DiT aux {'importances'
    [B, G, H, N, N], 'selections' [B, G, H, N, k]} of the conditional model on the final
    sample at the last step's time 1 / steps (empty dict when return_routing is False).
  """
  spec = model.config.dit
  variables = {"params": params}
  b = images.shape[0]
  mask = (jnp.ones((b, num_components), bool) if component_mask is None
          else component_mask.astype(bool))
  ids = jnp.broadcast_to(jnp.arange(num_components, dtype=jnp.int32), (b, num_components))
  cond = model.apply(variables, images, method=ImageConditionedDiT.encode)

  def velocity_fn(x, t, c):
    reps = x.shape[0] // b
    return model.apply(variables, x, t, c, jnp.tile(mask, (reps, 1)), jnp.tile(ids, (reps, 1)),
                       train=False, method=ImageConditionedDiT.velocity)

  shape = (b, num_components, spec.latent_tokens, spec.latent_channels)
  z = flow.sample(velocity_fn, rng, shape, cond, steps=steps, method=method,
                  cfg_scale=cfg_scale, time_shift=time_shift)
  routing = {}
  if return_routing:
    _, routing = model.apply(variables, z, jnp.full((b,), 1.0 / steps), cond, mask, ids,
                             train=False, return_routing=True, method=ImageConditionedDiT.velocity)
  return z, routing
