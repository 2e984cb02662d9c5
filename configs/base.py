"""The shared pieces of every experiment config; each file in configs/ overrides a few keys.

Every key is listed (and commented) here, so a locked config rejects a mistyped override:
``--config.train.num_step=5`` fails with "did you mean num_steps". Run from the repository
root (``python train.py ...`` puts it on ``sys.path``, which ``from configs import base`` needs).

``get_config(arg)`` of every experiment accepts ``arg="quick"``:
``--config=configs/deepnorm.py:quick`` shrinks the model and the run for a local smoke test
(seconds on a laptop CPU), applied *before* the command line's own overrides, so
``--config=configs/deepnorm.py:quick --config.train.num_steps=30`` does what it says.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from deepnorm.config import TransformerConfig
from deepnorm.data import default_data_config

QUICK = "quick"


def model_config(**overrides) -> ml_collections.ConfigDict:
    """``model.*``: exactly the fields of ``deepnorm.TransformerConfig`` (see its comments).

    arch            encoder | decoder | encoder_decoder
    vocab_size      >= the tokenizer's ids: 260 for bytes; tied to data.vocab_size for sentencepiece
    num_layers      layers of encoder-only / decoder-only; 0 for encoder_decoder
    num_encoder_layers, num_decoder_layers   N and M of encoder_decoder; else 0
    d_model, num_heads, d_ff                 widths
    norm            layernorm | rmsnorm | scalenorm | dyt | none | batchnorm | powernorm
    norm_momentum   batchnorm / powernorm: running statistics' momentum (0.9)
    norm_warmup     powernorm: steps normalized by the batch's own quadratic mean (0)
    residual        a scheme declared in deepnorm.residual (post, pre, deepnorm, ...; the
                    README's table lists them all)
    init            auto (the residual scheme's own) | xavier | deepnorm | subln | tfixup |
                    dsinit | fixup
    mixln_fraction  Mix-LN: share of the bottom layers that are Post-LN
    skip_lambda     residual=rescaled: lambda in LN(lambda x + F(x))
    qk_norm         QK-norm: RMSNorm with a learned scale on each head's queries and keys
    dropout_rate    on embeddings and every branch output
    activation      gelu | relu;  positions: sinusoidal | learned;  max_len (learned only)
    tie_embeddings, use_bias, norm_eps
    dtype           float32 | bfloat16 | float16 (matmul inputs; params, activations and norm
                    statistics stay float32; float16 adds dynamic loss scaling)
    matmul_precision  float32 (HIGHEST: full float32 on every backend) | tensorfloat32 (HIGH)
                    | default (the backend's fastest); dots of float32 operands
    remat_policy    auto (train.py: save_dots on CPU in float32, full in bfloat16 and on
                    GPU/TPU) | none | full | save_dots | save_dots_no_batch (what a layer
                    keeps for backprop; docs/backends.md)
    scan_layers     True (one scanned layer; compile time independent of depth); False: a
                    Python loop, 6-10% faster for shallow d >= 256 stacks on CPU
                    (docs/performance.md)
    scan_unroll     layers per scan-loop trip (1; 2 was 4-9% faster at four of six CPU
                    encoder shapes x dtypes, docs/performance.md)
    attention_impl  unset (auto) | xla | cudnn
    """
    fields = {f.name: f.default for f in dataclasses.fields(TransformerConfig)}
    _check_known("model", fields, overrides)
    fields.update(overrides)
    config = ml_collections.ConfigDict()
    for name, value in fields.items():
        # A None default gets a typed placeholder so the command line can still set it.
        config[name] = config_dict.placeholder(str) if value is None else value
    return config


def optimizer_config(**overrides) -> ml_collections.ConfigDict:
    """``optimizer.*``: AdamW, warmup, schedule, clipping, label smoothing."""
    config = ml_collections.ConfigDict()
    config.learning_rate = 5e-4  # peak learning rate, reached at the end of warmup
    config.b1 = 0.9  # Adam beta1
    config.b2 = 0.98  # Adam beta2 (0.98 as in the DeepNet paper's fairseq setup)
    config.eps = 1e-8  # Adam epsilon
    config.weight_decay = 0.01  # decoupled (AdamW): weight matrices and both embeddings only
    config.warmup_steps = 100  # linear warmup from ~0; 0 = no warmup at all
    # after warmup: inverse_sqrt | cosine (towards 0, reached one update after the last) |
    # constant (formulas: deepnorm/training/optim.py, docs/training.md)
    config.schedule = "inverse_sqrt"
    # inverse_sqrt only: the update from which the rate decays as sqrt(decay_start / s);
    # 0 = the end of warmup (with warmup_steps=0 too: no decay, the peak throughout)
    config.decay_start = 0
    config.grad_clip_norm = 0.0  # clip the global gradient norm to this; 0 = no clipping
    config.label_smoothing = 0.1  # the DeepNet paper's translation setting; eval uses plain NLL
    # PaLM's z-loss: this coefficient * log(Z)^2 per token added to the loss (PaLM: 1e-4),
    # logged as the metric z_loss; 0 = off
    config.z_loss = 0.0
    _check_known('optimizer', config, overrides)
    config.update(overrides)
    return config


def data_config() -> ml_collections.ConfigDict:
    """``data.*``: ``deepnorm.data.default_data_config()``, every key commented there (corpus,
    text_files, tfds_name, tfds_text_key, data_dir, train_split, eval_split, ...)."""
    return default_data_config()


def train_config(**overrides) -> ml_collections.ConfigDict:
    """``train.*``: the run's length, batches, logging, checkpoints, divergence policy."""
    config = ml_collections.ConfigDict()
    config.num_steps = 1000  # optimizer updates
    config.batch_size = 32  # global batch (examples), split over data x fsdp and processes
    # Micro-batches per update: the batch runs in k sequential slices (a lax.scan) whose
    # gradients are summed before one optimizer step; the same update, 1/k the activations.
    config.grad_accum_steps = 1
    config.seq_len = 128  # tokens per example (encoder input length for encoder_decoder)
    config.seed = 0  # parameters, dropout and data order
    config.log_every = 10  # metrics.jsonl / TensorBoard every this many steps
    config.eval_every = 100  # validation loss and perplexity every this many steps (and last)
    config.eval_steps = 8  # validation batches per evaluation (the same ones every time)
    config.checkpoint_every = 100  # orbax checkpoint every this many steps (and at the end)
    config.bleu_every = 0  # encoder_decoder: BLEU / chrF of greedy translations every k steps
    config.bleu_examples = 64  # validation pairs translated for that BLEU
    config.keep_checkpoints = 3  # keep the last k checkpoints
    config.async_checkpoints = True  # write checkpoints in a background thread
    # every_step: the logged steps compute diagnostic_groups, the others every_step_groups
    # (those of them in diagnostic_groups; the per-layer norms feed the divergence monitor and
    # the forensics history); log_steps: only the logged steps compute any; off: none.
    config.diagnostics = "every_step"
    # Which diagnostics: all | none | a comma list of norms (the per-layer norms), attention,
    # activations, logits, updates, adam (docs/training.md, "Diagnostics"); a group left out
    # is not computed at all.
    config.diagnostic_groups = "all"
    config.every_step_groups = "norms"
    # Gradient noise scale of the norm layers (Gray et al. 2024) on logged steps: gns_b_simple
    # and its |G|^2, tr(Sigma) estimates, for the model and per layer (docs/training.md).
    # Needs batch_size >= 2 and a model with norm parameters.
    config.gns = False
    config.on_nonfinite = "stop"  # stop | skip (drop the update; stop after k in a row)
    config.max_consecutive_skips = 10  # the k of on_nonfinite=skip
    config.max_loss = 100.0  # a finite loss above this also counts as diverged
    # A finite loss above spike_factor x the median of the spike_window finite losses before
    # it is a loss spike (none is called before the window is full).
    config.spike_factor = 3.0
    config.spike_window = 50
    # What a spike does: continue (record it in <workdir>/divergence/ only) | stop (end the
    # run as diverged) | rewind (restore the newest checkpoint, skip the spiking batch, go on;
    # a divergence rewinds too). docs/training.md "Spikes, forensics and rewinds".
    config.on_spike = "continue"
    config.max_rewinds = 3  # on_spike=rewind: the run stops at the rewind after this many
    config.rewind_skip_batches = 1  # batches skipped on a rewind, from the spiking one on
    config.forensics_steps = 20  # steps of metrics (per-layer norms) kept for divergence/
    # model.dtype=float16 only: dynamic loss scaling (docs/precision.md). The scale starts
    # here, halves on a step with non-finite gradients (that step is skipped) and doubles
    # after loss_scale_period finite steps in a row.
    config.initial_loss_scale = 2.0**15
    config.loss_scale_period = 2000
    config.progress_bar = True  # tqdm bar on the terminal (primary process only)
    # With several processes: look for a SIGTERM / SIGINT on any process (a collective) every
    # this many steps; one process reads its own flag after every step.
    config.preemption_check_every = 10
    _check_known('train', config, overrides)
    config.update(overrides)
    return config


def mesh_config(**overrides) -> ml_collections.ConfigDict:
    """``mesh.*``: device mesh sizes and the logical-axis -> mesh-axis rules."""
    config = ml_collections.ConfigDict()
    config.data = -1  # pure data parallelism; -1 = all devices not used by fsdp x tensor
    config.fsdp = 1  # data parallel with params and optimizer state sharded (ZeRO-3)
    config.tensor = 1  # tensor (Megatron) parallel over heads and the feed-forward width
    config.rules = ml_collections.ConfigDict({
        "vocab": "tensor",  # embedding rows (and the tied output projection)
        "embed": "fsdp",  # d_model: the dimension every weight has, so fsdp shards them all
        "heads": "tensor",  # attention heads (q, k, v columns; out rows)
        "mlp": "tensor",  # feed-forward width
        "norm": "",  # norm scales / biases: tiny, replicated ("" = not sharded)
        "layers": "",  # the stacked-layer axis: scanned over, so kept whole
    })
    _check_known('mesh', config, overrides)
    config.update(overrides)
    return config


def distributed_config() -> ml_collections.ConfigDict:
    """``distributed.*``: multi-host / multi-process runs via ``jax.distributed.initialize``."""
    config = ml_collections.ConfigDict()
    config.enabled = False  # call jax.distributed.initialize before anything else
    # host:port of process 0; empty = auto-detect (SLURM, Cloud TPU, ...)
    config.coordinator_address = ""
    config.num_processes = 1  # total processes (with coordinator_address)
    config.process_id = 0  # this process's rank (with coordinator_address)
    return config


def get_config(model: dict, *, arg: str | None = None, optimizer: dict | None = None,
               train: dict | None = None, mesh: dict | None = None) -> ml_collections.ConfigDict:
    """A complete, locked config: the shared defaults with an experiment's overrides."""
    config = ml_collections.ConfigDict()
    config.model = model_config(**model)
    config.optimizer = optimizer_config(**(optimizer or {}))
    config.data = data_config()
    config.train = train_config(**(train or {}))
    config.mesh = mesh_config(**(mesh or {}))
    config.distributed = distributed_config()
    if arg == QUICK:
        shrink(config)
    elif arg:
        raise ValueError(f"config argument {arg!r} is not known; use ':{QUICK}' or nothing")
    config.lock()
    return config


def tie_vocab_size(config: ml_collections.ConfigDict) -> None:
    """``model.vocab_size`` follows ``data.vocab_size`` (a field reference, so a command-line
    ``--config.data.vocab_size=N`` resizes the model too) when the tokenizer is SentencePiece,
    whose trained vocabulary has exactly ``data.vocab_size`` ids."""
    if config.data.tokenizer == "sentencepiece":
        config.model.vocab_size = config.data.get_ref("vocab_size")


def _check_known(section: str, known, overrides: dict) -> None:
    """An experiment file overriding a key the base does not have is a typo, not a new key."""
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise KeyError(f"{section}: unknown key(s) {', '.join(unknown)}")


def shrink(config: ml_collections.ConfigDict) -> None:
    """The ``:quick`` variant: a tiny model and a short run, same architecture and scheme."""
    model = config.model
    model.d_model, model.num_heads, model.d_ff = 32, 2, 64
    for name in ("num_layers", "num_encoder_layers", "num_decoder_layers"):
        model[name] = min(model[name], 2)
    # every_step_groups=all: one compiled step for every step (a second program for the
    # steps between logs saves nothing in a 10-step run, and costs a compile)
    config.train.update(num_steps=10, batch_size=8, seq_len=32, log_every=2, eval_every=5,
                        eval_steps=2, checkpoint_every=5, every_step_groups="all")
    config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, 2)
