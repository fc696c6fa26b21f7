"""Latent extraction: packing parts across records, record contents, resume, the real VAE."""
import os

import numpy as np
import pytest

from data_pipeline import encode_latents, loader, records


@pytest.fixture(scope="module")
def samples_dir(tiny_shards):
  return tiny_shards(num_shards=2, n_near=16, image_size=24)


def _fake_encode(pts, nrm):
  """A per-part function of its inputs: [B,P,3] -> [B,4,3] (no mixing across the batch)."""
  return np.stack([pts.mean(1), pts.min(1), pts.max(1), nrm.mean(1)], axis=1)


def test_latents_match_per_part_encoding_and_keep_renders(samples_dir, tmp_path):
  out = str(tmp_path / "lat")
  m = encode_latents.encode_dataset(samples_dir, out, _fake_encode, num_points=48,
                                    batch_size=7, progress=False, vae_info={"name": "fake"})
  assert m["complete"] and m["count"] == records.load_manifest(samples_dir)["count"]
  assert m["kind"] == "latents"
  for p_in, p_out in zip(records.shard_paths(samples_dir), records.shard_paths(out)):
    assert os.path.basename(p_in) == os.path.basename(p_out)
    for a, b in zip(records.read_shard(p_in), records.read_shard(p_out)):
      ra, rb = records.decode_record(a), records.decode_record(b)
      assert rb["meta"]["key"] == ra["meta"]["key"] and rb["meta"]["kind"] == "latents"
      assert rb["meta"]["vae"] == {"name": "fake"}
      assert "surface_points" not in rb
      pts, nrm = encode_latents._subset(ra, 48, 0)
      np.testing.assert_allclose(rb["latents"], _fake_encode(pts, nrm), rtol=1e-6)
      for k in encode_latents.KEEP_KEYS:
        np.testing.assert_array_equal(ra[k], rb[k])
  # the DiT view reads them
  batch = next(iter(loader.latent_dataset(out, batch_size=2, n_max=32, process_index=0,
                                          process_count=1)))
  assert batch["latents"].shape == (2, 32, 4, 3)
  # resume: nothing left to do
  m2 = encode_latents.encode_dataset(samples_dir, out, _fake_encode, 48, 7, progress=False,
                                     vae_info={"name": "fake"})
  assert m2["built_now"] == [] and m2["complete"]


def test_shard_groups_encode_disjoint_shards_then_complete(samples_dir, tmp_path):
  out, whole = str(tmp_path / "groups"), str(tmp_path / "whole")
  kw = dict(num_points=48, batch_size=7, progress=False, vae_info={"name": "fake"})
  names = [os.path.basename(p) for p in records.shard_paths(samples_dir)]
  built = []
  for i in range(2):
    m = encode_latents.encode_dataset(samples_dir, out, _fake_encode, shard_group=(i, 2), **kw)
    assert m["built_now"] == [names[i][:-len(".array_record")]]
    built += m["built_now"]
  final = encode_latents.encode_dataset(samples_dir, out, _fake_encode, **kw)
  assert final["built_now"] == [] and final["complete"]
  straight = encode_latents.encode_dataset(samples_dir, whole, _fake_encode, **kw)
  assert final["count"] == straight["count"]
  for a, b in zip(records.shard_paths(out), records.shard_paths(whole)):
    assert records.read_shard(a) == records.read_shard(b)
  assert encode_latents.parse_shard_group("") is None
  assert encode_latents.parse_shard_group("1/4") == (1, 4)
  for bad in ("4/4", "x", "1/2/3"):
    with pytest.raises(ValueError, match="--shard_group"):
      encode_latents.parse_shard_group(bad)


def test_too_few_points_is_a_clear_error(samples_dir, tmp_path):
  with pytest.raises(ValueError, match="surface points per part"):
    encode_latents.encode_dataset(samples_dir, str(tmp_path / "x"), _fake_encode,
                                  num_points=1000, progress=False)


def test_real_vae_encoder_is_batch_independent(samples_dir, tmp_path):
  import jax
  from moca_jax import vae
  cfg = vae.vae_config("tiny")
  model = vae.VecSetVAE(cfg)
  x = np.zeros((1, 64, 3), np.float32) + np.linspace(-1, 1, 64, dtype=np.float32)[None, :, None]
  # encoder-only parameters (jitted init: the eager one is slow on CPU)
  params = jax.jit(lambda k: model.init({"params": k, "fps": k}, x, x,
                                        method=vae.VecSetVAE.encode))(jax.random.PRNGKey(0))
  fn = encode_latents.vae_encode_fn(model, params)
  out = str(tmp_path / "lat")
  encode_latents.encode_dataset(samples_dir, out, fn, num_points=64, batch_size=16,
                                progress=False)
  path_in, path_out = records.shard_paths(samples_dir)[0], records.shard_paths(out)[0]
  pairs = [(records.decode_record(a), records.decode_record(b))
           for a, b in zip(records.read_shard(path_in), records.read_shard(path_out))]
  ra, rb = next((a, b) for a, b in pairs if a["meta"]["num_parts"] <= 16)
  n = ra["meta"]["num_parts"]
  assert rb["latents"].shape == (n, cfg.num_latents, cfg.latent_channels)
  # the same parts encoded alone (padded batch) give the same latents as when packed
  pts, nrm = encode_latents._subset(ra, 64, 0)
  pad = lambda a: np.concatenate([a, np.repeat(a[:1], 16 - n, 0)])
  direct = fn(pad(pts), pad(nrm))[:n]
  np.testing.assert_allclose(rb["latents"], direct, atol=1e-5)
  assert np.abs(rb["latents"]).max() > 0


def test_params_digest_tells_vaes_apart():
  a = {"params": {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)}}
  b = {"params": {"w": np.ones((2, 3), np.float32), "b": np.full(3, 1e-6, np.float32)}}
  assert encode_latents.params_digest(a) == encode_latents.params_digest(
      {"params": {"b": np.zeros(3, np.float32), "w": np.ones((2, 3), np.float32)}})
  assert encode_latents.params_digest(a) != encode_latents.params_digest(b)
