"""DiT training end to end on a micro config: resume exactness, overfitting, guards."""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import train_dit
from experiments.configs import dit as dit_configs
from moca_jax import sharding, train_lib

K = 3


def micro_config(**over):
  c = dit_configs.get_config("tiny")
  c.data.source = "synthetic"
  c.data.max_components = 3
  c.data.synthetic_examples = 10
  c.model.dit.num_blocks = 2
  c.model.encoder.depth = 1
  c.batch_size = 2
  c.log_every = 1
  c.optim.warmup_steps = 1
  c.checkpoint.every = K
  for k, v in over.items():
    c[k] = v
  return c


def _mesh1():
  return sharding.make_mesh(1, 1, devices=jax.devices()[:1])


def test_resume_is_exact(tmp_path):
  """2K steps straight == K steps + checkpoint + restore (fresh process state) + K steps."""
  cfg = micro_config()
  a_dir, b_dir = str(tmp_path / "a"), str(tmp_path / "b")
  straight = train_dit.train_and_evaluate(cfg, a_dir, num_steps=2 * K, mesh=_mesh1(),
                                          show_progress=False, eval_batches=0)
  assert sorted(os.listdir(os.path.join(a_dir, "checkpoints"))) == [str(K), str(2 * K)]
  # the job "died" after step K: only that checkpoint exists in b
  os.makedirs(os.path.join(b_dir, "checkpoints"))
  shutil.copytree(os.path.join(a_dir, "checkpoints", str(K)),
                  os.path.join(b_dir, "checkpoints", str(K)))
  resumed = train_dit.train_and_evaluate(cfg, b_dir, num_steps=2 * K, mesh=_mesh1(),
                                         show_progress=False, eval_batches=1)
  assert int(resumed.state.step) == 2 * K
  assert resumed.batch_log == straight.batch_log[K:]              # same data order
  assert len({tuple(b) for b in straight.batch_log}) > 1          # and it is not trivial
  for tree in ("params", "ema_params"):
    for x, y in zip(jax.tree.leaves(getattr(straight.state, tree)),
                    jax.tree.leaves(getattr(resumed.state, tree))):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose([h["loss"] for h in resumed.history],
                             [h["loss"] for h in straight.history[K:]], rtol=1e-6)
  # metrics, eval and the stored config are written
  assert os.listdir(os.path.join(b_dir, "tb"))
  assert os.path.exists(os.path.join(b_dir, "eval.json"))
  stored, step = train_lib.read_checkpoint_config(os.path.join(b_dir, "checkpoints"))
  assert step == 2 * K and stored["model"]["dit"]["num_blocks"] == 2
  assert "router/importance_entropy" in straight.history[0]


def test_loss_falls_overfitting_one_sample():
  cfg = micro_config()
  cfg.data.synthetic_examples = 1
  cfg.optim.lr, cfg.optim.grad_clip = 1e-3, 0.0
  cfg.flow.cfg_dropout = 0.0
  model, init_fn, noisy_loss_fn = train_lib.make_dit_task(cfg)
  # one sample, one draw of (t, eps, ids, routing): a pure regression that must be fitted
  loss_fn = lambda p, b, r: noisy_loss_fn(p, b, jax.random.PRNGKey(5))
  batch = train_dit.model_batch(next(train_dit.make_iterator_fn(cfg)()))
  spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
  tx = train_lib.make_optimizer(cfg.optim)
  mesh = _mesh1()
  state, setup = train_lib.create_train_state(init_fn, tx, spec, jax.random.PRNGKey(0), mesh)
  step, _ = train_lib.compile_train_step(loss_fn, tx, train_lib.make_schedule(cfg.optim), 0.9,
                                         setup, spec, mesh)
  losses = []
  for _ in range(50):
    state, m = step(state, batch, jax.random.PRNGKey(1))
    losses.append(float(m["loss"]))
  # below 2.0, the loss of predicting the mean velocity, and still falling
  assert np.mean(losses[-5:]) < 0.55 * np.mean(losses[:5]), losses
  assert losses[-1] < losses[-10] < 2.0, losses


def test_nonfinite_loss_names_step_and_batch(tmp_path):
  cfg = micro_config()
  cfg.optim.lr = 1e30            # blows up on the first real update
  cfg.optim.grad_clip = 0.0
  with pytest.raises(train_lib.NonFiniteLossError, match=r"at step \d+ \(batch \[\d+, \d+\]\)"):
    train_dit.train_and_evaluate(cfg, str(tmp_path), num_steps=6, mesh=_mesh1(),
                                 show_progress=False, eval_batches=0)


def test_router_statistics_reference():
  rng = np.random.default_rng(0)
  b, g, h, n, k = 2, 1, 2, 4, 2
  mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
  imp = rng.uniform(0.1, 1, size=(b, g, h, n, n)).astype(np.float32)
  for bi in range(b):
    imp[bi, ..., ~mask[bi]] = 0
    for i in range(n):
      imp[bi, ..., i, i] = 0
  sel = np.argsort(-imp, axis=-1)[..., :k]
  out = jax.device_get(train_lib.router_statistics(imp, sel, mask))
  counts = np.zeros(n)
  ents = []
  for bi in range(b):
    nr = mask[bi].sum()
    for gi in range(g):
      for hi in range(h):
        for i in range(n):
          if not mask[bi, i]:
            continue
          for j in sel[bi, gi, hi, i]:
            counts[j] += 1
          if nr > 2:
            p = imp[bi, gi, hi, i][imp[bi, gi, hi, i] > 0]
            p = p / p.sum()
            ents.append(-(p * np.log(p)).sum() / np.log(nr - 1))
  np.testing.assert_allclose(out["router/selection_freq"], counts / counts.sum(), rtol=1e-6)
  np.testing.assert_allclose(out["router/importance_entropy"], np.mean(ents), rtol=1e-5)
  # uniform importances have normalised entropy 1
  uni = np.where(np.eye(n, dtype=bool), 0.0, 1.0)[None, None, None].repeat(2, 0).astype(np.float32)
  out = train_lib.router_statistics(uni, sel[:, :1, :1], np.ones((2, n), bool))
  np.testing.assert_allclose(out["router/importance_entropy"], 1.0, rtol=1e-6)


def test_config_sizes_and_errors():
  for size in ("tiny", "small", "paper"):
    c = dit_configs.get_config(size)
    assert c.model.dit.cond_dim == c.model.encoder.width
  assert dit_configs.get_config("tiny,scene").model.encoder.in_channels == 7
  with pytest.raises(ValueError, match="unknown size"):
    dit_configs.get_config("huge")
  c = micro_config()
  c.data.source = "records"
  with pytest.raises(ValueError, match="data.dir"):
    train_dit.make_iterator_fn(c)
