"""Fingerprints of a run's input files, kept in the workdir as `inputs.json`.

Stages read their outputs back whenever those exist (that is how a killed run
resumes), so an output is only as good as the files it was computed from. A run
records a content fingerprint of every input file the first time it uses a workdir
and compares on every later run; a changed file is refused with a message naming the
input and the remedy, instead of silently reusing outputs of the old file:

  config.model                 the .gguf file or checkpoint directory (for "default":
                               the assembled Gemma 3 270M file; for tiny-* presets:
                               that same file, whose tokenizer they use)
  config.data.sports_source    a sports table (not the embedded one)
  config.data.counterfact_path, config.data.counterfact_mc_path   (task counterfact)
  config.retain.source         a retain-text file
  config.robustness.trivia_path, config.robustness.mc_benchmark   (when enabled)

plus `schema_version`, the version of the stage outputs' layout. `datasets` hub ids
are recorded by name only (their content cannot be checked offline).

A fingerprint is the size and full SHA-256 of the content (of every file, for a
directory), so touching or copying a file does not count as a change. Hashing a
large model file costs about a second per GB, so digests are cached per file
version (path, size, mtime, ctime, inode) in memory and in the user cache
(`$MECH_UNLEARN_JAX_CACHE`, default ~/.cache, under mech_unlearn_jax/fingerprints).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from typing import Any

from mech_unlearn_jax import io

# Bump when a stage output's layout changes, so old workdirs are refused, not misread.
SCHEMA_VERSION = 1
INPUTS_FILE = "inputs.json"
# Files up to this size are hashed every time (cheaper than a cache lookup).
_CACHE_ABOVE_BYTES = 8 << 20
_BLOCK = 1 << 20
_memo: dict[tuple[Any, ...], str] = {}


class InputsChangedError(ValueError):
  """An input file differs from the one the workdir's stage outputs were computed from."""


def _cache_dir() -> pathlib.Path:
  root = os.environ.get("MECH_UNLEARN_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache"))
  return pathlib.Path(root) / "mech_unlearn_jax" / "fingerprints"


def _sha256_file(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(_BLOCK), b""):
      digest.update(block)
  return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
  """SHA-256 of a file's content, cached per file version for large files."""
  path = pathlib.Path(path).resolve()
  stat = path.stat()
  if stat.st_size <= _CACHE_ABOVE_BYTES:
    return _sha256_file(path)
  version = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev)
  if version in _memo:
    return _memo[version]
  entry_path = _cache_dir() / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")
  recorded = list(version[1:])
  try:
    entry = io.read_json(entry_path, "fingerprint cache entry")
    if entry.get("version") == recorded and isinstance(entry.get("sha256"), str):
      _memo[version] = entry["sha256"]
      return entry["sha256"]
  except (OSError, ValueError, AttributeError):
    pass  # absent or damaged: recompute
  digest = _sha256_file(path)
  _memo[version] = digest
  try:
    io.write_json(entry_path, {"path": str(path), "version": recorded, "sha256": digest})
  except OSError:
    pass  # a read-only cache only costs the hash again next time
  return digest


def fingerprint(path: str | os.PathLike) -> dict[str, Any]:
  """{"kind", "size", "sha256"} of a file, or of a directory's files (plus "files")."""
  path = pathlib.Path(path)
  if path.is_file():
    return {"kind": "file", "size": path.stat().st_size, "sha256": file_sha256(path)}
  if path.is_dir():
    digest = hashlib.sha256()
    total = count = 0
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
      rel = file.relative_to(path).as_posix()
      size = file.stat().st_size
      digest.update(f"{rel}\0{size}\0{file_sha256(file)}\n".encode())
      total, count = total + size, count + 1
    return {"kind": "directory", "size": total, "files": count, "sha256": digest.hexdigest()}
  raise FileNotFoundError(f"input not found: {path}")


def _source(key: str, source: str, hub_ok: bool = True) -> tuple[str, dict[str, Any]]:
  path = pathlib.Path(source)
  if path.exists() or not hub_ok:
    return key, {"path": source, **fingerprint(path)}
  return key, {"kind": "hub", "source": source}


def spec_inputs(spec: Any) -> dict[str, dict[str, Any]]:
  """config key -> fingerprint record of every input file of `spec` (see module doc)."""
  from mech_unlearn_jax.data import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  from mech_unlearn_jax.models import loaders  # pylint: disable=g-import-not-at-top

  out: dict[str, dict[str, Any]] = {}
  model = spec.model
  if model in ("default", "gemma3-270m") or model.startswith("tiny-"):
    path = loaders.default_gguf_path()
    record = {"path": str(path), **fingerprint(path)}
    if model.startswith("tiny-"):
      record["role"] = "tokenizer of the random tiny preset"
    out["config.model"] = record
  else:
    out["config.model"] = {"path": model, **fingerprint(model)}
  task = tasks_lib.get_task(spec.data.task)
  data = spec.data
  if isinstance(task, tasks_lib.SportsTask) and data.sports_source != "embedded":
    out.update([_source("config.data.sports_source", data.sports_source)])
  if isinstance(task, tasks_lib.CounterFactTask):
    out.update([_source("config.data.counterfact_path", data.counterfact_path)])
    if data.counterfact_mc_path:
      out.update([_source("config.data.counterfact_mc_path", data.counterfact_mc_path)])
  if spec.retain.source != "sampled":
    out.update([_source("config.retain.source", spec.retain.source)])
  if spec.robustness.trivia:
    out.update([_source("config.robustness.trivia_path", spec.robustness.trivia_path, hub_ok=False)])
  if spec.robustness.mc_benchmark:
    mc = os.path.expanduser(spec.robustness.mc_benchmark)
    out.update([_source("config.robustness.mc_benchmark", mc)])
  return out


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
  # Content only: the default model's path differs between machines, and a moved
  # file with a changed config path is already caught by config.json.
  if a.get("kind") == "hub" or b.get("kind") == "hub":
    return a.get("kind") == b.get("kind") and a.get("source") == b.get("source")
  return all(a.get(k) == b.get(k) for k in ("kind", "size", "sha256"))


def _describe(key: str, old: dict[str, Any], new: dict[str, Any]) -> str:
  where = new.get("path") or new.get("source")
  if old.get("kind") != new.get("kind"):
    return f"{key} ({where}): was a {old.get('kind')}, now a {new.get('kind')}"
  if new.get("kind") == "hub":
    return f"{key}: was {old.get('source')!r}, now {new.get('source')!r}"
  return (
      f"{key} ({where}): size {old.get('size')} -> {new.get('size')} bytes, sha256"
      f" {str(old.get('sha256'))[:12]}... -> {str(new.get('sha256'))[:12]}..."
  )


def check_inputs(spec: Any, workdir: str | os.PathLike, write: bool | None = None) -> dict[str, Any]:
  """Records the inputs' fingerprints in `workdir/inputs.json` or checks them against it.

  Inputs the record does not have yet (e.g. an attack enabled later) are added; a
  recorded input that differs is refused. Nothing is rewritten when nothing is new.

  Args:
    spec: the run's `ExperimentSpec`.
    workdir: the run's workdir.
    write: whether to write the record (default: when the workdir is writable).

  Returns:
    The record now in force ({"schema_version", "inputs"}).

  Raises:
    InputsChangedError: a recorded input changed, or the workdir was written with
      another stage-output schema version.
  """
  workdir = pathlib.Path(workdir)
  path = workdir / INPUTS_FILE
  if write is None:
    write = os.access(workdir if workdir.exists() else workdir.parent, os.W_OK)
  current = spec_inputs(spec)
  remedy = (
      "stage outputs are reused only when their inputs are unchanged: restore the original"
      " input, or start over in a new --workdir (or delete this one)"
  )
  if path.is_file():
    record = io.read_json(path, "input fingerprints")
    version = record.get("schema_version") if isinstance(record, dict) else None
    if version != SCHEMA_VERSION:
      raise InputsChangedError(
          f"{path}: the workdir's outputs have schema version {version}, this library reads"
          f" version {SCHEMA_VERSION}; start over in a new --workdir (or delete this one)"
      )
    recorded = record.get("inputs", {})
    changed = [_describe(k, recorded[k], v) for k, v in current.items() if k in recorded and not _same(recorded[k], v)]
    if changed:
      raise InputsChangedError(
          f"{workdir}: input changed since this workdir's outputs were computed from it:"
          f" {'; '.join(changed)}; {remedy}"
      )
    new = {k: v for k, v in current.items() if k not in recorded}
    if not new:
      return record
    record = {"schema_version": SCHEMA_VERSION, "inputs": {**recorded, **new}}
  else:
    record = {"schema_version": SCHEMA_VERSION, "inputs": current}
  if write:
    io.write_json(path, record)
  return record
