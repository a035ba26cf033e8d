"""Many devices and many processes give the single-device numbers.

Each scenario runs in a subprocess, because the fake CPU device count must be set
before JAX starts (`--xla_force_host_platform_device_count`):

  * 8 fake devices, meshes (data 4, model 2) and (data 8, model 1): scoring, text
    metrics, KL, attribution patching, causal tracing, a masked edit (whole and
    sub-tensor masks, gradient accumulation) and a LoRA run equal the single-device
    run in the same process; batch sizes the data axis does not divide are padded; a
    checkpoint written on one mesh resumes on another and restores onto one device.
  * two processes (`jax.distributed.initialize` with a coordinator on 127.0.0.1),
    2 fake devices each, one 4-device mesh: an edit, a scoring call and a checkpoint
    written together equal this (single-process, single-device) process's numbers.

Tolerances: float32 sums are reduced in another order when split over devices, so
values agree to rounding, not bitwise: atol 1e-5 on probabilities, log-probs and AP
scores (rtol 1e-4), atol 2e-6 on trained weights after 3 AdamW steps.
"""

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Shared by the subprocesses and by this process (the single-device reference).
COMMON = textwrap.dedent("""
    import jax, numpy as np
    from mech_unlearn_jax import sharding, train as train_lib
    from mech_unlearn_jax.batch import FactBatch
    from mech_unlearn_jax.models import config as config_lib, transformer

    CFG = config_lib.get_preset("tiny-gemma3")

    def facts(seed, n, length=8):
      rng = np.random.default_rng(seed)
      tokens = rng.integers(3, CFG.vocab_size, (n, length)).astype(np.int32)
      positions = np.tile(np.arange(length, dtype=np.int32), (n, 1))
      positions[0] = np.arange(length) - 2  # one left-padded row
      positions[0, :2] = -1
      tokens[0, :2] = 0
      subject = np.zeros((n, length), bool)
      subject[:, 3:5] = True
      return FactBatch(
          tokens_BxL=tokens, positions_BxL=positions,
          answer_ids_B=rng.integers(3, CFG.vocab_size, n).astype(np.int32),
          wrong_ids_BxK=rng.integers(3, CFG.vocab_size, (n, 2)).astype(np.int32),
          subject_mask_BxL=subject,
      )

    def text(seed, n, length=10):
      rng = np.random.default_rng(seed)
      tokens = rng.integers(3, CFG.vocab_size, (n, length)).astype(np.int32)
      positions = np.tile(np.arange(length, dtype=np.int32), (n, 1))
      positions[1] = np.arange(length) - 3
      positions[1, :3] = -1
      tokens[1, :3] = 0
      return train_lib.TextBatch(tokens_BxL=tokens, positions_BxL=positions)

    def corrupt(batch, seed=9):
      tokens = np.array(batch.tokens_BxL)
      rng = np.random.default_rng(seed)
      tokens[batch.subject_mask_BxL] = rng.integers(3, CFG.vocab_size, int(batch.subject_mask_BxL.sum()))
      return tokens

    def mask(sub_tensor=False):
      out = {label: ("block_1/mlp/" in label) for label in transformer.parameter_shapes(CFG)}
      if sub_tensor:
        q = "transformer/block_2/attention/query.weights"
        m = np.zeros(tuple(transformer.parameter_shapes(CFG)[q].values()), bool)
        m[:, 0] = True  # one KV group's query heads
        out[q] = m
      return out

    # Two micro-batches of 3, 3 and 2 rows: not divisible by the data axis (padded).
    DATA = train_lib.EditData(forget=facts(1, 6), maintain=facts(2, 6), retain=text(3, 5))
    CONFIG = train_lib.EditConfig(
        steps=3, lr=3e-2, weight_decay=0.1, forget_batch_size=6, maintain_batch_size=6,
        retain_batch_size=4, num_microbatches=2, checkpoint_every=1,
    )

    def model():
      return transformer.build_transformer(CFG, jax.random.key(0))

    def trained(result):
      return {k: np.asarray(v) for k, v in result.params.items()}
""")

EIGHT_DEVICES = COMMON + textwrap.dedent("""
    import tempfile
    from jax.sharding import NamedSharding
    from mech_unlearn_jax.evals import scoring
    from mech_unlearn_jax import batch as batch_lib
    from mech_unlearn_jax.localize import attribution_patching as ap, causal_tracing as ct

    assert len(jax.devices()) == 8, jax.devices()
    base = model()
    mesh_a = sharding.mesh_from_config(sharding.MeshConfig(data=4, model=2))
    mesh_b = sharding.mesh_from_config(sharding.MeshConfig())  # data=-1: all 8
    assert dict(mesh_b.shape) == {"data": 8, "model": 1}
    on_a = sharding.shard_model(base, mesh_a)
    on_b = sharding.shard_model(base, mesh_b)
    assert sharding.mesh_of(on_a) == mesh_a and sharding.mesh_of(base) is None
    close = lambda a, b, **kw: np.testing.assert_allclose(np.asarray(a), np.asarray(b), **kw)

    # Scoring (13 rows, padded to 16).
    batch = facts(4, 13)
    s1 = scoring.score_facts(base, batch, chunk_size=16)
    for m in (on_a, on_b):
      s = scoring.score_facts(m, batch, chunk_size=16)
      close(s.logprob_full, s1.logprob_full, atol=1e-5)
      close(s.candidate_probs, s1.candidate_probs, atol=1e-5)
      np.testing.assert_array_equal(s.correct_argmax_full, s1.correct_argmax_full)
    # Rows sharing their first 6 tokens: the prefix runs once, on every mesh too.
    import dataclasses
    from mech_unlearn_jax.models import forward
    rng = np.random.default_rng(7)
    head = rng.integers(3, CFG.vocab_size, 6).tolist()
    rows = [head + rng.integers(3, CFG.vocab_size, k).tolist() for k in (1, 3, 2, 4, 2, 3, 1, 2, 3, 1, 2, 4, 1)]
    pt, pp = forward.left_pad(rows)
    pbatch = dataclasses.replace(batch, tokens_BxL=pt, positions_BxL=pp, subject_mask_BxL=np.zeros_like(pt, bool))
    assert batch_lib.shared_prefix_length(pt, pp) >= 6
    whole = scoring.score_facts(base, pbatch, chunk_size=16, share_prefix=False)
    for m in (base, on_a, on_b):
      s = scoring.score_facts(m, pbatch, chunk_size=16)
      close(s.logprob_full, whole.logprob_full, atol=1e-4)
      close(s.candidate_probs, whole.candidate_probs, atol=1e-5)
    t = text(5, 7)
    t1 = scoring.text_metrics(base, t.tokens_BxL, t.positions_BxL, chunk_size=4)
    ta = scoring.text_metrics(on_a, t.tokens_BxL, t.positions_BxL, chunk_size=4)
    assert ta["tokens"] == t1["tokens"], (ta, t1)
    close(ta["loss"], t1["loss"], rtol=1e-5)
    other = transformer.build_transformer(CFG, jax.random.key(1))
    kl1 = scoring.kl_divergence(base, other, t.tokens_BxL, t.positions_BxL)
    kla = scoring.kl_divergence(on_a, sharding.shard_model(other, mesh_a), t.tokens_BxL, t.positions_BxL)
    close(kla, kl1, rtol=1e-4)
    print("SCORING_OK")

    # Attribution patching (6 prompts in chunks of 3: padded to 4 rows per chunk).
    clean = facts(6, 6)
    config = ap.APConfig(batch_size=3, per_neuron=True)
    r1 = ap.attribution_patching(base, clean, corrupt(clean), config)
    ra = ap.attribution_patching(on_a, clean, corrupt(clean), config)
    for site, x in r1.as_numpy().items():
      close(ra.as_numpy()[site], x, atol=1e-5, rtol=1e-4)
    close(ra.clean_logit_diff_B, r1.clean_logit_diff_B, atol=1e-5)
    for layer, x in r1.neuron_scores.items():
      close(ra.neuron_scores[layer].unwrap("neurons"), x.unwrap("neurons"), atol=1e-5, rtol=1e-4)
    print("AP_OK")

    # Causal tracing (5 prompts, padded to the data axis).
    cfg = ct.CTConfig(num_samples=2)
    c1 = ct.causal_tracing(base, facts(7, 5), cfg)
    cb = ct.causal_tracing(on_b, facts(7, 5), cfg)
    close(cb.q_heads_B, c1.q_heads_B, atol=1e-5)
    close(cb.q_mlp_B, c1.q_mlp_B, atol=1e-5)
    print("CT_OK")

    # Edits: whole + sub-tensor masks with gradient accumulation on both meshes,
    # LoRA (new params placed by axis names) on the tensor-parallel mesh.
    def check_edit(run, meshes):
      ref = trained(run(base))
      for m in meshes:
        result = run(m)
        for label, x in ref.items():
          close(result.params[label], x, atol=2e-6, rtol=1e-5)
        mu = result.state.opt_state[1][0].mu
        for label, p in result.params.items():
          assert isinstance(p.sharding, NamedSharding) and p.sharding.mesh == sharding.mesh_of(m), label
          assert mu[label].sharding == p.sharding, label
      return ref

    ref = check_edit(lambda m: train_lib.edit(m, mask(sub_tensor=True), DATA, CONFIG), (on_a, on_b))
    def lora(m):
      params, trainable, _ = train_lib.lora_trainable(m, rank=2, alpha=4.0, seed=0, targets=("up", "q"))
      return train_lib.train(params, trainable, DATA, CONFIG)
    check_edit(lora, (on_a,))
    spec = lora(on_a).params["transformer/block_0/mlp/value_linear/lora_b.weights"].sharding.spec
    assert "model" in tuple(spec), spec  # B's "neurons" axis: tensor parallel
    print("EDIT_OK")

    # A checkpoint written on mesh A resumes on mesh B and ends where the
    # single-device run ends; it also restores onto one device.
    def edit_with_callback(m, workdir, callback):
      # `edit` plus a callback (to stop after step 2), through `train`.
      params, trainable, update_mask = train_lib.mask_trainable(m, mask(sub_tensor=True))
      meta = train_lib.checkpoint.edit_metadata(model_config=CFG, model_spec="tiny-gemma3")
      return train_lib.train(params, trainable, DATA, CONFIG, update_mask=update_mask,
                             checkpoint_dir=workdir, meta=meta, callback=callback)
    class Stop(Exception):
      pass
    def stop_at_2(step, params):
      if step == 2:
        raise Stop
    workdir = tempfile.mkdtemp()
    try:
      edit_with_callback(on_a, workdir, stop_at_2)
    except Stop:
      pass
    with train_lib.CheckpointManager(workdir) as manager:
      assert manager.latest_step() == 2, manager.all_steps()
    resumed = edit_with_callback(on_b, workdir, None)
    assert [h["step"] for h in resumed.history] == [1, 2, 3]
    for label, x in ref.items():
      close(resumed.params[label], x, atol=2e-6, rtol=1e-5)
      assert resumed.params[label].sharding.mesh == mesh_b
    restored, _ = train_lib.load_trained_model(workdir, base)
    got = {k: np.asarray(p.value.unwrap(*p.value.named_shape)) for k, p in transformer.parameters_by_label(restored).items()}
    for label, x in ref.items():
      close(got[label], x, atol=2e-6, rtol=1e-5)
    print("CHECKPOINT_OK")
""")

TWO_PROCESSES = COMMON + textwrap.dedent("""
    import sys
    from mech_unlearn_jax.evals import scoring

    port, pid, out, ckpt_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    assert jax.device_count() == 4 and jax.local_device_count() == 2, jax.devices()
    mesh = sharding.mesh_from_config(sharding.MeshConfig(data=2, model=2))
    placed = sharding.shard_model(model(), mesh)
    result = train_lib.edit(placed, mask(sub_tensor=True), DATA, CONFIG, checkpoint_dir=ckpt_dir,
                            model_spec="tiny-gemma3")
    assert not any(v.is_fully_addressable for v in result.params.values())  # split over both processes
    params = {k: sharding.to_host(v) for k, v in result.params.items()}
    scores = scoring.score_facts(placed, facts(4, 13), chunk_size=8)
    if pid == 0:
      np.savez(out, logprob=scores.logprob_full, loss=np.array([h["loss"] for h in result.history]),
               **{"param:" + k: v for k, v in params.items()})
    print("PROCESS_OK", pid)
""")


def _env(devices: int) -> dict[str, str]:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def test_eight_devices_match_one_device():
  out = subprocess.run(
      [sys.executable, "-c", EIGHT_DEVICES], env=_env(8), capture_output=True, text=True, timeout=600
  )
  for mark in ("SCORING_OK", "AP_OK", "CT_OK", "EDIT_OK", "CHECKPOINT_OK"):
    assert mark in out.stdout, f"{mark} missing:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
  port = str(_free_port())
  out, ckpt_dir = str(tmp_path / "out.npz"), str(tmp_path / "checkpoints")
  procs = [
      subprocess.Popen(
          [sys.executable, "-c", TWO_PROCESSES, port, str(pid), out, ckpt_dir], env=_env(2),
          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      )
      for pid in (0, 1)
  ]
  logs = []
  try:
    for p in procs:
      stdout, stderr = p.communicate(timeout=600)
      logs.append((p.returncode, stdout, stderr[-3000:]))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for pid, (code, stdout, stderr) in enumerate(logs):
    assert code == 0 and f"PROCESS_OK {pid}" in stdout, f"process {pid} failed:\n{stdout}\n{stderr}"

  # The single-process, single-device reference, in this process.
  namespace = {}
  exec(COMMON, namespace)  # pylint: disable=exec-used
  from mech_unlearn_jax.evals import scoring  # pylint: disable=g-import-not-at-top
  from mech_unlearn_jax.train import load_trained_model  # pylint: disable=g-import-not-at-top
  from mech_unlearn_jax.models import transformer  # pylint: disable=g-import-not-at-top

  base = namespace["model"]()
  ref = namespace["train_lib"].edit(base, namespace["mask"](sub_tensor=True), namespace["DATA"], namespace["CONFIG"])
  got = np.load(out)
  np.testing.assert_allclose(got["loss"], [h["loss"] for h in ref.history], rtol=1e-5)
  for label, x in ref.params.items():
    np.testing.assert_allclose(got["param:" + label], np.asarray(x), atol=2e-6, rtol=1e-5)
  scores = scoring.score_facts(base, namespace["facts"](4, 13), chunk_size=8)
  np.testing.assert_allclose(got["logprob"], scores.logprob_full, atol=1e-5)
  # The checkpoint the two processes wrote together restores here, on one device.
  restored, _ = load_trained_model(ckpt_dir, base)
  values = transformer.parameters_by_label(restored)
  for label, x in ref.params.items():
    value = values[label].value
    np.testing.assert_allclose(np.asarray(value.unwrap(*value.named_shape)), np.asarray(x), atol=2e-6, rtol=1e-5)
