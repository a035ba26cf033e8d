"""Side by side with Hugging Face transformers (PyTorch, CPU, fp32) on the same GGUF file.

  pip install -r requirements-bench.txt     # torch + transformers: not project dependencies
  python -m benchmarks.compare               # every row
  python -m benchmarks.compare --rows=knowledge,forward --repeats=3

Both sides run in this one process, on the same token ids and positions (this
library's tokenizer; transformers dequantizes the same Q4_K_M file to fp32), with
torch given as many threads as the machine has cores. Rows:

  knowledge  the knowledge scan of every sports fact (the main job's first stage),
             chunks of 64. Ours: `scoring.score_facts` (length-sorted chunks, the
             shared one-shot prefix run once). Transformers: the same length-sorted
             chunks with `logits_to_keep=1` (its best configuration), and with full
             logits.
  forward    32 prompts, logits at the last position only.
  edit_mlps, edit_blocks
             one AdamW step (clip 1.0) of `benchmarks.edit`'s workload: 32 facts
             (CE toward the edit target at the last token) + 8 random-token retain
             windows of 46 tokens (next-token CE); the MLPs of layers 2-7 trainable,
             or every attention and MLP matrix. Transformers: eager PyTorch (no
             torch.compile), last-position logits for the facts, frozen weights with
             requires_grad=False.
  ap         attribution patching of every attention head and MLP output, 32 sports
             prompts with corrupted subjects. Transformers: forward hooks, a clean run,
             a corrupted run from embeddings that require grad, one backward of the
             logit difference.
  ct         causal tracing of all 18 MLPs and 72 heads (one noise sample, 3 sigma on
             the subject embeddings). Transformers: a clean and a corrupted run, then one
             hooked forward per restoration (92 forwards).

Each row prints both sides' steady-state time (median of --repeats after a warm-up
call that includes compilation), the ratio (transformers time / ours: above 1 means
this library is faster) and, where the performance issue sets one, the target. Wall
times on a shared machine are noisy; the two sides of a row are interleaved, so a
background load slows both. A parity line checks that both load the same function.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np
from absl import app, flags

from benchmarks import common
from benchmarks import edit as edit_bench
from mech_unlearn_jax.data.tasks import get_task
from mech_unlearn_jax.evals import scoring
from mech_unlearn_jax.experiment.spec import ExperimentSpec
from mech_unlearn_jax.models import forward, loaders

ROWS = ("knowledge", "forward", "edit_mlps", "edit_blocks", "ap", "ct")
# The performance issue's targets: ours must be this many times faster.
TARGETS = {"knowledge": 1.2, "edit_mlps": 1.5, "edit_blocks": 1.5}
_ROWS = flags.DEFINE_list("rows", list(ROWS), f"Which rows to run (of {ROWS}).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per side after the warm-up (median reported).")
_CHUNK = flags.DEFINE_integer("chunk_size", 64, "Prompts per chunk of the knowledge scan.")
_LOCALIZE_PROMPTS = flags.DEFINE_integer("localize_prompts", 32, "Sports prompts of the ap and ct rows.")


def _import_reference():
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise SystemExit(
        f"benchmarks.compare needs torch and transformers ({e}); install them with"
        " `pip install -r requirements-bench.txt`"
    ) from None
  return torch, transformers


def _length_sorted_chunks(tokens_BxL: np.ndarray, positions_BxL: np.ndarray, chunk: int):
  """Left-padded rows sorted by length, cut into chunks trimmed to their longest row."""
  lengths = (positions_BxL >= 0).sum(1)
  order = np.argsort(lengths, kind="stable")
  for start in range(0, len(order), chunk):
    rows = order[start : start + chunk]
    width = int(lengths[rows].max())
    yield rows, tokens_BxL[rows, -width:], positions_BxL[rows, -width:]


class Reference:
  """The transformers model on the same GGUF file, fed this library's token ids."""

  def __init__(self, gguf_path: str):
    self.torch, transformers = _import_reference()
    self.torch.set_num_threads(os.cpu_count() or 1)
    folder, name = os.path.split(gguf_path)
    t = time.perf_counter()
    self.model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=self.torch.float32
    ).eval()
    self.load_s = time.perf_counter() - t
    self.versions = f"torch {self.torch.__version__}, transformers {transformers.__version__}"

  def _inputs(self, tokens_BxL: np.ndarray, positions_BxL: np.ndarray):
    torch = self.torch
    valid = positions_BxL >= 0
    return dict(
        input_ids=torch.from_numpy(np.where(valid, tokens_BxL, 0).astype(np.int64)),
        attention_mask=torch.from_numpy(valid.astype(np.int64)),
        position_ids=torch.from_numpy(np.maximum(positions_BxL, 0).astype(np.int64)),
    )

  def last_log_probs(self, tokens_BxL, positions_BxL, logits_to_keep: int = 1) -> np.ndarray:
    with self.torch.inference_mode():
      out = self.model(**self._inputs(tokens_BxL, positions_BxL), logits_to_keep=logits_to_keep)
      return self.torch.log_softmax(out.logits[:, -1].float(), -1).numpy()

  def knowledge_scan(self, batch, chunk: int, logits_to_keep: int) -> np.ndarray:
    """log p(true answer) of every row, in length-sorted chunks."""
    out = np.zeros(batch.size, np.float32)
    answers = np.asarray(batch.answer_ids_B)
    tokens, positions = np.asarray(batch.tokens_BxL), np.asarray(batch.positions_BxL)
    for rows, t, p in _length_sorted_chunks(tokens, positions, chunk):
      logp = self.last_log_probs(t, p, logits_to_keep)
      out[rows] = logp[np.arange(len(rows)), answers[rows]]
    return out

  def edit_step_fn(self, forget, retain, trainable_names: set[str], lr: float = 1e-5):
    """A closure running one eager AdamW step of the edit workload."""
    torch, model = self.torch, self.model
    params = []
    for name, p in model.named_parameters():
      p.requires_grad_(name in trainable_names)
      if name in trainable_names:
        params.append(p)
    if not params:
      raise ValueError(f"no transformers parameter matches {sorted(trainable_names)[:3]}...")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    facts = self._inputs(np.asarray(forget.tokens_BxL), np.asarray(forget.positions_BxL))
    targets = torch.from_numpy(np.asarray(forget.answer_ids_B).astype(np.int64))
    text = torch.from_numpy(np.asarray(retain.tokens_BxL).astype(np.int64))
    text_positions = torch.from_numpy(np.asarray(retain.positions_BxL).astype(np.int64))
    vocab = model.config.vocab_size

    def step() -> float:
      opt.zero_grad(set_to_none=True)
      fact_logits = model(**facts, logits_to_keep=1).logits[:, -1]
      loss = torch.nn.functional.cross_entropy(fact_logits, targets)
      text_logits = model(input_ids=text, position_ids=text_positions).logits[:, :-1]
      loss = loss + torch.nn.functional.cross_entropy(text_logits.reshape(-1, vocab), text[:, 1:].reshape(-1))
      loss.backward()
      torch.nn.utils.clip_grad_norm_(params, 1.0)
      opt.step()
      return float(loss)

    return step


  def _embeds(self, tokens_BxL, positions_BxL):
    inputs = self._inputs(tokens_BxL, positions_BxL)
    # Gemma's scaled embedding (x sqrt(d)) is applied inside embed_tokens.
    return self.model.model.embed_tokens(inputs.pop("input_ids")), inputs

  def _site_modules(self):
    layers = self.model.model.layers
    return [(l, "head_out", layer.self_attn.o_proj) for l, layer in enumerate(layers)] + [
        (l, "mlp_out", layer.mlp) for l, layer in enumerate(layers)
    ]

  def attribution_patching(self, clean_BxL, corrupt_BxL, positions_BxL, answers_B, wrong_B) -> dict:
    """AP scores per (layer, kind): (clean - corrupt) . d logit-difference / d activation."""
    torch = self.torch
    captured: dict = {}

    def hook_for(key, is_input):
      def hook(module, args, output=None):
        x = args[0] if is_input else output
        if x.requires_grad:
          x.retain_grad()
        captured[key] = x
      return hook

    handles = []
    for layer, kind, module in self._site_modules():
      if kind == "head_out":  # the heads' outputs are o_proj's input
        handles.append(module.register_forward_pre_hook(hook_for((layer, kind), True)))
      else:
        handles.append(module.register_forward_hook(hook_for((layer, kind), False)))
    rows = torch.arange(len(answers_B))
    answers, wrong = torch.from_numpy(answers_B.astype(np.int64)), torch.from_numpy(wrong_B.astype(np.int64))
    try:
      with torch.no_grad():
        embeds, inputs = self._embeds(clean_BxL, positions_BxL)
        self.model(inputs_embeds=embeds, **inputs, logits_to_keep=1)
      clean = {k: v.detach() for k, v in captured.items()}
      embeds, inputs = self._embeds(corrupt_BxL, positions_BxL)
      embeds = embeds.detach().requires_grad_(True)
      logits = self.model(inputs_embeds=embeds, **inputs, logits_to_keep=1).logits[:, -1]
      (logits[rows, answers] - logits[rows, wrong]).sum().backward()
      heads = self.model.config.num_attention_heads
      scores = {}
      for key, act in captured.items():
        contrib = (clean[key] - act.detach()) * act.grad
        if key[1] == "head_out":
          contrib = contrib.reshape(*contrib.shape[:2], heads, -1).sum(-1)
        scores[key] = contrib.sum(dim=(0, 1)).numpy()
      return scores
    finally:
      for h in handles:
        h.remove()

  def causal_tracing(self, tokens_BxL, positions_BxL, subject_BxL, answers_B) -> dict:
    """p(answer) recovered by restoring each MLP's and each head's clean output (all positions)."""
    torch = self.torch
    captured, restore = {}, {}

    def hook_for(key, is_input):
      def hook(module, args, output=None):
        if key in restore:  # replace the site's value with its clean one
          if is_input:
            x = args[0].clone()
            hd = x.shape[-1] // self.model.config.num_attention_heads
            sl = slice(restore[key][1] * hd, (restore[key][1] + 1) * hd)
            x[..., sl] = restore[key][0][..., sl]
            return (x,)
          return restore[key][0]
        captured[key] = args[0] if is_input else output
        return None
      return hook

    handles = []
    for layer, kind, module in self._site_modules():
      if kind == "head_out":
        handles.append(module.register_forward_pre_hook(hook_for((layer, kind), True)))
      else:
        handles.append(module.register_forward_hook(hook_for((layer, kind), False)))
    rows = torch.arange(len(answers_B))
    answers = torch.from_numpy(answers_B.astype(np.int64))
    subject = torch.from_numpy(subject_BxL)[..., None]
    try:
      with torch.inference_mode():
        embeds, inputs = self._embeds(tokens_BxL, positions_BxL)
        self.model(inputs_embeds=embeds, **inputs, logits_to_keep=1)
        clean = dict(captured)
        generator = torch.Generator().manual_seed(0)
        noise_scale = 3 * float(embeds[subject[..., 0]].std())  # ROME's 3 sigma of subject embeddings
        noise = torch.randn(embeds.shape, generator=generator) * noise_scale
        corrupted = embeds + noise * subject

        def p_answer():
          logits = self.model(inputs_embeds=corrupted, **inputs, logits_to_keep=1).logits[:, -1]
          return torch.softmax(logits.float(), -1)[rows, answers].numpy()

        out = {"corrupted": p_answer()}
        heads = self.model.config.num_attention_heads
        for layer, kind, _ in self._site_modules():
          for head in range(heads) if kind == "head_out" else (None,):
            restore.clear()
            restore[(layer, kind)] = (clean[(layer, kind)], head)
            out[(layer, kind, head)] = p_answer()
        return out
    finally:
      for h in handles:
        h.remove()


def reference_names(case: str, num_layers: int) -> set[str]:
  """transformers parameter names of `benchmarks.edit`'s trainable case."""
  mlp = ("gate_proj", "up_proj", "down_proj")
  attn = ("q_proj", "k_proj", "v_proj", "o_proj")
  names = set()
  for layer in range(num_layers):
    if case == "mlps" and not 2 <= layer <= 7:
      continue
    names |= {f"model.layers.{layer}.mlp.{m}.weight" for m in mlp}
    if case == "blocks":
      names |= {f"model.layers.{layer}.self_attn.{m}.weight" for m in attn}
  return names


def _report(row: str, ours: tuple[float, float], theirs: tuple[float, float], unit: str, note: str = "") -> dict:
  ratio = theirs[1] / ours[1]
  target = TARGETS.get(row)
  verdict = "" if target is None else f"  target >= {target}x: {'met' if ratio >= target else 'NOT met'}"
  print(f"{row:<12} ours {ours[1]:8.3f} {unit} (first {ours[0]:6.1f} s) | transformers {theirs[1]:8.3f} {unit}"
        f" (first {theirs[0]:6.1f} s) | ratio {ratio:5.2f}x{verdict}{note}", flush=True)
  return {"row": row, "ours_s": ours[1], "transformers_s": theirs[1], "ratio": ratio, "target": target}


def main(argv):
  del argv
  unknown = [r for r in _ROWS.value if r not in ROWS]
  if unknown:
    raise app.UsageError(f"--rows: unknown row(s) {unknown}; expected some of {ROWS}")
  reference = Reference(loaders.default_gguf_path())
  model, tokenizer = loaders.load_model_and_tokenizer("default")
  print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs; reference: {reference.versions},"
        f" {reference.torch.get_num_threads()} threads; transformers load {reference.load_s:.1f} s", flush=True)
  spec = ExperimentSpec()
  task = get_task("sports")
  facts = task.load(spec.data)
  knowledge = task.fact_batch(tokenizer, task.knowledge_format(spec.data), facts)

  # Parity: the same function on both sides (last-position log-probabilities).
  tokens, positions = np.asarray(knowledge.tokens_BxL[:32]), np.asarray(knowledge.positions_BxL[:32])
  ours_logp = np.asarray(jax.nn.log_softmax(forward.last_logits(model, tokens, positions), -1))
  theirs_logp = reference.last_log_probs(tokens, positions)
  agree = np.mean(ours_logp.argmax(-1) == theirs_logp.argmax(-1))
  print(f"parity (32 prompts, last position): max |log p difference| over the top-10 tokens"
        f" {np.max(np.abs(np.take_along_axis(ours_logp - theirs_logp, np.argsort(-ours_logp, -1)[:, :10], -1))):.2e},"
        f" argmax agreement {agree:.0%}", flush=True)

  repeats = _REPEATS.value
  results = []
  if "knowledge" in _ROWS.value:
    n = knowledge.size
    ours = common.timed(lambda: scoring.score_facts(model, knowledge, _CHUNK.value), repeats)
    best = common.timed(lambda: reference.knowledge_scan(knowledge, _CHUNK.value, 1), repeats)
    full = common.timed(lambda: reference.knowledge_scan(knowledge, _CHUNK.value, 0), 1)
    results.append(_report(
        "knowledge", ours, best, "s",
        f"  ({n / ours[1]:.1f} vs {n / best[1]:.1f} prompts/s; transformers with full logits"
        f" {n / full[1]:.1f} prompts/s)",
    ))
  if "forward" in _ROWS.value:
    jitted = lambda: np.asarray(forward.jitted_last_logits(model, tokens, positions))
    ours = common.timed(jitted, repeats)
    theirs = common.timed(lambda: reference.last_log_probs(tokens, positions), repeats)
    results.append(_report("forward", ours, theirs, "s"))
  for case in ("mlps", "blocks"):
    if f"edit_{case}" not in _ROWS.value:
      continue
    forget, retain = edit_bench.workload(tokenizer, model.config.vocab_size)
    step = reference.edit_step_fn(forget, retain, reference_names(case, model.config.num_layers))
    theirs = common.timed(step, repeats)
    ours_case = edit_bench.run_case(case)  # its own model copy: the step donates its buffers
    ours = (ours_case["first_step_s"] + ours_case["compile_s"], ours_case["step_s_median"])
    results.append(_report(f"edit_{case}", ours, theirs, "s", f"  (ours: median of --steps={edit_bench._STEPS.value} steps)"))
  if "ap" in _ROWS.value or "ct" in _ROWS.value:
    from mech_unlearn_jax.data import facts as facts_lib  # pylint: disable=g-import-not-at-top
    from mech_unlearn_jax.localize import attribution_patching as ap  # pylint: disable=g-import-not-at-top
    from mech_unlearn_jax.localize import causal_tracing as ct  # pylint: disable=g-import-not-at-top
    from mech_unlearn_jax.localize import corruption  # pylint: disable=g-import-not-at-top

    batch = common.sports_batch(tokenizer, facts_lib.load_sports_facts()[: _LOCALIZE_PROMPTS.value])
    pool = corruption.ascii_token_ids(tokenizer, tokenizer.vocab_size)
    corrupt = corruption.corrupt_subjects(tokenizer, batch, pool, seed=0)
    tokens, positions = np.asarray(batch.tokens_BxL), np.asarray(batch.positions_BxL)
    answers, wrong = np.asarray(batch.answer_ids_B), np.asarray(batch.wrong_ids_BxK)[:, 0]
    if "ap" in _ROWS.value:
      ours = common.timed(lambda: jax.block_until_ready(ap.attribution_patching(model, batch, corrupt).scores), repeats)
      theirs = common.timed(lambda: reference.attribution_patching(tokens, corrupt, positions, answers, wrong), repeats)
      results.append(_report("ap", ours, theirs, "s", f"  ({model.config.num_layers} layers x (heads + MLP))"))
    if "ct" in _ROWS.value:
      subject = np.asarray(batch.subject_mask_BxL)
      ct_config = ct.CTConfig(num_samples=1)
      ours = common.timed(lambda: ct.causal_tracing(model, batch, ct_config), 1)
      theirs = common.timed(lambda: reference.causal_tracing(tokens, positions, subject, answers), 1)
      restorations = model.config.num_layers * (model.config.num_heads + 1)
      results.append(_report("ct", ours, theirs, "s", f"  ({restorations} restorations, one noise sample)"))
  missed = [r["row"] for r in results if r["target"] is not None and r["ratio"] < r["target"]]
  print("targets: " + ("all met" if not missed else f"NOT met for {missed}"))


if __name__ == "__main__":
  app.run(main)
