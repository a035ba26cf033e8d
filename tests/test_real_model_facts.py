"""On the real Gemma 3 270M, famous athletes score highest in every format it answers.

Letter multiple choice is excluded: this model answers it at chance (see the baseline
report in the README), so it says nothing about a single fact.
"""

import pytest

from mech_unlearn_jax.data import facts as facts_lib
from mech_unlearn_jax.data import formats as formats_lib
from mech_unlearn_jax.evals import formats_eval, scoring

KNOWN = [("LeBron James", "basketball"), ("Tom Brady", "football"), ("Babe Ruth", "baseball")]


@pytest.fixture(scope="module")
def real():
  try:
    from mech_unlearn_jax.models import loaders
    from mech_unlearn_jax.models.loaders import load_tokenizer
    loaders.default_gguf_path()
  except ImportError as e:
    pytest.skip(f"default model package not installed: {e}")
  return loaders.load_model("default"), load_tokenizer("default")


@pytest.mark.parametrize("fmt_name", ["standard", "qa", "declarative", "cloze"])
def test_famous_athletes_score_highest(real, fmt_name):
  model, tokenizer = real
  facts = [facts_lib.SportsFact(athlete=a, sport=s, inject_sport_without_golf=None, row_index=i)
           for i, (a, s) in enumerate(KNOWN)]
  fmt = formats_lib.sports_formats(include_golf=True)[fmt_name]
  batch, _ = formats_eval.prompts_to_batch(tokenizer, fmt.format_batch(facts))
  scores = scoring.score_facts(model, batch)
  assert scores.correct_argmax_candidates.all(), (fmt_name, scores.candidate_probs)
