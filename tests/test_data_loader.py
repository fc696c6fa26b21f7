"""grain loaders: shapes, padding and masks, deterministic shuffling, process covers, state."""
import numpy as np
import pytest

from data_pipeline import loader, records


@pytest.fixture(scope="module")
def data_dir(tiny_shards):
  return tiny_shards(num_shards=2, num_views=2)


@pytest.fixture(scope="module")
def stored(data_dir):
  """index in the ArrayRecordDataSource order -> decoded record."""
  recs = [records.decode_record(r) for p in records.shard_paths(data_dir)
          for r in records.read_shard(p)]
  return dict(enumerate(recs))


def _ds(data_dir, **kw):
  args = dict(batch_size=3, n_max=8, seed=0, process_index=0, process_count=1)
  args.update(kw)
  return loader.vae_dataset(data_dir, **args)


def test_shapes_padding_and_mask(data_dir, stored):
  ds = _ds(data_dir, n_surface=32, n_query=40, num_epochs=1)
  for batch in ds:
    assert batch["surface_points"].shape == (3, 8, 32, 3)
    assert batch["surface_normals"].shape == (3, 8, 32, 3)
    assert batch["sdf_points"].shape == (3, 8, 40, 3) and batch["sdf_values"].shape == (3, 8, 40)
    assert batch["image"].shape == (3, 32, 32, 3) and batch["mask"].shape == (3, 32, 32)
    for b in range(3):
      rec = stored[int(batch["index"][b])]
      n = min(rec["meta"]["num_parts"], 8)
      m = batch["component_mask"][b]
      assert m.sum() == n == batch["num_components"][b] and np.all(m[:n])
      assert np.all(batch["surface_points"][b, n:] == 0) and np.all(batch["sdf_values"][b, n:] == 0)
      # each real slot holds one distinct stored part, with points and values still paired
      order = []
      for j in range(n):
        pts = batch["surface_points"][b, j]
        hit = [i for i in range(rec["meta"]["num_parts"])
               if np.isin(pts[:, 0], rec["surface_points"][i][:, 0]).all()]
        assert len(hit) == 1
        order.append(hit[0])
        q = batch["sdf_points"][b, j]
        k = np.array([np.flatnonzero((rec["sdf_points"][hit[0]] == x).all(-1))[0] for x in q])
        np.testing.assert_array_equal(batch["sdf_values"][b, j], rec["sdf_values"][hit[0]][k])
      assert len(set(order)) == n
      # the mask is a stored view's ids, renumbered to the new slot order
      remap = np.zeros(256, np.uint8)
      remap[np.array(order) + 1] = np.arange(1, n + 1)
      assert any(np.array_equal(batch["mask"][b], remap[v]) and
                 np.array_equal(batch["image"][b], img)
                 for v, img in zip(rec["masks"], rec["images"]))


def test_component_order_is_random(data_dir):
  firsts = set()
  for seed in range(4):
    batch = next(iter(_ds(data_dir, seed=seed, shuffle=False, n_max=32)))
    firsts.add(batch["surface_points"][0, 0, 0, 0].item())
  assert len(firsts) > 1


def test_shuffle_is_deterministic_by_seed(data_dir):
  def order(seed):
    return [int(i) for b in _ds(data_dir, seed=seed, num_epochs=1, batch_size=1)
            for i in b["index"]]
  a, b, c = order(0), order(0), order(1)
  assert a == b and a != c and sorted(a) == sorted(c) == list(range(len(a)))
  # a second epoch is reshuffled
  two = [int(i) for x in _ds(data_dir, seed=0, num_epochs=2, batch_size=1) for i in x["index"]]
  assert two[: len(a)] == a and two[len(a):] != a and sorted(two[len(a):]) == sorted(a)


def test_two_processes_read_disjoint_covers(data_dir, stored):
  seen = []
  for p in range(2):
    ds = _ds(data_dir, process_index=p, process_count=2, num_epochs=1, batch_size=1)
    seen.append([int(b["index"][0]) for b in ds])
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == sorted(stored)


def _assert_same(got, want):
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_resume_with_another_worker_count_and_from_grain_states(data_dir):
  """The state is a position: a run saved with 2 worker processes resumes with none or 3
  (another machine's cores) on the batches a straight run sees; states grain wrote in older
  checkpoints (one per worker, or a single next_index) resume at the same place."""
  ds = _ds(data_dir, n_surface=16, n_query=8)
  straight = [ds[i] for i in range(6)]
  it = loader.make_iterator(ds, prefetch_workers=2)
  for want in straight[:3]:
    _assert_same(next(it), want)
  state = it.get_state()
  it.close()
  assert state == {"position": 3}
  for workers in (0, 3):
    resumed = loader.make_iterator(_ds(data_dir, n_surface=16, n_query=8), workers)
    resumed.set_state(state)
    for want in straight[3:5]:
      _assert_same(next(resumed), want)
    resumed.close()
  grain_it = loader._grain_iterator(ds, 2, 2, 0)  # how earlier versions iterated
  for _ in range(3):
    next(grain_it)
  old_state = grain_it.get_state()
  grain_it.close()
  assert "iterators_in_use_states" in old_state
  for state in (old_state, {"next_index": 3}):
    resumed = loader.make_iterator(ds)
    resumed.set_state(state)
    _assert_same(next(resumed), straight[3])
  with pytest.raises(ValueError, match="not a data-iterator state"):
    loader.make_iterator(ds).set_state({"cursor": 3})
  finite = _ds(data_dir, n_surface=16, n_query=8, num_epochs=1)
  with pytest.raises(ValueError, match=f"position {len(finite) + 1} is outside this dataset"):
    loader.make_iterator(finite).set_state({"position": len(finite) + 1})


def test_iterator_state_round_trip(data_dir):
  ds = _ds(data_dir)
  it = loader.make_iterator(ds)
  for _ in range(2):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  it2 = loader.make_iterator(_ds(data_dir))
  it2.set_state(state)
  for want in expected:
    got = next(it2)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_instance_conditions():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 255, size=(5, 6, 3)).astype(np.uint8)
  mask = rng.integers(0, 4, size=(5, 6)).astype(np.uint8)
  c = loader.instance_conditions(image, mask, 4)
  assert c.shape == (4, 5, 6, 7) and c.dtype == np.uint8
  for j in range(4):
    m = mask == j + 1
    np.testing.assert_array_equal(c[j, ..., :3][m], image[m])
    assert np.all(c[j, ..., :3][~m] == 255)
    np.testing.assert_array_equal(c[j, ..., 3:6], image)
    np.testing.assert_array_equal(c[j, ..., 6], m * 255)


def test_latent_view_padding(tmp_path):
  rng = np.random.default_rng(1)
  for k, n in enumerate((3, 5)):
    arrays = dict(latents=rng.normal(size=(n, 4, 2)).astype(np.float32),
                  part_bounds=np.zeros((n, 2, 3), np.float32),
                  images=np.zeros((1, 8, 8, 3), np.uint8), masks=np.zeros((1, 8, 8), np.uint8))
    records.write_shard(str(tmp_path / f"shard-{k:05d}-of-00002.array_record"),
                        [records.encode_record(arrays, {"num_parts": n, "type": "object"})])
    open(tmp_path / f"shard-{k:05d}-of-00002.json", "w").write("{}")
  ds = loader.latent_dataset(str(tmp_path), batch_size=2, n_max=4, shuffle=False,
                             process_index=0, process_count=1, num_epochs=1)
  (batch,) = list(ds)
  assert batch["latents"].shape == (2, 4, 4, 2)
  np.testing.assert_array_equal(batch["num_components"], [3, 4])  # 5 parts cut to n_max=4
  np.testing.assert_array_equal(batch["component_mask"].sum(1), [3, 4])
  assert np.all(batch["latents"][0, 3] == 0)


def test_missing_data_dir_raises(tmp_path):
  with pytest.raises(FileNotFoundError, match="no finished shards"):
    loader.vae_dataset(str(tmp_path), batch_size=1, process_index=0, process_count=1)


def _latent_shards(path, sizes_per_shard, seed=0):
  """Latent records (random latents, images, masks) in shards under `path`; part counts
  from `sizes_per_shard` (a list per shard)."""
  rng = np.random.default_rng(seed)
  k = len(sizes_per_shard)
  for s, sizes in enumerate(sizes_per_shard):
    recs = []
    for n in sizes:
      arrays = dict(latents=rng.normal(size=(n, 4, 2)).astype(np.float32),
                    part_bounds=rng.normal(size=(n, 2, 3)).astype(np.float32),
                    images=rng.integers(0, 256, size=(2, 8, 8, 3)).astype(np.uint8),
                    masks=rng.integers(0, n + 1, size=(2, 8, 8)).astype(np.uint8))
      recs.append(records.encode_record(arrays, {"num_parts": n, "type": "object"}))
    records.write_shard(str(path / f"shard-{s:05d}-of-{k:05d}.array_record"), recs)
    open(path / f"shard-{s:05d}-of-{k:05d}.json", "w").write("{}")
  return str(path)


def test_comma_separated_folders_read_as_one_dataset(tmp_path):
  """data.dir "a,b": the records of a then b, numbered across both (two builds of a split
  with different generator seeds trained on together)."""
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  a = _latent_shards(tmp_path / "a", [[3, 5], [2]])
  b = _latent_shards(tmp_path / "b", [[4, 1]], seed=1)
  assert records.dataset_shard_paths(f"{a}, {b}") == records.shard_paths(a) + records.shard_paths(b)
  kw = dict(batch_size=0, n_max=8, shuffle=False, num_epochs=1, process_index=0, process_count=1)
  both = list(loader.latent_dataset(f"{a},{b}", **kw))
  stored = [records.decode_record(r) for p in records.dataset_shard_paths(f"{a},{b}")
            for r in records.read_shard(p)]
  assert [int(x["num_components"]) for x in both] == [3, 5, 2, 4, 1]
  assert [int(x["index"]) for x in both] == [0, 1, 2, 3, 4]
  for x, rec in zip(both, stored):  # the same parts, in the loader's random order
    got = x["latents"][x["component_mask"]].reshape(len(rec["latents"]), -1)
    want = rec["latents"].reshape(len(rec["latents"]), -1)
    np.testing.assert_array_equal(got[np.lexsort(got.T)], want[np.lexsort(want.T)])
  with pytest.raises(FileNotFoundError, match="missing"):
    loader.latent_dataset(f"{a},{tmp_path / 'missing'}", **kw)
  with pytest.raises(ValueError, match="no dataset folder"):
    records.dataset_dirs(" , ")


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.mark.parametrize("process_count", [1, 2])
def test_in_memory_records_give_the_same_batches(tmp_path, process_count):
  d = _latent_shards(tmp_path, [[3, 5, 1, 6], [2, 4, 7]])
  for seed in (0, 3):
    for p in range(process_count):
      kw = dict(batch_size=2, n_max=4, seed=seed, num_epochs=3, process_index=p,
                process_count=process_count)
      decoded = list(loader.latent_dataset(d, **kw))
      cached = list(loader.latent_dataset(d, in_memory=True, **kw))
      assert len(decoded) >= 3  # epochs of 7 records: reshuffled, cut to n_max = 4 parts
      _assert_same_batches(decoded, cached)


def test_in_memory_records_index_like_the_array_record_source(tmp_path):
  d = _latent_shards(tmp_path, [[3, 5], [2, 4, 1]])
  mem = loader.InMemoryRecords(records.shard_paths(d), num_threads=3)
  stored = [records.decode_record(r) for p in records.shard_paths(d) for r in records.read_shard(p)]
  assert len(mem) == 5 and "5 records" in repr(mem)
  for i, rec in enumerate(stored):
    assert int(mem[i]["index"]) == i and mem[i]["meta"] == rec["meta"]
    np.testing.assert_array_equal(mem[i]["latents"], rec["latents"])


def test_in_memory_outputs_do_not_alias_the_cache(tmp_path):
  d = _latent_shards(tmp_path, [[3, 2]])
  ds = loader.latent_dataset(d, batch_size=0, n_max=4, shuffle=False, num_epochs=1,
                             process_index=0, process_count=1, in_memory=True)
  first = ds[0]
  want = {k: np.array(v) for k, v in first.items()}
  for v in first.values():
    if isinstance(v, np.ndarray) and v.ndim:
      v[...] = 0  # a consumer writing into what it was given
  again = ds[0]
  for k in want:
    np.testing.assert_array_equal(again[k], want[k], err_msg=k)


def test_threaded_iterator_resumes_in_the_other_feed(tmp_path):
  """A state saved reading cached records with threads restores into the decoding feed (and
  the batches are the same), so data.in_memory / read_threads may change on resume."""
  d = _latent_shards(tmp_path, [[3, 5, 1, 6], [2, 4, 7]])
  kw = dict(batch_size=2, n_max=4, seed=1, process_index=0, process_count=1)
  it = loader.make_iterator(loader.latent_dataset(d, in_memory=True, **kw), read_threads=2)
  for _ in range(4):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(5)]
  it2 = loader.make_iterator(loader.latent_dataset(d, **kw))
  it2.set_state(state)
  _assert_same_batches(expected, [next(it2) for _ in range(5)])
  with pytest.raises(ValueError, match="read_threads"):
    loader.make_iterator(loader.latent_dataset(d, **kw), read_threads=-1)


@pytest.mark.parametrize("read_threads", [0, 3])
def test_iterator_reads_a_bounded_number_of_elements_ahead(read_threads):
  """The elements are whole batches, so the iterator may make only a few ahead (grain's own
  default makes 500 in background threads, decoding for minutes and holding gigabytes)."""
  import threading
  import time

  import grain

  made, lock = [], threading.Lock()

  def make(i):
    with lock:
      made.append(int(i))
    return np.full((2,), i)

  it = loader.make_iterator(grain.MapDataset.range(1000).map(make), read_threads=read_threads)
  first = [int(next(it)[0]) for _ in range(3)]
  time.sleep(0.5)  # let the read-ahead run as far as it is allowed to
  threads = read_threads or loader.DEFAULT_READ_THREADS
  assert first == [0, 1, 2]
  assert 3 < len(made) <= 3 + 2 * threads + threads  # buffer + one element in flight per thread
