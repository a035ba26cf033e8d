"""Probes, fact-lookup patching and rule, and `launch.localize`'s path on a tiny model."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

from configs import localize_sports
from mech_unlearn_jax import experiment
from mech_unlearn_jax import interventions as iv
from mech_unlearn_jax.batch import FactBatch
from mech_unlearn_jax.localize import fact_lookup as fl
from mech_unlearn_jax.localize import masks as M
from mech_unlearn_jax.localize import probes
from mech_unlearn_jax.localize import select
from mech_unlearn_jax.models import config as config_lib
from mech_unlearn_jax.models import forward, transformer

TINY = config_lib.get_preset("tiny-gemma3")


# ----------------------------------------------------------------------------------
# Probes.


def _separable(rng, n_per_class=80, dim=16, classes=3):
  labels = np.repeat(np.arange(classes), n_per_class)
  noise = rng.normal(size=(labels.size, dim))
  means = rng.normal(size=(classes, dim)) * 4.0
  informative = noise + means[labels]
  return np.stack([rng.normal(size=(labels.size, dim)), informative]), labels


def test_probes_find_linear_structure_and_not_noise():
  rng = np.random.default_rng(0)
  acts, labels = _separable(rng)
  result = probes.train_and_evaluate(acts, labels, 3, probes.ProbeConfig(seed=1))
  assert result.test_accuracy[1] >= 0.95 and result.train_accuracy[1] >= 0.95
  assert result.test_accuracy[0] < 0.6  # pure noise stays near chance on held-out data
  assert result.test_index.size == 60 and np.intersect1d(result.train_index, result.test_index).size == 0
  fresh, fresh_labels = _separable(np.random.default_rng(0))
  np.testing.assert_allclose(result.probes.accuracy(fresh, fresh_labels), [result.probes.accuracy(fresh, fresh_labels)[0], 1.0], atol=0.05)


def test_split_is_seeded_and_stratified():
  labels = np.array([0] * 20 + [1] * 8 + [2] * 2)
  a = probes.split_indices(labels, 0.25, seed=3)
  b = probes.split_indices(labels, 0.25, seed=3)
  c = probes.split_indices(labels, 0.25, seed=4)
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[1], c[1])
  assert [int((labels[a[1]] == k).sum()) for k in range(3)] == [5, 2, 0]  # rounding keeps 1 train example of class 2
  with pytest.raises(ValueError, match="test_fraction"):
    probes.split_indices(labels, 1.0, seed=0)


def test_subject_last_columns():
  mask = np.array([[0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], bool)
  np.testing.assert_array_equal(probes.subject_last_columns(mask), [2, 0, 3])
  with pytest.raises(ValueError, match="rows \\[1\\]"):
    probes.subject_last_columns(np.array([[1, 0], [0, 0]], bool))


# ----------------------------------------------------------------------------------
# Patching on the tiny model.


@pytest.fixture(scope="module")
def tiny_model():
  return transformer.build_transformer(TINY, jax.random.key(0))


class _Synthetic:
  """Random token "subjects" + a fixed relation; answers are fixed class tokens."""

  def __init__(self, size, seed, classes=3):
    rng = np.random.default_rng(seed)
    vocab = TINY.vocab_size
    answer_ids = np.arange(vocab - classes, vocab, dtype=np.int32)
    seqs, spans = [], []
    for _ in range(size):
      subject = rng.integers(16, vocab - classes, size=int(rng.integers(2, 5))).tolist()
      seqs.append([2, 5, 6] + subject + [7, 8, 9])
      spans.append((3, 3 + len(subject)))
    tokens, positions = forward.left_pad(seqs, multiple=8)
    mask = np.zeros(tokens.shape, dtype=bool)
    for row, (a, b) in enumerate(spans):
      offset = tokens.shape[1] - len(seqs[row])
      mask[row, offset + a : offset + b] = True
    self.labels = rng.integers(0, classes, size=size).astype(np.int32)
    wrong = np.stack([np.delete(answer_ids, l) for l in self.labels]).astype(np.int32)
    self.batch = FactBatch(tokens, positions, answer_ids[self.labels], wrong, mask)


def _tiny_batch(size=6, seed=0):
  return _Synthetic(size, seed)


def test_corruption_touches_only_subject_tokens_and_is_seeded():
  batch = _tiny_batch(8).batch
  a = fl.corrupt_subject_tokens(batch, seed=0)
  assert np.array_equal(a, fl.corrupt_subject_tokens(batch, seed=0))
  assert not np.array_equal(a, fl.corrupt_subject_tokens(batch, seed=1))
  same = a == batch.tokens_BxL
  assert same[~batch.subject_mask_BxL].all()
  assert not same[batch.subject_mask_BxL].all()


def test_patched_runs_recover_the_clean_run_exactly(tiny_model):
  """Adding the full clean-minus-corrupt residual at a block input restores the clean run."""
  batch = _tiny_batch(6).batch
  corrupt = fl.corrupt_subject_tokens(batch, seed=0)
  unbound, params = pz.unbind_params(tiny_model, freeze=True)
  clean, corr = fl._run_pair(unbound, params, batch, corrupt)
  args = (jnp.asarray(batch.answer_ids_B), jnp.asarray(batch.wrong_ids_BxK))
  zeros = jnp.zeros_like(corr[1])
  ld = fl._patched_run(unbound, params, jnp.asarray(corrupt), jnp.asarray(batch.positions_BxL), zeros, zeros, *args)
  np.testing.assert_allclose(ld, corr[3], atol=1e-4)
  assert not np.allclose(clean[3], corr[3], atol=1e-3)
  columns = np.tile(np.arange(batch.tokens_BxL.shape[1]), (batch.size, 1))
  res_clean = probes.residuals_at(tiny_model, batch.tokens_BxL, batch.positions_BxL, columns)
  res_corr = probes.residuals_at(tiny_model, corrupt, batch.positions_BxL, columns)
  for layer in range(TINY.num_layers):
    pre = zeros.at[layer].set(res_clean[layer] - res_corr[layer])
    ld = fl._patched_run(unbound, params, jnp.asarray(corrupt), jnp.asarray(batch.positions_BxL), pre, zeros, *args)
    np.testing.assert_allclose(ld, clean[3], atol=1e-3)
  # The sublayer outputs the capture returns add up to the final residual stream.
  final = res_clean[0][:, -1] + clean[0][:, :, -1].sum(0) + clean[1][:, :, -1].sum(0)
  np.testing.assert_allclose(final, clean[2], atol=1e-3)
  # Path patching the whole final-residual difference also gives the clean logit diff.
  direct = fl._direct_to_final(unbound, params, corr[2], (clean[2] - corr[2])[None], *args)
  np.testing.assert_allclose(direct[0], clean[3], atol=1e-3)


# ----------------------------------------------------------------------------------
# The rule.


def test_choose_extraction_layers():
  rule = fl.FLURule(extraction_fraction=0.5, max_extraction_layers=2)
  scores = np.array([0.9, 0.1, 0.5, 0.3, 0.45, 0.2])
  assert fl.choose_extraction_layers(scores, rule) == [2, 4]  # layer 0 is never one
  assert fl.choose_extraction_layers(scores, fl.FLURule(max_extraction_layers=5)) == [2, 3, 4]
  assert fl.choose_extraction_layers(-np.abs(scores), rule) == [1]  # all negative: the best one
  assert fl.choose_extraction_layers(scores, fl.FLURule(extraction_layers=(3, 1))) == [1, 3]


def test_choose_flu_layers_default_rule():
  nan = float("nan")
  enrichment = np.array([0.01, 0.30, 0.25, 0.015, 0.40, 0.03, nan, nan])
  se = np.array([0.01, 0.05, 0.20, 0.01, 0.05, 0.01, nan, nan])
  extraction = [6]
  # Layer 2 is large but noisy (< 2 s.e.); the 2-layer gap between 1 and 4 is filled.
  layers, trace = fl.choose_flu_layers(enrichment, None, extraction, fl.FLURule(), se)
  assert trace["baseline"] == 0.0 and trace["passing_threshold"] == [1, 4, 5]
  assert layers == [1, 2, 3, 4, 5] and not trace["fallback"]
  layers, _ = fl.choose_flu_layers(enrichment, None, extraction, fl.FLURule(max_gap=1), se)
  assert layers == [1, 4, 5]  # two layers missing between 1 and 4: not filled
  layers, _ = fl.choose_flu_layers(enrichment, None, extraction, fl.FLURule(z=0.0, contiguous=False), se)
  assert layers == [1, 2, 4, 5]
  # The probe saturates at residual layer 3 (after block 2): MLPs 0..2 are candidates.
  probe = np.array([0.3, 0.4, 0.8, 0.97, 0.99, 1.0, 1.0, 1.0, 1.0])
  layers, trace = fl.choose_flu_layers(enrichment, probe, extraction, fl.FLURule(), se)
  assert trace["probe_saturation_residual_layer"] == 3 and layers == [1]
  # Candidates must precede the first extraction layer.
  layers, _ = fl.choose_flu_layers(enrichment, None, [3, 6], fl.FLURule(), se)
  assert layers == [1]
  layers, trace = fl.choose_flu_layers(enrichment, None, extraction, fl.FLURule(threshold=5.0), se)
  assert trace["fallback"] and layers == [4]
  layers, trace = fl.choose_flu_layers(enrichment, None, extraction, fl.FLURule(layers=(2, 3)), se)
  assert layers == [2, 3] and trace["overridden"] and trace["rule_layers"] == [1, 2, 3, 4, 5]
  with pytest.raises(ValueError, match="outside"):
    fl.choose_flu_layers(enrichment, None, extraction, fl.FLURule(layers=(9,)))
  with pytest.raises(ValueError, match="baseline"):
    fl.FLURule(baseline="first")


def test_choose_flu_layers_paper_rule():
  nan = float("nan")
  # The last scored layer (5) sets the baseline; |diff| > 0.02 keeps layers on both sides.
  enrichment = np.array([0.01, 0.30, 0.25, 0.015, 0.40, 0.29, nan, nan])
  rule = fl.FLURule.paper()
  layers, trace = fl.choose_flu_layers(enrichment, None, [6], rule)
  assert trace["baseline_layer"] == 5 and trace["baseline"] == pytest.approx(0.29)
  # The paper keeps the layers that pass, not the gap (layer 1) between them.
  assert layers == [0, 2, 3, 4]
  layers, _ = fl.choose_flu_layers(enrichment, None, [6], rule.replace(contiguous=True, max_gap=None))
  assert layers == [0, 1, 2, 3, 4]
  layers, _ = fl.choose_flu_layers(enrichment, None, [6], rule.replace(absolute=False))
  assert layers == [4]


# ----------------------------------------------------------------------------------
# `launch.localize`'s path (experiment.localize_only) with the tiny config.

ALL_METHODS = ("fact_lookup", "ap", "ct", "ap_mlps", "ct_mlps", "random", "random_mlps",
               "all_mlps", "nonlocalized", "late_mlps")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  spec = experiment.ExperimentSpec.from_dict(localize_sports.get_config("tiny").to_dict())
  workdir = tmp_path_factory.mktemp("localize_tiny")
  return spec, workdir, experiment.localize_only(spec, list(ALL_METHODS), workdir)


def test_tiny_config_runs_end_to_end_and_writes_evidence(tiny_run):
  spec, workdir, summary = tiny_run
  assert spec.model == "tiny-gemma3" and spec.localize.layers == ()
  evidence = json.loads((workdir / "localization" / "fact_lookup" / "fact_lookup.json").read_text())
  for key in ("layers", "extraction_layers", "enrichment", "extraction_direct", "extraction_total",
              "probe_subject_last", "probe_final", "rule", "trace"):
    assert key in evidence, key
  assert len(evidence["probe_subject_last"]["test_accuracy"]) == TINY.num_layers + 1
  assert evidence["layers"] == summary["fact_lookup"]["flu_layers"]
  assert all(0 <= l < TINY.num_layers for l in evidence["layers"])
  assert evidence["rule"]["threshold"] == spec.localize.fact_lookup.rule.threshold
  for name in ("probe_curve", "extraction", "enrichment"):
    data = (workdir / "localization" / "fact_lookup" / f"{name}.png").read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 1000
  assert not list(workdir.rglob("*.tmp"))
  loaded = json.loads((workdir / "localization" / "ap" / "localization.json").read_text())
  assert loaded["num_prompts"] == spec.localize.num_prompts


def test_tiny_run_writes_budget_matched_masks(tiny_run):
  _, workdir, summary = tiny_run
  assert set(summary) == set(ALL_METHODS)
  budget = summary["fact_lookup"]["trained_parameters"]
  assert budget == len(summary["fact_lookup"]["flu_layers"]) * M.unit_parameter_count(TINY, M.Unit(0, "mlp"))
  for name in ALL_METHODS:
    mask, meta = M.load_mask(workdir / "localization" / name / "mask.npz", TINY)
    assert meta["trained_parameters"] == M.trained_parameter_count(mask, TINY)
    if name not in ("all_mlps", "nonlocalized"):
      assert meta["trained_parameters"] >= budget, name
  ap = json.loads((workdir / "localization" / "ap" / "ap_scores.json").read_text())
  # The reference unit mode sums a head's q/k/v/output and an MLP's input/output scores.
  assert {"mlp_out0", "mlp_in0", "head_out2", "q1", "k1", "v1"} <= set(ap)
  assert "ct_scores.json" in {p.name for p in (workdir / "localization" / "ct").iterdir()}


def test_configs_load_and_convert():
  for arg in (None, "counterfact"):
    spec = experiment.ExperimentSpec.from_dict(localize_sports.get_config(arg).to_dict())
    assert spec.localize.fact_lookup.rule.layers is None
  assert spec.localize.fact_lookup.rule.probe_saturation is None
  config = localize_sports.get_config()
  config.localize.fact_lookup.rule.layers = (3, 1)
  assert experiment.ExperimentSpec.from_dict(config.to_dict()).localize.fact_lookup.rule.layers == (3, 1)
  with pytest.raises(ValueError, match="unknown config arg"):
    localize_sports.get_config("huge")
  with pytest.raises(ValueError, match="config.localize: method must be one of"):
    config = localize_sports.get_config()
    config.localize.method = "magic"
    experiment.ExperimentSpec.from_dict(config.to_dict())


def test_tiny_run_says_which_masks_coincide(tiny_run):
  _, workdir, summary = tiny_run
  coincidence = json.loads((workdir / "localization" / "coincidence.json").read_text())
  assert coincidence["names"] == list(ALL_METHODS)
  jaccard = dict(zip(coincidence["names"], coincidence["jaccard"]))
  # Every MLP is inside the nonlocalized mask: Jaccard = |all MLPs| / |all weights|.
  all_mlps = summary["all_mlps"]["trained_parameters"]
  assert jaccard["all_mlps"][ALL_METHODS.index("nonlocalized")] == pytest.approx(
    all_mlps / summary["nonlocalized"]["trained_parameters"]
  )
  assert all(jaccard[m][i] == 1.0 for i, m in enumerate(ALL_METHODS))
  table = (workdir / "localization" / "coincidence.md").read_text()
  assert "| fact_lookup |" in table and "Identical masks:" in table


def test_ct_and_ct_mlps_share_one_causal_trace(tiny_run, tmp_path, monkeypatch):
  spec, workdir, summary = tiny_run
  cache = workdir / "localization" / "output_tracing"
  assert {p.name for p in cache.iterdir()} == {"ap_scores.npz", "ct_scores.npz"}
  # Rebuild the output-tracing masks from a copy of the run without tracing again.
  rerun = tmp_path / "rerun"
  shutil.copytree(workdir, rerun)
  for method in ("ap", "ct", "ap_mlps", "ct_mlps"):
    shutil.rmtree(rerun / "localization" / method)

  def no_tracing(*args, **kwargs):
    raise AssertionError("output-tracing scores were recomputed although cached")

  monkeypatch.setattr(select, "_raw_output_tracing_scores", no_tracing)
  again = experiment.localize_only(spec, ["ap", "ct", "ap_mlps", "ct_mlps"], rerun)
  for method in ("ap", "ct", "ap_mlps", "ct_mlps"):
    assert again[method]["units"] == summary[method]["units"], method
  # Scores of other settings (here another seed) are computed, not served from the cache.
  calls = []

  def fake_tracing(model, batch, corrupt, kind, config, seed):
    calls.append(seed)
    return {iv.Site(0, "mlp_out"): np.ones(1)}

  monkeypatch.setattr(select, "_raw_output_tracing_scores", fake_tracing)
  batch = FactBatch(
      tokens_BxL=np.ones((2, 4), np.int32), positions_BxL=np.tile(np.arange(4, dtype=np.int32), (2, 1)),
      answer_ids_B=np.ones(2, np.int32), wrong_ids_BxK=np.ones((2, 1), np.int32),
      subject_mask_BxL=np.zeros((2, 4), bool),
  )
  config = dataclasses.replace(spec.localize, method="ct")
  for seed in (spec.seed + 1, spec.seed + 1, spec.seed + 2):
    scores = select.output_tracing_scores(None, batch, None, "ct", config, seed, cache_dir=rerun / "localization")
    assert list(scores) == [iv.Site(0, "mlp_out")]
  assert calls == [spec.seed + 1, spec.seed + 2]
