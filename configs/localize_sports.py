"""Localize sports facts in Gemma 3 270M: fact lookup (FLU), AP, CT, baselines.

  python -m launch.localize --config=configs/localize_sports.py --workdir=runs/localize_sports
  python -m launch.localize --config=configs/localize_sports.py:tiny --workdir=/tmp/localize_tiny
  python -m launch.localize --config=configs/localize_sports.py:counterfact \
      --config.data.path=/path/to/counterfact_with_prompts.csv --workdir=runs/localize_cf

Overrides look like `--config.fact_lookup.threshold=0.05`,
`--config.fact_lookup.layers=(2,3,4)` (explicit FLU layers),
`--config.methods=('fact_lookup',)`, `--config.data.path=/path/to/sports.csv`.
Unset optional values are written as "" / () / 0 (see `LocalizationSpec.from_dict`).
"""

import ml_collections


def get_config(arg=None):
  """arg: None (sports, default model), "tiny" (random tiny model, synthetic facts),
  or "counterfact" (CounterFact; set data.path)."""
  c = ml_collections.ConfigDict()
  c.model = "default"
  c.model_seed = 0
  c.seed = 0
  c.methods = ("fact_lookup", "ap", "ct")
  c.baselines = True
  c.chunk_size = 32

  c.data = ml_collections.ConfigDict()
  c.data.dataset = "sports"
  c.data.path = ""  # "" = the embedded athletes table
  c.data.knowledge_threshold = 0.5  # p(true sport) over the 3 sports; < 0 keeps all
  c.data.max_facts = 0  # 0 = all
  c.data.max_known = 0
  c.data.synthetic_size = 48
  c.data.synthetic_classes = 3

  c.fact_lookup = ml_collections.ConfigDict()
  f = c.fact_lookup
  # FLU rule (fact_lookup.FLURule): enrichment > max(threshold, z standard errors).
  # The paper's CounterFact rule: baseline="last", absolute=True, z=0, max_gap=-1,
  # probe_saturation=-1.
  f.threshold = 0.02
  f.baseline = "zero"
  f.absolute = False
  f.z = 2.0
  f.probe_saturation = 0.95  # <= 0 disables the probe constraint
  f.before_first_extraction = True
  f.contiguous = True
  f.max_gap = 2  # fill gaps of at most this many layers; -1 fills everything
  f.extraction_measure = "direct"
  f.extraction_fraction = 0.5
  f.max_extraction_layers = 3
  f.layers = ()  # explicit FLU layers override the rule
  f.extraction_layers = ()
  f.seed = 0
  f.max_patch_prompts = 64
  f.chunk_size = 32
  f.probe_l2 = 1e-3
  f.probe_steps = 300
  f.probe_learning_rate = 0.05
  f.probe_test_fraction = 0.25
  f.probe_seed = 0

  c.ap = ml_collections.ConfigDict()
  c.ap.max_prompts = 64
  c.ap.batch_size = 64

  c.ct = ml_collections.ConfigDict()
  c.ct.max_prompts = 16
  c.ct.num_samples = 2
  c.ct.prompts_per_call = 4

  if arg == "tiny":
    c.model = "tiny-gemma3"
    c.data.dataset = "synthetic"
    c.data.knowledge_threshold = -1.0
    c.data.synthetic_size = 24
    f.max_patch_prompts = 16
    f.chunk_size = 8
    f.probe_steps = 50
    c.ap.max_prompts = 16
    c.ap.batch_size = 8
    c.ct.max_prompts = 8
    c.ct.prompts_per_call = 8
  elif arg == "counterfact":
    c.data.dataset = "counterfact"
    c.data.max_facts = 1000
    f.probe_saturation = -1.0  # objects are too many classes for a probe curve
  elif arg is not None:
    raise ValueError(f"unknown config arg {arg!r}; expected None, 'tiny' or 'counterfact'")
  return c
