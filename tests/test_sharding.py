"""Data-parallel, FSDP and tensor-parallel layouts on 8 simulated CPU devices train to the same
losses as one device (same global batches, float tolerance), and the parameters really are
split the way the layout says.

The 8 devices must exist before JAX starts, so the runs happen in subprocesses: this file is
also the worker (``python tests/test_sharding.py NUM_DEVICES LAYOUTS_JSON WORKDIR``).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = {  # (data, fsdp, tensor[, model.dtype]); the default suite's: every axis at once
    "data_parallel": (8, 1, 1),
    "mixed_2x2x2": (2, 2, 2),
}
SLOW_LAYOUTS = {  # each axis alone, and bfloat16 (-m slow: 8-device compiles are minutes)
    "fsdp": (1, 8, 1),
    "tensor_parallel": (1, 1, 8),
    # bfloat16 matmuls (layers.bf16_matmul) partitioned: every dot must still run on XLA:CPU.
    "mixed_2x2x2_bf16": (2, 2, 2, "bfloat16"),
}
SINGLE = {"single": (1, 1, 1)}
SLOW_SINGLE = {"single_bf16": (1, 1, 1, "bfloat16")}
STEPS = 3


def tiny_config(data, fsdp, tensor, dtype="float32"):
    sys.path.insert(0, ROOT)
    from configs import decoder_lm

    config = decoder_lm.get_config("quick")
    config.model.update(d_model=32, num_heads=8, d_ff=64, dtype=dtype)
    config.optimizer.update(schedule="constant", warmup_steps=0, learning_rate=3e-3)
    config.train.update(num_steps=STEPS, batch_size=8, seq_len=16, log_every=1,
                        eval_every=STEPS, eval_steps=1, checkpoint_every=STEPS,
                        progress_bar=False)
    config.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
    return config


def worker(layouts: dict, workdir: str) -> dict:
    """Trains each layout; returns its losses and the shard shape of one FFN kernel."""
    import jax
    from deepnorm import TransformerConfig
    from deepnorm.training import mesh as mesh_lib
    from deepnorm.training import optim, state
    from deepnorm.training.loop import train_and_evaluate
    from deepnorm.training.metrics import read_metrics

    out = {}
    for name, sizes in layouts.items():
        config = tiny_config(*sizes)
        summary = train_and_evaluate(config, os.path.join(workdir, name))
        rows = read_metrics(os.path.join(workdir, name, "metrics.jsonl"))
        model_cfg = TransformerConfig.from_mapping(config.model)
        tx, _ = optim.make_optimizer(config.optimizer, STEPS)
        mesh = mesh_lib.make_mesh(config.mesh)
        shardings = mesh_lib.state_shardings(mesh, tx, state.abstract_params(model_cfg)[1],
                                             mesh_lib.sharding_rules(config.mesh))
        sharding = shardings.params["decoder"]["layers"]["ffn"]["ffn_in"]["kernel"]
        kernel = jax.device_put(np.zeros((2, 32, 64), np.float32), sharding)
        out[name] = {
            "loss": [r["loss"] for r in rows if r["kind"] == "train"],
            "grad_norm": [r["grad_norm"] for r in rows if r["kind"] == "train"],
            "eval_loss": summary["final_eval_loss"],
            "devices": jax.device_count(),
            "kernel_shape": list(kernel.shape),
            "kernel_shard_shape": list(kernel.addressable_shards[0].data.shape),
        }
    return out


def run_worker(num_devices: int, layouts: dict, workdir) -> subprocess.Popen:
    env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(num_devices), JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        [sys.executable, __file__, str(num_devices), json.dumps(layouts), str(workdir)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def collect(proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def run_layouts(root, singles: dict, layouts: dict) -> tuple[dict, dict]:
    single = run_worker(1, singles, root / "one")
    multi = run_worker(8, layouts, root / "eight")
    return collect(single), collect(multi)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_layouts(tmp_path_factory.mktemp("sharding"), SINGLE, LAYOUTS)


@pytest.fixture(scope="module")
def slow_results(tmp_path_factory, results):
    singles, multi = run_layouts(tmp_path_factory.mktemp("sharding_slow"), SLOW_SINGLE,
                                 SLOW_LAYOUTS)
    return {**results[0], **singles}, {**results[1], **multi}


def each_layout(names):
    return [pytest.param(name, marks=pytest.mark.slow) if name in SLOW_LAYOUTS else name
            for name in names]


@pytest.fixture
def layout_results(request, layout):
    """The default layouts' runs, or with a slow layout both sets."""
    return request.getfixturevalue("slow_results" if layout in SLOW_LAYOUTS else "results")


@pytest.mark.parametrize("layout", each_layout(list(LAYOUTS) + list(SLOW_LAYOUTS)))
def test_layout_trains_like_one_device(layout_results, layout):
    singles, multi = layout_results
    bf16 = layout.endswith("_bf16")
    single, run = singles["single_bf16" if bf16 else "single"], multi[layout]
    assert single["devices"] == 1 and run["devices"] == 8
    assert len(run["loss"]) == STEPS
    # bfloat16: a partitioned matmul rounds its partial sums' cotangents to bfloat16 at other
    # points than one device does, so the runs agree less closely (measured: <= 8e-5).
    rtol, grad_rtol = (5e-4, 5e-4) if bf16 else (2e-5, 1e-4)
    np.testing.assert_allclose(run["loss"], single["loss"], rtol=rtol)
    np.testing.assert_allclose(run["grad_norm"], single["grad_norm"], rtol=grad_rtol)
    np.testing.assert_allclose(run["eval_loss"], single["eval_loss"], rtol=rtol)


@pytest.mark.parametrize("layout,shard", [
    ("data_parallel", [2, 32, 64]),  # replicated
    pytest.param("fsdp", [2, 4, 64], marks=pytest.mark.slow),  # embed split 8 ways
    pytest.param("tensor_parallel", [2, 32, 8], marks=pytest.mark.slow),  # mlp split 8 ways
    ("mixed_2x2x2", [2, 16, 32]),  # embed over fsdp=2, mlp over tensor=2
])
def test_parameters_are_split_as_the_layout_says(layout_results, layout, shard):
    _, multi = layout_results
    assert multi[layout]["kernel_shape"] == [2, 32, 64]
    assert multi[layout]["kernel_shard_shape"] == shard


if __name__ == "__main__":
    _, layouts_json, workdir_arg = sys.argv[1:]
    print(json.dumps(worker(json.loads(layouts_json), workdir_arg)))
