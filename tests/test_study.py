"""The reproduction study: config, intervals, claims, and a tiny study end to end."""

import csv
import json
import dataclasses
import math
import shutil
import time

import pytest

from configs import common, study_sports
from mech_unlearn_jax import io, study
from mech_unlearn_jax.experiment import ConfigError
from mech_unlearn_jax.study import comparisons
from mech_unlearn_jax.experiment import run as run_lib
from mech_unlearn_jax.localize import select
from mech_unlearn_jax.localize.select import METHODS
from tests.conftest import REFERENCE_DATA


def test_t_interval_on_constructed_numbers():
  iv = study.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
  # mean 3, sd sqrt(2.5), t_{0.975, 4} = 2.7764451
  half = 2.7764451 * math.sqrt(2.5) / math.sqrt(5)
  assert iv.n == 5 and iv.mean == pytest.approx(3.0)
  assert iv.lo == pytest.approx(3.0 - half, abs=1e-6) and iv.hi == pytest.approx(3.0 + half, abs=1e-6)
  two = study.t_interval([0.0, 1.0])  # t_{0.975, 1} = 12.7062047
  assert two.hi - two.mean == pytest.approx(12.7062047 * math.sqrt(0.5) / math.sqrt(2), abs=1e-5)
  narrower = study.t_interval([1.0, 2.0, 3.0, 4.0, 5.0], confidence=0.5)
  assert narrower.hi - narrower.mean < half
  one = study.t_interval([0.25])
  assert (one.n, one.mean, one.lo, one.hi) == (1, 0.25, None, None)
  with pytest.raises(ValueError):
    study.t_interval([])


def test_real_study_config_has_every_setting_method_and_seed():
  config = study.StudyConfig.from_dict(study_sports.get_config().to_dict())
  assert [s.name for s in config.settings] == ["sports_random16", "sports_basketball", "counterfact_random16"]
  assert [(s.task, s.split) for s in config.settings] == [
    ("sports", "random_16"),
    ("sports", "basketball"),
    ("counterfact", "random_16"),
  ]
  assert config.methods == tuple(METHODS) and "late_mlps" in config.methods
  assert len(config.seeds) >= 3
  cells = config.cells()
  assert len(cells) == 3 * len(METHODS) * len(config.seeds)
  # Run order: a setting's seed 0 finishes every method before seed 1 starts.
  assert [c.method for c in cells[: len(METHODS)]] == list(METHODS) and {c.seed for c in cells[: len(METHODS)]} == {0}
  cf = config.cell_spec(study.Cell("counterfact_random16", "ap", 3))
  assert (cf.seed, cf.data.task, cf.data.split, cf.localize.method) == (3, "counterfact", "random_16", "ap")
  assert cf.eval.formats == ("standard", "paraphrase", "neighborhood", "mc")
  assert cf.edit.seed == 3  # the one seed reaches the nested configs
  # Each cell edits with its method's family's tuned values (METHOD §3), in every setting.
  for setting in ("sports_random16", "counterfact_random16"):
    for method in ("fact_lookup", "ap", "ct_mlps", "random_mlps", "all_mlps", "nonlocalized"):
      edit = config.cell_spec(study.Cell(setting, method, 0)).edit
      tuned = common.TUNED_EDIT["reference"][select.FAMILY_OF[method]]
      assert (edit.lr, edit.forget_coef) == (tuned["lr"], tuned["forget_coef"]), (setting, method)
      assert (edit.steps, edit.forget_batch_size, edit.retain_batch_size, edit.num_microbatches) == (50, 64, 64, 4)
  with pytest.raises(ConfigError, match="tuned_edit: unknown tuning famil"):
    study.StudyConfig.from_dict(dict(study_sports.get_config().to_dict(), tuned_edit={"ap": {"lr": 1.0}}))
  # Shared outputs: one knowledge filter per model and data, evidence per setting and seed.
  a = study.shared_outputs(
    config.cell_spec(study.Cell("sports_random16", "ap", 0)), "sports_random16", run_lib.pathlib.Path("w")
  )
  b = study.shared_outputs(
    config.cell_spec(study.Cell("sports_basketball", "ct", 1)), "sports_basketball", run_lib.pathlib.Path("w")
  )
  c = study.shared_outputs(
    config.cell_spec(study.Cell("sports_random16", "random", 0)), "sports_random16", run_lib.pathlib.Path("w")
  )
  assert a.knowledge == b.knowledge and a.evidence_dir != b.evidence_dir
  d = study.shared_outputs(
    config.cell_spec(study.Cell("sports_random16", "fact_lookup", 0)), "sports_random16", run_lib.pathlib.Path("w")
  )
  assert a == c == d  # every method of a (setting, seed) shares them, whatever its family's edit
  # Where a cell runs (the mesh) is not part of the key, the compute dtype is.
  spec = config.cell_spec(study.Cell("sports_random16", "ap", 0))
  on_mesh = dataclasses.replace(spec, mesh=dataclasses.replace(spec.mesh, data=8))
  in_bf16 = dataclasses.replace(spec, compute_dtype="bfloat16")
  assert study.shared_outputs(on_mesh, "sports_random16", run_lib.pathlib.Path("w")) == a
  assert study.shared_outputs(in_bf16, "sports_random16", run_lib.pathlib.Path("w")).evidence_dir != a.evidence_dir
  assert config.cells(only_settings=["sports_basketball"], only_seeds=[1], only_methods=["ct"]) == [
    study.Cell("sports_basketball", "ct", 1)
  ]
  with pytest.raises(ValueError, match="only_methods"):
    config.cells(only_methods=["nope"])


def test_short_budget_study_keeps_its_cells_config_and_shares_the_reference_studys_outputs():
  reference = study.StudyConfig.from_dict(study_sports.get_config().to_dict())
  short = study.StudyConfig.from_dict(study_sports.get_config("short_budget").to_dict())
  # The old spelling of the default names the same study.
  assert study.StudyConfig.from_dict(study_sports.get_config("reference_budget").to_dict()) == reference
  for setting in ("sports_random16", "counterfact_random16"):
    for method in ("fact_lookup", "ct", "random", "all_mlps", "nonlocalized"):
      family = select.FAMILY_OF[method]
      cell = study.Cell(setting, method, 1)
      edit = short.cell_spec(cell).edit
      # The short-budget study's cells were run with whole batches of 16: the same
      # config, so its finished cells are read back rather than rerun.
      assert (edit.steps, edit.forget_batch_size, edit.maintain_batch_size, edit.retain_batch_size) == (30, 16, 16, 16)
      assert edit.num_microbatches == 1
      tuned = common.TUNED_EDIT["short"][family]
      assert (edit.lr, edit.forget_coef) == (tuned["lr"], tuned["forget_coef"]), (setting, method)
      # The edit is not part of the shared outputs' key: the two studies can share them.
      assert study.shared_outputs(reference.cell_spec(cell), setting, run_lib.pathlib.Path("w")) == study.shared_outputs(
        short.cell_spec(cell), setting, run_lib.pathlib.Path("w")
      )
  tiny = study.StudyConfig.from_dict(study_sports.get_config("tiny,short_budget").to_dict())
  assert tiny.cell_spec(tiny.cells()[0]).edit.lr == common.TUNED_EDIT["short"]["fact_lookup"]["lr"]
  with pytest.raises(ValueError, match="expected nothing or"):
    study_sports.get_config("short")
  with pytest.raises(ValueError, match="exclude each other"):
    study_sports.get_config("short_budget,reference_budget")


def test_bad_setting_override_names_setting_and_key():
  values = study_sports.get_config("tiny").to_dict()
  values["settings"]["sports_random16"]["overrides"] = {"edit": {"lrr": 1.0}}
  with pytest.raises(ConfigError, match=r"setting 'sports_random16'.*config\.edit\.lrr"):
    study.StudyConfig.from_dict(values)
  values = study_sports.get_config("tiny").to_dict()
  values["methods"] = ("fact_lookup", "magic")
  with pytest.raises(ConfigError, match="magic"):
    study.StudyConfig.from_dict(values)


def _summary(setting, method, seed, metrics, unedited, valid=("standard", "qa")):
  validity = {
    f: {"format": f, "n": 10, "argmax_accuracy": 0.9, "interval95": [0.6, 1.0], "chance": 0.25, "valid": f in valid}
    for f in ("standard", "qa", "mc")
  }
  return {
    "setting": setting,
    "method": method,
    "seed": seed,
    "mask_name": method,
    "flu_layers": [1],
    "trained_parameters": 100,
    "cell_seconds": 10.0,
    "attempt_seconds": [10.0],
    "split": {},
    "format_validity": validity,
    "metrics": dict(metrics, cell_seconds=10.0),
    "unedited_metrics": unedited,
    "spec": {
      "model": "fake",
      "eval": {"formats": ["standard", "qa", "mc"]},
      "edit": {"lr": 1e-4, "forget_coef": 0.3 if method == "fact_lookup" else 1.0, "seed": seed},
    },
  }


def test_claims_tables_and_csv_from_constructed_cells(tmp_path):
  config = study.StudyConfig(
    settings=(study.StudySetting("facts", "sports", "random_16"), study.StudySetting("whole", "sports", "basketball")),
    methods=("fact_lookup", "ap", "random"),
    seeds=(0, 1, 2),
  )
  unedited = {"forget_qa": 0.9, "forget_mc": 0.3, "relearn_lora_forget_step0": 0.9}
  for seed in config.seeds:
    for method, qa, mc in (
      ("fact_lookup", 0.1 + 0.01 * seed, 0.9),
      ("ap", 0.6 + 0.02 * seed, 0.1),
      ("random", 0.8, 0.5),
    ):
      m = {
        "forget_qa": qa,
        "forget_mc": mc,
        "relearn_lora_forget_step0": 0.1,
        "relearn_lora_forget_step20": 0.8 + 0.01 * seed,
        "trained_parameters": 100,
        "retain_kl": 0.01 * (1 + seed),
      }
      io.write_json(
        tmp_path / "cells" / f"facts__{method}__seed{seed}.json", _summary("facts", method, seed, m, unedited)
      )
      if seed < 2:  # the whole-sport setting has one seed fewer
        io.write_json(
          tmp_path / "cells" / f"whole__{method}__seed{seed}.json", _summary("whole", method, seed, m, unedited)
        )
  data = study.write_outputs(config, tmp_path)
  rows = list(csv.DictReader(open(tmp_path / "study.csv")))
  assert list(rows[0]) == list(study.CSV_COLUMNS)
  assert {(r["setting"], r["method"]) for r in rows} >= {
    ("facts", "unedited"),
    ("facts", "fact_lookup"),
    ("whole", "ap"),
  }
  assert len({(r["setting"], r["method"], r["seed"], r["metric"]) for r in rows}) == len(rows)
  iv = data.interval("facts", "ap", "forget_qa")
  assert iv.n == 3 and iv.mean == pytest.approx(0.62)
  by_claim = {(c["setting"], c["claim"].split(" (")[0]): c for c in study.claims(data)}
  # qa (valid): fact lookup is lower than ap in every seed -> holds; mc is not counted (invalid).
  formats = by_claim[("facts", "fact-lookup edits generalize to other prompt formats")]
  assert formats["verdict"].startswith("holds"), formats
  assert any("mc" in d and "not counted" in d for d in formats["details"])
  # Relearning: identical curves -> the paired difference is 0 with no spread: not resolved.
  relearn = by_claim[("facts", "fact-lookup edits resist relearning")]
  assert relearn["verdict"].startswith("not resolved"), relearn
  whole = by_claim[("whole", "whole-sport edits are relearned by every method")]
  assert whole["verdict"].startswith("holds"), whole  # recovery ~ 0.88 > 0.5 for every method
  text = (tmp_path / "study.md").read_text()
  assert "## facts (sports, split random_16)" in text and "forget_mc ✗" in text and "forget_qa |" in text
  assert "0.620 [" in text  # ap's forget_qa mean with its interval
  assert "95% t-interval" in text and "provisional while a comparator has fewer than 3 paired seeds" in text
  for name in ("facts_relearning.png", "whole_relearning.png", "facts_formats_vs_side_effects.png"):
    assert (tmp_path / "figures" / name).is_file(), name

  # Fact lookup worse than ap on a valid format -> does not hold.
  for seed in config.seeds:
    path = tmp_path / "cells" / f"facts__fact_lookup__seed{seed}.json"
    s = io.read_json(path)
    s["metrics"]["forget_qa"] = 0.95 - 0.01 * seed
    io.write_json(path, s)
  data = study.collect(config, tmp_path)
  by_claim = {(c["setting"], c["claim"].split(" (")[0]): c for c in study.claims(data)}
  assert by_claim[("facts", "fact-lookup edits generalize to other prompt formats")]["verdict"].startswith(
    "does not hold"
  )

  # A comparator that trained the fact-lookup mask itself in one seed is still counted
  # (and flagged); in every seed it compares only hyperparameters and is left out.
  def set_ap_jaccard(seeds):
    for seed in config.seeds:
      path = tmp_path / "cells" / f"facts__ap__seed{seed}.json"
      s = io.read_json(path)
      s["metrics"][study.MASK_JACCARD] = 1.0 if seed in seeds else 0.25
      io.write_json(path, s)
    return {(c["setting"], c["claim"].split(" (")[0]): c for c in study.claims(study.collect(config, tmp_path))}

  formats = set_ap_jaccard({0})[("facts", "fact-lookup edits generalize to other prompt formats")]
  assert formats["verdict"].startswith("does not hold (1 of 1"), formats
  assert any("forget_qa vs ap" in d and "same mask as fact_lookup in seed(s) 0" in d for d in formats["details"])
  formats = set_ap_jaccard({0, 1, 2})[("facts", "fact-lookup edits generalize to other prompt formats")]
  assert formats["verdict"].startswith("cannot be tested: every comparator trained the fact-lookup mask"), formats
  assert any("compares edit hyperparameters only" in d for d in formats["details"])
  # Fact lookup against the baselines ("random" here), paired by seed, beside the verdicts.
  data = study.collect(config, tmp_path)
  base = study.baseline_contrasts(data, config.settings[0])
  assert base["methods"] == ["random"]
  rows = dict(base["rows"])
  assert rows["forget_qa"]["random"].n == 3
  fl, rnd = data.values[("facts", "fact_lookup", "forget_qa")], data.values[("facts", "random", "forget_qa")]
  assert rows["forget_qa"]["random"].mean == pytest.approx(sum(fl[s] - rnd[s] for s in fl) / 3)
  assert "whole_set" in base and not base["whole_set"]
  # Whole-sport setting: its claim compares no methods, so every other method is described.
  whole = study.baseline_contrasts(data, config.settings[1])
  assert whole["whole_set"] and whole["methods"] == ["ap", "random"]
  rows = dict(whole["rows"])
  fl, ap = data.values[("whole", "fact_lookup", "forget_qa")], data.values[("whole", "ap", "forget_qa")]
  assert rows["forget_qa"]["ap"].n == 2
  assert rows["forget_qa"]["ap"].mean == pytest.approx(sum(fl[s] - ap[s] for s in fl) / 2)
  text = study.study_markdown(data, {})
  assert "### Fact lookup against the baselines: facts" in text
  assert "### Fact lookup against every method: whole" in text and "no verdict reads this table" in text
  assert "2 of these 6 intervals exclude 0; at 95%, about 0.3 would by chance alone" in text
  one_seed = dict(whole, rows=[("forget_qa", {"ap": study.Interval(n=1, mean=0.1, lo=None, hi=None, sd=None)})])
  assert "One paired seed each so far: no intervals." in comparisons.baseline_markdown(one_seed)
  # The same-mask cells measure what the families' hyperparameters alone change.
  facts = config.settings[0]
  contrast = study.same_mask_contrasts(data, facts)
  assert contrast["comparators"] == {0: ["ap"], 1: ["ap"], 2: ["ap"]}  # "random" has other masks here
  assert contrast["hyperparameters"] == {"forget_coef": [0.3, 1.0]}
  rows = dict(contrast["rows"])
  fl, ap = data.values[("facts", "fact_lookup", "forget_qa")], data.values[("facts", "ap", "forget_qa")]
  assert rows["forget_qa"].n == 3 and rows["forget_qa"].mean == pytest.approx(sum(fl[s] - ap[s] for s in fl) / 3)
  assert study.same_mask_contrasts(data, config.settings[1]) is None  # whole-sport setting
  text = study.study_markdown(data, {})
  assert "### Same mask, other edit hyperparameters: facts" in text and "`forget_coef` 0.3 (fact lookup) vs 1.0" in text
  set_ap_jaccard(set())
  assert study.same_mask_contrasts(study.collect(config, tmp_path), facts) is None
  # At matched hyperparameters fact lookup's side is its mask trained with the
  # comparator's edit config: here the "random" cells (ap's family values, fact
  # lookup's mask in every seed).
  for seed in config.seeds:
    path = tmp_path / "cells" / f"facts__random__seed{seed}.json"
    s = io.read_json(path)
    s["metrics"][study.MASK_JACCARD] = 1.0
    io.write_json(path, s)
  data = study.collect(config, tmp_path)
  random_qa = data.values[("facts", "random", "forget_qa")]
  assert study.fact_lookup_values(data, "facts", "forget_qa", "ap", matched=True) == random_qa
  assert study.fact_lookup_values(data, "facts", "forget_qa", "ap") == data.values[("facts", "fact_lookup", "forget_qa")]
  matched = {c["claim"].split(" (")[0]: c for c in study.claims(data, matched=True) if c["setting"] == "facts"}
  formats = matched["fact-lookup edits generalize to other prompt formats"]
  assert formats["protocol"] == "matched edit hyperparameters"
  ap_qa = data.values[("facts", "ap", "forget_qa")]
  diff = sum(random_qa[s] - ap_qa[s] for s in config.seeds) / 3
  assert any(d.startswith(f"forget_qa vs ap: {diff:+.3f}") for d in formats["details"]), formats["details"]
  assert not any(c["setting"] == "whole" for c in study.claims(data, matched=True))
  assert study.same_mask_contrasts(data, facts)["comparators"] == {0: ["random"], 1: ["random"], 2: ["random"]}
  # A same-mask cell with fact lookup's own edit config is fact lookup's cell again:
  # not a hyperparameter contrast.
  for seed in config.seeds:
    path = tmp_path / "cells" / f"facts__random__seed{seed}.json"
    s = io.read_json(path)
    s["spec"]["edit"]["forget_coef"] = 0.3
    io.write_json(path, s)
  assert study.same_mask_contrasts(study.collect(config, tmp_path), facts) is None
  identical = "Identical to the claims above"
  assert identical not in study.study_markdown(data, {})  # ap's c_f differs from fact lookup's

  def set_ap_forget_coef(value):
    for seed in config.seeds:
      path = tmp_path / "cells" / f"facts__ap__seed{seed}.json"
      s = io.read_json(path)
      s["spec"]["edit"]["forget_coef"] = value
      io.write_json(path, s)

  # When every comparator trained with fact lookup's edit config, the matched control is
  # the main protocol again: said once instead of repeated.
  set_ap_forget_coef(0.3)
  data = study.collect(config, tmp_path)
  assert study.claims(data, matched=True)
  text = study.study_markdown(data, {})
  assert identical in text and "matched edit hyperparameters" not in text.split(identical)[1]
  set_ap_forget_coef(1.0)
  # Without a same-mask cell at ap's config there is nothing to pair.
  set_ap_jaccard(set())
  for seed in config.seeds:
    path = tmp_path / "cells" / f"facts__random__seed{seed}.json"
    s = io.read_json(path)
    s["metrics"][study.MASK_JACCARD] = 0.5
    io.write_json(path, s)
  assert study.fact_lookup_values(study.collect(config, tmp_path), "facts", "forget_qa", "ap", matched=True) == {}


def _cell(fmt, answer, p, argmax=1.0, p_full=0.01, facts="forget_heldout"):
  return {
    "format": fmt,
    "facts": facts,
    "answer": answer,
    "n": 2,
    "prob_normalized": p,
    "prob_full": p_full,
    "argmax_candidates": argmax,
    "argmax_full": 0.0,
    "chance": 0.25,
  }


def test_robustness_metric_names_and_measures():
  """Relearning curves, soft prompts and side effects -> metric names (the tiny study
  runs without the attacks to stay fast)."""
  curve = {
    str(step): {
      "cells": [_cell("standard", "correct", 0.1 * step), _cell("standard", "edit", 0.5), _cell("qa", "correct", 0.2)]
    }
    for step in (0, 10, 20)
  }
  robust = {
    "relearn_lora": {"curve": curve},
    "relearn_full": {"curve": curve},
    "softprompt_prefix": {
      "summary": {"prob_normalized_mean": 0.4, "argmax_candidates_mean": 0.5},
      "before_eval": {"prob_normalized": 0.2, "prob_full": 0.01},
      "runs": [{"eval": {"prob_full": 0.1}}, {"eval": {"prob_full": 0.3}}],
    },
    "trivia": {"prob_normalized": 0.6, "accuracy": 0.7},
  }
  sports = study.robustness_metrics(robust, "sports")
  for name in (
    "relearn_lora_forget_step10",
    "relearn_lora_forget_step20",
    "relearn_full_forget_step20",
    "relearn_lora_forget_step20_argmax",
    "relearn_lora_edit_step0",
    "relearn_full_forget_qa_step10",
  ):
    assert name in sports, name
  assert sports["relearn_lora_forget_step20"] == pytest.approx(2.0)
  assert sports["softprompt_prefix_forget"] == 0.4 and sports["softprompt_prefix_forget_argmax"] == 0.5
  assert sports["trivia_accuracy"] == 0.6 and sports["trivia_accuracy_argmax"] == 0.7
  # CounterFact: full-vocabulary p of the first target token.
  cf = study.robustness_metrics(robust, "counterfact")
  assert cf["softprompt_prefix_forget"] == pytest.approx(0.2) and "softprompt_prefix_forget_argmax" not in cf
  assert cf["relearn_lora_forget_step20"] == pytest.approx(0.01)
  assert study.metrics._measure("counterfact", "paraphrase") == ("prob_full", "argmax_full")
  assert study.metrics._measure("counterfact", "mc") == ("prob_normalized", "argmax_candidates")
  # Probes: the class prior beside the accuracies.
  probes = {"chance": 0.25, "prior_true": 0.4, "prior_edit": None, "retrained": {"summary": {"forget_true_mean": 0.3}}}
  with_probes = study.robustness_metrics({"probes": probes}, "sports")
  assert with_probes["probe_true_mean"] == 0.3 and with_probes["probe_prior_true"] == 0.4
  assert "probe_prior_edit" not in with_probes


def test_a_whole_set_splits_trained_half_has_its_own_metrics():
  cells = [
    _cell("standard", "correct", 0.3, facts="forget"),
    _cell("standard", "correct", 0.01, facts="forget_train"),
    _cell("standard", "edit", 0.98, facts="forget_train"),
    _cell("standard", "correct", 0.9, facts="maintain"),
  ]
  out = {}
  study.metrics._format_cells(out, cells, "sports")
  assert out["forget_standard"] == 0.3 and out["maintain_standard"] == 0.9
  assert out["forget_train_standard"] == 0.01 and out["edit_train_standard"] == 0.98
  assert "forget_train_standard_argmax" in out


def _tiny_config():
  values = study_sports.get_config("tiny").to_dict()
  values["settings"] = {"sports_random16": values["settings"]["sports_random16"]}
  values["setting_order"] = ("sports_random16",)
  values["seeds"] = (0,)
  base = values["base"]
  base["eval"]["formats"] = ("standard", "qa")  # fewer prompt shapes to compile
  base["edit"]["lr"] = 3e-2
  r = base["robustness"]
  # The attacks compile per attacked model and dominate a tiny cell's time; their
  # metric names are covered by test_robustness_metric_names_and_measures.
  r["soft_prompt"] = False
  r["relearn"] = False
  r["trivia_path"] = str(REFERENCE_DATA / "side_effect_sport_answers.json")
  if not (REFERENCE_DATA / "side_effect_sport_answers.json").is_file():
    r["trivia"] = False
  return study.StudyConfig.from_dict(values)


def test_tiny_study_end_to_end_resumes_and_skips_finished_cells(tmp_path, monkeypatch):
  config = _tiny_config()
  out = tmp_path / "results"
  # The first cell is killed in its robustness stages; the rerun resumes it.
  real = run_lib.robustness_for_run
  calls = {"n": 0}

  def killed_once(*args, **kwargs):
    calls["n"] += 1
    if calls["n"] == 1:
      raise KeyboardInterrupt
    return real(*args, **kwargs)

  monkeypatch.setattr(run_lib, "robustness_for_run", killed_once)
  with pytest.raises(KeyboardInterrupt):
    study.run_study(config, tmp_path / "work", out)
  first_dir = tmp_path / "work" / "cells" / "sports_random16" / "fact_lookup" / "seed0"
  assert (first_dir / "evaluation" / "edited.json").is_file()  # the edit had finished
  # `--plan` reads where the killed cell resumes; no cell has finished to set a pace.
  states = study.cell_states(config, tmp_path / "work", out)
  assert [(s.cell.method, s.status) for s in states] == [("fact_lookup", "started"), ("random_mlps", "pending")]
  assert states[0].seconds > 0 and "edit done; robustness outputs written" in states[0].detail
  assert study.remaining_seconds(states) is None
  # A cell killed inside its edit resumes from its latest orbax checkpoint: a copy of
  # the run folder without the edited evaluation stands for one.
  killed_in_edit = tmp_path / "plan_check"
  shutil.copytree(first_dir, study.Cell("sports_random16", "fact_lookup", 0).run_dir(killed_in_edit))
  shutil.rmtree(study.Cell("sports_random16", "fact_lookup", 0).run_dir(killed_in_edit) / "evaluation")
  [state, _] = study.cell_states(config, killed_in_edit, out)
  steps = config.base["edit"]["steps"]
  assert state.status == "started" and f"edit checkpoint at step {steps} of {steps}" in state.detail, state
  outcomes = study.run_study(config, tmp_path / "work", out, max_cells=1)
  assert [(o.cell.method, o.status) for o in outcomes] == [("fact_lookup", "ran")]  # stopped by max_cells
  states = study.cell_states(config, tmp_path / "work", out)
  assert [s.status for s in states] == ["done", "pending"]
  # One more cell at its pace, less the unedited control: the first cell computed its
  # seed's control (read from its recorded stages), which the next one reads.
  assert states[0].control_seconds > 0
  assert study.remaining_seconds(states) == pytest.approx(states[0].seconds - states[0].control_seconds)
  # A finish time the next cell cannot make at that pace stops the study before it.
  outcomes = study.run_study(config, tmp_path / "work", out, finish_by=time.time() + 0.5 * states[0].seconds)
  assert [(o.cell.method, o.status) for o in outcomes] == [("fact_lookup", "skipped")]
  assert [s.status for s in study.cell_states(config, tmp_path / "work", out)] == ["done", "pending"]
  timing = io.read_json(first_dir / "study_timing.json")
  assert len(timing["attempts"]) == 2
  # The killed attempt's stages count too: its edit ran in attempt 0.
  assert {(e["attempt"], e["stage"]) for e in timing["stages"]} >= {(0, "edit"), (1, "robustness (edited)")}
  outcomes = study.run_study(config, tmp_path / "work", out)
  assert [(o.cell.method, o.status) for o in outcomes] == [("fact_lookup", "skipped"), ("random_mlps", "ran")]

  rows = list(csv.DictReader(open(out / "study.csv")))
  assert list(rows[0]) == list(study.CSV_COLUMNS)
  names = {(r["method"], r["metric"]) for r in rows}
  expected = [
    "forget_standard",
    "edit_standard",
    "maintain_standard",
    "forget_qa",
    "edit_qa",
    "forget_qa_argmax",
    "probe_true_mean",
    "probe_edit_mean",
    "probe_true_layer00",
    "retain_kl",
    "trained_parameters",
    "cell_seconds",
  ] + (["trivia_accuracy", "trivia_accuracy_argmax"] if config.base["robustness"]["trivia"] else [])
  for method in ("fact_lookup", "random_mlps"):
    missing = [m for m in expected if (method, m) not in names]
    assert not missing, (method, missing)
  assert ("unedited", "forget_standard") in names and ("unedited", "cell_seconds") not in names
  summary = io.read_json(out / "cells" / "sports_random16__fact_lookup__seed0.json")
  assert summary["cell_seconds"] == pytest.approx(sum(summary["attempt_seconds"]))
  assert summary["metrics"]["trained_parameters"] == summary["trained_parameters"] > 0
  # The cell's stages as data: the edit at the top level, the attacks inside the suite.
  stages = {(e["parent"], e["stage"]) for e in summary["stage_seconds"]}
  assert {(None, "edit"), ("robustness (edited)", "latent probes")} <= stages, stages
  # The unedited control, knowledge and evidence were computed once and shared.
  shared = list((tmp_path / "work" / "shared").glob("sports_random16-*/seed0/unedited/evaluation/unedited.json"))
  assert len(shared) == 1
  assert not (first_dir / "evaluation" / "unedited.json").exists()
  assert len(list((tmp_path / "work" / "shared" / "knowledge").glob("*.json"))) == 1
  # What each cell trained, against its seed's fact-lookup mask.
  flu_units = [f"mlp{layer}" for layer in summary["flu_layers"]]
  assert summary["mask_units"] == flu_units and summary["mask_other_matrices"] == []
  assert summary["metrics"][study.MASK_JACCARD] == 1.0
  rand = io.read_json(out / "cells" / "sports_random16__random_mlps__seed0.json")
  assert len(rand["mask_units"]) == len(flu_units) and all(u.startswith("mlp") for u in rand["mask_units"])
  shared_units = len(set(rand["mask_units"]) & set(flu_units))
  assert rand["metrics"][study.MASK_JACCARD] == pytest.approx(shared_units / (2 * len(flu_units) - shared_units))
  assert summary["mask_record_source"] == "cell"
  # Summaries written before the mask record existed get it from the cell's own mask
  # file, or, without the cell's run folder, from its localization stage rerun on the
  # shared evidence: equal to what the cell recorded either way.
  recorded = {}
  for method in ("fact_lookup", "random_mlps"):
    for path in (
      out / "cells" / f"sports_random16__{method}__seed0.json",
      tmp_path / "work" / "cells" / "sports_random16" / method / "seed0" / "study_cell.json",
    ):
      s = io.read_json(path)
      recorded[path] = (s.pop("mask_units"), s.pop("mask_other_matrices"), s["metrics"].pop(study.MASK_JACCARD))
      s.pop("mask_record_source")
      io.write_json(path, s)
  study.run_study(config, tmp_path / "work", out)
  for path, (units, other, jaccard) in recorded.items():
    s = io.read_json(path)
    assert (s["mask_units"], s["mask_other_matrices"], s["metrics"][study.MASK_JACCARD]) == (units, other, jaccard)
    assert s["mask_record_source"] == "cell"  # the run folders are there
  random_summary = out / "cells" / "sports_random16__random_mlps__seed0.json"
  s = io.read_json(random_summary)
  units = (s.pop("mask_units"), s.pop("mask_other_matrices"), s["metrics"].pop(study.MASK_JACCARD))
  io.write_json(random_summary, s)
  run_dir = tmp_path / "work" / "cells" / "sports_random16" / "random_mlps" / "seed0"
  (run_dir / "localization" / "mask.npz").rename(tmp_path / "moved_mask.npz")
  (run_dir / "study_cell.json").unlink()
  shutil.rmtree(tmp_path / "work" / "mask_records")  # nothing computed before is read back
  study.run_study(config, tmp_path / "work", out)
  s = io.read_json(random_summary)
  assert (s["mask_units"], s["mask_other_matrices"], s["metrics"][study.MASK_JACCARD]) == units
  assert s["mask_record_source"] == "rebuilt"
  (tmp_path / "moved_mask.npz").rename(run_dir / "localization" / "mask.npz")
  text = (out / "study.md").read_text()
  assert "## sports_random16" in text and "| random_mlps |" in text and "## Claims of the paper" in text
  assert f"| {', '.join(flu_units)} | {summary['flu_layers']} | 1.000 |" in text  # the cells table
  assert "## Where a cell's time goes" in text and "latent probes |" in text
  assert (out / "figures" / "sports_random16_probes.png").is_file()

  # A rerun never reruns a finished cell.
  def refuse(*args, **kwargs):
    raise AssertionError("a finished cell was rerun")

  monkeypatch.setattr(run_lib, "run_experiment", refuse)
  outcomes = study.run_study(config, tmp_path / "work", out)
  assert {o.status for o in outcomes} == {"skipped"}
  # ... and a changed config is refused instead of mixed into the tables.
  changed = _tiny_config()
  changed = study.StudyConfig(
    settings=changed.settings,
    methods=changed.methods,
    seeds=changed.seeds,
    base=dict(changed.base, edit=dict(changed.base["edit"], steps=4)),
  )
  with pytest.raises(ValueError, match=r"another config.*edit\.steps: 3 -> 4"):
    study.run_study(changed, tmp_path / "work", out)

  # The results folder keeps the shared outputs; a fresh workdir (a new checkout)
  # gets them back instead of recomputing them.
  monkeypatch.undo()
  kept = sorted(p.relative_to(out / "shared") for p in (out / "shared").rglob("*.json"))
  assert any(p.name == "unedited.json" for p in kept) and any(p.parts[0] == "knowledge" for p in kept)
  (out / "cells" / "sports_random16__random_mlps__seed0.json").unlink()
  outcomes = study.run_study(config, tmp_path / "fresh", out, only_methods=["random_mlps"])
  assert [o.status for o in outcomes] == ["ran"]
  for rel in kept:  # read back, not recomputed (a recomputed record has its own timing)
    assert (tmp_path / "fresh" / "shared" / rel).read_bytes() == (out / "shared" / rel).read_bytes(), rel


def test_plan_states_pace_and_time_left_from_files(tmp_path):
  config = study.StudyConfig(
    settings=(study.StudySetting("facts", "sports", "random_16"), study.StudySetting("whole", "sports", "basketball")),
    methods=("fact_lookup", "ap", "random"),
    seeds=(0, 1),
  )
  work, out = tmp_path / "work", tmp_path / "results"
  for method, seconds in (("fact_lookup", 100.0), ("random", 300.0)):
    io.write_json(out / "cells" / f"facts__{method}__seed0.json", dict(_summary("facts", method, 0, {}, {}), cell_seconds=seconds))
  # A twin's summary names its original; it took seconds and does not set the pace.
  io.write_json(
    out / "cells" / "facts__ap__seed0.json",
    dict(_summary("facts", "ap", 0, {}, {}), reused_from="fact_lookup", cell_seconds=1.0),
  )
  # Finished in the workdir, its summary not yet copied to the results folder.
  io.write_json(study.Cell("facts", "fact_lookup", 1).run_dir(work) / "study_cell.json", dict(
    _summary("facts", "fact_lookup", 1, {}, {}), cell_seconds=200.0))
  io.write_json(study.Cell("facts", "ap", 1).run_dir(work) / "study_timing.json", {"attempts": [50.0, 30.0], "stages": []})
  io.write_json(study.Cell("facts", "random", 1).run_dir(work) / "study_timing.json", {"attempts": [20.0], "stages": []})
  io.write_json(out / "failures.json", {"facts/random/seed1": "RuntimeError: out of memory"})
  states = {s.cell.label: s for s in study.cell_states(config, work, out)}
  assert [(s.status, s.seconds) for s in states.values()][:6] == [
    ("done", 100.0), ("reused", 1.0), ("done", 300.0), ("done", 200.0), ("started", 80.0), ("failed", 20.0)
  ]
  assert states["facts/ap/seed0"].detail == "the same edit as fact_lookup"
  assert states["facts/ap/seed1"].detail == "2 attempt(s) recorded; before the edit's first checkpoint"
  assert states["facts/random/seed1"].detail == (
    "RuntimeError: out of memory; resumes at: before the edit's first checkpoint"
  )
  assert {states[f"whole/{m}/seed{k}"].status for m in config.methods for k in (0, 1)} == {"pending"}
  # A first attempt records its time when it ends; its run folder says it started.
  (study.Cell("whole", "ap", 1).run_dir(work) / "checkpoints").mkdir(parents=True)
  running = study.cell_states(config, work, out, only_settings=["whole"], only_seeds=[1], only_methods=["ap"])
  assert [(s.status, s.seconds) for s in running] == [("started", 0.0)]
  assert running[0].detail == "first attempt running or killed; before the edit's first checkpoint"
  # Pace: the median of the cells that ran (100, 200, 300 s), borrowed by the setting
  # without finished cells. Left: ap seed1 (200 - 80), the failed cell, six pending.
  assert study.remaining_seconds(list(states.values())) == pytest.approx(120.0 + 200.0 + 6 * 200.0)
  # A cell starts only if it ends by the finish time at that pace (ap seed1: 120 s left).
  in_order = list(states.values())
  started = states["facts/ap/seed1"]
  assert study.seconds_left(in_order, started) == pytest.approx(120.0)
  assert study.past_deadline(in_order, started.cell, now=1000.0, finish_by=1120.0) is None
  reason = study.past_deadline(in_order, started.cell, now=1000.0, finish_by=1060.0)
  assert reason == (
    "facts/ap/seed1 needs about 2.0 min at the median finished cell's pace and 1.0 min are left before the finish time"
  )
  assert study.past_deadline(in_order, states["facts/fact_lookup/seed0"].cell, now=1000.0, finish_by=0.0) is None
  pending = [study.CellState(s.cell, "pending") for s in in_order]  # no pace yet: it runs
  assert study.past_deadline(pending, started.cell, now=1000.0, finish_by=0.0) is None
  # The cells a run would start by a finish time: ap seed1 (120 s), the failed random
  # seed1 (200 s), not the next pending one (200 s more); none can be planned without a pace.
  fitting = study.cells_before(in_order, now=0.0, finish_by=330.0)
  assert [s.cell.label for s in fitting] == ["facts/ap/seed1", "facts/random/seed1"]
  assert study.cells_before(pending, now=0.0, finish_by=330.0) is None
  assert "start and end by" in study.plan_markdown(in_order, now=0.0, finish_by=330.0)
  assert "(2): facts/ap/seed1, facts/random/seed1." in study.plan_markdown(in_order, now=0.0, finish_by=330.0)
  # A plan of some cells paces them by the whole study's finished cells (median 200 s),
  # as the runner does, not by the shown cells' own (random seed0 alone: 300 s).
  only_random = [s for s in in_order if s.cell.method == "random"]
  assert [s.cell.label for s in study.cells_before(only_random, now=0.0, finish_by=250.0, paced_by=in_order)] == [
    "facts/random/seed1"
  ]
  assert study.cells_before(only_random, now=0.0, finish_by=250.0) == []  # its own pace: 300 s
  paced = study.plan_markdown(only_random, now=0.0, finish_by=250.0, paced_by=in_order)
  assert "| facts | 1 | 0 | 0 | 1 | 0 | 3 min |" in paced and "(1): facts/random/seed1." in paced
  assert "| facts | 1 | 0 | 0 | 1 | 0 | 5 min |" in study.plan_markdown(only_random)
  text = study.plan_markdown(list(states.values()))
  assert "| facts | 3 | 1 | 1 | 1 | 0 | 3 min |" in text and "| whole | 0 | 0 | 0 | 0 | 6 | 3 min (other settings') |" in text
  assert "4 of 12 cells finished" in text and "- facts/random/seed1: failed, 20 s so far; RuntimeError" in text


def test_plan_counts_each_seeds_unedited_control_once(tmp_path):
  config = study.StudyConfig(
    settings=(study.StudySetting("facts", "sports", "random_16"),), methods=("fact_lookup", "ap", "random"), seeds=(0, 1)
  )
  work, out = tmp_path / "work", tmp_path / "results"

  def finished(method, seconds, control_stages):
    stages = [{"stage": name, "parent": None, "seconds": t} for name, t in control_stages]
    # Only top-level stages count: an inner stage of that name is another stage's part.
    stages += [{"stage": "edit", "parent": None, "seconds": 300.0}, {"stage": "evaluate unedited", "parent": "edit", "seconds": 9.0}]
    summary = dict(_summary("facts", method, 0, {}, {}), cell_seconds=seconds, stage_seconds=stages)
    io.write_json(out / "cells" / f"facts__{method}__seed0.json", summary)

  # Seed 0's first cell computed the control (100 + 500 s); the next one read it (5 + 15 s).
  finished("fact_lookup", 1000.0, [("evaluate unedited", 100.0), ("robustness (unedited)", 500.0)])
  finished("ap", 420.0, [("evaluate unedited", 5.0), ("robustness (unedited)", 15.0)])
  states = study.cell_states(config, work, out)
  assert [s.control_seconds for s in states[:2]] == [600.0, 20.0]
  # A cell takes 400 s without the control (both finished cells); seed 1's first cell
  # also computes its control (600 s), once: 400 + (400 + 600) + 400 + 400.
  assert study.remaining_seconds(states) == pytest.approx(2200.0)
  fitting = study.cells_before(states, now=0.0, finish_by=1500.0)
  assert [s.cell.label for s in fitting] == ["facts/random/seed0", "facts/fact_lookup/seed1"]
  first_of_seed1 = states[3].cell
  assert study.past_deadline(states, first_of_seed1, now=0.0, finish_by=1000.0) is None
  assert study.past_deadline(states, first_of_seed1, now=0.0, finish_by=900.0) == (
    "facts/fact_lookup/seed1 needs about 16.7 min at the median finished cell's pace (with its seed's unedited"
    " control, 10.0 min) and 15.0 min are left before the finish time"
  )
  text = study.plan_markdown(states)
  assert "| facts | 2 | 0 | 0 | 0 | 4 | 7 min |" in text and "unedited control: 10 min more" in text


def test_finish_by_flag_reads_iso_times_and_names_itself_when_it_cannot():
  from launch.study import parse_finish_by  # pylint: disable=g-import-not-at-top  (defines absl flags)

  assert parse_finish_by("") is None
  assert parse_finish_by("2026-12-07T18:30+01:00") == 1796664600.0  # 17:30 UTC
  with pytest.raises(ValueError, match=r"--finish_by must be an ISO 8601 time .* got '18h30'"):
    parse_finish_by("18h30")


def test_stage_times_nest_each_inner_stage_under_its_own_parent():
  """A later cell's new inner stage ("localize ap" under "cell mask") is listed under its
  parent, not under whichever stage the first cell ran last; medians are per cell."""
  def entry(stage, seconds, parent=None):
    return {"stage": stage, "parent": parent, "depth": int(parent is not None), "seconds": seconds}

  first = [entry("cell mask", 2.0), entry("localize fact_lookup", 1.0, "cell mask"), entry("edit", 100.0),
           entry("robustness (edited)", 50.0), entry("relearn_lora", 30.0, "robustness (edited)")]
  second = [entry("cell mask", 6.0), entry("localize ap", 5.0, "cell mask"), entry("edit", 80.0),
            entry("robustness (edited)", 40.0), entry("relearn_lora", 10.0, "robustness (edited)"),
            entry("relearn_lora", 4.0, "robustness (edited)")]  # a second attempt: summed per cell
  text = study.report.stage_time_markdown([{"stage_seconds": first}, {"stage_seconds": second}])
  rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
  names = [r[0].removeprefix("| ").replace("&nbsp;", "") for r in rows]
  assert names == ["cell mask", "localize fact_lookup", "localize ap", "edit", "robustness (edited)", "relearn_lora"]
  assert [r[0].count("&nbsp;") for r in rows] == [0, 4, 4, 0, 0, 4]
  assert [float(r[1]) for r in rows] == [4.0, 1.0, 5.0, 90.0, 45.0, 22.0]
  assert [int(r[2].rstrip(" |")) for r in rows] == [2, 1, 1, 2, 2, 2]


def test_intervals_are_cut_to_the_metrics_range():
  wide = study.Interval(n=2, mean=0.95, lo=-0.4, hi=2.3, sd=0.1)
  assert study.aggregate._fmt_interval(wide, "forget_qa") == "0.950 [0.000, 1.000]"
  assert study.aggregate._fmt_interval(wide, "retain_kl") == "0.9500 [0.0000, 2.3000]"  # KL has no upper bound
  assert study.aggregate._fmt_interval(study.Interval(1, 0.5, None, None, None), "forget_qa") == "0.500 (n=1)"


def test_figures_draw_a_copied_method_once_and_cut_intervals_to_the_range(tmp_path):
  config = study.StudyConfig(
    settings=(study.StudySetting("facts", "sports", "random_16"),),
    methods=("fact_lookup", "ct", "ap_mlps", "ct_mlps"),
    seeds=(0, 1),
  )
  unedited = {"forget_standard": 0.8, "forget_qa": 0.7, "retain_kl": 0.0}
  # ct_mlps and ct copy fact lookup in both seeds; ap_mlps in seed 1 only, so it ran in
  # seed 0 and is drawn.
  reused = {("ct_mlps", 0): "fact_lookup", ("ct_mlps", 1): "fact_lookup", ("ct", 0): "fact_lookup",
            ("ct", 1): "fact_lookup", ("ap_mlps", 1): "fact_lookup"}
  for seed in config.seeds:
    for method in config.methods:
      kl = {0: 0.001, 1: 0.2}[seed] if method != "ap_mlps" or seed == 1 else 0.05
      m = {"forget_standard": 0.1, "forget_qa": 0.2, "retain_kl": kl, "relearn_lora_forget_step20": 0.5}
      s = _summary("facts", method, seed, m, unedited)
      if (method, seed) in reused:
        s["reused_from"] = reused[(method, seed)]
      io.write_json(tmp_path / "cells" / f"facts__{method}__seed{seed}.json", s)
  data = study.collect(config, tmp_path)
  assert study.report.copied_methods(data, "facts") == {"ct_mlps": "fact_lookup", "ct": "fact_lookup"}
  assert study.report.plotted_methods(data, "facts", "forget_qa") == [
    ("unedited", "unedited"),
    ("fact_lookup", "fact_lookup (= ct, ct_mlps: the same edit)"),
    ("ap_mlps", "ap_mlps"),
  ]
  # Two seeds at KL 0.001 and 0.2: the t-interval runs far below zero; drawn from 0.
  raw = data.interval("facts", "fact_lookup", "retain_kl")
  assert raw.lo < 0
  _, mean, lo, hi = study.report._series(data, "facts", "fact_lookup", ["retain_kl"])
  assert lo == [0.0] and hi == [pytest.approx(raw.hi)] and mean == [pytest.approx(0.1005)]
  study.write_outputs(config, tmp_path)
  assert (tmp_path / "figures" / "facts_formats_vs_side_effects.png").is_file()
  assert (tmp_path / "figures" / "facts_relearning.png").is_file()


def test_a_cell_with_a_finished_twin_takes_its_results_which_equal_a_real_run(tmp_path):
  # On the tiny model, seed 2's AP-MLPs and CT-MLPs masks are the same MLP and both
  # methods are in the output-tracing tuning family: the same edit.
  config = dataclasses.replace(_tiny_config(), methods=("ap_mlps", "ct_mlps"), seeds=(2,))
  out = tmp_path / "results"
  outcomes = study.run_study(config, tmp_path / "work", out)
  assert [(o.cell.method, o.status) for o in outcomes] == [("ap_mlps", "ran"), ("ct_mlps", "reused")]
  twin = io.read_json(out / "cells" / "sports_random16__ap_mlps__seed2.json")
  reused = io.read_json(out / "cells" / "sports_random16__ct_mlps__seed2.json")
  assert reused["reused_from"] == "ap_mlps" and reused["mask_units"] == twin["mask_units"]
  assert reused["spec"]["localize"]["method"] == "ct_mlps" and reused["mask_name"] == "ct_mlps"
  assert "ct_mlps (results of ap_mlps: the same edit)" in (out / "study.md").read_text()
  # Run for real in a fresh study, CT-MLPs gives the numbers it took.
  alone = dataclasses.replace(config, methods=("ct_mlps",), reuse_identical_edits=False)
  assert [o.status for o in study.run_study(alone, tmp_path / "alone", tmp_path / "alone_results")] == ["ran"]
  real = io.read_json(tmp_path / "alone_results" / "cells" / "sports_random16__ct_mlps__seed2.json")
  assert real["mask_units"] == reused["mask_units"]
  differ = {
    k: (v, real["metrics"][k])
    for k, v in reused["metrics"].items()
    if k != "cell_seconds" and v != pytest.approx(real["metrics"][k], rel=1e-5, abs=1e-6)
  }
  assert not differ, differ
  assert set(real["metrics"]) == set(reused["metrics"])
  # A different edit config (another tuning family's values) is no twin.
  other = dataclasses.replace(config, tuned_edit={"output_tracing": {"forget_coef": 2.0}})
  spec = other.cell_spec(study.Cell("sports_random16", "ct_mlps", 2))
  record = {"units": twin["mask_units"], "other_matrices": twin["mask_other_matrices"]}
  assert study.find_twin(other, study.Cell("sports_random16", "ct_mlps", 2), spec, twin["flu_layers"], record, out) is None
  same = config.cell_spec(study.Cell("sports_random16", "ct_mlps", 2))
  cell = study.Cell("sports_random16", "ct_mlps", 2)
  found = study.find_twin(config, cell, same, twin["flu_layers"], record, out)
  assert found is not None and found["method"] == "ap_mlps"
  # Other FLU layers, another matrix, or a part of a matrix: no twin.
  assert study.find_twin(config, cell, same, [0], record, out) is None
  assert study.find_twin(config, cell, same, twin["flu_layers"], dict(record, other_matrices=["attn0.query"]), out) is None
  part = dict(record, units=[], other_matrices=[f"{u}.gating_linear (part)" for u in record["units"]])
  assert study.find_twin(config, cell, same, twin["flu_layers"], part, out) is None
  # The twin check is part of the cell's attempt and its recorded time.
  assert reused["attempt_seconds"] and reused["cell_seconds"] == pytest.approx(sum(reused["attempt_seconds"]))
  assert any(e["stage"] == "cell mask" for e in reused["stage_seconds"])


def test_verdicts_count_only_comparisons_between_different_masks():
  iv = lambda lo, hi: study.Interval(n=3, mean=(lo + hi) / 2, lo=lo, hi=hi, sd=0.1)
  one = study.Interval(n=1, mean=0.1, lo=None, hi=None, sd=None)
  same = study.Comparison("forget_qa", "ct_mlps", iv(0.1, 0.2), True, seeds=(0, 1, 2), same_mask_seeds=(0, 1, 2))
  partly = study.Comparison("forget_qa", "ap_mlps", iv(0.1, 0.2), True, seeds=(0, 1, 2), same_mask_seeds=(1,))
  better = study.Comparison("forget_qa", "ap", iv(-0.2, -0.1), True, seeds=(0, 1, 2))
  untestable = study.Comparison("forget_qa", "ct", one, True, seeds=(0,))
  assert same.outcome == "same mask" and partly.outcome == "worse" and better.outcome == "better"
  assert "seeds 0, 1, 2" in better.text() and "same mask as fact_lookup in seed(s) 1" in partly.text()
  assert study.comparisons._verdict([same, better]).startswith("holds (all 1 comparisons significantly better; 1 left out")
  assert study.comparisons._verdict([same, partly, better]).startswith("does not hold (1 of 2")
  assert study.comparisons._verdict([same]).startswith("cannot be tested: every comparator trained the fact-lookup mask")
  # An untestable comparison beside a same-mask one is not "every comparator has the mask".
  assert study.comparisons._verdict([same, untestable]).startswith("cannot be tested yet")


def test_verdicts_are_provisional_until_every_comparator_has_three_paired_seeds(tmp_path):
  config = study.StudyConfig(
    settings=(study.StudySetting("facts", "sports", "random_16"),), methods=("fact_lookup", "ap", "ct"), seeds=(0, 1, 2)
  )
  unedited = {"forget_qa": 0.9}

  def verdict(cells):
    for method, seed, qa in cells:
      m = {"forget_qa": qa, "trained_parameters": 100}
      io.write_json(tmp_path / "cells" / f"facts__{method}__seed{seed}.json", _summary("facts", method, seed, m, unedited))
    by_claim = {c["claim"].split(" (")[0]: c["verdict"] for c in study.claims(study.collect(config, tmp_path))}
    return by_claim["fact-lookup edits generalize to other prompt formats"]

  cells = [("fact_lookup", s, 0.1 + 0.01 * s) for s in (0, 1, 2)] + [("ap", s, 0.6 + 0.02 * s) for s in (0, 1, 2)]
  # One ct seed: fact lookup beats ap, but ct could still undo "holds".
  v = verdict(cells + [("ct", 0, 0.7)])
  assert v.startswith("holds (all 1") and v.endswith("; provisional: fewer than 3 paired seeds for ct (1)"), v
  # Two: counted (a t-interval), still provisional; three: final.
  v = verdict([("ct", 1, 0.72)])
  assert v.startswith("holds (all 2") and v.endswith("for ct (2)"), v
  assert "provisional" not in verdict([("ct", 2, 0.71)])
  # A "does not hold" decided only by a two-seed comparison is provisional...
  (tmp_path / "cells" / "facts__ct__seed2.json").unlink()
  v = verdict([("ct", s, 0.02 + 0.0101 * s) for s in (0, 1)])
  assert v.startswith("does not hold (1 of 2") and v.endswith("for ct (2)"), v
  # ...one on three seeds is final, whatever else is still thin.
  v = verdict([("ap", s, 0.05 - 0.01 * s) for s in (0, 1, 2)])
  assert v.startswith("does not hold (2 of 2") and "provisional" not in v, v


def test_headline_table_means_valid_formats_and_same_mask_counts(tmp_path):
  config = study.StudyConfig(
    settings=(study.StudySetting("facts", "sports", "random_16"),), methods=("fact_lookup", "ct"), seeds=(0, 1),
  )
  unedited = {"forget_standard": 0.8, "forget_qa": 0.7, "forget_mc": 0.3, "retain_kl": 0.0}
  for seed in config.seeds:
    for method, p, jaccard in (("fact_lookup", 0.1, 1.0), ("ct", 0.2 + 0.1 * seed, 1.0 if seed == 0 else 0.5)):
      m = {
        "forget_standard": p, "forget_qa": 2 * p, "forget_mc": 0.9, "relearn_lora_forget_step10": 0.5,
        "relearn_lora_forget_step20": 0.6 + 0.1 * seed, "probe_true_mean": 0.4, "retain_kl": 0.01,
        "trained_parameters": 100, study.MASK_JACCARD: jaccard,
      }
      io.write_json(tmp_path / "cells" / f"facts__{method}__seed{seed}.json", _summary("facts", method, seed, m, unedited))
  data = study.collect(config, tmp_path)
  text = study.headline_markdown(data, config.settings[0])
  lines = text.splitlines()
  header = next(l for l in lines if l.startswith("| method |"))
  # mc is at chance in the constructed validity: no headline column; the last relearning step only.
  assert header == (
    "| method | seeds | same mask | trained parameters | standard | qa | LoRA relearning, step 20 |"
    " probe vs true answer | retain KL |"
  )
  rows = {l.split(" | ")[0][2:]: l for l in lines if l.startswith("| ") and not l.startswith("| method")}
  assert rows["unedited"] == "| unedited | 2 | - | - | 0.800 | 0.700 | - | - | 0.0000 |"
  assert rows["fact_lookup"] == "| fact_lookup | 2 | 2 | 100 | 0.100 | 0.200 | 0.650 | 0.400 | 0.0100 |"
  assert rows["ct"] == "| ct | 2 | 1 | 100 | 0.250 | 0.500 | 0.650 | 0.400 | 0.0100 |"
  assert text in study.study_markdown(data, {})
  per_seed = study.per_seed_markdown(data, config.settings[0])
  assert "| ct | 1 | - | 0.500 | 1 | 0.300 | 0.600 | 0.700 | 0.400 | 0.0100 |" in per_seed
  assert "| fact_lookup | 0 | - | 1.000 | 0.3 | 0.100 | 0.200 | 0.600 | 0.400 | 0.0100 |" in per_seed
  assert per_seed in study.study_markdown(data, {})


def test_neighborhood_is_reported_as_a_side_effect_not_a_forget_format(tmp_path):
  # CounterFact neighborhood prompts are about other subjects with the same true object:
  # their p(true) should stay high, so it is not a forget format in the headline, Table 1,
  # the formats claim or the formats figure, but a labelled side-effect column.
  config = study.StudyConfig(
    settings=(study.StudySetting("cf", "counterfact", "random_16"),), methods=("fact_lookup", "ct"), seeds=(0, 1),
  )
  unedited = {"forget_standard": 0.7, "forget_paraphrase": 0.2, "forget_neighborhood": 0.2, "retain_kl": 0.0}
  for seed in config.seeds:
    for method, p in (("fact_lookup", 0.1), ("ct", 0.3)):
      m = {
        "forget_standard": p, "edit_standard": 0.9, "forget_paraphrase": p, "edit_paraphrase": 0.5,
        "forget_neighborhood": 0.4 + 0.1 * seed, "edit_neighborhood": 0.02, "maintain_standard": 0.9,
        "retain_kl": 0.01 + 0.01 * seed, "trained_parameters": 100,
      }
      s = _summary("cf", method, seed, m, unedited, valid=("standard", "paraphrase", "neighborhood"))
      s["spec"]["eval"]["formats"] = ["standard", "paraphrase", "neighborhood", "mc"]
      s["format_validity"] = {
        f: dict(s["format_validity"]["standard"], format=f, valid=f != "mc")
        for f in ("standard", "paraphrase", "neighborhood", "mc")
      }
      io.write_json(tmp_path / "cells" / f"cf__{method}__seed{seed}.json", s)
  data = study.collect(config, tmp_path)
  header = next(l for l in study.headline_markdown(data, config.settings[0]).splitlines() if l.startswith("| method |"))
  assert header == (
    "| method | seeds | same mask | trained parameters | standard | paraphrase | neighborhood p(true), side effect |"
    " retain KL |"
  )
  tables = dict(study.table_columns(data, "cf"))
  t1, t3 = (cols for title, cols in tables.items() if title.startswith(("Table 1", "Table 3")))
  assert "forget_neighborhood" not in t1 and "forget_paraphrase" in t1
  assert {"forget_neighborhood", "edit_neighborhood"} <= set(t3)
  claims = {c["claim"]: c for c in study.claims(data) if c["setting"] == "cf"}
  formats_claim = next(c for k, c in claims.items() if "formats" in k)
  side_claim = next(c for k, c in claims.items() if "side effects" in k)
  assert "forget_neighborhood" not in json.dumps(formats_claim)
  assert "forget_neighborhood" in json.dumps(side_claim)


def test_sync_shared_copies_missing_and_upgraded_outputs_only(tmp_path):
  import os

  src, dst = tmp_path / "workdir_shared", tmp_path / "results_shared"
  io.write_json(src / "k" / "seed0" / "evaluation.json", {"cells": [], "version": 2})
  io.write_json(src / "k" / "seed0" / "same.json", {"a": 1})
  io.write_json(src / "k" / "seed0" / "local.json", {"kept": "newer in dst"})
  (src / "k" / "big.txt").write_text("not a kept suffix")
  io.write_json(dst / "k" / "seed0" / "evaluation.json", {"cells": [], "version": 1})
  io.write_json(dst / "k" / "seed0" / "same.json", {"a": 1})
  io.write_json(dst / "k" / "seed0" / "local.json", {"kept": "this one"})
  # dst's evaluation is older than src's (an upgraded output); dst's local.json is newer.
  os.utime(dst / "k" / "seed0" / "evaluation.json", (1_000, 1_000))
  os.utime(src / "k" / "seed0" / "local.json", (1_000, 1_000))

  assert study.sync_shared(src, dst) == 1
  assert io.read_json(dst / "k" / "seed0" / "evaluation.json")["version"] == 2
  assert io.read_json(dst / "k" / "seed0" / "local.json") == {"kept": "this one"}
  assert not (dst / "k" / "big.txt").exists()
  io.write_json(src / "k" / "seed1" / "new.json", {"b": 2})
  assert study.sync_shared(src, dst) == 1  # only the new file; nothing else differs
  assert study.sync_shared(src, dst) == 0
