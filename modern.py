"""Stage 9: what changed since GPT-2, one change at a time, measured at equal steps.

gpt2.py trains GPT-2 as it was in 2019. The trainers that reach GPT-2's loss on far fewer tokens
today (modded-nanogpt, nanochat) keep its data, loop and schedule but change the model and the
optimizer. This file is those changes, each where it happens and each a flag that turns it off:
- rotary position embeddings instead of the learned position table (RoFormer, Su et al. 2021);
- RMSNorm without parameters instead of LayerNorm (Zhang & Sennrich 2019), also on the embeddings;
- QK-norm: queries and keys normalised before their dot product (Henry et al. 2020);
- ReLU^2 in the MLP instead of GELU (Primer, So et al. 2021);
- no biases; an output layer of its own (untied from the embedding);
- zero-initialised output projections; logits soft-capped by a tanh (Gemma 2, 2024);
- Muon: momentum orthogonalised by a Newton-Schulz iteration for the blocks' matrices (Jordan et
  al. 2024), AdamW for the embedding and the output layer, each with its own learning rate.
And DeepSeek-V3's two ideas (2024) as flags that are off by default: --moe (fine-grained experts,
a shared one, balanced without an auxiliary loss) and --mtp (predicting a second token ahead).

The data, the loop, evaluation, checkpoints, exact resumes, SIGTERM saves, sampling with the KV
cache and --token-losses are gpt2.py's, imported: `diff` of the two models is the lesson.

Run (the same shards, batches, steps and evaluation as gpt2.py's cpu preset, so they compare):
    python fineweb.py --dataset data/shakespeare.txt --out-dir data/shards/shakespeare \\
        --shard-size 50000
    python modern.py --preset cpu --data data/shards/shakespeare --token-losses --hardest 3
    python modern.py --preset cpu --data data/shards/shakespeare --no-muon \
        --out-dir out/modern-no-muon   # one ablation
    python modern.py --sample --init-from out/modern/checkpoint.pt --prompt "ROMEO:"
The 124M shape on GPUs (bf16, compile): `torchrun --standalone --nproc_per_node=8 modern.py`.

Measured on the 2-core development machine (Intel Xeon, torch 2.13, 2026-12-02; each run with
--threads 1 beside another): the cpu preset's val loss is 6.0728, 5.6201, 5.4295 at steps 50,
100, 200, where gpt2.py's is 6.6959, 6.2937, 6.1805 (gpt2.py's final loss by step 50, in 0.34x
its training time); 848 tokens/s against gpt2.py's 1,026. README.md's "Stage 9" has the table
of each change removed one at a time, and of --moe and --mtp added.
"""
import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common
import gpt2
from common import die

STAGE = "modern"


# --- model

@dataclass
class ModernConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    # The changes since GPT-2, each on; the command line's --no-<name> turns one off.
    rope: bool = True
    rmsnorm: bool = True
    qk_norm: bool = True
    relu2: bool = True
    bias_free: bool = True
    untied: bool = True
    zero_init: bool = True
    softcap: float = 10.0  # 0: no cap
    rope_base: float = 10000.0
    # DeepSeek-V3's ideas, off unless asked for.
    moe: bool = False
    n_experts: int = 8
    active_experts: int = 2  # routed experts per token, beside the shared one
    mtp: bool = False
    mtp_weight: float = 0.3


def rms_norm(x):
    """x / RMS(x) over the channels, no gain, no bias: LayerNorm's rescaling without its centring
    and without the parameters, which a residual stream read by matrices does not need."""
    return F.rms_norm(x, (x.size(-1),))


class Norm(nn.Module):
    """The normalisation before each sublayer: RMSNorm (no parameters), or with --no-rmsnorm
    GPT-2's LayerNorm (a gain and a bias per channel)."""

    def __init__(self, config):
        super().__init__()
        self.ln = None if config.rmsnorm else nn.LayerNorm(config.n_embd)

    def forward(self, x):
        return rms_norm(x) if self.ln is None else self.ln(x)


def rotary_tables(block_size, head_size, base=10000.0):
    """cos and sin (block_size, head_size / 2) of RoPE's angles: position p turns channel pair i
    by p * base^(-2i / head_size), fast turns for the first pairs, slow ones for the last."""
    inv_freq = base ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)  # (T, hs/2)
    return angles.cos(), angles.sin()


def rotate(x, cos, sin):
    """Rotary position embedding (RoFormer, Su et al. 2021) of x (B, T, nh, hs) at the positions
    whose cos and sin (T, hs/2) are given: channel pairs (i, i + hs/2) turn by their angles. A
    query at p and a key at s then meet as q R(p)^T R(s) k = q R(s - p) k: attention sees how far
    apart two tokens are, not where they are, and nothing is added to the residual stream."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, T, nh, hs/2) each
    cos, sin = cos[None, :, None].to(x.dtype), sin[None, :, None].to(x.dtype)  # (1, T, 1, hs/2)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, T, nh, hs)


class CausalSelfAttention(nn.Module):
    """gpt2.py's attention, with queries and keys normalised and rotated before they meet."""

    def __init__(self, config):
        super().__init__()
        self.n_head, self.rope, self.qk_norm = config.n_head, config.rope, config.qk_norm
        bias = not config.bias_free
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=bias)

    def forward(self, x, rotary=None, cache=None, layer=0):
        B, T, C = x.shape
        hs = C // self.n_head
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, hs).unbind(2)  # 3 x (B, T, nh, hs)
        if self.qk_norm:
            # QK-norm (Henry et al. 2020): each head's query and key at unit RMS, so that their
            # dot products, the softmax's inputs, cannot grow without bound as the weights do;
            # it lets the larger learning rates of Muon train without loss spikes.
            q, k = rms_norm(q), rms_norm(k)  # (B, T, nh, hs) each
        if self.rope:
            q, k = rotate(q, *rotary), rotate(k, *rotary)  # (B, T, nh, hs) each
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:  # gpt2.py's cache: a prompt, then one token a step
            assert cache.pos == 0 or T == 1, "the cache takes a prompt, then one token a step"
            k, v = cache.append(layer, k, v)  # (B, nh, pos + T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)  # (B, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class MLP(nn.Module):
    """Widen, ReLU^2 (Primer, So et al. 2021: relu(x)^2 beat GELU in their search over
    Transformer variants, at no extra cost), project back. --no-relu2: GPT-2's GELU."""

    def __init__(self, config, hidden=None):
        super().__init__()
        bias, self.relu2 = not config.bias_free, config.relu2
        hidden = hidden or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=bias)

    def forward(self, x):
        h = self.c_fc(x)  # (..., hidden)
        h = F.relu(h).square() if self.relu2 else F.gelu(h, approximate="tanh")
        return self.c_proj(h)  # (..., C)


class MoE(nn.Module):
    """DeepSeek-V3's mixture of experts (--moe) in place of the MLP: one shared expert that every
    token goes through, and n_experts small routed ones of which each token takes the
    active_experts with the highest affinity. Each expert is a smaller MLP (fine-grained
    experts): shared plus active ones cost what the dense MLP costs, with several times its
    parameters. Balance without an auxiliary loss: a bias per expert is added to the affinities
    only to choose the experts (not to weight them), and after each step it is nudged up for
    the experts that got less than an even share of the tokens and down for the others."""

    def __init__(self, config):
        super().__init__()
        self.k = config.active_experts
        hidden = 4 * config.n_embd // (self.k + 1)  # shared + k routed = the dense MLP's width
        self.shared = MLP(config, hidden)
        self.experts = nn.ModuleList(MLP(config, hidden) for _ in range(config.n_experts))
        self.router = nn.Linear(config.n_embd, config.n_experts, bias=False)
        # A buffer, not a parameter: no gradient moves it, and checkpoints keep it.
        self.register_buffer("balance_bias", torch.zeros(config.n_experts))
        self.load = None  # (n_experts,) tokens each expert took since the last step

    def route(self, flat):
        """(chosen experts (N, k), their weights (N, k), summing to 1) for tokens flat (N, C)."""
        affinity = torch.sigmoid(self.router(flat).float())  # (N, E), as V3: sigmoid, not softmax
        chosen = torch.topk(affinity + self.balance_bias, self.k, dim=1).indices  # (N, k)
        gates = affinity.gather(1, chosen)  # (N, k): the bias chose, the affinity weighs
        return chosen, gates / gates.sum(dim=1, keepdim=True)

    def forward(self, x):
        B, T, C = x.shape
        flat = x.reshape(B * T, C)  # (N, C)
        chosen, gates = self.route(flat)  # (N, k) each
        if torch.is_grad_enabled():  # training's passes count; evaluation and sampling do not
            counts = torch.bincount(chosen.flatten(), minlength=len(self.experts)).float()
            self.load = counts if self.load is None else self.load + counts  # (E,)
        out = self.shared(flat)  # (N, C)
        for e, expert in enumerate(self.experts):
            # The tokens sent to expert e. An expert that got none still runs, on zero rows:
            # its gradient is then zeros, not missing, which DDP needs from every parameter.
            rows, slot = torch.where(chosen == e)  # (n,) each
            y = expert(flat[rows]) * gates[rows, slot, None]  # (n, C), weighted
            out = out.index_add(0, rows, y.to(out.dtype))  # (N, C)
        return out.view(B, T, C)

    @torch.no_grad()
    def balance(self, rate):
        """After an optimizer step: nudge each expert's bias by `rate` toward an even load; returns
        each expert's share of the step's tokens (all ranks)."""
        load = self.load if self.load is not None else self.balance_bias.new_zeros(
            len(self.experts))
        if dist.is_initialized():
            dist.all_reduce(load)  # every rank nudges its copy of the biases alike
        self.balance_bias += rate * torch.sign(load.mean() - load)  # under-used experts: up
        self.load = None
        return load / load.sum().clamp(min=1)


class Block(nn.Module):
    """gpt2.py's pre-norm block; the rotary angles travel with the input."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = Norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = Norm(config)
        self.mlp = MoE(config) if config.moe else MLP(config)

    def forward(self, x, rotary=None, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), rotary, cache, layer)  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class MTP(nn.Module):
    """DeepSeek-V3's multi-token prediction (--mtp), one token further: at position i, the main
    model's output h_i and the embedding of token i+1 (known in training) are normalised, joined
    by a matrix and passed through one more block, whose output the shared output layer turns
    into a prediction of token i+2. Its loss, weighted by mtp_weight, adds a denser training
    signal; sampling never uses it."""

    def __init__(self, config):
        super().__init__()
        self.proj = nn.Linear(2 * config.n_embd, config.n_embd, bias=not config.bias_free)
        self.block = Block(config)
        self.norm = Norm(config)

    def forward(self, h, next_embedding, rotary=None):
        x = self.proj(torch.cat([rms_norm(h), rms_norm(next_embedding)], dim=-1))  # (B, T, C)
        return self.norm(self.block(x, rotary))  # (B, T, C)


class OutputLayer(nn.Linear):
    """The logits, soft-capped: softcap * tanh(logits / softcap) is the identity for small logits
    and never exceeds softcap, so no token can be pushed to an extreme logit early in training
    (Gemma 2, 2024; modded-nanogpt). softcap 0: plain logits."""

    def __init__(self, n_embd, vocab_size, softcap):
        super().__init__(n_embd, vocab_size, bias=False)
        self.softcap = softcap

    def forward(self, x):
        logits = super().forward(x)  # (..., V)
        if not self.softcap:
            return logits
        return self.softcap * torch.tanh(logits.float() / self.softcap)  # (..., V)


class ModernGPT(nn.Module):
    """gpt2.py's GPT with the changes above. The same interface (hidden_states, lm_head,
    forward, generate with gpt2.py's KV cache), so gpt2.py's trainer, sampler and HellaSwag
    take it as they take a GPT."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        C = config.n_embd
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, C),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=Norm(config),
        ))
        if not config.rope:  # --no-rope: GPT-2's learned table of positions
            self.transformer.wpe = nn.Embedding(config.block_size, C)
        self.lm_head = OutputLayer(C, config.vocab_size, config.softcap)
        if not config.untied:  # --no-untied: GPT-2's tying of the output layer to wte
            self.lm_head.weight = self.transformer.wte.weight
        self.mtp = MTP(config) if config.mtp else None
        # Not parameters, and not saved: they follow from the config.
        cos, sin = rotary_tables(config.block_size, C // config.n_head, config.rope_base)
        self.register_buffer("cos", cos, persistent=False)  # (block_size, hs/2)
        self.register_buffer("sin", sin, persistent=False)
        self._init_weights()

    def _init_weights(self):
        config = self.config
        for name, p in self.named_parameters():
            if p.dim() < 2:  # biases and LayerNorm's parameters (--no-bias-free, --no-rmsnorm)
                nn.init.ones_(p) if name.endswith("ln.weight") else nn.init.zeros_(p)
            elif name.endswith("wte.weight") or name.endswith("wpe.weight"):
                # A normalised input makes their scale free: unit entries (nanochat). Tied to the
                # output layer, GPT-2's 0.02, or the first logits would be huge.
                nn.init.normal_(p, std=1.0 if config.untied else 0.02)
            elif name == "lm_head.weight" or name.endswith("c_proj.weight"):
                # Zero-initialised outputs (modded-nanogpt): each block starts as the identity
                # and the first logits are uniform. Their inputs are not zero, so their
                # gradients are not: the head moves at the first step, the blocks from the
                # second. --no-zero-init: GPT-2's 0.02 for the head, its depth-scaled init for
                # the projections.
                std = 0.02 if name == "lm_head.weight" else (
                    p.size(1) ** -0.5 / math.sqrt(2 * config.n_layer))
                nn.init.zeros_(p) if config.zero_init else nn.init.normal_(p, std=std)
            else:  # the matrices that read the residual stream: unit-variance outputs
                nn.init.normal_(p, std=p.size(1) ** -0.5)

    def rotary(self, start, T):
        """cos and sin of positions start..start+T-1, or None without RoPE."""
        return (self.cos[start:start + T], self.sin[start:start + T]) if self.config.rope else None

    def hidden_states(self, idx, cache=None):
        """The final norm's output (B, T, C) for tokens idx (B, T); with gpt2.py's KV cache, the
        rotary positions continue after the cached tokens."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        assert start + T <= self.config.block_size, "longer than the model's block size"
        x = self.transformer.wte(idx)  # (B, T, C)
        if not self.config.rope:
            x = x + self.transformer.wpe(torch.arange(start, start + T, device=idx.device))
        if self.config.rmsnorm:
            x = rms_norm(x)  # (B, T, C): the embeddings enter at unit RMS
        rotary = self.rotary(start, T)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, rotary, cache, layer)  # (B, T, C)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)  # (B, T, C)

    # gpt2.py's: the logits (lm_head of hidden_states) and their loss, and the sampler.
    forward = gpt2.GPT.forward
    generate = gpt2.GPT.generate

    def estimate_mfu(self, tokens_per_s, seq_len, peak_tflops):
        """gpt2.py's MFU: 6 FLOPs per weight a token meets in a matmul (the embeddings are looked
        up; of the routed experts, only its active ones) plus attention's."""
        config = self.config
        weights = sum(p.numel() for name, p in self.named_parameters()
                      if p.dim() == 2 and "wte" not in name and "wpe" not in name
                      and not name.startswith("mtp."))
        if config.moe:
            routed = sum(p.numel() for block in self.transformer.h
                         for p in block.mlp.experts.parameters())
            weights -= routed * (1 - config.active_experts / config.n_experts)
        flops = 6 * weights + 12 * config.n_layer * config.n_embd * seq_len
        return flops * tokens_per_s / (peak_tflops * 1e12)


# --- optimizer

def orthogonalize(g, steps=5):
    """The nearest semi-orthogonal matrix to g (U V^T of its SVD U S V^T), approximately, by a
    Newton-Schulz iteration: matmuls only, so fast on any device. The quintic's coefficients
    (Jordan et al. 2024) push every singular value toward 1 as fast as possible rather than
    exactly: they end in about [0.7, 1.2], which trains as well."""
    a, b, c = 3.4445, -4.7750, 2.0315
    # bf16 is enough, on GPUs with bf16 tensor cores (Ampere on); CPUs and older GPUs lack them
    fast = g.is_cuda and torch.cuda.get_device_capability(g.device)[0] >= 8
    x = g.bfloat16() if fast else g.float()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T  # (small, large): x @ x.T is the small square
    x = x / (x.norm() + 1e-7)  # every singular value <= the Frobenius norm = 1
    for _ in range(steps):
        s = x @ x.T  # (m, m)
        x = a * x + (b * s + c * s @ s) @ x  # each singular value s -> a s + b s^3 + c s^5
    return (x.T if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024) for 2-D weights: SGD with Nesterov momentum whose update is
    orthogonalised, so that it moves every direction of the matrix by the same amount instead of
    mostly the few directions with the largest gradients (the rare directions learn too). The
    update's scale is then fixed by lr alone, with sqrt(rows / cols) for tall matrices so that
    each row's change is alike."""

    def __init__(self, params, lr=0.02, momentum=0.95, ns_steps=5):
        super().__init__(params, dict(lr=lr, momentum=momentum, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum" not in state:
                    state["momentum"] = torch.zeros_like(p.grad)
                buf = state["momentum"]
                buf.mul_(group["momentum"]).add_(p.grad)  # (rows, cols)
                g = p.grad.add(buf, alpha=group["momentum"])  # Nesterov: a step ahead
                update = orthogonalize(g, group["ns_steps"])  # (rows, cols)
                p.add_(update, alpha=-group["lr"] * max(1, p.size(0) / p.size(1)) ** 0.5)


class Optimizers:
    """Muon and AdamW stepping as one optimizer for gpt2.py's loop: their groups side by side in
    param_groups (the loop sets each group's lr from the schedule times its lr_scale), one step,
    one state."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):  # read anew: load_state_dict replaces each optimizer's groups
        return [group for opt in self.optimizers for group in opt.param_groups]

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self):
        for opt in self.optimizers:
            opt.step()

    def state_dict(self):
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state):
        if len(state["optimizers"]) != len(self.optimizers):
            raise ValueError("the checkpoint's optimizers differ from this run's (--muon)")
        for opt, saved in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(saved)


def configure_optimizer(model, args, device):
    """Muon for the matrices inside the blocks (the MTP module's too), AdamW for the rest: the
    embeddings (--embedding-lr: each row moves only when its token occurs), the output layer
    (--head-lr), vectors (--adam-lr). --no-muon: AdamW with GPT-2's weight decay for the block
    matrices too, at --adam-lr. Every group follows --lr's schedule, scaled to its own peak."""
    embeddings = [model.transformer.wte.weight] + (
        [model.transformer.wpe.weight] if "wpe" in model.transformer else [])
    head = [model.lm_head.weight] if model.config.untied else []
    ids = {id(p) for p in embeddings + head}
    matrices = [p for p in model.parameters() if p.dim() == 2 and id(p) not in ids]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    tied = not model.config.untied  # the one matrix reads and writes tokens: the head's rate
    adam_groups = [
        dict(params=embeddings, lr_scale=(args.head_lr if tied else args.embedding_lr) / args.lr),
        dict(params=head, lr_scale=args.head_lr / args.lr),
        dict(params=vectors, lr_scale=args.adam_lr / args.lr)]
    if not args.muon:
        adam_groups.append(dict(params=matrices, lr_scale=args.adam_lr / args.lr,
                                weight_decay=args.weight_decay))
    adam = torch.optim.AdamW([g for g in adam_groups if g["params"]], lr=args.lr,
                             betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0,
                             fused=device.type in ("cpu", "cuda") or None)
    if not args.muon:
        return Optimizers(adam)
    return Optimizers(Muon([dict(params=matrices, lr_scale=1.0)], lr=args.lr,
                           momentum=args.momentum), adam)


# --- training

class TrainingLoss(nn.Module):
    """The training step's loss: the next token's, plus (--mtp) mtp_weight times the MTP module's
    loss on the token after it; evaluation's val loss is the next token's alone. On a CPU in
    float32 the output layer runs through gpt2.py's fused, chunked loss (with the soft cap), as
    gpt2.py trains. No weights of its own: DDP wraps it, checkpoints hold the model's."""

    def __init__(self, gpt, fused):
        super().__init__()
        self.gpt, self.fused = gpt, fused

    def head_loss(self, h, targets):
        """(mean loss, (B, T) losses) of the output layer on h (B, T, C)."""
        B, T, C = h.shape
        if self.fused:
            loss, losses = gpt2.LinearCrossEntropy.apply(
                h.reshape(B * T, C), self.gpt.lm_head.weight, targets.reshape(B * T),
                gpt2.FusedLossGPT.CHUNK, self.gpt.config.softcap)
            return loss, losses.view(B, T)
        logits = self.gpt.lm_head(h)  # (B, T, V)
        losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.reshape(B * T),
                                 reduction="none")  # (B*T,)
        return losses.mean(), losses.detach().view(B, T)

    def forward(self, idx, targets, per_token=False):
        gpt = self.gpt
        h = gpt.hidden_states(idx)  # (B, T, C)
        loss, losses = self.head_loss(h, targets)
        if gpt.mtp is not None:
            # Position i joins h_i with token i+1 (targets[:, i]) to predict token i+2.
            T = idx.size(1)
            h2 = gpt.mtp(h[:, :-1], gpt.transformer.wte(targets[:, :-1]), gpt.rotary(0, T - 1))
            loss = loss + gpt.config.mtp_weight * self.head_loss(h2, targets[:, 1:])[0]
        return (None, loss, losses) if per_token else (None, loss)


def training_models(model, device, dtype, use_compile):
    """(the val loss's model, the training step's), as gpt2.training_models: compiled where
    asked, else the fused loss on a CPU in float32."""
    fused = device.type == "cpu" and dtype == torch.float32 and not use_compile
    train_model = TrainingLoss(model, fused)
    if use_compile:
        return torch.compile(model), torch.compile(train_model)
    return model, train_model


def balance_experts(model, rate):
    """After each step (--moe): nudge every MoE layer's biases toward an even load; log each
    layer's share of tokens per expert and the busiest expert's share over an even one."""
    loads = [m.balance(rate).tolist() for m in model.modules() if isinstance(m, MoE)]
    if not loads:
        return {}
    busiest = max(max(load) for load in loads) * len(loads[0])  # 1.0: perfectly even
    return {"expert_load": [[round(x, 4) for x in load] for load in loads],
            "expert_max_over_even": round(busiest, 4)}


def main(args):
    """gpt2.py's trainer (data, loop, evaluation, checkpoints, resume, SIGTERM, samples, the
    modes without training) with this file's model, optimizer and loss."""
    return gpt2.main(args, recipe(args))


# --- what gpt2.py's trainer takes from this file

def model_config(args):
    """A new model's config from the flags."""
    return dict(block_size=args.block_size, vocab_size=args.vocab_size, n_layer=args.n_layer,
                n_head=args.n_head, n_embd=args.n_embd, rope=args.rope, rmsnorm=args.rmsnorm,
                qk_norm=args.qk_norm, relu2=args.relu2, bias_free=args.bias_free,
                untied=args.untied, zero_init=args.zero_init, softcap=args.softcap,
                moe=args.moe, n_experts=args.n_experts, active_experts=args.active_experts,
                mtp=args.mtp, mtp_weight=args.mtp_weight)


def load_model(source, device="cpu"):
    """A ModernGPT in eval mode from a modern.py checkpoint, or an --out-dir holding one."""
    path = Path(source)
    path = path / "checkpoint.pt" if (path / "checkpoint.pt").is_file() else path
    hint = "pass --init-from with a modern.py checkpoint (gpt2.py's load with gpt2.py)"
    checkpoint = common.load_checkpoint(path, STAGE, hint, needs=("config", "model"))
    try:
        model = ModernGPT(ModernConfig(**checkpoint["config"]))
        model.load_state_dict(checkpoint["model"])
    except (TypeError, RuntimeError) as err:
        die(f"checkpoint {path} does not fit this modern.py ({type(err).__name__}: its config "
            f"or weights differ); {hint}")
    return model.to(device).eval()


def recipe(args):
    """What gpt2.py's main trains: this file's model, optimizer, loss and expert balancing."""
    return gpt2.Recipe(STAGE, model_config, lambda config: ModernGPT(ModernConfig(**config)),
                       load_model, configure_optimizer, training_models,
                       lambda model: balance_experts(model, args.balance_rate))


# --- command line

# gpt2.py's cpu presets (the same data, batches, steps and evaluation) and its 124M shape, with
# this file's learning rates: --lr is Muon's.
LRS = dict(lr=0.02, embedding_lr=0.05, head_lr=0.004, adam_lr=2e-3)
PRESETS = {
    "gpt2": dict(gpt2.PRESETS["gpt2"], **LRS),
    "cpu": dict(gpt2.PRESETS["cpu"], **LRS),
    "cpu-tiny": dict(gpt2.PRESETS["cpu-tiny"], **LRS),
}


def parse_args(argv=None):
    parser = gpt2.make_parser(STAGE, "Pre-train GPT-2 with what changed since 2019: RoPE, "
                              "RMSNorm, QK-norm, ReLU^2, Muon (python or torchrun).", PRESETS,
                              "gpt2 (124M, GPUs), or cpu, cpu-tiny for a laptop", hf=False)
    preset = lambda key: common.by_preset(PRESETS, key)  # noqa: E731
    on = dict(action=argparse.BooleanOptionalAction, default=True)
    changes = parser.add_argument_group("what changed since GPT-2 (each on by default; --no-X "
                                        "turns X off for an ablation)")
    changes.add_argument("--rope", **on, help="rotary position embeddings instead of wpe")
    changes.add_argument("--rmsnorm", **on,
                         help="RMSNorm without parameters instead of LayerNorm")
    changes.add_argument("--qk-norm", **on, help="normalise queries and keys")
    changes.add_argument("--relu2", **on, help="ReLU^2 in the MLP instead of GELU")
    changes.add_argument("--bias-free", **on, help="no biases in the linear layers")
    changes.add_argument("--untied", **on, help="an output layer of its own, not wte")
    changes.add_argument("--zero-init", **on,
                         help="output projections and the output layer start at zero")
    changes.add_argument("--softcap", type=float, default=10.0,
                         help="cap the logits at softcap * tanh(logits / softcap) (0: off; "
                         "default: %(default)s)")
    changes.add_argument("--muon", **on,
                         help="Muon for the blocks' matrices, without weight decay (off: AdamW "
                         "at --adam-lr, with --weight-decay, which acts only then)")
    opt = parser.add_argument_group("learning rates (--lr is Muon's; each group follows its "
                                    "warmup and cosine, scaled to its own peak)")
    opt.add_argument("--embedding-lr", type=float, help="AdamW's for wte " + preset("embedding_lr"))
    opt.add_argument("--head-lr", type=float, help="AdamW's for the output layer (and a tied wte) "
                     + preset("head_lr"))
    opt.add_argument("--adam-lr", type=float, help="AdamW's for vectors, and for the block "
                     "matrices with --no-muon " + preset("adam_lr"))
    opt.add_argument("--momentum", type=float, default=0.95,
                     help="Muon's momentum (default: %(default)s)")
    v3 = parser.add_argument_group("DeepSeek-V3's ideas (off by default; the experts' flags act "
                                   "with --moe, --mtp-weight with --mtp)")
    v3.add_argument("--moe", action="store_true",
                    help="a shared expert and routed experts in place of each MLP")
    v3.add_argument("--n-experts", type=int, default=8,
                    help="routed experts per layer (default: %(default)s)")
    v3.add_argument("--active-experts", type=int, default=2,
                    help="routed experts per token (default: %(default)s)")
    v3.add_argument("--balance-rate", type=float, default=1e-3,
                    help="the step by which each expert's routing bias moves after each "
                    "optimizer step (V3's 0.001; default: %(default)s)")
    v3.add_argument("--mtp", action="store_true",
                    help="multi-token prediction: a module that predicts one token further")
    v3.add_argument("--mtp-weight", type=float, default=0.3,
                    help="the MTP loss's weight in training (V3's 0.3; default: %(default)s)")
    args = gpt2.finish_args(parser.parse_args(argv), PRESETS)
    common.check_args(args, positive=("embedding_lr", "head_lr", "adam_lr", "n_experts",
                                      "active_experts"),
                      non_negative=("softcap", "balance_rate", "mtp_weight"),
                      ranges=(("momentum", 0, 1),))
    if args.moe and args.active_experts > args.n_experts:
        die(f"--active-experts {args.active_experts} is more than --n-experts "
            f"{args.n_experts}; lower it")
    if args.rope and (args.n_embd // args.n_head) % 2:
        die(f"RoPE turns channel pairs: n_embd / n_head = {args.n_embd // args.n_head} must be "
            "even; change --n-embd or --n-head, or pass --no-rope")
    return args


if __name__ == "__main__":
    main(parse_args())
