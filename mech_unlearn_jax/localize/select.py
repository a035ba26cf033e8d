"""The one localization entry point: a method name -> a parameter mask at the FLU budget.

`localize(model, tokenizer, facts, task, config, seed, out_dir)` is what the main
job, `launch.localize`, the study, the benchmarks and the notebook call. It

  1. builds the clean prompts (the task's standard format) and their corruption
     (subject tokens replaced by random tokens of the same tokenized length);
  2. finds the fact-lookup (FLU) MLP layers with the automated rule and stores the
     evidence (`fact_lookup.py`), unless `config.layers` names them explicitly
     (then the mask is "manual", never called fact lookup);
  3. builds the requested method's mask at the FLU parameter budget (`METHODS`);
  4. writes `localization.json` (evidence summary + mask provenance) and `mask.npz`
     into `out_dir` atomically; `mask.npz` is written last, so its presence marks
     the stage done, and a rerun reads it back instead of recomputing.

The method list, the AP site filter and the prompt -> corruption step exist only
here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from mech_unlearn_jax import interventions, io
from mech_unlearn_jax.batch import FactBatch
from mech_unlearn_jax.localize import baselines as baselines_lib
from mech_unlearn_jax.localize import corruption
from mech_unlearn_jax.localize import fact_lookup as fl
from mech_unlearn_jax.localize import masks as masks_lib

# Every localization the paper compares, plus the late-MLP control (as many MLPs as
# FLU picks, taken right after the extraction layer: separates "early vs late" from
# "MLP vs attention").
METHODS = (
    "fact_lookup", "ap", "ct", "ap_mlps", "ct_mlps",
    "random", "random_mlps", "all_mlps", "nonlocalized", "late_mlps",
)
OUTPUT_TRACING = ("ap", "ct", "ap_mlps", "ct_mlps")

# Tuning families (METHOD §3: lr then c_f swept per family, one representative each,
# standard-format metrics only): whole MLPs at the fact-lookup budget; components chosen
# by output tracing (and their random control) at that budget; whole-model-scale masks.
METHOD_FAMILIES = {
    "fact_lookup": ("fact_lookup", "random_mlps", "late_mlps"),
    "output_tracing": ("ap", "ct", "ap_mlps", "ct_mlps", "random"),
    "nonlocalized": ("all_mlps", "nonlocalized"),
}
FAMILY_OF = {method: family for family, members in METHOD_FAMILIES.items() for method in members}
assert sorted(FAMILY_OF) == sorted(METHODS), "every method belongs to one tuning family"

# AP sites whose scores sum into a unit in the reference's unit mode: a head's q, k,
# v and output and an MLP's input and output (METHOD §2). "per_matrix" mode uses the
# site standing for each weight matrix instead.
AP_REFERENCE_KINDS = ("q", "k", "v", "head_out", "mlp_in", "mlp_out")


def _sports_flu_rule() -> fl.FLURule:
  # Measured on Gemma 3 270M (docs/findings/localization.md): the paper's CounterFact
  # rule (baseline = last layer's score) keeps MLPs 0-10 there because the last
  # candidate's enrichment is itself above 0.02; this rule keeps clearly enriching MLPs.
  return fl.FLURule(threshold=0.05, baseline="zero", absolute=False, contiguous=False)


@dataclasses.dataclass(frozen=True)
class APSettings:
  """Attribution-patching settings of a localization run.

  Attributes:
    batch_size: prompts per jitted call (0: all at once).
  """

  batch_size: int = 0


@dataclasses.dataclass(frozen=True)
class CTSettings:
  """Causal-tracing settings (see `causal_tracing.CTConfig`).

  Attributes:
    num_samples: noise samples per prompt.
    noise: "rome" (3 sigma) or "reference" (sqrt(3 sigma), the reference's bug).
    recovery: "own" answer or "reference" (every prompt's answers summed, a bug).
    prompts_per_call: prompts per jitted call (0: all).
  """

  num_samples: int = 10
  noise: Literal["rome", "reference"] = "rome"
  recovery: Literal["own", "reference"] = "own"
  prompts_per_call: int = 4


@dataclasses.dataclass(frozen=True)
class LocalizeConfig:
  """How to localize.

  Attributes:
    method: one of `METHODS`.
    layers: explicit FLU MLP layers (skips the rule; the mask is then "manual").
    score_mode: "reference" (signed unit sums, whole units) or "per_matrix".
    num_prompts: known facts (forget facts first) the localization traces.
    probe_facts: known facts the fact-lookup probes are trained on (a few hundred give
      a stable probe curve; 0: the `num_prompts` facts).
    fact_lookup: the automated FLU procedure and its rule.
    ap, ct: output-tracing settings.
  """

  method: str = "fact_lookup"
  layers: tuple[int, ...] = ()
  score_mode: Literal["reference", "per_matrix"] = "reference"
  num_prompts: int = 32
  probe_facts: int = 256
  fact_lookup: fl.FactLookupConfig = fl.FactLookupConfig(rule=_sports_flu_rule(), max_patch_prompts=128)
  ap: APSettings = APSettings()
  ct: CTSettings = CTSettings()

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
    if self.num_prompts < 2:
      raise ValueError(f"num_prompts must be >= 2, got {self.num_prompts}")
    if any(l < 0 for l in self.layers):
      raise ValueError(f"layers must be non-negative, got {self.layers}")

  @property
  def mask_name(self) -> str:
    """What the mask is called in results: explicit layers are "manual", not FLU."""
    if self.method == "fact_lookup" and self.layers:
      return "manual_mlps"
    return self.method


@dataclasses.dataclass(frozen=True)
class Localization:
  """A localization's mask and its evidence (JSON-friendly)."""

  mask: masks_lib.ParamMask
  evidence: dict[str, Any]

  @property
  def trained_parameters(self) -> int:
    return int(self.evidence["trained_parameters"])


def corrupt_batch(model: Any, tokenizer: Any, batch: FactBatch, seed: int) -> np.ndarray:
  """Subject tokens replaced at random by ASCII tokens of equal tokenized length.

  Shared by fact lookup and attribution patching. Without a tokenizer (synthetic
  facts), ids are drawn from the vocabulary.
  """
  if tokenizer is None:
    return corruption.random_token_replacement(
        batch.tokens_BxL, batch.subject_mask_BxL, np.arange(16, model.config.vocab_size), seed
    )
  pool = corruption.ascii_token_ids(tokenizer, model.config.vocab_size)
  return corruption.corrupt_subjects(tokenizer, batch, pool, seed)


def check_layers(layers: Sequence[int], num_layers: int, key: str = "config.localize.layers") -> None:
  """Explicit layers must exist in the model (checked before any work)."""
  bad = [l for l in layers if not 0 <= l < num_layers]
  if bad:
    raise ValueError(f"{key}: layers {bad} are outside the model's {num_layers} layers (0..{num_layers - 1})")


def fact_lookup_layers(
    model: Any,
    batch: FactBatch,
    corrupt_BxL: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    config: LocalizeConfig,
    seed: int,
    out_dir: pathlib.Path | None,
    context: Mapping[str, Any] | None = None,
    probe_batch: FactBatch | None = None,
    probe_labels: np.ndarray | None = None,
) -> tuple[list[int], dict[str, Any]]:
  """(FLU layers, evidence summary); reads `out_dir/fact_lookup/` back when present."""
  if config.layers:
    check_layers(config.layers, model.config.num_layers)
    return sorted(set(config.layers)), {"flu_layers_source": "config.localize.layers (manual)"}
  evidence_path = None if out_dir is None else out_dir / "fact_lookup" / "fact_lookup.json"
  if evidence_path is not None and evidence_path.is_file():
    record = io.read_json(evidence_path, "fact-lookup evidence")
  else:
    flu_config = dataclasses.replace(config.fact_lookup, seed=seed)
    result = fl.run_fact_lookup(
        model, batch, labels, num_classes, flu_config, corrupt_BxL, probe_batch, probe_labels
    )
    if out_dir is not None:
      fl.save_evidence(result, out_dir / "fact_lookup", extra=dict(context or {}, num_facts=batch.size))
    record = result.to_json()
  return list(record["layers"]), {
      "flu_layers_source": "fact-lookup rule (see fact_lookup/)",
      "extraction_layers": list(record["extraction_layers"]),
  }


def _raw_output_tracing_scores(
    model: Any, batch: FactBatch, corrupt_BxL: np.ndarray, kind: str, config: LocalizeConfig, seed: int
) -> dict[Any, np.ndarray]:
  if kind == "ap":
    from mech_unlearn_jax.localize import attribution_patching as ap  # pylint: disable=g-import-not-at-top

    ap_config = ap.APConfig(batch_size=config.ap.batch_size or None)
    return ap.attribution_patching(model, batch, corrupt_BxL, ap_config).as_numpy()
  if kind == "ct":
    from mech_unlearn_jax.localize import causal_tracing as ct  # pylint: disable=g-import-not-at-top

    ct_config = ct.CTConfig(
        num_samples=config.ct.num_samples, noise=config.ct.noise, recovery=config.ct.recovery,
        prompts_per_call=config.ct.prompts_per_call or None, seed=seed,
    )
    return ct.causal_tracing(model, batch, ct_config).scores()
  raise ValueError(f"unknown output-tracing method {kind!r}")


def _scores_key(kind: str, config: LocalizeConfig, seed: int, batch: FactBatch) -> dict[str, Any]:
  """What the raw scores depend on (batch sizes only change the cost, not the scores)."""
  settings = (
      {"noise": config.ct.noise, "recovery": config.ct.recovery, "num_samples": config.ct.num_samples}
      if kind == "ct" else {}
  )
  return {
      "kind": kind, "seed": seed, **settings, "num_prompts": batch.size,
      "tokens_sha256": hashlib.sha256(np.ascontiguousarray(batch.tokens_BxL).tobytes()).hexdigest(),
  }


def output_tracing_scores(
    model: Any, batch: FactBatch, corrupt_BxL: np.ndarray, kind: str, config: LocalizeConfig, seed: int,
    cache_dir: pathlib.Path | None = None,
) -> dict[Any, np.ndarray]:
  """Per-component AP or CT scores, filtered to the sites the score mode uses.

  With `cache_dir`, the raw scores are kept in `cache_dir/output_tracing/` and reused
  by every method scoring the same prompts with the same settings (CT and CT-MLPs,
  AP and AP-MLPs): causal tracing is the costliest localization, so it runs once.
  """
  key = _scores_key(kind, config, seed, batch)
  path = None if cache_dir is None else pathlib.Path(cache_dir) / "output_tracing" / f"{kind}_scores.npz"
  raw = None
  if path is not None and path.is_file():
    stored = io.read_npz(path, f"{kind} scores")
    if json.loads(str(stored.pop("__key__"))) == key:
      raw = {interventions.Site(int(layer), site): v for name, v in stored.items() for layer, site in [name.split(":")]}
  if raw is None:
    raw = _raw_output_tracing_scores(model, batch, corrupt_BxL, kind, config, seed)
    if path is not None:
      arrays = {f"{s.layer}:{s.kind}": np.asarray(v) for s, v in raw.items()}
      io.write_npz(path, {**arrays, "__key__": np.array(json.dumps(key, sort_keys=True))})
  if kind == "ap":
    from mech_unlearn_jax.localize import attribution_patching as ap  # pylint: disable=g-import-not-at-top

    keep = AP_REFERENCE_KINDS if config.score_mode == "reference" else tuple(ap.MATRIX_SITES.values())
    return {s: v for s, v in raw.items() if s.kind in keep}
  return raw


def late_mlps(model: Any, num_units: int, extraction_layer: int) -> masks_lib.MaskResult:
  """As many MLP units as FLU has, starting right after the extraction layer."""
  n = model.config.num_layers
  start = min(extraction_layer + 1, n - num_units)
  layers = list(range(start, start + num_units))
  units = [masks_lib.Unit(i, "mlp") for i in layers]
  return masks_lib.MaskResult.make("late_mlps", masks_lib.mask_from_units(model, units), model, layers=layers)


def build_mask(
    model: Any,
    method: str,
    flu_layers: Sequence[int],
    seed: int,
    config: LocalizeConfig,
    scores: Mapping[Any, np.ndarray] | None = None,
    extraction_layer: int | None = None,
) -> masks_lib.MaskResult:
  """The mask of `method` at the FLU budget (scores for AP/CT methods)."""
  flu = baselines_lib.flu_mlps(model, flu_layers)
  budget = flu.trained_parameters
  if method == "fact_lookup":
    return flu
  if method == "random":
    return baselines_lib.random_matrices(model, budget, seed)
  if method == "random_mlps":
    return baselines_lib.random_mlps(model, len(flu_layers), seed)
  if method == "all_mlps":
    return baselines_lib.all_mlps(model)
  if method == "nonlocalized":
    return baselines_lib.nonlocalized(model)
  if method == "late_mlps":
    if extraction_layer is None:
      raise ValueError("late_mlps needs the extraction layer (run the fact-lookup rule, not explicit layers)")
    return late_mlps(model, len(flu_layers), extraction_layer)
  if scores is None:
    raise ValueError(f"method {method!r} needs component scores")
  if method.endswith("_mlps"):
    return baselines_lib.output_tracing_mlps(method, scores, model, budget)
  return baselines_lib.output_tracing(method, scores, model, budget, mode=config.score_mode)


def localize(
    model: Any,
    tokenizer: Any,
    batch: FactBatch,
    labels: np.ndarray,
    num_classes: int,
    config: LocalizeConfig,
    seed: int = 0,
    out_dir: str | pathlib.Path | None = None,
    context: Mapping[str, Any] | None = None,
    evidence_dir: str | pathlib.Path | None = None,
    probe_batch: FactBatch | None = None,
    probe_labels: np.ndarray | None = None,
) -> Localization:
  """Localizes with `config.method` at the FLU budget (see the module docstring).

  Args:
    model: the unedited model.
    tokenizer: its tokenizer (None for synthetic token facts).
    batch: clean prompts of known facts (answer = true attribute).
    labels: attribute class per prompt (fact-lookup probes).
    num_classes: number of attribute classes.
    config: method and settings.
    seed: seeds corruption, CT noise and random baselines.
    out_dir: where the mask and its summary go (None: nothing is written).
    context: extra JSON recorded with the evidence (model, task, ...).
    evidence_dir: where the fact-lookup evidence goes (default `out_dir`); runs of
      several methods on the same facts share it, so the rule runs once.
    probe_batch, probe_labels: the fact-lookup probes' facts (default: `batch`).
  """
  out = None if out_dir is None else pathlib.Path(out_dir)
  mask_path = None if out is None else out / "mask.npz"
  if mask_path is not None and mask_path.is_file():
    mask, _ = masks_lib.load_mask(mask_path, model)
    return Localization(mask, io.read_json(out / "localization.json", "localization summary"))
  started = time.time()
  corrupt = corrupt_batch(model, tokenizer, batch, seed)
  evidence_root = out if evidence_dir is None else pathlib.Path(evidence_dir)
  layers, evidence = fact_lookup_layers(
      model, batch, corrupt, labels, num_classes, config, seed, evidence_root, context, probe_batch, probe_labels
  )
  evidence.update(method=config.method, mask_name=config.mask_name, num_prompts=batch.size, flu_layers=layers)
  scores = None
  if config.method in OUTPUT_TRACING:
    kind = config.method.split("_")[0]
    scores = output_tracing_scores(model, batch, corrupt, kind, config, seed, cache_dir=evidence_root)
    if out is not None:
      io.write_json(out / f"{kind}_scores.json", {str(k): np.asarray(v) for k, v in scores.items()})
  extraction = min(evidence["extraction_layers"]) if evidence.get("extraction_layers") else None
  chosen = build_mask(model, config.method, layers, seed, config, scores, extraction)
  evidence.update(
      seconds=time.time() - started,
      flu_budget=baselines_lib.flu_mlps(model, layers).trained_parameters,
      mask=chosen.to_json(),
      trained_parameters=chosen.trained_parameters,
  )
  if out is not None:
    io.write_json(out / "localization.json", evidence)
    chosen.save(mask_path, model)  # written last: its presence marks the stage done
  logging.info("localization %s: FLU layers %s, %d trained parameters", config.mask_name, layers, chosen.trained_parameters)
  return Localization(chosen.mask, evidence)
