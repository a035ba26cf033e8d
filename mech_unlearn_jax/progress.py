"""What a user sees while a run works: progress bars and one line per finished stage.

Bars (tqdm, on stderr) show counts and an ETA for every loop that takes more than a
few seconds: the knowledge scan, localization, evaluations, edit and attack steps.
`stage_line` prints one line per stage with its wall time, and `timing_log` collects
the same times as data (the study stores them with each cell). Set the environment
variable MECH_UNLEARN_JAX_PROGRESS=0 (or pass `enabled=False`) to silence bars, e.g.
in logs of batch jobs.

Interrupts: a launcher's signal handler raises KeyboardInterrupt at once and also
records the request here (`request_interrupt`), because Python drops an exception
raised inside a garbage-collector callback or a finalizer (it prints "Exception
ignored" and goes on). Stage boundaries, progress-bar updates and training steps call
`raise_if_interrupted`, so a request that was dropped is raised there instead of lost.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import resource
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm import auto as tqdm_auto


def env_switch(name: str, default: bool) -> bool:
  """An on/off environment variable: "0", "false" or empty is off, anything else on."""
  value = os.environ.get(name)
  return default if value is None else value not in ("0", "false", "")


def enabled() -> bool:
  return env_switch("MECH_UNLEARN_JAX_PROGRESS", True)


# Why an interrupt was requested and not yet seen by a stage ("" when none is pending).
_interrupt_request = ""


def request_interrupt(reason: str) -> None:
  """Records an interrupt (a signal handler calls this before raising KeyboardInterrupt)."""
  global _interrupt_request
  _interrupt_request = reason or "interrupt"


def interrupt_requested() -> str:
  """Why an interrupt is pending ("" if none)."""
  return _interrupt_request


def raise_if_interrupted() -> None:
  """Raises the pending interrupt, if a signal's KeyboardInterrupt was dropped on the way."""
  global _interrupt_request
  if _interrupt_request:
    reason, _interrupt_request = _interrupt_request, ""
    raise KeyboardInterrupt(reason)


def _interrupt_delivered(error: BaseException) -> None:
  """A KeyboardInterrupt reached a stage: the pending request is being handled."""
  global _interrupt_request
  if isinstance(error, KeyboardInterrupt):
    _interrupt_request = ""


class _Bar(tqdm_auto.tqdm):
  """tqdm that raises a pending interrupt at every update and every item."""

  def update(self, n=1):
    raise_if_interrupted()
    return super().update(n)

  def __iter__(self):
    for item in super().__iter__():
      raise_if_interrupted()
      yield item


def bar(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "", unit: str = "it"):
  """A tqdm bar (disabled when progress output is off)."""
  # In a log file (no terminal) redraws every 0.1 s would flood it; refresh rarely.
  interval = 0.1 if sys.stderr.isatty() else 30.0
  return _Bar(
      iterable, total=total, desc=desc, unit=unit, leave=False, disable=not enabled(),
      dynamic_ncols=True, file=sys.stderr, mininterval=interval,
  )


def stage_line(name: str, seconds: float, detail: str = "") -> None:
  """One line per finished (or reused) stage: name, wall time, what it produced."""
  if enabled():
    text = f"[mech_unlearn_jax] {name:<22s} {seconds:8.1f} s"
    print(f"{text}  {detail}" if detail else text, file=sys.stderr, flush=True)


def _status_bytes(field: str) -> int | None:
  """A memory field of /proc/self/status ("VmHWM", "VmRSS") in bytes; None off Linux."""
  try:
    with open("/proc/self/status") as status:
      for line in status:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def peak_rss_bytes() -> int:
  """This process's peak resident set size so far, in bytes.

  On Linux this is VmHWM from /proc/self/status: the high-water mark of this address
  space. Not ru_maxrss, because Linux carries ru_maxrss over fork and exec, so a process
  started by a big parent (a test runner, a study driver) would report the parent's peak.
  Elsewhere ru_maxrss (bytes on macOS).
  """
  peak = _status_bytes("VmHWM")
  if peak is not None:
    return peak
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return rss if sys.platform == "darwin" else rss * 1024


def current_rss_bytes() -> int:
  """This process's resident set size now, in bytes (0 where /proc is missing)."""
  return _status_bytes("VmRSS") or 0


def release_free_heap() -> None:
  """Returns freed heap pages to the OS (glibc's malloc_trim), after a garbage collection.

  XLA's compiler and many mid-sized buffers are served from glibc's heap, which keeps
  freed pages resident: without this, what a stage freed (a compilation's scratch
  memory, the previous stage's activations) stays in RSS and adds to the next stage's
  peak. A no-op where the C library has no malloc_trim, or with
  MECH_UNLEARN_JAX_RELEASE_HEAP=0 (a test suite of tiny models: its process holds so
  many objects that each full collection costs about half a second, a third of a tiny
  run's time, to return memory nobody is short of).
  """
  if not env_switch("MECH_UNLEARN_JAX_RELEASE_HEAP", True):
    return
  gc.collect()
  try:
    ctypes.CDLL(None).malloc_trim(0)
  except (OSError, AttributeError):
    pass


# Open `timing_log`s (their entries, start time, and how many stages were open when
# the log began) and the names of the open stages.
_timing_logs: list[tuple[list[dict[str, Any]], float, int]] = []
_open_stages: list[str] = []


@contextlib.contextmanager
def timing_log() -> Iterator[list[dict[str, Any]]]:
  """Collects every stage that starts and finishes inside the block, in start order.

  Each entry is {"stage", "parent" (the enclosing stage's name, or None for a stage
  that no stage inside the block encloses), "depth" (counted from the block), "start"
  (seconds after the block began), "seconds"}, so a run's cost can be read per stage
  after the fact instead of from its log. A stage that raised is left out.
  """
  entries: list[dict[str, Any]] = []
  record = (entries, time.time(), len(_open_stages))
  _timing_logs.append(record)
  try:
    yield entries
  finally:
    _timing_logs.remove(record)


@contextlib.contextmanager
def stage(name: str, *, release_compiled: bool = False) -> Iterator[dict[str, Any]]:
  """Times a block; yields a dict whose "detail" key ends up on the stage line.

  A stage during which the process's peak resident memory rose says so on its line,
  so the stage that sets a run's peak memory is visible without a profiler. Freed
  heap is returned to the OS after every stage (`release_free_heap`), so one stage's
  garbage does not count towards the next one's peak. With `release_compiled`, the
  stage's compiled executables are dropped too (`compile_cache.release_compiled_code`):
  an XLA:CPU executable of the 270M model holds tens of MB, so a run's stages would
  otherwise pile up a GB of code they no longer call; a later stage of the same shapes
  keeps the traces, so it only lowers again and reads the executables back from the
  persistent compilation cache. MECH_UNLEARN_JAX_KEEP_COMPILED=1 keeps them (a test
  suite of tiny models, whose many short stages would recompile), "auto" keeps them
  until the process is crowded (`compile_cache.release_at_boundary`).
  """
  raise_if_interrupted()
  info: dict[str, Any] = {"detail": ""}
  start, peak_before = time.time(), peak_rss_bytes()
  # Each open log gets its entry now, so entries are in start order; "seconds" is
  # filled in when the stage finishes.
  opened = []
  for entries, log_start, outside in _timing_logs:
    depth = len(_open_stages) - outside
    entry = {
        "stage": name, "parent": _open_stages[-1] if depth else None, "depth": depth,
        "start": round(start - log_start, 2),
    }
    entries.append(entry)
    opened.append((entries, entry))
  _open_stages.append(name)
  try:
    yield info
  except BaseException as error:
    _interrupt_delivered(error)
    for entries, entry in opened:
      entries.remove(entry)
    raise
  finally:
    _open_stages.pop()
  seconds = time.time() - start
  for _, entry in opened:
    entry["seconds"] = round(seconds, 2)
  detail, peak = info["detail"], peak_rss_bytes()
  if peak > peak_before:
    detail = f"{detail}  [peak RSS {peak / 2**30:.2f} GiB]".strip()
  stage_line(name, seconds, detail)
  from mech_unlearn_jax import compile_cache  # pylint: disable=g-import-not-at-top

  released = compile_cache.release_at_boundary() if release_compiled else ""
  release_free_heap()
  if opened:
    # What the next stage starts from: resident memory and memory mappings after the
    # release (and why it released), so a timing record shows what kept code costs.
    after = {
        "rss_gib": round(current_rss_bytes() / 2**30, 3), "maps": compile_cache.memory_mappings(),
        "released": released,
    }
    for _, entry in opened:
      entry.update(after)
  raise_if_interrupted()  # a request dropped during this stage ends the run here
