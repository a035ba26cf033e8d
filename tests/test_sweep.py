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
      "edited": {"retain_text": {"accuracy": 0.4}},
  }
  score = sweep.standard_format_score(results)
  assert abs(score["score"] - (0.4 + 0.9 + 0.9 + 0.8)) < 1e-9
  results["summary"][3]["edited_prob"] = 0.0  # a robustness metric changes: score does not
  assert sweep.standard_format_score(results)["score"] == score["score"]
