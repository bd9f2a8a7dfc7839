import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxmodels.models.lm import DecoderLM
from jaxmodels.parallel.distributed import launched_multiprocess
from jaxmodels.parallel.mesh import make_mesh, mesh_shape
from jaxmodels.parallel.sharding import DEFAULT_RULES, batch_spec, logical_to_spec, param_specs


def test_mesh_shape_fills_the_rest():
    assert mesh_shape({"data": -1, "fsdp": 1, "tensor": 1}, 8) == (8, 1, 1, 1)
    assert mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 1, 2)
    assert mesh_shape({"tensor": 4}, 4) == (1, 1, 1, 4)
    assert mesh_shape({"data": 2, "expert": -1}, 8) == (2, 1, 4, 1)


@pytest.mark.parametrize("sizes,match", [
    ({"data": -1, "fsdp": -1}, "at most one -1"),
    ({"data": 3, "fsdp": -1}, "do not divide"),
    ({"data": 2}, "needs 2 devices"),
    ({"pipeline": 2}, "unknown mesh axes"),
])
def test_mesh_shape_errors(sizes, match):
    with pytest.raises(ValueError, match=match):
        mesh_shape(sizes, 8)


@pytest.mark.devices(8)
def test_logical_to_spec_divisibility_and_reuse():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert logical_to_spec(("embed", "mlp"), (64, 128), mesh, DEFAULT_RULES) == P("fsdp", "tensor")
    # 3 kv heads cannot split over tensor=2: replicated rather than an error.
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 3, 8), mesh, DEFAULT_RULES) == P("fsdp", None, None)
    # a mesh axis shards at most one dim of an array
    assert logical_to_spec(("heads", "mlp"), (4, 8), mesh, DEFAULT_RULES) == P("tensor", None)
    with pytest.raises(ValueError, match="no sharding rule"):
        logical_to_spec(("nonsense",), (4,), mesh, DEFAULT_RULES)
    assert batch_spec(DEFAULT_RULES, 2) == P(("data", "fsdp", "expert"), None)


@pytest.mark.devices(8)
def test_param_specs_follow_logical_axes():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = nnx.eval_shape(lambda: DecoderLM(vocab_size=64, num_layers=1, embed_dim=32, num_heads=4, num_kv_heads=2,
                                              head_dim=8, mlp_dim=48, rngs=nnx.Rngs(0)))
    specs = param_specs(model, mesh, DEFAULT_RULES)
    assert specs["blocks"][0]["mlp"]["w_up"] == P("fsdp", "tensor")
    assert specs["blocks"][0]["attn"]["w_o"] == P("tensor", None, "fsdp")
    assert specs["embed"]["embedding"] == P("tensor", "fsdp")
    assert specs["final_norm"]["scale"] == P(None)


def test_make_mesh_on_a_device_subset():
    mesh = make_mesh({"data": -1}, jax.devices()[:1])
    assert mesh.size == 1


def test_multiprocess_detection():
    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
    assert launched_multiprocess(env)
    assert not launched_multiprocess({**env, "JAX_NUM_PROCESSES": "1"})
    assert launched_multiprocess({"SLURM_NTASKS": "4"})
    assert not launched_multiprocess({})
