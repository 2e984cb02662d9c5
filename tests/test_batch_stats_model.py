"""BatchNorm / PowerNorm inside the model: the running statistics are updated by the train step
in every norm slot, used by eval and decoding, taken over real tokens only, and synchronized
over data-parallel devices (8 simulated CPU devices in a subprocess: this file is also the
worker, ``python tests/test_batch_stats_model.py WORKDIR``)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # for `configs`
from configs import base  # noqa: E402

from deepnorm import variables  # noqa: E402
from deepnorm.config import ConfigError, TransformerConfig  # noqa: E402
from deepnorm.training.optim import make_optimizer  # noqa: E402
from deepnorm.training.state import create_train_state  # noqa: E402
from deepnorm.training.steps import make_eval_step, make_train_step  # noqa: E402


def tiny(norm, **kw):
    return TransformerConfig(**dict(dict(arch="decoder", num_layers=2, d_model=16, num_heads=2,
                                          d_ff=32, residual="pre", norm=norm,
                                          remat_policy="none"), **kw))


def batch_for(cfg, b=4, t=8, seed=0, lengths=None):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(4, cfg.vocab_size, (b, t)).astype(np.int32)
    weights = np.ones((b, t), np.float32)
    if lengths is not None:  # padding (id 0) after each row's length
        real = np.arange(t)[None, :] < np.asarray(lengths)[:, None]
        inputs, weights = np.where(real, inputs, 0), real.astype(np.float32)
    out = {"inputs": inputs, "targets": rng.integers(4, cfg.vocab_size, (b, t)).astype(np.int32),
           "weights": weights}
    if cfg.arch == "encoder_decoder":
        out["decoder_inputs"] = rng.integers(4, cfg.vocab_size, (b, t)).astype(np.int32)
    return {k: jnp.asarray(v) for k, v in out.items()}


def setup(cfg, **step_kw):
    opt = ml_collections.ConfigDict(dict(base.optimizer_config(), learning_rate=3e-3,
                                         warmup_steps=0, schedule="constant"))
    tx, _ = make_optimizer(opt, 10)
    graphdef, state = create_train_state(cfg, tx, seed=0)
    return graphdef, state, jax.jit(make_train_step(graphdef, tx, diagnostics=False, **step_kw))


@pytest.mark.parametrize("norm,residual,arch", [
    ("batchnorm", "deepnorm", "decoder"), ("powernorm", "pre", "decoder"),
    # subln: the inner norms of attention and FFN; encoder_decoder: cross-attention too
    ("batchnorm", "subln", "encoder_decoder"), ("powernorm", "subln", "encoder_decoder")])
def test_a_train_step_updates_the_running_statistics_of_every_norm(norm, residual, arch):
    layers = dict(num_layers=2) if arch == "decoder" else dict(
        num_layers=0, num_encoder_layers=1, num_decoder_layers=1)
    cfg = tiny(norm, residual=residual, arch=arch, **layers)
    graphdef, state, step = setup(cfg)
    before = state.batch_stats
    new, metrics = step(state, batch_for(cfg))
    assert np.isfinite(float(metrics["loss"]))
    flat_before = dict(jax.tree_util.tree_flatten_with_path(before)[0])
    for path, leaf in jax.tree_util.tree_flatten_with_path(new.batch_stats)[0]:
        name = jax.tree_util.keystr(path)
        if name.endswith("['count']"):
            np.testing.assert_array_equal(leaf, 1.0, err_msg=name)
        else:  # every statistic moved, per layer (nu by its backward update)
            moved = np.abs(np.asarray(leaf) - np.asarray(flat_before[path])).reshape(
                leaf.shape[:1] + (-1,) if leaf.ndim > 1 else (1, -1)).max(-1)
            assert np.all(moved > 0), name
    # Stacked [L, d] like the parameters of the scanned layers.
    stacked = new.batch_stats["decoder"]["layers"]["ffn_norm"]
    key = "mean" if norm == "batchnorm" else "psi2"
    assert stacked[key].shape == (cfg.decoder_layers, cfg.d_model)
    if residual == "subln":
        assert "inner_norm" in new.batch_stats["decoder"]["layers"]["ffn"]


@pytest.mark.parametrize("norm", ["batchnorm", "powernorm"])
def test_eval_and_decoding_use_the_running_statistics(norm):
    cfg = tiny(norm)
    graphdef, state, step = setup(cfg)
    for seed in range(3):
        state, _ = step(state, batch_for(cfg, seed=seed))
    batch = batch_for(cfg, seed=9)
    eval_step = jax.jit(make_eval_step(graphdef))
    loss = float(eval_step(state.params, batch, state.batch_stats)["loss"])
    model = variables.merge(graphdef, state.params, state.batch_stats)
    logits, _ = model(batch["inputs"], deterministic=True)
    # The same loss by hand from the merged model's eval forward pass.
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    np.testing.assert_allclose(loss, float(jnp.mean(nll)), rtol=1e-5)
    # Other running statistics give another loss: eval reads them.
    initial = create_train_state(cfg, make_optimizer(
        ml_collections.ConfigDict(base.optimizer_config()), 10)[0], seed=0)[1].batch_stats
    other = float(eval_step(state.params, batch, initial)["loss"])
    assert abs(other - loss) > 1e-4
    with pytest.raises(ValueError, match="pass its batch_stats"):
        eval_step(state.params, batch)
    # Incremental decoding (cache, one position at a time) gives the eval logits.
    cache = model.init_decode_cache(batch["inputs"].shape[0], batch["inputs"].shape[1])
    for t in range(batch["inputs"].shape[1]):
        step_logits, cache = model.decode_step(batch["inputs"][:, t:t + 1], cache)
        np.testing.assert_allclose(step_logits[:, 0], logits[:, t], rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("norm", ["batchnorm", "powernorm"])
def test_padding_changes_neither_running_statistics_nor_real_logits(norm):
    cfg = tiny(norm)
    lengths = [8, 5, 3, 6]
    short = batch_for(cfg, t=8, lengths=lengths)
    # The same rows with 5 more padding positions.
    long = {k: jnp.pad(v, ((0, 0), (0, 5))) for k, v in short.items()}
    outs = []
    for batch in (short, long):
        graphdef, state, step = setup(cfg)
        new, metrics = step(state, batch)
        model = variables.merge(graphdef, state.params, state.batch_stats)
        logits, _ = model(batch["inputs"], deterministic=False)  # batch statistics
        real = np.asarray(batch["weights"]) > 0
        outs.append((new.batch_stats, float(metrics["loss"]), np.asarray(logits)[real]))
    (s0, l0, y0), (s1, l1, y1) = outs
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), s1, s0)


def test_gradient_accumulation_is_refused_with_batch_statistics():
    cfg = tiny("powernorm")
    _, state, step = setup(cfg, grad_accum_steps=2)
    with pytest.raises(ConfigError, match="grad_accum_steps=2 with batch-statistics norms"):
        step(state, batch_for(cfg))


def saved_batch_stats(workdir: str, step: int):
    """The running statistics in ``workdir``'s checkpoint of ``step``, as NumPy arrays."""
    import orbax.checkpoint as ocp
    tree = ocp.StandardCheckpointer().restore(
        os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "state"))
    return jax.tree.map(np.asarray, tree["batch_stats"])


def test_fold_norms_refuses_batch_statistics_norms():
    from deepnorm.export import FoldError, fold_norms
    from deepnorm.transformer import Transformer

    model = Transformer(tiny("batchnorm"), rngs=nnx.Rngs(params=0))
    with pytest.raises(FoldError, match="norm='batchnorm' is not folded"):
        fold_norms(model)


# --- 8 data-parallel devices -------------------------------------------------------------------

def worker(workdir: str) -> dict:
    """Trains powernorm and batchnorm runs on every device there is, data-parallel; returns
    the losses and the final running statistics."""
    from configs import decoder_lm
    from deepnorm.training.loop import train_and_evaluate
    from deepnorm.training.metrics import read_metrics

    out = {}
    for norm in ("powernorm", "batchnorm"):
        config = decoder_lm.get_config("quick")
        config.model.update(d_model=16, num_heads=2, d_ff=32, norm=norm)
        config.optimizer.update(schedule="constant", warmup_steps=0, learning_rate=3e-3)
        config.train.update(num_steps=3, batch_size=8, seq_len=16, log_every=1, eval_every=3,
                            eval_steps=1, checkpoint_every=1, keep_checkpoints=3,
                            progress_bar=False)
        config.mesh.update(data=jax.device_count())
        path = os.path.join(workdir, norm)
        summary = train_and_evaluate(config, path)
        rows = read_metrics(os.path.join(path, "metrics.jsonl"))
        out[norm] = {"loss": [r["loss"] for r in rows if r["kind"] == "train"],
                     "eval_loss": summary["final_eval_loss"], "devices": jax.device_count(),
                     "stats": jax.tree.map(lambda a: np.asarray(a).tolist(),
                                           saved_batch_stats(path, 1))}
    return out


def run_worker(num_devices: int, workdir) -> subprocess.Popen:
    env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(num_devices), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}")
    return subprocess.Popen([sys.executable, __file__, str(workdir)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def collect(proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def test_eight_data_parallel_devices_give_the_one_device_statistics_and_losses(tmp_path):
    one, eight = run_worker(1, tmp_path / "one"), run_worker(8, tmp_path / "eight")
    one, eight = collect(one), collect(eight)
    # Steps 2 and 3 normalize by (PowerNorm) the running statistics step 1 left, and step 1's
    # statistics (forward and backward updates) are compared directly: statistics of each
    # device's own rows (1 of the batch's 8) would differ from the global ones by far more.
    for norm in ("powernorm", "batchnorm"):
        assert one[norm]["devices"] == 1 and eight[norm]["devices"] == 8
        np.testing.assert_allclose(eight[norm]["loss"], one[norm]["loss"], rtol=2e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     eight[norm]["stats"], one[norm]["stats"])
        # Looser: BatchNorm's loss does not see the stream's per-feature mean, so Adam turns
        # float noise in the gradients along it into lr-sized steps, which BatchNorm's running
        # mean (and so the eval loss) sees after 3 steps: measured 1.0e-4 relative.
        np.testing.assert_allclose(eight[norm]["eval_loss"], one[norm]["eval_loss"], rtol=5e-4)


if __name__ == "__main__":
    print(json.dumps(worker(sys.argv[1])))
