"""The main job end to end on a tiny random model (real tokenizer and prompts)."""

import json

import numpy as np
import pytest

from configs import sports_first16
from mech_unlearn_jax import experiment, io
from mech_unlearn_jax.data.tasks import get_task
from mech_unlearn_jax.experiment import stages
from mech_unlearn_jax.experiment.layout import RunLayout
from mech_unlearn_jax.models import loaders, transformer


def _spec(method="fact_lookup", **edit):
  config = sports_first16.get_config(f"{method},tiny")
  config.eval.formats = ("standard", "qa")
  config.edit.lr = 3e-2  # large, so a 3-step edit visibly moves the tiny model
  for key, value in edit.items():
    setattr(config.edit, key, value)
  return experiment.ExperimentSpec.from_dict(config.to_dict())


def _snapshot(root):
  return {
      str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
      for p in sorted(root.rglob("*")) if p.is_file() and "checkpoints" not in p.parts and p.name != ".lock"
  }


def _without_timings(tree):
  """A results tree without its wall times (the one part a rerun does not reproduce)."""
  if isinstance(tree, dict):
    return {k: _without_timings(v) for k, v in tree.items() if k != "seconds"}
  if isinstance(tree, list):
    return [_without_timings(v) for v in tree]
  return tree


def test_main_job_tiny_end_to_end_and_rerun_changes_nothing(tmp_path):
  spec = _spec()
  results = experiment.run_experiment(spec, tmp_path)
  for name in ("config.json", "knowledge.json", "split.json", "results.json", "results.md", "results.png",
               "localization/mask.npz", "localization/localization.json",
               "evaluation/unedited.json", "evaluation/edited.json"):
    assert (tmp_path / name).is_file(), name
  assert results["trained_parameters"] == 3 * 32 * 64  # one MLP unit of tiny-gemma3
  # Explicit layers are a manual mask, never called fact lookup.
  assert results["localization"]["mask_name"] == "manual_mlps"
  rows = {(r["format"], r["facts"], r["answer"]): r for r in results["summary"]}
  edit_row = rows[("standard", "forget", "edit")]
  assert edit_row["edited_prob"] > edit_row["unedited_prob"]  # the edit moved toward its targets
  assert [h["step"] for h in results["edit_history"]] == list(range(1, spec.edit.steps + 1))
  before = _snapshot(tmp_path)
  # A rerun of the finished job recomputes and rewrites nothing, history included.
  again = experiment.run_experiment(spec, tmp_path)
  assert again["summary"] == results["summary"]
  assert again["edit_history"] == results["edit_history"]
  assert _snapshot(tmp_path) == before
  assert results["measure"] == "prob_normalized"
  # An evaluation recorded before cells counted their facts is recomputed (format
  # validity would otherwise count prompts), with the same scores.
  stale = tmp_path / "evaluation" / "unedited.json"
  recorded = io.read_json(stale)
  io.write_json(stale, dict(recorded, cells=[{k: v for k, v in c.items() if k != "num_facts"} for c in recorded["cells"]]))
  again = experiment.run_experiment(spec, tmp_path)
  assert io.read_json(stale)["cells"] == recorded["cells"]
  assert again["summary"] == results["summary"] and again["format_validity"] == results["format_validity"]
  # A different config in the same workdir is refused, naming the key that differs.
  with pytest.raises(ValueError, match=r"different config.*config\.edit\.steps: 3 -> 4"):
    experiment.run_experiment(_spec(steps=4), tmp_path)


def test_stages_run_alone_and_edit_touches_only_the_mask(tmp_path):
  """The notebook path: each stage called with explicit arguments, nothing written."""
  spec = _spec(method="random_mlps")
  task = get_task(spec.data.task)
  model, tokenizer = loaders.load_model_and_tokenizer(spec.model, spec.seed)
  knowledge = stages.knowledge_stage(model, tokenizer, task, spec.data)
  split = stages.split_stage(task, knowledge.pool, spec.data.split, spec.seed)
  loc = stages.localization_stage(model, tokenizer, task, knowledge.pool, split, spec.localize, spec.seed)
  retain = stages.retain_stage(model, tokenizer, spec.retain, spec.model, spec.seed)
  data = stages.edit_data(tokenizer, task, knowledge.facts, split, False, retain.train)
  result = stages.edit_stage(model, loc.mask, data, spec.edit, None, spec.model, split)
  assert not list(tmp_path.iterdir())
  before = transformer.parameters_by_label(model)
  after = transformer.parameters_by_label(result.model)
  changed = {
      label for label in before
      if not np.array_equal(np.asarray(before[label].value.unwrap(*before[label].value.named_shape)),
                            np.asarray(after[label].value.unwrap(*before[label].value.named_shape)))
  }
  trained = {label for label, m in loc.mask.items() if np.any(m)}
  assert changed and changed <= trained
  assert loc.evidence["mask"]["name"] == "random_mlps"


def test_robustness_tables_and_attack_on_a_finished_run(tmp_path, monkeypatch):
  """launch.attack's path: the suite on a finished run without redoing the edit."""
  import dataclasses

  from mech_unlearn_jax.experiment import robustness
  from mech_unlearn_jax.experiment.robustness import RobustnessConfig

  scored = []
  score = robustness._eval_cells
  monkeypatch.setattr(robustness, "_eval_cells", lambda m, *a: scored.append(m) or score(m, *a))

  off = dataclasses.replace(RobustnessConfig(), relearn=False, probes=False, soft_prompt=False, trivia=False)
  spec = dataclasses.replace(_spec(), robustness=off)
  first = experiment.run_experiment(spec, tmp_path)
  assert first["robustness"] == {}
  checkpoint_files = sorted(p for p in (tmp_path / "checkpoints").rglob("*") if p.is_file())
  tiny = _spec().robustness  # the tiny variant's (small) attack settings
  attacked = experiment.attack_only(tmp_path, dataclasses.replace(tiny, soft_prompt=False, trivia=False))
  assert sorted(p for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()) == checkpoint_files
  assert attacked["summary"] == first["summary"]  # the edit was not redone
  for model in ("unedited", "edited"):
    curve = attacked["robustness"][model]["relearn_lora"]["curve"]
    assert sorted(curve, key=int) == ["0", "1", "2"]
    # Both attackers start from the same model: scored once at step 0, reported by both.
    assert attacked["robustness"][model]["relearn_full"]["curve"]["0"] == curve["0"]
    assert (tmp_path / "robustness" / model / "probes.json").is_file()
  assert len(scored) == 2 * (1 + 2 + 2)  # per model: step 0 once, steps 1 and 2 per attacker
  # The relearning attack trains toward the true answers: p(true) rises on the trained
  # (first) half of the unedited model's forget facts... and the curve is recorded per format.
  md = (tmp_path / "results.md").read_text()
  assert "### Relearning attack" in md and "### Latent-knowledge probes" in md
  assert (tmp_path / "relearning.png").is_file() and (tmp_path / "probes.png").is_file()
  # The layout that the study's plan and launch.compare_runs read is the one written.
  layout = RunLayout(tmp_path)
  for path in (layout.config, layout.knowledge, layout.split, layout.results_json, layout.results_md,
               layout.results_png, layout.evaluation("unedited"), layout.evaluation("edited")):
    assert path.is_file(), path
  for path in (layout.localization, layout.checkpoints(), layout.robustness("unedited"), layout.robustness("edited")):
    assert path.is_dir(), path
  # Reproducible from the workdir: with the suite's outputs deleted, launch.attack's path
  # recomputes the same numbers (every attack is seeded from the run's config).
  import shutil

  shutil.rmtree(tmp_path / "robustness")
  again = experiment.attack_only(tmp_path, dataclasses.replace(tiny, soft_prompt=False, trivia=False))
  assert _without_timings(again["robustness"]) == _without_timings(attacked["robustness"])


def test_second_run_on_a_busy_workdir_is_refused(tmp_path):
  from mech_unlearn_jax.experiment import run as run_lib

  with run_lib.workdir_lock(tmp_path):
    with pytest.raises(run_lib.WorkdirBusyError, match="another run"):
      experiment.run_experiment(_spec(), tmp_path)


def test_counterfact_tiny_end_to_end(tmp_path, reference_data_dir):
  from configs import counterfact_16

  config = counterfact_16.get_config("tiny")
  config.data.counterfact_path = str(reference_data_dir / "counterfact_with_prompts.csv")
  config.data.counterfact_mc_path = str(reference_data_dir / "counterfact_mc_questions.parquet")
  # Every CounterFact format, and the paper's CounterFact rule picking the layers (the
  # study's cells run it; the tiny variant otherwise fixes them).
  config.localize.layers = ()
  spec = experiment.ExperimentSpec.from_dict(config.to_dict())
  results = experiment.run_experiment(spec, tmp_path)
  assert results["split"]["few_shot"] == 64 and results["split"]["forget_train"] == 4
  assert {r["format"] for r in results["summary"]} == {"standard", "paraphrase", "neighborhood", "mc"}
  assert results["knowledge"]["measure"] == "prob_full"
  assert results["localization"]["flu_layers"]
  # Full-vocabulary p of the first target token, except letter MC (over the letters).
  assert {r["format"]: r["measure"] for r in results["summary"]} == {
      "standard": "prob_full", "paraphrase": "prob_full", "neighborhood": "prob_full", "mc": "prob_normalized",
  }
  # Validity counts facts: two paraphrases and ~10 neighborhood prompts per fact.
  validity = results["format_validity"]
  assert validity["paraphrase"]["n"] == 2 * validity["paraphrase"]["num_facts"]
  assert validity["neighborhood"]["n"] > validity["neighborhood"]["num_facts"]


def test_counterfact_sequential_rounds(tmp_path, reference_data_dir):
  """Four rounds, each editing the previous round's model, evaluated after every round."""
  from configs import counterfact_sequential
  from mech_unlearn_jax.experiment import run as run_lib

  config = counterfact_sequential.get_config("tiny")
  config.data.counterfact_path = str(reference_data_dir / "counterfact_with_prompts.csv")
  config.data.counterfact_mc_path = str(reference_data_dir / "counterfact_mc_questions.parquet")
  config.eval.formats = ("standard",)
  for stage in ("relearn", "probes", "soft_prompt", "trivia"):
    setattr(config.robustness, stage, False)
  spec = experiment.ExperimentSpec.from_dict(config.to_dict())
  results = experiment.run_experiment(spec, tmp_path)
  rounds = results["sequential_rounds"]
  assert [r["edited_so_far"] for r in rounds] == [1, 2, 3, 4]
  assert sorted({h["round"] for h in results["edit_history"]}) == [0, 1, 2, 3]
  for r in range(4):
    assert (tmp_path / "checkpoints" / f"round_{r}").is_dir()
    assert (tmp_path / "evaluation" / f"round_{r}.json").is_file()
  split = json.loads((tmp_path / "split.json").read_text())
  sub = run_lib.round_split(experiment.run.splits_lib.Split.read(tmp_path / "split.json"), 4, 2)
  assert sub.forget_train == (split["forget_train"][2],) and len(sub.forget_eval) == 3
  assert not set(split["forget_train"]) & set(split["maintain_train"] + split["maintain_test"])
  with pytest.raises(ValueError, match="sequential_rounds=3 must divide"):
    run_lib.round_split(experiment.run.splits_lib.Split.read(tmp_path / "split.json"), 3, 0)


def test_whole_sport_run_keeps_the_held_out_half_out_of_localization_and_probes_it(tmp_path):
  from configs import sports_basketball
  from mech_unlearn_jax import io

  config = sports_basketball.get_config("tiny")
  config.eval.formats = ("standard",)
  config.edit.lr = 3e-2
  r = config.robustness
  r.relearn = r.soft_prompt = r.trivia = False  # the probes are the stage under test
  spec = experiment.ExperimentSpec.from_dict(config.to_dict())
  experiment.run_experiment(spec, tmp_path)
  split = stages.splits_lib.Split.read(tmp_path / "split.json")
  held_out = set(split.forget_eval)
  assert held_out and not held_out & set(split.forget_train)
  # Localization never sees the held-out half, however many facts it asks for.
  task = get_task("sports")
  in_split = {*split.forget_train, *split.forget_eval, *split.maintain_train, *split.maintain_test}
  pool = [f for f in task.load(spec.data) if f.key in in_split]
  for n in (4, len(pool)):
    chosen = stages.localization_facts(task, pool, split, n)
    assert not {f.key for f in chosen} & held_out and [f.key for f in chosen[:2]] == list(split.forget_train[:2])
  # The trained half is scored too (standard format, true and edit answers).
  cells = {(c["facts"], c["answer"]) for c in io.read_json(tmp_path / "evaluation" / "edited.json")["cells"]}
  assert {("forget_train", "correct"), ("forget_train", "edit"), ("forget", "correct")} <= cells
  # Probes fit on the maintain facts and the trained half, so the held-out athletes'
  # sport is a class they know: every held-out row counts toward the true accuracy.
  probes = io.read_json(tmp_path / "robustness" / "edited" / "probes.json")
  assert probes["num_train"] == len(split.maintain_train) + len(split.forget_train)
  assert probes["retrained"]["num_forget_true"] == len(split.forget_eval)
  assert probes["retrained"]["forget_true_accuracy"] is not None
