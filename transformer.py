"""Stage 5: a character-level GPT, the decoder-only Transformer, trained on Shakespeare.

wavenet.py grew the context by merging neighbouring characters level by level, through a fixed
tree. A Transformer lets every position look at every earlier position at once and decide by
itself, from the data, which ones matter: self-attention ("Attention Is All You Need", Vaswani
et al., 2017), in the decoder-only form of GPT ("Improving Language Understanding by Generative
Pre-Training", Radford et al., 2018) with GPT-2's pre-LayerNorm blocks (Radford et al., 2019).
The model: token + position embeddings, N blocks of [LayerNorm -> causal multi-head
self-attention -> residual add, LayerNorm -> 4x MLP with GELU -> residual add], a final
LayerNorm and a linear head over the characters. Attention is written out step by step
(q, k, v, scores / sqrt(head size), causal mask, softmax, weighted sum); by default the same
computation runs through torch's fused F.scaled_dot_product_attention, which a test checks
gives the same outputs. The modules carry GPT-2's names (wte, wpe, h, ln_1, attn, c_attn,
c_proj, ln_2, mlp, c_fc, ln_f, lm_head), so `diff transformer.py gpt2.py` shows only what the
next stage adds. Training: AdamW, linear warmup then cosine decay, gradient clipping, dropout;
loss on fixed train and val batches every --eval-every steps; the best checkpoint is kept.

Run:
    python transformer.py --preset quick     # CPU, about half a minute
    python transformer.py                    # --preset cpu: CPU, a few minutes
    python transformer.py --preset gpu       # one GPU: 6 layers, 6 heads, 384 wide, block 256
    python transformer.py --data ../shared/data/tinyshakespeare.txt   # the canonical corpus
    python transformer.py --sample --prompt "ROMEO:" --num-chars 500 --top-k 20
    python transformer.py --attention manual # the written-out attention (same numbers, slower)

Measured on the canonical tiny-Shakespeare (1,115,394 characters; first 90% train, last 10%
val) on a quiet 2-core CPU (2 threads), default flags:
    --preset quick: val 1.8643 after 1,400 steps of 12 x 64 characters; 38.1 s of training
                    (42.0 s with evaluation)
    --preset cpu:   val 1.6084 after 1,800 steps of 24 x 128 characters; 196 s of training
                    (224 s in all)
    at the recipe's configuration one training iteration takes 27.6 ms against the recipe
    design's 27.7 ms (`python bench.py transformer`, the two taking turns).
On the bundled data/shakespeare.txt (1,180,688 characters; its last 10% is the end of Richard
II and all of The Tempest, harder to predict): quick val 1.8864, cpu val 1.7184.
Anchors: nanoGPT's CPU recipe (4 layers, 4 heads, 128 wide, block 64, batch 12, 2,000 steps,
lr 1e-3, no dropout) reaches val 1.8857 in about 58 s on that machine (this script at that
configuration: 1.8797); its GPU configuration (the --preset gpu scale) reaches 1.4697 on one
A100 in about 3 minutes.

Outputs in --out-dir (default out/transformer): log.jsonl (step, seconds, train_loss,
val_loss, lr at every evaluation), metrics.json, loss.png (the loss curves), ckpt.pt (the best
checkpoint: model, optimizer, step, config and vocabulary; --sample reads it).
"""
import argparse
import json
import math
import os
import pickle
import platform
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

STAGE = "transformer"

# The presets set the model size and the training length; any flag given on the command line
# overrides its preset value. quick is the model and batch of nanoGPT's CPU recipe (4 layers,
# 4 heads, 128 wide, block 64, batch 12) trained with 3x its learning rate for 3/4 of its steps:
# a model this small tolerates a large step, and gets further in less time. cpu keeps that
# width but doubles the context and the batch: on a CPU a 128-character window costs hardly more
# per character than a 64-character one, and the longer context is worth a lot of loss. gpu is
# the lecture's scale (nanoGPT's GPU configuration for this corpus).
PRESETS = {
    "quick": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, dropout=0.0,
                  lr=3e-3, warmup_steps=100, max_steps=1400, eval_every=350),
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=24, dropout=0.0,
                lr=3e-3, warmup_steps=100, max_steps=1800, eval_every=300),
    "gpu": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, dropout=0.2,
                lr=1e-3, warmup_steps=100, max_steps=5000, eval_every=250),
}


def die(message):
    print(f"{STAGE}.py: error: {message}", file=sys.stderr)
    sys.exit(2)


# --- config

def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="A character-level GPT trained on Shakespeare; --sample generates text.")
    parser.error = die
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                        help="model size and training length: quick (about 30 s on a laptop "
                             "CPU), cpu (a few minutes) or gpu (the lecture's scale, one GPU); "
                             "any flag below overrides its preset value (default: %(default)s)")
    parser.add_argument("--data", type=Path, default=Path("data/shakespeare.txt"),
                        help="UTF-8 text to learn; first 90%% train, last 10%% val "
                             "(default: %(default)s)")
    parser.add_argument("--out-dir", type=Path, default=Path("out") / STAGE,
                        help="where log.jsonl, metrics.json, loss.png and ckpt.pt go "
                             "(default: %(default)s)")
    parser.add_argument("--device", default="auto",
                        help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    parser.add_argument("--seed", type=int, default=1337,
                        help="seed of the initial weights, the batches and the samples")
    group = parser.add_argument_group("model and training (default: the preset's value)")
    group.add_argument("--n-layer", type=int, help="Transformer blocks")
    group.add_argument("--n-head", type=int, help="attention heads per block")
    group.add_argument("--n-embd", type=int, help="width of the residual stream")
    group.add_argument("--block-size", type=int, help="context length in characters")
    group.add_argument("--dropout", type=float, help="dropout probability (0 = none)")
    group.add_argument("--attention", choices=["sdpa", "manual"], default="sdpa",
                       help="sdpa: torch's fused F.scaled_dot_product_attention; manual: the "
                            "same computation written out, to read (default: %(default)s)")
    group.add_argument("--max-steps", type=int, help="optimizer steps")
    group.add_argument("--batch-size", type=int, help="sequences per step")
    group.add_argument("--lr", type=float, help="peak learning rate of AdamW")
    group.add_argument("--min-lr-ratio", type=float, default=0.1,
                       help="the cosine decays the learning rate to this fraction of --lr "
                            "(default: %(default)s)")
    group.add_argument("--warmup-steps", type=int,
                       help="steps of linear warmup from 0 to --lr")
    group.add_argument("--weight-decay", type=float, default=0.1,
                       help="AdamW weight decay of the matrices (default: %(default)s)")
    group.add_argument("--grad-clip", type=float, default=1.0,
                       help="clip the gradient's global norm to this (0 = off; "
                            "default: %(default)s)")
    group.add_argument("--eval-every", type=int,
                       help="steps between loss estimates and checkpoints (0 = only at the end)")
    group.add_argument("--eval-batches", type=int, default=50,
                       help="batches of --batch-size sequences per loss estimate; the same "
                            "batches every time (default: %(default)s)")
    group = parser.add_argument_group("sampling")
    group.add_argument("--sample", action="store_true",
                       help="do not train: load --checkpoint and generate text")
    group.add_argument("--checkpoint", type=Path, default=None,
                       help="checkpoint for --sample (default: <out-dir>/ckpt.pt)")
    group.add_argument("--prompt", default="\n",
                       help="text the sample starts from; every character must occur in the "
                            "training text (default: a newline)")
    group.add_argument("--num-chars", type=int, default=500,
                       help="characters to generate (default: %(default)s)")
    group.add_argument("--temperature", type=float, default=1.0,
                       help="divide the logits by this before sampling; lower is more "
                            "conservative (default: %(default)s)")
    group.add_argument("--top-k", type=int, default=0,
                       help="sample among the k likeliest characters only (0 = all; "
                            "default: %(default)s)")
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    def positive_int(name, value):
        if value <= 0:
            die(f"--{name} must be a positive integer, got {value}")

    def finite(name, value, low, high, what):
        if not (low <= value <= high) or math.isnan(value):
            die(f"--{name} must be {what}, got {value}")

    for name in ("n-layer", "n-head", "n-embd", "block-size", "max-steps", "batch-size",
                 "eval-batches"):
        positive_int(name, getattr(args, name.replace("-", "_")))
    if args.n_embd % args.n_head:
        die(f"--n-embd {args.n_embd} must be a multiple of --n-head {args.n_head} "
            "(each head gets n_embd / n_head channels)")
    finite("dropout", args.dropout, 0.0, 0.99, "in [0, 1)")
    finite("lr", args.lr, 1e-12, 10.0, "a positive number at most 10")
    finite("min-lr-ratio", args.min_lr_ratio, 0.0, 1.0, "in [0, 1]")
    finite("weight-decay", args.weight_decay, 0.0, 10.0, "0 or a positive number at most 10")
    finite("grad-clip", args.grad_clip, 0.0, math.inf, "0 (off) or a positive number")
    finite("temperature", args.temperature, 1e-6, 100.0, "a positive number at most 100")
    for name in ("warmup-steps", "eval-every", "top-k", "num-chars"):
        if getattr(args, name.replace("-", "_")) < 0:
            die(f"--{name} must be 0 or positive, got {getattr(args, name.replace('-', '_'))}")
    if not args.prompt:
        die("--prompt must not be empty; give at least one character to start from")
    if args.checkpoint is None:
        args.checkpoint = args.out_dir / "ckpt.pt"
    return args


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
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
    return device


# --- data

def read_text(path):
    """The whole file as a string; a missing, unreadable, non-UTF-8 or empty file ends the run."""
    if not path.exists():
        die(f"data file {path} does not exist; pass --data with a UTF-8 text file")
    if not path.is_file():
        die(f"data path {path} is not a file; pass --data with a UTF-8 text file")
    try:
        text = path.read_bytes().decode("utf-8")
    except PermissionError:
        die(f"cannot read data file {path} (permission denied); fix its permissions or copy it")
    except OSError as err:
        die(f"cannot read data file {path} ({err.strerror}); pass --data with a readable file")
    except UnicodeDecodeError as err:
        die(f"data file {path} is not UTF-8 text (bad byte at offset {err.start}); "
            "re-encode it as UTF-8")
    if not text:
        die(f"data file {path} is empty; pass --data with some text to learn")
    return text


class Vocab:
    """The characters of the training text, sorted; a character's index is its token."""

    def __init__(self, chars):
        self.chars = "".join(chars)
        self.index = {ch: i for i, ch in enumerate(self.chars)}

    def __len__(self):
        return len(self.chars)

    def encode(self, text):
        return [self.index[ch] for ch in text]

    def decode(self, tokens):
        return "".join(self.chars[t] for t in tokens)

    def check_prompt(self, prompt):
        """die() naming the prompt's characters that the model has never seen."""
        unknown = sorted(set(prompt) - set(self.chars))
        if unknown:
            shown = " ".join(repr(ch) for ch in unknown)
            die(f"--prompt has characters not in the vocabulary of the training text: {shown}; "
                "use only characters that occur in the text")


def split_tokens(text, vocab, block_size):
    """First 90% train, last 10% val (the customary split for this corpus, so numbers compare)."""
    n = int(0.9 * len(text))
    need = block_size + 1
    if n < need or len(text) - n < need:
        die(f"the data has {len(text)} characters: too short for --block-size {block_size}, "
            f"which needs {need} in each split (about {math.ceil(need / 0.1)} in all); "
            "use a longer text or a smaller --block-size")
    data = torch.tensor(vocab.encode(text), dtype=torch.long)  # (N,)
    return data[:n], data[n:]


def get_batch(data, batch_size, block_size, generator):
    """`batch_size` random windows of `block_size` characters and the same windows shifted by
    one: the target of every position is the next character."""
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)  # (B,)
    positions = starts[:, None] + torch.arange(block_size)  # (B, T)
    # One gather each instead of B slices stacked; both come out contiguous, as the model wants.
    return data[positions], data[positions + 1]  # (B, T) inputs, (B, T) next characters


# --- model

@dataclass
class GPTConfig:
    vocab_size: int = 65
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    attention: str = "sdpa"  # "sdpa" (fused kernel) or "manual" (written out)


class CausalSelfAttention(nn.Module):
    """Every position mixes the values of the positions up to itself, weighted by how well its
    query matches their keys; n_head heads do this in parallel on slices of the channels."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.attention = config.attention
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        mask = torch.tril(torch.ones(config.block_size, config.block_size, dtype=torch.bool))
        self.register_buffer("mask", mask, persistent=False)  # (block, block), True = may look

    def forward(self, x):
        B, T, C = x.shape
        hs = C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if self.attention == "manual":
            # Scaling by 1/sqrt(hs) keeps the scores' variance near 1, so that softmax starts
            # soft instead of picking one position.
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, T, T)
            scores = scores.masked_fill(~self.mask[:T, :T], float("-inf"))  # no peeking ahead
            weights = F.softmax(scores, dim=-1)  # (B, nh, T, T), each row sums to 1
            weights = self.attn_dropout(weights)
            y = weights @ v  # (B, nh, T, hs)
        else:
            # The same four lines in one fused kernel that never stores the (T, T) weights.
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C), heads side by side
        return self.resid_dropout(self.c_proj(y))  # (B, T, C)


class MLP(nn.Module):
    """Position-wise computation on what attention gathered: widen 4x, GELU, project back."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C)


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

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))  # (B, T, C): communicate between positions
        x = x + self.mlp(self.ln_2(x))  # (B, T, C): compute at each position
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
            wpe=nn.Embedding(config.block_size, config.n_embd),  # position embeddings
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        # GPT-2 ties lm_head's weight to wte's to save V * C parameters; over 65 characters
        # that is only 8K of them, so here the two stay apart.
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
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

    def forward(self, idx, targets=None):
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x)  # (B, T, C)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, num_new, temperature=1.0, top_k=0, generator=None):
        """Append `num_new` sampled tokens to idx (B, T), one at a time, each conditioned on the
        last block_size tokens."""
        for _ in range(num_new):
            context = idx[:, -self.config.block_size:]  # (B, <=block)
            logits, _ = self(context)
            logits = logits[:, -1, :] / temperature  # (B, V), the next token only
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)  # (B, V)
            next_token = torch.multinomial(probs.cpu(), 1, generator=generator)  # (B, 1)
            idx = torch.cat([idx, next_token.to(idx.device)], dim=1)  # (B, T+1)
        return idx


# --- training and evaluation helpers

def make_optimizer(model, lr, weight_decay, device):
    """AdamW; only matrices decay (GPT-2's rule), biases and LayerNorm gains do not. The fused
    kernel updates all parameters in one call instead of a handful of ops per tensor."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device.type in ("cpu", "cuda")
    # beta2 0.99 rather than 0.999: small model, few steps, a faster-moving second moment.
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), fused=fused)


def learning_rate(step, args):
    """Linear warmup to --lr over --warmup-steps, then a cosine down to lr * min_lr_ratio at
    --max-steps."""
    min_lr = args.lr * args.min_lr_ratio
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return min_lr + 0.5 * (args.lr - min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def estimate_loss(model, splits, args, device):
    """Mean loss over --eval-batches batches per split. The batches are drawn with a fixed seed,
    so every estimate of a run sees the same text and two estimates differ only by the model."""
    model.eval()
    losses = {}
    for name, data in splits.items():
        generator = torch.Generator().manual_seed(0)
        total = 0.0
        for _ in range(args.eval_batches):
            x, y = get_batch(data, args.batch_size, args.block_size, generator)
            total += model(x.to(device), y.to(device))[1].item()
        losses[name] = total / args.eval_batches
    model.train()
    return losses


def save_checkpoint(path, model, optimizer, step, val_loss, vocab, args):
    """Everything needed to sample or to resume, in types that torch.load(weights_only=True)
    accepts; written to a temporary name, then renamed, so a crash never leaves half a file."""
    checkpoint = {
        "stage": STAGE, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "step": step, "val_loss": val_loss, "config": asdict(model.config),
        "vocab": vocab.chars, "args": {k: str(v) for k, v in vars(args).items()},
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device):
    """(model, vocab, checkpoint) from a file save_checkpoint wrote; anything else ends the run
    with a clear error."""
    if not path.exists():
        die(f"checkpoint {path} does not exist; train first (python transformer.py) or pass "
            "--checkpoint")
    if not path.is_file():
        die(f"checkpoint path {path} is not a file; pass --checkpoint with a ckpt.pt")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except PermissionError:
        die(f"cannot read checkpoint {path} (permission denied); fix its permissions")
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError,
            zipfile.BadZipFile) as err:
        die(f"checkpoint {path} is not a readable PyTorch checkpoint "
            f"({type(err).__name__}); it may be truncated or corrupt: train again")
    if not isinstance(checkpoint, dict) or checkpoint.get("stage") != STAGE:
        stage = checkpoint.get("stage") if isinstance(checkpoint, dict) else None
        die(f"checkpoint {path} was not written by transformer.py"
            + (f" but by {stage}.py" if stage else "")
            + "; pass a checkpoint from a transformer.py run")
    missing = {"model", "optimizer", "step", "val_loss", "config", "vocab"} - set(checkpoint)
    if missing:
        die(f"checkpoint {path} is incomplete (no {', '.join(sorted(missing))}); train again")
    try:
        config = GPTConfig(**checkpoint["config"])
        model = GPT(config)
        model.load_state_dict(checkpoint["model"])
        vocab = Vocab(checkpoint["vocab"])
    except (KeyError, TypeError, RuntimeError) as err:
        die(f"checkpoint {path} is incomplete or does not match this transformer.py "
            f"({type(err).__name__}); train again")
    return model.to(device), vocab, checkpoint


def sample_text(model, vocab, prompt, num_chars, temperature, top_k, seed, device):
    """The prompt followed by `num_chars` generated characters; the same seed, the same text."""
    generator = torch.Generator().manual_seed(seed)
    idx = torch.tensor([vocab.encode(prompt)], dtype=torch.long, device=device)  # (1, T)
    model.eval()
    out = model.generate(idx, num_chars, temperature, top_k, generator)  # (1, T + num_chars)
    return vocab.decode(out[0].tolist())


def write_json_atomic(path, obj):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def draw_losses(path, rows, title):
    """Train and val loss against step; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [row["step"] for row in rows]
    ax.plot(steps, [row["train_loss"] for row in rows], marker="o", label="train")
    ax.plot(steps, [row["val_loss"] for row in rows], marker="o", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per character)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return True


def prepare_out_dir(path):
    if path.exists() and not path.is_dir():
        die(f"--out-dir {path} exists and is not a directory; choose another --out-dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        die(f"cannot create --out-dir {path} ({err.strerror}); choose another --out-dir")


def print_header(device):
    print("command:", " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    print(f"python {platform.python_version()}, torch {torch.__version__}, device {device}, "
          f"{torch.get_num_threads()} CPU threads")


def sample_main(args, device):
    """--sample: generate from a checkpoint; nothing is written."""
    model, vocab, checkpoint = load_checkpoint(args.checkpoint, device)
    vocab.check_prompt(args.prompt)
    print_header(device)
    print(f"checkpoint {args.checkpoint}: step {checkpoint['step']}, "
          f"val loss {checkpoint['val_loss']:.4f}")
    text = sample_text(model, vocab, args.prompt, args.num_chars, args.temperature, args.top_k,
                       args.seed, device)
    print(text)
    return {"sample": text}


def main(args):
    device = pick_device(args.device)
    if args.sample:
        return sample_main(args, device)
    text = read_text(args.data)
    vocab = Vocab(sorted(set(text)))
    vocab.check_prompt(args.prompt)  # before training, not after it
    train_data, val_data = split_tokens(text, vocab, args.block_size)
    prepare_out_dir(args.out_dir)
    print_header(device)

    torch.manual_seed(args.seed)
    config = GPTConfig(vocab_size=len(vocab), block_size=args.block_size, n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout,
                       attention=args.attention)
    model = GPT(config).to(device)
    optimizer = make_optimizer(model, args.lr, args.weight_decay, device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{len(text):,} characters from {args.data}: {len(train_data):,} train, "
          f"{len(val_data):,} val; vocabulary of {len(vocab)} characters")
    print(f"preset {args.preset}: {config}; {n_params:,} parameters")
    print(f"{args.max_steps} steps of {args.batch_size} x {args.block_size} characters, "
          f"lr {args.lr:g} (warmup {args.warmup_steps}, cosine to {args.min_lr_ratio:g}x), "
          f"weight decay {args.weight_decay:g}, grad clip {args.grad_clip:g}")
    print(f"loss at init should be about ln({len(vocab)}) = {math.log(len(vocab)):.4f}")

    splits = {"train": train_data, "val": val_data}
    batch_gen = torch.Generator().manual_seed(args.seed)
    log = open(args.out_dir / "log.jsonl", "w", encoding="utf-8")
    rows, best = [], None
    train_seconds = 0.0  # the optimizer steps only, without evaluation and checkpoints
    started = time.time()
    for step in range(args.max_steps + 1):
        last = step == args.max_steps
        if last or (args.eval_every and step % args.eval_every == 0):
            losses = estimate_loss(model, splits, args, device)
            row = {"step": step, "seconds": round(time.time() - started, 3),
                   "train_seconds": round(train_seconds, 3), "train_loss": losses["train"],
                   "val_loss": losses["val"], "lr": learning_rate(min(step, args.max_steps - 1),
                                                                  args)}
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            if step > 0 and (best is None or row["val_loss"] < best["val_loss"]):
                best = row
                save_checkpoint(args.out_dir / "ckpt.pt", model, optimizer, step,
                                row["val_loss"], vocab, args)
            print(f"step {step:5d}  train {row['train_loss']:.4f}  val {row['val_loss']:.4f}  "
                  f"lr {row['lr']:.2e}  {row['train_seconds']:7.1f} s training "
                  f"({row['seconds']:.1f} s with evaluation)")
        if last:
            break
        step_started = time.time()
        lr = learning_rate(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = get_batch(train_data, args.batch_size, args.block_size, batch_gen)
        _, loss = model(x.to(device), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip, foreach=True)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()  # so that train_seconds measures work, not queueing
        train_seconds += time.time() - step_started
    log.close()
    seconds = time.time() - started

    model, _, _ = load_checkpoint(args.out_dir / "ckpt.pt", device)
    sample = sample_text(model, vocab, args.prompt, args.num_chars, args.temperature,
                         args.top_k, args.seed, device)
    print(f"--- a sample from the best checkpoint (step {best['step']}):")
    print(sample)
    print("---")

    figure = args.out_dir / "loss.png"
    title = f"transformer.py --preset {args.preset} on {args.data.name}"
    if not draw_losses(figure, rows, title):
        figure = None
        print("matplotlib is not installed: no figure was drawn (pip install matplotlib)")
    metrics = {
        "stage": STAGE, "preset": args.preset, "config": asdict(config), "params": n_params,
        "steps": args.max_steps, "batch_size": args.batch_size, "lr": args.lr,
        "train_seconds": round(train_seconds, 3), "seconds": round(seconds, 3),
        "ms_per_step": round(1000 * train_seconds / args.max_steps, 3),
        "best_step": best["step"], "best_val_loss": best["val_loss"],
        "final_train_loss": rows[-1]["train_loss"], "final_val_loss": rows[-1]["val_loss"],
        "vocab_size": len(vocab), "device": str(device), "threads": torch.get_num_threads(),
        "data": str(args.data), "seed": args.seed, "figure": figure and str(figure),
        "sample": sample,
    }
    write_json_atomic(args.out_dir / "metrics.json", metrics)
    print(f"best val loss {best['val_loss']:.4f} at step {best['step']}; "
          f"{train_seconds:.1f} s of training ({1000 * train_seconds / args.max_steps:.1f} ms a "
          f"step), {seconds:.1f} s with evaluation; outputs in {args.out_dir}")
    return metrics


if __name__ == "__main__":
    main(parse_args())
