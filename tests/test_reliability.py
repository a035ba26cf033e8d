"""Reliability cases that need no subprocess: non-finite scores, the sweep, config
validation, input fingerprints, file errors, the predict launcher's library side.

The subprocess fault suite (kill -9, concurrent runs, read-only workdirs, launchers)
is `test_faults.py`.
"""

import dataclasses
import math
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

from configs import counterfact_16, sports_first16
from mech_unlearn_jax import experiment, io, sweep
from mech_unlearn_jax import train as train_lib
from mech_unlearn_jax.data import facts as facts_lib
from mech_unlearn_jax.data.tasks import get_task
from mech_unlearn_jax.evals import scoring
from mech_unlearn_jax.experiment import inputs as inputs_lib
from mech_unlearn_jax.experiment import stages
from mech_unlearn_jax.experiment import validate as validate_lib
from mech_unlearn_jax.experiment.schema import ConfigError
from mech_unlearn_jax.localize import masks as masks_lib


# --------------------------------------------------------------------- non-finite scores


def test_non_finite_logits_score_as_wrong_with_zero_probability():
  logits = np.zeros((4, 10), np.float32)
  logits[0, 3] = 5.0  # a healthy row: the answer (id 3) wins
  logits[1] = np.nan  # a diverged model: argmax over NaNs is index 0 = the answer
  logits[2, 7] = np.inf  # +inf: the log-softmax is NaN
  logits[3, 3] = 5.0
  logits[3, 9] = -np.inf  # a -inf logit is a valid (zero-probability) entry
  candidates = np.array([[3, 4, 5]] * 4, np.int32)
  out = jax.tree.map(np.asarray, scoring.scores_from_logits(jnp.asarray(logits), jnp.asarray(candidates)))
  for row in (1, 2):
    assert not out["correct_argmax_candidates"][row] and not out["correct_argmax_full"][row]
    assert out["prob_normalized"][row] == 0.0 and out["logprob_full"][row] == -np.inf
    np.testing.assert_array_equal(out["candidate_probs"][row], 0.0)
  for row in (0, 3):
    assert out["correct_argmax_candidates"][row] and out["correct_argmax_full"][row]
    assert 0.9 < out["prob_normalized"][row] <= 1.0 and np.isfinite(out["logprob_full"][row])


def test_non_finite_text_positions_count_as_wrong():
  tokens = np.array([[0, 0, 0]], np.int32)  # every target is token 0 = argmax over NaNs
  positions = np.array([[0, 1, 2]], np.int32)
  logits = jnp.full((1, 3, 5), jnp.nan)
  _, nll, correct, valid = scoring._next_token_terms(logits, tokens, positions)
  assert bool(valid.all()) and not bool(correct.any())
  assert bool(jnp.isnan(nll).all())  # the loss stays NaN: a reader sees it (JSON null)


def test_a_diverged_model_scores_zero_end_to_end():
  """`score_facts` goes through the same rule (a model whose weights are all NaN)."""
  from mech_unlearn_jax.batch import FactBatch
  from mech_unlearn_jax.models import config as config_lib
  from mech_unlearn_jax.models import forward, transformer

  model = transformer.build_transformer(config_lib.get_preset("tiny-gemma3"), jax.random.key(0))
  unbound, params = pz.unbind_params(model, freeze=True)
  params = jax.tree.map(lambda x: x * jnp.nan if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
  broken = pz.bind_variables(unbound, params)
  tokens, positions = forward.left_pad([[2, 5, 6], [2, 7]])
  batch = FactBatch(
      tokens_BxL=tokens, positions_BxL=positions, answer_ids_B=np.array([0, 0], np.int32),
      wrong_ids_BxK=np.array([[1, 2], [1, 2]], np.int32), subject_mask_BxL=np.zeros_like(tokens, bool),
  )
  scores = scoring.score_facts(broken, batch)
  assert not scores.correct_argmax_candidates.any() and not scores.correct_argmax_full.any()
  assert (scores.prob_full == 0).all() and (scores.prob_normalized == 0).all()


# --------------------------------------------------------------------- the sweep


def _results(forget=0.1, maintain=0.9, edit=0.8, retain=0.4):
  row = lambda facts, answer, p: {"format": "standard", "facts": facts, "answer": answer, "edited_prob": p}
  return {
      "summary": [row("forget", "correct", forget), row("maintain", "correct", maintain), row("forget", "edit", edit)],
      "edited": {"retain_text": {"accuracy": retain}},
  }


@pytest.mark.parametrize("bad", [float("nan"), None, float("inf")])
def test_standard_format_score_of_non_finite_parts_is_minus_infinity(bad):
  score = sweep.standard_format_score(_results(retain=bad))
  assert score["score"] == -math.inf and score["non_finite"] == ["retain_accuracy"]
  score = sweep.standard_format_score(_results(forget=bad))
  assert score["score"] == -math.inf and score["non_finite"] == ["forget"]


def test_best_row_never_picks_a_non_finite_run():
  rows = [{"lr": 1, "score": float("nan")}, {"lr": 2, "score": -math.inf}, {"lr": 3, "score": 1.5},
          {"lr": 4, "score": None}, {"lr": 5, "score": 1.2}]
  assert sweep.best_row(rows)["lr"] == 3
  assert sweep.best_row(rows[:2] + rows[3:4]) is None


def test_run_sweep_records_diverged_settings_and_picks_a_finite_one(tmp_path, monkeypatch):
  def fake_run(spec, workdir, shared=None, loaded=None):
    assert loaded == ("model", "tokenizer") and shared.knowledge == workdir.parent / "shared" / "knowledge.json"
    assert spec.eval.formats == ("standard",) and not spec.robustness.any_enabled
    if spec.edit.lr >= 1.0:
      raise train_lib.NonFiniteError("edit step 1: non-finite update_norm", step=1, term="update_norm", metrics={})
    if spec.edit.lr == 0.5:
      return _results(forget=float("nan"))
    return _results(forget=spec.edit.lr)

  monkeypatch.setattr(sweep.experiment, "run_experiment", fake_run)
  base = experiment.ExperimentSpec()
  rows = sweep.run_sweep(base, tmp_path, [0.1, 0.5, 1.0, 0.2], [1.0, 3.0], loaded=("model", "tokenizer"))
  # Staged: every lr at the first c_f, then the other c_f at the best lr.
  assert [(r["lr"], r["forget_coef"]) for r in rows] == [(0.1, 1.0), (0.5, 1.0), (1.0, 1.0), (0.2, 1.0), (0.1, 3.0)]
  assert "non-finite update_norm" in rows[2]["error"] and rows[2]["score"] == -math.inf
  record = io.read_json(tmp_path / "sweep.json")
  assert record["best"]["lr"] == 0.1
  assert record["rows"][1]["score"] is None  # -inf is written as null
  with pytest.raises(ValueError, match="no setting of the sweep has a finite score"):
    sweep.run_sweep(base, tmp_path / "all_bad", [0.5, 1.0], [1.0], loaded=("model", "tokenizer"))
  assert io.read_json(tmp_path / "all_bad" / "sweep.json")["best"] is None


# --------------------------------------------------------------------- config validation


def _tiny_dict(**overrides):
  config = sports_first16.get_config("tiny")
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config.to_dict()


def _spec(**overrides):
  return experiment.ExperimentSpec.from_dict(_tiny_dict(**overrides))


def test_the_tiny_config_and_the_defaults_are_valid():
  validate_lib.validate_spec(_spec())
  validate_lib.validate_spec(experiment.ExperimentSpec(model="tiny-gemma3"))


# (override, key the message must name) - caught by validate_spec.
VALIDATE_CASES = [
    ({"eval.formats": ("standard", "bogus")}, r"config\.eval\.formats: unknown format\(s\) \['bogus'\]"),
    ({"eval.formats": ("standard", "standard")}, r"config\.eval\.formats: \['standard'\] listed more than once"),
    ({"data.split": "firts_4"}, r"config\.data\.split: unknown sports split 'firts_4'"),
    ({"data.split": "first_0"}, r"config\.data\.split: .*N must be positive"),
    ({"data.max_pool": 2}, r"config\.data\.max_pool=2 leaves fewer facts than split 'first_4'"),
    ({"data.max_facts": 3}, r"config\.data\.max_facts=3"),
    ({"edit.forget_batch_size": 0}, r"config\.edit\.forget_batch_size must be >= 1"),
    ({"edit.retain_batch_size": -1}, r"config\.edit\.retain_batch_size must be >= 1"),
    ({"edit.checkpoint_every": -1}, r"config\.edit\.checkpoint_every must be >= 0"),
    ({"edit.lr": -1e-3}, r"config\.edit\.lr must be a learning rate >= 0"),
    ({"eval.batch_size": 0}, None),  # the dataclass refuses it first (below)
    ({"robustness.relearn_lora.training.maintain_batch_size": 0},
     r"config\.robustness\.relearn_lora\.training\.maintain_batch_size must be >= 1"),
    ({"robustness.softprompt_prefix.num_vectors": 0}, r"config\.robustness\.softprompt_prefix\.num_vectors must be >= 1"),
    ({"robustness.trivia_eval.max_questions": -1}, r"config\.robustness\.trivia_eval\.max_questions must be >= 0"),
    ({"localize.ct.num_samples": 0}, r"config\.localize\.ct\.num_samples must be >= 1"),
    ({"localize.ap.batch_size": -1}, r"config\.localize\.ap\.batch_size must be >= 0"),
    ({"localize.layers": (1, 5)}, r"config\.localize\.layers: layers \[5\] are outside the model's 3 layers"),
    ({"localize.fact_lookup.rule.layers": (9,)}, r"config\.localize\.fact_lookup\.rule\.layers: layers \[9\]"),
    ({"retain.source": "missing/retain.txt"}, r"config\.retain\.source: file not found: missing/retain\.txt"),
    ({"data.sports_source": "./nowhere.csv"}, r"config\.data\.sports_source: file not found"),
    ({"robustness.trivia_path": "nowhere.json"}, r"config\.robustness\.trivia_path: file not found"),
    ({"robustness.mc_benchmark": "/nowhere/mmlu.parquet"}, r"config\.robustness\.mc_benchmark: file not found"),
    ({"model": "tiny-nonexistent"}, r"config\.model: unknown tiny preset"),
    ({"model": "/nowhere/model.gguf"}, r"config\.model: GGUF file not found"),
    ({"model": "no-such-model"}, r"config\.model: 'no-such-model' is not 'default'"),
]


@pytest.mark.parametrize("overrides, message", [c for c in VALIDATE_CASES if c[1]], ids=lambda x: str(x)[:60])
def test_validate_spec_names_the_key(overrides, message):
  spec = experiment.ExperimentSpec.from_dict(_tiny_dict(**overrides))
  with pytest.raises(ConfigError, match=message):
    validate_lib.validate_spec(spec)


def test_comma_joined_formats_are_split():
  """`--config.eval.formats=standard,qa` arrives as one item; the schema splits it."""
  spec = experiment.ExperimentSpec.from_dict(_tiny_dict(**{"eval.formats": ("standard,qa",)}))
  assert spec.eval.formats == ("standard", "qa")
  validate_lib.validate_spec(spec)


# Caught by the dataclasses when the spec is built (schema.from_mapping names the key).
@pytest.mark.parametrize("overrides, message", [
    ({"seed": -1}, r"config\.seed must be >= 0"),
    ({"data.max_facts": -1}, r"config\.data: max_facts must be >= 0"),
    ({"data.max_pool": -2}, r"config\.data: max_pool must be >= 0"),
    ({"edit.warmup_steps": 3}, r"config\.edit: .*warmup_steps must be in \[0, steps=3\)"),
    ({"edit.steps": 0}, r"config\.edit: .*steps must be >= 1"),
    ({"eval.batch_size": 0}, r"config\.eval: batch_size must be >= 1"),
    ({"data.task": "nope"}, r"config\.data: task must be one of"),
    ({"retain.heldout_windows": 6}, r"config\.retain: heldout_windows"),
    ({"localize.layers": (-1,)}, r"config\.localize: layers must be non-negative"),
], ids=lambda x: str(x)[:40])
def test_dataclass_checks_name_the_key(overrides, message):
  with pytest.raises(ConfigError, match=message):
    _spec(**overrides)


def test_every_problem_is_reported_at_once():
  spec = _spec(**{"eval.formats": ("bogus",), "data.split": "nope", "edit.forget_batch_size": 0})
  with pytest.raises(ConfigError) as info:
    validate_lib.validate_spec(spec)
  text = str(info.value)
  assert text.count("config.") >= 3 and "\n" not in text


def test_counterfact_formats_and_paths(tmp_path, reference_data_dir):
  config = counterfact_16.get_config("tiny")
  config.data.counterfact_path = str(reference_data_dir / "counterfact_with_prompts.csv")
  config.data.counterfact_mc_path = str(reference_data_dir / "counterfact_mc_questions.parquet")
  config.eval.formats = ("standard", "mc", "qa")
  spec = experiment.ExperimentSpec.from_dict(config.to_dict())
  with pytest.raises(ConfigError, match=r"unknown format\(s\) \['qa'\] for task 'counterfact'"):
    validate_lib.validate_spec(spec)
  config.eval.formats = ("standard", "paraphrase", "neighborhood", "mc")
  config.data.counterfact_mc_path = str(tmp_path / "missing.parquet")
  with pytest.raises(ConfigError, match=r"config\.data\.counterfact_mc_path: file not found"):
    validate_lib.validate_spec(experiment.ExperimentSpec.from_dict(config.to_dict()))


def test_a_refused_run_writes_no_config_and_does_not_block_its_workdir(tmp_path):
  bad = _spec(**{"localize.layers": (7,)})
  with pytest.raises(ConfigError, match=r"config\.localize\.layers"):
    experiment.run_experiment(bad, tmp_path)
  assert not (tmp_path / "config.json").exists() and not (tmp_path / "inputs.json").exists()
  # The fixed config gets as far as the inputs check in the same workdir (stopped
  # there by a changed-input error we plant, to keep this test fast).
  good = _spec()
  inputs_lib.check_inputs(good, tmp_path)
  record = io.read_json(tmp_path / "inputs.json")
  record["inputs"]["config.model"]["sha256"] = "0" * 64
  io.write_json(tmp_path / "inputs.json", record)
  with pytest.raises(inputs_lib.InputsChangedError, match=r"config\.model"):
    experiment.run_experiment(good, tmp_path)
  assert io.read_json(tmp_path / "config.json")["localize"]["layers"] == [1]


# --------------------------------------------------------------------- input fingerprints


def _table(tmp_path, rows=12):
  lines = facts_lib.embedded_athletes_path().read_text().splitlines()
  path = tmp_path / "athletes.csv"
  path.write_text("\n".join(lines[: rows + 1]) + "\n")
  return path


def test_fingerprints_record_check_and_refuse_a_changed_file(tmp_path):
  table = _table(tmp_path)
  spec = _spec(**{"data.sports_source": str(table)})
  workdir = tmp_path / "run"
  workdir.mkdir()
  record = inputs_lib.check_inputs(spec, workdir)
  assert record["schema_version"] == inputs_lib.SCHEMA_VERSION
  assert set(record["inputs"]) == {"config.model", "config.data.sports_source", "config.robustness.trivia_path"}
  entry = record["inputs"]["config.data.sports_source"]
  assert entry["size"] == table.stat().st_size and len(entry["sha256"]) == 64
  written = (workdir / "inputs.json").stat().st_mtime_ns
  # Unchanged (even touched, or copied back) inputs pass and rewrite nothing.
  os.utime(table, ns=(1, 1))
  inputs_lib.check_inputs(spec, workdir)
  assert (workdir / "inputs.json").stat().st_mtime_ns == written
  # A changed file is refused, naming the key, the file and the remedy.
  table.write_text(table.read_text().replace("basketball,football", "basketball,baseball", 1))
  with pytest.raises(inputs_lib.InputsChangedError) as info:
    inputs_lib.check_inputs(spec, workdir)
  text = str(info.value)
  assert "config.data.sports_source" in text and str(table) in text
  assert "restore the original input" in text and "new --workdir" in text
  assert (workdir / "inputs.json").stat().st_mtime_ns == written


def test_new_inputs_are_added_and_old_schema_versions_refused(tmp_path):
  spec = _spec(**{"robustness.trivia": False})
  inputs_lib.check_inputs(spec, tmp_path)
  assert set(io.read_json(tmp_path / "inputs.json")["inputs"]) == {"config.model"}
  retain = tmp_path / "retain.txt"
  retain.write_text("some text\n" * 10)
  later = dataclasses.replace(spec, retain=dataclasses.replace(spec.retain, source=str(retain)))
  inputs_lib.check_inputs(later, tmp_path)
  assert set(io.read_json(tmp_path / "inputs.json")["inputs"]) == {"config.model", "config.retain.source"}
  # A read-only check (write=False) of a new workdir writes nothing.
  other = tmp_path / "other"
  other.mkdir()
  inputs_lib.check_inputs(spec, other, write=False)
  assert not (other / "inputs.json").exists()
  record = io.read_json(tmp_path / "inputs.json")
  record["schema_version"] = 0
  io.write_json(tmp_path / "inputs.json", record)
  with pytest.raises(inputs_lib.InputsChangedError, match=r"schema version 0.*new --workdir"):
    inputs_lib.check_inputs(spec, tmp_path)


def test_large_files_are_hashed_once_per_version(tmp_path, monkeypatch):
  monkeypatch.setenv("MECH_UNLEARN_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setattr(inputs_lib, "_CACHE_ABOVE_BYTES", 16)
  monkeypatch.setattr(inputs_lib, "_memo", {})
  big = tmp_path / "weights.bin"
  big.write_bytes(b"a" * 1000)
  calls = []
  real = inputs_lib._sha256_file
  monkeypatch.setattr(inputs_lib, "_sha256_file", lambda p: calls.append(p) or real(p))
  first = inputs_lib.fingerprint(big)
  assert len(calls) == 1 and list((tmp_path / "cache").rglob("*.json"))
  inputs_lib._memo.clear()  # a new process: the on-disk entry answers
  assert inputs_lib.fingerprint(big) == first and len(calls) == 1
  big.write_bytes(b"b" * 1000)  # same size, new content and mtime/ctime
  assert inputs_lib.fingerprint(big)["sha256"] != first["sha256"] and len(calls) == 2
  # Directories (checkpoints) fingerprint every file.
  ckpt = tmp_path / "ckpt"
  (ckpt / "sub").mkdir(parents=True)
  (ckpt / "sub" / "x").write_bytes(b"1")
  (ckpt / "config.json").write_text("{}")
  one = inputs_lib.fingerprint(ckpt)
  (ckpt / "sub" / "x").write_bytes(b"2")
  two = inputs_lib.fingerprint(ckpt)
  assert one["kind"] == "directory" and one["files"] == 2 and one["sha256"] != two["sha256"]


# --------------------------------------------------------------------- file errors


def test_empty_header_only_and_unparsable_tables_name_the_file(tmp_path):
  empty = tmp_path / "empty.csv"
  empty.write_text("")
  with pytest.raises(facts_lib.FactsDataError, match=r"empty\.csv: empty file"):
    facts_lib.load_sports_facts(empty)
  header = tmp_path / "header.csv"
  header.write_text("athlete,sport\n")
  with pytest.raises(facts_lib.FactsDataError, match=r"header\.csv: no data rows"):
    facts_lib.load_sports_facts(header)
  broken = tmp_path / "broken.csv"
  broken.write_text('athlete,sport\n"unterminated,baseball\n')
  with pytest.raises(facts_lib.FactsDataError, match=r"broken\.csv: cannot be read as a csv table"):
    facts_lib.load_sports_facts(broken)
  parquet = tmp_path / "empty.parquet"
  parquet.write_bytes(b"")
  with pytest.raises(facts_lib.FactsDataError, match=r"empty\.parquet: empty file"):
    facts_lib.load_counterfact_mc(parquet)


@pytest.mark.parametrize("value", ["seven", "7.5", ""])
def test_non_integer_prompt_id_names_file_column_and_row(tmp_path, value):
  header = "prompt,subject,target_true,target_false,paraphrase_prompts,neighborhood_prompts,prompt_id\n"
  rows = "The capital of France is,France,Paris,Rome,[],[],3\nThe capital of Spain is,Spain,Madrid,Rome,[],[]," + value + "\n"
  path = tmp_path / "cf.csv"
  path.write_text(header + rows)
  with pytest.raises(facts_lib.FactsDataError, match=r"cf\.csv: column 'prompt_id', row 1: expected an integer"):
    facts_lib.load_counterfact(path)
  mc = tmp_path / "mc.csv"
  mc.write_text("question,target_true,targets_false,prompt_id\nQ?,a,\"['b' 'c' 'd']\"," + value + "\n")
  with pytest.raises(facts_lib.FactsDataError, match=r"mc\.csv: column 'prompt_id', row 0: expected an integer"):
    facts_lib.load_counterfact_mc(mc)


def test_integral_float_prompt_ids_are_accepted(tmp_path):
  mc = tmp_path / "mc.json"
  mc.write_text('[{"question": "Q?", "target_true": "a", "targets_false": ["b", "c", "d"], "prompt_id": 12.0}]')
  assert list(facts_lib.load_counterfact_mc(mc)) == [12]


def test_truncated_knowledge_json_names_the_file_and_the_remedy(tmp_path):
  spec = _spec()
  path = tmp_path / "knowledge.json"
  io.write_json(path, {"num_facts": 48, "p_true": [0.5] * 48})
  path.write_bytes(path.read_bytes()[:40])
  with pytest.raises(ValueError, match=r"knowledge\.json: knowledge-stage output is not valid JSON.*remove it"):
    stages.knowledge_stage(None, None, get_task("sports"), spec.data, path=path)


@pytest.mark.parametrize("cut", [0, 10, "half", -1])
def test_truncated_mask_names_the_file_and_the_remedy(tmp_path, cut):
  from mech_unlearn_jax.models import config as config_lib

  cfg = config_lib.get_preset("tiny-gemma3")
  mask = masks_lib.empty_mask(cfg)
  path = tmp_path / "mask.npz"
  masks_lib.save_mask(path, mask, cfg, {"name": "test"})
  data = path.read_bytes()
  size = {"half": len(data) // 2, -1: len(data) - 1}.get(cut, cut)
  path.write_bytes(data[:size])
  with pytest.raises(masks_lib.MaskError, match=r"mask\.npz: cannot read parameter mask.*remove it and rerun"):
    masks_lib.load_mask(path, cfg)
  with pytest.raises(FileNotFoundError):
    masks_lib.load_mask(tmp_path / "absent.npz", cfg)


def test_outputs_are_written_with_the_ordinary_file_mode(tmp_path):
  umask = os.umask(0o022)
  os.umask(umask)
  for path in (io.write_json(tmp_path / "a.json", {"x": 1}), io.write_npz(tmp_path / "b.npz", {"x": np.ones(2)}),
               io.write_text(tmp_path / "c.md", "x")):
    assert pathlib.Path(path).stat().st_mode & 0o777 == 0o666 & ~umask
  assert not list(tmp_path.glob(".*.tmp"))


# --------------------------------------------------------------------- predict


def test_predict_refuses_a_prompt_longer_than_the_context():
  from mech_unlearn_jax import predict

  assert predict.context_length("tiny-gemma3") == 32768
  with pytest.raises(predict.PromptTooLongError, match=r"is 3\d{4} tokens .* context of 32768"):
    predict.top_next_tokens("tiny-gemma3", "plays " * 32768, top_k=3)
  with pytest.raises(ValueError, match="top_k"):
    predict.top_next_tokens("tiny-gemma3", "x", top_k=0)


def test_release_compiled_code_frees_memory_mappings():
  import jax
  import jax.numpy as jnp

  from mech_unlearn_jax import compile_cache

  maps = compile_cache.memory_mappings

  compile_cache.release_compiled_code()
  before = maps()
  keep = [jax.jit(lambda x, k=k: jnp.sin(x) * k + k)(jnp.ones(k + 1)) for k in range(40)]
  grown = maps()
  compile_cache.release_compiled_code()
  assert grown > before + 40  # each executable maps its own code
  assert maps() < grown - 40
  del keep

  # The executables go, the traces stay: calling again compiles (or reads the
  # persistent cache) without tracing the Python function again, unless asked to.
  traces = []

  @jax.jit
  def traced(x):
    traces.append(x.shape)
    return jnp.cos(x) + 1

  traced(jnp.ones(5))
  compile_cache.release_compiled_code()
  assert traced._cache_size() == 0
  np.testing.assert_allclose(traced(jnp.ones(5)), np.cos(1.0) + 1, rtol=1e-6)
  assert len(traces) == 1
  compile_cache.release_compiled_code(keep_traces=False)
  traced(jnp.ones(5))
  assert len(traces) == 2


def test_stage_line_names_the_stage_that_raised_peak_memory():
  # A fresh process, so its peak is small and a 400 MB allocation raises it. The parent
  # first holds more than that (as a test runner does): Linux carries ru_maxrss over
  # fork and exec, so a peak read from it would start above the child's allocation.
  ballast = np.ones(100_000_000)
  code = (
      "import numpy as np\n"
      "from mech_unlearn_jax import progress\n"
      "with progress.stage('allocate'):\n"
      "  a = np.ones(50_000_000)\n"
      "with progress.stage('nothing new'):\n"
      "  b = a.sum()\n"
  )
  out = subprocess.run(
      [sys.executable, "-c", code], capture_output=True, text=True, check=True,
      env=dict(os.environ, MECH_UNLEARN_JAX_PROGRESS="1"),
  )
  lines = [l for l in out.stderr.splitlines() if l.startswith("[mech_unlearn_jax]")]
  assert len(lines) == 2, out.stderr
  assert "allocate" in lines[0] and "[peak RSS" in lines[0]
  peak = float(lines[0].split("[peak RSS ")[1].split(" GiB")[0])
  assert peak >= 0.37  # the 400 MB array is resident
  assert "nothing new" in lines[1] and "peak RSS" not in lines[1]
  assert peak < ballast.nbytes / 2**30  # the child's own peak, not its parent's
  del ballast


def test_release_free_heap_returns_freed_pages_to_the_os():
  # A fresh process: 200 MB of heap blocks (64 KiB each: above pymalloc's small-object
  # limit, below glibc's mmap threshold), every other one freed: the heap cannot shrink
  # from its top, so the freed half stays resident until malloc_trim hands it back.
  code = (
      "from mech_unlearn_jax import progress\n"
      "def rss():\n"
      "  return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS'))\n"
      "blocks = [bytearray(65536) for _ in range(3_200)]\n"
      "for b in blocks:\n"
      "  b[::4096] = b'x' * 16\n"  # touch every page
      "del blocks[::2]\n"
      "before = rss()\n"
      "progress.release_free_heap()\n"
      "print(before - rss())\n"
  )
  env = dict(os.environ, MECH_UNLEARN_JAX_RELEASE_HEAP="1")  # the suite turns it off
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
  released_kib = int(out.stdout.split()[-1])
  assert released_kib > 50_000, out.stdout  # most of the ~100 MB freed


def test_stage_with_release_compiled_drops_the_stages_executables(monkeypatch):
  from mech_unlearn_jax import progress

  monkeypatch.delenv("MECH_UNLEARN_JAX_KEEP_COMPILED", raising=False)  # the suite keeps them

  double = jax.jit(lambda x: 2 * x)
  with progress.stage("keeps its code"):
    double(jnp.ones(3))
  assert double._cache_size() == 1
  with progress.stage("drops its code", release_compiled=True):
    double(jnp.ones(4))
  assert double._cache_size() == 0
  np.testing.assert_array_equal(double(jnp.ones(3)), 2 * np.ones(3))  # recompiles on demand
  monkeypatch.setenv("MECH_UNLEARN_JAX_KEEP_COMPILED", "1")
  with progress.stage("kept on request", release_compiled=True):
    pass
  assert double._cache_size() == 1


def test_auto_keep_policy_releases_only_when_the_process_is_crowded(monkeypatch):
  from mech_unlearn_jax import compile_cache, progress

  monkeypatch.setenv("MECH_UNLEARN_JAX_KEEP_COMPILED", "auto")
  # Roomy whatever earlier modules left in this process.
  monkeypatch.setattr(compile_cache, "CROWDED_MAPPINGS_FRACTION", 10.0)
  monkeypatch.setattr(compile_cache, "CROWDED_MEMORY_FRACTION", 10.0)
  double = jax.jit(lambda x: 2 * x)
  with progress.timing_log() as log:
    with progress.stage("roomy", release_compiled=True):
      double(jnp.ones(3))
  assert double._cache_size() == 1
  assert log[0]["maps"] == pytest.approx(compile_cache.memory_mappings(), rel=0.2)
  assert 0 < log[0]["rss_gib"] <= progress.peak_rss_bytes() / 2**30 + 0.001  # rounded to MiB
  assert log[0]["released"] == ""
  monkeypatch.setattr(compile_cache, "CROWDED_MAPPINGS_FRACTION", 0.0)
  assert "memory mappings" in compile_cache.crowded()
  with progress.timing_log() as log:
    with progress.stage("crowded", release_compiled=True):
      pass
  assert double._cache_size() == 0
  assert "memory mappings" in log[0]["released"]
  monkeypatch.setattr(compile_cache, "CROWDED_MAPPINGS_FRACTION", 1.0)
  monkeypatch.setattr(compile_cache, "CROWDED_MEMORY_FRACTION", 0.0)
  assert "resident" in compile_cache.crowded()
  monkeypatch.setenv("MECH_UNLEARN_JAX_KEEP_COMPILED", "sometimes")
  with pytest.raises(ValueError, match="MECH_UNLEARN_JAX_KEEP_COMPILED='sometimes'.*auto"):
    compile_cache.keep_policy()


def test_keep_compiled_flag_beats_the_environment_which_beats_a_launcher_default():
  code = (
      "import os\n"
      "from absl import app, flags\n"
      "from launch import common\n"
      "flags.FLAGS.set_default('keep_compiled', 'auto')\n"  # as launch.study does
      "def main(argv):\n"
      "  common.setup()\n"
      "  print('policy', os.environ['MECH_UNLEARN_JAX_KEEP_COMPILED'])\n"
      "app.run(main)\n"
  )
  root = pathlib.Path(__file__).resolve().parents[1]

  def policy(env_value, *args):
    env = {k: v for k, v in os.environ.items() if k != "MECH_UNLEARN_JAX_KEEP_COMPILED"}
    if env_value is not None:
      env["MECH_UNLEARN_JAX_KEEP_COMPILED"] = env_value
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, cwd=root, env=env
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()[-1]

  assert policy(None) == "auto"
  assert policy("0") == "0"
  assert policy("0", "--keep_compiled=1") == "1"


def _run_guarded_launcher(tmp_path, setup_lines, job_lines):
  """Runs a launcher-like script: `common.setup()`, then `job_lines` under
  `common.guarded`, writing tmp_path/"unwound" if the job raised."""
  indent = lambda lines, n: "".join(" " * n + line + "\n" for line in lines)
  code = (
      "import gc, os, signal, time\n"
      "from absl import app\n"
      "from launch import common\n"
      "from mech_unlearn_jax import progress\n"
      "def main(argv):\n"
      "  common.setup()\n"
      + indent(setup_lines, 2)
      + "  def job():\n"
      "    try:\n"
      + indent(job_lines, 6)
      + "    except BaseException:\n"
      f"      open({str(tmp_path / 'unwound')!r}, 'w').close()\n"
      "      raise\n"
      "  common.guarded(job)\n"
      "app.run(main)\n"
  )
  return subprocess.run(
      [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
      cwd=pathlib.Path(__file__).resolve().parents[1],
  )


def test_sigterm_unwinds_a_launcher_like_ctrl_c(tmp_path):
  # A killed study attempt must still run its `except BaseException` bookkeeping.
  out = _run_guarded_launcher(tmp_path, [], ["os.kill(os.getpid(), signal.SIGTERM)", "time.sleep(30)"])
  assert out.returncode == 130, out.stderr
  assert "interrupted; rerun the same command to resume" in out.stderr
  assert (tmp_path / "unwound").exists()


def test_a_signal_dropped_inside_a_gc_callback_is_raised_at_the_next_stage(tmp_path):
  # Python drops an exception raised in a garbage-collector callback (JAX registers
  # one): the signal's KeyboardInterrupt is lost there, and before the fix the run went
  # on with SIGTERM reset to the default, so the next one killed it without unwinding.
  out = _run_guarded_launcher(
      tmp_path,
      [
          "def kill_during_collection(phase, info):",
          "  if phase == 'start' and not getattr(kill_during_collection, 'done', False):",
          "    kill_during_collection.done = True",
          "    os.kill(os.getpid(), signal.SIGTERM)",
          "    for _ in range(1000): pass",  # the handler runs here, inside the callback
          "gc.callbacks.append(kill_during_collection)",
      ],
      [
          "gc.collect()",
          f"open({str(tmp_path / 'collected')!r}, 'w').close()",
          "with progress.stage('next stage'):",
          f"  open({str(tmp_path / 'stage ran')!r}, 'w').close()",
      ],
  )
  assert "Exception ignored" in out.stderr and "KeyboardInterrupt" in out.stderr  # dropped there
  assert (tmp_path / "collected").exists()
  assert out.returncode == 130, out.stderr
  assert "interrupted; rerun the same command to resume" in out.stderr
  assert (tmp_path / "unwound").exists() and not (tmp_path / "stage ran").exists()


def test_a_pending_interrupt_is_raised_by_bars_and_training_steps_once():
  from mech_unlearn_jax import progress

  progress.request_interrupt("signal 15")
  with pytest.raises(KeyboardInterrupt, match="signal 15"):
    list(progress.bar(range(3), desc="items"))
  assert progress.interrupt_requested() == ""  # raised once, not again in the cleanup
  assert list(progress.bar(range(3))) == [0, 1, 2]
  progress.request_interrupt("signal 2")
  with pytest.raises(KeyboardInterrupt):
    progress.bar(total=3).update(1)
  # One that reached a stage normally is not raised a second time by the next stage.
  progress.request_interrupt("signal 15")
  with pytest.raises(KeyboardInterrupt):
    with progress.stage("interrupted"):
      raise KeyboardInterrupt("signal 15")
  with progress.stage("cleanup after the interrupt"):
    pass


def test_timing_log_records_nested_stages_in_start_order():
  from mech_unlearn_jax import progress

  with progress.timing_log() as outer:
    with progress.stage("run"):
      with progress.stage("attack"):
        time.sleep(0.02)
      with progress.timing_log() as inner:
        with progress.stage("probe"):
          pass
  # The enclosing stage comes first although it finished last; both logs see "probe".
  assert [(e["stage"], e["parent"], e["depth"]) for e in outer] == [
      ("run", None, 0), ("attack", "run", 1), ("probe", "run", 1)
  ]
  assert [(e["stage"], e["parent"], e["depth"]) for e in inner] == [("probe", None, 0)]  # counted from its log
  assert outer[0]["seconds"] >= outer[1]["seconds"] >= 0.02
  with progress.stage("after the logs closed"):
    pass
  assert len(outer) == 3
  with progress.timing_log() as failed:
    with pytest.raises(KeyboardInterrupt):
      with progress.stage("killed"):
        raise KeyboardInterrupt
    with progress.stage("next"):
      pass
  assert [e["stage"] for e in failed] == ["next"]  # a stage that raised did not finish


def test_study_commits_only_its_results_folder(tmp_path):
  def git(*args):
    return subprocess.run(["git", *args], cwd=tmp_path, capture_output=True, text=True, check=True).stdout

  git("init", "-q")
  git("config", "user.email", "study@example.com")
  git("config", "user.name", "study")
  (tmp_path / "README").write_text("a project\n")
  git("add", "README")
  git("commit", "-q", "-m", "start")
  (tmp_path / "results").mkdir()
  (tmp_path / "results" / "study.md").write_text("one cell\n")
  (tmp_path / "code.py").write_text("x = 1\n")
  git("add", "code.py")  # someone's staged work, not the study's to commit
  (tmp_path / "notes.txt").write_text("untracked\n")  # changes git's "nothing to commit" wording
  # In a subprocess: importing the launcher sets absl flag defaults for the process.
  code = (
      "from launch.study import commit_results\n"
      "commit_results('results', 'Study results: one cell')\n"
      "commit_results('results', 'Study results: nothing new')\n"  # no error, no commit
  )
  root = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
  out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and not out.stderr.strip(), out.stderr
  assert git("log", "--format=%s").splitlines() == ["Study results: one cell", "start"]
  assert git("show", "--name-only", "--format=").split() == ["results/study.md"]
  assert git("diff", "--cached", "--name-only").split() == ["code.py"]  # still staged
