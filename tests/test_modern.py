"""modern.py: RoPE is relative, Muon's update is orthogonal, each ablation flag changes only its
part, MoE routes to k experts and balances, MTP weighs nothing when off, the cache samples as a
full recompute, the fused soft-capped loss is the plain one, and a resume is exact."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gpt2
import modern
from conftest import ROOT, assert_user_error, run_script
from test_gpt2 import VOCAB, write_shards

TINY = ["--preset", "cpu-tiny", "--n-layer", "2", "--n-head", "2", "--n-embd", "32",
        "--vocab-size", str(VOCAB), "--seq-len", "16", "--batch-size", "2",
        "--total-batch-size", "64", "--max-steps", "6", "--warmup-steps", "2", "--eval-every", "3",
        "--eval-batches", "2", "--sample-every", "0", "--checkpoint-every", "0", "--device", "cpu"]


def tiny_args(*flags):
    return modern.parse_args([str(f) for f in TINY + list(flags)])


def tiny_model(*flags, seed=0, block=32):
    config = modern.model_config(tiny_args(*flags))
    torch.manual_seed(seed)
    return modern.ModernGPT(modern.ModernConfig(**{**config, "block_size": block})).eval()


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rope_is_relative():
    """Rotated queries and keys meet as a function of their distance alone: shifting every
    position by the same amount leaves the attention scores unchanged, while the positions do
    change them (a query against the same key at another distance scores differently)."""
    torch.manual_seed(0)
    T, hs = 12, 16
    cos, sin = modern.rotary_tables(64, hs)
    q, k = torch.randn(1, T, 2, hs), torch.randn(1, T, 2, hs)  # (B, T, nh, hs)

    def scores(start):
        c, s = cos[start:start + T], sin[start:start + T]
        rq, rk = modern.rotate(q, c, s), modern.rotate(k, c, s)
        return torch.einsum("bqhd,bkhd->bhqk", rq, rk)  # (B, nh, T, T)

    torch.testing.assert_close(scores(0), scores(37), atol=1e-4, rtol=1e-4)
    plain = torch.einsum("bqhd,bkhd->bhqk", q, k)
    assert (scores(0) - plain).abs().max() > 0.1  # the rotation is not the identity
    # A rotation keeps each vector's length: RoPE adds no scale of its own.
    torch.testing.assert_close(modern.rotate(q, cos[5:5 + T], sin[5:5 + T]).norm(dim=-1),
                               q.norm(dim=-1))


def test_muon_update_is_orthogonal():
    """Muon's step moves a matrix by lr * sqrt(rows/cols) times an (approximately) orthogonal
    matrix, whatever the gradient's spread of singular values; plain momentum would not."""
    torch.manual_seed(0)
    rows, cols = 48, 16
    # A gradient whose singular values span two orders of magnitude (five Newton-Schulz steps
    # lift a value from 1/300 of the largest to ~1; smaller ones need more steps).
    u, _ = torch.linalg.qr(torch.randn(rows, cols))
    v, _ = torch.linalg.qr(torch.randn(cols, cols))
    grad = u @ torch.diag(torch.logspace(0, -2, cols)) @ v.T  # (rows, cols)
    p = torch.nn.Parameter(torch.randn(rows, cols))
    before = p.detach().clone()
    opt = modern.Muon([p], lr=0.1, momentum=0.95)
    p.grad = grad.clone()
    opt.step()
    update = (before - p.detach()) / (0.1 * (rows / cols) ** 0.5)
    s = torch.linalg.svdvals(update)
    assert s.min() > 0.6 and s.max() < 1.25, s  # the quintic lands every value in ~[0.7, 1.2]
    assert torch.linalg.svdvals(grad).max() / torch.linalg.svdvals(grad).min() > 50
    # It points where U V^T of the gradient points.
    polar = u @ v.T
    cosine = (update * polar).sum() / (update.norm() * polar.norm())
    assert cosine > 0.95


FLAGS = {  # flag: (config field, state-dict keys it adds (+) or removes (-))
    "--no-rope": ("rope", {"+transformer.wpe.weight"}),
    "--no-rmsnorm": ("rmsnorm", {"+transformer.ln_f.ln.weight", "+transformer.ln_f.ln.bias",
                                 "+transformer.h.0.ln_1.ln.weight"}),
    "--no-qk-norm": ("qk_norm", set()),
    "--no-relu2": ("relu2", set()),
    "--no-bias-free": ("bias_free", {"+transformer.h.0.attn.c_attn.bias",
                                     "+transformer.h.1.mlp.c_proj.bias"}),
    "--no-untied": ("untied", set()),
    "--no-zero-init": ("zero_init", set()),
    "--softcap=0": ("softcap", set()),
}


@pytest.mark.parametrize("flag", list(FLAGS))
def test_each_ablation_flag_changes_only_its_part(flag):
    """Each --no-X flag changes one field of the config, adds or removes only its own weights,
    and, with every shared weight the same, changes the model's output."""
    field, keys = FLAGS[flag]
    base, ablated = modern.model_config(tiny_args()), modern.model_config(tiny_args(flag))
    assert {k for k in base if base[k] != ablated[k]} == {field}
    a, b = tiny_model(), tiny_model(flag)
    added = {f"+{k}" for k in set(b.state_dict()) - set(a.state_dict())}
    removed = {f"-{k}" for k in set(a.state_dict()) - set(b.state_dict())}
    assert keys <= added | removed and all(k[1:].startswith("transformer.") for k in added)
    assert not removed
    if flag == "--no-untied":
        assert b.lm_head.weight is b.transformer.wte.weight
        assert a.lm_head.weight is not a.transformer.wte.weight
    if flag == "--no-zero-init":  # zero-init: exactly the output projections and the head
        zeros = {n for n, p in a.named_parameters() if p.dim() == 2 and not p.any()}
        assert zeros == {n for n, _ in a.named_parameters()
                         if n.endswith("c_proj.weight") or n == "lm_head.weight"}
        assert not any(not p.any() for p in b.parameters() if p.dim() == 2)
    # Same weights where both have them (non-zero everywhere, so that every part acts).
    torch.manual_seed(1)
    with torch.no_grad():
        for p in a.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    b.load_state_dict(a.state_dict(), strict=False)
    with torch.no_grad():  # the weights only b has (biases, wpe, LayerNorm's) act as well
        for name, p in b.named_parameters():
            if f"+{name}" in added:
                p.copy_(torch.randn_like(p) * 0.3)
    x = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        la, lb = a(x)[0], b(x)[0]
    if flag in ("--no-zero-init", "--no-untied"):  # their part is the weights themselves
        return
    assert (la - lb).abs().max() > 1e-3, flag
    if flag == "--softcap=0":  # the same logits, uncapped
        cap = a.config.softcap
        torch.testing.assert_close(la, cap * torch.tanh(lb / cap), atol=1e-5, rtol=1e-5)


def test_no_muon_gives_the_block_matrices_to_adamw():
    """--muon: Muon holds every matrix inside the blocks and nothing else; --no-muon: AdamW
    holds them, with weight decay, at --adam-lr."""
    model = tiny_model()
    blocks = {id(p) for p in model.transformer.h.parameters()}
    for flag in ([], ["--no-muon"]):
        args = tiny_args(*flag)
        opt = modern.configure_optimizer(model, args, torch.device("cpu"))
        kinds = {type(o).__name__: {id(p) for g in o.param_groups for p in g["params"]}
                 for o in opt.optimizers}
        assert sum(map(len, kinds.values())) == len(list(model.parameters()))
        if not flag:
            assert kinds["Muon"] == blocks
        else:
            assert "Muon" not in kinds
            group = next(g for g in opt.param_groups if {id(p) for p in g["params"]} == blocks)
            assert group["weight_decay"] == 0.1
            assert group["lr_scale"] * args.lr == pytest.approx(args.adam_lr)


def test_moe_routes_every_token_to_k_experts_and_balances_the_load():
    """Each token goes to exactly k distinct routed experts (plus the shared one), with weights
    that sum to 1, and the layer's output is that weighted sum; after steps on a router that
    favours a few experts, the biases of the busy ones fall, the idle ones rise, and the load
    evens out."""
    model = tiny_model("--moe", "--n-experts", 6, "--active-experts", 2)
    moe = model.transformer.h[0].mlp
    torch.manual_seed(0)
    x = torch.randn(3, 20, 32)
    flat = x.view(-1, 32)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
        chosen, gates = moe.route(flat)
        assert chosen.shape == (60, 2)
        assert all(len(set(row)) == 2 for row in chosen.tolist())
        torch.testing.assert_close(gates.sum(1), torch.ones(60))
        expected = moe.shared(flat) + sum(
            gates[:, j, None] * torch.stack([moe.experts[e](flat[i]) for i, e in
                                             enumerate(chosen[:, j].tolist())])
            for j in range(2))
        torch.testing.assert_close(moe(x).view(-1, 32), expected, atol=1e-5, rtol=1e-4)
        moe.router.weight[:2] += 2.0 * flat.mean(0)  # experts 0 and 1 attract most tokens
    shares = []
    for _ in range(30):
        bias = moe.balance_bias.clone()
        with torch.enable_grad():
            moe(x)  # a training pass counts the load
        share = moe.balance(rate=0.05)
        shares.append(share.max().item())
        moved = moe.balance_bias - bias
        assert torch.all(moved[share > 1 / 6] < 0) and torch.all(moved[share < 1 / 6] > 0)
    assert shares[0] > 0.3 and max(shares[-5:]) < 0.25, shares  # even: 1/6
    with torch.no_grad():  # evaluation does not count
        moe(x)
    assert moe.load is None


def test_mtp_adds_nothing_when_off_and_only_its_weight_when_on():
    """Without --mtp the training loss is the next-token loss; with --mtp it adds mtp_weight
    times the second-token loss, so weight 0 changes nothing (nor any gradient); the val loss
    (forward) never includes it."""
    x = torch.randint(0, VOCAB, (2, 12))
    y = torch.randint(0, VOCAB, (2, 12))
    plain = tiny_model()
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    assert modern.TrainingLoss(plain, fused=False)(x, y)[1].item() == pytest.approx(
        plain(x, y)[1].item(), abs=1e-6)
    mtp = tiny_model("--mtp")
    mtp.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        for p in mtp.mtp.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    main = mtp(x, y)[1]
    torch.testing.assert_close(main, plain(x, y)[1])  # the val loss: no MTP in it
    h = mtp.hidden_states(x)
    second = F.cross_entropy(mtp.lm_head(mtp.mtp(h[:, :-1], mtp.transformer.wte(y[:, :-1]),
                                                 mtp.rotary(0, 11))).flatten(0, 1),
                             y[:, 1:].flatten())
    loss = modern.TrainingLoss(mtp, fused=False)(x, y)[1]
    assert loss.item() == pytest.approx(main.item() + 0.3 * second.item(), rel=1e-5)
    mtp.config.mtp_weight = 0.0
    loss = modern.TrainingLoss(mtp, fused=False)(x, y)[1]
    assert loss.item() == pytest.approx(main.item(), abs=1e-6)
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in mtp.mtp.parameters())


@pytest.mark.parametrize("flags", [[], ["--moe", "--mtp", "--no-rope"]], ids=["rope", "others"])
def test_kv_cache_generation_equals_full_recomputation(flags):
    """Greedy tokens with gpt2.py's KV cache (rotary positions offset by the cache's length)
    equal recomputing the whole text each step, also past the block size."""
    model = tiny_model(*flags, block=24)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    prompt = torch.randint(0, VOCAB, (2, 5))
    cached = model.generate(prompt, 30, temperature=0, use_cache=True)
    full = model.generate(prompt, 30, temperature=0, use_cache=False)
    assert cached.shape == (2, 35) and torch.equal(cached, full)
    cache = gpt2.KVCache(model.config.n_layer, model.config.block_size)
    seq = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        steps = [model.hidden_states(seq[:, :4], cache)[:, -1]]
        steps += [model.hidden_states(seq[:, t:t + 1], cache)[:, -1] for t in range(4, 10)]
        torch.testing.assert_close(torch.cat(steps), model.hidden_states(seq)[0, 3:],
                                   atol=1e-5, rtol=1e-5)


def test_fused_soft_capped_loss_equals_the_plain_path():
    """The CPU training path (gpt2.py's chunked loss with the cap) gives the plain path's loss,
    per-token losses and gradients."""
    model = tiny_model().train()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 2.0)  # logits well past the cap
    x, y = torch.randint(0, VOCAB, (3, 7)), torch.randint(0, VOCAB, (3, 7))
    grads = []
    for fused in (True, False):
        model.zero_grad()
        _, loss, losses = modern.TrainingLoss(model, fused)(x, y, per_token=True)
        loss.backward()
        grads.append((loss.item(), losses, [p.grad.clone() for p in model.parameters()]))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads[0][2], grads[1][2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_resume_is_exact_and_samples_from_the_checkpoint(tmp_path, capsys):
    """8 steps in one go log the same losses, expert loads and token losses as 4, a stop and a
    resumed 4 (Muon's and AdamW's states, the experts' biases, the tracker); --sample then reads
    the checkpoint."""
    shards = write_shards(tmp_path / "shards")
    common = TINY + ["--data", shards, "--max-steps", "8", "--shuffle", "--moe", "--mtp",
                     "--token-losses", "--balance-rate", "0.01"]
    modern.main(modern.parse_args([str(a) for a in common + ["--out-dir", tmp_path / "whole"]]))
    modern.main(modern.parse_args([str(a) for a in common + ["--out-dir", tmp_path / "split",
                                                             "--stop-step", "4"]]))
    modern.main(modern.parse_args([str(a) for a in common + ["--out-dir", tmp_path / "split",
                                                             "--resume"]]))
    whole, split = read_log(tmp_path / "whole" / "log.jsonl"), read_log(tmp_path / "split" /
                                                                        "log.jsonl")
    key = lambda r: (r["step"], r.get("train_loss"), r.get("val_loss"),  # noqa: E731
                     r.get("expert_load"))
    assert [key(r) for r in split] == [key(r) for r in whole]
    assert any(r.get("expert_load") for r in whole)
    a, b = (np.load(tmp_path / d / "token_losses.npz") for d in ("whole", "split"))
    for name in ("step", "shard", "start", "loss", "position_loss"):
        np.testing.assert_array_equal(a[name], b[name])
    capsys.readouterr()
    result = modern.main(modern.parse_args([str(a) for a in TINY + [
        "--sample", "--init-from", tmp_path / "whole", "--prompt", "!", "--num-samples", "1",
        "--sample-tokens", "4", "--vocab-size", "256"]]))
    assert len(result["samples"]) == 1
    assert "--- sample 0:" in capsys.readouterr().out



@pytest.mark.slow
def test_moe_under_torchrun_with_idle_experts_equals_one_process(tmp_path):
    """--moe over 2 gloo ranks, with 64 experts and one per token, so that most experts get no
    token on a rank (DDP expects a gradient for every parameter): the run ends, and logs one
    process's losses and expert loads (Muon, the balancing biases and all) to float tolerance."""
    shards = write_shards(tmp_path / "shards")
    flags = TINY + ["--data", shards, "--max-steps", "4", "--eval-every", "2", "--moe",
                    "--n-experts", "64", "--active-experts", "1", "--balance-rate", "0.01"]
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "modern.py"), *map(str, flags + ["--out-dir", tmp_path / "ddp"])],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=240)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 rank(s), 1 micro-step(s)" in ddp.stdout
    modern.main(modern.parse_args([str(a) for a in flags + ["--out-dir", tmp_path / "one",
                                                           "--eval-batches", "4"]]))
    a, b = (read_log(tmp_path / d / "log.jsonl") for d in ("ddp", "one"))
    for key in ("train_loss", "val_loss"):
        np.testing.assert_allclose([r[key] for r in a if key in r], [r[key] for r in b if key in r],
                                   atol=1e-5, rtol=0)
    loads = [[r["expert_load"] for r in log if "expert_load" in r] for log in (a, b)]
    assert loads[0] == loads[1] and min(loads[0][0][0]) == 0  # idle experts, the same counts


@pytest.mark.slow
# torch.compile imports torch/utils/mkldnn.py, whose 14 @torch.jit.script_method warn: torch's own
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compile_trains_like_eager(tmp_path):
    """--compile: the same losses as eager to float tolerance, with every modern change on
    (RoPE, QK-norm, ReLU², soft-cap, Muon), MoE's data-dependent routing and MTP's block."""
    shards = write_shards(tmp_path / "shards")
    common = TINY + ["--data", shards, "--max-steps", "3", "--eval-every", "2", "--moe", "--mtp"]
    logs = []
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        modern.main(modern.parse_args([str(a) for a in common + extra + ["--out-dir",
                                                                         tmp_path / name]]))
        logs.append(read_log(tmp_path / name / "log.jsonl"))
    metrics = json.loads((tmp_path / "compiled" / "metrics.json").read_text())
    assert metrics["compile"] is True
    for key in ("train_loss", "val_loss"):
        np.testing.assert_allclose(*([r[key] for r in log if key in r] for log in logs),
                                   atol=1e-4, rtol=0)

def test_mistakes_are_one_line(tmp_path, capsys):
    """A user's mistake: one line, exit 2 (a gpt2.py checkpoint is not a modern.py one)."""
    shards = write_shards(tmp_path / "shards")
    checkpoint = tmp_path / "gpt2.pt"
    torch.save({"stage": "gpt2", "model": {}, "config": {}}, checkpoint)
    base = TINY + ["--data", shards, "--out-dir", tmp_path / "o"]
    for argv, words in ((base + ["--moe", "--active-experts", "9"], "--active-experts"),
                        (base + ["--n-embd", "30", "--n-head", "2"], "even"),
                        (["--sample", "--init-from", checkpoint], "not written by modern.py")):
        with pytest.raises(SystemExit) as exit_info:
            modern.main(modern.parse_args([str(a) for a in argv]))
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "o").exists()


def test_user_error_from_the_command_line(tmp_path):
    """As a user sees it: one line on stderr, exit 2, no traceback."""
    result = run_script("modern.py", "--data", tmp_path / "nowhere", "--preset", "cpu-tiny",
                        "--out-dir", tmp_path / "o")
    assert_user_error(result, "fineweb.py")


# --- on a CUDA GPU (python -m pytest -m gpu): the paths a CPU never takes

def on_the_gpu(*flags):
    """TINY on cuda, a little longer, with GPT-2's vocabulary over shards of 1,000 tokens: the
    zero-initialised head starts at ln(50,304), so the loss has room to fall."""
    argv = [str(f) for f in TINY + ["--max-steps", "30", "--warmup-steps", "5",
                                    "--eval-every", "10", "--seq-len", "32", "--batch-size", "8",
                                    "--total-batch-size", "512", *flags]]
    argv[argv.index("--device") + 1] = "cuda"
    argv[argv.index("--vocab-size") + 1] = "50304"
    return argv


def gpu_shards(tmp_path):
    return write_shards(tmp_path / "shards", sizes=(20000, 30000, 30000), vocab=1000)


@pytest.mark.gpu
def test_on_a_gpu_every_change_with_moe_and_mtp_trains_in_bf16_compiled(tmp_path):
    """`python modern.py` on CUDA with its defaults there (bf16 autocast, torch.compile, Muon's
    Newton-Schulz in bf16) and --moe --mtp: the loss falls, the experts' load is logged, and
    --sample reads the checkpoint on the GPU."""
    out = tmp_path / "out"
    result = run_script("modern.py", *on_the_gpu("--data", gpu_shards(tmp_path), "--out-dir",
                                                 out, "--moe", "--mtp"), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["device"] == "cuda:0" and metrics["compile"] is True
    ampere = torch.cuda.get_device_capability()[0] >= 8  # not is_bf16_supported(): emulated
    assert metrics["dtype"] == ("bfloat16" if ampere else "float16")
    log = read_log(out / "log.jsonl")
    losses = [r["train_loss"] for r in log if "train_loss" in r]
    assert len(losses) == 30 and np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3
    loads = [r["expert_load"] for r in log if "expert_load" in r]
    assert len(loads) == 30 and all(sum(layer) > 0 for layer in loads[-1])
    sampled = run_script("modern.py", "--sample", "--init-from", out, "--prompt", "Hello",
                         "--num-samples", "2", "--sample-tokens", "20", "--device", "cuda")
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert sampled.stdout.count("--- sample") == 2 and "device cuda:0" in sampled.stdout


@pytest.mark.gpu
def test_on_a_gpu_torchrun_one_process_nccl_with_moe(tmp_path):
    """Under torchrun with NCCL: DDP over the Muon and AdamW groups and the routed experts."""
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
         str(ROOT / "modern.py"), *on_the_gpu("--data", gpu_shards(tmp_path), "--out-dir", out,
                                              "--moe", "--max-steps", "10")],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 rank(s)" in result.stdout
    losses = [r["train_loss"] for r in read_log(out / "log.jsonl") if "train_loss" in r]
    assert len(losses) == 10 and losses[-1] < losses[0]


@pytest.mark.gpu
def test_on_a_gpu_muon_orthogonalises_in_bf16():
    """On CUDA the Newton-Schulz iteration runs in bf16: the update is still near-orthogonal
    and points along U V^T of the gradient, and the weight keeps its own dtype."""
    torch.manual_seed(0)
    rows, cols = 768, 3072  # the 124M shape's MLP matrix, wide
    u, _ = torch.linalg.qr(torch.randn(rows, rows))
    v, _ = torch.linalg.qr(torch.randn(cols, rows))
    # Singular values over one order of magnitude: with 768 of them the Frobenius norm that the
    # iteration divides by is ~13x the largest, so the smallest start near 1/130.
    grad = (u @ torch.diag(torch.logspace(0, -1, rows)) @ v.T).cuda()  # (rows, cols)
    update = modern.orthogonalize(grad)
    assert update.dtype == torch.float32 and update.is_cuda
    s = torch.linalg.svdvals(update.float())
    assert s.min() > 0.55 and s.max() < 1.3, (s.min(), s.max())  # bf16 on a CPU: 0.68, 1.14
    polar = (u @ v.T).cuda()
    assert (update * polar).sum() / (update.norm() * polar.norm()) > 0.9


@pytest.mark.gpu
@pytest.mark.parametrize("flags", [[], ["--moe", "--mtp", "--no-rope"]], ids=["rope", "others"])
def test_on_a_gpu_kv_cache_generation_equals_full_recomputation_in_fp32(flags):
    model = tiny_model(*flags, block=24).cuda()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    prompt = torch.randint(0, VOCAB, (2, 5), device="cuda")
    with gpt2.variable_length_attention():
        cached = model.generate(prompt, 30, temperature=0, use_cache=True)  # past the block
        full = model.generate(prompt, 30, temperature=0, use_cache=False)
    assert torch.equal(cached, full)
