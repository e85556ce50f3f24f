"""Shared test helpers: run a script as a user would, and small generated fixtures."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_script(script, *args, timeout=300, env=None):
    """Run `python <script> <args>` from the repository root, as a user would; never raises."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def offline_env(tmp_path):
    """The environment of a machine without network: the hub's address refuses at once, and
    the Hugging Face caches are empty."""
    dead = "http://127.0.0.1:9"  # nothing listens there
    return {"HF_ENDPOINT": dead, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "",
            "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets"), "NO_PROXY": "127.0.0.1",
            "no_proxy": "127.0.0.1"}


def save_checkpoint(path, checkpoint):
    """A checkpoint file as the stages write theirs: torch.save, atomically."""
    import common
    import torch
    common.write_atomic(path, lambda tmp: torch.save(checkpoint, tmp))


def signal_after(script, args, first_words, sig, env=None):
    """Run `python <script> <args>` until it prints a line that starts with `first_words`, then
    send it `sig`; returns (exit status, the rest of its stdout, its stderr)."""
    proc = subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    try:
        for line in proc.stdout:
            if line.startswith(first_words):
                break
        proc.send_signal(sig)
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, rest, err


def assert_user_error(result, *words):
    """A user's mistake: exit status 2, exactly one line on stderr that names the problem."""
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])


@pytest.fixture(autouse=True)
def script_name(request, monkeypatch):
    """A script's main called in-process runs as `python <script>.py` would: common.die names
    the script from sys.argv[0] (tests/test_gpt2.py stands for gpt2.py)."""
    script = request.path.stem.removeprefix("test_") + ".py"
    monkeypatch.setattr(sys, "argv", [str(ROOT / script)])


@pytest.fixture
def names_file(tmp_path):
    """A tiny list of names, enough for every names stage to train a few steps."""
    names = ["emma", "olivia", "ava", "isabella", "sophia", "mia", "amelia", "harper",
             "evelyn", "abigail", "liam", "noah", "william", "james", "oliver", "benjamin",
             "elijah", "lucas", "mason", "logan", "zoe", "quinn", "jax", "yara", "kai"] * 8
    path = tmp_path / "names.txt"
    path.write_text("\n".join(names) + "\n", encoding="utf-8")
    return path


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu skip, with the reason shown, where torch sees no CUDA device."""
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (python -m pytest -m gpu on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
