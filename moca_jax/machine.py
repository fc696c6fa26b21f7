"""One line naming the host, for benchmark and evaluation reports."""

import os
import platform


def describe_host() -> str:
  """CPU model, cores available to this process, OS and Python, e.g.
  'Intel(R) Xeon(R) Processor, 2 cores available, Linux 6.1, Python 3.11.7'."""
  cpu = platform.processor() or "unknown cpu"
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return (
      f"{cpu}, {cores} cores available, {platform.system()} {platform.release()}, "
      f"Python {platform.python_version()}"
  )
