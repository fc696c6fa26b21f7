"""moca_jax.evaluation without a model: ground truth vs perturbed meshes; the CLI."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import trimesh
from PIL import Image

from moca_jax import evaluation as E
from moca_jax import metrics as M

FAST = E.MetricSettings(num_samples=3000, voxel_resolution=32)


def _item(kind="object", n=3, seed=0):
  rng = np.random.default_rng(seed)
  parts = []
  for i in range(n):
    b = trimesh.creation.box(extents=rng.uniform(0.3, 0.8, 3))
    b.apply_translation((1.2 * i, 0, 0))
    parts.append(b)
  image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
  masks = np.zeros((n, 32, 32), bool) if kind == "scene" else None
  return E.EvalItem(name=f"{kind}{seed}", kind=kind, gt_parts=parts, image=image, masks=masks)


@pytest.mark.parametrize("kind", ["object", "scene"])
def test_ground_truth_scores_perfect_and_noise_degrades(kind):
  items = [_item(kind, seed=s) for s in range(2)]
  exact = E.evaluate_items(items, E.perturbed_gt_predict_fn(0.0), FAST, progress=False)
  cd_key = "cd" if kind == "object" else "cd_scene"
  f_key = "fscore@0.1" if kind == "object" else "fscore_scene@0.1"
  assert exact["mean"][cd_key] == 0.0 and exact["mean"][f_key] == 1.0
  assert exact["mean"]["self_iou"] == 0.0 and exact["mean"]["count"] == 2.0
  cds = [
      E.evaluate_items(items, E.perturbed_gt_predict_fn(s), FAST, progress=False)["mean"][cd_key]
      for s in (0.01, 0.05)
  ]
  assert 0.0 < cds[0] < cds[1]


def test_scene_dropped_instance_penalised_at_object_level():
  item = _item("scene", n=4)
  r = E.evaluate_items([item], E.perturbed_gt_predict_fn(0.0, drop_last=True), FAST, progress=False)
  np.testing.assert_allclose(r["rows"][0]["cd_obj"], M.EMPTY_CHAMFER / 4, rtol=1e-9)
  assert r["rows"][0]["fscore_obj@0.1"] == pytest.approx(0.75)


def test_failing_prediction_is_skipped_and_reported():
  def predict(item):
    if item.name == "object1":
      raise RuntimeError("boom")
    return item.gt_parts

  r = E.evaluate_items([_item(seed=0), _item(seed=1)], predict, FAST, progress=False)
  assert [row["name"] for row in r["rows"]] == ["object0"]
  assert r["skipped"][0]["name"] == "object1" and "boom" in r["skipped"][0]["reason"]


class _FakePipeline:
  """Duck-typed moca_jax.pipeline.Pipeline: returns the item's parts it was given."""

  scene = True  # a scene model: scene items pass their instance masks

  def __init__(self, parts):
    self.parts, self.calls = parts, []

  def __call__(
      self,
      images,
      num_components,
      masks=None,
      *,
      steps=None,
      cfg_scale=None,
      method=None,
      seed=0,
      force=False,
      kind=None,
      cfg_interval=None,
      time_shift=None,
  ):
    import types

    self.calls.append(
        dict(
            images=images,
            n=num_components,
            masks=masks,
            steps=steps,
            cfg=cfg_scale,
            seed=seed,
            force=force,
            kind=kind,
            cfg_interval=cfg_interval,
            time_shift=time_shift,
        )
    )
    b, g, h, n = 1, 1, 2, num_components
    routing = {
        "importances": np.zeros((b, g, h, n, n)),
        "selections": np.zeros((b, g, h, n, 1), np.int32),
    }
    return types.SimpleNamespace(
        meshes=[self.parts[:num_components]], routing=routing, latents=None
    )


@pytest.mark.parametrize("kind", ["object", "scene"])
def test_pipeline_predict_fn_calls_the_pipeline(kind):
  item = _item(kind, n=3)
  if kind == "scene":
    item.masks[0, :4] = item.masks[1, 4:8] = item.masks[2, 8:12] = True
  fake = _FakePipeline(item.gt_parts)
  seen = []
  predict = E.pipeline_predict_fn(
      None,
      steps=7,
      cfg=2.0,
      seed=5,
      pipe=fake,
      on_result=lambda it, res: seen.append((it.name, res)),
      cfg_interval=(0.8, 1.0),
      time_shift=3.0,
  )
  r = E.evaluate_items([item], predict, FAST, progress=False)
  (call,) = fake.calls
  assert call["images"].shape == (1, 32, 32, 3) and call["images"].dtype == np.uint8
  assert (call["n"], call["steps"], call["cfg"], call["seed"]) == (3, 7, 2.0, 5)
  assert call["cfg_interval"] == (0.8, 1.0)  # passed through to the pipeline
  assert call["time_shift"] == 3.0
  assert call["force"]  # the protocol's ground-truth count, even above the trained maximum
  assert call["kind"] == kind  # picks the default CFG scale of its kind when cfg is None
  if kind == "scene":
    ids = call["masks"][0]
    assert call["masks"].shape == (1, 32, 32) and set(np.unique(ids)) == {0, 1, 2, 3}
    assert np.all(ids[:4] == 1) and np.all(ids[8:12] == 3) and np.all(ids[12:] == 0)
  else:
    assert call["masks"] is None
  assert r["rows"][0].get("cd", r["rows"][0].get("cd_scene")) == 0.0
  assert r["routing"]["importances"].shape == (1, 1, 2, 3, 3)
  assert [name for name, _ in seen] == [item.name]


def test_tables_have_the_paper_columns():
  t1 = E.table1_markdown(
      {"ours": {"self_iou": 0.01, "cd": 0.1, "fscore@0.1": 0.9, "fscore@0.05": 0.7, "count": 3.0}}
  )
  lines = t1.strip().splitlines()
  assert "Self-IoU" in lines[0] and "Fscore-0.05" in lines[0]
  assert lines[2].startswith("| ours | 0.0100 | 0.1000 | 0.9000 | 0.7000 | 3 |")
  assert all(l.count("|") == lines[0].count("|") for l in lines)
  t2 = E.table2_markdown({"ours": {"self_iou": 0.0, "cd_scene": 0.2, "count": 1.0}})
  lines = t2.strip().splitlines()
  assert "CD-Scene" in lines[0] and "Fscore-Obj" in lines[0]
  assert "| ours | 0.0000 | 0.2000 | - | - | - | 1 |" == lines[2]
  assert all(l.count("|") == lines[0].count("|") for l in lines)


def test_write_report_outputs(tmp_path):
  items = [_item("scene", seed=0)]
  r = E.evaluate_items(items, E.perturbed_gt_predict_fn(0.02), FAST, progress=False)
  b, g, h, n, k = 1, 2, 4, 3, 1
  r["routing"] = {
      "importances": np.random.default_rng(0).random((b, g, h, n, n)),
      "selections": np.zeros((b, g, h, n, k), np.int32) + 1,
  }
  written = E.write_report(str(tmp_path), r, "scene", meta={"note": "test"})
  doc = json.load(open(written["json"]))
  assert doc["mean"]["count"] == 1.0 and doc["rows"][0]["name"] == "scene0"
  assert doc["meta"]["note"] == "test" and "cores" in doc["meta"]["machine"]
  assert "CD-Scene" in open(written["markdown"]).read()
  for key in ("grid", "router"):
    with Image.open(written[key]) as im:
      assert im.format == "PNG"
  assert os.listdir(written["tensorboard"])


def test_router_slice_layouts():
  a = np.arange(2 * 3 * 4 * 5 * 5).reshape(2, 3, 4, 5, 5)
  np.testing.assert_array_equal(E._router_slice(a, 1, 2, -1), a[1, 2])
  np.testing.assert_array_equal(E._router_slice(a[None], 1, 2, 0), a[1, 2])
  with pytest.raises(ValueError):
    E._router_slice(a[0, 0, 0, 0], 0, 0, 0)


def test_items_from_glb_dir(tmp_path):
  a, b = trimesh.creation.box(), trimesh.creation.icosphere(radius=0.4)
  b.apply_translation((1, 0, 0))
  trimesh.Scene([a, b]).export(str(tmp_path / "two.glb"))
  trimesh.Scene([a]).export(str(tmp_path / "one.glb"))
  Image.fromarray(np.full((20, 20, 3), 7, np.uint8)).save(tmp_path / "one.png")
  (tmp_path / "bad.glb").write_bytes(b"not a glb")
  skipped = []
  items = list(E.items_from_glb_dir(str(tmp_path), image_size=48, skipped=skipped))
  assert [i.name for i in items] == ["one.glb", "two.glb"]
  assert len(items[1].gt_parts) == 2
  assert items[0].image.shape == (20, 20, 3) and np.all(items[0].image == 7)  # given render
  assert items[1].image.shape == (48, 48, 3)  # rendered here
  assert skipped and skipped[0]["name"] == "bad.glb"
  with pytest.raises(FileNotFoundError):
    list(E.items_from_glb_dir(str(tmp_path / "missing")))


def test_procedural_split_items():
  items = list(E.items_from_split("test_tiny", "scene", limit=1, image_size=48))
  (it,) = items
  assert it.kind == "scene" and it.image.shape == (48, 48, 3)
  assert it.masks.shape == (len(it.gt_parts), 48, 48) and it.masks.any()
  az, el = it.view  # scene cameras are isometric: elevation atan(1/sqrt(2))
  assert abs(el - 35.264) < 0.01 and abs((az - 45.0) % 90.0) < 1e-6
  # --items: chosen positions in the given order, each with its category; a position past
  # the end is refused before anything is generated
  first_two = list(E.items_from_split("test_tiny", "object", limit=2, image_size=32))
  picked = list(E.items_from_split("test_tiny", "object", image_size=32, indices=[1, 0]))
  assert [i.name for i in picked] == [first_two[1].name, first_two[0].name]
  assert all(isinstance(i.category, str) and i.category for i in picked)
  with pytest.raises(ValueError, match="item index 999 is outside split 'test_tiny'"):
    E.items_from_split("test_tiny", "object", indices=[0, 999])


def test_benchmark_nn_rows_agree():
  rows = E.benchmark_nn(sizes=(300,), repeats=1)
  assert {r["backend"] for r in rows} == set(M.NN_BACKENDS)
  assert all(r["max_abs_diff"] < 1e-4 and r["median_s"] > 0 for r in rows)


def test_cli_perturbed_run(tmp_path):
  out = tmp_path / "eval"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  res = subprocess.run(
      [
          sys.executable,
          "-m",
          "experiments.evaluate",
          "--split=test_tiny",
          "--kind=object",
          "--limit=1",
          "--perturb=0.01",
          "--num_samples=2000",
          "--voxel_resolution=32",
          "--image_size=48",
          f"--out_dir={out}",
      ],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert res.returncode == 0, res.stderr[-2000:]
  doc = json.load(open(out / "metrics.json"))
  assert doc["mean"]["count"] == 1.0 and 0 < doc["mean"]["cd"] < 0.1
  assert (out / "grid.png").exists() and (out / "table.md").exists()


def test_vae_reconstruction_decodes_each_parts_posterior_mean(monkeypatch):
  """--reconstruct: one mesh per ground-truth part in its order, an empty part left empty;
  the latents decoded are the encoder's posterior means of each part's surface samples
  (what data_pipeline.encode_latents makes for training), the same with bucket padding."""
  import types

  import jax
  from flax.linen import meta

  from data_pipeline import encode_latents, sampling
  from moca_jax import vae

  model = vae.VecSetVAE(vae.vae_config("tiny"))
  params = meta.unbox(vae.init_vae(model, jax.random.PRNGKey(0)))
  item = _item(n=3)
  item.gt_parts.insert(1, trimesh.Trimesh())
  samples, decoded = [], []
  real_sampler = sampling.surface_with_edges

  def recording_sampler(*args, **kwargs):
    samples.append(real_sampler(*args, **kwargs))
    return samples[-1]

  def decode(latents):
    decoded.append(np.asarray(latents))
    return [[trimesh.creation.icosphere(subdivisions=1) for _ in range(latents.shape[1])]]

  monkeypatch.setattr(sampling, "surface_with_edges", recording_sampler)
  for buckets in ((), (8,)):
    pipe = types.SimpleNamespace(vae_model=model, vae_params=params,
                                 component_buckets=buckets, decode=decode)
    meshes = E.vae_reconstruction_predict_fn(pipe, seed=3)(item)
    assert len(meshes) == 4 and M.is_empty(meshes[1])
    assert not any(M.is_empty(meshes[i]) for i in (0, 2, 3))
  c = model.config
  assert decoded[0].shape == (1, 3, c.num_latents, c.latent_channels)
  assert all(s[0].shape == (c.num_points, 3) for s in samples)
  np.testing.assert_allclose(decoded[1], decoded[0], atol=1e-5)  # padding changes nothing
  encode = encode_latents.vae_encode_fn(model, params)
  reference = encode(np.stack([s[0] for s in samples[:3]]), np.stack([s[1] for s in samples[:3]]))
  np.testing.assert_allclose(decoded[0][0], reference, atol=1e-5)


# ----------------------------------------------------------------------------- Ablations

from experiments import ablations as A  # noqa: E402


def _dit_train_config(steps=1):
  from experiments.configs import dit as dc

  c = dc.get_config("tiny")
  c.data.source = "synthetic"
  c.num_steps = steps
  c.batch_size = 8  # divisible by the 8 simulated test devices
  c.log_every = 1
  c.checkpoint.every = steps
  c.checkpoint.async_save = False
  return c


def test_variant_configs_change_exactly_one_switch():
  from moca_jax.dit import DiTSpec

  base = _dit_train_config()
  base_dit = base.model.dit.to_dict()
  for name, v in A.VARIANTS.items():
    cfg = A.variant_config(base, name)
    DiTSpec.from_config(cfg.model.dit)  # every variant is a valid DiT config
    diff = {k for k, x in cfg.model.dit.to_dict().items() if base_dit[k] != x}
    assert diff == set(v["dit"]), name
    rest = {k: x for k, x in cfg.to_dict().items() if k != "model"}
    assert rest == {k: x for k, x in base.to_dict().items() if k != "model"}, name
  assert base.model.dit.to_dict() == base_dit  # the base is not modified
  with pytest.raises(ValueError, match="variant"):
    A.variant_config(base, "Z")


def test_run_ablations_table_failures_and_resume(tmp_path):
  base = _dit_train_config()
  calls = []

  def train_fn(cfg, workdir):
    calls.append(os.path.basename(workdir))
    if cfg.model.dit.gate_on == "values":
      raise RuntimeError("diverged")
    return {"loss": 1.0 + len(calls), "nested": {"eval_loss_ema": 0.5}}

  def eval_fn(cfg, workdir):
    return {"cd": 0.1, "fscore@0.1": 0.9, "fscore@0.05": 0.7, "self_iou": 0.01}

  out = A.run_ablations(base, str(tmp_path), list(A.DEFAULT_ORDER), train_fn, eval_fn)
  assert calls == list(A.DEFAULT_ORDER)
  table = (tmp_path / "table3.md").read_text()
  lines = [l for l in table.splitlines() if l.startswith("| ")]
  assert len(lines) == 1 + len(A.DEFAULT_ORDER)
  assert "Load balance" in lines[0] and "eval_loss_ema" in lines[0].replace("nested/", "")
  row_c = next(l for l in lines if l.startswith("| C:"))
  assert "failed: RuntimeError: diverged" in row_c
  row_a = next(l for l in lines if l.startswith("| A:"))
  assert row_a.split("|")[2].strip() == "✗" and "0.1000" in row_a
  doc = json.load(open(tmp_path / "ablations.json"))
  assert doc["results"]["G"]["train"]["loss"] > 0 and doc["results"]["C"]["error"]
  # Resume: finished variants are reused, the failed one is retried.
  calls.clear()
  A.run_ablations(base, str(tmp_path), list(A.DEFAULT_ORDER), train_fn, eval_fn)
  assert calls == ["C"]

  # An evaluation failure keeps the training result and only re-evaluates later.
  def bad_eval(cfg, workdir):
    raise FileNotFoundError("no VAE")

  calls.clear()
  out = A.run_ablations(base, str(tmp_path / "b"), ["G"], train_fn, bad_eval)
  assert out["results"]["G"]["eval_error"] and "eval failed" in out["table"]
  A.run_ablations(base, str(tmp_path / "b"), ["G"], train_fn, eval_fn)
  assert calls == ["G"]  # trained once


def test_train_and_export_now_evaluate_later(tmp_path):
  """The study split over two machines: a run without an eval_fn trains and exports each
  variant (done once exported); a later run with one only evaluates, from the bundle."""
  base = _dit_train_config()
  trained, exported, evaluated = [], [], []

  def train_fn(cfg, workdir):
    trained.append(os.path.basename(workdir))
    return {"loss": 1.0}

  def export_fn(cfg, vdir):
    exported.append(os.path.basename(vdir))
    if cfg.model.dit.gate_on == "values":
      raise OSError("disk full")
    os.makedirs(os.path.join(vdir, A.BUNDLE_DIR))
    open(os.path.join(vdir, A.BUNDLE_DIR, "bundle.json"), "w").write("{}")

  def eval_fn(cfg, workdir):
    evaluated.append((os.path.basename(workdir), A.exported_bundle(workdir)))
    return {"cd": 0.1, "fscore@0.1": 0.9, "fscore@0.05": 0.7, "self_iou": 0.01}

  out = A.run_ablations(base, str(tmp_path), ["G", "C"], train_fn, None, export_fn=export_fn)
  assert trained == exported == ["G", "C"] and not evaluated
  g, c = out["results"]["G"], out["results"]["C"]
  assert g["eval"] is None and g["bundle"] == str(tmp_path / "G" / "bundle")
  assert c["export_error"] == "OSError: disk full" and c["bundle"] is None
  assert (tmp_path / "G" / "ablation_result.json").exists()
  assert not (tmp_path / "C" / "ablation_result.json").exists()  # retried next time
  assert A.reuse_result(str(tmp_path), "G") is not None
  assert A.reuse_result(str(tmp_path), "G", need_eval=True) is None
  # Without an eval_fn a re-run reuses G and only retries C's export (no training).
  trained.clear(), exported.clear()
  A.run_ablations(base, str(tmp_path), ["G", "C"], train_fn, None, export_fn=export_fn)
  assert trained == [] and exported == ["C"]
  # Evaluation later (another machine): nothing is trained; G reads its bundle.
  out = A.run_ablations(base, str(tmp_path), ["G"], train_fn, eval_fn)
  assert trained == [] and evaluated == [("G", str(tmp_path / "G" / "bundle"))]
  assert out["results"]["G"]["eval"]["cd"] == 0.1
  assert A.reuse_result(str(tmp_path), "G", need_eval=True, need_bundle=True) is not None
  shutil.rmtree(tmp_path / "G" / "bundle")
  assert A.reuse_result(str(tmp_path), "G", need_bundle=True) is None


@pytest.mark.slow
def test_ablations_train_tiny_on_cpu(tmp_path):
  """Real training (moca_jax.dit_task) of a variant at tiny size (2 DiT blocks, one of them
  global, and a 1-layer encoder: half the compilation), one step.

  One variant keeps the test near a minute of CPU; the plumbing of all eight is covered by
  the two tests above, and `python -m experiments.ablations` runs them all.
  """
  import jax
  from moca_jax import sharding

  base = _dit_train_config(steps=1)
  base.batch_size = 2
  base.model.dit.num_blocks, base.model.encoder.depth = 2, 1
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  out = A.run_ablations(
      base,
      str(tmp_path),
      ["A"],
      train_fn=A.make_train_fn(show_progress=False, eval_batches=1, mesh=mesh),
  )
  for v in ("A",):
    r = out["results"][v]
    assert r["error"] is None, r["error"]
    assert np.isfinite(r["train"]["final_train_loss"])
    assert np.isfinite(r["train"]["eval_loss_ema"])
  assert "eval_loss_ema" in (tmp_path / "table3.md").read_text()


def test_cli_renders_inputs_at_the_models_size_by_default(monkeypatch, tmp_path):
  """--image_size=0 (the default): items are rendered at the checkpoint's image-encoder
  input size (its training renders' size), recorded in the report's meta; an explicit size
  wins; --perturb (no model) falls back to 224; a negative size is refused. With no
  --checkpoint_dir the bundled model is used."""
  import types

  from experiments import evaluate as cli_eval
  from moca_jax import pipeline

  class FakePipe:
    image_size = 40

    def sample_settings(self, kind, **kw):
      return {"steps": kw.get("steps") or 3, "cfg_scale": kw.get("cfg_scale") or 2.0,
              "method": "euler", "time_shift": kw.get("time_shift") or 1.0,
              "cfg_interval": None}

  seen = {}
  monkeypatch.setattr(pipeline, "load_pipeline", lambda path: FakePipe())
  monkeypatch.setattr(E, "items_from_split",
                      lambda split, kind, limit, size: seen.update(size=size) or [])
  monkeypatch.setattr(E, "pipeline_predict_fn", lambda *a, **k: None)
  monkeypatch.setattr(E, "perturbed_gt_predict_fn", lambda *a, **k: None)
  monkeypatch.setattr(E, "evaluate_items", lambda *a, **k: {"rows": [], "skipped": []})
  monkeypatch.setattr(E, "write_report",
                      lambda out, result, kind, method, meta: seen.update(meta=meta) or {})
  flags = dict(benchmark_nn=False, split="val", glb_dir=None, kind="object", limit=1, image_size=0,
               perturb=None, reconstruct=False, items=None, checkpoint_dir="some/model",
               component_buckets=None, steps=None,
               cfg=None, cfg_interval=None, time_shift=None, num_components=None, seed=0,
               method="m",
               num_samples=100, voxel_resolution=8, nn_backend="kdtree", object_frame="instance",
               grid_rows=1, out_dir="unused")
  cli_eval.run(types.SimpleNamespace(**flags))
  assert seen["size"] == 40 and seen["meta"]["image_size"] == 40
  assert seen["meta"]["time_shift"] == 1.0  # the checkpoint's (here the uniform grid)
  cli_eval.run(types.SimpleNamespace(**dict(flags, time_shift=3.0)))
  assert seen["meta"]["time_shift"] == 3.0
  cli_eval.run(types.SimpleNamespace(**dict(flags, image_size=56)))
  assert seen["size"] == 56 and seen["meta"]["image_size"] == 56
  # no --checkpoint_dir: the bundled model (here a stand-in folder), recorded in the meta
  stand_in = tmp_path / "bundled"
  stand_in.mkdir()
  (stand_in / "bundle.json").write_text("{}")
  monkeypatch.setattr(pipeline, "DEFAULT_BUNDLE", str(stand_in))
  monkeypatch.setattr(cli_eval.bundle, "weights_sha256", lambda path: "f" * 64)
  cli_eval.run(types.SimpleNamespace(**dict(flags, checkpoint_dir=None)))
  assert seen["meta"]["checkpoint"] == str(stand_in)
  monkeypatch.setattr(pipeline, "DEFAULT_BUNDLE", str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match="no --checkpoint_dir given and the bundled"):
    cli_eval.run(types.SimpleNamespace(**dict(flags, checkpoint_dir=None)))
  cli_eval.run(types.SimpleNamespace(**dict(flags, perturb=0.01, checkpoint_dir=None)))
  assert seen["size"] == 224
  with pytest.raises(ValueError, match="image_size must be >= 0"):
    cli_eval.run(types.SimpleNamespace(**dict(flags, image_size=-1)))
  # --reconstruct: the checkpoint's VAE alone, at the model's size, recorded in the meta
  monkeypatch.setattr(E, "vae_reconstruction_predict_fn", lambda *a, **k: None)
  cli_eval.run(types.SimpleNamespace(**dict(flags, reconstruct=True)))
  assert seen["size"] == 40 and seen["meta"]["reconstruct"] is True
  with pytest.raises(ValueError, match="at most one of --reconstruct or --perturb"):
    cli_eval.run(types.SimpleNamespace(**dict(flags, reconstruct=True, perturb=0.01)))
  # sampler flags where no DiT runs are refused, not silently ignored
  with pytest.raises(ValueError, match="--reconstruct runs no DiT: --cfg, --time_shift would"):
    cli_eval.run(types.SimpleNamespace(**dict(flags, reconstruct=True, cfg=3.0, time_shift=2.0)))
  with pytest.raises(ValueError, match="--perturb runs no DiT: --steps would be ignored"):
    cli_eval.run(types.SimpleNamespace(**dict(flags, perturb=0.01, steps=5)))
  # a bad --items is refused before the model loads
  monkeypatch.setattr(pipeline, "load_pipeline", lambda path: pytest.fail("model loaded"))
  with pytest.raises(ValueError, match="expected item positions"):
    cli_eval.run(types.SimpleNamespace(**dict(flags, items=["a"])))
  with pytest.raises(ValueError, match="positions start at 0"):
    cli_eval.run(types.SimpleNamespace(**dict(flags, items=["3", "-1"])))
  with pytest.raises(ValueError, match="selects items of a --split"):
    cli_eval.run(types.SimpleNamespace(**dict(flags, split=None, glb_dir="g", items=["1"])))
