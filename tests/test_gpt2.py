"""gpt2.py: the model is GPT-2, the fast paths equal the plain ones, the trainer is exact
(accumulation, ranks, resume) and fails cleanly. Tiny models and shards written to tmp_path."""
import argparse
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import gpt2
from conftest import ROOT, assert_user_error, run_script, save_checkpoint, signal_after

VOCAB = 256
# A tiny model and a short run: 2 micro-steps of 2 x 16 tokens per optimizer step.
TINY = ["--preset", "cpu-tiny", "--n-layer", "2", "--n-head", "2", "--n-embd", "32",
        "--vocab-size", str(VOCAB), "--seq-len", "16", "--batch-size", "2",
        "--total-batch-size", "64", "--max-steps", "6", "--warmup-steps", "2", "--lr", "1e-2",
        "--eval-every", "3", "--val-batches", "2", "--sample-every", "0",
        "--checkpoint-every", "0", "--device", "cpu"]


def write_shards(directory, sizes=(2000, 1500, 1500), vocab=VOCAB, seed=0):
    """fineweb.py's layout: shard 0 is val, the rest train; uint16 tokens."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, size in enumerate(sizes):
        split = "val" if i == 0 else "train"
        tokens = rng.integers(0, vocab, size).astype(np.uint16)
        np.save(directory / f"test_{split}_{i:06d}.npy", tokens)
    return directory


@pytest.fixture
def shards(tmp_path):
    return write_shards(tmp_path / "shards")


def train(argv):
    """Run gpt2.py's main in this process (fast: no interpreter start-up, no torch import)."""
    return gpt2.main(gpt2.parse_args([str(a) for a in argv]))


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def train_losses(out_dir):
    return [r["train_loss"] for r in read_log(out_dir / "log.jsonl") if "train_loss" in r]


def hellaswag_file(tmp_path, n):
    """n examples in HellaSwag's .jsonl format."""
    path = tmp_path / "hellaswag.jsonl"
    rows = [{"ctx": f"The cat number {i} sat on the", "endings": ["mat.", "moon.", "dog.", "sky."],
             "label": i % 4} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def tiny_model(seed=0, vocab=VOCAB, block=32, n_layer=2, n_embd=32):
    torch.manual_seed(seed)
    return gpt2.GPT(gpt2.GPTConfig(block_size=block, vocab_size=vocab, n_layer=n_layer,
                                   n_head=2, n_embd=n_embd)).eval()


# --- model

def test_gpt2_124m_shape_tying_and_init():
    """The gpt2 preset is GPT-2 124M with the padded vocabulary and tied embeddings; the
    residual projections start 1/sqrt(2 n_layer) smaller than the other weights."""
    p = gpt2.PRESETS["gpt2"]
    config = gpt2.GPTConfig(block_size=p["block_size"], n_layer=p["n_layer"], n_head=p["n_head"],
                            n_embd=p["n_embd"])
    with torch.device("meta"):
        model = gpt2.GPT(config)
    assert config.vocab_size == 50304
    assert sum(q.numel() for q in model.parameters()) == 124_475_904  # 124M, wte counted once
    assert model.lm_head.weight is model.transformer.wte.weight
    assert isinstance(model.transformer.h[0].mlp.gelu, torch.nn.GELU)
    assert model.transformer.h[0].mlp.gelu.approximate == "tanh"
    small = tiny_model(n_layer=8, n_embd=128)
    proj = torch.cat([b.attn.c_proj.weight.flatten() for b in small.transformer.h])
    fc = torch.cat([b.mlp.c_fc.weight.flatten() for b in small.transformer.h])
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert fc.std().item() == pytest.approx(0.02, rel=0.05)
    # MFU's FLOPs per token: ~0.85 GFLOP for GPT-2 124M at 1024 tokens (1 token/s, 1 FLOP/s).
    assert model.estimate_mfu(1, 1024, 1e-12) == pytest.approx(0.855e9, rel=0.01)


def test_linear_cross_entropy_equals_plain_cross_entropy():
    """The CPU training path's fused, chunked loss has F.cross_entropy's value and gradients."""
    model = tiny_model().train()
    fused_model = gpt2.FusedLossGPT(model)
    fused_model.CHUNK = 5  # several chunks, the last one partial
    assert list(fused_model.parameters()) == list(model.parameters())  # no weights of its own
    x = torch.randint(0, VOCAB, (3, 7))
    y = torch.randint(0, VOCAB, (3, 7))
    logits, loss = fused_model(x, y)
    assert logits is None
    loss.backward()
    fused = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits, plain = model(x, y)  # the plain path: logits, then F.cross_entropy
    assert logits.shape == (3, 7, VOCAB)
    plain.backward()
    assert loss.item() == pytest.approx(plain.item(), abs=1e-6)
    for a, p in zip(fused, model.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-5)


def test_hidden_states_times_lm_head_are_the_logits():
    """hellaswag.py's fast path: hidden_states (final LayerNorm applied) then lm_head."""
    model = tiny_model()
    x = torch.randint(0, VOCAB, (2, 9))
    logits, _ = model(x)
    torch.testing.assert_close(model.lm_head(model.hidden_states(x)), logits)


def test_kv_cache_generation_equals_full_recomputation():
    """Greedy tokens with the cache equal recomputing the whole text each step, also past the
    block size; sampling with the same generator gives the same tokens too."""
    model = tiny_model(block=24)
    prompt = torch.randint(0, VOCAB, (2, 5))
    cached = model.generate(prompt, 30, temperature=0, use_cache=True)  # 35 > block 24
    full = model.generate(prompt, 30, temperature=0, use_cache=False)
    assert cached.shape == (2, 35)
    assert torch.equal(cached, full)
    a = model.generate(prompt, 12, temperature=1.0, top_k=20, use_cache=True,
                       generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 12, temperature=1.0, top_k=20, use_cache=False,
                       generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    # The cache's per-step logits equal the full pass's.
    cache = gpt2.KVCache(model.config.n_layer, model.config.block_size)
    seq = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        steps = [model.hidden_states(seq[:, :4], cache)[:, -1]]
        steps += [model.hidden_states(seq[:, t:t + 1], cache)[:, -1] for t in range(4, 10)]
        full_h = model.hidden_states(seq)[0, 3:]
    torch.testing.assert_close(torch.cat(steps), full_h, atol=1e-5, rtol=1e-5)


def hf_tiny(tmp_path, safe=True):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=40,
                                     vocab_size=300)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # non-zero biases and LayerNorm gains, so a mix-up would show
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=safe)
    return hf, tmp_path / "hf"


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pytorch_model.bin"])
def test_from_pretrained_matches_transformers(tmp_path, safe):
    """GPT.from_pretrained on a Hugging Face directory (Conv1D weights transposed) gives the
    logits of transformers' GPT2LMHeadModel."""
    hf, directory = hf_tiny(tmp_path, safe)
    model = gpt2.GPT.from_pretrained(str(directory)).eval()
    x = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], hf(x).logits, atol=1e-5, rtol=1e-4)
    assert model.config.vocab_size == 300 and model.config.block_size == 40


def test_from_pretrained_refuses_missing_or_unknown_weights(tmp_path, monkeypatch):
    """A Hugging Face file short of a weight, or with one GPT-2 does not have, is an error, not
    a model with some random weights."""
    hf, directory = hf_tiny(tmp_path)
    config, weights = gpt2.read_hf_gpt2(str(directory))
    wrong_shape = {**weights, "transformer.wpe.weight": torch.zeros(3, 32)}
    for broken, words in (({k: v for k, v in weights.items() if not k.endswith("ln_f.bias")},
                           "no transformer.ln_f.bias"),
                          ({**weights, "transformer.extra.weight": torch.zeros(3)},
                           "unknown transformer.extra.weight"),
                          (wrong_shape, "transformer.wpe.weight of shape (3, 32)")):
        monkeypatch.setattr(gpt2, "read_hf_gpt2", lambda name: (config, broken))
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
            gpt2.GPT.from_pretrained(str(directory))
    monkeypatch.undo()
    # A config.json whose sizes are not positive integers: ValueError too (the loaders' one
    # line), not a TypeError from nn.Embedding.
    hf_config = json.loads((directory / "config.json").read_text())
    for value in ("x", 0, 2.5, True):
        (directory / "config.json").write_text(json.dumps({**hf_config, "n_positions": value}))
        with pytest.raises(ValueError, match="n_positions=.*a positive integer is due"):
            gpt2.read_hf_gpt2(str(directory))


def test_export_hf_loads_in_transformers_with_equal_logits(tmp_path):
    """--export-hf writes config.json + model.safetensors; GPT2LMHeadModel loads them with the
    same logits."""
    transformers = pytest.importorskip("transformers")
    model = tiny_model(vocab=300)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ckpt = tmp_path / "checkpoint.pt"
    save_checkpoint(ckpt, {"stage": "gpt2", "model": model.state_dict(),
                         "config": vars(model.config).copy()})
    train(["--init-from", ckpt, "--export-hf", tmp_path / "export"])
    assert sorted(os.listdir(tmp_path / "export")) == ["config.json", "model.safetensors"]
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    x = torch.randint(0, 300, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x)[0], atol=1e-5, rtol=1e-4)
    # and back again
    again = gpt2.GPT.from_pretrained(str(tmp_path / "export")).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x)[0], model(x)[0])


def test_export_hf_to_a_folder_that_cannot_be_made_is_one_line(tmp_path, capsys):
    """A folder under a file cannot be created: one line and exit 2, nothing half-written."""
    pytest.importorskip("safetensors")
    model = tiny_model(vocab=300)
    ckpt = tmp_path / "checkpoint.pt"
    save_checkpoint(ckpt, {"stage": "gpt2", "model": model.state_dict(),
                         "config": vars(model.config).copy()})
    (tmp_path / "blocker").write_text("a file")
    user_error(capsys, ["--init-from", ckpt, "--export-hf", tmp_path / "blocker" / "export"],
               "cannot write to")
    user_error(capsys, ["--init-from", ckpt, "--export-hf", tmp_path / "blocker"],
               "not a directory")



def test_export_hf_replaces_nothing_without_overwrite_and_shares_its_files(tmp_path, capsys):
    """A second export into the same folder, or one into a training run's folder, stops with one
    line unless --overwrite; model.safetensors gets the json files' mode (safetensors alone
    would make it private to its owner)."""
    pytest.importorskip("safetensors")
    model = tiny_model(vocab=300)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    ckpt.parent.mkdir()
    save_checkpoint(ckpt, {"stage": "gpt2", "model": model.state_dict(),
                         "config": vars(model.config).copy()})
    export = tmp_path / "export"
    train(["--init-from", ckpt, "--export-hf", export])
    modes = {f.name: f.stat().st_mode & 0o777 for f in export.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes
    before = (export / "config.json").read_text()
    (export / "config.json").write_text("mine")
    user_error(capsys, ["--init-from", ckpt, "--export-hf", export], "--overwrite")
    user_error(capsys, ["--init-from", ckpt, "--export-hf", ckpt.parent], "--overwrite")
    assert (export / "config.json").read_text() == "mine"
    assert sorted(os.listdir(ckpt.parent)) == ["checkpoint.pt"]
    train(["--init-from", ckpt, "--export-hf", export, "--overwrite"])
    assert (export / "config.json").read_text() == before

# --- training helpers

def test_learning_rate_schedule_warmup_peak_end():
    """GPT-2 124M recipe: linear warmup over 715 steps to 6e-4, cosine to 6e-5 at 19,073."""
    lr = lambda step: gpt2.learning_rate(step, 6e-4, 715, 19073, 0.1)  # noqa: E731
    assert lr(0) == pytest.approx(6e-4 / 715)
    assert lr(357) == pytest.approx(6e-4 * 358 / 715)
    assert lr(714) == pytest.approx(6e-4)  # the end of warmup is the peak
    assert lr(715) == pytest.approx(6e-4)
    assert lr((715 + 19073) / 2) == pytest.approx(3.3e-4)  # half way down the cosine
    assert lr(19073) == pytest.approx(6e-5)
    assert lr(30000) == pytest.approx(6e-5)


def test_optimizer_recipe():
    """AdamW betas (0.9, 0.95), eps 1e-8; decay on 2-D tensors only."""
    model = tiny_model()
    opt = model.configure_optimizer(6e-4, 0.1, torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["betas"] == (0.9, 0.95) and decay["eps"] == 1e-8
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_loader_rank_slices_and_shard_rollover(tmp_path):
    """Rank r reads the r-th contiguous slice of every window; windows advance by B*T*ranks,
    move to the next shard when one cannot fill a window, and wrap into a new epoch."""
    shards = [np.arange(0, 50, dtype=np.uint16), np.arange(100, 130, dtype=np.uint16)]
    B, T, W = 2, 3, 2  # windows of 12 tokens (+1 target)
    loaders = [gpt2.ShardLoader(shards, B, T, rank, W) for rank in range(W)]
    seen = []
    for _ in range(7):
        batches = [loader.next_batch() for loader in loaders]
        for rank, (x, y) in enumerate(batches):
            assert x.shape == (B, T) and y.shape == (B, T)
            assert torch.equal(y.flatten()[:-1], x.flatten()[1:])  # y is x shifted by one
        seen.append(torch.cat([x.flatten() for x, _ in batches]).tolist())
    # shard 0: (50 - 1) // 12 = 4 windows at 0, 12, 24, 36; shard 1: 29 // 12 = 2 windows
    assert seen[0] == list(range(0, 12))
    assert seen[1] == list(range(12, 24))
    assert seen[3] == list(range(36, 48))
    assert seen[4] == list(range(100, 112))
    assert seen[5] == list(range(112, 124))
    assert seen[6] == list(range(0, 12))  # epoch 2
    assert loaders[0].state_dict()["epoch"] == 1
    x, y = loaders[1].next_batch()  # rank 1's slice of window 2 of epoch 2
    assert x.flatten().tolist() == list(range(18, 24)) and y.flatten()[-1].item() == 24


def test_loader_shuffle_is_deterministic_complete_and_resumable():
    """--shuffle: each epoch a permutation of all windows, the same for the same seed,
    different per epoch; a loader restored from state_dict continues identically."""
    shards = [np.arange(i * 1000, i * 1000 + 97, dtype=np.uint16) for i in range(3)]
    make = lambda: gpt2.ShardLoader(shards, 2, 4, shuffle=True, seed=5)  # noqa: E731
    loader = make()
    epoch1 = [loader.next_batch()[0][0, 0].item() for _ in range(36)]  # 3 shards x 12 windows
    epoch2 = [loader.next_batch()[0][0, 0].item() for _ in range(36)]
    plain = sorted(s * 1000 + 8 * k for s in range(3) for k in range(12))
    assert sorted(epoch1) == plain and sorted(epoch2) == plain
    assert epoch1 != plain and epoch1 != epoch2
    again = make()
    assert [again.next_batch()[0][0, 0].item() for _ in range(36)] == epoch1
    middle = make()
    for _ in range(20):
        middle.next_batch()
    resumed = make()
    resumed.load_state_dict(middle.state_dict())
    for _ in range(30):
        assert torch.equal(middle.next_batch()[0], resumed.next_batch()[0])


# --- the trainer end to end

def test_tiny_run_writes_log_metrics_figure_checkpoint(tmp_path, shards, monkeypatch, capsys):
    """A tiny run: a log line per step (step, train_loss, lr, grad_norm), eval records with
    val_loss and hellaswag, samples, metrics.json, loss.png, a checkpoint; the loss falls."""
    calls = []

    def fake_evaluate(model, examples, **kwargs):
        calls.append((len(examples), kwargs["rank"], kwargs["world_size"], model.training))
        return {"acc": 0.25, "acc_norm": 0.3, "acc_norm_chars": 0.3, "n": len(examples),
                "correct": 1, "correct_norm": 1, "correct_norm_chars": 1}

    monkeypatch.setattr(gpt2.hellaswag, "load_examples",
                        lambda split="val", path=None, **k: [{"ctx": "a", "endings": ["b"] * 4,
                                                              "label": 0}] * 5)
    monkeypatch.setattr(gpt2.hellaswag, "evaluate", fake_evaluate)
    out = tmp_path / "out"
    argv = TINY + ["--data", shards, "--out-dir", out, "--vocab-size", "50304",
                   "--max-steps", "8", "--hellaswag-every", "4", "--hellaswag-limit", "3",
                   "--sample-every", "4", "--sample-tokens", "5", "--num-samples", "2",
                   "--prompt", "Hello"]
    metrics = train(argv)
    records = read_log(out / "log.jsonl")
    steps = [r for r in records if "train_loss" in r]
    assert [r["step"] for r in steps] == list(range(8))
    assert all({"lr", "grad_norm", "ms", "tokens_per_s"} <= set(r) for r in steps)
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6, 8]  # and at the end, after the last step
    assert [r["step"] for r in records if "hellaswag" in r] == [0, 4, 8]
    assert calls[0][:3] == (3, 0, 1)  # 3 examples, rank 0 of 1 (evaluate() sets eval mode)
    assert steps[-1]["train_loss"] < steps[0]["train_loss"]
    assert metrics["final_val_loss"] == evals[-1]["val_loss"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["final_hellaswag"] == 0.3 and saved["steps_done"] == 8
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob("*.tmp"))
    printed = capsys.readouterr().out
    assert printed.startswith("command: ")
    assert "tok/s" in printed
    # Samples print as text (not as Python strings), each under a line that names it.
    assert "\n--- sample 0, step 4:\nHello" in printed
    assert "\n--- sample 1, step 8:\nHello" in printed
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 8 and checkpoint["config"]["n_embd"] == 32
    assert set(checkpoint["loader"]) >= {"epoch", "shard", "offset"}
    assert isinstance(checkpoint["rng"]["torch"], torch.Tensor)  # the state training draws from
    model = gpt2.load_model(out, "cpu")  # an --out-dir stands for its checkpoint.pt
    assert not model.training
    assert model.state_dict().keys() == checkpoint["model"].keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, checkpoint["model"][key]), key


def test_gradient_accumulation_equals_one_large_batch(tmp_path, shards):
    """4 sequences in one micro-batch and 2 micro-steps of 2 give the same losses."""
    train(TINY + ["--data", shards, "--out-dir", tmp_path / "a", "--batch-size", "4"])
    train(TINY + ["--data", shards, "--out-dir", tmp_path / "b", "--batch-size", "2"])
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert len(a) == 6
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_resume_is_exact(tmp_path, shards, capsys):
    """2N steps in one go log the same losses as N steps, a stop, and a resumed N steps."""
    common = TINY + ["--data", shards, "--max-steps", "8", "--shuffle"]
    train(common + ["--out-dir", tmp_path / "whole"])
    capsys.readouterr()
    assert train(common + ["--out-dir", tmp_path / "split", "--stop-step", "4"])["stopped"] == \
        "--stop-step"  # metrics.json says why the run ended early, and the run says what next
    assert "stopped at --stop-step 4 of --max-steps 8" in capsys.readouterr().out
    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "whole")[:4]
    assert train(common + ["--out-dir", tmp_path / "split", "--resume"])["stopped"] is None
    whole = read_log(tmp_path / "whole" / "log.jsonl")
    split = read_log(tmp_path / "split" / "log.jsonl")
    key = lambda r: (r["step"], r.get("train_loss"), r.get("val_loss"))  # noqa: E731
    assert [key(r) for r in split] == [key(r) for r in whole]


def test_a_resume_that_contradicts_its_flags_is_one_line(tmp_path, shards, capsys):
    """--resume builds the checkpoint's model: a model flag that says otherwise, or a
    --stop-step past --max-steps, would be silently ignored; each is a user's mistake."""
    run = TINY + ["--data", shards, "--out-dir", tmp_path / "run"]
    train(run + ["--stop-step", "2"])
    for argv, words in ((["--resume", "--n-layer", "3"], ["cannot resume", "n_layer 2",
                                                          "(the flags: 3)"]),
                        (["--resume", "--stop-step", "7"], ["--stop-step 7", "--max-steps 6"]),
                        (["--stop-step", "9", "--overwrite"], ["--stop-step 9"])):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            train(run + argv)
        assert exit_info.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and all(word in lines[0] for word in words), lines
    # Resumed from another folder's checkpoint, the run may not replace this folder's own.
    train(run + ["--out-dir", tmp_path / "mine", "--max-steps", "3"])
    elsewhere = run + ["--resume", tmp_path / "run" / "checkpoint.pt", "--out-dir"]
    with pytest.raises(SystemExit):
        train(elsewhere + [tmp_path / "mine"])
    assert "holds a checkpoint.pt of its own" in capsys.readouterr().err
    assert common.load_checkpoint(tmp_path / "mine" / "checkpoint.pt", "gpt2", "")["step"] == 3
    assert train(elsewhere + [tmp_path / "new"])["steps_done"] == 6  # a new folder is free
    saved = common.load_checkpoint(tmp_path / "run" / "checkpoint.pt", "gpt2", "")
    assert saved["step"] == 2  # nothing was changed
    # A checkpoint without the RNG states (made by hand, or cut short) is one line, not KeyError.
    torch.save({k: v for k, v in saved.items() if k != "rng"}, tmp_path / "no_rng.pt")
    with pytest.raises(SystemExit):
        train(run + ["--resume", tmp_path / "no_rng.pt", "--out-dir", tmp_path / "other"])
    assert "incomplete (no rng)" in capsys.readouterr().err
    assert train(run + ["--resume"])["steps_done"] == 6  # the run's own flags go on


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A crash in the middle of saving leaves the previous checkpoint whole and loadable."""
    model = tiny_model()
    parts = (model, model.configure_optimizer(1e-3, 0.1, torch.device("cpu")),
             torch.amp.GradScaler("cuda", enabled=False),
             gpt2.ShardLoader([np.zeros(100, dtype=np.uint16)], 2, 8))
    args = argparse.Namespace(out_dir=tmp_path)
    gpt2.save_checkpoint(args, *parts, step=1)

    def crash(obj, f, *args, **kwargs):
        with open(f, "wb") as file:
            file.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        gpt2.save_checkpoint(args, *parts, step=2)
    assert common.load_checkpoint(tmp_path / "checkpoint.pt", "gpt2", "")["step"] == 1


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, shards, monkeypatch, capsys):
    """A non-finite loss ends the run with a clear message and no new checkpoint."""
    out = tmp_path / "out"
    forward = gpt2.FusedLossGPT.forward  # the CPU float32 training step's model
    calls = {"n": 0}

    def poisoned(self, idx, targets):
        logits, loss = forward(self, idx, targets)
        calls["n"] += 1
        if calls["n"] > 6:  # steps 0-2 are fine (2 micro-steps each), step 3 is not
            loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(gpt2.FusedLossGPT, "forward", poisoned)
    with pytest.raises(SystemExit) as exit_info:
        train(TINY + ["--data", shards, "--out-dir", out, "--checkpoint-every", "2"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "loss is nan at step 3" in err and "last good checkpoint" in err
    assert common.load_checkpoint(out / "checkpoint.pt", "gpt2", "")["step"] == 2


@pytest.mark.slow
def test_sigterm_saves_checkpoint_and_exits_cleanly(tmp_path, shards):
    """SIGTERM (preemption) finishes the step, saves a checkpoint and exits with status 0."""
    out = tmp_path / "out"
    args = TINY + ["--data", shards, "--out-dir", out, "--max-steps", "100000",
                   "--eval-every", "0"]
    returncode, rest, err = signal_after("gpt2.py", args, "step     2 |", signal.SIGTERM)
    assert returncode == 0, err
    assert "received SIGTERM" in rest
    step = common.load_checkpoint(out / "checkpoint.pt", "gpt2", "")["step"]
    assert step >= 3 and len(train_losses(out)) == step


@pytest.mark.slow
def test_two_ranks_under_torchrun_equal_one_process(tmp_path, shards):
    """DDP over 2 gloo ranks (1 micro-step each) logs the losses of 1 process with the same
    total batch (2 micro-steps), to 1e-5 in fp32."""
    common = TINY + ["--data", shards, "--max-steps", "4", "--eval-every", "2",
                     "--vocab-size", "50304", "--hellaswag-every", "2",
                     "--hellaswag-data", hellaswag_file(tmp_path, 5)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "gpt2.py"), *map(str, common + ["--out-dir", tmp_path / "ddp"])],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 rank(s), 1 micro-step(s)" in ddp.stdout
    # 4 val micro-batches of one rank = 2 val windows of 2 ranks: the same tokens
    train(common + ["--out-dir", tmp_path / "one", "--val-batches", "4"])
    a = read_log(tmp_path / "ddp" / "log.jsonl")
    b = read_log(tmp_path / "one" / "log.jsonl")
    np.testing.assert_allclose(train_losses(tmp_path / "ddp"), train_losses(tmp_path / "one"),
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose([r["val_loss"] for r in a if "val_loss" in r],
                               [r["val_loss"] for r in b if "val_loss" in r], atol=1e-5, rtol=0)
    # HellaSwag: the 5 examples split over the ranks (3 + 2), counts summed: the same scores
    assert [(r["hellaswag"], r["hellaswag_n"]) for r in a if "hellaswag" in r] == \
        [(r["hellaswag"], r["hellaswag_n"]) for r in b if "hellaswag" in r]
    assert [r["hellaswag_n"] for r in a if "hellaswag" in r] == [5, 5, 5]


@pytest.mark.slow
# torch.compile imports torch/utils/mkldnn.py, whose 14 @torch.jit.script_method warn: torch's own
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compile_trains_like_eager_with_inline_sampling(tmp_path, shards):
    """--compile: the same losses as eager (to float tolerance), with val loss, HellaSwag and
    sampling running inline (the last two on the eager module)."""
    common = TINY + ["--data", shards, "--max-steps", "3", "--eval-every", "2",
                     "--vocab-size", "50304", "--sample-every", "2", "--sample-tokens", "3",
                     "--hellaswag-every", "2", "--hellaswag-data", hellaswag_file(tmp_path, 3)]
    train(common + ["--out-dir", tmp_path / "eager"])
    train(common + ["--out-dir", tmp_path / "compiled", "--compile"])
    np.testing.assert_allclose(train_losses(tmp_path / "compiled"),
                               train_losses(tmp_path / "eager"), atol=1e-4, rtol=0)
    scores = [r for r in read_log(tmp_path / "compiled" / "log.jsonl") if "hellaswag" in r]
    assert [r["hellaswag_n"] for r in scores] == [3, 3, 3]


def test_sample_mode_is_seeded(tmp_path, shards, capsys):
    """--sample from a checkpoint prints continuations of the prompt; same seed, same text."""
    out = tmp_path / "out"
    train(TINY + ["--data", shards, "--out-dir", out, "--vocab-size", "50304",
                  "--max-steps", "1"])
    argv = ["--sample", "--init-from", out / "checkpoint.pt", "--prompt", "Once upon",
            "--sample-tokens", "6", "--num-samples", "2", "--seed", "7"]
    first = train(argv)["samples"]
    assert len(first) == 2 and all(s.startswith("Once upon") for s in first)
    assert train(argv)["samples"] == first


def test_draw_samples_the_distribution_multinomial_samples():
    """gpt2.draw (one uniform number per row) gives torch.multinomial's frequencies: the same
    counts to within sampling noise over 50,304 entries with a long tail, no draw of a token
    whose probability is 0 (top-k's and top-p's cut), the same draws for the same generator."""
    torch.manual_seed(0)
    logits = torch.randn(50304) * 3  # a few likely tokens and a long tail of tiny ones
    logits[::7] = float("-inf")  # tokens cut away: probability 0
    probs = F.softmax(logits, dim=-1)
    n, rows, generator = 20_000, 500, torch.Generator().manual_seed(1)
    ours = torch.cat([gpt2.draw(probs.expand(rows, -1), generator).flatten()
                      for _ in range(n // rows)])  # (n,)
    theirs = torch.multinomial(probs, n, replacement=True, generator=torch.Generator()
                               .manual_seed(2))  # (n,)
    assert not (ours % 7 == 0).any()
    # the 20 likeliest tokens one by one, then the rest as one bucket: that is where a
    # precision loss in the tail would show
    top = probs.topk(20).indices
    def buckets(draws):
        counts = torch.bincount(draws, minlength=probs.numel()).double()
        return torch.cat([counts[top], (counts.sum() - counts[top].sum())[None]])
    expected = torch.cat([probs[top], 1 - probs[top].sum()[None]]).double() * n
    for counts in (buckets(ours), buckets(theirs)):
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        assert chi2 < 50, chi2  # 20 degrees of freedom: p < 1e-4 above 50
    again = gpt2.draw(probs.expand(rows, -1), torch.Generator().manual_seed(1))
    assert torch.equal(again.flatten(), ours[:rows])


# --- a user's mistakes: one line on stderr, exit status 2, nothing written

def user_error(capsys, argv, *words, out_dir=None):
    with pytest.raises(SystemExit) as exit_info:
        train(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpt2.py: error: "), err
    for word in words:
        assert word.lower() in err[0].lower(), (word, err[0])
    if out_dir is not None:
        assert not out_dir.exists()


def test_bad_data_directories(tmp_path, capsys):
    """Missing directory, no shards of a split, wrong dtype, not .npy, too short: each names
    the problem and the fineweb.py command that makes shards."""
    out = tmp_path / "out"
    base = TINY + ["--out-dir", out]
    user_error(capsys, base + ["--data", tmp_path / "nowhere"], "not a directory",
               "fineweb.py", out_dir=out)
    only_val = tmp_path / "only_val"
    write_shards(only_val, sizes=(2000,))
    user_error(capsys, base + ["--data", only_val], "no train shards", "fineweb.py", out_dir=out)
    no_val = tmp_path / "no_val"
    write_shards(no_val)
    os.remove(no_val / "test_val_000000.npy")
    user_error(capsys, base + ["--data", no_val], "no val shards", out_dir=out)
    wrong = write_shards(tmp_path / "wrong")
    np.save(wrong / "test_train_000001.npy", np.arange(2000, dtype=np.int32))
    user_error(capsys, base + ["--data", wrong], "int32", "uint16", out_dir=out)
    garbage = write_shards(tmp_path / "garbage")
    (garbage / "test_train_000002.npy").write_bytes(b"not numpy at all")
    user_error(capsys, base + ["--data", garbage], "not a readable .npy", out_dir=out)
    wide = write_shards(tmp_path / "wide", vocab=VOCAB * 4)  # ids the model has no row for
    user_error(capsys, base + ["--data", wide], "beyond the model's vocabulary", "--vocab-size",
               out_dir=out)
    short = write_shards(tmp_path / "short", sizes=(2000, 20, 30))
    user_error(capsys, base + ["--data", short], "every train shard", "fewer tokens than one "
               "batch window", out_dir=out)


def test_a_short_last_shard_is_left_out_with_a_note(tmp_path, capsys):
    """fineweb.py's last shard holds the corpus's tail: shorter than a batch window, it is left
    out (it has no window to read), and the run says so."""
    data = write_shards(tmp_path / "tail", sizes=(2000, 1500, 20))
    metrics = train(TINY + ["--data", data, "--out-dir", tmp_path / "out"])
    assert metrics["steps_done"] == 6
    assert "note: 1 train shard(s)" in capsys.readouterr().out


def test_bad_flags(tmp_path, shards, capsys):
    """Nonsensical values and a total batch that does not divide are refused before any output."""
    out = tmp_path / "out"
    base = TINY + ["--data", shards, "--out-dir", out]
    user_error(capsys, base + ["--total-batch-size", "100"], "not a multiple", out_dir=out)
    user_error(capsys, base + ["--batch-size", "0"], "--batch-size", out_dir=out)
    user_error(capsys, base + ["--lr", "nan"], "--lr", out_dir=out)
    user_error(capsys, base + ["--n-head", "3"], "multiple of --n-head", out_dir=out)
    user_error(capsys, base + ["--seq-len", "1000"], "--seq-len", out_dir=out)
    user_error(capsys, base + ["--eval-every", "-1"], "--eval-every", out_dir=out)
    user_error(capsys, base + ["--preset", "gpt5"], "preset", out_dir=out)
    user_error(capsys, base + ["--device", "tpu"], "device", out_dir=out)
    user_error(capsys, base + ["--dtype", "float16"], "CUDA", out_dir=out)
    user_error(capsys, base + ["--resume"], "cannot resume", out_dir=out)
    user_error(capsys, base + ["--sample-every", "1", "--prompt", "Hello"], "vocab-size",
               out_dir=out)
    user_error(capsys, base + ["--hellaswag-every", "1", "--hellaswag-data",
                               tmp_path / "missing.jsonl"], "hellaswag", out_dir=out)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    user_error(capsys, ["--sample", "--init-from", bad], "not a readable")
    save_checkpoint(bad, {"stage": "transformer", "model": {}})
    user_error(capsys, ["--sample", "--init-from", bad], "not written by gpt2.py")
    tiny = {"n_layer": 1, "n_head": 1, "n_embd": 8, "block_size": 8, "vocab_size": 16}
    for config in ({"n_layers": 1}, tiny):  # an unknown field; weights that do not fit
        save_checkpoint(bad, {"stage": "gpt2", "config": config, "model": {}})
        user_error(capsys, ["--sample", "--init-from", bad], "does not match this gpt2.py")
    user_error(capsys, ["--sample", "--init-from", tmp_path / "none"], "cannot load")


def test_user_error_from_the_command_line(tmp_path):
    """As a user sees it: one line on stderr, exit 2, no traceback."""
    result = run_script("gpt2.py", "--data", tmp_path / "nowhere", "--out-dir", tmp_path / "o",
                        "--preset", "cpu-tiny")
    assert_user_error(result, "fineweb.py")
    assert not (tmp_path / "o").exists()


def test_inline_hellaswag_with_the_real_evaluator(tmp_path, shards):
    """--hellaswag-every with a local .jsonl runs hellaswag.evaluate on the model during
    training and logs its acc_norm; the data is read at start-up."""
    data = hellaswag_file(tmp_path, 6)
    out = tmp_path / "out"
    train(TINY + ["--data", shards, "--out-dir", out, "--vocab-size", "50304",
                  "--max-steps", "2", "--hellaswag-every", "1", "--hellaswag-data", data])
    scores = [r for r in read_log(out / "log.jsonl") if "hellaswag" in r]
    assert [r["step"] for r in scores] == [0, 1, 2]
    assert all(r["hellaswag_n"] == 6 for r in scores)
    # The last score is the trained model's: the checkpoint, scored apart, gets the same.
    model = gpt2.load_model(out, "cpu")
    final = gpt2.hellaswag.evaluate(model, gpt2.hellaswag.load_examples(path=data),
                                    enc=gpt2.fineweb.get_encoding())
    assert final["n"] == 6 and scores[-1]["hellaswag"] == final["acc_norm"]


# --- what a practitioner relies on

def test_a_finished_run_is_not_overwritten_without_a_flag(tmp_path, shards, capsys):
    """The same --out-dir again without --resume stops before touching the checkpoint, naming
    both ways on; --overwrite starts afresh and replaces it."""
    out = tmp_path / "out"
    train(TINY + ["--data", shards, "--out-dir", out, "--max-steps", "2"])
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        train(TINY + ["--data", shards, "--out-dir", out, "--max-steps", "3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume" in err[0] and "--overwrite" in err[0], err
    assert (out / "checkpoint.pt").read_bytes() == before
    assert len(train_losses(out)) == 2  # the log is untouched too
    train(TINY + ["--data", shards, "--out-dir", out, "--max-steps", "3", "--overwrite"])
    assert common.load_checkpoint(out / "checkpoint.pt", "gpt2", "")["step"] == 3


def test_eval_hellaswag_mode_scores_a_checkpoint(tmp_path, shards, capsys):
    """--eval-hellaswag scores --init-from on a local HellaSwag file with all three rules."""
    out = tmp_path / "out"
    train(TINY + ["--data", shards, "--out-dir", out, "--vocab-size", "50304", "--max-steps", "1"])
    capsys.readouterr()
    data = hellaswag_file(tmp_path, 7)
    result = train(["--eval-hellaswag", "--init-from", out / "checkpoint.pt", "--device", "cpu",
                    "--hellaswag-data", data, "--hellaswag-limit", "5"])
    # the checkpoint's own score on the first 5 examples, as hellaswag.evaluate gives it
    expected = gpt2.hellaswag.evaluate(gpt2.load_model(out), gpt2.hellaswag.load_examples(
        path=data)[:5], enc=gpt2.fineweb.get_encoding())
    assert result == expected and result["n"] == 5
    assert f"HellaSwag, 5 examples: acc {expected['acc']:.4f}, " in capsys.readouterr().out


def test_evaluation_and_sampling_keep_off_cudnn_attention(tmp_path, monkeypatch):
    """Training may use cuDNN's attention (one fixed shape); sampling and HellaSwag, whose
    lengths change at every call, must not (a new cuDNN plan per length)."""
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(gpt2.F, "scaled_dot_product_attention", spy)
    model = tiny_model(vocab=50304)
    model.train()
    model(torch.randint(0, 100, (2, 8)), torch.randint(0, 100, (2, 8)))
    assert seen and all(seen)  # training: torch's own choice, cuDNN allowed
    seen.clear()
    gpt2.sample_texts(model, [1, 2, 3], 2, 4, 1.0, 5, torch.Generator().manual_seed(0),
                      lambda tokens: str(tokens))
    examples = [{"ctx": "A man", "endings": ["runs.", "sits.", "eats.", "a b c"], "label": 0}]
    gpt2.hellaswag.evaluate(model, examples, enc=gpt2.fineweb.get_encoding())
    assert seen and not any(seen)
    assert model.training  # both put the model back in training mode


def test_resuming_a_finished_run_changes_nothing(tmp_path, shards, capsys):
    """--resume of a run that reached --max-steps says so in one line and leaves every output
    byte for byte as it was (metrics.json keeps the real run's timing)."""
    out = tmp_path / "out"
    train(TINY + ["--data", shards, "--out-dir", out, "--max-steps", "2"])
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    capsys.readouterr()
    result = train(TINY + ["--data", shards, "--out-dir", out, "--max-steps", "2", "--resume"])
    assert result["steps_done"] == 2
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "already complete at step 2" in printed[0], printed
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before


def test_weights_that_cannot_be_loaded_are_one_line_in_words(tmp_path, capsys, monkeypatch):
    """A missing --init-from and an offline hub name: one line that names the flag and a fix,
    with no Python repr and no suggestion of the very thing that failed."""
    user_error(capsys, ["--sample", "--init-from", tmp_path / "nope.pt"], "--init-from",
               "no such file or folder", "gpt2.py checkpoint")
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("Got: ConnectError\nAn error")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    user_error(capsys, ["--sample", "--init-from", "gpt2"], "cannot be reached", "--init-from")
    for argv in (["--sample", "--init-from", tmp_path / "nope.pt"],
                 ["--sample", "--init-from", "gpt2"]):
        with pytest.raises(SystemExit):
            train(argv)
        line = capsys.readouterr().err
        assert "Error(" not in line and "\\n" not in line and "or gpt2" not in line, line


def test_hellaswag_download_failure_names_gpt2s_flags(tmp_path, shards, capsys, monkeypatch):
    """Offline HellaSwag during training: the fix is gpt2.py's --hellaswag-data (or turning it
    off), never hellaswag.py's --data, which is the shard folder here."""
    def unreachable(split, cache_dir="data/hellaswag"):
        raise gpt2.hellaswag.DataError("cannot download https://example/x.jsonl (no network)")

    monkeypatch.setattr(gpt2.hellaswag, "download", unreachable)
    out = tmp_path / "out"
    user_error(capsys, TINY + ["--data", shards, "--out-dir", out, "--hellaswag-every", "1"],
               "cannot download", "--hellaswag-data", "--hellaswag-every 0", out_dir=out)
    with pytest.raises(SystemExit):
        train(TINY + ["--data", shards, "--out-dir", out, "--hellaswag-every", "1"])
    assert " --data" not in capsys.readouterr().err


def test_a_folder_of_shard_folders_suggests_them(tmp_path, capsys):
    """--data data/shards when the shards sit in data/shards/shakespeare: the line names it."""
    write_shards(tmp_path / "shards" / "shakespeare")
    user_error(capsys, TINY + ["--data", tmp_path / "shards"], "holds no shards",
               str(tmp_path / "shards" / "shakespeare"))


def test_help_shows_the_presets_and_groups_the_modes(capsys):
    """--help: what each preset sets (cpu means 200 steps) and the three modes in one group."""
    with pytest.raises(SystemExit):
        gpt2.parse_args(["--help"])
    help_text = capsys.readouterr().out
    flat = " ".join(help_text.split())
    assert "optimizer steps; the cosine ends here (default: gpt2/gpt2-medium/gpt2-large/gpt2-xl " \
           "19073, cpu 200, cpu-tiny 100)" in flat
    modes = help_text[help_text.index("modes without training"):]
    assert all(flag in modes for flag in ("--sample ", "--eval-hellaswag", "--export-hf"))
    assert "--peak-tflops" not in modes


def test_restore_training_puts_every_part_back_or_names_the_flags(capsys):
    """A resume loads each part's state and the RNG, and returns the step; a state that does not
    fit is one line that names the run's own flags."""
    model, other = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    torch.manual_seed(3)
    checkpoint = {"model": model.state_dict(), "step": 7, "rng": gpt2.rng_state()}
    expected = torch.rand(2)
    assert gpt2.restore_training(checkpoint, "--seed", model=other) == 7
    assert torch.equal(other.weight, model.weight)
    assert torch.equal(torch.rand(2), expected)
    with pytest.raises(SystemExit) as exit_info:
        gpt2.restore_training({**checkpoint, "model": {}}, "--seed x", model=other)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot resume" in err[0] and "--seed x" in err[0], err



# --- per-token losses (--token-losses, --hardest)

def test_per_token_losses_come_from_the_same_pass():
    """Both training paths give each token's loss beside the mean: F.cross_entropy's, their mean
    the loss (the fused path's loss bit for bit what it is without them)."""
    model = tiny_model().train()
    x, y = torch.randint(0, VOCAB, (3, 7)), torch.randint(0, VOCAB, (3, 7))
    expected = F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten(), reduction="none")
    fused = gpt2.FusedLossGPT(model)
    fused.CHUNK = 5
    for path in (model, fused):
        _, loss, losses = path(x, y, per_token=True)
        assert losses.shape == (3, 7) and not losses.requires_grad
        torch.testing.assert_close(losses.flatten(), expected, atol=1e-5, rtol=1e-5)
        assert loss.item() == pytest.approx(losses.mean().item(), abs=1e-6)
    assert fused(x, y, per_token=True)[1].item() == fused(x, y)[1].item()


def test_token_losses_file_figure_and_hardest(tmp_path, shards, capsys):
    """--hardest 2: every training sequence's loss with its address (their mean per step is
    the logged train loss), each stretch of --eval-every steps' loss by position, the figure,
    and the two worst sequences of the last stretch printed as text; the training itself is
    the same as without tracking, and a resumed run's file equals an uninterrupted one's."""
    base = TINY + ["--data", shards, "--vocab-size", "50304", "--max-steps", "8", "--shuffle"]
    train(base + ["--out-dir", tmp_path / "plain"])
    capsys.readouterr()
    train(base + ["--out-dir", tmp_path / "tracked", "--hardest", "2"])
    printed = capsys.readouterr().out
    assert train_losses(tmp_path / "tracked") == train_losses(tmp_path / "plain")
    saved = np.load(tmp_path / "tracked" / "token_losses.npz")
    assert len(saved["loss"]) == 8 * 4  # 8 steps of 2 micro-steps of 2 sequences
    assert saved["position_loss"].shape == (3, 16)  # steps 0-2, 3-5, 6-7 by 16 positions
    assert list(saved["span_start"]) == [0, 3, 6]
    means = [saved["loss"][saved["step"] == s].mean() for s in range(8)]
    np.testing.assert_allclose(means, train_losses(tmp_path / "tracked"), rtol=1e-5)
    names = saved["shard_names"][saved["shard"]]
    assert all(name.startswith("test_train_") for name in names)
    assert set(saved["start"] % 16) == {0}
    assert (tmp_path / "tracked" / "position_loss.png").read_bytes()[:4] == b"\x89PNG"
    hardest = [line for line in printed.splitlines() if line.startswith("--- hardest")]
    assert len(hardest) == 2 and ("at step 6" in hardest[0] or "at step 7" in hardest[0])
    first, second = (float(line.split("loss ")[1].split()[0]) for line in hardest)
    last = saved["loss"][saved["step"] >= 6]
    assert first == pytest.approx(last.max(), abs=1e-4) and second <= first
    train(base + ["--out-dir", tmp_path / "split", "--token-losses", "--stop-step", "4"])
    train(base + ["--out-dir", tmp_path / "split", "--token-losses", "--resume"])
    split = np.load(tmp_path / "split" / "token_losses.npz")
    for key in ("step", "shard", "start", "loss", "position_loss"):
        np.testing.assert_array_equal(split[key], saved[key])
