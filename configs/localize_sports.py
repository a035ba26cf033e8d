"""Localize sports facts in Gemma 3 270M: fact lookup (FLU), AP, CT, baselines.

  python -m launch.localize --config=configs/localize_sports.py --workdir=runs/localize_sports
  python -m launch.localize --config=configs/localize_sports.py --methods=fact_lookup,ap,ct,ap_mlps,ct_mlps,random,random_mlps,all_mlps,nonlocalized,late_mlps --workdir=runs/localize_all
  python -m launch.localize --config=configs/localize_sports.py:tiny --workdir=/tmp/localize_tiny
  python -m launch.localize --config=configs/localize_sports.py:counterfact --workdir=runs/localize_cf

The same schema as the main job (`configs/common.py`); this file localizes on more
facts: the 32 forget + known facts of the main job are too few for stable probes.
"""

from configs import common


def get_config(arg=None):
  """arg: None (sports), "tiny" (tiny random model), or "counterfact"."""
  if arg not in (None, "tiny", "counterfact"):
    raise ValueError(f"unknown config arg {arg!r}; expected None, 'tiny' or 'counterfact'")
  task = "counterfact" if arg == "counterfact" else "sports"
  c = common.base_config(task=task, split="first_16")
  if task == "counterfact":
    common.use_counterfact_defaults(c)
    c.data.max_facts = 1000
  c.localize.num_prompts = 128
  c.localize.fact_lookup.max_patch_prompts = 64
  c.localize.ct.num_samples = 2
  if arg == "tiny":
    common.make_tiny(c)
    c.localize.layers = ()
    c.localize.num_prompts = 16
    c.localize.fact_lookup.max_patch_prompts = 16
    c.localize.fact_lookup.chunk_size = 8
    c.localize.fact_lookup.probe.steps = 50
  return c
