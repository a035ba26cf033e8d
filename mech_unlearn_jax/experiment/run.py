"""The main job: knowledge -> split -> localize -> retain -> evaluate -> edit -> evaluate.

`run_experiment(spec, workdir)` calls the stages of `stages.py` in order, each with
its own output in the workdir (config, knowledge, split, localization, checkpoints,
evaluations, robustness outputs; `layout.py` lists and names them), then builds the
report (results.json|md|png) from those outputs.

A killed run resumes (finished stages are read back; the edit continues from its
latest checkpoint); a finished run reruns in seconds and rewrites nothing.

Devices: the model is placed once on `config.mesh` (`sharding.shard_model`; one
device: not at all) and carries its mesh into every stage, so scoring, attribution
patching, causal tracing, the edit and the attacks all split their batches over the
"data" axis. The mesh is not part of the experiment: a run resumes on another mesh.
Scoring stages compute in `config.compute_dtype` (a cast copy of the float32 model).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import pathlib
from typing import Any

import jax

from mech_unlearn_jax import io
from mech_unlearn_jax import progress
from mech_unlearn_jax import sharding
from mech_unlearn_jax.data import splits as splits_lib
from mech_unlearn_jax.data.tasks import get_task
from mech_unlearn_jax.experiment import inputs as inputs_lib
from mech_unlearn_jax.experiment import report, robustness, schema, stages, validate
from mech_unlearn_jax.experiment.layout import RunLayout
from mech_unlearn_jax.experiment.spec import ExperimentSpec
from mech_unlearn_jax.localize import masks as masks_lib
from mech_unlearn_jax.localize import select
from mech_unlearn_jax.models import loaders


class WorkdirBusyError(RuntimeError):
  """Another process is running in the same workdir."""


@dataclasses.dataclass(frozen=True)
class SharedOutputs:
  """Stage outputs several runs share (a study's cells); None: the run's own.

  Attributes:
    knowledge: knowledge.json of the model and data (every cell of a setting).
    evidence_dir: folder of the fact-lookup evidence (per setting and seed: every
      method's budget comes from it).
    unedited_dir: folder for the unedited model's evaluation and robustness control
      (per setting and seed: they do not depend on the method).
  """

  knowledge: pathlib.Path | None = None
  evidence_dir: pathlib.Path | None = None
  unedited_dir: pathlib.Path | None = None


@contextlib.contextmanager
def workdir_lock(workdir: pathlib.Path):
  """An exclusive lock on the workdir for the lifetime of a run (released on exit/kill)."""
  workdir.mkdir(parents=True, exist_ok=True)
  handle = open(workdir / ".lock", "a+")
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    handle.close()
    raise WorkdirBusyError(
        f"{workdir}: another run is using this workdir (it holds {workdir / '.lock'}); wait for"
        " it to finish or use another --workdir"
    ) from None
  try:
    yield
  finally:
    fcntl.flock(handle, fcntl.LOCK_UN)
    handle.close()


def check_or_write_config(spec: ExperimentSpec, workdir: pathlib.Path) -> None:
  """Records the spec; a workdir holding another spec is refused, naming the keys."""
  path = RunLayout(workdir).config
  current = json.loads(json.dumps(spec.to_json()))
  if path.is_file():
    previous = io.read_json(path, "run config")
    if experiment_part(previous) != experiment_part(current):
      changed = schema.diff(experiment_part(previous), experiment_part(current))
      raise ValueError(
          f"{path}: the workdir holds a run with a different config ({'; '.join(changed[:8])});"
          " use a new --workdir (or delete this one) to start another experiment"
      )
  elif os.access(workdir, os.W_OK):
    io.write_json(path, current)


def experiment_part(record: dict[str, Any]) -> dict[str, Any]:
  """What of a config record (`spec.to_json()`) defines the experiment: all but where
  it ran (the mesh), so compare and digest this; records written before the
  compute-dtype switch computed in float32."""
  out = {k: v for k, v in record.items() if k != "mesh"}
  out.setdefault("compute_dtype", "float32")
  return out


def robustness_stage(model_name: str) -> str:
  """The progress stage that runs the robustness suite on `model_name`'s model."""
  return f"robustness ({model_name})"


# The stages that compute the unedited control (`SharedOutputs.unedited_dir`): in a
# study the first cell of a setting and seed runs them, its other cells read them.
UNEDITED_EVALUATION_STAGE = "evaluate unedited"
UNEDITED_CONTROL_STAGES = (UNEDITED_EVALUATION_STAGE, robustness_stage("unedited"))


# Knowledge-filter inputs: the filter is shared by every run that agrees on these.
_KNOWLEDGE_DATA_KEYS = (
    "task",
    "sports_source",
    "counterfact_path",
    "counterfact_mc_path",
    "known_threshold",
    "known_measure",
    "known_candidates",
    "max_facts",
)


def _digest(record: Any) -> str:
  return hashlib.sha256(json.dumps(io.to_jsonable(record), sort_keys=True).encode()).hexdigest()[:10]


def is_tiny(spec: ExperimentSpec) -> bool:
  """A random tiny preset (its weights, and so its knowledge, depend on the seed)."""
  return spec.model.startswith("tiny-")


def _setting_key(record: dict[str, Any]) -> dict[str, Any]:
  """What of a config record names its shared outputs: the experiment part (not where
  it ran) without the edit's settings, which none of them depends on (each method
  family has its own tuned edit, and all of them share one knowledge filter, evidence
  and unedited control); the float32 default is left out so that folders written
  before the compute-dtype switch existed keep their names."""
  key = experiment_part(record)
  key.pop("edit", None)
  if key.get("compute_dtype") == "float32":
    del key["compute_dtype"]
  return key


def keyed_shared_outputs(spec: ExperimentSpec, root: pathlib.Path, setting: str) -> SharedOutputs:
  """Shared stage outputs under `root`, keyed so that runs share exactly what they agree on.

  The knowledge filter is keyed by the model and the data keys it reads; the
  fact-lookup evidence and the unedited control by everything of the experiment but
  the localization method, the edit and the seed, under `setting` (a readable name)
  and one folder per seed. Runs of different methods or edit values of one setting
  (a study's cells, `launch.run --shared_dir`) so compute each of them once; a run
  that differs in anything they depend on gets its own folders.
  """
  record = spec.to_json()
  data = record["data"]
  knowledge_key = {
      "model": spec.model,
      "eval_batch_size": spec.eval.batch_size,
      # Random tiny models differ per seed, so their knowledge does too.
      "model_seed": spec.seed if is_tiny(spec) else None,
      **{k: data[k] for k in _KNOWLEDGE_DATA_KEYS},
  }
  # Everything but the method and the seed (the seed names the folder).
  setting_record = ExperimentSpec.from_json(dict(record, seed=0, localize=dict(record["localize"], method="fact_lookup")))
  folder = root / f"{setting}-{_digest(_setting_key(setting_record.to_json()))}" / f"seed{spec.seed}"
  return SharedOutputs(
      knowledge=root / "knowledge" / f"{spec.data.task}-{_digest(knowledge_key)}.json",
      evidence_dir=folder / "evidence",
      unedited_dir=folder / "unedited",
  )


def place_model(model: Any, mesh_config: sharding.MeshConfig) -> Any:
  """`model` placed on the mesh of `mesh_config` (as is when that is one device)."""
  mesh = sharding.mesh_from_config(mesh_config)
  if not sharding.is_multi_device(mesh):
    return model
  return sharding.shard_model(model, mesh, fsdp=mesh_config.fsdp)


def run_experiment(
    spec: ExperimentSpec, workdir: str | os.PathLike, shared: SharedOutputs | None = None,
    loaded: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
  """Runs (or resumes, or just re-reports) the main job; returns the results dict.

  Args:
    spec: the experiment.
    workdir: where every stage writes (see the module docstring).
    shared: stage outputs shared with other runs (a study's cells).
    loaded: (model, tokenizer) already loaded for `spec.model` (a study loads once).
  """
  workdir = pathlib.Path(workdir)
  writable = os.access(workdir if workdir.exists() else workdir.parent, os.W_OK)
  with _primary_lock(workdir) if writable else contextlib.nullcontext():
    return _run(spec, workdir, shared=shared or SharedOutputs(), loaded=loaded)


def _primary_lock(workdir: pathlib.Path):
  """The workdir lock, taken by the first process only: with `jax.distributed`, every
  process of one run shares the workdir (and writes the same files atomically)."""
  return workdir_lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()


def attack_only(
    workdir: str | os.PathLike, robustness_config: Any = None,
    mesh: sharding.MeshConfig | None = None,
) -> dict[str, Any]:
  """The robustness stages on a finished run, without redoing the edit.

  Reads the run's config.json; every earlier stage is read back from the workdir and
  the edited model is restored from its final checkpoint. `robustness_config`
  (default: the run's own, or the library default if the run had every stage off)
  chooses the attacks; results.json/md and the plots are rebuilt with them. `mesh`
  (default: every device here, whatever mesh the run used) is where they run.
  """
  workdir = pathlib.Path(workdir)
  layout = RunLayout(workdir)
  if not layout.config.is_file():
    raise FileNotFoundError(f"{layout.config}: not a run's workdir (no {layout.config.name})")
  spec = ExperimentSpec.from_json(io.read_json(layout.config, "run config"))
  if not layout.evaluation("edited").is_file():
    raise ValueError(
        f"{workdir}: the run has not finished (no {layout.evaluation('edited').relative_to(workdir)});"
        " rerun launch.run first"
    )
  if robustness_config is None:
    robustness_config = spec.robustness if spec.robustness.any_enabled else robustness.RobustnessConfig()
  spec = dataclasses.replace(spec, robustness=robustness_config, mesh=mesh or sharding.MeshConfig())
  with _primary_lock(workdir):
    return _run(spec, workdir, record_config=False)


def _run(
    spec: ExperimentSpec, workdir: pathlib.Path, record_config: bool = True,
    shared: SharedOutputs = SharedOutputs(), loaded: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
  # The whole config first (nothing written if refused), then the inputs' fingerprints.
  validate.validate_spec(spec, num_layers=loaded[0].config.num_layers if loaded else None)
  if record_config:
    check_or_write_config(spec, workdir)
  inputs_lib.check_inputs(spec, workdir)
  task = get_task(spec.data.task)
  unlearn = spec.edit.forget_loss == "unlearn"
  layout = RunLayout(workdir)

  with progress.stage("load model", release_compiled=True) as info:
    model, tokenizer = loaded or loaders.load_model_and_tokenizer(spec.model, spec.seed)
    model = place_model(model, spec.mesh)
    mesh = sharding.mesh_of(model)
    placed = f", mesh {dict(mesh.shape)}" if mesh is not None else ""
    info["detail"] = f"{spec.model}: {model.config.num_layers} layers{placed}"
  if spec.localize.layers:
    select.check_layers(spec.localize.layers, model.config.num_layers)

  with progress.stage("knowledge", release_compiled=True) as info:
    knowledge = stages.knowledge_stage(
        model, tokenizer, task, spec.data, spec.eval.batch_size, shared.knowledge or layout.knowledge,
        compute_dtype=spec.compute_dtype,
    )
    info["detail"] = f"{len(knowledge.pool)} of {len(knowledge.facts)} facts known"

  with progress.stage("split", release_compiled=True) as info:
    split = stages.split_stage(
        task, knowledge.pool, spec.data.split, spec.seed,
        {"model": spec.model, "threshold": spec.data.known_threshold}, layout.split,
    )
    info["detail"] = (
        f"forget {len(split.forget_train)}/{len(split.forget_eval)},"
        f" maintain {len(split.maintain_train)}/{len(split.maintain_test)}"
    )

  with progress.stage("localize", release_compiled=True) as info:
    loc = stages.localization_stage(
        model, tokenizer, task, knowledge.pool, split, spec.localize, spec.seed,
        layout.localization, context={"model": spec.model}, evidence_dir=shared.evidence_dir,
    )
    info["detail"] = f"{loc.evidence['mask_name']}: {loc.trained_parameters:,} weights, FLU layers {loc.evidence['flu_layers']}"

  with progress.stage("retain text", release_compiled=True):
    retain = stages.retain_stage(model, tokenizer, spec.retain, spec.model, spec.seed)

  eval_args = dict(
      task=task, facts=knowledge.facts, split=split, config=spec.eval, data=spec.data,
      unlearn=unlearn, retain_heldout=retain.heldout, seed=spec.seed, compute_dtype=spec.compute_dtype,
  )
  with progress.stage(UNEDITED_EVALUATION_STAGE, release_compiled=True):
    unedited_layout = RunLayout(shared.unedited_dir or workdir)
    before = stages.evaluation_stage(model, tokenizer, path=unedited_layout.evaluation("unedited"), **eval_args)

  rounds = []
  if spec.data.sequential_rounds > 1:
    result, rounds = sequential_edits(
        spec, model, tokenizer, task, knowledge.facts, split, loc.mask, retain, workdir, eval_args
    )
  else:
    with progress.stage("edit", release_compiled=True) as info:
      data = stages.edit_data(tokenizer, task, knowledge.facts, split, unlearn, retain.train)
      result = stages.edit_stage(model, loc.mask, data, spec.edit, layout.checkpoints(), spec.model, split)
      info["detail"] = f"{len(result.history)} steps"

  with progress.stage("evaluate edited", release_compiled=True):
    after = stages.evaluation_stage(
        result.model, tokenizer, original=model, path=layout.evaluation("edited"), **eval_args
    )

  robust = {}
  if spec.robustness.any_enabled:
    robust = robustness_for_run(
        spec, task, tokenizer, knowledge.facts, split, retain, workdir,
        unedited=model, edited=result.model, unedited_dir=shared.unedited_dir,
    )

  # The paper's "accuracy" (METHOD §4); letter formats read p over the letters anyway.
  measure = "prob_full" if task.first_token_only else "prob_normalized"
  results = {
      "config": spec.to_json(),
      "knowledge": {k: v for k, v in knowledge.record.items() if k != "p_true"},
      "split": {k: len(getattr(split, k)) for k in splits_lib.Split.PARTS},
      "localization": loc.evidence,
      "trained_parameters": loc.trained_parameters,
      "format_validity": report.format_validity(before["cells"]),
      "unedited": before,
      "edited": after,
      "measure": measure,
      "summary": report.summarize(before, after, measure),
      "edit_history": result.history,
      "robustness": robust,
  }
  if rounds:
    results["sequential_rounds"] = rounds
  if os.access(workdir, os.W_OK):
    report.write_report(workdir, results, f"{task.name} {split.name}, {loc.evidence['mask_name']}")
  return results


def round_split(split: splits_lib.Split, rounds: int, r: int) -> splits_lib.Split:
  """Round r of a sequential edit: trains on its own block of the forget set and is
  evaluated on every fact edited so far (the maintain set excludes all of them)."""
  size, rest = divmod(len(split.forget_train), rounds)
  if rest or size < 1:
    raise ValueError(
        f"config.data.sequential_rounds={rounds} must divide the forget set of split"
        f" {split.name!r} ({len(split.forget_train)} facts)"
    )
  if split.forget_train != split.forget_eval:
    raise ValueError(f"sequential editing needs a first_<N>/random_<N> split, not {split.name!r}")
  block = slice(r * size, (r + 1) * size)
  so_far = slice(0, (r + 1) * size)
  return dataclasses.replace(
      split,
      forget_train=split.forget_train[block], forget_train_targets=split.forget_train_targets[block],
      forget_eval=split.forget_eval[so_far], forget_eval_targets=split.forget_eval_targets[so_far],
      metadata=dict(split.metadata, sequential_round=r, sequential_rounds=rounds),
  )


def sequential_edits(spec, model, tokenizer, task, facts, split, mask, retain, workdir, eval_args):
  """Edits the forget set in `sequential_rounds` consecutive blocks (METHOD §1.2).

  Each round trains on its block starting from the previous round's model (its own
  checkpoints in checkpoints/round_r) and is evaluated on every fact edited so far.
  Returns (the last round's TrainResult with the whole history, per-round summaries).
  """
  rounds = spec.data.sequential_rounds
  unlearn = spec.edit.forget_loss == "unlearn"
  layout = RunLayout(workdir)
  current, history, summaries = model, [], []
  for r in range(rounds):
    sub = round_split(split, rounds, r)
    with progress.stage(f"edit round {r + 1}/{rounds}", release_compiled=True):
      data = stages.edit_data(tokenizer, task, facts, sub, unlearn, retain.train)
      result = stages.edit_stage(current, mask, data, spec.edit, layout.checkpoints(r), spec.model, sub)
    history += [dict(h, round=r) for h in result.history]
    current = result.model
    with progress.stage(f"evaluate round {r + 1}", release_compiled=True):
      ev = stages.evaluation_stage(
          current, tokenizer, original=model, path=layout.evaluation(f"round_{r}"),
          **dict(eval_args, split=sub),
      )
    standard = {(c["facts"], c["answer"]): c for c in ev["cells"] if c["format"] == "standard"}
    measure = "prob_full" if task.first_token_only else "prob_normalized"
    summaries.append({
        "round": r, "edited_so_far": len(sub.forget_eval),
        **{f"standard_{f}_{a}": c[measure] for (f, a), c in standard.items()},
        "kl_original_edited": ev.get("kl_original_edited"),
    })
  return dataclasses.replace(result, history=history), summaries


def robustness_for_run(
    spec, task, tokenizer, facts, split, retain, workdir, *, unedited, edited, unedited_dir=None
) -> dict[str, Any]:
  """The robustness stages on the unedited control and on the edited model."""
  unlearn = spec.edit.forget_loss == "unlearn"
  common = dict(
      tokenizer=tokenizer, task=task, facts=facts, split=split, config=spec.robustness,
      formats=spec.eval.formats, unlearn=unlearn, retain_train=retain.train, seed=spec.seed,
      batch_size=spec.eval.batch_size,
  )
  out = {}
  for name, model, base in (("unedited", unedited, None), ("edited", edited, unedited)):
    root = RunLayout((unedited_dir or workdir) if name == "unedited" else workdir)
    with progress.stage(robustness_stage(name)):
      out[name] = robustness.run_robustness(
          model, base_model=base, out_dir=root.robustness(name), **common
      )
  return out


def localize_only(
    spec: ExperimentSpec, methods: list[str], workdir: str | os.PathLike,
    shared: SharedOutputs | None = None, loaded: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
  """Knowledge, split and localization stages for several methods (shared FLU evidence).

  `shared` (a study's knowledge filter and per-seed evidence, as in `run_experiment`)
  and `loaded` (the model and tokenizer) let a study rebuild a finished cell's mask
  without recomputing either. Masks go to `workdir/localization/<method>/mask.npz`.

  Returns {method: {"mask_name", "trained_parameters", "flu_layers", "units"}}.
  """
  shared = shared or SharedOutputs()
  bad = [m for m in methods if m not in select.METHODS]
  if bad:
    raise ValueError(f"--methods: unknown method(s) {bad}; expected some of {select.METHODS}")
  workdir = pathlib.Path(workdir)
  layout = RunLayout(workdir)
  with workdir_lock(workdir):
    check_or_write_config(spec, workdir)
    task = get_task(spec.data.task)
    with progress.stage("load model", release_compiled=True):
      model, tokenizer = loaded or loaders.load_model_and_tokenizer(spec.model, spec.seed)
    if spec.localize.layers:
      select.check_layers(spec.localize.layers, model.config.num_layers)
    with progress.stage("knowledge", release_compiled=True) as info:
      knowledge = stages.knowledge_stage(
          model, tokenizer, task, spec.data, spec.eval.batch_size, shared.knowledge or layout.knowledge,
          compute_dtype=spec.compute_dtype,
      )
      info["detail"] = f"{len(knowledge.pool)} of {len(knowledge.facts)} facts known"
    split = stages.split_stage(
        task, knowledge.pool, spec.data.split, spec.seed,
        {"model": spec.model, "threshold": spec.data.known_threshold}, layout.split,
    )
    summary, chosen = {}, {}
    for method in methods:
      config = dataclasses.replace(spec.localize, method=method)
      with progress.stage(f"localize {method}", release_compiled=True) as info:
        loc = stages.localization_stage(
            model, tokenizer, task, knowledge.pool, split, config, spec.seed,
            layout.localization / method, context={"model": spec.model},
            evidence_dir=shared.evidence_dir or layout.localization,
        )
        info["detail"] = f"{loc.trained_parameters:,} weights"
      summary[method] = {
          "mask_name": loc.evidence["mask_name"], "trained_parameters": loc.trained_parameters,
          "flu_layers": loc.evidence["flu_layers"], "units": loc.evidence["mask"].get("units"),
      }
      chosen[method] = loc.mask
    coincidence = masks_lib.mask_coincidence(chosen, model)
    io.write_json(layout.localization / "summary.json", summary)
    io.write_json(layout.localization / "coincidence.json", coincidence)
    io.write_text(layout.localization / "coincidence.md", report.coincidence_markdown(coincidence))
    return summary
