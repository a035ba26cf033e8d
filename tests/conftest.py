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
  """Frees each test module's compiled executables when it ends (a whole suite in one
  process would otherwise pass the per-process memory-mapping limit; see
  `compile_cache.release_compiled_code`), and its traces: a module that monkeypatches
  what a jitted function calls must not get another module's trace."""
  yield
  from mech_unlearn_jax import compile_cache  # pylint: disable=g-import-not-at-top

  compile_cache.release_compiled_code(keep_traces=False)
