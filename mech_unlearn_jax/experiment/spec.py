"""The experiment spec: one schema nesting the library's own frozen configs.

`ExperimentSpec` is the only definition of every experiment knob and its default:
`configs/common.py` builds its ConfigDict from `ExperimentSpec()` (see `schema.py`),
so defaults cannot drift between the library and the configs, and every field of the
nested library configs (the fact-lookup rule, AP/CT settings, the edit config, the
attacks) is reachable as `--config.x.y=...`.

The top-level `seed` is the only seed: it is copied into the nested configs that
have one (the edit's data order; localization, splits, option shuffles and attacks
read it directly), so `--config.seed=1` changes all of them together.

`compute_dtype` works the same way: the top-level switch is copied into every nested
`EditConfig` (the edit and every attack's training: float32 master weights and
optimizer state, the loss computed in that dtype), and the run scores with a model
cast to it. `mesh` says where the run executes (`sharding.MeshConfig`); it does not
change the experiment, so a run may resume on another mesh.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from mech_unlearn_jax import train as train_lib
from mech_unlearn_jax.sharding import MeshConfig
from mech_unlearn_jax.data.tasks import DataConfig
from mech_unlearn_jax.experiment import schema
from mech_unlearn_jax.experiment.robustness import RobustnessConfig
from mech_unlearn_jax.localize.select import LocalizeConfig


def _default_edit() -> train_lib.EditConfig:
  # The main job's edit: METHOD §3's optimizer (AdamW, wd 0, cosine to 0, clip 1.0) and
  # budget (50 steps of 64 examples per term; a cheaper budget was measured not to give
  # the same metrics: docs/findings/budget.md), at fact lookup's lr and c_f tuned there.
  # 4 accumulated micro-batches of 16: the same gradient, with the step's scratch
  # memory that of 16 examples (the retain term's [16 x 32, 262k] logits dominate it).
  return train_lib.EditConfig(
      steps=50, lr=3e-5, forget_coef=3.0, forget_batch_size=64, maintain_batch_size=64,
      retain_batch_size=64, num_microbatches=4, checkpoint_every=10,
  )


@dataclasses.dataclass(frozen=True)
class RetainConfig:
  """General text for the retain term and the held-out side-effect metrics.

  Attributes:
    source: "sampled" (sampled once from the unedited model and cached: training on
      it preserves the model's own distribution) or a `datasets` source (hub id or
      local file with a "text" field).
    num_windows: windows in total (train + held out).
    window: tokens per window.
    heldout_windows: windows kept out of training for loss/KL.
  """

  source: str = "sampled"
  # 64 training windows (2,048 tokens) and 32 held out (1,024 tokens), so the retain
  # term and the held-out KL are not averages over a few hundred tokens.
  num_windows: int = 96
  window: int = 32
  heldout_windows: int = 32

  def __post_init__(self):
    if self.window < 2:
      raise ValueError(f"window must be >= 2, got {self.window}")
    if not 0 < self.heldout_windows < self.num_windows:
      raise ValueError(
          f"heldout_windows must be in (0, num_windows={self.num_windows}), got {self.heldout_windows}"
      )


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Which prompt formats the evaluation scores.

  Attributes:
    formats: format names of the task (sports: standard, qa, mc, declarative,
      cloze; CounterFact: standard, paraphrase, neighborhood, mc).
    batch_size: prompts per forward pass.
  """

  formats: tuple[str, ...] = ("standard", "qa", "mc", "declarative", "cloze")
  batch_size: int = 32

  def __post_init__(self):
    if not self.formats:
      raise ValueError("formats must name at least one prompt format")
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclasses.dataclass(frozen=True)
class ExperimentSpec:
  """Everything the main job needs (library code never sees a ConfigDict).

  Attributes:
    seed: the run's only seed (see the module docstring).
    model: "default" (Gemma 3 270M GGUF), a .gguf path, a checkpoint directory, or
      a "tiny-*" preset (random weights; tests).
    data, localize, edit, retain, eval: the stages' settings.
    robustness: the attacks and side-effect evaluations (on by default).
    mesh: the device mesh ("data" and "model" axis sizes, -1 = all devices); one
      device runs exactly the single-device code.
    compute_dtype: "float32" or "bfloat16" for the edit, the attacks and scoring
      (see the module docstring).
  """

  seed: int = 0
  model: str = "default"
  data: DataConfig = DataConfig()
  localize: LocalizeConfig = LocalizeConfig()
  edit: train_lib.EditConfig = dataclasses.field(default_factory=_default_edit)
  retain: RetainConfig = RetainConfig()
  eval: EvalConfig = EvalConfig()
  robustness: RobustnessConfig = RobustnessConfig()
  mesh: MeshConfig = MeshConfig()
  compute_dtype: Literal["float32", "bfloat16"] = "float32"

  def __post_init__(self):
    if self.seed < 0:
      raise ValueError(f"config.seed must be >= 0, got {self.seed}")
    if not self.model:
      raise ValueError("config.model must name a model (e.g. 'default')")
    if self.compute_dtype not in ("float32", "bfloat16"):
      raise ValueError(f"config.compute_dtype must be 'float32' or 'bfloat16', got {self.compute_dtype!r}")
    # The one seed (and compute dtype) reaches every nested config with such a field.
    seeded = schema.replace_nested(self, "seed", self.seed)
    seeded = schema.replace_nested(seeded, "compute_dtype", self.compute_dtype)
    for field in dataclasses.fields(self):
      object.__setattr__(self, field.name, getattr(seeded, field.name))

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "ExperimentSpec":
    """From nested dicts (e.g. `ConfigDict.to_dict()`); errors name the config key."""
    if hasattr(values, "to_dict"):
      values = values.to_dict()
    for name, what in _FOLLOW_TOP.items():
      nested = schema.nested_keys(values, name)
      if nested:
        raise schema.ConfigError(f"{nested[0]} is not a setting: set config.{name} ({what})")
    return schema.from_mapping(cls, values)

  @classmethod
  def from_json(cls, record: Mapping[str, Any]) -> "ExperimentSpec":
    """From `to_json()` output (e.g. a run's config.json): nested seeds and compute
    dtypes are dropped, since they follow the top-level ones."""

    def strip(d, top=True):
      return {
          k: strip(v, False) if isinstance(v, Mapping) else v
          for k, v in d.items() if top or k not in _FOLLOW_TOP
      }

    return cls.from_dict(strip(record))

  def to_json(self) -> dict[str, Any]:
    return schema.to_json(self)


# Top-level fields copied into every nested config that has one (never set below).
_FOLLOW_TOP = {
    "seed": "the run's only seed",
    "compute_dtype": "the run's one compute dtype",
}


def default_config_dict():
  """The ConfigDict every `configs/` file starts from (nested seeds and compute dtypes
  left out: they follow `config.seed` and `config.compute_dtype`)."""
  return schema.to_config_dict(ExperimentSpec(), skip_nested=tuple(_FOLLOW_TOP))
