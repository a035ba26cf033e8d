"""Atomic file writes and the one JSON coercer every output of the library goes through.

A killed run must never leave half a file that a rerun would trust, so every result,
table, figure, mask and cache entry is written to a temporary file in the target's
folder, flushed and fsynced, given the permissions a plain `open()` would give it,
and renamed over the target (`os.replace` is atomic on POSIX filesystems). Orbax does
the same for checkpoints.
"""

from __future__ import annotations

import dataclasses
import io as _io
import json
import math
import os
import pathlib
import tempfile
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np


def _file_mode() -> int:
  """The mode `open(path, "w")` would create a file with under the current umask."""
  umask = os.umask(0)
  os.umask(umask)
  return 0o666 & ~umask


def write_bytes(path: str | os.PathLike, data: bytes) -> pathlib.Path:
  """Writes `data` to `path` atomically (temp file + fsync + rename); returns the path."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    # mkstemp creates files 0600; every output gets the same, ordinary mode.
    os.chmod(tmp, _file_mode())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return path


def write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
  """Atomic UTF-8 text write."""
  return write_bytes(path, text.encode("utf-8"))


def to_jsonable(x: Any) -> Any:
  """Plain JSON types from numpy scalars/arrays, tuples, dataclasses and mappings.

  Non-finite floats become None: JSON has no NaN, and a reader must not mistake a
  missing value for a number.
  """
  if dataclasses.is_dataclass(x) and not isinstance(x, type):
    return to_jsonable(dataclasses.asdict(x))
  if isinstance(x, Mapping):
    return {str(k): to_jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [to_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return to_jsonable(x.tolist())
  if isinstance(x, (np.bool_, bool)):
    return bool(x)
  if isinstance(x, (np.integer, int)):
    return int(x)
  if isinstance(x, (np.floating, float)):
    x = float(x)
    return x if math.isfinite(x) else None
  if x is None or isinstance(x, str):
    return x
  if hasattr(x, "tolist"):  # jax arrays
    return to_jsonable(np.asarray(x))
  raise TypeError(f"not JSON serializable: {type(x).__name__}")


def dumps(data: Any) -> str:
  """The library's JSON text: coerced, indented, stable key order as given."""
  return json.dumps(to_jsonable(data), indent=1, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike, data: Any) -> pathlib.Path:
  """Atomic JSON write of `to_jsonable(data)`."""
  return write_text(path, dumps(data))


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
  """Reads a JSON output of the library; a damaged file gets an error naming it.

  Args:
    path: the file.
    what: what the file is, for the message (e.g. "knowledge-stage output").
  """
  path = pathlib.Path(path)
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(
        f"{path}: {what} is not valid JSON ({e}); it is damaged or truncated: remove it"
        " and rerun to recompute it"
    ) from None


def write_npz(path: str | os.PathLike, arrays: Mapping[str, Any]) -> pathlib.Path:
  """Atomic `np.savez` of named arrays."""
  buf = _io.BytesIO()
  np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
  return write_bytes(path, buf.getvalue())


def read_npz(path: str | os.PathLike, what: str = "file") -> dict[str, np.ndarray]:
  """Loads every array of an npz (no pickles); a damaged file gets an error naming it."""
  path = pathlib.Path(path)
  try:
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(
        f"{path}: {what} cannot be read ({e}); it is damaged or truncated: remove it and"
        " rerun to recompute it"
    ) from None


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 120) -> pathlib.Path:
  """Atomic PNG of a matplotlib figure (closed afterwards)."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  buf = _io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
  plt.close(fig)
  return write_bytes(path, buf.getvalue())


def pyplot():
  """matplotlib.pyplot for figures that are only saved to files.

  Without a display, matplotlib picks the file-only Agg backend by itself; a backend
  the user chose (a notebook's inline one) is left alone, so figures the user draws
  after a library call still show.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top

  if not os.environ.get("DISPLAY") and "inline" not in matplotlib.get_backend() and not os.environ.get("MPLBACKEND"):
    matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt
