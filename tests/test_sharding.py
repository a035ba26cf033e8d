"""Named axes -> mesh axes, `config.mesh`, and the spec-level compute dtype.

The 8-device forward runs in a subprocess because the fake device count must be set
before JAX starts; everything else here runs in this (one-device) process. The
multi-device trainer, scoring, AP, CT and checkpoints are in test_multidevice.py.
"""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from mech_unlearn_jax import sharding
from mech_unlearn_jax.experiment import spec as spec_lib
from mech_unlearn_jax.experiment import run as run_lib
from mech_unlearn_jax.experiment.schema import ConfigError
from mech_unlearn_jax.models import config as config_lib, transformer

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
    assert tuple(spec) == ("model", "data"), spec  # vocabulary: tensor parallel; embedding: FSDP
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


def test_param_spec_tensor_parallel_then_fsdp():
  mesh = AbstractMesh((4, 2), ("data", "model"))
  mlp = {"embedding": 32, "neurons": 64}
  assert sharding.param_spec(mlp, tuple(mlp), mesh) == PartitionSpec("data", "model")
  assert sharding.param_spec(mlp, tuple(mlp), mesh, fsdp=False) == PartitionSpec(None, "model")
  # A single KV group does not divide "model"; FSDP takes the first divisible axis.
  key = {"embedding": 30, "head_groups": 1, "projection": 8}
  assert sharding.param_spec(key, tuple(key), mesh) == PartitionSpec(None, None, "data")
  # Nothing divides: replicated.
  assert sharding.param_spec({"embedding": 30}, ("embedding",), mesh) == PartitionSpec(None)
  # With model = 1 this is costs.py's FSDP placement: the first divisible axis.
  data_only = AbstractMesh((8, 1), ("data", "model"))
  table = {"vocabulary": 512, "embedding": 32}
  assert sharding.param_spec(table, tuple(table), data_only) == PartitionSpec("data", None)


def test_mesh_from_config_sizes_and_errors():
  devices = [object()] * 8  # only counted and reshaped
  assert dict(sharding.mesh_from_config(sharding.MeshConfig(), devices).shape) == {"data": 8, "model": 1}
  assert dict(sharding.mesh_from_config(sharding.MeshConfig(data=-1, model=2), devices).shape) == {"data": 4, "model": 2}
  assert dict(sharding.mesh_from_config(sharding.MeshConfig(data=2, model=-1), devices).shape) == {"data": 2, "model": 4}
  with pytest.raises(ValueError, match=r"config\.mesh\.model=3 does not divide the 8 devices"):
    sharding.mesh_from_config(sharding.MeshConfig(model=3), devices)
  with pytest.raises(ValueError, match=r"config\.mesh\.data=2 x config\.mesh\.model=2 does not use the 8"):
    sharding.mesh_from_config(sharding.MeshConfig(data=2, model=2), devices)
  with pytest.raises(ValueError, match="cannot both be -1"):
    sharding.MeshConfig(data=-1, model=-1)
  with pytest.raises(ValueError, match=r"MeshConfig\.data must be -1"):
    sharding.MeshConfig(data=0)


def test_one_device_mesh_leaves_the_model_alone():
  model = transformer.build_transformer(config_lib.get_preset("tiny-gemma3"), jax.random.key(0))
  assert sharding.mesh_of(model) is None
  # The default config on one device: no placement, the very same object.
  assert run_lib.place_model(model, sharding.MeshConfig()) is model
  placed = sharding.shard_model(model, sharding.make_mesh(1, 1))
  assert sharding.mesh_of(placed) is None  # a one-device mesh takes the single-device path


def test_pad_rows():
  x = np.arange(6).reshape(3, 2)
  np.testing.assert_array_equal(sharding.pad_rows(x, 4), [[0, 1], [2, 3], [4, 5], [4, 5]])
  np.testing.assert_array_equal(sharding.pad_rows(x, 3, axis=1, fill=-1)[:, 2], [-1, -1, -1])
  assert sharding.padded_size(5, 4) == 8 and sharding.padded_size(8, 4) == 8
  with pytest.raises(ValueError):
    sharding.pad_rows(x, 2)


def test_spec_mesh_and_compute_dtype_switches():
  config = spec_lib.default_config_dict()
  assert config.mesh.data == -1 and config.mesh.model == 1 and config.compute_dtype == "float32"
  assert "compute_dtype" not in config.edit  # follows the top-level switch
  config.compute_dtype = "bfloat16"
  config.mesh.data = 4
  spec = spec_lib.ExperimentSpec.from_dict(config)
  assert spec.mesh == sharding.MeshConfig(data=4)
  trainings = [
      spec.edit, spec.robustness.relearn_lora.training, spec.robustness.relearn_full.training,
      spec.robustness.softprompt_prefix.training, spec.robustness.softprompt_adapter.training,
  ]
  assert {t.compute_dtype for t in trainings} == {"bfloat16"}
  assert spec_lib.ExperimentSpec.from_json(spec.to_json()) == spec
  nested = spec_lib.default_config_dict().to_dict()
  nested["edit"]["compute_dtype"] = "bfloat16"
  with pytest.raises(ConfigError, match=r"config\.edit\.compute_dtype is not a setting: set config\.compute_dtype"):
    spec_lib.ExperimentSpec.from_dict(nested)
  with pytest.raises(ConfigError, match="config.compute_dtype"):
    spec_lib.ExperimentSpec.from_dict(dict(spec_lib.default_config_dict().to_dict(), compute_dtype="float16"))


def test_a_run_resumes_on_another_mesh_but_not_in_another_dtype(tmp_path):
  spec = spec_lib.ExperimentSpec(model="tiny-gemma3", mesh=sharding.MeshConfig(data=8))
  run_lib.check_or_write_config(spec, tmp_path)
  run_lib.check_or_write_config(spec_lib.ExperimentSpec(model="tiny-gemma3"), tmp_path)  # other mesh: fine
  with pytest.raises(ValueError, match="compute_dtype"):
    run_lib.check_or_write_config(spec_lib.ExperimentSpec(model="tiny-gemma3", compute_dtype="bfloat16"), tmp_path)
