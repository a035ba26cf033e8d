"""Shared pytest fixtures: paths to reference data and the default model."""
import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
REFERENCE_DATA = pathlib.Path(
    os.environ.get("MECH_UNLEARN_REFERENCE_DATA", REPO_ROOT.parent / "shared" / "data" / "reference")
)


@pytest.fixture(scope="session")
def reference_data_dir() -> pathlib.Path:
  if not REFERENCE_DATA.exists():
    pytest.skip(f"reference data not found at {REFERENCE_DATA}")
  return REFERENCE_DATA
