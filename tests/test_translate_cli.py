"""``python -m deepnorm.translate`` on a tiny trained encoder_decoder run; BLEU / chrF; the
same translations decoded over several (simulated) devices.

This file is also the worker for the multi-device check, which needs its devices before JAX
starts: ``python tests/test_translate_cli.py WORKDIR SENTENCES_JSON``.
"""

import json
import os
import subprocess
import sys

import pytest
import sacrebleu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # for `configs`
from configs import deepnorm as deepnorm_config  # noqa: E402

from deepnorm.training.bleu import corpus_scores  # noqa: E402

SOURCES = ["def main():", "import os", "return x + 1"]
# Five sentences: over 4 data-parallel devices the batch is padded to 8 (2 per device).
SHARDED_SOURCES = SOURCES + ["for i in range(10):", "class A(object):"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from deepnorm.training.loop import train_and_evaluate
    config = deepnorm_config.get_config("quick")
    config.model.update(d_model=16, d_ff=32, num_encoder_layers=1, num_decoder_layers=1)
    config.train.update(num_steps=2, batch_size=4, seq_len=16, eval_every=2, eval_steps=1,
                        checkpoint_every=2, progress_bar=False, bleu_every=1, bleu_examples=3)
    path = str(tmp_path_factory.mktemp("translate_run"))
    summary = train_and_evaluate(config, path)
    assert summary["status"] == "completed"
    # The BLEU hook: every bleu_every steps and at the end, in metrics.jsonl and summary.json.
    with open(os.path.join(path, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    bleu_rows = [r for r in rows if "bleu" in r]
    assert [r["step"] for r in bleu_rows] == [1, 2]
    assert set(summary["final_bleu"]) == {"bleu", "chrf"}
    assert summary["final_bleu"]["chrf"] == bleu_rows[-1]["chrf"]
    assert all(0 <= r["bleu"] <= 100 and 0 <= r["chrf"] <= 100 for r in bleu_rows)
    return path


def translate(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "deepnorm.translate", *args], cwd=ROOT,
                          input=stdin, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=ROOT))


def test_references_against_themselves_score_100_and_a_change_scores_what_sacrebleu_says():
    refs = ["the cat sat on the mat", "a quick brown fox jumps"]
    assert corpus_scores(refs, refs) == pytest.approx({"bleu": 100.0, "chrf": 100.0})
    hyps = ["the cat sat on a mat", "a quick brown fox jumps"]
    scores = corpus_scores(hyps, refs)
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert 0 < scores["bleu"] < 100 and 0 < scores["chrf"] < 100
    with pytest.raises(ValueError, match="1 hypotheses for 2 references"):
        corpus_scores(hyps[:1], refs)


def test_translates_each_line_and_scores_against_its_own_output(workdir, tmp_path):
    src = tmp_path / "src.txt"
    src.write_text("\n".join(SOURCES) + "\n")
    out = translate(f"--workdir={workdir}", f"--input={src}", "--beam=2", "--max_len_b=4")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")[:-1]
    assert len(lines) == len(SOURCES)
    # stdin gives the same translations as --input.
    piped = translate(f"--workdir={workdir}", "--beam=2", "--max_len_b=4",
                      stdin="\n".join(SOURCES) + "\n")
    assert piped.returncode == 0 and piped.stdout == out.stdout
    # The hypotheses as references: BLEU and chrF 100 (the --bleu path end to end). A run this
    # short may emit empty lines, which sacreBLEU scores 0; only check when none is empty.
    refs = tmp_path / "refs.txt"
    refs.write_text(out.stdout)
    scored = translate(f"--workdir={workdir}", f"--input={src}", "--beam=2", "--max_len_b=4",
                       f"--references={refs}", "--bleu")
    assert scored.returncode == 0, scored.stderr
    assert "BLEU" in scored.stderr and "chrF" in scored.stderr
    if all(line.strip() for line in lines):
        assert "BLEU 100.00 chrF 100.00" in scored.stderr


@pytest.mark.parametrize("make_args,message", [
    (lambda w, t: [f"--workdir={w}", "--beam=0"], "--beam=0 must be at least 1"),
    (lambda w, t: [f"--workdir={w}", f"--input={t / 'empty.txt'}"], "is empty"),
    (lambda w, t: [f"--workdir={t / 'nope'}"], "does not exist"),
    (lambda w, t: [f"--workdir={t}"], "has no config.json"),
    (lambda w, t: [f"--workdir={w}", "--split=test", "--bleu"], "gives no translation pairs"),
])
def test_bad_input_is_one_line_and_exit_2(workdir, tmp_path, make_args, message):
    (tmp_path / "empty.txt").write_text("")
    out = translate(*make_args(workdir, tmp_path), stdin="x\n")
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_a_run_without_checkpoints_is_one_line_and_exit_2(workdir, tmp_path):
    import shutil
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("checkpoints"))
    out = translate(f"--workdir={copy}", stdin="x\n")
    assert out.returncode == 2 and "no checkpoint in" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def sharded_worker(workdir: str, sentences: list[str]) -> dict:
    """On this process's devices: translations (greedy, beam 2) on one device, on all of them
    as the run's mesh gives them (data=-1: every device on data), on data=2 x fsdp=2
    (parameters split over fsdp) and on data=2 x tensor=2 (split over tensor); how the placed batch and the compiled search are sharded;
    and the training loop's BLEU hook on one device and on the data-parallel mesh."""
    import jax
    import numpy as np

    from deepnorm import translate as cli
    from deepnorm.config import TransformerConfig
    from deepnorm.training import bleu as bleu_lib
    from deepnorm.training import mesh as mesh_lib
    from deepnorm.training.data import DataSource

    config, model_cfg, graphdef, params, _, run_mesh = cli.load_run(workdir)
    meshes = {"one": mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]),
              "run": run_mesh,
              "data2_fsdp2": mesh_lib.make_mesh(dict(data=2, fsdp=2, tensor=1)),
              "data2_tensor2": mesh_lib.make_mesh(dict(data=2, fsdp=1, tensor=2))}
    out = {"devices": jax.device_count(), "run_mesh": dict(run_mesh.shape), "translations": {}}
    for name, mesh in meshes.items():
        for beam in (1, 2):
            out["translations"][f"{name}/beam{beam}"] = cli.translate_lines(
                workdir, sentences, beam=beam, max_len_b=4, mesh=mesh)
    # The batch as placed, and the compiled search's input sharding, on the run's mesh.
    translator = cli.Translator(graphdef, cli.load_vocabulary(workdir),
                                src_len=int(config.train.seq_len), beam=2, lenpen=1.0,
                                max_len_a=1.2, max_len_b=4, mesh=run_mesh)
    inputs, max_steps = translator.encode(sentences)
    placed, real = translator.decoder.place(inputs)
    compiled = translator.decoder._jitted(max_steps).lower(params, placed).compile()
    batch_in = compiled.input_shardings[0][1]
    out["placed"] = {
        "real_rows": real, "shape": list(placed.shape),
        "spec": [list(a) if isinstance(a, tuple) else a for a in placed.sharding.spec],
        "shard_rows": sorted({s.data.shape[0] for s in placed.addressable_shards}),
        "shard_devices": len({s.device for s in placed.addressable_shards}),
        "compiled_shard_shape": list(batch_in.shard_shape(placed.shape)),
        "compiled_fully_replicated": batch_in.is_fully_replicated}
    # The BLEU-in-training hook (greedy, the run's validation pairs) on one device and over
    # the data axis of the run's mesh.
    model_cfg = TransformerConfig.from_mapping(config.model.to_dict())
    out["bleu"] = {}
    for name in ("one", "run"):
        data = DataSource(config, model_cfg, meshes[name], workdir=workdir)
        _, _, _, placed_params, _, _ = cli.load_run(workdir, meshes[name])
        out["bleu"][name] = bleu_lib.loop_bleu_eval(config, graphdef, data,
                                                    meshes[name])(placed_params)
    assert np.isfinite(out["bleu"]["run"]["chrf"])
    return out


@pytest.fixture(scope="module")
def sharded(workdir):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    out = subprocess.run([sys.executable, __file__, workdir, json.dumps(SHARDED_SOURCES)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # one 4-device worker: ~40 s on 2 busy cores
@pytest.mark.parametrize("beam", [1, 2])
def test_decoding_over_4_devices_gives_the_one_device_translations(workdir, sharded, beam):
    assert sharded["devices"] == 4 and sharded["run_mesh"] == {"data": 4, "fsdp": 1,
                                                               "tensor": 1}
    got = sharded["translations"]
    one = got[f"one/beam{beam}"]
    assert len(one) == len(SHARDED_SOURCES)
    assert got[f"run/beam{beam}"] == one  # 5 sentences over data=4: padded to 8, then cut
    assert got[f"data2_fsdp2/beam{beam}"] == one  # parameters split over fsdp as well
    assert got[f"data2_tensor2/beam{beam}"] == one  # ... or over tensor
    # ... and the CLI in a one-device process agrees too.
    cli = translate(f"--workdir={workdir}", f"--beam={beam}", "--max_len_b=4",
                    stdin="\n".join(SHARDED_SOURCES) + "\n")
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.split("\n")[:-1] == one


@pytest.mark.slow  # one 4-device worker: ~40 s on 2 busy cores
def test_the_decoded_batch_is_split_over_the_data_axis(sharded):
    placed = sharded["placed"]
    assert placed["real_rows"] == 5 and placed["shape"][0] == 8  # padded to divide 4
    assert placed["spec"] == [["data", "fsdp"]]
    assert placed["shard_rows"] == [2] and placed["shard_devices"] == 4
    # The compiled search takes the batch as it was placed: 2 rows a device.
    assert not placed["compiled_fully_replicated"]
    assert placed["compiled_shard_shape"] == [2, placed["shape"][1]]


@pytest.mark.slow  # one 4-device worker: ~40 s on 2 busy cores
def test_the_training_bleu_hook_decodes_over_the_data_axis_alike(workdir, sharded):
    with open(os.path.join(workdir, "summary.json")) as f:
        final = json.load(f)["final_bleu"]  # scored during training, on this 1 device
    assert sharded["bleu"]["one"] == final
    assert sharded["bleu"]["run"] == final


# ------------------------------------------------------------ a resumed run translates alike

WORDS = ("alpha beta gamma delta epsilon zeta theta iota kappa lambda sigma omega "
         "Haus Baum Wasser Feuer Erde Luft Licht Nacht Tag Jahr").split()
RESUME_STEPS = 4


def tiny_translation_config(tmp_path):
    """A parallel-file corpus with its own SentencePiece vocabulary (60 pieces, cached under
    ``tmp_path``), a one-layer encoder-decoder with dropout, a checkpoint every 2 steps."""
    import numpy as np

    from configs import base
    rng = np.random.default_rng(1)
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("".join(f"{' '.join(rng.choice(WORDS, 6))}\t{' '.join(rng.choice(WORDS, 6))}\n"
                           for _ in range(300)), encoding="utf-8")
    config = base.get_config(
        dict(arch="encoder_decoder", num_encoder_layers=1, num_decoder_layers=1, d_model=16,
             num_heads=2, d_ff=32, dropout_rate=0.1),
        optimizer=dict(warmup_steps=1, learning_rate=3e-3),
        train=dict(num_steps=RESUME_STEPS, batch_size=4, seq_len=16, log_every=1,
                   eval_every=100, eval_steps=1, checkpoint_every=2, progress_bar=False))
    config.data.update(corpus="parallel_files", parallel_tsv=str(tsv), validation_fraction=0.2,
                       test_fraction=0.2, tokenizer="sentencepiece", vocab_size=60,
                       spm_cache_dir=str(tmp_path / "spm_cache"))
    base.tie_vocab_size(config)
    return config


def test_split_reads_the_runs_own_pair_corpus(tmp_path):
    """--split scores a split of the corpus the run trained on (here parallel files; gettext
    goes through the same load_pairs), the pairs training reads for that split."""
    from deepnorm import translate
    from deepnorm.data import load_pairs
    config = tiny_translation_config(tmp_path)
    sources, references = translate.split_pairs(config, "test", 0)
    pairs = load_pairs(config.data, "test")
    assert len(sources) == len(references) == len(pairs) > 0
    assert [(s, r) for s, r in zip(sources, references)] == [
        (p["source"].decode(), p["target"].decode()) for p in pairs]
    assert translate.split_pairs(config, "test", 3)[0] == sources[:3]
    with pytest.raises(translate.BadInput, match="--split=nope"):
        translate.split_pairs(config, "nope", 0)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """``(config, workdir)`` of the uninterrupted 4-step run."""
    from deepnorm.training.loop import train_and_evaluate
    root = tmp_path_factory.mktemp("straight")
    config = tiny_translation_config(root)
    workdir = str(root / "run")
    assert train_and_evaluate(config, workdir)["status"] == "completed"
    return config, workdir


@pytest.mark.slow  # two short trainings and four decodes each: ~1-2 min on 2 busy cores
@pytest.mark.parametrize("interruption", ["sigterm", "crash"])
def test_a_stopped_and_resumed_run_translates_like_an_uninterrupted_one(straight_run, tmp_path,
                                                                        monkeypatch,
                                                                        interruption):
    """Run A: 4 steps straight. Run B: the same config stopped after step 3, by a real SIGTERM
    (the preemption path: it checkpoints step 3) or by a crash (an exception: only the step-2
    checkpoint is left), then the same call again resumes it to step 4. Both give bit-identical
    parameters, and so the same translations, with each run's own ``W/vocab/``."""
    import shutil
    import signal

    from deepnorm.training import preemption
    from deepnorm.training.loop import train_and_evaluate

    config, straight = straight_run
    resumed = str(tmp_path / "resumed")

    real_requested = preemption.PreemptionGuard.requested

    def stop_after_step_3(guard, step):
        if step == 3:
            if interruption == "crash":
                raise RuntimeError("killed after step 3")
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the guard the loop installed
            assert guard.signal_name == "SIGTERM"
        return real_requested(guard, step)

    with monkeypatch.context() as patch:
        patch.setattr(preemption.PreemptionGuard, "requested", stop_after_step_3)
        if interruption == "crash":
            with pytest.raises(RuntimeError, match="killed after step 3"):
                train_and_evaluate(config, resumed)
        else:
            summary = train_and_evaluate(config, resumed)
            assert summary["status"] == "preempted" and summary["final_step"] == 3
    assert sorted(int(d) for d in os.listdir(os.path.join(resumed, "checkpoints"))) == (
        [2] if interruption == "crash" else [2, 3])
    summary = train_and_evaluate(config, resumed)  # the same call again: resume to the end
    assert summary["status"] == "completed" and summary["final_step"] == RESUME_STEPS
    assert summary["resumed_from_step"] == (2 if interruption == "crash" else 3)

    # Decoding may use only the runs' own vocabularies: the cache they were trained from goes
    # (until the end of this test).
    cache = config.data.spm_cache_dir
    shutil.move(cache, str(tmp_path / "moved_cache"))
    try:
        check_decodes_alike(straight, resumed)
    finally:
        shutil.move(str(tmp_path / "moved_cache"), cache)


def check_decodes_alike(straight: str, resumed: str) -> None:
    """Both runs' own vocabularies, bit-identical parameters, identical translations."""
    import jax
    import numpy as np

    from deepnorm import translate as cli
    for run in (straight, resumed):
        vocab = cli.load_vocabulary(run)
        assert vocab.kind == "sentencepiece" and vocab.vocab_size == 60
        assert os.path.dirname(vocab.origin) == os.path.join(run, "vocab")
    with open(os.path.join(straight, "vocab", "sentencepiece.model"), "rb") as a, open(
            os.path.join(resumed, "vocab", "sentencepiece.model"), "rb") as b:
        assert a.read() == b.read()

    # Bit-identical parameters at the last step (the resume replays the same batches, dropout
    # keys and optimizer state), hence identical translations, greedy and beam.
    loaded = [cli.load_run(run) for run in (straight, resumed)]
    assert [r[4] for r in loaded] == [RESUME_STEPS, RESUME_STEPS]
    leaves, theirs = (jax.tree_util.tree_leaves_with_path(r[3]) for r in loaded)
    assert [p for p, _ in leaves] == [p for p, _ in theirs] and leaves
    for (path, a), (_, b) in zip(leaves, theirs):
        assert np.array_equal(np.asarray(a), np.asarray(b)), jax.tree_util.keystr(path)
    sentences = [" ".join(WORDS[i:i + 5]) for i in range(0, 20, 4)]
    for beam in (1, 2):
        hyps = [cli.translate_lines(run, sentences, beam=beam, max_len_b=6)
                for run in (straight, resumed)]
        assert len(hyps[0]) == len(sentences) and hyps[0] == hyps[1], beam


if __name__ == "__main__":
    workdir_arg, sentences_json = sys.argv[1:]
    print(json.dumps(sharded_worker(workdir_arg, json.loads(sentences_json))))
