"""Every config file loads into the one schema; the schema and configs/common.py agree."""

import dataclasses
import importlib
import pathlib
import subprocess
import sys

import pytest

from configs import common
from mech_unlearn_jax import experiment
from mech_unlearn_jax.localize.select import METHODS

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
EXPERIMENT_CONFIGS = sorted(
    p.stem for p in CONFIG_DIR.glob("*.py")
    if p.stem not in ("__init__", "common") and "get_config" in p.read_text()
)


# Configs of other schemas (tested with their runners in test_study.py, test_plant.py).
OTHER_SCHEMAS = ("study_sports", "plant_sports")


@pytest.mark.parametrize("name", EXPERIMENT_CONFIGS)
def test_config_loads(name):
  module = importlib.import_module(f"configs.{name}")
  for arg in (None, "tiny"):
    config = module.get_config(arg)
    if name in OTHER_SCHEMAS:
      assert config is not None
      continue
    spec = experiment.ExperimentSpec.from_dict(config.to_dict())
    assert spec.model == ("tiny-gemma3" if arg == "tiny" else "default")


@pytest.mark.parametrize("method", METHODS)
def test_every_method_config(method):
  module = importlib.import_module("configs.sports_first16")
  spec = experiment.ExperimentSpec.from_dict(module.get_config(f"{method},tiny").to_dict())
  assert spec.localize.method == method


def test_budgets_and_method_families():
  from configs import common
  from mech_unlearn_jax.localize import select

  module = importlib.import_module("configs.sports_first16")
  # The default is the reference's budget (METHOD §3), spelled out or not.
  for arg in ("nonlocalized", "nonlocalized,reference_budget"):
    spec = experiment.ExperimentSpec.from_dict(module.get_config(arg).to_dict())
    assert (spec.localize.method, spec.edit.steps, spec.edit.num_microbatches) == ("nonlocalized", 50, 4)
    assert spec.edit.forget_batch_size == spec.edit.maintain_batch_size == spec.edit.retain_batch_size == 64
  spec = experiment.ExperimentSpec.from_dict(module.get_config("ap,short_budget").to_dict())
  assert (spec.edit.steps, spec.edit.forget_batch_size, spec.edit.retain_batch_size) == (30, 16, 16)
  # Every budget has values for every tuning family, and each method gets its family's.
  assert set(common.TUNED_EDIT) == {"reference", "short"}
  for budget, values in common.TUNED_EDIT.items():
    assert set(values) == set(select.METHOD_FAMILIES), budget
    for method in METHODS:
      arg = method if budget == "reference" else f"{method},short_budget"
      edit = experiment.ExperimentSpec.from_dict(module.get_config(arg).to_dict()).edit
      tuned = values[select.FAMILY_OF[method]]
      assert (edit.lr, edit.forget_coef) == (tuned["lr"], tuned["forget_coef"]), (budget, method)
  with pytest.raises(ValueError, match="short_budget"):
    module.get_config("ap,fact_lookup")
  with pytest.raises(ValueError, match="exclude each other"):
    module.get_config("ap,short_budget,reference_budget")
  assert {select.FAMILY_OF[m] for m in ("fact_lookup", "ap", "nonlocalized")} == set(select.METHOD_FAMILIES)


@pytest.mark.parametrize("config_name", ["sports_first16", "counterfact_16"])
def test_each_method_gets_its_familys_tuned_edit_values_unless_overridden(config_name):
  from configs import common
  from mech_unlearn_jax.localize import select

  module = importlib.import_module(f"configs.{config_name}")
  for method in METHODS:
    edit = experiment.ExperimentSpec.from_dict(module.get_config(method).to_dict()).edit
    tuned = common.TUNED_EDIT["reference"][select.FAMILY_OF[method]]
    assert (edit.lr, edit.forget_coef) == (tuned["lr"], tuned["forget_coef"]), method
  config = module.get_config("ap")
  config.edit.lr = 2e-5  # what --config.edit.lr=2e-5 does
  assert experiment.ExperimentSpec.from_dict(config.to_dict()).edit.lr == 2e-5


def _leaves(d, prefix=""):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _leaves(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


def test_common_config_is_the_schema():
  """configs/common.py holds exactly the spec's fields and defaults (no drift), but for
  the edit values tuned per method family."""
  from_common = experiment.ExperimentSpec.from_dict(common.base_config().to_dict())
  spec = experiment.ExperimentSpec()
  tuned = dataclasses.replace(spec.edit, **common.TUNED_EDIT["reference"]["fact_lookup"])
  assert from_common == dataclasses.replace(spec, edit=tuned)
  spec_keys = {k for k, _ in _leaves(experiment.ExperimentSpec().to_json())}
  common_keys = {k for k, _ in _leaves(common.base_config().to_dict())}
  # Only derived fields are not settable on their own: nested seeds (copied from
  # config.seed) and nested compute dtypes (from config.compute_dtype, when present).
  derived = spec_keys - common_keys
  assert {"edit.seed", "localize.fact_lookup.seed", "robustness.relearn_lora.training.seed"} <= derived
  assert all(k.rsplit(".", 1)[-1] in ("seed", "compute_dtype") for k in derived), derived
  assert common_keys <= spec_keys
  # Every field of the fact-lookup rule is reachable (13 of them).
  rule_keys = {k for k in common_keys if k.startswith("localize.fact_lookup.rule.")}
  assert len(rule_keys) == 13


def test_seed_propagates_and_cannot_be_set_twice():
  d = common.base_config().to_dict()
  d["seed"] = 3
  assert experiment.ExperimentSpec.from_dict(d).edit.seed == 3
  d["edit"]["seed"] = 1
  with pytest.raises(ValueError, match=r"config\.edit\.seed is not a setting"):
    experiment.ExperimentSpec.from_dict(d)


def test_bad_config_is_named():
  module = importlib.import_module("configs.sports_first16")
  d = module.get_config().to_dict()
  d["edit"]["learning_rate"] = 1e-3
  with pytest.raises(ValueError, match=r"config\.edit\.learning_rate"):
    experiment.ExperimentSpec.from_dict(d)
  d = module.get_config().to_dict()
  d["localize"]["method"] = "magic"
  with pytest.raises(ValueError, match=r"config\.localize: method must be one of"):
    experiment.ExperimentSpec.from_dict(d)
  d = module.get_config().to_dict()
  d["edit"]["steps"] = "many"
  with pytest.raises(ValueError, match=r"config\.edit\.steps must be an integer"):
    experiment.ExperimentSpec.from_dict(d)
  d = module.get_config().to_dict()
  d["localize"]["fact_lookup"]["rule"]["baseline"] = "median"
  with pytest.raises(ValueError, match=r"config\.localize\.fact_lookup\.rule\.baseline must be one of"):
    experiment.ExperimentSpec.from_dict(d)
  with pytest.raises(ValueError, match="tiny"):
    module.get_config("nonsense")


def test_tuple_fields_accept_command_line_strings():
  d = common.base_config().to_dict()
  d["localize"]["layers"] = "2,3, 4"
  assert experiment.ExperimentSpec.from_dict(d).localize.layers == (2, 3, 4)
  d["localize"]["layers"] = "2,x"
  with pytest.raises(ValueError, match=r"config\.localize\.layers must be integers"):
    experiment.ExperimentSpec.from_dict(d)


def test_command_line_overrides_reach_nested_library_configs(tmp_path):
  """`--config.localize.fact_lookup.rule.z=3` and optional fields work through absl flags."""
  script = tmp_path / "show.py"
  script.write_text(
      "from absl import app, flags\n"
      "from ml_collections import config_flags\n"
      "from mech_unlearn_jax import experiment\n"
      "config_flags.DEFINE_config_file('config', None, '', lock_config=True)\n"
      "def main(_):\n"
      "  s = experiment.ExperimentSpec.from_dict(flags.FLAGS.config.to_dict())\n"
      "  print(s.localize.fact_lookup.rule.z, s.localize.fact_lookup.rule.max_gap, s.edit.lr, s.localize.layers)\n"
      "app.run(main)\n"
  )
  root = pathlib.Path(__file__).resolve().parents[1]
  out = subprocess.run(
      [sys.executable, str(script), f"--config={root / 'configs' / 'sports_first16.py'}",
       "--config.localize.fact_lookup.rule.z=3", "--config.localize.fact_lookup.rule.max_gap=1",
       "--config.edit.lr=2e-5", "--config.localize.layers=(2,3)"],
      capture_output=True, text=True, cwd=root, env={**__import__("os").environ, "PYTHONPATH": str(root)},
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["3.0", "1", "2e-05", "(2,", "3)"]
