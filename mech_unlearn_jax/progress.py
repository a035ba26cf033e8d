"""What a user sees while a run works: progress bars and one line per finished stage.

Bars (tqdm, on stderr) show counts and an ETA for every loop that takes more than a
few seconds: the knowledge scan, localization, evaluations, edit and attack steps.
`stage_line` prints one line per stage with its wall time. Set the environment
variable MECH_UNLEARN_JAX_PROGRESS=0 (or pass `enabled=False`) to silence bars, e.g.
in logs of batch jobs.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm import auto as tqdm_auto


def enabled() -> bool:
  return os.environ.get("MECH_UNLEARN_JAX_PROGRESS", "1") not in ("0", "false", "")


def bar(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "", unit: str = "it"):
  """A tqdm bar (disabled when progress output is off)."""
  # In a log file (no terminal) redraws every 0.1 s would flood it; refresh rarely.
  interval = 0.1 if sys.stderr.isatty() else 30.0
  return tqdm_auto.tqdm(
      iterable, total=total, desc=desc, unit=unit, leave=False, disable=not enabled(),
      dynamic_ncols=True, file=sys.stderr, mininterval=interval,
  )


def stage_line(name: str, seconds: float, detail: str = "") -> None:
  """One line per finished (or reused) stage: name, wall time, what it produced."""
  if enabled():
    text = f"[mech_unlearn_jax] {name:<22s} {seconds:8.1f} s"
    print(f"{text}  {detail}" if detail else text, file=sys.stderr, flush=True)


def peak_rss_bytes() -> int:
  """This process's peak resident set size so far, in bytes.

  On Linux this is VmHWM from /proc/self/status: the high-water mark of this address
  space. Not ru_maxrss, because Linux carries ru_maxrss over fork and exec, so a process
  started by a big parent (a test runner, a study driver) would report the parent's peak.
  Elsewhere ru_maxrss (bytes on macOS).
  """
  try:
    with open("/proc/self/status") as status:
      for line in status:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return rss if sys.platform == "darwin" else rss * 1024


@contextlib.contextmanager
def stage(name: str, timings: dict[str, float] | None = None) -> Iterator[dict[str, Any]]:
  """Times a block; yields a dict whose "detail" key ends up on the stage line.

  A stage during which the process's peak resident memory rose says so on its line,
  so the stage that sets a run's peak memory is visible without a profiler.
  """
  info: dict[str, Any] = {"detail": ""}
  start, peak_before = time.time(), peak_rss_bytes()
  yield info
  seconds = time.time() - start
  if timings is not None:
    timings[name] = seconds
  detail, peak = info["detail"], peak_rss_bytes()
  if peak > peak_before:
    detail = f"{detail}  [peak RSS {peak / 2**30:.2f} GiB]".strip()
  stage_line(name, seconds, detail)
