"""gpt2.py on a CUDA GPU, as a practitioner runs it: `python -m pytest -m gpu` (a few minutes).
Every test skips cleanly where torch sees no GPU, so CI stays green on CPU machines."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import gpt2
from conftest import ROOT, run_script
from test_gpt2 import hellaswag_file, tiny_model, write_shards

pytestmark = pytest.mark.gpu

VOCAB = 50304  # GPT-2's, so that prompts and HellaSwag tokenize
SMALL = ["--preset", "cpu-tiny", "--n-layer", "2", "--n-head", "2", "--n-embd", "64",
         "--seq-len", "64", "--batch-size", "4", "--total-batch-size", "512",
         "--max-steps", "30", "--warmup-steps", "5", "--lr", "3e-3", "--eval-every", "10",
         "--eval-batches", "2", "--sample-every", "0", "--checkpoint-every", "0"]


@pytest.fixture
def shards(tmp_path):
    return write_shards(tmp_path / "shards", sizes=(20000, 30000, 30000), vocab=1000)


def losses(out_dir):
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in records if "train_loss" in r]


@pytest.mark.parametrize("device", ["auto", "cuda", "cuda:0"])
def test_python_gpt2_py_trains_with_bf16_and_compile(tmp_path, shards, device):
    """`python gpt2.py` without torchrun, every device spelling: the defaults on a GPU (bf16
    where the card has it, torch.compile) train, and the loss goes down."""
    out = tmp_path / "out"
    result = run_script("gpt2.py", *SMALL, "--data", shards, "--out-dir", out, "--device", device)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["device"] == "cuda:0" and metrics["compile"] is True
    ampere = torch.cuda.get_device_capability()[0] >= 8  # not is_bf16_supported(): emulated
    assert metrics["dtype"] == ("bfloat16" if ampere else "float16")
    assert np.mean(losses(out)[-5:]) < np.mean(losses(out)[:5]) - 0.3


def test_torchrun_one_process_nccl(tmp_path, shards):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
         str(ROOT / "gpt2.py"), *SMALL, "--data", str(shards), "--out-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 rank(s)" in result.stdout
    assert losses(out)[-1] < losses(out)[0]


def test_fp16_with_gradient_scaler(tmp_path, shards):
    out = tmp_path / "out"
    result = run_script("gpt2.py", *SMALL, "--data", shards, "--out-dir", out, "--dtype",
                        "float16", "--no-compile")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["dtype"] == "float16"
    assert all(np.isfinite(losses(out))) and losses(out)[-1] < losses(out)[0]
    assert "scaler" in torch.load(out / "checkpoint.pt", weights_only=True)


def test_resume_is_exact_on_the_gpu(tmp_path, shards):
    """Eager, float32: N + N steps with a stop and --resume log what 2N steps in one go do."""
    flags = [*SMALL, "--data", shards, "--no-compile", "--dtype", "float32", "--max-steps", "8",
             "--shuffle"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run_script("gpt2.py", *flags, "--out-dir", whole).returncode == 0
    assert run_script("gpt2.py", *flags, "--out-dir", split, "--stop-step", "4").returncode == 0
    result = run_script("gpt2.py", *flags, "--out-dir", split, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(losses(split), losses(whole), atol=1e-5, rtol=0)


def test_kv_cache_equals_recomputation_in_fp32():
    model = tiny_model(vocab=VOCAB, block=48).cuda()
    prompt = torch.randint(0, VOCAB, (3, 7), device="cuda")
    with gpt2.variable_length_attention():
        cached = model.generate(prompt, 60, temperature=0, use_cache=True)  # past the block
        full = model.generate(prompt, 60, temperature=0, use_cache=False)
    assert torch.equal(cached, full)


def test_hellaswag_and_sampling_inline_then_sample_mode(tmp_path, shards):
    """Inline HellaSwag and samples during a compiled bf16 run, then --sample from its
    checkpoint and --eval-hellaswag on the GPU."""
    out = tmp_path / "out"
    data = hellaswag_file(tmp_path, 40)
    result = run_script("gpt2.py", *SMALL, "--data", shards, "--out-dir", out,
                        "--hellaswag-every", "10", "--hellaswag-data", data,
                        "--sample-every", "10", "--sample-tokens", "20", "--prompt", "Hello")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["hellaswag_n"] for r in records if "hellaswag" in r] == [40, 40, 40, 40]
    assert "--- sample 3, step 30:\nHello" in result.stdout
    sampled = run_script("gpt2.py", "--sample", "--init-from", out / "checkpoint.pt",
                         "--prompt", "Once", "--sample-tokens", "30", "--num-samples", "2")
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert sampled.stdout.count("--- sample") == 2 and "device cuda:0" in sampled.stdout
    scored = run_script("gpt2.py", "--eval-hellaswag", "--init-from", out, "--hellaswag-data",
                        data)
    assert scored.returncode == 0 and "HellaSwag, 40 examples" in scored.stdout


def test_checkpoint_loads_back_on_the_gpu(tmp_path, shards):
    out = tmp_path / "out"
    assert run_script("gpt2.py", *SMALL, "--data", shards, "--out-dir", out,
                      "--max-steps", "2").returncode == 0
    model = gpt2.load_model(out, "cuda")
    checkpoint = common.load_checkpoint(out / "checkpoint.pt", "gpt2", "")
    assert model.state_dict().keys() == checkpoint["model"].keys()
    for key, value in model.state_dict().items():
        assert value.device.type == "cuda", key
        assert torch.equal(value.cpu(), checkpoint["model"][key]), key
