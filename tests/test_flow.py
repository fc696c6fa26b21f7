"""Rectified flow: interpolation, loss masking, condition dropout, CFG and the ODE samplers."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moca_jax import flow


def _gaussian_velocity(mu, s):
  """Exact marginal velocity E[eps - z | x_t] for z ~ N(mu, s^2) (elementwise)."""
  def fn(x, t, cond):
    del cond
    tb = t.reshape(-1, *([1] * (x.ndim - 1)))
    a, b = 1.0 - tb, tb
    var = a * a * s * s + b * b
    r = x - a * mu
    e_eps = b * r / var
    e_z = mu + a * s * s * r / var
    return e_eps - e_z
  return fn


def test_interpolate_and_target_endpoints():
  z = jnp.arange(24.0).reshape(2, 3, 2, 2)
  eps = -jnp.ones_like(z)
  chex.assert_trees_all_close(flow.interpolate(z, eps, jnp.zeros(2)), z)
  chex.assert_trees_all_close(flow.interpolate(z, eps, jnp.ones(2)), eps)
  t = jnp.array([0.25, 0.75])
  ref = (1 - t[:, None, None, None]) * z + t[:, None, None, None] * eps
  chex.assert_trees_all_close(flow.interpolate(z, eps, t), ref)
  # d x_t / dt equals the target
  d = (flow.interpolate(z, eps, t + 1e-3) - flow.interpolate(z, eps, t)) / 1e-3
  chex.assert_trees_all_close(d, flow.velocity_target(z, eps), atol=1e-2)


def test_time_sampling_logit_normal_and_shift():
  t = flow.sample_time(jax.random.PRNGKey(0), 20000)
  assert t.shape == (20000,) and float(t.min()) > 0 and float(t.max()) < 1
  logit = np.log(np.asarray(t)) - np.log1p(-np.asarray(t))
  assert abs(logit.mean()) < 0.03 and abs(logit.std() - 1.0) < 0.03
  ts = flow.sample_time(jax.random.PRNGKey(0), 20000, shift=3.0)
  assert float(ts.mean()) > float(t.mean())        # mass moves to the noise end
  np.testing.assert_allclose(flow.shift_time(jnp.array([0.0, 0.5, 1.0]), 3.0), [0, 0.75, 1.0])


def test_masked_mse_matches_numpy_and_ignores_padding():
  rng = np.random.default_rng(0)
  pred = rng.normal(size=(3, 4, 5, 2)).astype(np.float32)
  target = rng.normal(size=(3, 4, 5, 2)).astype(np.float32)
  mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], bool)
  ref = np.mean(((pred - target) ** 2)[mask])
  np.testing.assert_allclose(flow.masked_mse(pred, target, mask), ref, rtol=1e-6)
  pred2 = pred.copy()
  pred2[~mask] = np.nan                               # padding may hold anything
  np.testing.assert_allclose(flow.masked_mse(pred2, target, mask), ref, rtol=1e-6)


def test_flow_loss_ignores_padding_components():
  """Changing the latents of padding components leaves the loss unchanged."""
  key = jax.random.PRNGKey(1)
  z = jax.random.normal(key, (2, 4, 3, 2))
  mask = jnp.array([[True, True, False, False], [True, True, True, False]])
  vel = lambda x, t, c: 0.5 * x * (1 + t[:, None, None, None]) + c[:, None, None, :1]
  cond = jnp.ones((2, 2))
  kw = dict(noise_rng=jax.random.PRNGKey(2), cfg_rng=jax.random.PRNGKey(3))
  l1, _ = flow.flow_loss(vel, z, cond, mask, **kw)
  z2 = jnp.where(mask[:, :, None, None], z, 1e3)
  l2, _ = flow.flow_loss(vel, z2, cond, mask, **kw)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  z3 = z.at[0, 0].add(1.0)                           # a real component does matter
  l3, _ = flow.flow_loss(vel, z3, cond, mask, **kw)
  assert abs(float(l3) - float(l1)) > 1e-3


def test_drop_condition_uses_null_condition():
  cond = jnp.ones((1000, 3, 2))
  dropped, keep = flow.drop_condition(jax.random.PRNGKey(0), cond, 0.1)
  frac = 1 - float(keep.mean())
  assert 0.07 < frac < 0.13
  np.testing.assert_array_equal(dropped[~keep], 0.0)
  np.testing.assert_array_equal(dropped[keep], 1.0)
  # scene-mode condition [B, N, T, Dc] and pytrees work the same way
  tree = {"a": jnp.ones((8, 2, 3, 4)), "b": jnp.ones((8, 5))}
  d, k = flow.drop_condition(jax.random.PRNGKey(1), tree, 0.5)
  for leaf in jax.tree.leaves(d):
    np.testing.assert_array_equal(leaf[~k], 0.0)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_sampler_reaches_point_mass(method):
  """With the exact field of a point mass, v = (x - z*) / t, the sampler lands on z*."""
  target = jnp.array([0.3, -1.2, 2.0])
  vel = lambda x, t, c: (x - target) / t[:, None]
  x0 = jax.jit(lambda key: flow.sample(vel, key, (5, 3), None, steps=7, method=method))(
      jax.random.PRNGKey(0))
  np.testing.assert_allclose(x0, jnp.broadcast_to(target, (5, 3)), atol=1e-5)


@pytest.mark.parametrize("method,steps,tol", [("heun", 50, 5e-3), ("euler", 200, 3e-2)])
def test_sampler_transports_gaussian(method, steps, tol):
  """For z ~ N(mu, s^2) the exact flow maps noise x1 to mu + s * x1; check per sample."""
  mu, s = 1.5, 0.5
  vel = _gaussian_velocity(mu, s)
  x1 = jax.random.normal(jax.random.PRNGKey(0), (256, 2, 3, 1))
  run = jax.jit(lambda x: flow.sample_ode(vel, x, jnp.zeros((256, 1)), steps=steps,
                                          method=method))
  x0 = run(x1)
  np.testing.assert_allclose(x0, mu + s * x1, atol=tol)


def test_convergence_orders():
  """Doubling the steps divides Heun's error by ~4 (second order), Euler's by ~2."""
  vel = _gaussian_velocity(1.5, 0.5)
  x1 = jax.random.normal(jax.random.PRNGKey(1), (64, 4))
  exact = 1.5 + 0.5 * x1
  err = lambda m, n: float(jnp.abs(flow.sample_ode(vel, x1, None, steps=n, method=m) - exact).max())
  assert err("heun", 20) < 0.2 * err("euler", 20)
  assert 3.0 < err("heun", 20) / err("heun", 40) < 5.0
  assert 1.6 < err("euler", 20) / err("euler", 40) < 2.4


def _cond_velocity(x, t, cond):
  return 0.3 * x * t[:, None, None] + cond[:, None, :]


def test_cfg_scale_one_is_conditional_prediction():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 2))
  t = jnp.full((3,), 0.6)
  cond = jax.random.normal(jax.random.PRNGKey(1), (3, 2))
  v_cond = _cond_velocity(x, t, cond)
  v_unc = _cond_velocity(x, t, flow.null_condition(cond))
  np.testing.assert_array_equal(flow.cfg_velocity(_cond_velocity, 1.0)(x, t, cond), v_cond)
  np.testing.assert_allclose(flow.cfg_velocity(_cond_velocity, 0.0)(x, t, cond), v_unc,
                             atol=1e-6)
  np.testing.assert_allclose(flow.cfg_velocity(_cond_velocity, 7.0)(x, t, cond),
                             v_unc + 7.0 * (v_cond - v_unc), atol=1e-5)
  # whole sampler: scale 1 == the unguided sampler
  a = flow.sample(_cond_velocity, jax.random.PRNGKey(2), (3, 4, 2), cond, steps=5, cfg_scale=1.0)
  b = flow.sample(_cond_velocity, jax.random.PRNGKey(2), (3, 4, 2), cond, steps=5)
  np.testing.assert_allclose(a, b, atol=1e-6)


def test_sampler_is_seeded_and_jits_with_traced_scale():
  cond = jnp.ones((2, 2))
  run = jax.jit(lambda key, s: flow.sample(_cond_velocity, key, (2, 4, 2), cond, steps=4,
                                           cfg_scale=s, method="heun"))
  a = run(jax.random.PRNGKey(0), 3.0)
  b = run(jax.random.PRNGKey(0), 3.0)
  c = run(jax.random.PRNGKey(1), 3.0)
  d = run(jax.random.PRNGKey(0), 5.0)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c) and not np.allclose(a, d)
  assert run._cache_size() == 1


def test_bad_method_raises():
  with pytest.raises(ValueError, match="method"):
    flow.sample_ode(_cond_velocity, jnp.zeros((1, 1, 2)), jnp.zeros((1, 2)), method="rk4")


def test_cfg_batch_puts_the_unconditional_half_first():
  """TripoSG / PartCrafter order: [null condition; condition] (row-dependent models such as
  PartCrafter's part ids see upstream's batch)."""
  x = jnp.arange(6.0).reshape(3, 2)
  cond = jnp.ones((3, 4))
  x2, t2, c2 = flow.cfg_batch(x, jnp.full((3,), 0.5), cond)
  np.testing.assert_array_equal(c2[:3], 0.0)
  np.testing.assert_array_equal(c2[3:], 1.0)
  np.testing.assert_array_equal(x2, jnp.concatenate([x, x]))
  seen = []

  def velocity(x, t, c):
    seen.append(c.shape)
    # Row-dependent: a model that adds its batch row index.
    return x + jnp.arange(x.shape[0], dtype=x.dtype)[:, None] + c[:, :1]

  v = flow.cfg_velocity(velocity, 2.0)(x, jnp.full((3,), 0.5), cond)
  rows = jnp.arange(6.0)[:, None]
  v_u, v_c = x + rows[:3], x + rows[3:] + 1.0
  np.testing.assert_allclose(v, v_u + 2.0 * (v_c - v_u), atol=1e-6)


def test_time_grid_is_the_rectified_flow_schedule():
  grid = np.asarray(flow.time_grid(4, 3.0))
  s = 1.0 - np.arange(4) / 4
  np.testing.assert_array_equal(grid, np.append((3 * s / (1 + 2 * s)).astype(np.float32), 0.0))
  np.testing.assert_array_equal(flow.timesteps_from_sigmas(grid[:-1]),
                                (grid[:-1] * np.float32(1000)).astype(np.float32))
  with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
    flow.time_grid(0)
  with pytest.raises(ValueError, match="shift must be a positive number, got nan"):
    flow.time_grid(4, float("nan"))


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_trajectory_ends_at_the_sample(method):
  vel = _gaussian_velocity(1.5, 0.5)
  x1 = jax.random.normal(jax.random.PRNGKey(3), (4, 3))
  x0, traj = flow.sample_ode(vel, x1, None, steps=5, method=method, return_trajectory=True)
  assert traj.shape == (5, 4, 3)
  np.testing.assert_array_equal(traj[-1], x0)
  np.testing.assert_array_equal(x0, flow.sample_ode(vel, x1, None, steps=5, method=method))
  # Euler: every state is the previous one plus one step on the grid.
  if method == "euler":
    grid = flow.time_grid(5)
    prev = jnp.concatenate([x1[None], traj[:-1]])
    for i in range(5):
      t = jnp.full((4,), grid[i])
      np.testing.assert_allclose(traj[i], prev[i] + (grid[i + 1] - grid[i]) * vel(prev[i], t, None),
                                 atol=1e-6)


def _interval_reference(x1, cond, steps, scale, lo, hi):
  """Euler from t = 1 to 0 in numpy: guided velocity where lo <= t <= hi, else conditional."""
  grid = np.asarray(flow.rectified_flow_sigmas(steps))
  x, cond = np.asarray(x1, np.float64), np.asarray(cond, np.float64)
  for t, t_next in zip(grid[:-1], grid[1:]):
    v_c = 0.3 * x * t + cond[:, None, :]
    v_u = 0.3 * x * t  # the null condition is zeros
    v = v_u + scale * (v_c - v_u) if lo <= t <= hi else v_c
    x = x + (t_next - t) * v
  return x


@pytest.mark.parametrize("lo, hi", [(0.0, 1.0), (0.8, 1.0), (0.0, 0.5), (0.3, 0.6), (1.0, 1.0)])
def test_cfg_interval_guides_only_inside_it(lo, hi):
  x1 = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 2))
  cond = jax.random.normal(jax.random.PRNGKey(1), (2, 2))
  got = jax.jit(lambda x, s: flow.sample_ode(_cond_velocity, x, cond, steps=10, cfg_scale=s,
                                             cfg_interval=(lo, hi)))(x1, 5.0)
  np.testing.assert_allclose(got, _interval_reference(x1, cond, 10, 5.0, lo, hi), atol=1e-4)
  if (lo, hi) == (0.0, 1.0):  # the whole range is plain CFG
    plain = flow.sample_ode(_cond_velocity, x1, cond, steps=10, cfg_scale=5.0)
    np.testing.assert_allclose(got, plain, atol=1e-6)
  else:  # and a real interval changes the result
    assert not np.allclose(got, _interval_reference(x1, cond, 10, 5.0, 0.0, 1.0), atol=1e-3)


@pytest.mark.parametrize("bad", [(0.5, 0.2), (-0.1, 0.5), (0.2, 1.5), (0.1,), "a,b",
                                 (float("nan"), 1.0)])
def test_bad_cfg_interval_raises(bad):
  with pytest.raises(ValueError, match="cfg_interval"):
    flow.sample_ode(_cond_velocity, jnp.zeros((1, 1, 2)), jnp.zeros((1, 2)), steps=2,
                    cfg_scale=3.0, cfg_interval=bad)
