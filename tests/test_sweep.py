"""The sweep score uses standard-format metrics only."""

from mech_unlearn_jax import sweep


def test_standard_format_score_ignores_other_formats():
  def row(fmt, facts, answer, p):
    return {"format": fmt, "facts": facts, "answer": answer, "edited_prob": p}
  results = {
      "summary": [
          row("standard", "forget", "correct", 0.1), row("standard", "forget", "edit", 0.8),
          row("standard", "maintain", "correct", 0.9), row("qa", "forget", "correct", 0.99),
      ],
      "edited": {"retain_text": {"accuracy": 0.4}, "kl_original_edited": 0.07},
  }
  score = sweep.standard_format_score(results)
  assert abs(score["score"] - (0.4 + 0.9 + 0.9 + 0.8)) < 1e-9
  results["summary"][3]["edited_prob"] = 0.0  # a robustness metric changes: score does not
  assert sweep.standard_format_score(results)["score"] == score["score"]
  # The retain KL is carried for reading and never enters the score.
  assert score["retain_kl"] == 0.07
  results["edited"]["kl_original_edited"] = 5.0
  assert sweep.standard_format_score(results)["score"] == score["score"]
  table = sweep.sweep_markdown({"rows": [dict(score, lr=1e-4, forget_coef=1.0)], "best": None}, "t")
  assert "| score | KL |" in table and "| 0.070 |" in table


def test_tiny_sweep_shares_stages_and_runs_lr_then_cf(tmp_path):
  import dataclasses

  from configs import sports_first16
  from mech_unlearn_jax import experiment, io
  from mech_unlearn_jax.models import loaders

  base = experiment.ExperimentSpec.from_dict(sports_first16.get_config("tiny").to_dict())
  base = dataclasses.replace(base, edit=dataclasses.replace(base.edit, steps=2, checkpoint_every=0))
  loaded = loaders.load_model_and_tokenizer(base.model, base.seed)
  rows = sweep.run_sweep(base, tmp_path, [1e-3, 1e-2], [1.0, 2.0], loaded=loaded)
  assert [(r["lr"], r["forget_coef"]) for r in rows][:2] == [(1e-3, 1.0), (1e-2, 1.0)] and len(rows) == 3
  best_lr = max(rows[:2], key=lambda r: r["score"])["lr"]
  assert (rows[2]["lr"], rows[2]["forget_coef"]) == (best_lr, 2.0)
  assert (tmp_path / "shared" / "knowledge.json").is_file()
  for row in rows:
    sub = tmp_path / f"lr{row['lr']:g}_cf{row['forget_coef']:g}"
    results = io.read_json(sub / "results.json")
    assert {r["format"] for r in results["summary"]} == {"standard"}
    assert not (sub / "knowledge.json").exists()  # read from the shared folder
  assert io.read_json(tmp_path / "sweep.json")["best"]["score"] == max(r["score"] for r in rows)
  table = (tmp_path / "sweep.md").read_text()
  assert table.count("| best |") == 1 and len([l for l in table.splitlines() if l.startswith("| 0.0")]) == 3


def test_a_stopped_sweep_leaves_its_finished_rows_readable(tmp_path, monkeypatch):
  from mech_unlearn_jax import experiment, io

  def results(p_forget):
    row = lambda facts, answer, p: {"format": "standard", "facts": facts, "answer": answer, "edited_prob": p}
    return {
        "summary": [row("forget", "correct", p_forget), row("forget", "edit", 0.9), row("maintain", "correct", 0.9)],
        "edited": {"retain_text": {"accuracy": 0.4}},
    }

  calls = []

  def fake_run(setting, workdir, **_):
    calls.append((setting.edit.lr, setting.edit.forget_coef))
    if len(calls) == 2 and stop_on_second:
      raise KeyboardInterrupt  # what SIGTERM / Ctrl-C raise in the main job
    return results(0.1 if setting.edit.lr == 1e-3 else 0.2)

  monkeypatch.setattr(sweep.experiment, "run_experiment", fake_run)
  base = experiment.ExperimentSpec()
  stop_on_second = True
  try:
    sweep.run_sweep(base, tmp_path, [1e-3, 1e-2], [1.0, 2.0], loaded=(None, None))
  except KeyboardInterrupt:
    pass
  record = io.read_json(tmp_path / "sweep.json")
  assert not record["finished"] and len(record["rows"]) == 1 and record["best"]["lr"] == 1e-3
  table = (tmp_path / "sweep.md").read_text()
  assert "**Incomplete**" in table and table.count("| best |") == 1

  stop_on_second = False
  rows = sweep.run_sweep(base, tmp_path, [1e-3, 1e-2], [1.0, 2.0], loaded=(None, None))
  assert [(r["lr"], r["forget_coef"]) for r in rows] == [(1e-3, 1.0), (1e-2, 1.0), (1e-3, 2.0)]
  assert io.read_json(tmp_path / "sweep.json")["finished"]
  assert "Incomplete" not in (tmp_path / "sweep.md").read_text()
