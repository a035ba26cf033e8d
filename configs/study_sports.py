"""The reproduction study: the paper's Tables 1-3 and Figures 2-4 with intervals over seeds.

  python -m launch.study --config=configs/study_sports.py --workdir=runs/study_reference \
      --results_dir=docs/results/reference_budget
  python -m launch.study --config=configs/study_sports.py --workdir=runs/study_reference \
      --only_settings=sports_random16 --only_seeds=0          # a subset (the report covers every finished cell)
  python -m launch.study --config=configs/study_sports.py:short_budget --workdir=runs/study \
      --results_dir=docs/results/short_budget     # every edit at the short budget, 30 x 16
  python -m launch.study --config=configs/study_sports.py:tiny --workdir=/tmp/study   # CI-size variant

Every edit runs at METHOD §3's budget, 50 steps x 64 examples per term, with each
family's values tuned at that budget (`configs/common.py: TUNED_EDIT["reference"]`);
`:short_budget` runs the library's first budget, 30 steps x 16 (whole batches), with
the values tuned there (`TUNED_EDIT["short"]`). Cells of the two budgets have different
configs, so give each its own workdir and results folder; the shared outputs (knowledge
filter, evidence, unedited control) do not depend on the edit, so one study's
`results_dir/shared` can be copied into the other's.

Settings (each a main-job run with every robustness stage, per method and seed):
  sports_random16       16 known athletes drawn with the seed -> a random other sport
  sports_basketball     every known basketball player -> golf; train on half, evaluate
                        (and attack) the held-out half
  counterfact_random16  16 known CounterFact facts drawn with the seed -> target_false
Methods: every localization of `mech_unlearn_jax.localize.select.METHODS` (the paper's
nine and the late-MLP control). Seeds 0-4: `config.seed` drives the forget draw,
training order, random baselines, corruption, option shuffles and attacks.

`base` is an experiment config (`configs/common.py`); each setting holds only the
experiment keys that differ from it (`overrides`), so `--config.base.edit.lr=...`
changes every setting and `--config.settings.counterfact_random16.overrides...` one.
"""

from typing import Any

import ml_collections

from configs import common
from mech_unlearn_jax.localize.select import METHODS

# (name, task, split) in run and report order.
SETTINGS = (
  ("sports_random16", "sports", "random_16"),
  ("sports_basketball", "sports", "basketball"),
  ("counterfact_random16", "counterfact", "random_16"),
)
TINY_METHODS = ("fact_lookup", "random_mlps")


def _diff(full: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
  """The nested keys of `full` whose values differ from `base`."""
  out = {}
  for k, v in full.items():
    if isinstance(v, dict) and isinstance(base.get(k), dict):
      sub = _diff(v, base[k])
      if sub:
        out[k] = sub
    elif base.get(k) != v:
      out[k] = v
  return out


def _shrink_robustness(c: ml_collections.ConfigDict) -> None:
  # Below make_tiny's sizes: the CI study runs several cells in one test.
  r = c.robustness
  for attack in (r.softprompt_prefix, r.softprompt_adapter):
    attack.num_attacks = 1
    attack.training.steps = 2
  r.latent.probe.steps = 10
  r.trivia_eval.max_questions = 4


def _experiment(task: str, split: str, tiny: bool, short_budget: bool) -> ml_collections.ConfigDict:
  c = common.base_config(task=task, split=split)
  if short_budget:
    common.use_short_budget(c)
    # The short-budget study's cells were run with whole-batch steps; micro-batching
    # gives the same gradient but another config record, so it keeps whole batches.
    c.edit.num_microbatches = 1
  if task == "counterfact":
    common.use_counterfact_defaults(c)
  if tiny:
    common.make_tiny(c)
    _shrink_robustness(c)
  return c


def get_config(arg=None):
  parts = common.arg_parts(arg)
  if set(parts) - set(common.VARIANTS):
    raise ValueError(f"config argument {arg!r}: expected nothing or a comma-separated subset of {common.VARIANTS}")
  tiny = "tiny" in parts
  budget = common.budget_of(arg)
  short_budget = budget == "short"
  tuned_edit = common.TUNED_EDIT[budget]
  # Tiny: both kinds of sports split (a seeded draw and a whole sport, held-out half).
  settings = SETTINGS[:2] if tiny else SETTINGS
  base = _experiment("sports", "random_16", tiny, short_budget)
  c = ml_collections.ConfigDict()
  c.base = base
  c.settings = ml_collections.ConfigDict()
  for name, task, split in settings:
    full = _experiment(task, split, tiny, short_budget)
    overrides = _diff(full.to_dict(), base.to_dict())
    data = overrides.pop("data", {})
    data.pop("task", None)
    data.pop("split", None)
    if data:
      overrides["data"] = data
    c.settings[name] = ml_collections.ConfigDict(
      {"task": full.data.task, "split": full.data.split, "overrides": ml_collections.ConfigDict(overrides)}
    )
  # ConfigDicts sort their keys; the study runs and reports settings in this order.
  c.setting_order = tuple(name for name, _, _ in settings)
  c.methods = TINY_METHODS if tiny else tuple(METHODS)
  c.seeds = (0, 1) if tiny else (0, 1, 2, 3, 4)
  c.confidence = 0.95
  # Each cell's edit uses its method's family's tuned values (the base has fact lookup's).
  c.tuned_edit = ml_collections.ConfigDict(tuned_edit)
  # A cell whose mask and edit equal a finished cell's (same setting and seed) takes its
  # results: a one-MLP budget often makes CT-MLPs, AP-MLPs and CT pick the same MLP.
  # Set False where runs are not bit-reproducible (some accelerator kernels).
  c.reuse_identical_edits = True
  return c
