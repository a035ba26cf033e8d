"""Comparing groups of finished runs (`study.compare_runs`, `launch.compare_runs`) on
hand-written results.json files: intervals, pairing by seed, and bad input."""

import json
import pathlib
import subprocess
import sys

import pytest

from mech_unlearn_jax.study import compare_runs


def _write_run(workdir: pathlib.Path, seed: int, forget_qa: float, retain_kl: float) -> pathlib.Path:
  def cells(p_qa):
    return [
      {"format": "standard", "facts": "forget", "answer": "correct", "prob_normalized": 0.01, "argmax_candidates": 0.0},
      {"format": "qa", "facts": "forget", "answer": "correct", "prob_normalized": p_qa, "argmax_candidates": 0.0},
    ]

  results = {
    "config": {"seed": seed, "data": {"task": "sports"}},
    "trained_parameters": 100,
    "edited": {"cells": cells(forget_qa), "kl_original_edited": retain_kl,
               "retain_text": {"loss": 3.0, "accuracy": 0.4}},
    "unedited": {"cells": cells(0.9), "retain_text": {"loss": 2.9, "accuracy": 0.41}},
  }
  workdir.mkdir(parents=True)
  (workdir / "results.json").write_text(json.dumps(results))
  return workdir


@pytest.fixture()
def runs(tmp_path):
  base = [_write_run(tmp_path / f"a{s}", s, 0.10 + 0.02 * s, 0.08 + 0.01 * s) for s in range(3)]
  # Same seeds: forget_qa exactly +0.05 in every seed; KL up by varying amounts.
  other = [_write_run(tmp_path / f"b{s}", s, 0.15 + 0.02 * s, 0.08 + 0.01 * s + d) for s, d in enumerate((0.5, -0.4, 0.1))]
  return base, other


def test_groups_are_summarized_and_paired_by_seed(runs):
  base, other = runs
  text = compare_runs.compare_runs({"default": base, "reference": other})
  lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
  assert lines["metric"].startswith("| metric | default (seeds 0, 1, 2) | reference (seeds 0, 1, 2) | reference - default, paired")
  # Mean over seeds 0.10, 0.12, 0.14 -> 0.120; the paired difference is +0.05 in every seed.
  assert "| forget_qa | 0.120 [" in lines["forget_qa"]
  assert lines["forget_qa"].endswith("| +0.050 [+0.050, +0.050] * |")
  # KL differences +0.5, -0.4, +0.1: the interval covers 0, so no mark.
  assert not lines["retain_kl"].endswith("* |") and "+0.0667 [" in lines["retain_kl"]
  assert "trained_parameters" not in lines and "forget_qa_argmax" not in lines
  with_argmax = compare_runs.compare_runs({"default": base, "reference": other}, with_argmax=True)
  assert "| forget_qa_argmax |" in with_argmax
  only = compare_runs.compare_runs([("default", base)], metrics=["forget_qa"])
  assert [line.split(" | ")[0] for line in only.splitlines() if line.startswith("| ")] == ["| metric", "| forget_qa"]


def test_groups_without_a_common_seed_or_with_one_run(tmp_path, runs):
  base, _ = runs
  lone = [_write_run(tmp_path / "c7", 7, 0.3, 0.2)]
  text = compare_runs.compare_runs({"default": base, "lone": lone}, metrics=["forget_qa"])
  assert text.splitlines()[2].endswith("| 0.300 (n=1) | no common seed |")
  one_seed = compare_runs.compare_runs({"default": base, "b": [_write_run(tmp_path / "d0", 0, 0.4, 0.1)]},
                                       metrics=["forget_qa"])
  assert "+0.300 (seed 0 only)" in one_seed


def test_bad_groups_are_refused_naming_what_is_wrong(tmp_path, runs):
  base, _ = runs
  with pytest.raises(FileNotFoundError, match=r"group 'x': .*nowhere.*results.json not found"):
    compare_runs.compare_runs({"x": [tmp_path / "nowhere"]})
  with pytest.raises(ValueError, match=r"group 'x': .*a0 and .*a0b both ran seed 0"):
    compare_runs.compare_runs({"x": [base[0], _write_run(tmp_path / "a0b", 0, 0.1, 0.1)]})
  with pytest.raises(ValueError, match="group names must be distinct"):
    compare_runs.compare_runs([("x", base), ("x", base)])
  with pytest.raises(KeyError, match=r"metric 'forget_mc': no run of group\(s\) \['x'\]"):
    compare_runs.compare_runs({"x": base}, metrics=["forget_mc"])
  for bad in ("nodirs:", "noname", ":a,b"):
    with pytest.raises(ValueError, match="expected NAME:WORKDIR"):
      compare_runs.parse_group(bad)


def test_launcher_prints_and_writes_the_table(tmp_path, runs):
  base, other = runs
  out = tmp_path / "table.md"
  args = [sys.executable, "-m", "launch.compare_runs", f"--group=a:{','.join(map(str, base))}",
          f"--group=b:{','.join(map(str, other))}", f"--out={out}", "--metrics=forget_qa,retain_kl"]
  root = pathlib.Path(__file__).resolve().parents[1]
  done = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=root)
  assert done.returncode == 0, done.stderr
  assert out.read_text() in done.stdout + "\n" and "| forget_qa |" in out.read_text()
  bad = subprocess.run(args[:3] + ["--group=b"], capture_output=True, text=True, timeout=120, cwd=root)
  assert bad.returncode == 2 and "--group='b': expected NAME:WORKDIR" in bad.stderr
