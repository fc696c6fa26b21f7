"""Test setup: CPU only, 8 simulated devices for the sharding tests (set before jax imports).

`--xla_backend_optimization_level=0` skips LLVM's heavier optimisation passes on CPU: the
tests compile many small programs and run each a few times, so compilation dominates and
this halves the suite's time (tests/test_dit.py: 79 s -> 42 s on 2 cores). Numerics are
unchanged in kind (same ops, fp32); the suite's tolerances hold with it.

A persistent XLA compilation cache (a temporary folder for the session, one subfolder per
xdist worker, removed at the end) lets a test that compiles a program another test already
compiled load the executable instead (e.g. test_multi_device's resumed runs: 17 s -> 7 s
each). Keyed by JAX on the program, devices, compile options and XLA flags, so a test runs
the same executable it would have compiled. A JAX_COMPILATION_CACHE_DIR of your own wins.
Subprocesses started by tests do not use it (it is set in this process's jax.config only).

Under `-n N` (xdist's default `--dist load`), the tests of each module in ONE_WORKER_MODULES
run on one worker, so its expensive module-scoped fixtures are built once, not once per
worker (`pytest_xdist_make_scheduler` below).
"""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()

import jax  # noqa: E402  (after the environment is set)
import pytest  # noqa: E402


def _session_compilation_cache():
  if jax.config.jax_compilation_cache_dir:  # the user's own cache
    return
  path = os.environ.get("MOCA_TESTS_JAX_CACHE")
  if not path or not os.path.isdir(path):
    path = tempfile.mkdtemp(prefix="moca_tests_jax_cache_")
    os.environ["MOCA_TESTS_JAX_CACHE"] = path  # inherited by xdist workers, started later
    atexit.register(shutil.rmtree, path, ignore_errors=True)
  # one folder per xdist worker: JAX writes entries without a lock (unless `filelock` is
  # installed), so two processes must not share one
  worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
  jax.config.update("jax_compilation_cache_dir", os.path.join(path, worker))


_session_compilation_cache()


# Modules whose tests share expensive module-scoped fixtures (trained runs, bundles,
# imported priors): under xdist each runs on one worker, so the fixtures are built once.
ONE_WORKER_MODULES = (
    "test_bundle.py", "test_demo.py", "test_generate.py", "test_import_weights.py",
    "test_multi_device.py", "test_prior_init.py", "test_train_dit.py", "test_warm_start.py",
)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  """`-n N` with xdist's default `--dist load`: the same, except that the tests of each
  module in ONE_WORKER_MODULES go to one worker as one unit (xdist's `loadgroup` would do
  this from marks, but it does not work with pytest 9: it renames `item._nodeid`, which
  pytest 9 no longer reads). Those units are handed out first (most tests first)."""
  if config.getvalue("dist") != "load":
    return None
  from xdist.scheduler import LoadScopeScheduling  # pylint: disable=g-import-not-at-top

  class ModuleUnits(LoadScopeScheduling):

    def _split_scope(self, nodeid):
      module = nodeid.split("::", 1)[0]
      return module if os.path.basename(module) in ONE_WORKER_MODULES else nodeid

  return ModuleUnits(config, log)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
  """Factory: builds the procedural tiny split into small 'samples' shards, once per setting.

  tiny_shards(num_shards=2, n_near=48, image_size=32, num_views=1) -> directory (str).
  64 surface and 16 volume points per part; no previews.
  """
  from data_pipeline import make, sampling
  built = {}

  def build(num_shards=2, n_near=48, image_size=32, num_views=1):
    key = (num_shards, n_near, image_size, num_views)
    if key not in built:
      cfg = make.BuildConfig(
          sample=sampling.SampleConfig(n_surface=64, n_near=n_near, n_volume=16,
                                       mesh_segments=16),
          image_size=image_size, num_views=num_views, render_segments=12, num_previews=0)
      out = str(tmp_path_factory.mktemp("shards"))
      make.build("procedural:tiny", out, num_shards=num_shards, cfg=cfg, progress=False)
      built[key] = out
    return built[key]

  return build


def _save_untrained_vae(vae_dir, size="tiny", num_latents=None):
  """An untrained VAE workdir saved the way train_vae saves (config size `size`; num_latents
  overrides the config's L)."""
  import jax

  from data_pipeline import vae_batches
  from experiments.configs import vae as vae_configs
  from moca_jax import checkpointing, sharding, train_lib, vae_task

  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  vcfg = vae_configs.get_config(size)
  if num_latents:
    vcfg.model.num_latents = num_latents
  _, init_fn, _ = vae_task.make_task(vcfg)
  batch = vae_task.model_batch(vae_batches.AnalyticShapeSource(vcfg.data, 1, 0).batch(0))
  spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
  state, _ = train_lib.create_train_state(
      init_fn, train_lib.make_optimizer(vcfg.optim), spec, jax.random.PRNGKey(0), mesh
  )
  ckpt = checkpointing.Checkpointer(os.path.join(vae_dir, "checkpoints"))
  ckpt.save(0, state, None, vcfg, force=True)
  ckpt.close()


@pytest.fixture(scope="session")
def save_untrained_vae():
  """Factory: save_untrained_vae(vae_dir, size='tiny', num_latents=None) writes an untrained
  VAE workdir (orbax checkpoint and config, as train_vae writes them)."""
  return _save_untrained_vae
