"""Shared pytest fixtures: paths to reference data and the default model."""
import os
import pathlib

import pytest

# Pipeline stages keep their compiled executables: tiny models' executables are small,
# and the suite's many short runs would otherwise recompile at every stage (the release
# itself is tested in test_reliability.py).
os.environ.setdefault("MECH_UNLEARN_JAX_KEEP_COMPILED", "1")
# Nor do they hand freed heap back to the OS after every stage: in a process as full of
# objects as a test session, the garbage collection before it is the slowest part of a
# tiny run (the release itself is tested in test_reliability.py).
os.environ.setdefault("MECH_UNLEARN_JAX_RELEASE_HEAP", "0")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
REFERENCE_DATA = pathlib.Path(
    os.environ.get("MECH_UNLEARN_REFERENCE_DATA", REPO_ROOT.parent / "shared" / "data" / "reference")
)


@pytest.fixture(scope="session")
def reference_data_dir() -> pathlib.Path:
  if not REFERENCE_DATA.exists():
    pytest.skip(f"reference data not found at {REFERENCE_DATA}")
  return REFERENCE_DATA


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
  """Frees compiled executables between test modules once the process is crowded.

  A whole suite in one process would otherwise pass the per-process memory-mapping
  limit (`compile_cache.release_compiled_code`). Until then each module reuses what
  earlier ones traced and compiled for the same tiny models (most of a tiny run is
  tracing and compiling). The tests' monkeypatches replace Python-level orchestration
  only, never a function a jitted one calls; a test that does must call
  `compile_cache.release_compiled_code(keep_traces=False)` itself, or it would run
  another module's trace.
  """
  yield
  from mech_unlearn_jax import compile_cache  # pylint: disable=g-import-not-at-top

  # A quarter of the limit (the threshold the whole suite was run with): a module of
  # tiny models compiles hundreds of functions between two checks.
  if compile_cache.crowded(mappings_fraction=0.25):
    compile_cache.release_compiled_code()
