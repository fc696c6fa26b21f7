"""moca_jax.io: atomic writes leave the old file or the new one, never a part; stale
temporaries of dead writers are removed; JSON reports are numpy-aware."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from moca_jax import io as mio


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
  p = tmp_path / "sub" / "a.bin"
  mio.atomic_write_bytes(p, b"one")
  mio.atomic_write_bytes(p, b"two")
  assert p.read_bytes() == b"two"
  assert os.listdir(p.parent) == ["a.bin"]


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path):
  p = tmp_path / "a.txt"
  mio.atomic_write_text(p, "old")
  with pytest.raises(RuntimeError, match="boom"):
    with mio.atomic_path(p) as tmp:
      with open(tmp, "w") as f:
        f.write("half")
      raise RuntimeError("boom")
  assert p.read_text() == "old"
  assert os.listdir(tmp_path) == ["a.txt"]


def test_stale_temps_of_dead_writers_are_removed(tmp_path):
  # A writer killed mid-write: a child process creates a temp name and dies.
  code = ("import sys; from moca_jax import io; p = io.temp_path_for(sys.argv[1]); "
          "open(p, 'w').write('partial'); print(p)")
  out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "shard.array_record")],
                       check=True, capture_output=True, text=True).stdout.strip()
  assert os.path.exists(out)
  live = mio.temp_path_for(str(tmp_path / "other.bin"))  # this process is alive
  open(live, "w").close()
  (tmp_path / "keep.txt").write_text("x")
  removed = mio.remove_stale_temps(str(tmp_path))
  assert removed == [out]
  assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(live), "keep.txt"])


def test_write_json_numpy_and_machine_line(tmp_path):
  p = tmp_path / "r.json"
  mio.write_json(p, {"a": np.float32(1.5), "b": np.arange(3)}, machine=True)
  d = json.loads(p.read_text())
  assert d["a"] == 1.5 and d["b"] == [0, 1, 2]
  assert "cores available" in d["machine"]
  with pytest.raises(TypeError, match="not JSON serialisable: object"):
    mio.write_json(p, {"x": object()})
  assert json.loads(p.read_text())["a"] == 1.5  # the failed write left the old report


def test_read_json_errors_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.json: no such file"):
    mio.read_json(tmp_path / "missing.json")
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(ValueError, match="bad.json: not valid JSON"):
    mio.read_json(bad)
