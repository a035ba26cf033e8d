"""Every config file loads, converts to a typed spec, and bad keys are named."""

import importlib
import pathlib

import pytest

from mech_unlearn_jax import experiment

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
EXPERIMENT_CONFIGS = sorted(
    p.stem for p in CONFIG_DIR.glob("*.py")
    if p.stem not in ("__init__", "common") and "get_config" in p.read_text()
)


@pytest.mark.parametrize("name", EXPERIMENT_CONFIGS)
def test_config_loads(name):
  module = importlib.import_module(f"configs.{name}")
  for arg in (None, "tiny"):
    config = module.get_config(arg)
    assert config is not None
    if "edit" in config:  # experiment configs (localize_* configs have their own spec)
      spec = experiment.ExperimentSpec.from_dict(config.to_dict())
      assert spec.model == ("tiny-gemma3" if arg == "tiny" else "default")


@pytest.mark.parametrize("method", ["ap", "ct", "ap_mlps", "ct_mlps", "random", "random_mlps", "all_mlps", "nonlocalized"])
def test_every_method_config(method):
  module = importlib.import_module("configs.sports_first16")
  spec = experiment.ExperimentSpec.from_dict(module.get_config(f"{method},tiny").to_dict())
  assert spec.localize.method == method


def test_bad_config_is_named():
  module = importlib.import_module("configs.sports_first16")
  d = module.get_config().to_dict()
  d["edit"]["learning_rate"] = 1e-3
  with pytest.raises(ValueError, match=r"config\.edit\.learning_rate"):
    experiment.ExperimentSpec.from_dict(d)
  d = module.get_config().to_dict()
  d["localize"]["method"] = "magic"
  with pytest.raises(ValueError, match=r"config\.localize\.method"):
    experiment.ExperimentSpec.from_dict(d)
  with pytest.raises(ValueError, match="tiny"):
    module.get_config("nonsense")
