"""Planted facts: plant invented athletes at chosen sites, localize them, edit them.

  python -m launch.plant --config=configs/plant_sports.py --workdir=runs/plant_sports
  python -m launch.plant --config=configs/plant_sports.py:tiny --workdir=/tmp/plant_tiny   # test size
  python -m launch.plant --config=configs/plant_sports.py \
      --config.sites=attn:5,neurons:3:0-127,512-639 --workdir=runs/plant_attn_neurons

Sites are `mech_unlearn_jax.plant.PlantSite` specs ("mlp:1,2", "mlp:12,13", "attn:5",
"neurons:3:0-255"), comma-joined on the command line: a new site starts at each
"<kind>:". The number of facts, the planting budget and every nested library setting
are fields, e.g. `--config.num_facts=32 --config.plant.steps=30 --config.plant.lr=5e-4`.

The default is sized for Gemma 3 270M on a 2-core CPU: 64 invented athletes, two
sites (early MLPs 1-2, late MLPs 12-13), 40 planting steps at lr 3e-4, three unlearning edits per
site (the planted site, fact lookup, AP) and the control, scored in the formats the
model answers above chance (letter MC is at chance for 270M, so it is left out of the
edit evaluation, though still reported after planting), with latent probes and short
relearning attacks.
"""

import ml_collections

from mech_unlearn_jax import plant


def make_tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks the job for tests: tiny random model, 8 facts, a few steps everywhere."""
  c.model = "tiny-gemma3"
  c.sites = ("mlp:0,1", "neurons:1:0-31")
  c.num_facts = 8
  c.names.min_entropy = 0.5  # a random model's answers are flat-ish, not uniform
  c.names.check_formats = ("standard", "qa")
  c.train_phrasings = ("standard", "plays_pro")
  c.heldout_formats = ("qa", "cloze")
  c.max_real_facts = 24
  c.known_threshold = 0.0  # a random model knows nothing: keep every fact
  c.max_maintain = 8
  c.max_maintain_eval = 4
  c.plant.steps = 6
  c.plant.lr = 3e-2
  c.plant.warmup_steps = 1
  c.plant.forget_batch_size = 8
  c.plant.maintain_batch_size = 4
  c.plant.retain_batch_size = 4
  c.plant.checkpoint_every = 3
  c.retain.num_windows = 6
  c.retain.window = 8
  c.retain.heldout_windows = 2
  c.localize.num_prompts = 8
  c.localize.fact_lookup.probe.steps = 20
  c.localize.fact_lookup.max_patch_prompts = 8
  c.localize.fact_lookup.chunk_size = 8
  c.localize.ct.num_samples = 2
  c.localize_real = True
  c.edit_methods = ("planted", "fact_lookup")
  c.edit.forget_loss = "inject"  # the tiny run covers the edit-target path; the real one unlearns
  c.edit.steps = 2
  c.edit.lr = 1e-2
  c.edit.forget_batch_size = 4
  c.edit.maintain_batch_size = 4
  c.edit.retain_batch_size = 4
  c.edit.checkpoint_every = 0
  c.eval.formats = ("standard", "qa")
  c.eval.batch_size = 8
  r = c.robustness
  r.probes = True
  r.latent.probe.steps = 20
  r.relearn = True
  for attacker in (r.relearn_lora, r.relearn_full):
    attacker.training.steps = 2
    attacker.training.forget_batch_size = 2
    attacker.training.maintain_batch_size = 2
    attacker.training.retain_batch_size = 2
    attacker.eval_steps = (0, 2)
  r.relearn_lora.rank = 4
  r.soft_prompt = False
  return c


def get_config(arg=None):
  """arg: None (Gemma 3 270M, early and late MLP sites) or "tiny"."""
  if arg not in (None, "", "tiny"):
    raise ValueError(f"unknown config argument {arg!r}; expected nothing or 'tiny'")
  c = plant.default_config_dict()
  c.num_facts = 64
  c.sites = ("mlp:1,2", "mlp:12,13")
  c.max_real_facts = 512
  c.max_maintain = 48
  c.edit_methods = ("planted", "fact_lookup", "ap")
  # Pure unlearning (-log(1 - p(true))): "remove the planted fact", and half the
  # evaluation cells of an injection (no edit targets to score).
  c.edit.forget_loss = "unlearn"
  c.edit.steps = 15
  c.edit.lr = 2e-4
  c.eval.formats = ("standard", "qa", "declarative", "cloze")
  c.heldout_formats = ("qa", "declarative", "cloze", "mc", "news")
  c.localize.fact_lookup.max_patch_prompts = 32
  r = c.robustness
  # Relearning: short attacks (8 steps, scored once at the end) so that two sites x
  # four models fit a CPU run; LoRA at rank 32 instead of the reference's 512.
  r.relearn_lora.rank = 32
  for attacker in (r.relearn_lora, r.relearn_full):
    attacker.training.steps = 8
    attacker.eval_steps = (8,)
  if arg == "tiny":
    make_tiny(c)
  return c
