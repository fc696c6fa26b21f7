"""Rectified flow for sets of components: interpolation, time sampling, loss, ODE samplers.

Conventions (paper 3.3.2):
  z    [B, N, L, C]  clean component latents (N padded to N_max; `mask` [B, N] marks real ones)
  eps  [B, N, L, C]  standard normal noise
  t    [B]           one flow time per sample, shared by all its components
  x_t  = (1 - t) z + t eps       (t = 0 data, t = 1 noise)
  v    = eps - z                 (the regression target; dx_t/dt)

The module is model-agnostic: a *velocity function* `velocity_fn(x_t, t, cond) -> v` (with
x_t [B, N, L, C], t [B], cond any pytree with leading batch axis B) is all it needs. The
DiT-specific wiring (rng streams, ids, component mask) lives in `moca_jax.train_lib`.

Sampling schedule (`time_grid`): the rectified-flow scheduler of TripoSG / PartCrafter
(`RectifiedFlowScheduler`, VAST-AI-Research/TripoSG triposg/schedulers/
scheduling_rectified_flow.py): sigma_i = shift s / (1 + (shift - 1) s), s = 1 - i / n, computed
in float64 and cast to float32, with a trailing 0; the DiT sees timestep 1000 sigma. Its step
x <- x + (sigma_i - sigma_{i+1}) v_up, with v_up = z - eps, is this module's Euler step
x <- x + (t_{i+1} - t_i) v with v = eps - z = -v_up (the same numbers up to the rounding of a
fused multiply-add; imported DiTs have their output projection negated,
moca_jax.convert.triposg_dit).

Null condition for classifier-free guidance (defined once, here: `null_condition`):
  zeros of the condition's shape. Chosen over a learned null token because (i) it is what
  the public neighbours (TripoSG, PartCrafter) use, so their weights/recipes transfer;
  (ii) it needs no parameters, so it is identical in object mode ([B, T, Dc]) and scene mode
  ([B, N, T, Dc]) and in every checkpoint; (iii) the unconditional branch at sampling time
  does not need the image encoder at all. It is applied to the *output* tokens of the image
  encoder, so a dropped sample's encoder receives no gradient from that sample. With the
  shared attention (q/k RMS-normed, no value bias), zero context tokens yield a uniform
  attention over zero values, i.e. the cross-attention contributes only its output bias --
  a well-defined "no image" signal.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
VelocityFn = Callable[[Array, Array, Any], Array]


# ----------------------------------------------------------------------------------------
# Forward process
# ----------------------------------------------------------------------------------------

def _bcast_t(t: Array, x: Array) -> Array:
  """t [B] -> [B, 1, ..., 1] broadcastable against x [B, ...]."""
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim)).astype(x.dtype)


def interpolate(z: Array, eps: Array, t: Array) -> Array:
  """x_t = (1 - t) z + t eps.  z, eps [B, ...]; t [B] (shared by all components)."""
  tb = _bcast_t(t, z)
  return (1.0 - tb) * z + tb * eps


def velocity_target(z: Array, eps: Array) -> Array:
  """The rectified-flow regression target v = eps - z (= d x_t / d t)."""
  return eps - z


def shift_time(t: Array, shift: float) -> Array:
  """Resolution-style time shift t' = s t / (1 + (s - 1) t); s > 1 moves mass to the noise
  end, s = 1 is the identity. Maps [0, 1] onto [0, 1] monotonically."""
  if shift == 1.0:
    return t
  return shift * t / (1.0 + (shift - 1.0) * t)


def sample_time(rng: Array, batch: int, *, mean: float = 0.0, std: float = 1.0,
                shift: float = 1.0) -> Array:
  """Logit-normal flow times: t = sigmoid(mean + std * n), n ~ N(0, 1), then `shift_time`.

  Returns t [batch] float32 in (0, 1).
  """
  t = jax.nn.sigmoid(mean + std * jax.random.normal(rng, (batch,), jnp.float32))
  return shift_time(t, shift)


# ----------------------------------------------------------------------------------------
# Condition dropout (classifier-free guidance)
# ----------------------------------------------------------------------------------------

def null_condition(cond: Any) -> Any:
  """The one null condition of the project: zeros shaped like `cond` (any pytree)."""
  return jax.tree.map(jnp.zeros_like, cond)


def drop_condition(rng: Array, cond: Any, prob: float) -> tuple[Any, Array]:
  """Replaces each sample's condition by `null_condition` with probability `prob`.

  Args:
    rng: key (the 'cfg' stream).
    cond: pytree whose leaves have leading batch axis B.
  Returns:
    (cond', keep [B] bool), keep False where the condition was dropped.
  """
  batch = jax.tree.leaves(cond)[0].shape[0]
  keep = jax.random.uniform(rng, (batch,)) >= prob
  null = null_condition(cond)
  dropped = jax.tree.map(lambda c, n: jnp.where(_bcast_t(keep, c), c, n), cond, null)
  return dropped, keep


# ----------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------

def masked_mse(pred: Array, target: Array, mask: Array) -> Array:
  """Mean squared error over real components only.

  pred, target [B, N, L, C]; mask [B, N] bool. Every real element weighs the same (a sample
  with more components contributes more terms). Returns a float32 scalar; 0 if no component
  is real.
  """
  err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
  per_comp = jnp.mean(err, axis=tuple(range(2, err.ndim)))          # [B, N]
  per_comp = jnp.where(mask, per_comp, 0.0)                         # NaN-safe padding
  return jnp.sum(per_comp) / jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)


def flow_loss(velocity_fn: VelocityFn, z: Array, cond: Any, mask: Array, *,
              noise_rng: Array, cfg_rng: Optional[Array] = None, cfg_dropout: float = 0.1,
              t_mean: float = 0.0, t_std: float = 1.0, t_shift: float = 1.0
              ) -> tuple[Array, dict[str, Array]]:
  """Rectified-flow training loss for one batch.

  Args:
    velocity_fn: (x_t [B,N,L,C], t [B], cond) -> v [B,N,L,C].
    z: [B, N, L, C] clean latents (padding components may hold anything).
    cond: condition pytree with leading axis B (image tokens).
    mask: [B, N] bool, True for real components.
    noise_rng: key for t and eps ('noise' stream).
    cfg_rng: key for condition dropout ('cfg' stream); None disables dropout.
  Returns:
    (loss scalar, aux dict with 't' [B] and 'cond_kept' [B]).
  """
  t_rng, eps_rng = jax.random.split(noise_rng)
  batch = z.shape[0]
  t = sample_time(t_rng, batch, mean=t_mean, std=t_std, shift=t_shift)
  eps = jax.random.normal(eps_rng, z.shape, jnp.float32).astype(z.dtype)
  x_t = interpolate(z, eps, t)
  if cfg_rng is not None and cfg_dropout > 0:
    cond, keep = drop_condition(cfg_rng, cond, cfg_dropout)
  else:
    keep = jnp.ones((batch,), bool)
  pred = velocity_fn(x_t, t, cond)
  loss = masked_mse(pred, velocity_target(z, eps), mask)
  return loss, {"t": t, "cond_kept": keep}


# ----------------------------------------------------------------------------------------
# Sampling: the whole ODE loop is one lax.scan
# ----------------------------------------------------------------------------------------

def guided(v_cond: Array, v_uncond: Array, scale) -> Array:
  """Classifier-free guidance v_u + s (v_c - v_u), written as v_c + (s - 1)(v_c - v_u) so
  that s = 1 returns the conditional prediction bit-exactly."""
  return v_cond + (scale - 1.0) * (v_cond - v_uncond)


def cfg_batch(x: Array, t: Array, cond: Any) -> tuple[Array, Array, Any]:
  """The doubled batch of classifier-free guidance, unconditional half first (as TripoSG /
  PartCrafter build it): x [2B, ...], t [2B], cond [null_condition(cond); cond]."""
  x2 = jnp.concatenate([x, x], axis=0)
  t2 = jnp.concatenate([t, t], axis=0)
  c2 = jax.tree.map(lambda c, n: jnp.concatenate([n, c], axis=0), cond, null_condition(cond))
  return x2, t2, c2


def cfg_velocity(velocity_fn: VelocityFn, cfg_scale) -> VelocityFn:
  """Wraps a velocity function with classifier-free guidance.

  The unconditional and conditional passes run as one forward on the doubled batch of
  `cfg_batch` ([null_condition(cond); cond], unconditional half first: a model whose output
  depends on the batch row, such as PartCrafter's part ids, sees upstream's layout).
  """
  def fn(x: Array, t: Array, cond: Any) -> Array:
    v = velocity_fn(*cfg_batch(x, t, cond))
    v_u, v_c = jnp.split(v, 2, axis=0)
    return guided(v_c, v_u, cfg_scale)
  return fn


def rectified_flow_sigmas(steps: int, shift: float = 1.0) -> np.ndarray:
  """The sampling grid of TripoSG's rectified-flow scheduler: float32 [steps + 1], from 1 down
  to a trailing 0 (module docstring; `set_timesteps(steps).sigmas` upstream).

  Raises:
    ValueError: steps < 1 or a non-positive / non-finite shift.
  """
  steps, shift = int(steps), float(shift)
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  if not np.isfinite(shift) or shift <= 0:
    raise ValueError(f"shift must be a positive number, got {shift}")
  s = 1.0 - np.arange(steps, dtype=np.float64) / steps
  s = shift * s / (1.0 + (shift - 1.0) * s)
  return np.append(s.astype(np.float32), np.float32(0.0))


def rectified_flow_train_sigmas(num_train_timesteps: int = 1000, shift: float = 1.0
                                ) -> np.ndarray:
  """The scheduler's training table after construction: float32 [num_train_timesteps],
  sigma_j = shift s / (1 + (shift - 1) s), s = (num_train_timesteps - j) / num_train_timesteps,
  in float32 as upstream (timesteps = 1000 sigma, `timesteps_from_sigmas`)."""
  n = int(num_train_timesteps)
  s = np.linspace(1, n, n, dtype=np.float32)[::-1] / np.float32(n)
  if float(shift) != 1.0:
    shift = np.float32(shift)
    s = shift * s / (np.float32(1.0) + (shift - np.float32(1.0)) * s)
  return s.astype(np.float32)


def timesteps_from_sigmas(sigmas: np.ndarray, num_train_timesteps: int = 1000) -> np.ndarray:
  """Upstream timesteps (0..1000 scale) of float32 sigmas: float32(sigma * 1000)."""
  return np.asarray(sigmas, np.float32) * np.float32(num_train_timesteps)


def time_grid(steps: int, shift: float = 1.0) -> Array:
  """Decreasing flow times [steps + 1] from 1 to 0: `rectified_flow_sigmas` (uniform, then
  `shift_time` in float64, cast to float32). `steps` and `shift` must be static."""
  return jnp.asarray(rectified_flow_sigmas(steps, shift))


def sample_ode(velocity_fn: VelocityFn, x1: Array, cond: Any, *, steps: int = 50,
               method: str = "euler", cfg_scale=None, time_shift: float = 1.0,
               return_trajectory: bool = False,
               cfg_interval: Optional[Tuple[float, float]] = None):
  """Integrates dx/dt = v(x, t, cond) from t = 1 (noise x1) to t = 0 (data).

  Args:
    velocity_fn: (x [B,...], t [B], cond) -> v [B,...]; call under jit for speed (the loop
      is a single `lax.scan`, so it compiles once regardless of `steps`).
    x1: [B, ...] starting noise.
    cond: condition pytree with leading axis B.
    steps: number of intervals (static).
    method: 'euler' (1 evaluation per step) or 'heun' (2 per step, second order; the
      final step to t = 0 is Euler: 2 * steps - 1 evaluations).
    cfg_scale: None = no guidance (one pass); else the guidance scale (may be traced);
      the doubled batch is `cfg_batch`'s.
    time_shift: `shift_time` applied to the uniform grid (`time_grid`; static).
    return_trajectory: also return the state after every step.
    cfg_interval: None = guidance at every step; (lo, hi) = guidance only where the step's
      time t satisfies lo <= t <= hi, the conditional pass alone elsewhere (one forward
      instead of the doubled batch: `lax.cond`). Guidance limited to an interval of noise
      levels: Kynkaanniemi et al., "Applying Guidance in a Limited Interval Improves Sample
      and Distribution Quality in Diffusion Models", NeurIPS 2024. Static.
  Returns:
    x0 [B, ...] in x1's dtype, or (x0, trajectory [steps, B, ...] float32) where
    trajectory[i] is the state at time grid[i + 1] (trajectory[-1] == x0 before the cast).
  """
  if method not in ("euler", "heun"):
    raise ValueError(f"sample_ode: method must be 'euler' or 'heun', got {method!r}")
  interval = check_cfg_interval(cfg_interval)
  fn = velocity_fn if cfg_scale is None else cfg_velocity(velocity_fn, cfg_scale)
  grid = time_grid(steps, time_shift)
  batch = x1.shape[0]

  def plain(x, t):
    return velocity_fn(x, jnp.full((batch,), t, jnp.float32), cond).astype(jnp.float32)

  def vel(x, t):
    v = lambda x, t: fn(x, jnp.full((batch,), t, jnp.float32), cond).astype(jnp.float32)
    if cfg_scale is None or interval is None:
      return v(x, t)
    lo, hi = interval
    return jax.lax.cond((t >= lo) & (t <= hi), v, plain, x, t)

  def step(x, ts):
    t, t_next = ts[0], ts[1]
    dt = t_next - t                                    # negative
    v = vel(x, t)
    x_euler = x + dt * v
    if method == "heun":
      v_next = vel(x_euler, t_next)
      x_euler = x + dt * 0.5 * (v + v_next)
    return x_euler, (x_euler if return_trajectory else None)

  pairs = jnp.stack([grid[:-1], grid[1:]], axis=1)    # [steps, 2]
  if method == "euler":
    x0, traj = jax.lax.scan(step, x1.astype(jnp.float32), pairs)
  else:
    # Heun on all but the last interval; the last one (ending at t = 0, where some exact
    # fields are singular) is an Euler step, as in EDM.
    x, traj = jax.lax.scan(step, x1.astype(jnp.float32), pairs[:-1])
    t, t_next = pairs[-1, 0], pairs[-1, 1]
    x0 = x + (t_next - t) * vel(x, t)
    if return_trajectory:
      traj = jnp.concatenate([traj, x0[None]], axis=0)
  if return_trajectory:
    return x0.astype(x1.dtype), traj
  return x0.astype(x1.dtype)


def sample(velocity_fn: VelocityFn, rng: Array, shape: tuple[int, ...], cond: Any, *,
           steps: int = 50, method: str = "euler", cfg_scale=None,
           time_shift: float = 1.0, return_trajectory: bool = False,
           cfg_interval: Optional[Tuple[float, float]] = None):
  """Seeded sampling: x1 ~ N(0, I) of `shape` from `rng`, then `sample_ode`."""
  x1 = jax.random.normal(rng, shape, jnp.float32)
  return sample_ode(velocity_fn, x1, cond, steps=steps, method=method, cfg_scale=cfg_scale,
                    time_shift=time_shift, return_trajectory=return_trajectory,
                    cfg_interval=cfg_interval)


def check_cfg_interval(cfg_interval) -> Optional[Tuple[float, float]]:
  """None, or (lo, hi) as floats with 0 <= lo <= hi <= 1 (flow times; t = 1 is noise).
  Raises ValueError naming the value."""
  if cfg_interval is None:
    return None
  # a flag's list of strings reads back as the user typed it (0.9,0.1), anything else as repr
  shown = (",".join(cfg_interval) if isinstance(cfg_interval, (list, tuple)) and cfg_interval
           and all(isinstance(v, str) for v in cfg_interval) else repr(cfg_interval))
  try:
    lo, hi = (float(v) for v in cfg_interval)
  except (TypeError, ValueError) as e:
    raise ValueError(f"cfg_interval={shown}: expected two numbers lo,hi") from e
  if not (np.isfinite(lo) and np.isfinite(hi) and 0.0 <= lo <= hi <= 1.0):
    raise ValueError(f"cfg_interval={shown}: needs 0 <= lo <= hi <= 1 (flow times, "
                     "t = 1 is noise)")
  return (lo, hi)
