"""``python -m deepnorm.translate`` on a tiny trained encoder_decoder run; BLEU / chrF."""

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
