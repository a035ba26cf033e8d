"""Side-effect MC evaluations (sport trivia, MMLU-style benchmarks) on a tiny model."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

from mech_unlearn_jax.data.formats import LETTERS
from mech_unlearn_jax.evals import side_effects as se
from mech_unlearn_jax.models import config as config_lib
from mech_unlearn_jax.models import transformer

VOCAB = 4096
TINY = config_lib.get_preset("tiny-gemma3").replace(vocab_size=VOCAB)


class WordTokenizer:
  """Toy tokenizer: one id per whitespace-prefixed word (or newline), assigned on first use."""

  pad_id, bos_id = 0, 2

  def __init__(self):
    self.ids = {}

  def encode(self, text, add_bos=True):
    out = [self.bos_id] if add_bos else []
    for piece in re.findall(r"\n|[^\S\n]*[^\s]+", text):
      if piece not in self.ids:
        self.ids[piece] = 3 + len(self.ids)
        assert self.ids[piece] < VOCAB, "toy vocabulary full"
      out.append(self.ids[piece])
    return out


@pz.pytree_dataclass
class BiasedLM(pz.nn.Layer):
  """A model plus a constant logit bias: a huge bias makes its answer predictable."""

  base: pz.nn.Layer
  bias_V: jax.Array

  def __call__(self, tokens, **kwargs):
    return self.base(tokens, **kwargs) + pz.nx.wrap(self.bias_V).tag("vocabulary")


@pytest.fixture(scope="module")
def tiny_model():
  return transformer.build_transformer(TINY, jax.random.key(0))


def biased(model, tokenizer, piece):
  bias = jnp.zeros(VOCAB).at[tokenizer.encode(piece, add_bos=False)[0]].set(1e4)
  return BiasedLM(model, bias)


def test_sport_questions_become_seeded_shuffled_mc(reference_data_dir):
  questions = se.load_sport_questions(reference_data_dir / "side_effect_sport_answers.json")
  assert len(questions) == 200 and {q.answer for q in questions} == {"football", "baseball", "basketball", "tennis"}
  a = se.sport_mc_questions(questions, se.SPORT_OPTIONS, seed=0)
  b = se.sport_mc_questions(questions, se.SPORT_OPTIONS, seed=0)
  c = se.sport_mc_questions(questions, se.SPORT_OPTIONS, seed=1)
  assert a == b and a != c
  slots = np.array([q.answer_index for q in a])
  assert len(set(slots.tolist())) == 5 and np.bincount(slots).max() < 80
  assert all(sorted(q.choices) == sorted(se.SPORT_OPTIONS) and q.answer == q.group for q in a)
  shots, rest = se.pick_few_shot(a, 5, seed=0)
  assert len(shots) == 5 and len(rest) == 195 and not set(shots) & set(rest)
  assert {s.answer for s in shots} == {"football", "baseball", "basketball", "tennis"}
  prompt = se.mc_prompt(rest[0], shots, "letter")
  assert prompt.text.count("Question:") == 6 and prompt.text.endswith("Answer:")
  assert prompt.candidate_answers == (" A", " B", " C", " D", " E")
  assert se.mc_prompt(rest[0], shots, "text").candidate_answers[rest[0].answer_index] == " " + rest[0].answer


@pytest.mark.parametrize("scoring", ["letter", "sport"])
def test_sport_trivia_scores_the_right_slot(tiny_model, reference_data_dir, scoring):
  tok = WordTokenizer()
  path = reference_data_dir / "side_effect_sport_answers.json"
  config = se.SportTriviaConfig(scoring=scoring, max_questions=40, seed=3)
  mc = se.sport_mc_questions(se.load_sport_questions(path), config.options, config.seed)
  _, rest = se.pick_few_shot(mc, config.num_shots, config.seed, "sport_trivia_shots")
  rest = se.sample_questions(rest, 40, config.seed)
  if scoring == "letter":
    result = se.sport_trivia_eval(biased(tiny_model, tok, " B"), tok, path, config)
    want = np.mean([q.answer_index == 1 for q in rest])
    assert result.majority_rate == max(np.bincount([q.answer_index for q in rest]) / 40)
  else:
    result = se.sport_trivia_eval(biased(tiny_model, tok, " tennis"), tok, path, config)
    want = np.mean([q.answer == "tennis" for q in rest])
    assert result.per_group["tennis"]["accuracy"] == 1.0 and result.per_group["football"]["accuracy"] == 0.0
  assert result.n == 40 and result.accuracy == pytest.approx(want)
  assert result.chance == pytest.approx(0.2)
  lo, hi = result.interval95
  assert lo <= result.accuracy <= hi
  assert result.above_chance == (lo > 0.2)
  assert json.loads(json.dumps(result.to_json()))["num_shots"] == 5
  # Unbiased, the random model's scores are probabilities that sum to one.
  plain = se.sport_trivia_eval(tiny_model, tok, path, config)
  assert 0.0 < plain.prob_normalized < 1.0


def _mmlu_rows():
  rows = []
  for i in range(12):
    subject = "algebra" if i < 6 else "history"
    rows.append({
        "question": f"Question number {i} about {subject}?",
        "choices": [f"option{i}a", f"option{i}b", f"option{i}c", f"option{i}d"],
        "answer": i % 4,
        "subject": subject,
    })
  return rows


def test_mc_benchmark_from_local_files(tiny_model, tmp_path):
  rows = _mmlu_rows()
  jsonl = tmp_path / "mini_mmlu.jsonl"
  jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
  csv = tmp_path / "mini_mmlu.csv"
  lines = ["question,choices,answer,subject"]
  lines += [f"\"{r['question']}\",\"{r['choices']!r}\",{LETTERS[r['answer']]},{r['subject']}" for r in rows]
  csv.write_text("\n".join(lines) + "\n")
  questions = se.load_mc_questions(jsonl)
  assert se.load_mc_questions(csv) == questions
  assert questions[5] == se.MCQuestion(rows[5]["question"], tuple(rows[5]["choices"]), 1, "algebra")

  tok = WordTokenizer()
  config = se.MCBenchmarkConfig(name="mini", num_shots=2, seed=0)
  result = se.mc_benchmark_eval(biased(tiny_model, tok, " C"), tok, questions, config)
  assert result.n == 8 and set(result.per_group) == {"algebra", "history"}
  assert result.chance == 0.25 and result.num_shots == 2
  # Two questions per subject held out as shots: the score is the share of the rest
  # whose answer is C; recompute it from the seeded split.
  answered_c = result.per_group["algebra"]["accuracy"] * 4 + result.per_group["history"]["accuracy"] * 4
  assert result.accuracy == pytest.approx(answered_c / 8)
  few_shot = [q for q in questions if q.answer_index != 2][:2]
  evaluated = [q for q in questions if q not in few_shot]
  direct = se.mc_benchmark_eval(
      biased(tiny_model, tok, " C"), tok, evaluated, se.MCBenchmarkConfig(num_shots=2), few_shot=few_shot
  )
  assert direct.accuracy == pytest.approx(np.mean([q.answer_index == 2 for q in evaluated]))


def test_loader_errors_name_the_problem(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"question": "q?", "options": ["a", "b"], "answer": 0}) + "\n")
  with pytest.raises(se.SideEffectDataError, match="missing columns"):
    se.load_mc_questions(bad)
  bad.write_text(json.dumps({"question": "q?", "choices": ["a", "b"], "answer": 5}) + "\n")
  with pytest.raises(se.SideEffectDataError, match="row 0"):
    se.load_mc_questions(bad)
  with pytest.raises(FileNotFoundError):
    se.load_mc_questions(tmp_path / "absent.parquet")
  sports = tmp_path / "sports.json"
  sports.write_text(json.dumps([{"question": "Which sport?", "answer": "curling"}]))
  with pytest.raises(se.SideEffectDataError, match="curling"):
    se.sport_mc_questions(se.load_sport_questions(sports), se.SPORT_OPTIONS, 0)
