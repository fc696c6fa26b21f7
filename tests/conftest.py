"""Test setup: CPU only, 8 simulated devices for the sharding tests (set before jax imports).

`--xla_backend_optimization_level=0` skips LLVM's heavier optimisation passes on CPU: the
tests compile many small programs and run each a few times, so compilation dominates and
this halves the suite's time (tests/test_dit.py: 79 s -> 42 s on 2 cores). Numerics are
unchanged in kind (same ops, fp32); the suite's tolerances hold with it.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()
