"""JAX's persistent compilation cache, on for every launcher.

Compiling the 270M model's forward, AP, CT and train-step functions takes tens of
seconds on a CPU; with the cache a second run of the same shapes reads the compiled
executables from disk instead. The cache lives under the user's cache directory
(`$MECH_UNLEARN_JAX_CACHE/mech_unlearn_jax/jax_compilation`, default `~/.cache`);
set MECH_UNLEARN_JAX_COMPILATION_CACHE=0 to turn it off.
"""

from __future__ import annotations

import os
import pathlib


def default_dir() -> pathlib.Path:
  root = pathlib.Path(os.environ.get("MECH_UNLEARN_JAX_CACHE", pathlib.Path.home() / ".cache"))
  return root / "mech_unlearn_jax" / "jax_compilation"


def enable(directory: str | os.PathLike | None = None) -> pathlib.Path | None:
  """Turns the persistent cache on (returns its folder), unless disabled by the env."""
  from mech_unlearn_jax import progress  # pylint: disable=g-import-not-at-top

  if not progress.env_switch("MECH_UNLEARN_JAX_COMPILATION_CACHE", True):
    return None
  import jax  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(directory) if directory else default_dir()
  path.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  # Cache everything that took a noticeable time to compile.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


def release_compiled_code() -> None:
  """Drops every cached compiled executable (and collects garbage).

  Each XLA:CPU executable keeps memory mappings for its code. A process that compiles
  thousands of functions (a test suite, a study running many cells with different
  masks) passes the kernel's per-process limit (vm.max_map_count, 65530 by default)
  and the next compile crashes it. Call this between independent units of work; the
  persistent cache makes the recompiles cheap.
  """
  import gc  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top

  jax.clear_caches()
  gc.collect()
