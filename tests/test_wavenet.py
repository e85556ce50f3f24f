"""wavenet.py: FlattenConsecutive and BatchNorm1d equal their plain-torch counterparts, the loss
starts at ln(V), a run writes its outputs, the same seed gives the same run, and every user
mistake ends with one line and exit 2."""
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
import wavenet  # noqa: E402

FAST = ["--max-steps", 30, "--batch-size", 32, "--eval-every", 10, "--num-samples", 3]


def run_main(*argv):
    return wavenet.main(wavenet.parse_args([str(a) for a in argv]))


def user_error(capsys, *argv):
    """Run main in-process on a user's mistake; returns what a shell would see."""
    with pytest.raises(SystemExit) as exc:
        run_main(*argv)
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=exc.value.code, stdout=captured.out, stderr=captured.err)


def test_flatten_consecutive_is_a_view_that_concatenates_neighbours():
    """FlattenConsecutive(2) puts steps 2t and 2t+1 side by side, without copying, and drops
    the time dimension when one step is left."""
    x = torch.randn(4, 8, 3)
    out = wavenet.FlattenConsecutive(2)(x)
    assert out.shape == (4, 4, 6)
    torch.testing.assert_close(out, torch.cat([x[:, 0::2], x[:, 1::2]], dim=2))
    assert out.data_ptr() == x.data_ptr()
    last = wavenet.FlattenConsecutive(8)(x)
    assert last.shape == (4, 24)
    torch.testing.assert_close(last, torch.nn.Flatten()(x))


def copy_affine(ours, ref, dim):
    with torch.no_grad():
        ref.weight.copy_(torch.randn(dim))
        ref.bias.copy_(torch.randn(dim))
        ours.weight.copy_(ref.weight)
        ours.bias.copy_(ref.bias)


@pytest.mark.parametrize("shape", [(32, 16), (32, 4, 16)])
def test_batchnorm_matches_torch_in_train_and_eval_mode(shape):
    """Our BatchNorm1d on (B, C) and on (B, T, C) gives torch.nn.BatchNorm1d's outputs,
    gradients and running statistics in training mode (torch wants (B, C, T), hence the
    transposes), and its outputs in eval mode."""
    torch.manual_seed(0)
    C = shape[-1]
    ours, ref = wavenet.BatchNorm1d(C), torch.nn.BatchNorm1d(C)
    copy_affine(ours, ref, C)

    def ref_forward(x):
        return ref(x.transpose(1, 2)).transpose(1, 2) if x.dim() == 3 else ref(x)

    for _ in range(3):
        x = (torch.randn(shape) * 3 + 1).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        out, out_ref = ours(x), ref_forward(x_ref)
        torch.testing.assert_close(out, out_ref)
        out.pow(2).sum().backward()
        out_ref.pow(2).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    ours.eval(), ref.eval()
    x = torch.randn((5,) + shape[1:])
    torch.testing.assert_close(ours(x), ref_forward(x))
    torch.testing.assert_close(ours(x[:1]), ours(x)[:1])


def test_loss_at_init_is_close_to_ln_vocab():
    """The scaled-down output layer makes the first loss that of a uniform guess, ln(V)."""
    torch.manual_seed(0)
    config = wavenet.ModelConfig(vocab_size=27, block_size=8, n_embd=24, n_hidden=128, dropout=0.1)
    model = wavenet.WaveNet(config)
    x, y = torch.randint(0, 27, (512, 8)), torch.randint(0, 27, (512,))
    assert model(x).shape == (512, 27)
    loss = F.cross_entropy(model(x), y).item()
    assert abs(loss - math.log(27)) < 0.05, loss
    # The Kaiming init keeps the tanh units of every level out of their flat tails at the start.
    saturated, _ = wavenet.tanh_saturation(model, x, y, "at init")
    assert len(saturated) == 3 and max(saturated) < 0.10, saturated  # log2(8) levels


def test_saturation_diagnostic_does_not_train_the_model():
    """Measuring tanh saturation runs a training-mode batch; it must leave the BatchNorm running
    statistics, the weights, their gradients and the train/eval mode as they were."""
    torch.manual_seed(0)
    config = wavenet.ModelConfig(vocab_size=27, block_size=8, n_embd=8, n_hidden=16, dropout=0.1)
    model = wavenet.WaveNet(config).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randint(0, 27, (64, 8)), torch.randint(0, 27, (64,))
    wavenet.tanh_saturation(model, x, y, "now")
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], msg=key)


def test_dataset_pads_context_with_start_token():
    """Each name gives one example per character plus one for its end, with left padding."""
    vocab = wavenet.Vocab(["ab"])
    X, Y = wavenet.build_dataset(["ab"], vocab, block_size=3)
    assert X.tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 2]]
    assert Y.tolist() == [1, 2, 0]


def test_end_to_end_run_writes_outputs(names_file, tmp_path):
    """A short run from the command line writes log.jsonl, metrics.json and the figure, and
    prints samples; the loss goes down from ln(V)."""
    out = tmp_path / "out"
    result = run_script("wavenet.py", "--data", names_file, "--out-dir", out, *FAST)
    assert result.returncode == 0, result.stderr
    assert "loss at init" in result.stdout and "samples:" in result.stdout
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 10, 20, 30]
    assert set(rows[0]) >= {"step", "seconds", "train_loss", "val_loss"}
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("stage", "params", "steps", "seconds", "train_loss", "val_loss", "test_loss",
                "device", "data"):
        assert key in metrics, key
    assert metrics["stage"] == "wavenet" and metrics["steps"] == 30 and metrics["device"] == "cpu"
    assert metrics["train_loss"] < metrics["init_loss"]
    assert (out / "wavenet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.tmp"))


def test_same_seed_same_results(names_file, tmp_path, capsys):
    """The same --seed gives the same losses and samples; another seed does not."""
    def run(seed, name):
        metrics = run_main("--data", names_file, "--out-dir", tmp_path / name, "--seed", seed,
                           *FAST)
        samples = [line for line in capsys.readouterr().out.splitlines()
                   if line.startswith("samples:")]
        log = [{k: v for k, v in json.loads(line).items() if k != "seconds"}
               for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        return {k: v for k, v in metrics.items() if k not in ("seconds", "figure")}, log, samples

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
    for key in ("train_loss", "val_loss", "test_loss"):
        assert off[key] == evaluated[key], key


def test_runs_without_matplotlib(names_file, tmp_path, capsys, monkeypatch):
    """Without matplotlib the run still finishes and says that no figure was drawn."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    metrics = run_main("--data", names_file, "--out-dir", tmp_path / "out", *FAST)
    assert "no figure was drawn" in capsys.readouterr().out
    assert metrics["figure"] is None and not (tmp_path / "out" / "wavenet.png").exists()


@pytest.mark.parametrize("flags, words", [
    (["--max-steps", 0], ["--max-steps"]), (["--max-steps", -3], ["--max-steps"]),
    (["--batch-size", 0], ["--batch-size"]), (["--batch-size", -1], ["--batch-size"]),
    (["--lr", 0], ["--lr"]), (["--lr", -0.1], ["--lr"]), (["--lr", "nan"], ["--lr"]),
    (["--lr", "inf"], ["--lr"]), (["--weight-decay", -1], ["--weight-decay"]),
    (["--block-size", 0], ["--block-size"]), (["--block-size", 6], ["--block-size", "power"]),
    (["--block-size", 16], ["--block-size", "longest"]),
    (["--n-embd", 0], ["--n-embd"]), (["--n-hidden", -1], ["--n-hidden"]),
    (["--eval-every", -1], ["--eval-every"]), (["--dropout", 1], ["--dropout"]),
    (["--max-steps", "ten"], ["--max-steps"]),
])
def test_bad_flags_are_user_errors(names_file, tmp_path, capsys, flags, words):
    """A nonsensical flag value: one line on stderr naming the flag, exit 2, no output dir."""
    out = tmp_path / "out"
    assert_user_error(user_error(capsys, "--data", names_file, "--out-dir", out, *flags), *words)
    assert not out.exists()


def write_bad_file(tmp_path, kind):
    path = tmp_path / "names.txt"
    if kind == "empty":
        path.write_text("\n  \n", encoding="utf-8")
    elif kind == "latin-1":
        path.write_bytes("zoë\nemma\n".encode("latin-1"))
    elif kind == "directory":
        path.mkdir()
    return path


@pytest.mark.parametrize("kind, words", [
    ("missing", ["does not exist"]), ("empty", ["empty"]), ("latin-1", ["UTF-8"]),
    ("directory", ["not a file"]),
])
def test_bad_data_files_are_user_errors(tmp_path, capsys, kind, words):
    """A missing, empty, non-UTF-8 or non-file --data: one line naming the problem, exit 2."""
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


def test_user_error_from_the_command_line(tmp_path):
    """The real command line: exit status 2 and one stderr line, no traceback."""
    result = run_script("wavenet.py", "--data", tmp_path / "nope.txt", "--out-dir", tmp_path / "o")
    assert_user_error(result, "wavenet.py: error:", "does not exist")
    assert not (tmp_path / "o").exists()
