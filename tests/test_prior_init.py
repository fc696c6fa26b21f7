"""MoCA from a pretrained prior (moca_jax.prior_init): the golden PartCrafter / TripoSG fixtures
imported as snapshots, the MoC layout put on them, every imported tensor carried over unchanged,
the start equal to the prior where it should be, training, exact resume, one-line errors."""
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import import_weights
from experiments.configs import dit_finetune
from moca_jax import dit_task, prior_init, sharding
from moca_jax.convert import dinov2, triposg_dit
from moca_jax.dit import CompositionalDiT
from moca_jax.prior_init import PriorInitError
from test_import_weights import make_snapshot, make_triposg_snapshot
from test_train_dit import _compilation_cache

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
L = 16  # vecset tokens of the imported priors
IMAGE = 28  # encoder input: 2 x 2 patches (the DINOv2 position table is resized from 518)


def _import(root, source):
  if source == "triposg":
    snap = make_triposg_snapshot(root / "snap")
  else:
    snap = make_snapshot(root / "snap", transformer="partcrafter_dit", copy=("transformer",))
  out = import_weights.run(source, str(snap), str(root / "prior"), progress=False,
                           latent_tokens=L)
  return snap, out


@pytest.fixture(scope="module")
def priors(tmp_path_factory):
  base = tmp_path_factory.mktemp("priors")
  return {s: _import(base / s, s) for s in ("partcrafter", "triposg")}


def micro(prior, **init):
  """The fine-tuning config of `prior`, shrunk for a CPU: fp32, XLA, 4 compressed tokens,
  top_k 2, a 28 x 28 encoder input, batch 2 of up to 3 synthetic components."""
  c = dit_finetune.get_config(prior)
  c.model.dit.update(dtype="float32", attention_implementation="xla", remat="none",
                     num_compressed=4, top_k=2, router_head_dim=8)
  c.model.encoder.update(dtype="float32", remat=False, image_size=IMAGE)
  c.data.update(source="synthetic", max_components=3, synthetic_examples=4)
  c.batch_size, c.log_every = 2, 1
  c.optim.update(lr=1e-3, warmup_steps=1)
  c.checkpoint.every = 2
  c.init.update(init)
  return c


def _random_like(abstract, seed=0):
  """Random N(0, 0.02) params shaped like `abstract` (a freshly initialised model's stand-in;
  only the new tensors keep these values)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.02, s.shape), s.dtype), abstract)


def _fresh(config):
  return _random_like(prior_init.abstract_params(config.model))


@pytest.fixture(scope="module")
def partcrafter_start(priors):
  _, prior = priors["partcrafter"]
  config = micro(prior, router_bias=20.0)
  fresh = _fresh(config)
  return config, fresh, prior_init.initial_params(config, fresh)


# ----------------------------------------------------------------------------------------
# Config and initialisation
# ----------------------------------------------------------------------------------------

def test_config_puts_the_moc_layout_on_the_prior(priors):
  pc = dit_finetune.get_config(priors["partcrafter"][1])
  d = pc.model.dit
  assert (d.num_blocks, d.width, d.num_heads, d.latent_tokens, d.latent_channels, d.cond_dim) == (
      5, 96, 4, L, 16, 64)
  assert (d.time_embedding, d.norm_eps, d.norm_fp32, d.gelu, d.long_skips) == (
      "token", 1e-5, True, "erf", True)
  assert (d.packing, d.global_attention, d.id_assignment, d.id_codebook, d.router_bias) == (
      True, "moc", "random", 50, True)
  assert tuple(d.global_blocks) == (0, 2, 4)  # PartCrafter's global blocks become MoC blocks
  assert (d.top_k, d.num_compressed, d.dtype, d.attention_implementation) == (
      4, 32, "bfloat16", "cudnn")
  assert pc.model.encoder.freeze and pc.model.encoder.width == 64 and pc.mode == "object"
  assert pc.init.to_dict() == {"from_checkpoint": priors["partcrafter"][1], "params": "ema",
                               "router_bias": 4.0}
  assert pc.vae.workdir == os.path.join(priors["partcrafter"][1], "vae")
  assert pc.optim.lr == 4e-5 and pc.data.max_components == 32
  tg = dit_finetune.get_config(priors["triposg"][1]).model.dit
  assert tg.global_blocks == "even" and tg.id_codebook == 50  # TripoSG has no global blocks
  with pytest.raises(ValueError, match="name the prior"):
    dit_finetune.get_config("")


def test_every_imported_tensor_is_loaded_unchanged(priors, partcrafter_start):
  snap, _ = priors["partcrafter"]
  config, fresh, params = partcrafter_start
  got = prior_init.flat(params)
  dit = prior_init.flat(triposg_dit.load(str(snap / "transformer"))[1]["params"])
  enc = prior_init.flat(dinov2.load(str(snap / "image_encoder_dinov2"))[1]["params"])
  for name, tensor in {**{"dit/" + k: v for k, v in dit.items()},
                       **{"encoder/" + k: v for k, v in enc.items()}}.items():
    if name == prior_init.ID_TABLE:  # PartCrafter's 16 part embeddings, then zero rows
      np.testing.assert_array_equal(got[name][:16], tensor)
      np.testing.assert_array_equal(got[name][16:], np.zeros((34, 96)))
    else:
      np.testing.assert_array_equal(got[name], tensor, err_msg=name)
  added = sorted(set(got) - {"dit/" + k for k in dit} - {"encoder/" + k for k in enc})
  assert {p.split("/")[1] for p in added} == {"packing", "pack_norm", "block_0", "block_2",
                                              "block_4"}
  routers = [p for p in added if "/router/" in p]
  assert len(routers) == 9 and len(added) == 9 + len(prior_init.flat(fresh["dit"]["packing"])) + 2
  for p in routers:
    if p.endswith("/router/bias"):
      assert np.all(np.asarray(got[p]) == 20.0), p  # init.router_bias
    elif p.endswith("/router/key/kernel"):
      assert not np.any(got[p]), p  # zeros: every component equally important
    else:  # the router query keeps its fresh init
      assert p.endswith("/router/query/kernel"), p
      np.testing.assert_array_equal(got[p], prior_init.flat(fresh)[p])


def _golden(name):
  return os.path.join(GOLDEN, name)


def _apply(dit_config, params, x, timestep, cond):
  """The DiT's output in upstream's sign (TripoSG predicts z - eps) on upstream inputs."""
  model = CompositionalDiT(dit_config)
  v = jax.jit(lambda p: model.apply({"params": p}, jnp.asarray(x), triposg_dit.flow_time(timestep),
                                    jnp.asarray(cond), None, train=False))(params)
  return -np.asarray(v)


def test_start_equals_partcrafter(partcrafter_start):
  """The golden PartCrafter calls (one object of 4 parts; the same with a condition per part)
  run through the fine-tuning model at its start: with top_k = N - 1 and gates of 1 (bias 20)
  they give upstream's recorded outputs (the prior tokens are blind to the new tokens, every
  other part is routed in full). The default bias 4 scales the other parts' keys by 0.982:
  close, not equal."""
  config, fresh, params = partcrafter_start
  io = np.load(os.path.join(_golden("partcrafter_dit"), "io.npz"))
  x = np.stack([io["a_hidden_states"]] * 2)  # [2 objects, 4 parts, 32, 16]
  cond = np.stack([io["a_encoder_hidden_states"], io["c_encoder_hidden_states"]])
  timestep = io["a_timestep"][:2]
  ref = np.stack([io["a_output"], io["c_output"]])
  np.testing.assert_array_equal(io["a_part_ids"], np.arange(4))  # our evaluation ids
  dit_config = config.model.dit.copy_and_resolve_references()
  dit_config.top_k = 3
  ours = _apply(dit_config, params["dit"], x, timestep, cond)
  assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
  config.init.router_bias = 4.0
  try:
    biased = _apply(dit_config, prior_init.initial_params(config, fresh)["dit"], x, timestep, cond)
  finally:
    config.init.router_bias = 20.0
  err = np.abs(biased - ref).max() / np.abs(ref).max()
  assert 1e-4 < err < 1e-2, err


def test_start_equals_triposg_for_one_component():
  """TripoSG has no global blocks: the even blocks become MoC blocks whose attention starts as
  the block's self-attention, the ID table is zero, so one component gives the golden TripoSG
  outputs (the time token stays a token, the vecset tokens are blind to the new ones)."""
  upstream_config, upstream = triposg_dit.load(_golden("triposg_dit"))
  moc = prior_init.moc_dit_config(upstream_config.to_dict())
  moc.update(num_compressed=4, top_k=2, router_head_dim=8, latent_tokens=L, dtype="float32",
             attention_implementation="xla", remat="none")
  io = np.load(os.path.join(_golden("triposg_dit"), "io.npz"))
  x = io["hidden_states"][:, None]
  fresh = _random_like(nn.meta.unbox(jax.eval_shape(lambda: CompositionalDiT(moc).init(
      jax.random.key(0), jnp.asarray(x), jnp.zeros((2,)), jnp.asarray(io["encoder_hidden_states"]),
      None, train=False)))["params"])
  shapes = lambda tree: {k: v.shape for k, v in prior_init.flat({"dit": tree}).items()}
  mapping = prior_init.plan_mapping(shapes(upstream["params"]), shapes(fresh), moc, "triposg")
  params = prior_init.merge_params({"dit": fresh}, {"dit": upstream["params"]}, mapping, 4.0)
  params = params["dit"]
  for i in (0, 2, 4):
    for name in ("query", "key", "value", "out"):
      np.testing.assert_array_equal(params[f"block_{i}"]["global_attn"][name]["kernel"],
                                    upstream["params"][f"block_{i}"]["local_attn"][name]["kernel"])
    assert np.all(params[f"block_{i}"]["global_attn"]["router"]["bias"] == 4.0)
  assert params["id_embed"]["embedding"].shape == (50, 64)
  assert not np.any(params["id_embed"]["embedding"])
  ours = _apply(moc, params, x, io["timestep"], io["encoder_hidden_states"])
  ref = io["output"][:, None]
  assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_scene_model_from_an_rgb_prior(priors, partcrafter_start):
  """',scene': the 7-channel encoder input [instance RGB, scene RGB, mask] starts with both RGB
  triples copying the prior's RGB patch kernel and the mask channel at zero (MIDI)."""
  _, prior = priors["partcrafter"]
  config = micro(prior + ",scene", router_bias=20.0)
  assert config.mode == "scene" and config.model.encoder.in_channels == 7
  params = prior_init.initial_params(config, _fresh(config))
  rgb = partcrafter_start[2]["encoder"]["patch_embed"]["kernel"]
  kernel = params["encoder"]["patch_embed"]["kernel"]
  assert kernel.shape == rgb.shape[:2] + (7,) + rgb.shape[3:]
  np.testing.assert_array_equal(kernel[:, :, :3], rgb)
  np.testing.assert_array_equal(kernel[:, :, 3:6], rgb)
  np.testing.assert_array_equal(kernel[:, :, 6], np.zeros_like(rgb[:, :, 0]))
  ours, rgb_start = prior_init.flat(params), prior_init.flat(partcrafter_start[2])
  for path in prior_init.check_prior(config):  # every other prior tensor as in the RGB model
    if path != prior_init.PATCH_KERNEL:
      np.testing.assert_array_equal(ours[path], rgb_start[path], err_msg=path)


# ----------------------------------------------------------------------------------------
# Training from the prior
# ----------------------------------------------------------------------------------------

def _mesh1():
  return sharding.make_mesh(1, 1, devices=jax.devices()[:1])


def test_training_lowers_the_loss_and_resumes_exactly(partcrafter_start, tmp_path):
  """4 steps from the PartCrafter prior: the flow loss on a fixed batch and noise falls, the
  frozen encoder does not move; 2 steps + checkpoint + resume (the prior moved away: it is not
  read again) + 2 steps equals 4 steps straight."""
  config, _, start = partcrafter_start
  prior = config.init.from_checkpoint
  a_dir, b_dir = str(tmp_path / "a"), str(tmp_path / "b")
  with _compilation_cache(tmp_path / "xla_cache"):
    straight = dit_task.train_and_evaluate(config, a_dir, num_steps=4, mesh=_mesh1(),
                                           show_progress=False, eval_batches=0)
    os.makedirs(os.path.join(b_dir, "checkpoints"))
    shutil.copytree(os.path.join(a_dir, "checkpoints", "2"),
                    os.path.join(b_dir, "checkpoints", "2"))
    os.rename(prior, prior + ".away")
    try:
      resumed = dit_task.train_and_evaluate(config, b_dir, num_steps=4, mesh=_mesh1(),
                                            show_progress=False, eval_batches=0)
    finally:
      os.rename(prior + ".away", prior)
  for tree in ("params", "ema_params"):
    for x, y in zip(jax.tree.leaves(getattr(straight.state, tree)),
                    jax.tree.leaves(getattr(resumed.state, tree))):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history[2:]]

  final = jax.device_get(straight.state.params)
  for x, y in zip(jax.tree.leaves(start["encoder"]), jax.tree.leaves(final["encoder"])):
    np.testing.assert_array_equal(np.asarray(x), y)  # frozen
  _, _, loss_fn = dit_task.make_task(config)
  batch = dit_task.model_batch(next(dit_task.make_iterator_fn(config, shuffle=False)()))
  loss = jax.jit(lambda p: loss_fn(p, batch, jax.random.key(3))[0])
  before, after = float(loss(start)), float(loss(final))
  assert after < 0.9 * before, (before, after)


# ----------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------

def test_bad_priors_get_one_clear_error(priors, tmp_path):
  _, prior = priors["partcrafter"]
  label = lambda p: f"init.from_checkpoint={p}"
  with pytest.raises(PriorInitError) as e:
    prior_init.read_prior_config(str(tmp_path / "nowhere"))
  assert str(e.value) == f"{label(tmp_path / 'nowhere')}: no such folder"
  (tmp_path / "empty").mkdir()
  with pytest.raises(PriorInitError) as e:
    dit_finetune.get_config(str(tmp_path / "empty"))
  assert str(e.value) == (f"{label(tmp_path / 'empty')}: holds no checkpoint (expected an "
                          "experiments.import_weights --out folder or a train_dit workdir)")
  vae = os.path.join(prior, "vae")  # a train_vae workdir
  with pytest.raises(PriorInitError) as e:
    dit_finetune.get_config(vae)
  assert str(e.value) == (f"{label(vae)}: not a DiT checkpoint (its config has no model.dit and "
                          "model.encoder; a train_vae workdir?)")

  config = micro(prior)
  config.model.dit.latent_channels = 8
  with pytest.raises(PriorInitError) as e:
    prior_init.check_prior(config)
  assert str(e.value) == (
      f"{label(prior)}: the prior does not fit the configured model: 3 tensor(s) with another "
      "shape (prior vs new model): dit/proj_in/kernel [16, 96] vs [8, 96], dit/proj_out/bias "
      "[16] vs [8], dit/proj_out/kernel [96, 16] vs [96, 8]")
  config = micro(prior)
  config.model.dit.long_skips = False
  with pytest.raises(PriorInitError) as e:
    prior_init.check_prior(config)
  assert str(e.value) == (
      f"{label(prior)}: the prior does not fit the configured model: 8 prior tensor(s) with no "
      "place in the new model: " + ", ".join(f"dit/block_{i}/{name}" for i in (3, 4) for name in (
          "skip_linear/bias", "skip_linear/kernel", "skip_norm/bias", "skip_norm/scale")))

  config = micro(prior, params="best")
  with pytest.raises(PriorInitError) as e:
    prior_init.check_prior(config)
  assert str(e.value) == "init.params must be 'ema' or 'params', got 'best'"
  config = micro(prior)
  config.model.encoder.lora_rank = 2  # LoRA adapters are additions, the base weights map
  mapping = prior_init.check_prior(config)
  assert "encoder/blocks_0/qkv/kernel" in mapping and not any("lora" in k for k in mapping)

  # train_dit refuses before anything is written in the workdir
  config = micro(str(prior))
  config.init.from_checkpoint = str(tmp_path / "nowhere")
  workdir = tmp_path / "run"
  with pytest.raises(PriorInitError, match="no such folder"):
    dit_task.train_and_evaluate(config, str(workdir), num_steps=1, mesh=_mesh1(),
                                show_progress=False, eval_batches=0)
  assert not workdir.exists()


def test_cli_refuses_a_missing_prior_in_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "experiments.train_dit",
       f"--config=experiments/configs/dit_finetune.py:{tmp_path / 'nowhere'}",
       f"--workdir={tmp_path / 'run'}"],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True,
      text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
  assert result.returncode == 2
  assert result.stderr.strip() == (
      f"train_dit: error: init.from_checkpoint={tmp_path / 'nowhere'}: no such folder")
  assert not (tmp_path / "run").exists()


def test_cli_refuses_a_missing_data_folder_in_one_line(tmp_path):
  """data.dir "a,b" with b missing: one line naming it, exit 2, nothing written."""
  from test_data_loader import _latent_shards  # pylint: disable=g-import-not-at-top

  (tmp_path / "a").mkdir()
  a = _latent_shards(tmp_path / "a", [[2, 3]])
  (tmp_path / "a" / "manifest.json").write_text("{}")  # no VAE record: not checked
  result = subprocess.run(
      [sys.executable, "-m", "experiments.train_dit", "--config=experiments/configs/dit.py:tiny",
       "--config.model.latent_norm.kind=none", f"--config.data.dir={a},{tmp_path / 'b'}",
       f"--workdir={tmp_path / 'run'}"],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True,
      text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1].startswith(
      f"train_dit: error: {tmp_path / 'b'}")
  assert not (tmp_path / "run" / "checkpoints").exists()
