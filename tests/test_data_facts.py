"""Fact loaders: reference tables, the embedded athletes table, list reprs, bad input."""

import ast
import collections
import csv
import random

import numpy as np
import pytest

from mech_unlearn_jax.data import facts as facts_lib
from mech_unlearn_jax.data.facts import (
    SPORTS,
    FactsDataError,
    load_counterfact,
    load_counterfact_all,
    load_sports_facts,
)
from mech_unlearn_jax.data.list_repr import parse_list_repr


# --------------------------------------------------------------------------- list reprs


@pytest.mark.parametrize(
    "text, expected",
    [
        ("['a' 'b']", ["a", "b"]),
        ("['first one' 'second'\n 'third']", ["first one", "second", "third"]),
        ("[\"Danielle Darrieux's mother tongue is\"\n 'Where is it']", ["Danielle Darrieux's mother tongue is", "Where is it"]),
        ("['it\\'s' \"say \\\"hi\\\"\"]", ["it's", 'say "hi"']),
        ("['line\\nbreak\\ttab' 'J.\\xa0R.\\xa0R. Tolkien' 'caf\\u00e9' 'back\\\\slash']",
         ["line\nbreak\ttab", "J.\u00a0R.\u00a0R. Tolkien", "caf\u00e9", "back\\slash"]),
        ("['a', 'b',\n 'c']", ["a", "b", "c"]),
        ("['a', 'b',]", ["a", "b"]),
        ("[]", []),
        ("  [ ]  ", []),
        ("['[not] a list' ', comma']", ["[not] a list", ", comma"]),
        ("['Léon Blum' 'Melchior de Vogüé']", ["Léon Blum", "Melchior de Vogüé"]),
        ("['\\N{GREEK SMALL LETTER ALPHA}\\101\\d']", ["\u03b1A\\d"]),
        ("[u'unicode prefix']", ["unicode prefix"]),
    ],
)
def test_parse_list_repr_cases(text, expected):
  assert parse_list_repr(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("'a' 'b'", "expected '['"),
        ("['a' 'b'", "missing closing"),
        ("['a 'b']", "unexpected character"),
        ("['unterminated]", "unterminated"),
        ("['a'] trailing", "after the closing"),
        ("['a' ... 'z']", "summarized"),
        ("[1, 2]", "unexpected character"),
        ("['a',, 'b']", "empty element"),
        ("[, 'a']", "empty element"),
        ("['a' + 'b']", "unexpected character"),
        ("['bad \\x4']", "bad \\x escape"),
        ("['__import__(\"os\")' __import__('os')]", "unexpected character"),
        ("['split\nacross lines']", "newline inside"),
    ],
)
def test_parse_list_repr_rejects_malformed(text, message):
  with pytest.raises(ValueError, match="character") as info:
    parse_list_repr(text)
  assert message in str(info.value)


def test_parse_list_repr_round_trips_numpy_str():
  # The tables were written with str(numpy_array): check that exact producer on
  # strings full of quotes, backslashes, newlines and non-ASCII text.
  rng = random.Random(0)
  alphabet = list("abc XYZ'\"\\\n\t,[]{}.:é\u00a0ü世") + ["\u2581"]
  for _ in range(200):
    strings = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))).strip() or "x" for _ in range(rng.randint(1, 12))]
    text = str(np.array(strings))
    assert parse_list_repr(text) == strings, text


def test_parse_list_repr_agrees_with_python_literals():
  rng = random.Random(1)
  alphabet = list("ab'\"\\\n\tü ")
  for _ in range(200):
    strings = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8))) for _ in range(rng.randint(0, 5))]
    text = repr(strings)
    # literal_eval is fine here: the test builds the text itself.
    assert parse_list_repr(text) == ast.literal_eval(text) == strings


# --------------------------------------------------------------------------- reference data


def test_reference_sports_table(reference_data_dir):
  facts = load_sports_facts(reference_data_dir / "sports.csv")
  assert len(facts) == 1559
  assert collections.Counter(f.sport for f in facts) == {"basketball": 490, "baseball": 486, "football": 583}
  assert [f.row_index for f in facts] == list(range(1559))
  assert facts[0].athlete == "DeForest Buckner" and facts[0].sport == "football"
  assert all(f.inject_sport_without_golf in SPORTS for f in facts)
  assert all(f.inject_sport_without_golf != f.sport for f in facts)
  assert all(f.inject_sport_with_golf not in (None, f.sport) for f in facts)
  assert len({f.athlete for f in facts}) == 1559


def test_reference_counterfact_with_mc(reference_data_dir):
  facts = load_counterfact(
      reference_data_dir / "counterfact_with_prompts.csv",
      reference_data_dir / "counterfact_mc_questions.parquet",
  )
  assert len(facts) == 2189
  first = facts[0]
  assert first.prompt == "The mother tongue of Danielle Darrieux is"
  assert first.subject == "Danielle Darrieux"
  assert (first.target_true, first.target_false) == (" French", " English")
  assert first.relation_id == "P103" and first.prompt_id == 0
  assert first.mc.question == "What is the mother tongue of Danielle Darrieux?"
  assert first.mc.target_true == "French"
  assert first.mc.targets_false == ("English", "Spanish", "Italian")
  assert all(len(f.paraphrase_prompts) == 2 for f in facts)
  assert all(len(f.neighborhood_prompts) == 10 for f in facts)
  assert all(f.subject in f.prompt and not f.prompt.endswith(" ") for f in facts)
  assert all(f.subject in p for f in facts for p in f.paraphrase_prompts)
  assert all(f.target_true.startswith(" ") and f.target_false.startswith(" ") for f in facts)
  assert len({f.prompt_id for f in facts}) == 2189
  with_mc = [f for f in facts if f.mc is not None]
  assert len(with_mc) == 2168  # some facts have no MC question
  assert all(len(f.mc.targets_false) == 3 for f in with_mc)
  # Escapes inside the stored reprs are decoded (a non-breaking space, not "\\xa0").
  assert not any("\\x" in p for f in facts for p in f.neighborhood_prompts)


def test_reference_counterfact_all_matches_prompt_table(reference_data_dir):
  everything = load_counterfact_all(reference_data_dir / "counterfact_all.parquet")
  assert len(everything) == 21919
  assert [f.prompt_id for f in everything[:3]] == [0, 1, 2]
  assert all(f.paraphrase_prompts == () for f in everything[:10])
  subset = load_counterfact(reference_data_dir / "counterfact_with_prompts.csv")
  for fact in subset[::50]:
    same = everything[fact.prompt_id]
    assert (same.prompt, same.subject, same.target_true, same.target_false) == (
        fact.prompt, fact.subject, fact.target_true, fact.target_false)


# --------------------------------------------------------------------------- embedded table


KNOWN_MULTI_SPORT_ATHLETES = [
    "Bo Jackson", "Deion Sanders", "Michael Jordan", "Brian Jordan", "Danny Ainge", "Jim Thorpe",
    "Dave DeBusschere", "Russell Wilson", "John Elway", "Tim Tebow", "Otto Graham", "Bud Grant",
    "George Halas", "Charlie Ward", "Drew Henson", "Mark Hendrickson", "Kyler Murray",
]


def test_embedded_table_size_counts_and_consistency():
  facts = load_sports_facts()
  assert len(facts) >= 600
  counts = collections.Counter(f.sport for f in facts)
  assert set(counts) == set(SPORTS)
  assert all(counts[sport] >= 200 for sport in SPORTS), counts
  names = [f.athlete for f in facts]
  assert len(set(name.casefold() for name in names)) == len(names)
  assert all(f.inject_sport_without_golf in SPORTS and f.inject_sport_without_golf != f.sport for f in facts)
  assert not set(names) & set(KNOWN_MULTI_SPORT_ATHLETES)
  # Shuffled rows: the first 16 already mix sports (first_16 splits stay balanced).
  assert len({f.sport for f in facts[:16]}) == 3


def test_embedded_table_columns():
  text = facts_lib.embedded_athletes_path().read_text(encoding="utf-8")
  assert text.splitlines()[0] == "athlete,sport,inject_sport_without_golf"


# --------------------------------------------------------------------------- bad input


def _write(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text, encoding="utf-8")
  return path


def test_missing_column_names_file_and_column(tmp_path):
  path = _write(tmp_path, "no_sport.csv", "athlete,league\nLeBron James,NBA\n")
  with pytest.raises(FactsDataError, match=r"no_sport\.csv.*missing column.*'sport'"):
    load_sports_facts(path)


def test_duplicate_athlete_is_error_or_first_kept(tmp_path):
  path = _write(tmp_path, "dupes.csv", "athlete,sport\nTom Brady,football\nMike Trout,baseball\nTom Brady,baseball\n")
  with pytest.raises(FactsDataError, match=r"dupes\.csv.*'athlete'.*'Tom Brady' \(rows 0 and 2\)"):
    load_sports_facts(path)
  with pytest.warns(UserWarning, match="keeping the first"):
    facts = load_sports_facts(path, on_duplicate="keep_first")
  assert [(f.athlete, f.sport, f.row_index) for f in facts] == [
      ("Tom Brady", "football", 0), ("Mike Trout", "baseball", 1)]


def test_unknown_sport_names_row(tmp_path):
  path = _write(tmp_path, "sports.csv", "athlete,sport\nTom Brady,football\nSerena Williams,tennis\n")
  with pytest.raises(FactsDataError, match=r"sports\.csv: column 'sport', row 1: unknown sport 'tennis'"):
    load_sports_facts(path)


def test_empty_string_and_injection_checks(tmp_path):
  path = _write(tmp_path, "empty.csv", "athlete,sport\n  ,football\n")
  with pytest.raises(FactsDataError, match=r"column 'athlete', row 0: empty string"):
    load_sports_facts(path)
  path = _write(tmp_path, "inject.csv",
                "athlete,sport,inject_sport_without_golf\nTom Brady,football,baseball\nMike Trout,baseball,baseball\n")
  with pytest.raises(FactsDataError, match=r"'inject_sport_without_golf', row 1: edit target 'baseball' equals"):
    load_sports_facts(path)
  path = _write(tmp_path, "golf.csv", "athlete,sport,inject_sport_without_golf\nTom Brady,football,golf\n")
  with pytest.raises(FactsDataError, match="unknown sport 'golf'"):
    load_sports_facts(path)


def test_names_that_pandas_would_call_missing_stay_strings(tmp_path):
  path = _write(tmp_path, "na.csv", "athlete,sport\nNA,football\nNone,baseball\n")
  assert [f.athlete for f in load_sports_facts(path)] == ["NA", "None"]


def test_missing_file_and_other_formats(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere.csv"):
    load_sports_facts(tmp_path / "nowhere.csv")
  with pytest.raises(FileNotFoundError):
    load_sports_facts(str(tmp_path / "nowhere"))
  path = _write(tmp_path, "facts.jsonl", '{"athlete": "Tom Brady", "sport": "Football "}\n')
  assert load_sports_facts(path)[0].sport == "football"


def _write_csv(tmp_path, name, header, rows):
  # The csv module quotes multi-line cells and inner quotes the way real tables do.
  path = tmp_path / name
  with open(path, "w", newline="", encoding="utf-8") as handle:
    writer = csv.writer(handle)
    writer.writerow(header.strip().split(","))
    writer.writerows(rows)
  return path


COUNTERFACT_HEADER = "prompt,subject,target_true,target_false,paraphrase_prompts,neighborhood_prompts,prompt_id\n"


def test_counterfact_placeholder_and_bad_lists(tmp_path):
  row = ["The capital of {} is", " France", " Paris", " Rome",
         "['Paris is where {} has its capital.'\n 'x {} y']",
         "['The capital of Gaul is' \"Italy's capital is\"]", "7"]
  facts = load_counterfact(_write_csv(tmp_path, "cf.csv", COUNTERFACT_HEADER, [row]))
  assert facts[0].prompt == "The capital of France is"
  assert facts[0].paraphrase_prompts == ("Paris is where France has its capital.", "x France y")
  assert facts[0].neighborhood_prompts == ("The capital of Gaul is", "Italy's capital is")
  assert (facts[0].target_true, facts[0].target_false, facts[0].prompt_id) == (" Paris", " Rome", 7)

  bad = COUNTERFACT_HEADER + "The capital of France is,France,Paris,Rome,['a' 'b',['c'],7\n"
  with pytest.raises(FactsDataError, match=r"cf_bad\.csv: column 'paraphrase_prompts', row 0"):
    load_counterfact(_write(tmp_path, "cf_bad.csv", bad))

  missing = "prompt,subject,target_true,paraphrase_prompts,neighborhood_prompts,prompt_id\n"
  with pytest.raises(FactsDataError, match=r"missing column.*'target_false'"):
    load_counterfact(_write(tmp_path, "cf_missing.csv", missing + "p,s,t,[],[],1\n"))

  absent = COUNTERFACT_HEADER + "The capital of France is,Spain,Paris,Rome,[],[],7\n"
  with pytest.raises(FactsDataError, match="subject 'Spain' not in"):
    load_counterfact(_write(tmp_path, "cf_absent.csv", absent))


def test_counterfact_mc_needs_three_distractors(tmp_path):
  facts_csv = _write(tmp_path, "cf.csv", COUNTERFACT_HEADER + "The capital of France is,France,Paris,Rome,[],[],7\n")
  mc = _write(tmp_path, "mc.json", '[{"question": "Capital of France?", "target_true": "Paris", '
                                   '"targets_false": ["Rome", "Oslo"], "prompt_id": 7}]')
  with pytest.raises(FactsDataError, match=r"mc\.json: column 'targets_false', row 0: expected 3 distractors"):
    load_counterfact(facts_csv, mc)
