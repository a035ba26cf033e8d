"""The main job: localize -> edit -> evaluate, from one typed spec, resumable.

`run_experiment(spec, workdir)` does, writing each stage's output atomically into the
workdir and skipping a stage whose output already exists (so a killed run resumes;
the edit itself resumes from its latest orbax checkpoint):

  1. load the model and tokenizer; score every fact in the standard format and keep
     the facts the model knows (`knowledge.json`);
  2. make the seeded split (`split.json`);
  3. localize with the configured method at the fact-lookup parameter budget
     (`localization/`: mask npz, evidence JSON/PNGs);
  4. sample (or load) retain text; edit only the masked parameters (`checkpoints/`);
  5. evaluate the unedited and the edited model on forget / edit / maintain facts in
     every prompt format, retain-text loss and KL(original || edited), and say which
     formats the unedited model answers above chance (`results.json`, `results.md`,
     `results.png`).

Library code: takes an `ExperimentSpec` (frozen dataclasses), never a ConfigDict.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from mech_unlearn_jax import edit as edit_lib
from mech_unlearn_jax.batch import FactBatch
from mech_unlearn_jax.data import facts as facts_lib
from mech_unlearn_jax.data import formats as formats_lib
from mech_unlearn_jax.data import retain as retain_lib
from mech_unlearn_jax.data import splits as splits_lib
from mech_unlearn_jax.evals import formats_eval, scoring
from mech_unlearn_jax.localize import baselines as baselines_lib
from mech_unlearn_jax.localize import masks as masks_lib
from mech_unlearn_jax.models import config as config_lib
from mech_unlearn_jax.models import loaders, transformer

# ---------------------------------------------------------------------------------
# The spec (mirrors configs/common.py; unknown keys are errors that name the key).


@dataclasses.dataclass(frozen=True)
class DataSpec:
  task: str = "sports"
  sports_source: str = "embedded"
  counterfact_path: str = ""
  counterfact_mc_path: str = ""
  split: str = "first_16"
  known_threshold: float = 0.5
  known_normalization: str = "candidates"
  max_facts: int = 0
  max_pool: int = 0
  max_maintain_eval: int = 64
  sequential_rounds: int = 1


@dataclasses.dataclass(frozen=True)
class LocalizeSpec:
  method: str = "fact_lookup"
  layers: str = ""
  flu_threshold: float = 0.05
  flu_baseline: str = "zero"
  flu_absolute: bool = False
  flu_contiguous: bool = False
  score_mode: str = "reference"
  num_prompts: int = 32
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class EditSpec:
  loss: str = "inject"
  lr: float = 1e-4
  steps: int = 50
  forget_coef: float = 1.0
  maintain_coef: float = 1.0
  retain_coef: float = 1.0
  batch_size: int = 16
  weight_decay: float = 0.0
  clip_norm: float = 1.0
  warmup_steps: int = 0
  checkpoint_every: int = 10


@dataclasses.dataclass(frozen=True)
class RetainSpec:
  source: str = "sampled"
  num_windows: int = 48
  window: int = 46
  heldout_windows: int = 16


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  formats: str = "standard,qa,mc,declarative,cloze"
  batch_size: int = 32


@dataclasses.dataclass(frozen=True)
class ExperimentSpec:
  seed: int = 0
  model: str = "default"
  data: DataSpec = DataSpec()
  localize: LocalizeSpec = LocalizeSpec()
  edit: EditSpec = EditSpec()
  retain: RetainSpec = RetainSpec()
  eval: EvalSpec = EvalSpec()

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ExperimentSpec":
    """From nested dicts (e.g. `ConfigDict.to_dict()`); unknown keys name themselves."""

    def build(kind, values, prefix):
      fields = {f.name: f for f in dataclasses.fields(kind)}
      unknown = sorted(set(values) - set(fields))
      if unknown:
        raise ValueError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; expected one of"
            f" {[prefix + k for k in fields]}"
        )
      kwargs = {}
      for name, value in values.items():
        sub = fields[name].default
        if dataclasses.is_dataclass(sub):
          kwargs[name] = build(type(sub), value, f"{prefix}{name}.")
        else:
          kwargs[name] = value
      return kind(**kwargs)

    spec = build(cls, dict(d), "config.")
    spec.validate()
    return spec

  def validate(self) -> None:
    methods = ("fact_lookup", "ap", "ct", "ap_mlps", "ct_mlps", "random", "random_mlps", "all_mlps", "nonlocalized")
    checks = [
        (self.data.task in ("sports", "counterfact"), "config.data.task", "'sports' or 'counterfact'", self.data.task),
        (self.localize.method in methods, "config.localize.method", f"one of {methods}", self.localize.method),
        (self.localize.score_mode in ("reference", "per_matrix"), "config.localize.score_mode", "'reference' or 'per_matrix'", self.localize.score_mode),
        (self.edit.loss in ("inject", "unlearn"), "config.edit.loss", "'inject' or 'unlearn'", self.edit.loss),
        (self.data.known_normalization in ("candidates", "full_vocab"), "config.data.known_normalization", "'candidates' or 'full_vocab'", self.data.known_normalization),
        (self.edit.steps >= 1, "config.edit.steps", ">= 1", self.edit.steps),
        (self.edit.lr > 0, "config.edit.lr", "> 0", self.edit.lr),
        (self.retain.heldout_windows < self.retain.num_windows, "config.retain.heldout_windows", "< config.retain.num_windows", self.retain.heldout_windows),
    ]
    for ok, key, expected, got in checks:
      if not ok:
        raise ValueError(f"{key} must be {expected}, got {got!r}")

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------
# Small utilities.


def write_json(path: pathlib.Path, data: Any) -> None:
  """Atomic JSON write (temp file + rename): a killed run never leaves half a file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  tmp.write_text(json.dumps(data, indent=1, sort_keys=False, default=_json_default) + "\n")
  os.replace(tmp, path)


def _json_default(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serializable: {type(x)}")


def load_model_and_tokenizer(spec: ExperimentSpec):
  """The model and its tokenizer. "tiny-*" presets get random weights and the default
  tokenizer's vocabulary, so tests run the real prompt pipeline on a tiny model."""
  from mech_unlearn_jax.predict import load_tokenizer  # pylint: disable=g-import-not-at-top

  if spec.model.startswith("tiny-"):
    tokenizer = load_tokenizer("default")
    cfg = config_lib.get_preset(spec.model).replace(vocab_size=tokenizer.vocab_size)
    return transformer.build_transformer(cfg, jax.random.key(spec.seed)), tokenizer
  return loaders.load_model(spec.model), load_tokenizer(spec.model)


def _sports(include_golf: bool, seed: int):
  return formats_lib.sports_formats(include_golf=include_golf, seed=seed)


def _counterfact_standard():
  return formats_lib.CounterFactPromptFormat(name="standard", field="prompt")


def _whole_sport(spec: ExperimentSpec) -> bool:
  return spec.data.split in splits_lib.WHOLE_SPORT_SPLITS


# ---------------------------------------------------------------------------------
# Stages.


def knowledge_stage(model, tokenizer, spec: ExperimentSpec, workdir: pathlib.Path):
  """Scores every fact in the standard format; returns (all facts, known pool)."""
  path = workdir / "knowledge.json"
  if spec.data.task == "sports":
    source = None if spec.data.sports_source == "embedded" else spec.data.sports_source
    facts = facts_lib.load_sports_facts(source)
    # The reference filters on p(true) normalized over the three sports.
    fmt = _sports(include_golf=False, seed=spec.seed)["standard"]
    first_token = False
  else:
    facts = facts_lib.load_counterfact(spec.data.counterfact_path, spec.data.counterfact_mc_path or None)
    fmt = formats_lib.CounterFactPromptFormat(name="standard", field="prompt")
    first_token = True
  if spec.data.max_facts:
    facts = facts[: spec.data.max_facts]
  if path.is_file():
    record = json.loads(path.read_text())
    p_true = np.asarray(record["p_true"])
  else:
    prompts = fmt.format_batch(facts)
    batch, _ = formats_eval.prompts_to_batch(tokenizer, prompts, "correct", first_token)
    scores = scoring.score_facts(model, batch, chunk_size=spec.eval.batch_size)
    use_full = spec.data.known_normalization == "full_vocab" or spec.data.task == "counterfact"
    p_true = scores.prob_full if use_full else scores.prob_normalized
    write_json(path, {
        "task": spec.data.task, "num_facts": len(facts),
        "normalization": "full_vocab" if use_full else "candidates",
        "threshold": spec.data.known_threshold,
        "num_known": int((p_true >= spec.data.known_threshold).sum()),
        "argmax_accuracy": float(scores.correct_argmax_candidates.mean()),
        "p_true": p_true.tolist(),
    })
  pool = splits_lib.filter_known(facts, p_true, spec.data.known_threshold)
  if spec.data.max_pool:
    pool = pool[: spec.data.max_pool]
  logging.info("knowledge filter: %d of %d facts known", len(pool), len(facts))
  return facts, pool


def split_stage(pool, spec: ExperimentSpec, workdir: pathlib.Path) -> splits_lib.Split:
  path = workdir / "split.json"
  if path.is_file():
    return splits_lib.Split.read(path)
  meta = {"model": spec.model, "threshold": spec.data.known_threshold}
  if spec.data.task == "sports":
    split = splits_lib.make_sports_split(pool, spec.data.split, seed=spec.seed, metadata=meta)
  else:
    split = splits_lib.make_counterfact_split(pool, spec.data.split, seed=spec.seed, metadata=meta)
  split.write(path)
  return split


def _fact_batch(tokenizer, fmt, facts, targets=None, answer="correct", first_token=False) -> FactBatch:
  prompts = fmt.format_batch(list(facts), targets)
  batch, _ = formats_eval.prompts_to_batch(tokenizer, prompts, answer, first_token)
  return batch


def _class_labels(facts, task) -> tuple[np.ndarray, int]:
  if task == "sports":
    names = list(facts_lib.SPORTS)
    return np.array([names.index(f.sport) for f in facts]), len(names)
  # CounterFact: the true target's first token as the probed attribute class.
  names = sorted({f.target_true for f in facts})
  return np.array([names.index(f.target_true) for f in facts]), len(names)


def localization_stage(model, tokenizer, pool, spec: ExperimentSpec, workdir: pathlib.Path):
  """Builds the configured mask at the fact-lookup budget; saves mask + evidence."""
  from mech_unlearn_jax.localize import fact_lookup as fl  # pylint: disable=g-import-not-at-top
  from mech_unlearn_jax.localize import pipeline  # pylint: disable=g-import-not-at-top

  out = workdir / "localization"
  mask_path = out / "mask.npz"
  if mask_path.is_file():
    mask, _ = masks_lib.load_mask(mask_path, model)
    return mask, json.loads((out / "localization.json").read_text())
  method = spec.localize.method
  loc_facts = list(pool[: spec.localize.num_prompts])
  first_token = spec.data.task == "counterfact"
  fmt = _sports(False, spec.seed)["standard"] if spec.data.task == "sports" else _counterfact_standard()
  batch = _fact_batch(tokenizer, fmt, loc_facts, first_token=first_token)
  corrupt = pipeline.corrupt_tokens(model, tokenizer, batch, spec.localize.seed)
  evidence: dict[str, Any] = {"method": method, "num_prompts": batch.size}
  t = time.time()
  if spec.localize.layers:
    layers = [int(x) for x in str(spec.localize.layers).split(",") if x.strip()]
    evidence["flu_layers_source"] = "config.localize.layers"
  else:
    labels, num_classes = _class_labels(loc_facts, spec.data.task)
    result = fl.run_fact_lookup(
        model, batch, labels, num_classes,
        fl.FactLookupConfig(
            seed=spec.localize.seed, max_patch_prompts=batch.size,
            rule=fl.FLURule(
                threshold=spec.localize.flu_threshold, baseline=spec.localize.flu_baseline,
                absolute=spec.localize.flu_absolute, contiguous=spec.localize.flu_contiguous,
            ),
        ),
        corrupt,
    )
    fl.save_evidence(result, out / "fact_lookup", extra={"model": spec.model, "num_facts": batch.size})
    layers = list(result.layers)
    evidence["flu_layers_source"] = "fact-lookup rule (see fact_lookup/)"
  evidence["flu_layers"] = layers
  flu = baselines_lib.flu_mlps(model, layers)
  budget = flu.trained_parameters
  seed = spec.localize.seed
  if method == "fact_lookup":
    chosen = flu
  elif method == "random":
    chosen = baselines_lib.random_matrices(model, budget, seed)
  elif method == "random_mlps":
    chosen = baselines_lib.random_mlps(model, len(layers), seed)
  elif method == "all_mlps":
    chosen = baselines_lib.all_mlps(model)
  elif method == "nonlocalized":
    chosen = baselines_lib.nonlocalized(model)
  else:
    scores = _output_tracing_scores(model, batch, corrupt, method.split("_")[0], spec, out)
    if method.endswith("_mlps"):
      chosen = baselines_lib.output_tracing_mlps(method, scores, model, budget)
    else:
      chosen = baselines_lib.output_tracing(method, scores, model, budget, mode=spec.localize.score_mode)
  evidence["seconds"] = time.time() - t
  evidence["flu_budget"] = budget
  evidence["mask"] = chosen.to_json()
  evidence["trained_parameters"] = chosen.trained_parameters
  write_json(out / "localization.json", evidence)
  chosen.save(mask_path, model)  # written last: its presence marks the stage done
  return chosen.mask, evidence


def _output_tracing_scores(model, batch, corrupt, kind, spec: ExperimentSpec, out: pathlib.Path):
  if kind == "ap":
    from mech_unlearn_jax.localize import attribution_patching as ap  # pylint: disable=g-import-not-at-top

    scores = ap.attribution_patching(model, batch, corrupt, ap.APConfig()).as_numpy()
    keep = ("head_out", "mlp_out") if spec.localize.score_mode == "reference" else tuple(ap.MATRIX_SITES.values())
    scores = {s: v for s, v in scores.items() if s.kind in keep}
  else:
    from mech_unlearn_jax.localize import causal_tracing as ct  # pylint: disable=g-import-not-at-top

    scores = ct.causal_tracing(model, batch, ct.CTConfig(seed=spec.localize.seed)).scores()
  write_json(out / f"{kind}_scores.json", {str(k): np.asarray(v).tolist() for k, v in scores.items()})
  return scores


def retain_stage(model, tokenizer, spec: ExperimentSpec):
  """(train windows, held-out windows) of retain text."""
  r = spec.retain
  if r.source == "sampled":
    tokens, positions = retain_lib.cached_sampled_windows(
        model, f"{spec.model}|{spec.seed if spec.model.startswith('tiny-') else ''}",
        tokenizer.bos_id, r.num_windows, r.window, seed=spec.seed,
    )
  else:
    texts = retain_lib.load_text_dataset(r.source)
    tokens, positions = retain_lib.windows_from_texts(tokenizer, texts, r.window, r.num_windows)
  n_train = tokens.shape[0] - r.heldout_windows
  return (tokens[:n_train], positions[:n_train]), (tokens[n_train:], positions[n_train:])


def edit_stage(model, tokenizer, facts, split, mask, retain_train, spec: ExperimentSpec, workdir):
  """Trains the masked parameters; resumes from `workdir/checkpoints`."""
  sports = spec.data.task == "sports"
  fmt = _sports(_whole_sport(spec), spec.seed)["standard"] if sports else _counterfact_standard()
  first_token = not sports
  forget = split.select(facts, "forget_train")
  unlearn = spec.edit.loss == "unlearn"
  forget_batch = _fact_batch(
      tokenizer, fmt, forget, None if unlearn else list(split.forget_train_targets),
      "correct" if unlearn else "edit", first_token,
  )
  maintain = _fact_batch(tokenizer, fmt, split.select(facts, "maintain_train"), first_token=first_token)
  e = spec.edit
  config = edit_lib.EditConfig(
      num_steps=e.steps, learning_rate=e.lr, warmup_steps=e.warmup_steps,
      weight_decay=e.weight_decay, clip_norm=e.clip_norm or None,
      forget_loss=e.loss, forget_coef=e.forget_coef, maintain_coef=e.maintain_coef,
      retain_coef=e.retain_coef, forget_batch_size=e.batch_size,
      maintain_batch_size=e.batch_size, retain_batch_size=e.batch_size,
      seed=spec.seed, checkpoint_every=e.checkpoint_every,
  )
  data = edit_lib.EditData(
      forget=forget_batch, maintain=maintain,
      retain=edit_lib.TextBatch(tokens_BxL=retain_train[0], positions_BxL=retain_train[1]),
  )

  def log(step, metrics):
    logging.info("edit step %d/%d: %s", step, e.steps, " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))

  result = edit_lib.train(
      model, mask, data, config, checkpoint_dir=str((workdir / "checkpoints").resolve()),
      model_spec=spec.model, data_split=json.loads(split.to_json()), log_fn=log,
  )
  return result


def evaluate(model, tokenizer, facts, split, spec: ExperimentSpec, retain_heldout, original=None) -> dict[str, Any]:
  """Forget / edit / maintain scores in every format, retain-text metrics, KL."""
  sports = spec.data.task == "sports"
  names = [n.strip() for n in spec.eval.formats.split(",") if n.strip()]
  if sports:
    all_formats = _sports(True, spec.seed)
  else:
    all_formats = formats_lib.counterfact_formats(split.select(facts, "few_shot"), spec.seed)
  unknown = [n for n in names if n not in all_formats]
  if unknown:
    raise ValueError(f"config.eval.formats has unknown format(s) {unknown}; expected some of {sorted(all_formats)}")
  forget = split.select(facts, "forget_eval")
  targets = list(split.forget_eval_targets)
  maintain = split.select(facts, "maintain_test")[: spec.data.max_maintain_eval]
  first_token = not sports
  cells = []
  for name in names:
    fmt = all_formats[name]
    for facts_name, fs, tg, answer in (
        ("forget", forget, targets, "correct"),
        ("forget", forget, targets, "edit"),
        ("maintain", maintain, None, "correct"),
    ):
      if answer == "edit" and spec.edit.loss == "unlearn":
        continue
      score = formats_eval.evaluate_format(
          model, tokenizer, fmt, fs, facts_name, answer, tg, first_token, spec.eval.batch_size
      )
      if score is not None:
        cells.append(score.to_json())
  out: dict[str, Any] = {"cells": cells}
  out["retain_text"] = scoring.text_metrics(model, *retain_heldout)
  if original is not None:
    out["kl_original_edited"] = scoring.kl_divergence(original, model, *retain_heldout)
  return out


def _validity(cells: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  valid = {}
  for c in cells:
    if c["facts"] == "maintain" and c["answer"] == "correct":
      valid[c["format"]] = formats_eval.format_validity(formats_eval.FormatScore(**c))
  return valid


def summarize(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[dict[str, Any]]:
  """One row per (format, facts, answer): unedited vs edited probability and argmax."""
  rows = []
  index = {(c["format"], c["facts"], c["answer"]): c for c in after["cells"]}
  for c in before["cells"]:
    e = index.get((c["format"], c["facts"], c["answer"]))
    if e is None:
      continue
    rows.append({
        "format": c["format"], "facts": c["facts"], "answer": c["answer"], "n": c["n"],
        "unedited_prob": c["prob_normalized"], "edited_prob": e["prob_normalized"],
        "unedited_argmax": c["argmax_candidates"], "edited_argmax": e["argmax_candidates"],
        "unedited_prob_full": c["prob_full"], "edited_prob_full": e["prob_full"],
    })
  return rows


def markdown_table(rows: Sequence[Mapping[str, Any]], validity: Mapping[str, Any]) -> str:
  lines = [
      "| format | facts | answer | n | unedited p | edited p | unedited argmax | edited argmax | format valid (unedited above chance) |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    v = validity.get(r["format"], {})
    valid = "yes" if v.get("valid") else "no"
    lines.append(
        f"| {r['format']} | {r['facts']} | {r['answer']} | {r['n']} | {r['unedited_prob']:.3f} |"
        f" {r['edited_prob']:.3f} | {r['unedited_argmax']:.3f} | {r['edited_argmax']:.3f} | {valid} |"
    )
  return "\n".join(lines) + "\n"


def plot_results(rows: Sequence[Mapping[str, Any]], path: pathlib.Path, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  labels = [f"{r['format']}\n{r['facts']}:{r['answer']}" for r in rows]
  x = np.arange(len(rows))
  fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(rows)), 4))
  ax.bar(x - 0.2, [r["unedited_prob"] for r in rows], 0.4, label="unedited")
  ax.bar(x + 0.2, [r["edited_prob"] for r in rows], 0.4, label="edited")
  ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
  ax.set_ylabel("probability (normalized over candidates)")
  ax.set_ylim(0, 1)
  ax.set_title(title, fontsize=9)
  ax.legend()
  fig.tight_layout()
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)


def run_experiment(spec: ExperimentSpec, workdir: str | os.PathLike) -> dict[str, Any]:
  """Runs (or resumes) the whole job; returns the results dict also written to disk."""
  if spec.data.sequential_rounds != 1:
    raise NotImplementedError(
        f"config.data.sequential_rounds={spec.data.sequential_rounds}: sequential editing"
        " (several rounds, each editing the previous round's model) is not implemented yet;"
        " set it to 1"
    )
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  config_path = workdir / "config.json"
  if config_path.is_file():
    previous = json.loads(config_path.read_text())
    if previous != json.loads(json.dumps(spec.to_json())):
      raise ValueError(
          f"{config_path}: the workdir holds a run with a different config; use a new"
          " --workdir (or delete this one) to start another experiment"
      )
  else:
    write_json(config_path, spec.to_json())
  timings: dict[str, float] = {}
  t0 = time.time()
  model, tokenizer = load_model_and_tokenizer(spec)
  timings["load"] = time.time() - t0

  t = time.time()
  facts, pool = knowledge_stage(model, tokenizer, spec, workdir)
  split = split_stage(pool, spec, workdir)
  timings["knowledge_and_split"] = time.time() - t
  logging.info("split %s: forget_train %d, forget_eval %d, maintain %d/%d", split.name,
               len(split.forget_train), len(split.forget_eval), len(split.maintain_train), len(split.maintain_test))

  t = time.time()
  mask, loc = localization_stage(model, tokenizer, pool, spec, workdir)
  timings["localize"] = time.time() - t
  logging.info("localization %s: %d trained parameters", spec.localize.method, loc["trained_parameters"])

  t = time.time()
  retain_train, retain_heldout = retain_stage(model, tokenizer, spec)
  timings["retain_text"] = time.time() - t

  t = time.time()
  before = evaluate(model, tokenizer, facts, split, spec, retain_heldout)
  timings["evaluate_unedited"] = time.time() - t

  t = time.time()
  result = edit_stage(model, tokenizer, facts, split, mask, retain_train, spec, workdir)
  timings["edit"] = time.time() - t

  t = time.time()
  after = evaluate(result.model, tokenizer, facts, split, spec, retain_heldout, original=model)
  timings["evaluate_edited"] = time.time() - t

  rows = summarize(before, after)
  validity = _validity(before["cells"])
  results = {
      "config": spec.to_json(),
      "split": {k: len(getattr(split, k)) for k in splits_lib.Split.PARTS},
      "localization": loc,
      "trained_parameters": loc["trained_parameters"],
      "format_validity": validity,
      "unedited": before,
      "edited": after,
      "summary": rows,
      "edit_history": result.history,
      "timings_s": timings,
  }
  write_json(workdir / "results.json", results)
  table = markdown_table(rows, validity)
  extra = (
      f"\nretain text (held-out): loss {before['retain_text']['loss']:.3f} -> {after['retain_text']['loss']:.3f},"
      f" next-token accuracy {before['retain_text']['accuracy']:.3f} -> {after['retain_text']['accuracy']:.3f},"
      f" KL(original || edited) {after['kl_original_edited']:.4f} nats/token\n"
      f"trained parameters: {loc['trained_parameters']:,} ({spec.localize.method})\n"
  )
  md = workdir / "results.md"
  tmp = md.with_name(f".results.md.tmp{os.getpid()}")
  tmp.write_text(table + extra)
  os.replace(tmp, md)
  plot_results(rows, workdir / "results.png", f"{spec.data.task} {spec.data.split}, {spec.localize.method}")
  return results
