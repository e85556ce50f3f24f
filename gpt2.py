"""Stage 6: GPT-2 (124M), pre-trained on FineWeb-Edu, from one CPU to many GPUs.

transformer.py trained a character-level GPT on one small text on one device. This stage is the
same model grown to GPT-2 ("Language Models are Unsupervised Multitask Learners", Radford et
al., 2019) and trained the way GPT-2-sized models are trained (the recipe of the GPT-3 paper,
Brown et al., 2020): GPT-2's BPE tokens (50,257, padded to 50,304 so the matmuls tile well),
token shards of FineWeb-Edu read from disk (fineweb.py writes them), GPT-2's initialisation,
AdamW with decay on matrices only, warmup then cosine, a 524,288-token batch reached by gradient
accumulation, bf16 autocast, torch.compile, data-parallel training on many GPUs (DDP),
checkpoints that resume exactly, HellaSwag during training (hellaswag.py), a KV cache for
sampling, and import/export of Hugging Face GPT-2 weights.

Run (CPU quick start: Shakespeare, a small model, a few minutes; the loss falls from ~10.8):
    python fineweb.py --dataset data/shakespeare.txt --out-dir data/shards/shakespeare \\
        --shard-size 50000
    python gpt2.py --preset cpu --data data/shards/shakespeare
    python gpt2.py --sample --init-from out/gpt2/checkpoint.pt --prompt "ROMEO:"
One GPU (GPT-2 124M on FineWeb-Edu 10B tokens; gradient accumulation reaches 524,288 tokens):
    python fineweb.py --streaming          # the 10B-token sample -> data/shards (~20 GB)
    python gpt2.py
Eight GPUs on one machine (about 2 hours on 8xA100 80GB for the 19,073 steps = 10B tokens):
    torchrun --standalone --nproc_per_node=8 gpt2.py
Two machines of 8 GPUs (run the same line on both; HOST is the first machine's address):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        --rdzv_id=gpt2 gpt2.py --batch-size 32 --data /shared/shards --out-dir /shared/out/gpt2
(16 ranks x 32 x 1,024 tokens = the 524,288-token batch in one micro-step; every rank reads the
shards, and on --resume the checkpoint, so both live where all machines see them; only rank 0
writes).
After a preemption, the same command with --resume continues exactly where the last checkpoint
stopped. Other modes:
    python gpt2.py --sample --init-from gpt2 --prompt "Hello, I'm a language model,"
    python gpt2.py --init-from out/gpt2/checkpoint.pt --export-hf out/gpt2-hf   # for HF tools

Reference results (OpenAI GPT-2 124M, and the reproduction this stage follows, 10B tokens of
FineWeb-Edu in about 2 hours on 8xA100): HellaSwag acc_norm 0.2955 (OpenAI) and 0.3009
(reproduction); FineWeb-Edu val loss 3.2924 (OpenAI), min val loss 3.0944 (reproduction).
Measured here on a quiet 2-core CPU: the quick start above (359,202 tokens of Shakespeare; 200
steps of 2,048 tokens) takes 268 s at about 1,650 tokens/s, train loss 10.81 -> 5.65, val loss
10.82 -> 6.19. `python bench.py train`: 1.27x the training tokens/s of a straightforward
implementation of the same math (1,704 vs 1,346); `python bench.py sample`: the KV cache
generates 512 tokens 13.7x faster than recomputing the whole sequence through model(idx) each
step. Not yet measured on a GPU.

Outputs in --out-dir (default out/gpt2): log.jsonl (one object per step: step, train_loss, lr,
grad_norm, ms, tokens_per_s, mfu; one per evaluation: val_loss and/or hellaswag), metrics.json,
loss.png, checkpoint.pt (model, optimizer, step, config, loader position and RNG states).
"""
import argparse
import contextlib
import json
import math
import os
import pickle
import platform
import random
import signal
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import fineweb
import hellaswag

STAGE = "gpt2"

# Published reference points, drawn as lines on the figure.
REFERENCE_HELLASWAG = 0.2955  # OpenAI GPT-2 124M, acc_norm with hellaswag.py's method
REFERENCE_VAL_LOSS = 3.2924  # OpenAI GPT-2 124M on the FineWeb-Edu val shard (public reproductions)

# The shape of the model and the training defaults that go with it; flags override any value.
# The four GPT-2 sizes train with the GPT-3 paper's recipe (0.5M-token batch, warmup, cosine to
# 10%, 10B tokens = 19,073 steps) and the paper's learning rate for the nearest size; their
# micro-batches fit an 80 GB GPU (lower --batch-size on smaller cards: accumulation keeps the
# total batch). The cpu presets are for learning on a laptop: a few minutes, the loss visibly
# falling, samples that start to look like the text.
GPU_RECIPE = dict(block_size=1024, total_batch_size=524288, max_steps=19073, warmup_steps=715,
                  eval_every=250, val_batches=20, hellaswag_every=250, sample_every=250,
                  checkpoint_every=1000)
PRESETS = {
    "gpt2": dict(GPU_RECIPE, n_layer=12, n_head=12, n_embd=768, batch_size=64, lr=6e-4),
    "gpt2-medium": dict(GPU_RECIPE, n_layer=24, n_head=16, n_embd=1024, batch_size=32, lr=3e-4),
    "gpt2-large": dict(GPU_RECIPE, n_layer=36, n_head=20, n_embd=1280, batch_size=16, lr=2.5e-4),
    "gpt2-xl": dict(GPU_RECIPE, n_layer=48, n_head=25, n_embd=1600, batch_size=8, lr=2e-4),
    "cpu": dict(n_layer=4, n_head=4, n_embd=256, block_size=256, batch_size=8,
                total_batch_size=2048, max_steps=200, warmup_steps=20, lr=2e-3, eval_every=50,
                val_batches=4, hellaswag_every=0, sample_every=100, checkpoint_every=100),
    "cpu-tiny": dict(n_layer=2, n_head=2, n_embd=128, block_size=128, batch_size=8,
                     total_batch_size=1024, max_steps=100, warmup_steps=10, lr=3e-3,
                     eval_every=25, val_batches=4, hellaswag_every=0, sample_every=50,
                     checkpoint_every=50),
}
HF_NAMES = {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"}  # OpenAI's weights on the HF hub

# Dense bf16 tensor-core peak in TFLOP/s per GPU (fp16 for cards without bf16), from the vendors'
# data sheets; the first name that occurs in torch.cuda.get_device_name() wins, so the more
# specific names come first. Unknown cards get no MFU unless --peak-tflops is given.
GPU_PEAK_TFLOPS = [
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0),
    ("H100", 989.0), ("H800", 989.0), ("B200", 2250.0), ("B100", 1750.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("A10G", 70.0), ("A10", 125.0), ("A6000", 155.0), ("RTX 6000 Ada", 364.0),
    ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("V100", 125.0), ("T4", 65.0),
]

SHARD_HINT = ("make shards with fineweb.py, e.g. `python fineweb.py --dataset data/shakespeare.txt "
              "--out-dir data/shards/shakespeare --shard-size 50000` (any local text) or "
              "`python fineweb.py --streaming` (FineWeb-Edu into data/shards)")


def die(message):
    # Under torchrun every rank checks the same inputs; one copy of the message is enough.
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{STAGE}.py: error: {message}", file=sys.stderr)
    sys.exit(2)


# --- config

def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Pre-train GPT-2 on token shards (python or torchrun); --sample generates "
                    "text, --export-hf writes Hugging Face weights.")
    parser.error = die
    parser.add_argument("--preset", choices=list(PRESETS), default="gpt2",
                        help="model size and training defaults: gpt2 (124M), gpt2-medium, "
                             "gpt2-large, gpt2-xl, or cpu / cpu-tiny for a laptop; any flag "
                             "below overrides its preset value (default: %(default)s)")
    parser.add_argument("--data", type=Path, default=Path("data/shards"),
                        help="directory of fineweb.py's shards (*_train_*.npy, *_val_*.npy) "
                             "(default: %(default)s)")
    parser.add_argument("--out-dir", type=Path, default=Path("out") / STAGE,
                        help="where log.jsonl, metrics.json, loss.png and checkpoint.pt go "
                             "(default: %(default)s)")
    parser.add_argument("--device", default="auto",
                        help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps; under "
                             "torchrun each rank takes cuda:LOCAL_RANK")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                        default="auto",
                        help="autocast dtype; auto = bfloat16 on GPUs that have it, float16 with "
                             "a gradient scaler on older GPUs (V100, T4), float32 elsewhere")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the training model (default: on with CUDA)")
    parser.add_argument("--seed", type=int, default=1337,
                        help="seed of the initial weights, the shuffling and the samples")
    group = parser.add_argument_group("model (default: the preset's value)")
    group.add_argument("--n-layer", type=int, help="Transformer blocks")
    group.add_argument("--n-head", type=int, help="attention heads per block")
    group.add_argument("--n-embd", type=int, help="width of the residual stream")
    group.add_argument("--block-size", type=int, help="longest context the model can take")
    group.add_argument("--vocab-size", type=int, default=50304,
                       help="rows of the embedding; GPT-2's 50,257 tokens padded to a multiple "
                            "of 64 (default: %(default)s)")
    group.add_argument("--init-from", default=None,
                       help="start from these weights instead of random ones: gpt2, "
                            "gpt2-medium, gpt2-large, gpt2-xl (Hugging Face hub), a Hugging Face "
                            "directory, or a gpt2.py checkpoint.pt")
    group = parser.add_argument_group("training (default: the preset's value)")
    group.add_argument("--batch-size", type=int,
                       help="micro-batch: sequences per forward pass on each rank")
    group.add_argument("--seq-len", type=int, help="tokens per sequence (default: block size)")
    group.add_argument("--total-batch-size", type=int,
                       help="tokens per optimizer step, over all ranks and micro-steps; must be "
                            "a multiple of batch-size x seq-len x ranks")
    group.add_argument("--max-steps", type=int,
                       help="optimizer steps; the cosine schedule ends here")
    group.add_argument("--stop-step", type=int, default=None,
                       help="stop (with a checkpoint) after this many steps without changing "
                            "the schedule, to split a run into jobs; --resume continues")
    group.add_argument("--warmup-steps", type=int, help="steps of linear warmup to --lr")
    group.add_argument("--lr", type=float, help="peak learning rate")
    group.add_argument("--min-lr-ratio", type=float, default=0.1,
                       help="the cosine ends at lr x this (default: %(default)s)")
    group.add_argument("--weight-decay", type=float, default=0.1,
                       help="AdamW weight decay of the matrices (default: %(default)s)")
    group.add_argument("--grad-clip", type=float, default=1.0,
                       help="clip the gradient's global norm to this (0 = off; "
                            "default: %(default)s)")
    group.add_argument("--shuffle", action="store_true",
                       help="visit shards and windows in a fresh order each epoch, from --seed")
    group.add_argument("--checkpoint-every", type=int,
                       help="steps between checkpoints (0 = only at the end)")
    group.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                       help="continue from a checkpoint (default: <out-dir>/checkpoint.pt)")
    group = parser.add_argument_group("evaluation and samples (default: the preset's value)")
    group.add_argument("--eval-every", type=int, help="steps between val losses (0 = off)")
    group.add_argument("--val-batches", type=int,
                       help="micro-batches per rank in each val loss; always the same ones")
    group.add_argument("--hellaswag-every", type=int,
                       help="steps between HellaSwag evaluations (0 = off)")
    group.add_argument("--hellaswag-data", type=Path, default=None,
                       help="local HellaSwag .jsonl (default: download the val split once)")
    group.add_argument("--hellaswag-limit", type=int, default=0,
                       help="score only the first N examples (0 = all 10,042)")
    group.add_argument("--sample-every", type=int, help="steps between samples (0 = off)")
    group.add_argument("--peak-tflops", type=float, default=None,
                       help="the GPU's peak TFLOP/s for MFU (default: from a table of GPUs)")
    group = parser.add_argument_group("sampling")
    group.add_argument("--sample", action="store_true",
                       help="do not train: generate from --init-from (default: "
                            "<out-dir>/checkpoint.pt)")
    group.add_argument("--prompt", default="Hello, I'm a language model,",
                       help="text the samples start from (default: %(default)r)")
    group.add_argument("--sample-tokens", type=int, default=32,
                       help="tokens to generate per sample (default: %(default)s)")
    group.add_argument("--num-samples", type=int, default=4,
                       help="samples to generate, split over ranks (default: %(default)s)")
    group.add_argument("--temperature", type=float, default=1.0,
                       help="divide the logits by this before sampling; 0 = greedy "
                            "(default: %(default)s)")
    group.add_argument("--top-k", type=int, default=50,
                       help="sample among the k likeliest tokens (0 = all; "
                            "default: %(default)s)")
    parser.add_argument("--export-hf", type=Path, default=None, metavar="DIR",
                        help="do not train: write --init-from (default: <out-dir>/"
                             "checkpoint.pt) as config.json + model.safetensors for "
                             "transformers' GPT2LMHeadModel")
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.seq_len is None:
        args.seq_len = args.block_size

    for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "batch_size",
                 "seq_len", "total_batch_size", "max_steps", "val_batches", "num_samples"):
        if getattr(args, name) <= 0:
            die(f"--{name.replace('_', '-')} must be a positive integer, "
                f"got {getattr(args, name)}")
    for name in ("warmup_steps", "eval_every", "hellaswag_every", "hellaswag_limit",
                 "sample_every", "checkpoint_every", "sample_tokens", "top_k"):
        if getattr(args, name) < 0:
            die(f"--{name.replace('_', '-')} must be 0 or positive, got {getattr(args, name)}")
    if args.stop_step is not None and args.stop_step <= 0:
        die(f"--stop-step must be a positive integer, got {args.stop_step}")
    if args.n_embd % args.n_head:
        die(f"--n-embd {args.n_embd} must be a multiple of --n-head {args.n_head} "
            "(each head gets n_embd / n_head channels)")
    if args.seq_len > args.block_size and args.init_from is None:
        die(f"--seq-len {args.seq_len} is longer than --block-size {args.block_size}; "
            "lower --seq-len or raise --block-size")
    for name, low, high in (("lr", 0.0, 10.0), ("min_lr_ratio", 0.0, 1.0),
                            ("weight_decay", 0.0, 10.0), ("grad_clip", 0.0, math.inf),
                            ("temperature", 0.0, 100.0)):
        value = getattr(args, name)
        if math.isnan(value) or not low <= value <= high or (name == "lr" and value == 0):
            die(f"--{name.replace('_', '-')} must be in [{low}, {high}]"
                f"{' and above 0' if name == 'lr' else ''}, got {value}")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        die(f"--peak-tflops must be a positive number, got {args.peak_tflops}")
    if args.sample and args.export_hf is not None:
        die("--sample and --export-hf are separate modes; give one of them")
    return args


def pick_device(name, local_rank=None):
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        die(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        die("--device cuda was asked for but CUDA is not available; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        die("--device mps was asked for but MPS is not available; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        die(f"unsupported --device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and local_rank is not None:
        device = torch.device("cuda", local_rank)  # torchrun: one GPU per process
    return device


def pick_dtype(name, device):
    """The autocast dtype: bf16 where the GPU has it natively (Ampere and newer), fp16 on older
    GPUs (it needs a gradient scaler), fp32 on CPU and MPS unless asked for."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    if name == "float16" and device.type != "cuda":
        die("--dtype float16 needs a CUDA GPU (it trains with a gradient scaler); "
            "use --dtype bfloat16 or float32")
    return getattr(torch, name)


# --- data

def find_shards(data_dir, split):
    return sorted(Path(data_dir).glob(f"*_{split}_*.npy"))


def open_shards(data_dir, split, window):
    """Memory-mapped uint16 token arrays of one split; a missing, malformed or too-short shard
    ends the run with a line that says how to make shards. `window` is the number of tokens one
    batch window needs."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        die(f"--data {data_dir} is not a directory of shards; {SHARD_HINT}")
    paths = find_shards(data_dir, split)
    if not paths:
        die(f"no {split} shards (*_{split}_*.npy) in {data_dir}; {SHARD_HINT}")
    shards = []
    for path in paths:
        try:
            tokens = np.load(path, mmap_mode="r")  # pages come from disk when read, not now
        except (OSError, ValueError) as err:
            die(f"shard {path} is not a readable .npy file ({err}); {SHARD_HINT}")
        if tokens.dtype != np.uint16 or tokens.ndim != 1:
            die(f"shard {path} holds {tokens.dtype} of shape {tokens.shape}, not a 1-D uint16 "
                f"token array; {SHARD_HINT}")
        if len(tokens) < window:
            die(f"shard {path} has {len(tokens):,} tokens, fewer than one batch window of "
                f"{window:,} (batch-size x seq-len x ranks + 1); lower --batch-size or "
                f"--seq-len, or make longer shards: {SHARD_HINT}")
        shards.append(tokens)
    return shards


class ShardLoader:
    """Batches of B sequences of T tokens from a split's shards, for rank `rank` of
    `world_size`. A window of B*T*world_size + 1 consecutive tokens feeds one micro-step of all
    ranks: rank r reads its own contiguous slice of it (inputs, and the same slice shifted by
    one as targets). Windows tile each shard from its start; the tail that cannot fill a window
    is left, and the next window starts on the next shard. After the last shard an epoch ends.
    With shuffle, each epoch visits the shards, and the windows of each shard, in an order drawn
    from (seed, epoch): reproducible, and so resumable from (epoch, shard, offset) alone."""

    def __init__(self, shards, batch_size, seq_len, rank=0, world_size=1, shuffle=False,
                 seed=0):
        self.shards = shards
        self.B, self.T = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.stride = batch_size * seq_len * world_size  # tokens consumed per window
        self.reset()

    def reset(self):
        self.epoch, self.shard, self.offset = 0, 0, 0  # offset: windows done in this shard
        self._plan()

    def _plan(self):
        """The shard order of this epoch, and the window order of the current shard."""
        n = len(self.shards)
        if self.shuffle:
            self.order = np.random.default_rng([self.seed, self.epoch]).permutation(n)
        else:
            self.order = np.arange(n)
        shard_id = int(self.order[self.shard])
        n_windows = (len(self.shards[shard_id]) - 1) // self.stride
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, shard_id])
            self.windows = rng.permutation(n_windows)
        else:
            self.windows = np.arange(n_windows)

    def next_batch(self):
        shard_id = int(self.order[self.shard])
        start = int(self.windows[self.offset]) * self.stride + self.rank * self.B * self.T
        chunk = self.shards[shard_id][start:start + self.B * self.T + 1]  # (B*T+1,) uint16
        buf = torch.from_numpy(chunk.astype(np.int64))  # a copy: the memory map stays read-only
        x = buf[:-1].view(self.B, self.T)  # (B, T) inputs
        y = buf[1:].view(self.B, self.T)  # (B, T) targets: the next token at every position
        self.offset += 1
        if self.offset == len(self.windows):
            self.offset = 0
            self.shard += 1
            if self.shard == len(self.shards):
                self.shard = 0
                self.epoch += 1
            self._plan()
        return x, y

    def state_dict(self):
        return {"epoch": self.epoch, "shard": self.shard, "offset": self.offset,
                "batch_size": self.B, "seq_len": self.T, "world_size": self.world_size,
                "shuffle": self.shuffle, "seed": self.seed, "shards": len(self.shards)}

    def load_state_dict(self, state):
        mine = self.state_dict()
        for key in ("batch_size", "seq_len", "world_size", "shuffle", "seed", "shards"):
            if state[key] != mine[key]:
                raise ValueError(f"the checkpoint's data position was taken with {key} "
                                 f"{state[key]}, this run has {mine[key]}")
        self.epoch, self.shard, self.offset = state["epoch"], state["shard"], state["offset"]
        self._plan()


# --- model

@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50,257 tokens, padded up to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768


class KVCache:
    """The keys and values of every layer for the tokens seen so far. Generating token t+1 then
    costs one position's worth of work per layer, not a pass over all t positions again."""

    def __init__(self, n_layer, block_size):
        self.n_layer, self.block_size = n_layer, block_size
        self.k, self.v = [None] * n_layer, [None] * n_layer  # (B, nh, block_size, hs) each
        self.pos = 0  # tokens already cached

    def append(self, layer, k, v):
        """Store k, v (B, nh, T, hs) after the cached tokens; return all keys and values so far."""
        B, nh, T, hs = k.shape
        if self.k[layer] is None:
            self.k[layer] = k.new_zeros(B, nh, self.block_size, hs)
            self.v[layer] = v.new_zeros(B, nh, self.block_size, hs)
        end = self.pos + T
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, nh, end, hs)


class CausalSelfAttention(nn.Module):
    """Every position mixes the values of the positions up to itself, weighted by how well its
    query matches their keys; n_head heads do this in parallel on slices of the channels."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x, cache=None, layer=0):
        B, T, C = x.shape
        hs = C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            # The new tokens see all cached ones. Only two shapes occur: the prompt (nothing
            # cached yet, causal within itself) and one new token (it sees everything).
            assert cache.pos == 0 or T == 1, "the cache takes a prompt, then one token a step"
            k, v = cache.append(layer, k, v)  # (B, nh, pos + T, hs)
        # Flash attention on GPU: the (T, T) weights are never stored.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C), heads side by side
        return self.c_proj(y)  # (B, T, C)


class MLP(nn.Module):
    """Position-wise computation on what attention gathered: widen 4x, GELU, project back."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))  # (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm: normalize the input of each sublayer, add its output to the residual
    stream, so that the stream itself is a clean path for gradients from the loss to the
    embeddings."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), cache, layer)  # (B, T, C): communicate between positions
        x = x + self.mlp(self.ln_2(x))  # (B, T, C): compute at each position
        return x


class LinearCrossEntropy(torch.autograd.Function):
    """cross_entropy(x @ weight.T, targets) with its gradients, computed in one pass over the
    logits, `chunk` rows at a time. The math is F.cross_entropy's; the point is memory traffic:
    at GPT-2's 50,304 tokens the (N, V) logits are by far the largest tensor, and the plain path
    walks it many times (log_softmax, its saved copy, the zero-filled gradient, the backward of
    log_softmax). Here the logits buffer becomes the softmax, then the gradient, in place. It runs
    on CPU in float32; on GPU torch.compile fuses the plain path into a few kernels instead."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk):
        # x (N, C), weight (V, C), targets (N,)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x)  # (N, C)
        grad_weight = torch.zeros_like(weight)  # (V, C)
        for start in range(0, x.size(0), chunk):
            xs, ts = x[start:start + chunk], targets[start:start + chunk]  # (n, C), (n,)
            logits = xs @ weight.t()  # (n, V)
            target_logit = logits.gather(1, ts[:, None])  # (n, 1)
            top = logits.amax(dim=1, keepdim=True)  # (n, 1), subtracted so exp cannot overflow
            torch.sub(logits, top, out=logits).exp_()  # (n, V), unnormalised probabilities
            norm = logits.sum(dim=1, keepdim=True)  # (n, 1)
            total += (top + norm.log() - target_logit).sum()  # -log softmax at the target
            logits.div_(norm)  # (n, V), softmax
            logits[torch.arange(len(ts), device=x.device), ts] -= 1  # d loss / d logits
            torch.mm(logits, weight, out=grad_x[start:start + chunk])  # (n, C)
            grad_weight.addmm_(logits.t(), xs)  # (V, C)
        n = x.size(0)
        ctx.save_for_backward(grad_x, grad_weight)
        ctx.n = n
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_weight = ctx.saved_tensors
        scale = grad_loss / ctx.n  # the loss is a mean over the N positions
        # In place: the saved gradients are used once, and (V, C) is a large copy to avoid.
        return grad_x.mul_(scale), grad_weight.mul_(scale), None, None


class GPT(nn.Module):
    LOSS_CHUNK = 2048  # rows of logits at a time in LinearCrossEntropy: 412 MB at 50,304 tokens

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
            wpe=nn.Embedding(config.block_size, config.n_embd),  # position embeddings
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (GPT-2): reading a token in and writing it out use one matrix. It saves
        # 38M of the 124M parameters, and similar tokens get similar rows from both directions.
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                # GPT-2: each block adds two outputs to the residual stream; shrinking the
                # projections by 1/sqrt(2 * n_layer) keeps the stream's variance from growing
                # with depth.
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden_states(self, idx, cache=None):
        """The final LayerNorm's output (B, T, C) for tokens idx (B, T): the logits are this
        times the embedding matrix. hellaswag.py uses it to compute logits only where it scores."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        assert start + T <= self.config.block_size, "longer than the model's block size"
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer)  # (B, T, C)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)  # (B, T, C)

    def forward(self, idx, targets=None, return_logits=True):
        """(logits (B, T, V), mean cross-entropy loss or None). The training loop, which needs
        only the loss, passes return_logits=False: in float32 on CPU the loss then comes from
        LinearCrossEntropy, the full logits are never kept, and None stands in for them."""
        B, T = idx.shape
        x = self.hidden_states(idx)  # (B, T, C)
        if (not return_logits and targets is not None and torch.is_grad_enabled()
                and x.device.type == "cpu"
                and x.dtype == torch.float32 and not torch.compiler.is_compiling()):
            loss = LinearCrossEntropy.apply(x.view(B * T, -1), self.lm_head.weight,
                                            targets.reshape(B * T), self.LOSS_CHUNK)
            return None, loss
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True,
                 generator=None):
        """Append `max_new_tokens` tokens to idx (B, T), sampled one at a time (temperature 0:
        the likeliest). With the KV cache each step feeds only the newest token; once the text
        outgrows the block size, every step recomputes the last block_size tokens, as it would
        without the cache, so both ways give the same tokens."""
        cache = KVCache(self.config.n_layer, self.config.block_size) if use_cache else None
        new = idx  # the tokens the cache has not seen yet
        for _ in range(max_new_tokens):
            if cache is not None and idx.size(1) <= self.config.block_size:
                x = self.hidden_states(new, cache)[:, -1]  # (B, C)
            else:
                cache = None
                x = self.hidden_states(idx[:, -self.config.block_size:])[:, -1]  # (B, C)
            logits = self.lm_head(x).float()  # (B, V), the next token only
            if temperature == 0:
                next_token = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)  # (B, V)
                next_token = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
            idx = torch.cat([idx, next_token], dim=1)  # (B, T+1)
            new = next_token
        return idx

    # Hugging Face's GPT-2 stores these four weights as Conv1D, (in, out): nn.Linear's transpose.
    CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    @classmethod
    def from_pretrained(cls, name_or_dir):
        """GPT-2 weights in the Hugging Face layout: a hub name (gpt2, gpt2-medium, gpt2-large,
        gpt2-xl; downloaded once into the HF cache, which also serves offline runs) or a local
        directory with config.json and model.safetensors or pytorch_model.bin. Logits equal
        those of transformers' GPT2LMHeadModel on the same weights."""
        directory = Path(name_or_dir)
        if not directory.is_dir():
            if name_or_dir not in HF_NAMES:
                raise FileNotFoundError(f"{name_or_dir} is neither a directory nor one of "
                                        f"{', '.join(sorted(HF_NAMES))}")
            from huggingface_hub import snapshot_download
            directory = Path(snapshot_download(f"openai-community/{name_or_dir}",
                                               allow_patterns=["config.json", "model.safetensors"]))
        config_path = directory / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{directory} has no config.json (a Hugging Face GPT-2 "
                                    "directory has config.json and model.safetensors)")
        hf = json.loads(config_path.read_text(encoding="utf-8"))
        if hf.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"{config_path} describes a {hf.get('model_type')} model, not gpt2")
        n_inner = hf.get("n_inner")
        if (hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh")
                or n_inner not in (None, 4 * hf["n_embd"])
                or hf.get("layer_norm_epsilon", 1e-5) != 1e-5
                or hf.get("scale_attn_by_inverse_layer_idx", False)
                or not hf.get("scale_attn_weights", True)):
            raise ValueError(f"{config_path} asks for a GPT-2 variant this model does not "
                             "implement (activation, MLP width, LayerNorm eps or attention "
                             "scaling differ from GPT-2's)")
        config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"],
                           n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"])
        if (directory / "model.safetensors").is_file():
            from safetensors.torch import load_file
            weights = load_file(directory / "model.safetensors")
        elif (directory / "pytorch_model.bin").is_file():
            weights = torch.load(directory / "pytorch_model.bin", map_location="cpu",
                                 weights_only=True)
        else:
            raise FileNotFoundError(f"{directory} has neither model.safetensors nor "
                                    "pytorch_model.bin")
        # GPT2LMHeadModel prefixes "transformer."; GPT2Model (OpenAI's hub files) does not.
        weights = {k.removeprefix("transformer."): v for k, v in weights.items()}
        model = cls(config)
        state = model.state_dict()
        with torch.no_grad():
            for key, param in state.items():
                if key == "lm_head.weight":
                    continue  # tied to wte
                hf_key = key.removeprefix("transformer.")
                if hf_key not in weights:
                    raise ValueError(f"{directory} lacks the weight {hf_key}")
                tensor = weights[hf_key]
                if key.endswith(cls.CONV1D):
                    tensor = tensor.t()
                if tensor.shape != param.shape:
                    raise ValueError(f"{directory}: {hf_key} has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(param.shape)}")
                param.copy_(tensor)
        return model

    def export_hf(self, directory):
        """Write config.json and model.safetensors that transformers' GPT2LMHeadModel loads
        with the same logits (and so lm-evaluation-harness and the other HF tools)."""
        from safetensors.torch import save_file
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for key, param in self.state_dict().items():
            if key == "lm_head.weight":
                continue  # tied: GPT2LMHeadModel ties it to wte when loading
            tensor = param.detach().float().cpu()
            tensors[key] = (tensor.t() if key.endswith(self.CONV1D) else tensor).contiguous()
        c = self.config
        hf_config = {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": c.vocab_size, "n_positions": c.block_size, "n_ctx": c.block_size,
            "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": None,
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "initializer_range": 0.02, "tie_word_embeddings": True,
            "bos_token_id": fineweb.EOT, "eos_token_id": fineweb.EOT,
        }
        tmp = directory / "model.safetensors.tmp"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, directory / "model.safetensors")
        write_json_atomic(directory / "config.json", hf_config)


# --- training and evaluation helpers

def make_optimizer(model, lr, weight_decay, device):
    """AdamW with GPT-3's betas; only matrices (embeddings and linear weights) decay, biases and
    LayerNorm gains do not. The fused kernel updates all parameters in one call instead of a
    handful of ops per tensor."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused or None)


def learning_rate(step, max_lr, warmup_steps, max_steps, min_lr_ratio=0.1):
    """Linear warmup to max_lr over warmup_steps, then a cosine down to max_lr * min_lr_ratio
    at max_steps (and flat after it)."""
    min_lr = max_lr * min_lr_ratio
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def flops_per_token(config, seq_len):
    """Training FLOPs per token: 6 per weight (forward 2, backward 4) plus attention's
    6 * 2 * n_layer * n_embd * seq_len (PaLM paper, appendix B). About 0.85 GFLOP for GPT-2."""
    return 6 * matmul_params(config) + 12 * config.n_layer * config.n_embd * seq_len


def matmul_params(config):
    """Weights that take part in a matmul per token: the blocks and the (tied) output layer;
    position embeddings are a lookup."""
    C = config.n_embd
    per_block = 12 * C * C + 13 * C  # c_attn, attn.c_proj, c_fc, mlp.c_proj, biases, 2 LNs
    return config.n_layer * per_block + config.vocab_size * C + 2 * C


def gpu_peak_tflops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in GPU_PEAK_TFLOPS:
        if key in name:
            return tflops
    return None


def rng_state():
    """All random-number generator states, as tensors and numbers (torch.load(weights_only=True)
    takes those). Training itself draws no random numbers, but a resumed run must not differ
    from an uninterrupted one in anything that might."""
    py_version, py_keys, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "python": [py_version, torch.tensor(py_keys, dtype=torch.int64), py_gauss],
             "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos,
                       np_has_gauss, np_gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys.tolist()), gauss))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def save_checkpoint(path, checkpoint):
    """Written to a temporary name, then renamed: a crash mid-write leaves the previous
    checkpoint whole (os.replace is atomic on one file system)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    """A checkpoint as a dict of tensors and plain values; never runs code from the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError,
            zipfile.BadZipFile) as err:
        raise ValueError(f"checkpoint {path} is not a readable PyTorch checkpoint "
                         f"({type(err).__name__}); it may be truncated or corrupt") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("stage") != STAGE:
        raise ValueError(f"{path} was not written by gpt2.py")
    return checkpoint


def load_model(path, device="cpu"):
    """A GPT in eval mode on `device`, from a gpt2.py checkpoint (a file, or an --out-dir holding
    checkpoint.pt) or, failing that, from Hugging Face weights (a directory or a hub name)."""
    path = Path(path)
    if path.is_dir() and (path / "checkpoint.pt").is_file():
        path = path / "checkpoint.pt"
    if path.is_file():
        checkpoint = load_checkpoint(path)
        model = GPT(GPTConfig(**checkpoint["config"]))
        model.load_state_dict(checkpoint["model"])
    else:
        model = GPT.from_pretrained(str(path))
    return model.to(device).eval()


def read_log(path):
    """The records of a log.jsonl; a line cut short by a crash is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def write_json_atomic(path, obj):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def decode(enc, tokens):
    """Text of tokens; ids past GPT-2's 50,257 (the padding rows) have no text and are dropped."""
    return enc.decode([t for t in tokens if t < enc.n_vocab])


def encode_prompt(enc, prompt, vocab_size):
    # An empty prompt starts where every document starts: after end-of-text.
    tokens = enc.encode(prompt) if prompt else [fineweb.EOT]
    if max(tokens) >= vocab_size:
        die(f"--prompt has GPT-2 tokens beyond this model's --vocab-size {vocab_size}; "
            "use a model with GPT-2's vocabulary or another --prompt")
    return tokens


def sample_texts(model, enc, tokens, count, max_new_tokens, temperature, top_k, generator,
                 autocast):
    """`count` continuations of the prompt tokens, as text."""
    device = next(model.parameters()).device
    idx = torch.tensor([tokens] * count, dtype=torch.long, device=device)  # (count, T)
    with autocast:
        out = model.generate(idx, max_new_tokens, temperature, top_k or None,
                             generator=generator)  # (count, T + max_new_tokens)
    return [decode(enc, row) for row in out.tolist()]


@torch.no_grad()
def estimate_val_loss(model, loader, batches, device, autocast, world_size):
    """Mean loss over the first `batches` val windows (the same ones every time), averaged over
    the ranks, each of which reads its own slice of every window."""
    loader.reset()
    total = torch.zeros((), device=device)
    for _ in range(batches):
        x, y = loader.next_batch()
        with autocast:
            _, loss = model(x.to(device), y.to(device))
        total += loss.float()
    if world_size > 1:
        dist.all_reduce(total)  # SUM: gloo has no AVG
    return total.item() / (batches * world_size)


def draw_figure(path, records, title):
    """Train and val loss, and HellaSwag, against step, with GPT-2 124M's reference lines;
    False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    hella = [(r["step"], r["hellaswag"]) for r in records if "hellaswag" in r]
    fig, axes = plt.subplots(1, 2 if hella else 1, figsize=(12 if hella else 7, 4), squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train), lw=0.8, label="train")
    if val:
        ax.plot(*zip(*val), marker="o", label="val")
    ax.axhline(REFERENCE_VAL_LOSS, color="red", ls="--", lw=1,
               label=f"OpenAI GPT-2 124M val ({REFERENCE_VAL_LOSS}, FineWeb-Edu)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    if hella:
        ax = axes[0][1]
        ax.plot(*zip(*hella), marker="o", label="this run")
        ax.axhline(REFERENCE_HELLASWAG, color="red", ls="--", lw=1,
                   label=f"OpenAI GPT-2 124M ({REFERENCE_HELLASWAG})")
        ax.set_xlabel("step")
        ax.set_ylabel("HellaSwag acc_norm")
        ax.grid(alpha=0.3)
        ax.legend()
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return True


class StopSignals:
    """SIGTERM (a spot instance going away, a scheduler's time limit) or SIGINT (Ctrl-C) only set
    a flag; the loop finishes its step, saves a checkpoint and exits. A second signal acts at
    once."""

    def __init__(self):
        self.received = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        signal.signal(signum, self.previous[signum])

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def print_header(device, world_size):
    print("command:", " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"python {platform.python_version()}, torch {torch.__version__}, device {device} "
          f"({name or 'cpu'}), {world_size} rank(s), {torch.get_num_threads()} CPU threads")


def source_of_weights(args):
    """--init-from, or the run's own checkpoint."""
    return args.init_from if args.init_from is not None else str(args.out_dir / "checkpoint.pt")


def load_model_or_die(source, device):
    try:
        return load_model(source, device)
    except (ImportError, OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        die(f"cannot load weights from {source}: {err}; pass --init-from with a gpt2.py "
            "checkpoint, a Hugging Face GPT-2 directory or gpt2/gpt2-medium/gpt2-large/gpt2-xl")


def sample_main(args):
    """--sample: generate from a checkpoint or Hugging Face weights; nothing is written."""
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    model = load_model_or_die(source_of_weights(args), device)
    enc = fineweb.get_encoding()
    tokens = encode_prompt(enc, args.prompt, model.config.vocab_size)
    print_header(device, 1)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    samples = sample_texts(model, enc, tokens, args.num_samples, args.sample_tokens,
                           args.temperature, args.top_k, generator, autocast)
    for i, text in enumerate(samples):
        print(f"--- sample {i}:\n{text}")
    return {"samples": samples}


def export_main(args):
    """--export-hf DIR: write the weights in the Hugging Face layout; no training."""
    if args.export_hf.exists() and not args.export_hf.is_dir():
        die(f"--export-hf {args.export_hf} exists and is not a directory; choose another")
    model = load_model_or_die(source_of_weights(args), "cpu")
    try:
        model.export_hf(args.export_hf)
    except OSError as err:
        die(f"cannot write to --export-hf {args.export_hf} ({err.strerror}); choose another")
    print(f"wrote {args.export_hf}/config.json and model.safetensors "
          f"({sum(p.numel() for p in model.parameters()):,} parameters); load them with "
          "transformers.GPT2LMHeadModel.from_pretrained")
    return {"export_hf": str(args.export_hf)}


def main(args):
    if args.sample:
        return sample_main(args)
    if args.export_hf is not None:
        return export_main(args)
    return train_main(args)


def train_main(args):
    # torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is one process.
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    master = rank == 0
    device = pick_device(args.device, local_rank if ddp else None)
    dtype = pick_dtype(args.dtype, device)
    use_compile = device.type == "cuda" if args.compile is None else args.compile
    print0 = print if master else (lambda *a, **k: None)

    # Every input is checked before anything is written or any process group is joined.
    micro_tokens = args.batch_size * args.seq_len * world_size
    if args.total_batch_size % micro_tokens:
        die(f"--total-batch-size {args.total_batch_size} is not a multiple of batch-size x "
            f"seq-len x ranks = {args.batch_size} x {args.seq_len} x {world_size} = "
            f"{micro_tokens}; change one of them")
    grad_accum = args.total_batch_size // micro_tokens
    train_shards = open_shards(args.data, "train", micro_tokens + 1)
    val_shards = open_shards(args.data, "val", micro_tokens + 1) if args.eval_every else None
    resume_path = None
    if args.resume is not None:
        resume_path = Path(args.resume) if args.resume else args.out_dir / "checkpoint.pt"
        try:
            checkpoint = load_checkpoint(resume_path)
        except (OSError, ValueError) as err:
            die(f"cannot resume: {err}; drop --resume to start afresh")
    # The tokenizer is needed only to write prompts and read HellaSwag; a run without either
    # never builds it (it may need the network where the BPE files are not installed).
    enc = fineweb.get_encoding() if args.sample_every or args.hellaswag_every else None
    examples = None
    if args.hellaswag_every:
        # Now, not an hour into the run: no data means no run.
        try:
            examples = hellaswag.load_examples("val", path=args.hellaswag_data)
        except hellaswag.DataError as err:
            die(f"HellaSwag: {err}; pass --hellaswag-data with a local hellaswag_val.jsonl or "
                "--hellaswag-every 0")
        if args.hellaswag_limit:
            examples = examples[:args.hellaswag_limit]

    if resume_path is not None:
        config = GPTConfig(**checkpoint["config"])
    elif args.init_from is not None:
        pretrained = load_model_or_die(args.init_from, "cpu")
        config = pretrained.config
    else:
        config = GPTConfig(block_size=args.block_size, vocab_size=args.vocab_size,
                           n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    if args.seq_len > config.block_size:
        die(f"--seq-len {args.seq_len} is longer than the model's block size "
            f"{config.block_size}; lower --seq-len")
    prompt_tokens = (encode_prompt(enc, args.prompt, config.vocab_size)
                     if args.sample_every else None)
    train_loader = ShardLoader(train_shards, args.batch_size, args.seq_len, rank, world_size,
                               args.shuffle, args.seed)
    val_loader = (ShardLoader(val_shards, args.batch_size, args.seq_len, rank, world_size)
                  if val_shards else None)
    if resume_path is not None:
        try:
            train_loader.load_state_dict(checkpoint["loader"])
        except (KeyError, ValueError) as err:
            die(f"cannot resume from {resume_path}: {err}; resume with the same batch-size, "
                "seq-len, ranks, data, --shuffle and --seed, or drop --resume")
    if args.out_dir.exists() and not args.out_dir.is_dir():
        die(f"--out-dir {args.out_dir} exists and is not a directory; choose another --out-dir")

    if ddp:
        # NCCL moves gradients GPU to GPU; gloo is the CPU backend (tests, laptops).
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # TF32 for whatever still runs in fp32: 10-bit mantissa matmuls on tensor cores.
        torch.set_float32_matmul_precision("high")
    if master:
        try:
            args.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            die(f"cannot create --out-dir {args.out_dir} ({err.strerror}); choose another")
        print_header(device, world_size)

    torch.manual_seed(args.seed)
    model = GPT(config)
    if args.init_from is not None and resume_path is None:
        model.load_state_dict(pretrained.state_dict())
    model.to(device)
    optimizer = make_optimizer(model, args.lr, args.weight_decay, device)
    # fp16 has too few exponent bits for small gradients: scale the loss up, the grads back down.
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    start_step = 0
    if resume_path is not None:
        try:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scaler.load_state_dict(checkpoint["scaler"])
        except (KeyError, ValueError, RuntimeError) as err:
            die(f"cannot resume from {resume_path}: {err}; it does not match this run "
                "(--dtype?), or drop --resume")
        set_rng_state(checkpoint["rng"])
        start_step = checkpoint["step"]
    raw_model = model  # eager: checkpoints, HellaSwag, sampling
    if use_compile:
        # Training shapes never change, so the compiled graph is built once. HellaSwag and
        # sampling run on the eager model that shares the same weights: their shapes change
        # with every batch and token, which would recompile again and again.
        model = torch.compile(model)
    eval_model = model
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    n_params = sum(p.numel() for p in raw_model.parameters())
    peak = args.peak_tflops or gpu_peak_tflops(device)
    flops = flops_per_token(config, args.seq_len)
    print0(f"preset {args.preset}: {config}; {n_params:,} parameters")
    print0(f"{len(train_shards)} train shard(s), {len(val_shards or [])} val shard(s) in "
           f"{args.data}; micro-batch {args.batch_size} x {args.seq_len} on {world_size} "
           f"rank(s), {grad_accum} micro-step(s) = {args.total_batch_size:,} tokens a step")
    print0(f"{args.max_steps} steps, lr {args.lr:g} (warmup {args.warmup_steps}, cosine to "
           f"{args.min_lr_ratio:g}x), weight decay {args.weight_decay:g}, clip "
           f"{args.grad_clip:g}, dtype {str(dtype).removeprefix('torch.')}, compile "
           f"{use_compile}" + ("" if peak or device.type != "cuda" else
                               "; unknown GPU: pass --peak-tflops to see MFU"))
    if resume_path is not None:
        print0(f"resumed from {resume_path} at step {start_step}")

    log_path = args.out_dir / "log.jsonl"
    records = []
    if master:
        if start_step and log_path.exists():
            # Keep what happened before the checkpoint; the steps after it run again.
            records = [r for r in read_log(log_path) if r["step"] < start_step]
        log_file = open(log_path.with_name(log_path.name + ".tmp"), "w", encoding="utf-8")
        for record in records:
            log_file.write(json.dumps(record) + "\n")
        log_file.flush()
        # Renamed while open: the file keeps growing under its real name, line by line.
        os.replace(log_path.with_name(log_path.name + ".tmp"), log_path)

    def log(record):
        records.append(record)
        if master:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

    def checkpoint_now(step):
        if master:
            save_checkpoint(args.out_dir / "checkpoint.pt", {
                "stage": STAGE, "model": raw_model.state_dict(),
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "step": step, "config": asdict(config), "loader": train_loader.state_dict(),
                "rng": rng_state(),
                "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            })

    # Each rank samples its share of --num-samples with a generator of its own, so sampling
    # never moves the training RNG and the ranks do not all write the same text.
    sample_generator = torch.Generator(device=device).manual_seed(args.seed + rank)
    end_step = min(args.max_steps, args.stop_step or args.max_steps)
    stopped = None
    steps_done = start_step
    tokens_per_s = []
    started = time.time()
    with StopSignals() as signals:
        for step in range(start_step, end_step):
            last = step == args.max_steps - 1
            evaluation = {}
            if val_loader is not None and (last or step % args.eval_every == 0):
                evaluation["val_loss"] = estimate_val_loss(
                    eval_model, val_loader, args.val_batches, device, autocast, world_size)
            if examples is not None and (last or step % args.hellaswag_every == 0):
                raw_model.eval()
                result = hellaswag.evaluate(
                    raw_model, examples, device=device, enc=enc, rank=rank,
                    world_size=world_size,
                    autocast_dtype=dtype if dtype != torch.float32 else None)
                raw_model.train()
                evaluation["hellaswag"] = result["acc_norm"]
                evaluation["hellaswag_n"] = result["n"]
            if evaluation:
                log({"step": step, **evaluation})
                print0(f"step {step:5d} | " + " | ".join(
                    f"{k} {v:.4f}" for k, v in evaluation.items() if k != "hellaswag_n"))
            if prompt_tokens is not None and step > 0 and (last or step % args.sample_every == 0):
                raw_model.eval()
                mine = len(range(rank, args.num_samples, world_size))
                if mine:
                    texts = sample_texts(raw_model, enc, prompt_tokens, mine, args.sample_tokens,
                                         args.temperature, args.top_k, sample_generator, autocast)
                    for i, text in zip(range(rank, args.num_samples, world_size), texts):
                        print(f"step {step:5d} | sample {i}: {text!r}", flush=True)
                raw_model.train()

            # One optimizer step: grad_accum micro-steps, each on its own micro-batch.
            t0 = time.time()
            lr = learning_rate(step, args.lr, args.warmup_steps, args.max_steps,
                               args.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=device)
            for micro_step in range(grad_accum):
                x, y = train_loader.next_batch()
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                # DDP all-reduces the gradients after every backward. Accumulation only needs
                # the sum once, so the micro-steps before the last skip the sync (no_sync) and
                # the last one averages the accumulated gradients over the ranks.
                sync = (contextlib.nullcontext() if not ddp or micro_step == grad_accum - 1
                        else model.no_sync())
                with sync:
                    with autocast:
                        _, loss = model(x, y, return_logits=False)
                    # The mean over the whole batch, not a sum of micro-batch means.
                    loss = loss / grad_accum
                    loss_sum += loss.detach().float()
                    scaler.scale(loss).backward()
            # The logged loss is the mean over all ranks; a stop request travels with it, so
            # that every rank stops after the same step.
            report = torch.stack([loss_sum, torch.tensor(float(signals.received is not None),
                                                         device=device)])
            if ddp:
                dist.all_reduce(report)
            train_loss = report[0].item() / world_size
            if not math.isfinite(train_loss):
                kept = ("the last good checkpoint is kept at " + str(args.out_dir /
                        "checkpoint.pt") if (args.out_dir / "checkpoint.pt").exists()
                        else "no checkpoint was written")
                if master:
                    print(f"{STAGE}.py: error: the loss is {train_loss} at step {step}; stopping "
                          f"without saving ({kept}); resume from it with a lower --lr or a longer "
                          "--warmup-steps", file=sys.stderr)
                    log_file.close()
                if ddp:
                    dist.destroy_process_group()
                sys.exit(1)
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(
                raw_model.parameters(), args.grad_clip if args.grad_clip else math.inf)
            scaler.step(optimizer)
            scaler.update()
            if device.type == "cuda":
                torch.cuda.synchronize()  # so that the time measures work, not queueing
            dt = time.time() - t0
            rate = args.total_batch_size / dt
            tokens_per_s.append(rate)
            record = {"step": step, "train_loss": train_loss, "lr": lr,
                      "grad_norm": norm.item(), "ms": round(1000 * dt, 2),
                      "tokens_per_s": round(rate, 1),
                      "tokens": (step + 1) * args.total_batch_size}
            line = (f"step {step:5d} | loss {train_loss:.6f} | lr {lr:.4e} | norm "
                    f"{record['grad_norm']:.4f} | {1000 * dt:8.1f} ms | {rate:9,.0f} tok/s")
            if peak:
                record["mfu"] = flops * rate / world_size / (peak * 1e12)
                line += f" | MFU {100 * record['mfu']:.1f}%"
            log(record)
            print0(line)
            steps_done = step + 1
            if report[1].item() > 0:
                stopped = signals.received or "a signal on another rank"
                checkpoint_now(step + 1)
                print0(f"received {stopped}: saved a checkpoint at step {step + 1} in "
                       f"{args.out_dir}; the same command with --resume continues")
                break
            if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
                checkpoint_now(step + 1)
        else:
            if not (args.checkpoint_every and end_step % args.checkpoint_every == 0
                    and end_step > start_step):
                checkpoint_now(end_step)
    seconds = time.time() - started

    metrics = {"stage": STAGE, "preset": args.preset, "config": asdict(config),
               "params": n_params, "world_size": world_size, "device": str(device),
               "dtype": str(dtype).removeprefix("torch."), "compile": use_compile,
               "total_batch_size": args.total_batch_size, "steps_done": steps_done,
               "seconds": round(seconds, 3), "stopped": stopped}
    train_records = [r for r in records if "train_loss" in r]
    val_records = [r for r in records if "val_loss" in r]
    hella_records = [r for r in records if "hellaswag" in r]
    if train_records:
        metrics["final_train_loss"] = train_records[-1]["train_loss"]
        metrics["min_train_loss"] = min(r["train_loss"] for r in train_records)
        # The median step speed: the first steps include compilation and warm-up.
        metrics["tokens_per_s"] = float(np.median(tokens_per_s)) if tokens_per_s else None
    if val_records:
        metrics["final_val_loss"] = val_records[-1]["val_loss"]
        metrics["min_val_loss"] = min(r["val_loss"] for r in val_records)
    if hella_records:
        metrics["final_hellaswag"] = hella_records[-1]["hellaswag"]
        metrics["max_hellaswag"] = max(r["hellaswag"] for r in hella_records)
    if master:
        log_file.close()
        figure = args.out_dir / "loss.png"
        if not draw_figure(figure, records, f"gpt2.py --preset {args.preset}"):
            figure = None
            print("matplotlib is not installed: no figure was drawn (pip install matplotlib)")
        metrics["figure"] = figure and str(figure)
        write_json_atomic(args.out_dir / "metrics.json", metrics)
        summary = [f"{metrics['steps_done']} steps in {seconds:.1f} s"]
        if "final_train_loss" in metrics:
            summary.append(f"train loss {metrics['final_train_loss']:.4f}")
        if val_records:
            summary.append(f"val loss {metrics['final_val_loss']:.4f}")
        if hella_records:
            summary.append(f"HellaSwag {metrics['final_hellaswag']:.4f}")
        print(", ".join(summary) + f"; outputs in {args.out_dir}")
    if ddp:
        dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    main(parse_args())
