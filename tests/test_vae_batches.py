"""vae_batches: real parts only, near / volume split, shapes, pairing, grain pipeline state."""

import numpy as np
import pytest

from data_pipeline import loader, primitives, records, vae_batches


@pytest.fixture(scope="module")
def data_dir(tiny_shards):
  return tiny_shards(num_shards=2)


def _element(n_max=4, n_real=2, ns=10, n_near=6, n_vol=3, index=5):
  """Padded element whose values encode where they come from: part p's surface point i is
  (p + 1, i, 0) with normal (0, 0, p + 1); sdf point j is (p + 1, j, 1), sdf value
  (p + 1) * 100 + j. Padding slots are zeros, as the loader writes them."""
  sp = np.zeros((n_max, ns, 3), np.float32)
  sn = np.zeros((n_max, ns, 3), np.float32)
  q = np.zeros((n_max, n_near + n_vol, 3), np.float32)
  v = np.zeros((n_max, n_near + n_vol), np.float32)
  for p in range(n_real):
    sp[p, :, 0], sp[p, :, 1] = p + 1, np.arange(ns)
    sn[p, :, 2] = p + 1
    q[p, :, 0], q[p, :, 1], q[p, :, 2] = p + 1, np.arange(n_near + n_vol), 1
    v[p] = (p + 1) * 100 + np.arange(n_near + n_vol)
  return {
      "surface_points": sp,
      "surface_normals": sn,
      "sdf_points": q,
      "sdf_values": v,
      "component_mask": np.arange(n_max) < n_real,
      "num_components": np.int32(n_real),
      "index": np.int64(index),
  }


@pytest.mark.parametrize("k", [1, 2, 3])
def test_part_examples_real_parts_splits_and_pairing(k):
  el = _element()
  seen_parts = set()
  for seed in range(6):
    ex = vae_batches.part_examples(
        el,
        np.random.default_rng(seed),
        stored_near=6,
        num_points=7,
        num_near=4,
        num_volume=2,
        parts_per_element=k,
    )
    assert ex["surface_points"].shape == ex["surface_normals"].shape == (k, 7, 3)
    assert ex["near_points"].shape == (k, 4, 3) and ex["near_sdf"].shape == (k, 4)
    assert ex["volume_points"].shape == (k, 2, 3) and ex["volume_sdf"].shape == (k, 2)
    assert all(ex[key].dtype == np.float32 for key in vae_batches.EXAMPLE_KEYS)
    np.testing.assert_array_equal(ex["index"], [5] * k)
    parts = ex["surface_points"][:, 0, 0].astype(int) - 1
    if k == 2:  # as many real parts as asked: drawn without replacement
      assert sorted(parts) == [0, 1]
    for e, p in enumerate(parts):
      assert p in (0, 1)  # never a padding slot (those are all zero)
      seen_parts.add(int(p))
      sp = ex["surface_points"][e]
      assert np.all(sp[:, 0] == p + 1) and np.all(ex["surface_normals"][e][:, 2] == p + 1)
      assert len(set(sp[:, 1].tolist())) == 7  # distinct stored points
      for kind, lo, hi in (("near", 0, 6), ("volume", 6, 9)):
        pts, sdf = ex[f"{kind}_points"][e], ex[f"{kind}_sdf"][e]
        assert np.all(pts[:, 0] == p + 1) and np.all(pts[:, 2] == 1)
        j = pts[:, 1].astype(int)
        assert np.all((j >= lo) & (j < hi)), (kind, j)  # from its own block only
        assert len(set(j.tolist())) == len(j)
        np.testing.assert_array_equal(sdf, (p + 1) * 100 + j)  # points and values paired
  assert seen_parts == {0, 1}


def test_part_examples_is_a_function_of_the_rng():
  el = _element()
  kw = dict(stored_near=6, num_points=5, num_near=3, num_volume=2, parts_per_element=2)
  a = vae_batches.part_examples(el, np.random.default_rng(3), **kw)
  b = vae_batches.part_examples(el, np.random.default_rng(3), **kw)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])


def test_part_examples_bad_input_names_the_record():
  kw = dict(stored_near=6, num_points=5, num_near=3, num_volume=2)
  with pytest.raises(ValueError, match="record 9: element has no real part"):
    vae_batches.part_examples(_element(n_real=0, index=9), np.random.default_rng(0), **kw)
  with pytest.raises(ValueError, match="record 5: asks 4 volume points"):
    vae_batches.part_examples(_element(), np.random.default_rng(0), **{**kw, "num_volume": 4})
  with pytest.raises(ValueError, match="stored_near=9"):
    vae_batches.part_examples(_element(), np.random.default_rng(0), **{**kw, "stored_near": 9})


def test_records_dataset_on_real_shards(data_dir):
  assert vae_batches.stored_near_count(data_dir) == 48
  stored = [
      records.decode_record(r) for p in records.shard_paths(data_dir) for r in records.read_shard(p)
  ]
  ds = vae_batches.vae_records_dataset(
      data_dir,
      batch_size=4,
      num_points=32,
      num_near=24,
      num_volume=8,
      parts_per_element=2,
      n_max=4,
      seed=1,
      process_index=0,
      process_count=1,
  )
  for bi in range(3):
    batch = ds[bi]
    assert batch["surface_points"].shape == (4, 32, 3) and batch["volume_sdf"].shape == (4, 8)
    assert batch["near_points"].shape == (4, 24, 3) and batch["index"].shape == (4,)
    for e in range(4):
      rec = stored[int(batch["index"][e])]
      # the example is one stored part: its surface points and both SDF blocks
      hits = [
          p
          for p in range(rec["meta"]["num_parts"])
          if np.isin(batch["surface_points"][e][:, 0], rec["surface_points"][p][:, 0]).all()
      ]
      assert len(hits) == 1
      part_q, part_v = rec["sdf_points"][hits[0]], rec["sdf_values"][hits[0]]
      for kind, lo, hi in (("near", 0, 48), ("volume", 48, 64)):
        for x, d in zip(batch[f"{kind}_points"][e], batch[f"{kind}_sdf"][e]):
          j = np.flatnonzero((part_q == x).all(-1))
          assert j.size and lo <= j[0] < hi and part_v[j[0]] == d


def _records_ds(data_dir, **overrides):
  """A small `vae_records_dataset` of one process (2 examples per batch)."""
  args = dict(batch_size=2, num_points=16, num_near=8, num_volume=4, n_max=4, seed=0,
              process_index=0, process_count=1)
  args.update(overrides)
  return vae_batches.vae_records_dataset(data_dir, **args)


def test_records_iterator_state_round_trip(data_dir):
  def ds():
    return _records_ds(data_dir)

  it = loader.make_iterator(ds())
  next(it)
  state = it.get_state()
  want = [next(it) for _ in range(2)]
  it2 = loader.make_iterator(ds())
  it2.set_state(state)
  for w in want:
    got = next(it2)
    for key in w:
      np.testing.assert_array_equal(got[key], w[key])
  with pytest.raises(ValueError, match="multiple of parts_per_element"):
    vae_batches.vae_records_dataset(
        data_dir,
        batch_size=3,
        num_points=16,
        num_near=8,
        num_volume=4,
        parts_per_element=2,
        stored_near=48,
    )


# ----------------------------------------------------------------------------------------
# Analytic source: in-process and grain worker processes give the same batches
# ----------------------------------------------------------------------------------------


def _analytic_data_config():
  from experiments.configs import vae as vae_configs

  d = vae_configs.get_config("tiny").data
  d.num_points, d.num_near, d.num_volume = 64, 32, 16
  return d


def _assert_same_batch(got, want):
  assert sorted(got) == sorted(want)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.parametrize("kind", primitives.KINDS + ("part",))
def test_example_from_shape_is_exact_surface_and_sdf(kind):
  rng = np.random.default_rng(3)
  if kind == "part":
    shape = primitives.Part(
        (
            primitives.Box(half_extents=(0.4, 0.1, 0.1)),
            primitives.Sphere(radius=0.2, translation=np.array([0.4, 0, 0])),
        )
    )
  else:
    shape = primitives.random_primitive(rng, kinds=(kind,))
  ex = vae_batches.example_from_shape(shape, rng, 256, 128, 64)
  assert {k: v.shape for k, v in ex.items()} == {
      "surface_points": (256, 3),
      "surface_normals": (256, 3),
      "near_points": (128, 3),
      "near_sdf": (128,),
      "volume_points": (64, 3),
      "volume_sdf": (64,),
  }
  assert all(v.dtype == np.float32 for v in ex.values())
  d, g = shape.sdf_grad(ex["surface_points"])
  assert np.abs(d).max() < 1e-6
  np.testing.assert_allclose(ex["surface_normals"], g, atol=1e-5)
  np.testing.assert_allclose(ex["near_sdf"], shape.sdf(ex["near_points"]), atol=1e-6)
  np.testing.assert_allclose(ex["volume_sdf"], shape.sdf(ex["volume_points"]), atol=1e-6)
  assert np.abs(ex["volume_points"]).max() <= 1.0


def test_analytic_batch_is_a_function_of_seed_and_index():
  d = _analytic_data_config()
  spec = vae_batches.analytic_spec(d)
  a = vae_batches.analytic_batch(spec, 3, 5, 11)
  _assert_same_batch(vae_batches.analytic_batch(spec, 3, 5, 11), a)
  assert a["surface_points"].shape == (3, 64, 3) and a["near_sdf"].shape == (3, 32)
  np.testing.assert_array_equal(a["index"], [11, 11, 11])
  assert not np.array_equal(
      vae_batches.analytic_batch(spec, 3, 5, 12)["near_points"], a["near_points"]
  )
  assert not np.array_equal(
      vae_batches.analytic_batch(spec, 3, 6, 11)["near_points"], a["near_points"]
  )
  ds = vae_batches.analytic_dataset(d, 3, 5, start=9)
  _assert_same_batch(ds[2], a)  # element j of a dataset started at 9 is batch 9 + j
  with pytest.raises(ValueError, match="num_workers must be >= 0, got -1"):
    vae_batches.AnalyticShapeSource(d, 3, 5, num_workers=-1)


def test_analytic_workers_give_the_in_process_batches_and_resume_exactly():
  d = _analytic_data_config()
  ref = vae_batches.AnalyticShapeSource(d, 2, 3)
  want = [next(ref) for _ in range(9)]
  src = vae_batches.AnalyticShapeSource(d, 2, 3, num_workers=2)
  try:
    for i in range(5):  # batch 0 in process, 1.. from the two workers, interleaved
      _assert_same_batch(next(src), want[i])
    assert src._workers is not None  # the workers did run
    assert src.get_state() == {"position": 5} == {"position": ref.position - 4}
    src.set_state({"position": 7})  # a resume: the same batches as a straight run
    assert src._workers is None
    for i in (7, 8):
      _assert_same_batch(next(src), want[i])
  finally:
    src.close()
  resumed = vae_batches.AnalyticShapeSource(d, 2, 3)  # and across worker counts
  resumed.set_state({"position": 4})
  _assert_same_batch(next(resumed), want[4])


# ----------------------------------------------------------------------------------------
# Mixed source: records rows then analytic rows, both states resumed
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "batch, fraction, ppe, want",
    [(64, 0.5, 4, (32, 32)), (64, 0.25, 4, (48, 16)), (10, 0.3, 1, (7, 3)), (8, 0.5, 3, (3, 5)),
     (4, 0.01, 1, (3, 1)), (4, 0.99, 1, (1, 3))],
)
def test_mixed_split_rounds_to_whole_examples_and_records_multiples(batch, fraction, ppe, want):
  assert vae_batches.mixed_split(batch, fraction, ppe) == want
  records, analytic = want
  assert records % ppe == 0 and records > 0 and analytic > 0


def test_mixed_split_refuses_single_source_fractions_and_impossible_batches():
  for fraction in (0.0, 1.0, -0.1, 1.5):
    with pytest.raises(ValueError, match="analytic_fraction must be in \\(0, 1\\)"):
      vae_batches.mixed_split(8, fraction)
  with pytest.raises(ValueError, match="cannot hold both sources"):
    vae_batches.mixed_split(4, 0.5, parts_per_element=4)


def test_mixed_source_concatenates_both_sources_and_resumes_exactly(data_dir):
  d = _analytic_data_config()

  def records_ds():
    return _records_ds(data_dir, num_points=64, num_near=32, num_volume=16)

  def source():
    return vae_batches.MixedSource(
        loader.make_iterator(records_ds()), vae_batches.AnalyticShapeSource(d, 3, 7)
    )

  want_records = [records_ds()[i] for i in range(4)]
  want_analytic = [vae_batches.analytic_batch(vae_batches.analytic_spec(d), 3, 7, i) for i in range(4)]
  mixed = source()
  batches = [next(mixed) for _ in range(2)]
  state = mixed.get_state()
  batches += [next(mixed) for _ in range(2)]
  for b, r, a in zip(batches, want_records, want_analytic):
    assert sorted(b) == sorted(vae_batches.EXAMPLE_KEYS + ("index",))
    for key in b:
      assert b[key].shape[0] == 5
      np.testing.assert_array_equal(b[key][:2], r[key], err_msg=key)  # records rows first
      np.testing.assert_array_equal(b[key][2:], a[key], err_msg=key)  # then analytic rows
  assert state["analytic"] == {"position": 2}
  resumed = source()
  resumed.set_state(state)
  for b in batches[2:]:
    _assert_same_batch(next(resumed), b)
  resumed.close()
  with pytest.raises(ValueError, match="mixed data state.*another config.data.source"):
    resumed.set_state({"position": 3})  # an 'analytic' run's state


def test_records_dataset_refuses_a_shard_set_whose_items_were_all_skipped(tmp_path):
  """2026-12-02: a GPU build without the 'rtree' module skipped every item; training then
  died on a bare StopIteration. Now the error names the folder and a skipped item's reason."""
  manifest = {
      "kind": "samples", "count": 0, "num_shards": 1, "shards": [], "complete": True,
      "config": {"sample": {"n_near": 48}},
      "skipped": [{"input": "procedural/small/object/000001", "reason": "ModuleNotFoundError"}],
  }
  (tmp_path / "manifest.json").write_text(__import__("json").dumps(manifest))
  with pytest.raises(ValueError, match="holds no records \\(1 items skipped.*000001: Module"):
    vae_batches.vae_records_dataset(
        str(tmp_path), batch_size=2, num_points=8, num_near=4, num_volume=4
    )
