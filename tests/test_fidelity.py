"""Method-fidelity fixes: each test fails on the code before its fix."""

import jax
import numpy as np
import pytest

from mech_unlearn_jax.batch import FactBatch
from mech_unlearn_jax.data import facts as facts_lib
from mech_unlearn_jax.data import splits as splits_lib
from mech_unlearn_jax.data.tasks import DataConfig, get_task
from mech_unlearn_jax.evals import scoring
from mech_unlearn_jax.experiment import report, stages
from mech_unlearn_jax.localize import ablation
from mech_unlearn_jax.models import config as config_lib
from mech_unlearn_jax.models import forward, transformer

TINY = config_lib.get_preset("tiny-gemma3")


def test_knowledge_filter_uses_the_evaluations_candidates():
  """The filter scores over the same 4 sports (golf included) as the evaluation."""
  task = get_task("sports")
  evaluation = task.eval_formats([], None, 0)["standard"]
  assert task.knowledge_format(DataConfig()).fixed_answers == evaluation.fixed_answers
  assert " golf" in task.knowledge_format(DataConfig()).fixed_answers
  # The reference's 3-way filter stays reachable.
  three = task.knowledge_format(DataConfig(known_candidates="three_sports")).fixed_answers
  assert set(three) == {" " + s for s in facts_lib.SPORTS}


def test_localization_traces_the_forget_facts_first():
  pool = facts_lib.load_sports_facts(None)[:120]
  task = get_task("sports")
  split = splits_lib.make_sports_split(pool, "random_8", seed=1)
  facts = stages.localization_facts(task, pool, split, 12)
  assert [f.key for f in facts[:8]] == list(split.forget_train)
  assert len(facts) == 12 and len({f.key for f in facts}) == 12


def test_counterfact_mc_is_an_inner_join(reference_data_dir):
  facts = facts_lib.load_counterfact(
      reference_data_dir / "counterfact_with_prompts.csv", reference_data_dir / "counterfact_mc_questions.parquet"
  )
  task = get_task("counterfact")
  without = [f for f in facts if f.mc is None]
  assert without, "the reference data has facts without an MC question"
  usable = task.usable_facts("mc", facts[:200])
  assert all(f.mc is not None for f in usable) and len(usable) < 200
  assert task.usable_facts("standard", facts[:200]) == facts[:200]


def test_counterfact_reports_full_vocabulary_p():
  """2-way normalized p makes forget = 1 - edit; the summary uses full-vocab p instead."""
  cell = lambda answer, pn, pf: {"format": "standard", "facts": "forget", "answer": answer, "n": 4,
                                 "prob_normalized": pn, "prob_full": pf, "argmax_candidates": 0.5}
  before = {"cells": [cell("correct", 0.9, 0.6), cell("edit", 0.1, 0.02)]}
  after = {"cells": [cell("correct", 0.2, 0.05), cell("edit", 0.8, 0.3)]}
  rows = report.summarize(before, after, "prob_full")
  assert [r["edited_prob"] for r in rows] == [0.05, 0.3]
  assert "full-vocabulary" in report.markdown_table(rows, {})
  # Letter multiple choice answers with an option letter: its p is normalized over the
  # letters in CounterFact runs too (a letter's full-vocabulary p is not an accuracy),
  # in the results table and the relearning rows alike.
  mc = lambda answer, pn, pf: dict(cell(answer, pn, pf), format="mc")
  rows = report.summarize({"cells": [mc("correct", 0.4, 0.01)]}, {"cells": [mc("correct", 0.3, 0.02)]}, "prob_full")
  assert (rows[0]["unedited_prob"], rows[0]["edited_prob"], rows[0]["measure"]) == (0.4, 0.3, "prob_normalized")
  table = report.markdown_table(rows + report.summarize(before, after, "prob_full"), {})
  assert "letter multiple choice: normalized over the option letters" in table
  robust = {"edited": {"relearn_lora": {"curve": {"0": {"cells": [mc("correct", 0.4, 0.01), cell("correct", 0.9, 0.6)]}}}}}
  (row,) = report.relearn_rows(robust, ["standard", "mc"], "prob_full")
  assert (row["standard"], row["mc"]) == (0.6, 0.4)
  # A CounterFact run evaluated in letter MC alone still reports its other tables (soft
  # prompts, relearning's edit column) in full-vocabulary p: the run records its measure.
  only_mc = {"measure": "prob_full", "summary": rows}
  assert report._measure(only_mc) == "prob_full" and report._measure({"summary": rows}) == "prob_normalized"


def _identical_rows_batch(n=4):
  # One subject token per row and identical rows: the mean over subject positions is
  # each row's own activation, so mean-ablation changes nothing.
  seq = [2, 5, 6, 40, 7, 8]
  tokens, positions = forward.left_pad([seq] * n, multiple=8)
  subject = np.zeros(tokens.shape, bool)
  subject[:, tokens.shape[1] - len(seq) + 3] = True
  answers = np.full(n, TINY.vocab_size - 1, np.int32)
  wrong = np.tile(np.array([[TINY.vocab_size - 2, TINY.vocab_size - 3]], np.int32), (n, 1))
  return FactBatch(tokens, positions, answers, wrong, subject)


def test_mean_ablation_total_effect():
  model = transformer.build_transformer(TINY, jax.random.key(0))
  batch = _identical_rows_batch()
  result = ablation.mlp_mean_ablation(model, batch, chunk_size=2)
  assert result.effect.shape == (TINY.num_layers,)
  np.testing.assert_allclose(result.effect, 0.0, atol=1e-6)
  clean = scoring.score_facts(model, batch).prob_normalized.mean()
  assert result.clean_p == pytest.approx(float(clean), abs=1e-5)
  # Different subjects: ablating an MLP at the subject tokens does change p(true).
  rng = np.random.default_rng(0)
  seqs = [[2, 5, 6, int(t), 7, 8] for t in rng.integers(20, 400, size=6)]
  tokens, positions = forward.left_pad(seqs, multiple=8)
  varied = FactBatch(tokens, positions, batch.answer_ids_B[:1].repeat(6), np.repeat(batch.wrong_ids_BxK[:1], 6, 0),
                     np.pad(batch.subject_mask_BxL[:1], ((0, 0), (0, 0))).repeat(6, 0))
  assert np.abs(ablation.mlp_mean_ablation(model, varied).effect).max() > 1e-4
