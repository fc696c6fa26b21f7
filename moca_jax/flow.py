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

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

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


def cfg_velocity(velocity_fn: VelocityFn, cfg_scale) -> VelocityFn:
  """Wraps a velocity function with classifier-free guidance.

  The conditional and unconditional passes run as one forward on a doubled batch
  [cond ; null_condition(cond)].
  """
  def fn(x: Array, t: Array, cond: Any) -> Array:
    x2 = jnp.concatenate([x, x], axis=0)
    t2 = jnp.concatenate([t, t], axis=0)
    c2 = jax.tree.map(lambda c, n: jnp.concatenate([c, n], axis=0), cond, null_condition(cond))
    v = velocity_fn(x2, t2, c2)
    v_c, v_u = jnp.split(v, 2, axis=0)
    return guided(v_c, v_u, cfg_scale)
  return fn


def time_grid(steps: int, shift: float = 1.0) -> Array:
  """Decreasing times [steps + 1] from 1 to 0 (uniform, then `shift_time`)."""
  return shift_time(jnp.linspace(1.0, 0.0, steps + 1, dtype=jnp.float32), shift)


def sample_ode(velocity_fn: VelocityFn, x1: Array, cond: Any, *, steps: int = 50,
               method: str = "euler", cfg_scale=None, time_shift: float = 1.0) -> Array:
  """Integrates dx/dt = v(x, t, cond) from t = 1 (noise x1) to t = 0 (data).

  Args:
    velocity_fn: (x [B,...], t [B], cond) -> v [B,...]; call under jit for speed (the loop
      is a single `lax.scan`, so it compiles once regardless of `steps`).
    x1: [B, ...] starting noise.
    cond: condition pytree with leading axis B.
    steps: number of intervals (static).
    method: 'euler' (1 evaluation per step) or 'heun' (2 per step, second order; the
      final step to t = 0 is Euler: 2 * steps - 1 evaluations).
    cfg_scale: None = no guidance (one pass); else the guidance scale (may be traced).
    time_shift: `shift_time` applied to the uniform grid.
  Returns:
    x0 [B, ...] in x1's dtype.
  """
  if method not in ("euler", "heun"):
    raise ValueError(f"sample_ode: method must be 'euler' or 'heun', got {method!r}")
  fn = velocity_fn if cfg_scale is None else cfg_velocity(velocity_fn, cfg_scale)
  grid = time_grid(steps, time_shift)
  batch = x1.shape[0]

  def vel(x, t):
    return fn(x, jnp.full((batch,), t, jnp.float32), cond).astype(jnp.float32)

  def step(x, ts):
    t, t_next = ts[0], ts[1]
    dt = t_next - t                                    # negative
    v = vel(x, t)
    x_euler = x + dt * v
    if method == "euler":
      return x_euler, None
    v_next = vel(x_euler, t_next)
    return x + dt * 0.5 * (v + v_next), None

  pairs = jnp.stack([grid[:-1], grid[1:]], axis=1)    # [steps, 2]
  if method == "euler":
    x0, _ = jax.lax.scan(step, x1.astype(jnp.float32), pairs)
  else:
    # Heun on all but the last interval; the last one (ending at t = 0, where some exact
    # fields are singular) is an Euler step, as in EDM.
    x, _ = jax.lax.scan(step, x1.astype(jnp.float32), pairs[:-1])
    t, t_next = pairs[-1, 0], pairs[-1, 1]
    x0 = x + (t_next - t) * vel(x, t)
  return x0.astype(x1.dtype)


def sample(velocity_fn: VelocityFn, rng: Array, shape: tuple[int, ...], cond: Any, *,
           steps: int = 50, method: str = "euler", cfg_scale=None,
           time_shift: float = 1.0) -> Array:
  """Seeded sampling: x1 ~ N(0, I) of `shape` from `rng`, then `sample_ode`."""
  x1 = jax.random.normal(rng, shape, jnp.float32)
  return sample_ode(velocity_fn, x1, cond, steps=steps, method=method, cfg_scale=cfg_scale,
                    time_shift=time_shift)
