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


def release_compiled_code(keep_traces: bool = True) -> None:
  """Drops every in-memory compiled executable (and collects garbage).

  Each XLA:CPU executable keeps memory mappings for its code. A process that compiles
  thousands of functions (a test suite, a study running many cells with different
  masks) passes the kernel's per-process limit (vm.max_map_count, 65530 by default)
  and the next compile crashes it. Call this between independent units of work; the
  persistent cache makes the recompiles cheap.

  Args:
    keep_traces: keep JAX's traces (jaxprs) of the jitted functions, dropping only
      their lowered modules and executables. A later call with the same shapes and
      structure (the next attack's training step on another model of the same
      architecture) then skips Python tracing, which was most of a study stage's
      first minutes (docs/performance.md), and reads the executable from the
      persistent cache (for the 270M LoRA step a slow read on XLA:CPU, about twice
      a cold compile; docs/performance.md). Traces hold no executables and no device buffers
      passed as arguments. False (or a JAX without these caches) clears every cache
      (`jax.clear_caches()`).
  """
  import gc  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top

  if not keep_traces or not _drop_executables_only():
    jax.clear_caches()
  gc.collect()


def _drop_executables_only() -> bool:
  """Clears the caches holding executables (not traces); False if JAX has none such."""
  # The caches `jax.clear_caches()` clears, minus the trace cache: lowered
  # computations (which keep the executable compiled from them), compiled
  # executables, and the C++ dispatch caches of every jitted function. Private to
  # JAX, hence the fallback; the pinned version has them.
  try:
    from jax._src import pjit  # pylint: disable=g-import-not-at-top
    from jax._src.interpreters import pxla  # pylint: disable=g-import-not-at-top
    from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top

    caches = (
        pjit._pjit_lower.cache_clear,
        pxla.clear_in_memory_compilation_cache,
        pjit._cpp_pjit_cache_fun_only.clear,
        pjit._cpp_pjit_cache_explicit_attributes.clear,
        _jax.PjitFunctionCache.clear_all,
    )
  except (ImportError, AttributeError):
    return False
  for clear in caches:
    clear()
  return True
