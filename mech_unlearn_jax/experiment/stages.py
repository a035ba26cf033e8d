"""The main job's stages; each takes its own inputs and writes its own output.

Every stage is a plain function a notebook can call alone with explicit arguments.
Given an output path, a stage writes its result atomically there and, when the file
already exists, reads it back instead of recomputing (so a killed run resumes and a
finished run reruns in seconds). Without a path nothing is written.

  knowledge_stage   score every fact in the standard format; keep the known ones
  split_stage       the seeded forget / maintain / few-shot split
  localization_stage  the configured method's mask at the fact-lookup budget
  retain_stage      retain text: train windows and held-out windows
  evaluation_stage  forget / edit / maintain in every format, retain loss, KL
  edit_stage        train only the masked parameters (orbax checkpoints, resumable)

New stages (attacks, probes, side effects) follow the same shape.

Devices and dtypes: a stage runs where its model lives (a model placed on a mesh
splits every batch over it; see `sharding`); the scoring stages take a
`compute_dtype` and score a cast copy of the (float32) model.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from mech_unlearn_jax import io
from mech_unlearn_jax import progress
from mech_unlearn_jax import train as train_lib
from mech_unlearn_jax.data import retain as retain_lib
from mech_unlearn_jax.data import splits as splits_lib
from mech_unlearn_jax.data.tasks import DataConfig, Task
from mech_unlearn_jax.evals import formats_eval, scoring
from mech_unlearn_jax.experiment.spec import EvalConfig, RetainConfig
from mech_unlearn_jax.localize import select


@dataclasses.dataclass(frozen=True)
class Knowledge:
  """All facts read, the known pool (table order) and the stage's record."""

  facts: list[Any]
  pool: list[Any]
  record: dict[str, Any]


def knowledge_stage(
    model: Any, tokenizer: Any, task: Task, data: DataConfig, batch_size: int = 32,
    path: pathlib.Path | None = None, compute_dtype: str = "float32",
) -> Knowledge:
  """Scores every fact in the task's knowledge format (in `compute_dtype`); keeps
  p(true) >= threshold."""
  facts = task.load(data)
  if data.max_facts:
    facts = facts[: data.max_facts]
  if path is not None and path.is_file():
    record = io.read_json(path, "knowledge-stage output")
    if record.get("num_facts") != len(facts):
      raise ValueError(
          f"{path}: recorded for {record.get('num_facts')} facts but the table now has"
          f" {len(facts)}; remove it (or use a new workdir) to rescan"
      )
  else:
    started = time.time()
    fmt = task.knowledge_format(data)
    batch = task.fact_batch(tokenizer, fmt, facts)
    scorer = scoring.with_compute_dtype(model, compute_dtype)
    scores = scoring.score_facts(scorer, batch, chunk_size=batch_size, desc="knowledge scan")
    measure = task.known_measure(data)
    p_true = getattr(scores, measure)
    known = p_true >= data.known_threshold
    record = {
        "task": task.name, "num_facts": len(facts), "format": fmt.name,
        "candidates": list(fmt.fixed_answers or ()) if hasattr(fmt, "fixed_answers") else [],
        "measure": measure, "threshold": data.known_threshold,
        "num_known": int(known.sum()),
        "argmax_accuracy_all": float(scores.correct_argmax_candidates.mean()),
        # The unedited model's standard-format scores on the facts it is said to know.
        "known_mean_p": float(p_true[known].mean()) if known.any() else None,
        "known_argmax_accuracy": float(scores.correct_argmax_candidates[known].mean()) if known.any() else None,
        "p_true": p_true,
        "seconds": time.time() - started,
    }
    if path is not None:
      io.write_json(path, record)
  pool = splits_lib.filter_known(facts, np.asarray(record["p_true"]), data.known_threshold)
  if data.max_pool:
    pool = pool[: data.max_pool]
  return Knowledge(facts, pool, record)


def split_stage(
    task: Task, pool: Sequence[Any], split_name: str, seed: int, metadata: dict[str, Any] | None = None,
    path: pathlib.Path | None = None,
) -> splits_lib.Split:
  """The seeded split of the known pool (read back from `path` when present)."""
  if path is not None and path.is_file():
    return splits_lib.Split.read(path)
  split = task.make_split(pool, split_name, seed, dict(metadata or {}))
  if path is not None:
    split.write(path)
  return split


def localization_facts(task: Task, pool: Sequence[Any], split: splits_lib.Split, num_prompts: int) -> list[Any]:
  """The facts localization traces: the forget facts first, then other known facts.

  A whole-set split's held-out half is left out: it measures how the edit generalizes
  to facts that neither the edit nor the localization saw.
  """
  forget = split.select(pool, "forget_train")
  keys = {f.key for f in forget}
  if task.whole_set_split(split.name):
    keys |= set(split.keys("forget_eval"))
  rest = [f for f in pool if f.key not in keys]
  return (list(forget) + rest)[:num_prompts]


def localization_stage(
    model: Any, tokenizer: Any, task: Task, pool: Sequence[Any], split: splits_lib.Split,
    config: select.LocalizeConfig, seed: int, out_dir: pathlib.Path | None = None,
    context: dict[str, Any] | None = None, evidence_dir: pathlib.Path | None = None,
) -> select.Localization:
  """The configured method's mask at the fact-lookup budget (see `localize.select`)."""
  facts = localization_facts(task, pool, split, config.num_prompts)
  fmt = task.localize_format()
  batch = task.fact_batch(tokenizer, fmt, facts)
  labels, names = task.attribute_labels(facts)
  probe_batch = probe_labels = None
  if config.probe_facts > len(facts) and not (config.layers and config.method == "fact_lookup"):
    probe_facts = localization_facts(task, pool, split, config.probe_facts)
    probe_batch = task.fact_batch(tokenizer, fmt, probe_facts)
    # Class indices over the same class list as the localization facts' labels.
    all_labels, all_names = task.attribute_labels(probe_facts)
    index = {n: i for i, n in enumerate(names)}
    keep = np.array([all_names[l] in index for l in all_labels])
    if not keep.all():
      probe_facts = [f for f, k in zip(probe_facts, keep) if k]
      probe_batch = task.fact_batch(tokenizer, fmt, probe_facts)
      all_labels = all_labels[keep]
    probe_labels = np.array([index[all_names[l]] for l in all_labels], np.int32)
  return select.localize(
      model, tokenizer, batch, labels, len(names), config, seed=seed, out_dir=out_dir,
      context=dict(context or {}, task=task.name), evidence_dir=evidence_dir,
      probe_batch=probe_batch, probe_labels=probe_labels,
  )


@dataclasses.dataclass(frozen=True)
class RetainText:
  train: train_lib.TextBatch
  heldout: train_lib.TextBatch


def retain_stage(model: Any, tokenizer: Any, config: RetainConfig, model_spec: str, seed: int) -> RetainText:
  """Train and held-out retain windows (sampled ones are cached across runs)."""
  if config.source == "sampled":
    # Random tiny models differ per seed; a real checkpoint's samples are shared.
    cache_id = f"{model_spec}|{seed if model_spec.startswith('tiny-') else ''}"
    tokens, positions = retain_lib.cached_sampled_windows(
        model, cache_id, tokenizer.bos_id, config.num_windows, config.window, seed=seed,
    )
  else:
    texts = retain_lib.load_text_dataset(config.source)
    tokens, positions = retain_lib.windows_from_texts(tokenizer, texts, config.window, config.num_windows)
  n_train = tokens.shape[0] - config.heldout_windows
  return RetainText(
      train=train_lib.TextBatch(tokens_BxL=tokens[:n_train], positions_BxL=positions[:n_train]),
      heldout=train_lib.TextBatch(tokens_BxL=tokens[n_train:], positions_BxL=positions[n_train:]),
  )


def evaluation_stage(
    model: Any, tokenizer: Any, task: Task, facts: Sequence[Any], split: splits_lib.Split,
    config: EvalConfig, data: DataConfig, unlearn: bool, retain_heldout: train_lib.TextBatch,
    seed: int, original: Any = None, path: pathlib.Path | None = None,
    compute_dtype: str = "float32",
) -> dict[str, Any]:
  """Forget (true and edit answers) and maintain scores in every format; retain text.

  Forget scores are on `forget_eval` (a whole-set split's held-out half); for a
  whole-set split the trained half is also scored in the standard format
  (facts "forget_train").

  With `original`, also KL(original || model) on the held-out retain text. Models
  are scored in `compute_dtype`.
  """
  if path is not None and path.is_file():
    out = io.read_json(path, "evaluation output")
    # Cells recorded before they counted their facts would judge format validity by
    # prompts (`formats_eval.format_validity`): recompute those.
    if all("num_facts" in c for c in out.get("cells", [])):
      return out
  model = scoring.with_compute_dtype(model, compute_dtype)
  if original is not None:
    original = scoring.with_compute_dtype(original, compute_dtype)
  started = time.time()
  all_formats = task.eval_formats(facts, split, seed)
  unknown = [n for n in config.formats if n not in all_formats]
  if unknown:
    raise ValueError(f"config.eval.formats has unknown format(s) {unknown}; expected some of {sorted(all_formats)}")
  forget = split.select(facts, "forget_eval")
  targets = list(split.forget_eval_targets)
  maintain = split.select(facts, "maintain_test")[: data.max_maintain_eval]
  jobs = []
  for name in config.formats:
    usable = {f.key for f in task.usable_facts(name, forget)}
    f_rows = [(f, t) for f, t in zip(forget, targets) if f.key in usable]
    f_facts, f_targets = [f for f, _ in f_rows], [t for _, t in f_rows]
    jobs.append((name, "forget", f_facts, f_targets, "correct"))
    if not unlearn:
      jobs.append((name, "forget", f_facts, f_targets, "edit"))
    jobs.append((name, "maintain", task.usable_facts(name, maintain), None, "correct"))
  if task.whole_set_split(split.name) and "standard" in config.formats:
    # The half the edit trained on, in its own format: separates "the edit did not
    # take" from "it did not reach the held-out half".
    trained = split.select(facts, "forget_train")
    trained_targets = list(split.forget_train_targets)
    jobs.append(("standard", "forget_train", trained, trained_targets, "correct"))
    if not unlearn:
      jobs.append(("standard", "forget_train", trained, trained_targets, "edit"))
  cells = []
  for name, facts_name, fs, tg, answer in progress.bar(jobs, desc="evaluate", unit="cell"):
    score = formats_eval.evaluate_format(
        model, tokenizer, all_formats[name], fs, facts_name, answer, tg, task.first_token_only, config.batch_size
    )
    if score is not None:
      cells.append(score.to_json())
  out: dict[str, Any] = {"cells": cells}
  out["retain_text"] = scoring.text_metrics(model, retain_heldout.tokens_BxL, retain_heldout.positions_BxL)
  if original is not None:
    out["kl_original_edited"] = scoring.kl_divergence(
        original, model, retain_heldout.tokens_BxL, retain_heldout.positions_BxL
    )
  out["seconds"] = time.time() - started
  if path is not None:
    io.write_json(path, out)
  return out


def edit_data(
    tokenizer: Any, task: Task, facts: Sequence[Any], split: splits_lib.Split, unlearn: bool,
    retain_train: train_lib.TextBatch,
) -> train_lib.EditData:
  """Example pools of the edit: forget (edit targets or true answers), maintain, retain."""
  fmt = task.train_format(split.name, split.seed)
  forget = split.select(facts, "forget_train")
  forget_batch = task.fact_batch(
      tokenizer, fmt, forget, None if unlearn else list(split.forget_train_targets),
      "correct" if unlearn else "edit",
  )
  maintain = task.fact_batch(tokenizer, fmt, split.select(facts, "maintain_train"))
  return train_lib.EditData(forget=forget_batch, maintain=maintain, retain=retain_train)


def edit_stage(
    model: Any, mask: Any, data: train_lib.EditData, config: train_lib.EditConfig,
    checkpoint_dir: pathlib.Path | None, model_spec: str, split: splits_lib.Split,
) -> train_lib.TrainResult:
  """Trains only the masked parameters; resumes from (or reuses) `checkpoint_dir`."""
  bar = progress.bar(total=config.steps, desc="edit", unit="step")

  def log(step: int, metrics: dict[str, float]) -> None:
    bar.update(step - bar.n)
    bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.3g}")

  try:
    return train_lib.edit(
        model, mask, data, config,
        checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir.resolve()),
        model_spec=model_spec, data_split=json.loads(split.to_json()), log_fn=log,
    )
  finally:
    bar.close()
