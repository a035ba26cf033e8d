"""The main job end to end on a tiny random model (real tokenizer and prompts)."""

import json

import numpy as np
import pytest

from configs import sports_first16
from mech_unlearn_jax import experiment
from mech_unlearn_jax.models import transformer


def _spec(method="fact_lookup", **edit):
  config = sports_first16.get_config(f"{method},tiny")
  config.eval.formats = "standard,qa"
  config.edit.lr = 3e-2  # large, so a 3-step edit visibly moves the tiny model
  for key, value in edit.items():
    setattr(config.edit, key, value)
  return experiment.ExperimentSpec.from_dict(config.to_dict())


def test_main_job_tiny_end_to_end_and_resume(tmp_path):
  spec = _spec()
  results = experiment.run_experiment(spec, tmp_path)
  for name in ("config.json", "knowledge.json", "split.json", "results.json", "results.md", "results.png",
               "localization/mask.npz", "localization/localization.json"):
    assert (tmp_path / name).is_file(), name
  assert results["trained_parameters"] == 3 * 32 * 64  # one MLP unit of tiny-gemma3
  rows = {(r["format"], r["facts"], r["answer"]): r for r in results["summary"]}
  edit_row = rows[("standard", "forget", "edit")]
  assert edit_row["edited_prob"] > edit_row["unedited_prob"]  # the edit moved toward its targets
  assert len(results["edit_history"]) == spec.edit.steps
  # A second call resumes: nothing is recomputed that changes the results.
  again = experiment.run_experiment(spec, tmp_path)
  assert again["summary"] == results["summary"]
  # A different config in the same workdir is refused with a clear message.
  with pytest.raises(ValueError, match="different config"):
    experiment.run_experiment(_spec(steps=4), tmp_path)


def test_edit_touches_only_the_mask(tmp_path):
  spec = _spec(method="random_mlps")
  model, tokenizer = experiment.load_model_and_tokenizer(spec)
  facts, pool = experiment.knowledge_stage(model, tokenizer, spec, tmp_path)
  split = experiment.split_stage(pool, spec, tmp_path)
  mask, loc = experiment.localization_stage(model, tokenizer, pool, spec, tmp_path)
  retain_train, _ = experiment.retain_stage(model, tokenizer, spec)
  result = experiment.edit_stage(model, tokenizer, facts, split, mask, retain_train, spec, tmp_path)
  before = transformer.parameters_by_label(model)
  after = transformer.parameters_by_label(result.model)
  changed = {
      label for label in before
      if not np.array_equal(np.asarray(before[label].value.unwrap(*before[label].value.named_shape)),
                            np.asarray(after[label].value.unwrap(*before[label].value.named_shape)))
  }
  trained = {label for label, m in mask.items() if np.any(m)}
  assert changed and changed <= trained
  assert json.loads((tmp_path / "localization" / "localization.json").read_text())["mask"]["name"] == "random_mlps"


def test_counterfact_tiny_end_to_end(tmp_path, reference_data_dir):
  from configs import counterfact_16

  config = counterfact_16.get_config("tiny")
  config.data.counterfact_path = str(reference_data_dir / "counterfact_with_prompts.csv")
  config.data.counterfact_mc_path = str(reference_data_dir / "counterfact_mc_questions.parquet")
  config.eval.formats = "standard,mc"
  spec = experiment.ExperimentSpec.from_dict(config.to_dict())
  results = experiment.run_experiment(spec, tmp_path)
  assert results["split"]["few_shot"] == 64 and results["split"]["forget_train"] == 4
  assert {r["format"] for r in results["summary"]} == {"standard", "mc"}
