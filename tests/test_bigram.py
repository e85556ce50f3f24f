"""bigram.py: the count model's NLL equals a hand computation, the neural bigram arrives at the
count model, a run writes its outputs, the same seed gives the same run, and every user mistake
ends with one line and exit 2."""
import itertools
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, assert_user_error, run_script

sys.path.insert(0, str(ROOT))
import bigram  # noqa: E402

FAST = ["--max-steps", 20, "--eval-every", 10, "--num-samples", 3]


def run_main(*argv):
    return bigram.main(bigram.parse_args([str(a) for a in argv]))


def user_error(capsys, *argv):
    """Run main in-process on a user's mistake; returns what a shell would see."""
    with pytest.raises(SystemExit) as exc:
        run_main(*argv)
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=exc.value.code, stdout=captured.out, stderr=captured.err)


def count_model_nll(names, smoothing):
    vocab = bigram.Vocab(names)
    xs, ys = bigram.bigram_pairs(names, vocab)
    probs = bigram.count_probs(bigram.count_table(xs, ys, vocab.size), smoothing)
    return bigram.nll(probs, xs, ys)


def test_count_nll_matches_hand_computation():
    """On "ab" and "b" the pairs are .a ab b. .b b. (tokens ., a, b): by hand, without smoothing
    P(a|.) = P(b|.) = 1/2 and the other three pairs are certain; with smoothing 1 the rows
    become (1,2,2)/5, (1,1,2)/4 and (3,1,1)/5."""
    assert count_model_nll(["ab", "b"], 0.0) == pytest.approx(2 * math.log(2) / 5)
    by_hand = -(math.log(2 / 5) + math.log(2 / 4) + math.log(3 / 5) + math.log(2 / 5)
                + math.log(3 / 5)) / 5
    assert count_model_nll(["ab", "b"], 1.0) == pytest.approx(by_hand)


def test_unseen_pair_has_infinite_nll_without_smoothing():
    """Why smoothing exists: a pair never counted gets probability 0 and NLL inf."""
    vocab = bigram.Vocab(["ab", "ba"])
    probs = bigram.count_probs(bigram.count_table(*bigram.bigram_pairs(["ab"], vocab), 3), 0.0)
    assert math.isinf(bigram.nll(probs, *bigram.bigram_pairs(["ba"], vocab)))
    assert torch.allclose(probs.sum(dim=1), torch.ones(3, dtype=torch.float64))


def test_neural_bigram_is_a_lookup_table_of_logits():
    """The one-hot product picks row W[current]: the logits of token i are W[i], and probs() is
    the row-wise softmax of W, a (V, V) table whose rows sum to 1 like the count model's."""
    model = bigram.NeuralBigram(5, torch.Generator().manual_seed(0))
    x = torch.tensor([3, 0, 3])
    torch.testing.assert_close(model(x), model.W.detach()[x])
    assert model.probs().dtype == torch.float64
    torch.testing.assert_close(model.probs().sum(dim=1), torch.ones(5, dtype=torch.float64))
    y = torch.tensor([1, 2, 4])
    plain = F.cross_entropy(model(x), y)
    assert model.loss(x, y, l2=0.5) > plain  # the L2 penalty of a random W is positive


def test_neural_bigram_reaches_the_count_model(tmp_path, capsys, monkeypatch):
    """Gradient descent on the one-hot net ends at the count model's training NLL (no L2, no
    smoothing: both then maximize the same likelihood). The names are every string of 1 to 3
    letters over a, b, c, so that every pair but start->end is seen and the optimum is finite."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the figure is not the point here
    names = ["".join(p) for n in (1, 2, 3) for p in itertools.product("abc", repeat=n)] * 3
    data = tmp_path / "abc.txt"
    data.write_text("\n".join(names) + "\n", encoding="utf-8")
    metrics = run_main("--data", data, "--out-dir", tmp_path / "out", "--max-steps", 200,
                       "--lr", 20, "--l2", 0, "--smoothing", 0, "--eval-every", 50)
    assert metrics["train_loss"] == pytest.approx(metrics["count_train_loss"], abs=1e-3)
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [0, 50, 100, 150, 200]
    assert log[0]["train_loss"] > metrics["count_train_loss"] + 0.1


def test_end_to_end_run_writes_outputs(names_file, tmp_path):
    """A short run from the command line writes log.jsonl, metrics.json and the heatmap, and
    prints samples from both models."""
    out = tmp_path / "out"
    result = run_script("bigram.py", "--data", names_file, "--out-dir", out, *FAST)
    assert result.returncode == 0, result.stderr
    assert "samples from the count model:" in result.stdout
    assert "samples from the neural bigram:" in result.stdout
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 10, 20]
    assert set(rows[0]) >= {"step", "seconds", "train_loss", "val_loss"}
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("stage", "params", "steps", "seconds", "train_loss", "val_loss", "test_loss",
                "device", "data", "count_train_loss", "count_full_data_nll"):
        assert key in metrics, key
    assert metrics["stage"] == "bigram" and metrics["steps"] == 20
    assert metrics["params"] == metrics["vocab_size"] ** 2
    assert (out / "bigram_counts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.tmp"))


def test_characters_that_matplotlib_reads_as_tex_are_drawn_as_text(tmp_path):
    """A "$" in the data (Shakespeare has some) makes "$$" pairs, which matplotlib would parse
    as TeX and fail on after training: each cell's label is plain text."""
    data = tmp_path / "dollars.txt"
    data.write_text("".join(f"{name}\n" for name in ["jo$h", "$am", "an$$", "ava", "emma"] * 6))
    metrics = run_main("--data", data, "--out-dir", tmp_path / "out", *FAST)
    assert metrics["figure"] and (tmp_path / "out" / "bigram_counts.png").exists()


def test_same_seed_same_results(names_file, tmp_path, capsys):
    """The same --seed gives the same split, losses and samples; another seed does not."""
    def run(seed, name):
        metrics = run_main("--data", names_file, "--out-dir", tmp_path / name, "--seed", seed,
                           "--batch-size", 16, *FAST)
        samples = [line for line in capsys.readouterr().out.splitlines()
                   if line.startswith("samples")]
        return {k: v for k, v in metrics.items() if k not in ("seconds", "figure")}, samples

    first, second, other = run(1, "a"), run(1, "b"), run(2, "c")
    assert first == second
    assert first[0]["val_loss"] != other[0]["val_loss"]


def test_eval_every_zero_turns_evaluations_off(names_file, tmp_path, capsys):
    """--eval-every 0: no evaluation rows in log.jsonl and no step lines, yet the final losses
    are computed, and equal those of a run that evaluated (evaluating never changes training)."""
    evaluated = run_main("--data", names_file, "--out-dir", tmp_path / "a", *FAST)
    capsys.readouterr()
    off = run_main("--data", names_file, "--out-dir", tmp_path / "b", *FAST, "--eval-every", 0)
    assert (tmp_path / "b" / "log.jsonl").read_text() == ""
    assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    for key in ("train_loss", "val_loss", "test_loss", "count_val_loss"):
        assert off[key] == evaluated[key], key


def test_runs_without_matplotlib(names_file, tmp_path, capsys, monkeypatch):
    """Without matplotlib the run still finishes and says that no figure was drawn."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    metrics = run_main("--data", names_file, "--out-dir", tmp_path / "out", *FAST)
    assert "no figure was drawn" in capsys.readouterr().out
    assert metrics["figure"] is None


@pytest.mark.parametrize("flags, words", [
    (["--max-steps", 0], ["--max-steps"]), (["--max-steps", -3], ["--max-steps"]),
    (["--batch-size", 0], ["--batch-size"]), (["--batch-size", -1], ["--batch-size"]),
    (["--lr", 0], ["--lr"]), (["--lr", -1], ["--lr"]), (["--lr", "inf"], ["--lr"]),
    (["--smoothing", -1], ["--smoothing"]), (["--smoothing", "inf"], ["--smoothing"]),
    (["--l2", "nan"], ["--l2"]), (["--eval-every", -1], ["--eval-every"]),
    (["--num-samples", -1], ["--num-samples"]), (["--oops"], ["--oops"]),
    (["--device", "tpu"], ["--device"]), (["--seed", "x"], ["--seed"]),
])
def test_bad_flags_are_user_errors(names_file, tmp_path, capsys, flags, words):
    """A nonsensical flag value: one line on stderr naming the flag, exit 2, no output dir."""
    out = tmp_path / "out"
    assert_user_error(user_error(capsys, "--data", names_file, "--out-dir", out, *flags), *words)
    assert not out.exists()


def write_bad_file(tmp_path, kind):
    path = tmp_path / "names.txt"
    if kind == "empty":
        path.write_text("", encoding="utf-8")
    elif kind == "latin-1":
        path.write_bytes("zoë\nemma\n".encode("latin-1"))
    elif kind == "directory":
        path.mkdir()
    elif kind == "too few":
        path.write_text("ann\nbob\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("kind, words", [
    ("missing", ["does not exist"]), ("empty", ["empty"]), ("latin-1", ["UTF-8"]),
    ("directory", ["not a file"]), ("too few", ["at least 10"]),
])
def test_bad_data_files_are_user_errors(tmp_path, capsys, kind, words):
    """A missing, empty, non-UTF-8, non-file or too short --data: one line, exit 2."""
    out = tmp_path / "out"
    path = write_bad_file(tmp_path, kind)
    assert_user_error(user_error(capsys, "--data", path, "--out-dir", out), *words)
    assert not out.exists()


def test_unreadable_data_file_is_user_error(names_file, tmp_path, capsys, monkeypatch):
    """A file we may not read (simulated: tests often run as root, who may read anything)."""
    def deny(self):
        raise PermissionError(13, "Permission denied", str(self))
    monkeypatch.setattr(Path, "read_bytes", deny)
    out = tmp_path / "out"
    assert_user_error(user_error(capsys, "--data", names_file, "--out-dir", out), "permission")
    assert not out.exists()


def test_out_dir_that_is_a_file_is_user_error(names_file, tmp_path, capsys):
    """--out-dir pointing at an existing file: one line, exit 2, the file left alone."""
    out = tmp_path / "taken"
    out.write_text("keep me")
    assert_user_error(user_error(capsys, "--data", names_file, "--out-dir", out), "--out-dir")
    assert out.read_text() == "keep me"


def test_user_error_from_the_command_line(tmp_path):
    """The real command line: exit status 2 and one stderr line, no traceback."""
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00names\n")
    result = run_script("bigram.py", "--data", bad, "--out-dir", tmp_path / "o")
    assert_user_error(result, "bigram.py: error:", "UTF-8")
    assert not (tmp_path / "o").exists()
