"""Splits: sizes, disjointness, seeded determinism, JSON round trips, too-small pools."""

import json

import numpy as np
import pytest

from mech_unlearn_jax.data.facts import SPORTS, SportsFact, load_counterfact, load_sports_facts
from mech_unlearn_jax.data.splits import (
    Split,
    SplitTooSmallError,
    filter_known,
    make_counterfact_split,
    make_sports_split,
)


@pytest.fixture(scope="module")
def athletes():
  return load_sports_facts()


@pytest.fixture(scope="module")
def counterfact(reference_data_dir):
  return load_counterfact(reference_data_dir / "counterfact_with_prompts.csv")


def _all_keys(split):
  return [key for part in Split.PARTS for key in split.keys(part) if part != "forget_eval"]


def test_filter_known():
  facts = load_sports_facts()[:5]
  kept = filter_known(facts, [0.9, 0.5, 0.49, 1.0, 0.0], threshold=0.5)
  assert kept == [facts[0], facts[1], facts[3]]
  assert filter_known(facts, np.full(5, 0.7)) == facts
  with pytest.raises(ValueError, match=r"shape \(4,\); expected \(5,\)"):
    filter_known(facts, [0.9] * 4)
  with pytest.raises(ValueError, match=r"not finite at fact index\(es\) \[2\]"):
    filter_known(facts, [0.9, 0.9, float("nan"), 0.9, 0.9])


@pytest.mark.parametrize("count", [16, 64])
def test_sports_first_n(athletes, count):
  split = make_sports_split(athletes, f"first_{count}", seed=3)
  assert split.forget_train == tuple(f.athlete for f in athletes[:count])
  assert split.forget_eval == split.forget_train
  assert split.forget_train_targets == tuple(f.inject_sport_without_golf for f in athletes[:count])
  assert len(split.maintain_train) + len(split.maintain_test) == len(athletes) - count
  assert len(split.maintain_train) == round(0.8 * (len(athletes) - count))
  keys = _all_keys(split)
  assert len(keys) == len(set(keys)) == len(athletes)
  assert split.pool_size == len(athletes) and split.dataset == "sports"
  assert make_sports_split(athletes, f"first_{count}", seed=3) == split
  other_seed = make_sports_split(athletes, f"first_{count}", seed=4)
  assert other_seed.forget_train == split.forget_train
  assert set(other_seed.maintain_test) != set(split.maintain_test)


def test_sports_targets_without_injection_column(athletes):
  pool = [SportsFact(f.athlete, f.sport, None, f.row_index) for f in athletes[:100]]
  split = make_sports_split(pool, "first_64", seed=0)
  by_name = {f.athlete: f for f in pool}
  assert all(t in SPORTS and t != by_name[k].sport for k, t in zip(split.forget_train, split.forget_train_targets))
  assert len(set(split.forget_train_targets)) == 3
  assert make_sports_split(pool, "first_64", seed=0).forget_train_targets == split.forget_train_targets


@pytest.mark.parametrize("sport", SPORTS)
def test_whole_sport_split(athletes, sport):
  split = make_sports_split(athletes, sport, seed=0)
  of_sport = [f.athlete for f in athletes if f.sport == sport]
  half = len(of_sport) // 2
  assert split.forget_train == tuple(of_sport[:half])
  assert split.forget_eval == tuple(of_sport[half:])
  assert set(split.forget_train_targets) == set(split.forget_eval_targets) == {"golf"}
  by_name = {f.athlete: f for f in athletes}
  maintain = split.maintain_train + split.maintain_test
  assert all(by_name[k].sport != sport for k in maintain)
  assert len(maintain) == len(athletes) - len(of_sport)
  assert not set(maintain) & set(of_sport)


def test_sports_split_errors(athletes):
  with pytest.raises(SplitTooSmallError, match=r"split 'first_64': the forget set needs 64 facts but the filtered pool has only 20"):
    make_sports_split(athletes[:20], "first_64")
  with pytest.raises(SplitTooSmallError, match="'first_16': the maintain set needs at least 2 facts but only 1"):
    make_sports_split(athletes[:17], "first_16")
  one_football = [f for f in athletes if f.sport != "football"][:30] + [f for f in athletes if f.sport == "football"][:1]
  with pytest.raises(SplitTooSmallError, match="split 'football'.*needs 2 facts.*only 1"):
    make_sports_split(one_football, "football")
  with pytest.raises(ValueError, match="unknown sports split 'golf'"):
    make_sports_split(athletes, "golf")
  with pytest.raises(ValueError, match="repeated fact keys"):
    make_sports_split(athletes[:30] + athletes[:1], "first_16")


def test_counterfact_split(counterfact):
  pool = counterfact[:500]
  split = make_counterfact_split(pool, "first_16", seed=0)
  assert split.few_shot == tuple(f.prompt_id for f in pool[-64:])
  assert split.forget_train == tuple(f.prompt_id for f in pool[:16])
  assert split.forget_train_targets == tuple(f.target_false for f in pool[:16])
  maintain = split.maintain_train + split.maintain_test
  assert len(maintain) == 500 - 64 - 16
  keys = _all_keys(split)
  assert len(keys) == len(set(keys)) == 500
  assert split.select(pool, "few_shot") == pool[-64:]
  assert make_counterfact_split(pool, "first_16", seed=0) == split
  first_64 = make_counterfact_split(pool, "first_64", seed=0)
  assert first_64.few_shot == split.few_shot and len(first_64.forget_train) == 64
  with pytest.raises(SplitTooSmallError, match=r"split 'first_64': 64 few-shot \+ 64 forget \+ at least 2 maintain needs 130 facts but the filtered pool has only 100"):
    make_counterfact_split(pool[:100], "first_64")
  with pytest.raises(ValueError, match="unknown CounterFact split 'basketball'"):
    make_counterfact_split(pool, "basketball")


def test_split_json_round_trip_and_atomic_write(tmp_path, athletes, counterfact):
  sports_split = make_sports_split(athletes, "baseball", seed=1, metadata={"threshold": 0.5, "model": "gemma3-270m"})
  cf_split = make_counterfact_split(counterfact[:200], "first_16")
  for split in (sports_split, cf_split):
    assert Split.from_json(split.to_json()) == split
    path = split.write(tmp_path / "runs" / f"{split.dataset}.json")
    assert Split.read(path) == split
    assert json.loads(path.read_text())["name"] == split.name
  assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["counterfact.json", "sports.json"]
  assert isinstance(Split.read(tmp_path / "runs" / "counterfact.json").forget_train[0], int)


def test_select_missing_key(athletes):
  split = make_sports_split(athletes, "first_16")
  assert [f.athlete for f in split.select(athletes, "forget_train")] == list(split.forget_train)
  with pytest.raises(KeyError, match="forget_train: 16 key"):
    split.select(athletes[100:], "forget_train")
  with pytest.raises(ValueError, match="unknown split part"):
    split.keys("retain")


def test_random_n_is_a_seeded_draw_in_pool_order(athletes, counterfact):
  pool = athletes[:200]
  a = make_sports_split(pool, "random_16", seed=0)
  assert a.forget_train == make_sports_split(pool, "random_16", seed=0).forget_train
  b = make_sports_split(pool, "random_16", seed=1)
  assert a.forget_train != b.forget_train
  assert a.forget_train != make_sports_split(pool, "first_16", seed=0).forget_train
  order = {f.key: i for i, f in enumerate(pool)}
  assert [order[k] for k in a.forget_train] == sorted(order[k] for k in a.forget_train)
  assert not set(a.forget_train) & set(a.maintain_train + a.maintain_test)
  assert len(set(a.forget_train) | set(a.maintain_train) | set(a.maintain_test)) == len(pool)
  cf = make_counterfact_split(counterfact[:200], "random_8", seed=2)
  assert len(cf.forget_train) == 8 and not set(cf.forget_train) & set(cf.few_shot)
