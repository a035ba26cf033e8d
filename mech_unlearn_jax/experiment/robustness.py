"""The robustness stages: relearning, latent probes, soft prompts, side effects.

The paper's point is not that an edit moves the trained prompt but that the
knowledge does not come back. Each stage here takes a model (edited, or the unedited
control), the run's facts and split, and writes one JSON file; like the other stages
it reads the file back when it exists. `run_robustness(...)` runs the enabled ones
for one model into one folder; the main job calls it for the unedited model and for
the edited one, and `launch.attack` calls it on a finished run's checkpoint.

The forget set is split in halves for the attacks (`attack_halves`): whole-sport
splits use their train / held-out halves, first_N splits their first and second
halves. Attacks train on the first half toward the TRUE answers and are scored on
the held-out half.
"""

from __future__ import annotations

import copy
import dataclasses
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from mech_unlearn_jax import io
from mech_unlearn_jax import progress
from mech_unlearn_jax import train as train_lib
from mech_unlearn_jax.data import splits as splits_lib
from mech_unlearn_jax.data.tasks import Task
from mech_unlearn_jax.evals import formats_eval
from mech_unlearn_jax.evals import latent as latent_lib
from mech_unlearn_jax.evals import relearn as relearn_lib
from mech_unlearn_jax.evals import side_effects as side_effects_lib
from mech_unlearn_jax.evals import softprompt as softprompt_lib


def _softprompt_training() -> train_lib.EditConfig:
  # A handful of vectors trains with a far larger step than weight edits use.
  return train_lib.EditConfig(
      steps=40, lr=1e-2, forget_loss="inject", maintain_coef=0.0, retain_coef=0.0,
      forget_batch_size=8, clip_norm=1.0,
  )


def _full_relearn() -> relearn_lib.RelearnConfig:
  # Full-rank finetuning of every block weight: a smaller step than LoRA's.
  return relearn_lib.RelearnConfig(
      kind="full",
      training=train_lib.EditConfig(
          steps=20, lr=1e-5, forget_batch_size=8, maintain_batch_size=8, retain_batch_size=8,
      ),
  )


@dataclasses.dataclass(frozen=True)
class RobustnessConfig:
  """Which attacks and side-effect evaluations run, and how.

  Attributes:
    relearn: run the relearning attacks (LoRA and full rank).
    relearn_lora, relearn_full: the two attackers (METHOD §4; reference LoRA r=512,
      alpha=32, lr 2e-4, 20 steps).
    probes: run the latent-knowledge probes.
    latent: probe settings.
    soft_prompt: run the soft-prompt attacks (prefix and embedding adapter).
    softprompt_prefix, softprompt_adapter: their settings.
    trivia: run the sports-trivia multiple-choice side-effect eval.
    trivia_path: its questions (the reference's side_effect_sport_answers.json).
    trivia_eval: its settings.
    mc_benchmark: a `datasets` source (local file or hub id) of a general MC
      benchmark in MMLU's schema; "" skips it.
    mc_eval: its settings.
  """

  relearn: bool = True
  relearn_lora: relearn_lib.RelearnConfig = relearn_lib.RelearnConfig(kind="lora")
  relearn_full: relearn_lib.RelearnConfig = dataclasses.field(default_factory=_full_relearn)
  probes: bool = True
  latent: latent_lib.LatentProbeConfig = latent_lib.LatentProbeConfig()
  soft_prompt: bool = True
  softprompt_prefix: softprompt_lib.SoftPromptAttackConfig = softprompt_lib.SoftPromptAttackConfig(
      kind="prefix", training=_softprompt_training()
  )
  softprompt_adapter: softprompt_lib.SoftPromptAttackConfig = softprompt_lib.SoftPromptAttackConfig(
      kind="adapter", training=_softprompt_training()
  )
  trivia: bool = True
  trivia_path: str = "../shared/data/reference/side_effect_sport_answers.json"
  trivia_eval: side_effects_lib.SportTriviaConfig = side_effects_lib.SportTriviaConfig(max_questions=80)
  mc_benchmark: str = ""
  mc_eval: side_effects_lib.MCBenchmarkConfig = side_effects_lib.MCBenchmarkConfig(max_questions=100)

  def __post_init__(self):
    if self.trivia and not self.trivia_path:
      raise ValueError("trivia_path must name the trivia questions when trivia is on")

  @property
  def any_enabled(self) -> bool:
    return self.relearn or self.probes or self.soft_prompt or self.trivia or bool(self.mc_benchmark)


@dataclasses.dataclass(frozen=True)
class AttackHalves:
  """Forget facts the attacks train on (true answers) and those they are scored on."""

  train: list[Any]
  eval: list[Any]
  eval_targets: list[str]


def attack_halves(task: Task, facts: Sequence[Any], split: splits_lib.Split) -> AttackHalves:
  if task.whole_set_split(split.name):
    return AttackHalves(
        split.select(facts, "forget_train"), split.select(facts, "forget_eval"), list(split.forget_eval_targets)
    )
  forget = split.select(facts, "forget_eval")
  targets = list(split.forget_eval_targets)
  half = len(forget) // 2
  if half < 1:
    raise ValueError(f"split {split.name!r}: the forget set ({len(forget)} facts) is too small to halve for the attacks")
  return AttackHalves(forget[:half], forget[half:], targets[half:])


def _eval_cells(model, tokenizer, task, formats, names, facts, targets, unlearn, batch_size) -> list[dict[str, Any]]:
  cells = []
  for name in names:
    usable = {f.key for f in task.usable_facts(name, facts)}
    rows = [(f, t) for f, t in zip(facts, targets) if f.key in usable]
    fs, ts = [f for f, _ in rows], [t for _, t in rows]
    for answer in ("correct",) if unlearn else ("correct", "edit"):
      score = formats_eval.evaluate_format(
          model, tokenizer, formats[name], fs, "forget_heldout", answer, ts, task.first_token_only, batch_size
      )
      if score is not None:
        cells.append(score.to_json())
  return cells


def _staged(path: pathlib.Path | None, fn, is_current=lambda out: True):
  """Runs `fn()` unless `path` holds its result; writes the result there.

  `is_current(out)` False (an output written by code that computed something else)
  recomputes it.
  """
  if path is not None and path.is_file():
    out = io.read_json(path, "robustness-stage output")
    if is_current(out):
      return out
  started = time.time()
  out = fn()
  out["seconds"] = time.time() - started
  if path is not None:
    io.write_json(path, out)
  return out


def run_robustness(
    model: Any, tokenizer: Any, task: Task, facts: Sequence[Any], split: splits_lib.Split,
    config: RobustnessConfig, *, formats: Sequence[str], unlearn: bool, retain_train: train_lib.TextBatch,
    seed: int, batch_size: int = 32, base_model: Any = None, out_dir: pathlib.Path | None = None,
) -> dict[str, Any]:
  """Every enabled robustness stage on `model`; returns {stage: result}.

  Args:
    model: the attacked model (edited, or the unedited control).
    tokenizer, task, facts, split: the run's.
    config: which stages and their settings.
    formats: prompt formats the relearning curves are scored in.
    unlearn: the edit was pure unlearning (no edit targets to score).
    retain_train: retain windows for the relearning attack's retain term.
    seed: seeds every attack.
    batch_size: prompts per forward pass when scoring.
    base_model: the unedited model (latent probes also transfer from it), or None.
    out_dir: one JSON per stage (None: nothing written).
  """
  out_dir = None if out_dir is None else pathlib.Path(out_dir)
  path = (lambda name: None if out_dir is None else out_dir / f"{name}.json")
  halves = attack_halves(task, facts, split)
  all_formats = task.eval_formats(facts, split, seed)
  std = all_formats["standard"]
  results: dict[str, Any] = {}

  if config.relearn:
    fmt = task.train_format(split.name, split.seed)
    data = train_lib.EditData(
        forget=task.fact_batch(tokenizer, fmt, halves.train),  # true answers
        maintain=task.fact_batch(tokenizer, fmt, split.select(facts, "maintain_train")),
        retain=retain_train,
    )

    unattacked: dict[str, Any] = {}

    def evaluate(m):
      # Both attackers start from `model`: its step-0 scores are computed once.
      if m is model and unattacked:
        return copy.deepcopy(unattacked)
      scores = {"cells": _eval_cells(m, tokenizer, task, all_formats, formats, halves.eval, halves.eval_targets, unlearn, batch_size)}
      if m is model:
        unattacked.update(copy.deepcopy(scores))
      return scores

    for name, attacker in (("relearn_lora", config.relearn_lora), ("relearn_full", config.relearn_full)):
      with progress.stage(name, release_compiled=True):
        results[name] = _staged(path(name), lambda a=attacker: relearn_lib.relearn_attack(model, data, evaluate, a, seed))

  if config.probes:
    def probes():
      classes = task.answer_classes(facts)
      # Class names carry no leading space (CounterFact answers do).
      index = {c.strip(): i for i, c in enumerate(classes)}
      label = lambda answers: np.array([index.get(a.strip(), -1) for a in answers], np.int32)
      probe_train = split.select(facts, "maintain_train")
      if task.whole_set_split(split.name):
        # A whole-sport edit's sport is absent from the maintain facts, so a probe fit
        # on them alone can never answer it: fit on the edit's training half too (true
        # labels) and score the held-out half, like the other attacks.
        probe_train = probe_train + split.select(facts, "forget_train")
      maintain_test = split.select(facts, "maintain_test")
      forget = split.select(facts, "forget_eval")
      batch = lambda fs: task.fact_batch(tokenizer, std, fs)
      true = lambda fs: label([task.true_answer(f) for f in fs])
      res = latent_lib.latent_probe_eval(
          model, batch(probe_train), true(probe_train), batch(maintain_test), true(maintain_test),
          batch(forget), true(forget), None if unlearn else label(list(split.forget_eval_targets)),
          len(classes), config.latent, base_model=base_model,
      )
      return res.to_json()

    with progress.stage("latent probes", release_compiled=True):
      results["probes"] = _staged(
          path("probes"), probes, lambda out: out.get("protocol") == latent_lib.PROBE_PROTOCOL
      )

  if config.soft_prompt:
    train_batch = task.fact_batch(tokenizer, std, halves.train)
    eval_batch = task.fact_batch(tokenizer, std, halves.eval)
    for name, attack in (("softprompt_prefix", config.softprompt_prefix), ("softprompt_adapter", config.softprompt_adapter)):
      attack = dataclasses.replace(attack, seed=seed)
      with progress.stage(name, release_compiled=True):
        results[name] = _staged(
            path(name), lambda a=attack: softprompt_lib.soft_prompt_attack(model, train_batch, eval_batch, a).to_json()
        )

  if config.trivia:
    with progress.stage("sport trivia", release_compiled=True):
      results["trivia"] = _staged(
          path("trivia"),
          lambda: side_effects_lib.sport_trivia_eval(
              model, tokenizer, config.trivia_path, dataclasses.replace(config.trivia_eval, seed=seed)
          ).to_json(),
      )

  if config.mc_benchmark:
    def mc():
      questions = side_effects_lib.load_mc_questions(config.mc_benchmark)
      return side_effects_lib.mc_benchmark_eval(
          model, tokenizer, questions, dataclasses.replace(config.mc_eval, seed=seed)
      ).to_json()

    with progress.stage("mc benchmark", release_compiled=True):
      results["mc_benchmark"] = _staged(path("mc_benchmark"), mc)
  return results
