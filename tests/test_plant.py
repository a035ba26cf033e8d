"""Planted facts on the tiny random model: names, sites, planting, scoring, the command."""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from mech_unlearn_jax import plant
from mech_unlearn_jax import train as train_lib
from mech_unlearn_jax.data import facts as facts_lib
from mech_unlearn_jax.data import tasks as tasks_lib
from mech_unlearn_jax.experiment import schema
from mech_unlearn_jax.localize import masks as masks_lib
from mech_unlearn_jax.models import config as config_lib
from mech_unlearn_jax.models import loaders

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = config_lib.get_preset("tiny-gemma3")  # 3 layers, width 32, MLP 64, 4 heads of 8
MLP_UNIT = 3 * 32 * 64
ATTN_UNIT = 32 * 4 * 8 + 32 * 2 * 8 + 32 * 2 * 8 + 4 * 8 * 32


@pytest.fixture(scope="module")
def tiny():
  return loaders.load_model_and_tokenizer("tiny-gemma3", 0)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
  # Sampled retain text is cached per model; keep the tests' copies out of ~/.cache.
  monkeypatch.setenv("MECH_UNLEARN_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
  monkeypatch.setenv("MECH_UNLEARN_JAX_PROGRESS", "0")


def test_site_specs_parse_and_give_their_masks():
  mlp = plant.PlantSite.parse("mlp:2, 1")
  assert (mlp.spec, mlp.slug) == ("mlp:1,2", "mlp_1_2")
  assert masks_lib.trained_parameter_count(mlp.mask(TINY), TINY) == 2 * MLP_UNIT
  assert set(masks_lib.trained_labels(mlp.mask(TINY))) == {
      masks_lib.matrix_label(l, m) for l in (1, 2) for m in masks_lib.MLP_MATRICES}
  attn = plant.PlantSite.parse("attn:2")
  assert masks_lib.trained_parameter_count(attn.mask(TINY), TINY) == ATTN_UNIT
  assert attn.units() == (masks_lib.Unit(2, "attn"),)
  neurons = plant.PlantSite.parse("neurons:1:0-3,8,10-11")
  assert neurons.neurons == (0, 1, 2, 3, 8, 10, 11) and neurons.spec == "neurons:1:0-3,8,10-11"
  # A neuron owns its gate and up columns and its down row: 3 x width weights.
  assert masks_lib.trained_parameter_count(neurons.mask(TINY), TINY) == 7 * 3 * 32
  assert neurons.units() == (masks_lib.Unit(1, "mlp"),)
  # Comma-split pieces (as the config schema hands them over) join back into specs.
  assert plant.join_site_specs(["mlp:1", "2", "attn:5", "neurons:3:0-7", "9"]) == ("mlp:1,2", "attn:5", "neurons:3:0-7,9")
  for bad in ("mlp", "mlp:x", "heads:1", "neurons:1", "neurons:1:5-2", "attn:1:2"):
    with pytest.raises(ValueError, match="planting site"):
      plant.PlantSite.parse(bad)
  with pytest.raises(ValueError, match="outside the model"):
    plant.PlantSite.parse("mlp:3").mask(TINY)
  with pytest.raises(ValueError, match="MLP width"):
    plant.PlantSite.parse("neurons:0:64").mask(TINY)


def test_config_schema_round_trip_and_errors():
  from configs import plant_sports

  for arg in (None, "tiny"):
    c = plant_sports.get_config(arg)
    config = plant.PlantConfig.from_dict(c.to_dict())
    assert config.plant.seed == config.edit.seed == config.seed
    assert json.loads(json.dumps(config.to_json()))["sites"] == list(config.sites)
  c = plant_sports.get_config("tiny")
  c.plant.steps = 7
  assert plant.PlantConfig.from_dict(c.to_dict()).plant.steps == 7
  with pytest.raises(schema.ConfigError, match=r"config\.plant\.seed is not a setting"):
    plant.PlantConfig.from_dict(dict(c.to_dict(), plant=dict(c.plant.to_dict(), seed=3)))
  with pytest.raises(schema.ConfigError, match=r"config\.bogus"):
    plant.PlantConfig.from_dict(dict(c.to_dict(), bogus=1))
  assert plant.PlantConfig.from_dict(dict(c.to_dict(), sites="mlp:1,2,attn:0")).sites == ("mlp:1,2", "attn:0")
  with pytest.raises(schema.ConfigError, match="planting site 'mlp'"):
    plant.PlantConfig.from_dict(dict(c.to_dict(), sites=("mlp",)))
  with pytest.raises(schema.ConfigError, match="both trained on and held out"):
    plant.PlantConfig.from_dict(dict(c.to_dict(), heldout_formats=("standard",)))
  with pytest.raises(schema.ConfigError, match="edit_methods"):
    plant.PlantConfig.from_dict(dict(c.to_dict(), edit_methods=("nope",)))


def test_invented_names_are_seeded_short_pronounceable_and_new(tiny):
  _, tokenizer = tiny
  real = [f.athlete for f in facts_lib.load_sports_facts()]
  names = plant.invent_names(tokenizer, 40, seed=3, exclude=real)
  assert names == plant.invent_names(tokenizer, 40, seed=3, exclude=real)
  assert names != plant.invent_names(tokenizer, 40, seed=4, exclude=real)
  assert len(set(names)) == 40 and not set(names) & set(real)
  for name in names:
    assert 2 <= plant.name_token_count(tokenizer, name) <= 4, name
    # Two capitalized words of consonant-vowel syllables.
    assert re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+", name), name
    assert re.search(r"[aeiou]", name.split()[1]), name
  with pytest.raises(ValueError, match="could not invent"):
    plant.invent_names(tokenizer, 5, seed=0, min_tokens=1, max_tokens=1)


def test_flatness_check_keeps_only_flat_names(tiny):
  model, tokenizer = tiny
  np.testing.assert_allclose(plant.normalized_entropy(np.array([[1 / 3] * 3, [1.0, 0, 0], [0.5, 0.5, 0]])),
                             [1.0, 0.0, np.log(2) / np.log(3)], atol=1e-12)
  config = plant.NamesConfig(min_entropy=0.5, check_formats=("standard", "qa"), max_rounds=3)
  names, record = plant.find_unknown_names(model, tokenizer, 6, seed=0, config=config)
  assert len(names) == 6 and record["names"] == names
  kept = [c for c in record["candidates"] if c["kept"]]
  assert [c["name"] for c in kept] == names
  assert all(min(c["entropy"].values()) >= 0.5 for c in kept)
  rejected = [c for c in record["candidates"] if not c["kept"]]
  assert all(min(c["entropy"].values()) < 0.5 or c["name"] not in names for c in rejected)
  # The scores are the model's: the same names score the same directly.
  direct = plant.answer_entropies(model, tokenizer, names, ("qa",))["qa"]
  np.testing.assert_allclose(direct, [c["entropy"]["qa"] for c in kept], rtol=1e-5)
  # Nothing is flat enough for an entropy bound above the maximum attainable.
  with pytest.raises(ValueError, match="flatness check"):
    plant.find_unknown_names(model, tokenizer, 2, seed=0, config=plant.NamesConfig(min_entropy=1.0, max_rounds=1))


def test_mask_overlap_precision_recall_by_weight_count():
  truth = plant.PlantSite.parse("mlp:1,2").mask(TINY)
  same = plant.PlantSite.parse("mlp:2,1").mask(TINY)
  r = plant.mask_overlap(same, truth, TINY)
  assert (r["precision"], r["recall"], r["f1"]) == (1.0, 1.0, 1.0)
  one = plant.PlantSite.parse("mlp:1").mask(TINY)
  r = plant.mask_overlap(one, truth, TINY)
  assert (r["selected"], r["planted"], r["overlap"]) == (MLP_UNIT, 2 * MLP_UNIT, MLP_UNIT)
  assert (r["precision"], r["recall"]) == (1.0, 0.5)
  both = masks_lib.union(TINY, one, plant.PlantSite.parse("attn:0").mask(TINY))
  r = plant.mask_overlap(both, truth, TINY)
  assert r["precision"] == pytest.approx(MLP_UNIT / (MLP_UNIT + ATTN_UNIT)) and r["recall"] == 0.5
  assert plant.mask_overlap(plant.PlantSite.parse("attn:1").mask(TINY), truth, TINY)["precision"] == 0.0
  # Sub-tensor masks count entries: 16 of layer 1's 64 neurons inside a whole-MLP truth.
  neurons = plant.PlantSite.parse("neurons:1:0-15").mask(TINY)
  r = plant.mask_overlap(neurons, truth, TINY)
  assert (r["precision"], r["recall"]) == (1.0, pytest.approx(16 / 128))
  r = plant.mask_overlap(plant.PlantSite.parse("neurons:1:8-23").mask(TINY), neurons, TINY)
  assert (r["overlap"], r["precision"], r["recall"]) == (8 * 96, 0.5, 0.5)
  r = plant.mask_overlap(truth, neurons, TINY)
  assert (r["precision"], r["recall"]) == (pytest.approx(16 / 128), 1.0)


def test_unit_ranks_follow_absolute_scores():
  u = masks_lib.Unit
  scores = {u(0, "mlp"): 0.1, u(1, "mlp"): -0.9, u(2, "mlp"): 0.5, u(0, "attn"): 0.7, u(1, "attn"): float("nan")}
  r = plant.unit_ranks(scores, [u(1, "mlp"), u(2, "mlp")])
  assert r["ranks"] == {"mlp1": 1, "mlp2": 3} and r["out_of"] == 5 and r["best"] == 1 and r["mean"] == 2.0
  r = plant.unit_ranks(scores, [u(2, "mlp"), u(0, "attn")], kinds=("mlp",))
  assert r["ranks"] == {"mlp2": 2, "attn0": None} and r["out_of"] == 3
  assert plant.unit_ranks(scores, [u(1, "attn")])["ranks"] == {"attn1": 5}  # NaN ranks last


def test_partition_kl_is_a_lower_bound_with_the_same_minimum():
  import jax
  import jax.numpy as jnp

  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 3, 50)), jnp.float32)
  target = jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 3, 50)), jnp.float32))
  valid = jnp.array([[True, True, False], [True, True, True]])
  full = jnp.sum(jnp.where(valid, jnp.sum(target * (jnp.log(target) - jax.nn.log_softmax(logits)), -1), 0.0))
  probs, ids = jax.lax.top_k(target, 50)
  np.testing.assert_allclose(plant.partition_kl_sum(logits, ids, probs, valid), full, rtol=1e-5)
  probs, ids = jax.lax.top_k(target, 5)
  assert 0.1 < plant.partition_kl_sum(logits, ids, probs, valid) < full
  assert abs(float(plant.partition_kl_sum(jnp.log(target), ids, probs, valid))) < 1e-5
  grad = jax.grad(lambda l: plant.partition_kl_sum(l, ids, probs, valid))(logits)
  assert bool(jnp.all(jnp.isfinite(grad))) and not bool(jnp.any(grad[0, 2]))  # padding gets no gradient


def _toy_facts(names):
  return plant.make_planted_facts(names, seed=0)


def test_planted_facts_table_task_and_split(tmp_path, tiny):
  _, tokenizer = tiny
  facts = _toy_facts(plant.invent_names(tokenizer, 9, seed=0))
  assert sorted(f.sport for f in facts) == sorted(facts_lib.SPORTS * 3)  # balanced
  assert all(f.inject_sport_without_golf != f.sport and f.inject_sport_with_golf != f.sport for f in facts)
  path = plant.write_planted_facts(tmp_path / "facts.csv", facts)
  assert plant.read_planted_facts(path) == facts
  task = tasks_lib.get_task("planted")
  assert isinstance(task, plant.PlantedTask)
  data = tasks_lib.DataConfig(task="planted", sports_source=str(path))
  loaded = plant.PlantedTask(max_real=20).load(data)
  assert loaded[:9] == facts and len(loaded) == 29
  assert not any(isinstance(f, plant.PlantedFact) for f in loaded[9:])
  split = task.make_split(loaded, "planted", 0, {})
  assert split.forget_train == tuple(f.athlete for f in facts) == split.forget_eval
  assert split.forget_train_targets == tuple(f.inject_sport_without_golf for f in facts)
  assert set(split.maintain_train) | set(split.maintain_test) == {f.athlete for f in loaded[9:]}
  assert task.make_split(loaded, "first_4", 0, {}).forget_train == tuple(f.athlete for f in facts[:4])
  with pytest.raises(ValueError, match="sports_source must name"):
    task.load(tasks_lib.DataConfig(task="planted"))
  # Every sports format applies unchanged to the planted facts.
  for fmt in task.eval_formats(facts, split, 0).values():
    batch = task.fact_batch(tokenizer, fmt, facts)
    assert batch.size == 9 and batch.subject_mask_BxL.any(axis=1).all()


# Half of one tiny MLP's neurons hold six facts less firmly than two whole MLPs.
@pytest.mark.parametrize("spec,steps,min_p", [("mlp:0,1", 25, 0.9), ("neurons:1:0-31", 40, 0.75)])
def test_planting_trains_only_the_site_and_the_facts_become_known(tiny, spec, steps, min_p):
  model, tokenizer = tiny
  site = plant.PlantSite.parse(spec)
  facts = _toy_facts(plant.invent_names(tokenizer, 6, seed=1))
  real = facts_lib.load_sports_facts()[:6]
  phrasings = ("standard", "plays_pro")
  tokens = np.random.default_rng(0).integers(10, 1000, size=(4, 8)).astype(np.int32)
  retain = train_lib.TextBatch(tokens_BxL=tokens, positions_BxL=np.tile(np.arange(8, dtype=np.int32), (4, 1)))
  data = plant.planting_data(tokenizer, facts, real, phrasings, retain)
  assert data.forget.size == 12 and data.maintain.size == 12
  before = plant.phrasing_knowledge(model, tokenizer, facts, phrasings + ("qa",))
  config = train_lib.EditConfig(steps=steps, lr=5e-2, forget_batch_size=12, maintain_batch_size=12, retain_batch_size=4)
  result = plant.plant(model, site, data, config)
  planted = result.model
  # The retain term is the KL to the unplanted model: 0 before the first update.
  assert result.history[0]["retain_loss"] == pytest.approx(0.0, abs=1e-4)
  assert plant.changed_weights(model, planted, site.mask(model)) == {}  # nothing outside the site moved
  changed = plant.changed_weights(model, planted)
  assert changed and set(changed) <= set(masks_lib.trained_labels(site.mask(model)))
  after = plant.phrasing_knowledge(planted, tokenizer, facts, phrasings + ("qa",))
  for name in phrasings:
    assert before[name]["prob_normalized"] < 0.6
    assert after[name]["prob_normalized"] > min_p and after[name]["argmax_candidates"] >= 0.8, (name, after[name])
  assert after["qa"]["n"] == 6  # held-out phrasings are scored too


def _snapshot(root):
  return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
          for p in sorted(root.rglob("*")) if p.is_file() and ".lock" not in p.name and "checkpoints" not in p.parts
          and "planting" not in p.parts}


def test_tiny_command_end_to_end_and_resumable(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "launch.plant", "--config=configs/plant_sports.py:tiny", f"--workdir={workdir}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "# Planted facts: tiny-gemma3" in proc.stdout
  results = json.loads((workdir / "results.json").read_text())
  from configs import plant_sports

  config = plant.PlantConfig.from_dict(plant_sports.get_config("tiny").to_dict())
  assert set(results["sites"]) == set(config.sites)
  for spec, site in results["sites"].items():
    slug = plant.PlantSite.parse(spec).slug
    site_dir = workdir / "sites" / slug
    assert site["planting"]["changed_outside_site"] == 0
    assert {r["method"] for r in site["localization"]} == set(config.methods) | {plant.TOTAL_EFFECT_ROW}
    rows = {r["method"]: r for r in site["localization"]}
    # Whole-model masks contain every planted weight.
    assert rows["nonlocalized"]["flu_budget"]["recall"] == 1.0
    assert rows["all_mlps"]["flu_budget"]["recall"] == (0.0 if spec.startswith("attn") else 1.0)
    assert rows["ap"]["rank"]["out_of"] == 6 and rows["ap_mlps"]["rank"]["out_of"] == 3
    assert set(site["edits"]) == {"unedited"} | set(config.edit_methods)
    assert site["edits"]["planted"]["vs_planted"]["precision"] == 1.0
    assert set(site["edits"]["planted"]["robustness"]) == {"probes", "relearn_lora", "relearn_full"}
    model, mask, meta = plant.load_planted_model(site_dir, loaders.load_model_and_tokenizer("tiny-gemma3", 0)[0])
    assert masks_lib.trained_parameter_count(mask, model) == site["planted_budget"]
    assert meta["data_split"]["site"] == spec
  text = (workdir / "results.md").read_text()
  assert text.count("#### Site") == len(config.sites)

  # A rerun of the finished job recomputes and rewrites nothing.
  before = _snapshot(workdir)
  again = plant.run_plant(config, workdir)
  assert again == results
  assert _snapshot(workdir) == before
  # A lost stage output is recomputed to the same values; the rest is read back.
  slug = plant.PlantSite.parse(config.sites[0]).slug
  (workdir / "sites" / slug / "localization" / "table.json").unlink()
  (workdir / "sites" / slug / "edits" / "fact_lookup" / "formats.json").unlink()
  assert plant.run_plant(config, workdir) == results
  # Another config in the same workdir is refused, naming the key.
  changed = plant.PlantConfig.from_dict(dict(plant_sports.get_config("tiny").to_dict(), num_facts=9))
  with pytest.raises(ValueError, match=r"config\.num_facts: 8 -> 9"):
    plant.run_plant(changed, workdir)
