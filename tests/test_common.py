"""common.py: device choice (every spelling, with and without torchrun, testable without a GPU),
the shared flags and their checks, errors in the script's name, the output folder's protection
of checkpoints, atomic writes, the log and the metrics' summary."""
import argparse
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

import common
from conftest import assert_user_error, run_script


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine with two CUDA GPUs, the second one current, as torch would report it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)


def test_every_cuda_spelling_gets_an_index(two_gpus):
    """torch.cuda.set_device and DDP need cuda:N: `python gpt2.py` (auto), --device cuda and
    cuda:N without torchrun, and any of them under torchrun (cuda:LOCAL_RANK)."""
    assert common.pick_device("auto") == torch.device("cuda", 1)
    assert common.pick_device("cuda") == torch.device("cuda", 1)
    assert common.pick_device("cuda:0") == torch.device("cuda", 0)
    assert common.pick_device("cuda", local_rank=0) == torch.device("cuda", 0)
    assert common.pick_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert common.pick_device("cpu") == torch.device("cpu")


def user_error(capsys, call, *words):
    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    for word in words:
        assert word in err[0], (word, err[0])


def test_bad_devices_are_one_line(two_gpus, capsys, monkeypatch):
    user_error(capsys, lambda: common.pick_device("cuda:2"), "GPU 2 does not exist", "cuda:1")
    user_error(capsys, lambda: common.pick_device("tpu"), "--device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    user_error(capsys, lambda: common.pick_device("cuda"), "CUDA is not available")


def test_auto_without_a_gpu_is_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert common.pick_device("auto") == torch.device("cpu")


def test_check_args(capsys):
    args = argparse.Namespace(steps=3, every=0, lr=float("nan"), unset=None)
    assert common.check_args(args, positive=("steps", "unset"), non_negative=("every",)) is args
    user_error(capsys, lambda: common.check_args(args, positive=("every",)), "--every")
    user_error(capsys, lambda: common.check_args(args, ranges=(("lr", 0, 1),)), "--lr", "nan")


def test_a_checkpoint_in_the_out_dir_needs_a_flag(tmp_path, capsys):
    out = tmp_path / "run"
    common.prepare_out_dir(out, "checkpoint.pt")  # a new folder: nothing to protect
    (out / "checkpoint.pt").write_bytes(b"hours of training")
    user_error(capsys, lambda: common.prepare_out_dir(out, "checkpoint.pt", resume_flag=True),
               "--resume", "--overwrite")
    user_error(capsys, lambda: common.prepare_out_dir(out, "checkpoint.pt"), "--overwrite")
    common.prepare_out_dir(out, "checkpoint.pt", overwrite=True)
    assert (out / "checkpoint.pt").read_bytes() == b"hours of training"  # only checked, kept


def test_write_atomic_keeps_the_old_file_on_a_crash(tmp_path):
    path = tmp_path / "metrics.json"
    common.write_json(path, {"a": 1})

    def crash(tmp):
        tmp.write_text("{half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        common.write_atomic(path, crash)
    assert path.read_text() == '{\n  "a": 1\n}\n'


def test_log_keeps_the_steps_before_a_checkpoint(tmp_path):
    """A resumed run rewrites log.jsonl with the records before its step (a line cut short by a
    crash dropped), then appends; with no log yet, it starts one."""
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 0, "a": 1}\n{"step": 1}\n{"step": 2}\n{"step": 3, "tr')
    log = common.Log(path, keep_before=2)
    log({"step": 2, "b": 2})
    log.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 0, "a": 1}, {"step": 1}, {"step": 2, "b": 2}]
    fresh = common.Log(tmp_path / "new.jsonl", keep_before=5)
    fresh({"step": 5})
    fresh.close()
    assert (tmp_path / "new.jsonl").read_text() == '{"step": 5}\n'


@pytest.mark.parametrize("stage", ["bigram", "mlp", "wavenet", "transformer", "gpt2"])
def test_every_stage_has_overwrite(stage, capsys):
    """--overwrite means the same in every stage, and every stage's parser accepts it."""
    module = __import__(stage)
    assert module.parse_args(["--overwrite"]).overwrite is True
    assert module.parse_args([]).overwrite is False
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "start afresh in an --out-dir that holds a checkpoint" in " ".join(text.split())
    # The names stages add each default to its help: the shared flags must not say it twice.
    flags = re.split(r"\n  -", text)  # each flag's entry starts a line with two spaces and -
    assert all(flag.count("(default:") <= 1 for flag in flags), text


def test_an_empty_path_flag_is_refused(capsys):
    """Path("") is the current folder: `--export-hf ""` wrote a model there."""
    import chat
    import gpt2
    for parse, argv in ((gpt2.parse_args, ["--out-dir", ""]), (gpt2.parse_args, ["--data", " "]),
                        (chat.parse_args, ["--export-hf", ""])):
        with pytest.raises(SystemExit) as exit_info:
            parse(argv)
        assert exit_info.value.code == 2
        assert "an empty path" in capsys.readouterr().err


@pytest.mark.parametrize("stage, lr", [("bigram", "1e30"), ("mlp", "1000"), ("wavenet", "1e4")])
def test_a_diverging_run_ends_in_one_line(stage, lr, names_file, tmp_path):
    """A learning rate that sends the loss to NaN or inf: one line and exit status 1, where the
    run went on to a traceback in sampling."""
    result = run_script(f"{stage}.py", "--data", names_file, "--out-dir", tmp_path / "out",
                        "--lr", lr, "--max-steps", 40, "--eval-every", 0, "--device", "cpu",
                        "--threads", 1)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "training diverged" in lines[0] and "lower --lr" in lines[0], lines
    assert "Traceback" not in result.stderr


def test_threads_flag_sets_the_run_and_shows_in_its_header(names_file, tmp_path):
    """--threads N is torch's thread count for the whole run, and the header says so."""
    before = torch.get_num_threads()
    result = run_script("bigram.py", "--data", names_file, "--out-dir", tmp_path / "out",
                        "--threads", 1, "--max-steps", 1, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "rank(s), 1 CPU threads" in result.stdout
    assert_user_error(run_script("bigram.py", "--threads", -1), "--threads must be 0")
    assert torch.get_num_threads() == before


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux's /proc/stat")
def test_a_busy_machine_is_named_in_the_header(monkeypatch, capsys):
    """Another job holding a core right now: the header names it and suggests fewer threads;
    a run that already uses one thread gets no note."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        monkeypatch.setattr(torch, "get_num_threads", lambda: os.cpu_count())
        common.print_header(torch.device("cpu"))
        out = capsys.readouterr().out
        assert "note: other jobs keep" in out and "if steps are slow, try --threads" in out, out
        monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
        common.print_header(torch.device("cpu"))
        assert "note" not in capsys.readouterr().out
    finally:
        hog.kill()
        hog.wait()


def test_die_names_the_running_script(capsys, monkeypatch):
    """One line on stderr in the name of the script that runs, whichever module calls die()."""
    monkeypatch.setattr(sys, "argv", ["/somewhere/fineweb.py", "--dataset", "x"])
    user_error(capsys, lambda: common.die("no such file x; pass --dataset with a file"),
               "fineweb.py: error: no such file x")


def test_summarize_returns_finals_and_bests_without_printing(capsys):
    records = [{"step": 0, "val_loss": 3.0}, {"step": 0, "train_loss": 2.5},
               {"step": 1, "train_loss": 2.0}, {"step": 2, "val_loss": 2.2, "hellaswag": 0.3},
               {"step": 2, "hellaswag": 0.25}]
    assert common.summarize(records) == {
        "final_train_loss": 2.0, "min_train_loss": 2.0, "final_val_loss": 2.2,
        "min_val_loss": 2.2, "final_hellaswag": 0.25, "max_hellaswag": 0.3}
    assert capsys.readouterr() == ("", "")


def test_by_preset_groups_presets_that_share_a_value():
    presets = {"quick": {"n": 4, "lr": 3e-3}, "cpu": {"n": 4, "lr": 3e-3},
               "gpu": {"n": 6, "lr": 1e-3}}
    assert common.by_preset(presets, "n") == "(default: quick/cpu 4, gpu 6)"
    assert common.by_preset(presets, "lr") == "(default: quick/cpu 0.003, gpu 0.001)"


@pytest.mark.parametrize("stage", ["bigram", "mlp", "wavenet"])
def test_a_names_stage_fed_sentences_warns_once_and_goes_on(stage, names_file, tmp_path, capsys,
                                                            monkeypatch):
    """Fed prose instead of names, each names stage says so in one line on stderr, in its own
    name, and still reads the data; a list of names gives no warning."""
    module = __import__(stage)
    monkeypatch.setattr(sys, "argv", [f"{stage}.py"])
    prose = tmp_path / "play.txt"
    prose.write_text("".join(f"ROMEO:\nBut soft, what light through yonder window {i} breaks?\n\n"
                             for i in range(20)), encoding="utf-8")
    for data, warned in ((prose, True), (names_file, False)):
        args = module.parse_args(["--data", str(data)])
        if stage == "bigram":
            module.load_data(args)
        else:
            module.load_data(args, torch.device("cpu"))
        err = capsys.readouterr().err.strip().splitlines()
        if warned:
            assert len(err) == 1 and err[0].startswith(f"{stage}.py: warning: "), err
            assert str(prose) in err[0] and "one name per line" in err[0]
        else:
            assert err == []
