"""Sharded execution on 8 fake CPU devices equals the single-device result.

Runs in a subprocess because the fake device count must be set before JAX starts.
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    assert len(jax.devices()) == 8, jax.devices()
    from mech_unlearn_jax import sharding
    from mech_unlearn_jax.models import config as config_lib, forward, transformer
    cfg = config_lib.get_preset("tiny-gemma3")
    model = transformer.build_transformer(cfg, jax.random.key(0))
    tokens, positions = forward.left_pad([[2, 5, 6, 7], [2, 8, 9], [2, 10], [2, 11, 12, 13]], multiple=4)
    expected = np.asarray(forward.last_logits(model, tokens, positions))
    mesh = sharding.make_mesh(data=2, model=4)
    sharded = sharding.shard_model(model, mesh)
    emb = [p for p in transformer.parameters_by_label(sharded).values() if p.label.endswith("embedder.embeddings")][0]
    spec = emb.value.data_array.sharding.spec
    assert "model" in tuple(spec), spec
    tok, pos = sharding.shard_batch((tokens, positions), mesh)
    got = np.asarray(forward.jitted_last_logits(sharded, tok, pos))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    print("SHARDED_OK")
""")


def test_sharded_forward_matches_single_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
  assert "SHARDED_OK" in out.stdout, out.stderr[-3000:]
