"""JAX's persistent compilation cache, on for every launcher.

Compiling the 270M model's forward, AP, CT and train-step functions takes tens of
seconds on a CPU; with the cache a second run of the same shapes reads the compiled
executables from disk instead. The cache lives under the user's cache directory
(`$MECH_UNLEARN_JAX_CACHE/mech_unlearn_jax/jax_compilation`, default `~/.cache`);
set MECH_UNLEARN_JAX_COMPILATION_CACHE=0 to turn it off.

In-memory executables are dropped at stage and cell boundaries (`release_at_boundary`)
under a policy set by MECH_UNLEARN_JAX_KEEP_COMPILED: "0" (the default) at every
boundary, "1" never, "auto" only once the process is crowded (its memory mappings past
half of vm.max_map_count, or its resident memory past half the machine's). For
the 270M model's large steps a read from the persistent cache is slow on XLA:CPU
(docs/performance.md), so a long study keeps what it compiled while it can.
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


# MECH_UNLEARN_JAX_KEEP_COMPILED's values.
KEEP_POLICIES = ("0", "1", "auto")
# "auto" releases past these shares of the mapping limit and of physical memory. In a
# study cell of the 270M model one stage added at most ~4,500 mappings (the edited
# model's evaluation, the LoRA attack) and a whole cell's executables ~25,000
# (docs/performance.md), so half the default limit keeps a cell's code for the next
# cell and leaves room for several more stages before the kernel's limit.
CROWDED_MAPPINGS_FRACTION = 0.5
CROWDED_MEMORY_FRACTION = 0.5


def keep_policy() -> str:
  """MECH_UNLEARN_JAX_KEEP_COMPILED, checked: "0", "1" or "auto" (unset: "0")."""
  value = os.environ.get("MECH_UNLEARN_JAX_KEEP_COMPILED", "0").strip().lower()
  value = {"false": "0", "": "0", "true": "1"}.get(value, value)
  if value not in KEEP_POLICIES:
    raise ValueError(
        f"MECH_UNLEARN_JAX_KEEP_COMPILED={value!r}: expected one of {KEEP_POLICIES}"
        " (0: release compiled code at every stage boundary, 1: never, auto: when crowded)"
    )
  return value


def _mapping_limit() -> int | None:
  try:
    with open("/proc/sys/vm/max_map_count") as f:
      return int(f.read().split()[0])
  except (OSError, ValueError, IndexError):
    return None


def _physical_memory_bytes() -> int | None:
  """The machine's memory, or the container's limit where that is smaller."""
  sizes = []
  try:
    sizes.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
  except (ValueError, OSError, AttributeError):
    pass
  for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
    try:
      with open(path) as f:
        sizes.append(int(f.read().strip()))  # "max" (no limit) fails the int()
    except (OSError, ValueError):
      pass
  return min(sizes) if sizes else None


def memory_mappings() -> int | None:
  """This process's memory mappings (lines of /proc/self/maps); None off Linux."""
  try:
    with open("/proc/self/maps") as f:
      return sum(1 for _ in f)
  except OSError:
    return None


def crowded(mappings_fraction: float | None = None, memory_fraction: float | None = None) -> str:
  """Why this process should drop its executables now ("" if it need not).

  Past `mappings_fraction` of vm.max_map_count or `memory_fraction` of the machine's
  memory (default: CROWDED_MAPPINGS_FRACTION, CROWDED_MEMORY_FRACTION).
  """
  from mech_unlearn_jax import progress  # pylint: disable=g-import-not-at-top

  if mappings_fraction is None:
    mappings_fraction = CROWDED_MAPPINGS_FRACTION
  if memory_fraction is None:
    memory_fraction = CROWDED_MEMORY_FRACTION
  maps, limit = memory_mappings(), _mapping_limit()
  if maps is not None and limit and maps > mappings_fraction * limit:
    return f"{maps} memory mappings of the {limit} allowed"
  rss, total = progress.current_rss_bytes(), _physical_memory_bytes()
  if total and rss > memory_fraction * total:
    return f"resident {rss / 2**30:.1f} GiB of {total / 2**30:.1f} GiB"
  return ""


def release_at_boundary() -> str:
  """Drops in-memory executables at a stage or cell boundary, as the policy says.

  Returns why it released ("" if it did not). Traces are kept either way.
  """
  policy = keep_policy()
  reason = {"0": "policy 0", "1": ""}.get(policy)
  if reason is None:
    reason = crowded()
  if reason:
    release_compiled_code()
  return reason


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
