"""bench.py: the project's benchmarks, one subcommand each; a printed table and one JSON line.

    python bench.py train        # training tokens/s (and MFU on GPU) of gpt2.py for a preset;
                                 # on CPU side by side with a straightforward reference
    python bench.py sample       # generation tokens/s with and without the KV cache
    python bench.py hellaswag --data ../shared/data/hellaswag_val.jsonl   # examples/s

`train` on CPU alternates gpt2.py's model and optimizer with a plain implementation of the same
math (reference_train_step below: the textbook GPT-2 module, F.cross_entropy on the full logits,
the default AdamW), round by round, so that both see the same machine load; both start from the
same weights and see the same batches, and the table shows that their losses agree. Every
subcommand is a pair add_arguments(parser) / run(args) -> dict in BENCHMARKS; adding one is
adding a line there.

Measured on 2 CPU cores shared with other jobs (load average ~5, so absolute numbers are several
times below a quiet machine's; the ratios are what counts), fp32, 4 layers, 4 heads, 256 wide,
vocabulary 50,304:
    python bench.py train --steps 3 --rounds 4   # micro-batch 8 x 256
        gpt2.py 242 tokens/s, reference 184 tokens/s: 1.31x (same first loss, 10.870085)
    python bench.py sample                       # 512 new tokens after a 16-token prompt
        KV cache 19.5 tokens/s, recomputation 3.6 tokens/s: 5.5x, greedy tokens identical
gpt2.py's edge in training: the fused linear + cross-entropy (LinearCrossEntropy) and the fused
CPU AdamW kernel; the rest is the same math in the same order.
"""
import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

import fineweb
import gpt2
import hellaswag


def die(message):
    print(f"bench.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def print_table(title, header, rows):
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    print(title)
    for row in [header, *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))


def add_model_arguments(parser, preset):
    parser.add_argument("--preset", choices=list(gpt2.PRESETS), default=None,
                        help=f"model shape (default: {preset} on CPU, gpt2 on CUDA)")
    parser.set_defaults(cpu_preset=preset)
    parser.add_argument("--n-layer", type=int, help="override the preset's blocks")
    parser.add_argument("--n-head", type=int, help="override the preset's heads")
    parser.add_argument("--n-embd", type=int, help="override the preset's width")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                        default="auto", help="autocast dtype, as in gpt2.py")
    parser.add_argument("--seed", type=int, default=1337, help="weights and batches")


def model_config(args, device, block_size=None):
    if args.preset is None:
        args.preset = "gpt2" if device.type == "cuda" else args.cpu_preset
    preset = gpt2.PRESETS[args.preset]
    values = {k: getattr(args, k) if getattr(args, k) is not None else preset[k]
              for k in ("n_layer", "n_head", "n_embd")}
    for key, value in values.items():
        if value <= 0:
            die(f"--{key.replace('_', '-')} must be a positive integer, got {value}")
    if values["n_embd"] % values["n_head"]:
        die(f"--n-embd {values['n_embd']} must be a multiple of --n-head {values['n_head']}")
    return gpt2.GPTConfig(block_size=block_size or preset["block_size"], vocab_size=50304,
                          **values)


# --- train: gpt2.py's training step against a straightforward one

class ReferenceAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))  # (B, T, C)


class ReferenceBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = ReferenceAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(config.n_embd, 4 * config.n_embd),
                                      c_proj=nn.Linear(4 * config.n_embd, config.n_embd)))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        h = F.gelu(self.mlp.c_fc(self.ln_2(x)), approximate="tanh")
        return x + self.mlp.c_proj(h)


class ReferenceGPT(nn.Module):
    """GPT-2 written the straightforward way: full logits, then F.cross_entropy. Same parameter
    names as gpt2.GPT, so it loads the same weights."""

    def __init__(self, config):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([ReferenceBlock(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd)))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, idx, targets):
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, V)
        return F.cross_entropy(logits.view(B * T, -1), targets.view(B * T))


def reference_optimizer(model, lr):
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def reference_train_step(model, optimizer, x, y):
    optimizer.zero_grad()
    loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()


def ours_train_step(model, optimizer, x, y, autocast):
    """gpt2.py's step with one micro-step: the same calls in the same order as its loop."""
    optimizer.zero_grad(set_to_none=True)
    with autocast:
        _, loss = model(x, y, return_logits=False)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()


def add_train_arguments(parser):
    add_model_arguments(parser, "cpu")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="micro-batch (default: 8 on CPU, 16 on CUDA)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per sequence (default: the preset's block size)")
    parser.add_argument("--steps", type=int, default=3,
                        help="timed optimizer steps per round and implementation (default: 3)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds; each times ours, then the reference (default: 3)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile ours (default: on with CUDA)")
    parser.add_argument("--reference", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the reference (default: on CPU)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="GPU peak for MFU (default: gpt2.py's table)")


def run_train(args):
    device = gpt2.pick_device(args.device)
    dtype = gpt2.pick_dtype(args.dtype, device)
    config = model_config(args, device)
    seq_len = args.seq_len or config.block_size
    if args.batch_size is None:
        args.batch_size = 16 if device.type == "cuda" else 8
    for name in ("batch_size", "steps", "rounds"):
        if getattr(args, name) <= 0:
            die(f"--{name.replace('_', '-')} must be a positive integer")
    if seq_len > config.block_size:
        die(f"--seq-len {seq_len} is longer than the block size {config.block_size}")
    use_compile = device.type == "cuda" if args.compile is None else args.compile
    with_reference = device.type == "cpu" if args.reference is None else args.reference
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    torch.manual_seed(args.seed)
    ours = gpt2.GPT(config).to(device)
    ours_opt = gpt2.make_optimizer(ours, 6e-4, 0.1, device)
    ours_fn = torch.compile(ours) if use_compile else ours
    if with_reference:
        reference = ReferenceGPT(config).to(device)
        reference.load_state_dict(ours.state_dict())
        reference_opt = reference_optimizer(reference, 6e-4)
    generator = torch.Generator().manual_seed(args.seed)
    batches = [torch.randint(0, 50257, (args.batch_size, seq_len + 1), generator=generator)
               for _ in range(args.steps)]
    batches = [(b[:, :-1].contiguous().to(device), b[:, 1:].contiguous().to(device))
               for b in batches]

    def timed(step_fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses = [step_fn(x, y) for x, y in batches]
        if device.type == "cuda":
            torch.cuda.synchronize()
        return args.batch_size * seq_len * len(batches) / (time.perf_counter() - t0), losses

    def step_ours(x, y):
        return ours_train_step(ours_fn, ours_opt, x, y, autocast)

    def step_reference(x, y):
        return reference_train_step(reference, reference_opt, x, y)

    # Untimed first steps: allocation, kernels' first use, compilation. They also show that
    # both implementations compute the same loss from the same weights and batch.
    first_ours = step_ours(*batches[0])
    first_reference = step_reference(*batches[0]) if with_reference else None
    rates = {"ours": [], "reference": []}
    for _ in range(args.rounds):
        rates["ours"].append(timed(step_ours)[0])
        if with_reference:
            rates["reference"].append(timed(step_reference)[0])
    ours_rate = statistics.median(rates["ours"])
    peak = args.peak_tflops or gpt2.gpu_peak_tflops(device)
    flops = gpt2.flops_per_token(config, seq_len)
    result = {"device": device_name(device), "dtype": str(dtype).removeprefix("torch."),
              "compile": use_compile, "config": asdict(config),
              "batch_size": args.batch_size, "seq_len": seq_len,
              "ours_tokens_per_s": round(ours_rate, 1),
              "ours_rounds": [round(r, 1) for r in rates["ours"]],
              "first_loss_ours": first_ours}
    rows = [["gpt2.py", f"{ours_rate:,.0f}", f"{1000 * args.batch_size * seq_len / ours_rate:.1f}",
             f"{first_ours:.6f}"]]
    if peak:
        result["mfu"] = flops * ours_rate / (peak * 1e12)
        rows[0].append(f"{100 * result['mfu']:.1f}%")
    if with_reference:
        ref_rate = statistics.median(rates["reference"])
        result.update(reference_tokens_per_s=round(ref_rate, 1),
                      reference_rounds=[round(r, 1) for r in rates["reference"]],
                      first_loss_reference=first_reference, speedup=ours_rate / ref_rate)
        rows.append(["reference", f"{ref_rate:,.0f}",
                     f"{1000 * args.batch_size * seq_len / ref_rate:.1f}",
                     f"{first_reference:.6f}"] + (["-"] if peak else []))
    header = ["implementation", "tokens/s", "ms/step", "first loss"] + (["MFU"] if peak else [])
    print_table(f"training, {config}, micro-batch {args.batch_size} x {seq_len}, "
                f"{args.rounds} rounds of {args.steps} steps (median), {result['device']}, "
                f"{result['dtype']}", header, rows)
    if with_reference:
        print(f"gpt2.py / reference: {result['speedup']:.2f}x")
    return result


# --- sample: the KV cache against recomputing the whole text for every token

def add_sample_arguments(parser):
    add_model_arguments(parser, "cpu")
    parser.add_argument("--new-tokens", type=int, default=512,
                        help="tokens to generate (default: %(default)s)")
    parser.add_argument("--prompt-tokens", type=int, default=16,
                        help="length of the random prompt (default: %(default)s)")
    parser.add_argument("--num-samples", type=int, default=1,
                        help="sequences generated together (default: %(default)s)")


def run_sample(args):
    device = gpt2.pick_device(args.device)
    dtype = gpt2.pick_dtype(args.dtype, device)
    for name in ("new_tokens", "prompt_tokens", "num_samples"):
        if getattr(args, name) <= 0:
            die(f"--{name.replace('_', '-')} must be a positive integer")
    # A block that holds prompt and continuation, so that the cache is used throughout.
    config = model_config(args, device)
    block = max(config.block_size, args.prompt_tokens + args.new_tokens)
    config = model_config(args, device, block_size=block)
    torch.manual_seed(args.seed)
    model = gpt2.GPT(config).to(device).eval()
    prompt = torch.randint(0, 50257, (args.num_samples, args.prompt_tokens), device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def timed(use_cache):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:  # greedy: both ways must give the same tokens
            out = model.generate(prompt, args.new_tokens, temperature=0, use_cache=use_cache)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return args.new_tokens * args.num_samples / (time.perf_counter() - t0), out

    timed(True)  # warm-up
    cached_rate, cached = timed(True)
    full_rate, full = timed(False)
    same = torch.equal(cached, full)
    result = {"device": device_name(device), "config": asdict(config),
              "new_tokens": args.new_tokens, "num_samples": args.num_samples,
              "kv_cache_tokens_per_s": round(cached_rate, 1),
              "recompute_tokens_per_s": round(full_rate, 1),
              "speedup": cached_rate / full_rate, "same_tokens": same}
    print_table(f"sampling {args.new_tokens} tokens x {args.num_samples}, {config}, "
                f"{result['device']}", ["method", "tokens/s"],
                [["KV cache", f"{cached_rate:,.1f}"], ["recompute", f"{full_rate:,.1f}"]])
    print(f"KV cache speed-up {result['speedup']:.1f}x; greedy tokens identical: {same}")
    return result


# --- hellaswag: examples/s of hellaswag.evaluate on a GPT

def add_hellaswag_arguments(parser):
    add_model_arguments(parser, "gpt2")
    parser.add_argument("--data", default=None,
                        help="local HellaSwag .jsonl (default: hellaswag.py's download)")
    parser.add_argument("--limit", type=int, default=100,
                        help="examples to score (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="hellaswag.evaluate's batch size (default: %(default)s)")
    parser.add_argument("--init-from", default=None,
                        help="weights (gpt2.py checkpoint, HF dir or name); default random: "
                             "the speed does not depend on them")


def run_hellaswag(args):
    device = gpt2.pick_device(args.device)
    dtype = gpt2.pick_dtype(args.dtype, device)
    if args.limit <= 0 or args.batch_size <= 0:
        die("--limit and --batch-size must be positive integers")
    try:
        examples = hellaswag.load_examples("val", path=args.data)[:args.limit]
    except hellaswag.DataError as err:
        die(f"HellaSwag: {err}; pass --data with a local hellaswag_val.jsonl")
    if args.init_from:
        model = gpt2.load_model_or_die(args.init_from, device)
    else:
        torch.manual_seed(args.seed)
        model = gpt2.GPT(model_config(args, device)).to(device).eval()
    enc = fineweb.get_encoding()
    kwargs = dict(device=device, enc=enc, batch_size=args.batch_size,
                  autocast_dtype=dtype if dtype != torch.float32 else None)
    hellaswag.evaluate(model, examples[:min(4, len(examples))], **kwargs)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    scores = hellaswag.evaluate(model, examples, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    result = {"device": device_name(device), "config": asdict(model.config),
              "examples": scores["n"], "seconds": round(seconds, 3),
              "examples_per_s": round(scores["n"] / seconds, 2), "acc_norm": scores["acc_norm"]}
    print_table(f"HellaSwag, {model.config}, {result['device']}",
                ["examples", "seconds", "examples/s", "acc_norm"],
                [[scores["n"], f"{seconds:.2f}", f"{result['examples_per_s']:.2f}",
                  f"{scores['acc_norm']:.4f}"]])
    return result


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


# name -> (add_arguments, run, help)
BENCHMARKS = {
    "train": (add_train_arguments, run_train,
              "training tokens/s (and MFU on GPU); on CPU against a straightforward reference"),
    "sample": (add_sample_arguments, run_sample,
               "generation tokens/s with and without the KV cache"),
    "hellaswag": (add_hellaswag_arguments, run_hellaswag,
                  "examples/s of hellaswag.evaluate"),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="The project's benchmarks.")
    parser.error = die
    subparsers = parser.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    for name, (add_arguments, run, help_text) in BENCHMARKS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.error = die
        add_arguments(sub)
        sub.set_defaults(run=run)
    return parser.parse_args(argv)


def main(args):
    print("command:", " ".join(["bench.py", *sys.argv[1:]]))
    print(f"python {platform.python_version()}, torch {torch.__version__}")
    result = {"bench": args.bench, **args.run(args)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(parse_args())
