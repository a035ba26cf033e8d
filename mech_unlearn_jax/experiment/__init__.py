"""The main job as a spec, stages and a report.

  spec.py     `ExperimentSpec`: one schema nesting the library's own configs
  schema.py   dataclasses <-> ml_collections ConfigDicts, errors that name the key
  stages.py   knowledge, split, localization, retain, evaluation, edit (each alone)
  report.py   tables and figures from the stages' outputs
  run.py      `run_experiment(spec, workdir)`: the stages in order, resumable
"""

from mech_unlearn_jax.experiment.run import SharedOutputs, attack_only, keyed_shared_outputs, localize_only, run_experiment
from mech_unlearn_jax.experiment.schema import ConfigError
from mech_unlearn_jax.experiment.spec import ExperimentSpec, default_config_dict

__all__ = [
    "attack_only", "ConfigError", "ExperimentSpec", "SharedOutputs", "default_config_dict", "keyed_shared_outputs",
    "localize_only",
    "run_experiment",
]
