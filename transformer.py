"""Stage 5: a character-level GPT, the decoder-only Transformer, trained on Shakespeare.

wavenet.py merged neighbouring characters through a fixed tree. A Transformer lets every
position look at every earlier one at once and learn from the data which ones matter:
self-attention (Vaswani et al., 2017) in the decoder-only GPT (Radford et al., 2018) with GPT-2's
pre-LayerNorm blocks (2019): token + position embeddings, N blocks of [LayerNorm -> causal
multi-head self-attention -> residual add, LayerNorm -> 4x MLP with GELU -> residual add], a
final LayerNorm and a linear head over the characters. Attention is written out step by step
(--attention manual); by default the same computation runs in torch's fused kernel (a test
checks they agree). The modules carry GPT-2's names, so that `diff transformer.py gpt2.py` shows
what the next stage adds. Training: AdamW, warmup then cosine decay, gradient clipping, dropout;
the loss on fixed train and val batches every --eval-every steps; the best checkpoint is kept.

Run:
    python transformer.py --preset quick     # CPU, about a minute
    python transformer.py                    # --preset cpu: CPU, a few minutes
    python transformer.py --preset gpu       # one GPU: 6 layers, 6 heads, 384 wide, block 256
    python transformer.py --data path/to/tinyshakespeare.txt   # the canonical corpus
    python transformer.py --sample --prompt "ROMEO:" --sample-tokens 500 --top-k 20

Measured on the canonical tiny Shakespeare (first 90% train, last 10% val) on 2 CPU cores, torch
2.13, default flags (2026-11-25): quick val 1.8643 after 66 s of training, cpu 1.6084 after 275 s
(1.8864 and 1.7182 on the bundled data/shakespeare.txt, whose last 10% is harder). nanoGPT's own
figures: its CPU recipe 1.8857; its GPU configuration (the gpu preset) 1.4697 on an A100 in 3 min.
Ctrl-C ends training early: the run still evaluates, samples and writes its outputs.

Outputs in --out-dir (default out/transformer): log.jsonl (a record a step, one an evaluation),
metrics.json, loss.png, checkpoint.pt (the best model, its optimizer, step, config, vocabulary).
"""
import functools
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import die

STAGE = "transformer"


# --- model

@dataclass
class GPTConfig:
    block_size: int = 64
    vocab_size: int = 65  # the characters of tiny Shakespeare
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
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout, self.attention = config.dropout, config.attention
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
            y = self.attn_dropout(weights) @ v  # (B, nh, T, hs)
        else:
            # The same four lines in one fused kernel: the (T, T) weights are never stored.
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
    """Tokens in, next-token logits out: embeddings, a stack of blocks, a final LayerNorm, and
    a linear map from the residual stream to one logit per token of the vocabulary."""

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
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # GPT-2 ties lm_head's weight to wte's to save V * C parameters; over 65 characters
        # that is only 8K of them, so here the two stay apart.
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

    def hidden_states(self, idx):
        """The final LayerNorm's output (B, T, C) for tokens idx (B, T): the logits are this
        times lm_head's weight."""
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x)  # (B, T, C)
        return self.transformer.ln_f(x)  # (B, T, C)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        logits = self.lm_head(self.hidden_states(idx))  # (B, T, V)
        loss = None
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
        # beta2 0.99 rather than 0.999: small model, few steps, a faster-moving second moment.
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), fused=fused or None)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Append `max_new_tokens` tokens to idx (B, T), sampled one at a time (temperature 0:
        the likeliest), each from the logits of the last block_size tokens."""
        for _ in range(max_new_tokens):
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
        return idx


# --- data

class Vocab:
    """The characters of the training text, sorted; a character's index is its token."""

    def __init__(self, chars):
        self.chars = "".join(chars)
        self.index = {ch: i for i, ch in enumerate(self.chars)}

    def encode(self, text):
        unknown = sorted(set(text) - set(self.chars))
        if unknown:  # a character the model has never seen has no token
            die(f"--prompt has characters not in the vocabulary of the training text: "
                f"{' '.join(map(repr, unknown))}; use only characters that occur in the text")
        return [self.index[ch] for ch in text]

    def decode(self, tokens):
        return "".join(self.chars[t] for t in tokens)


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


class WindowLoader:
    """Batches of B random windows of T characters from one split, and the same windows shifted
    by one: the target of every position is the next character. The windows come from a seeded
    generator, and reset() seeds it again, so that every loss estimate sees the same text."""

    def __init__(self, data, batch_size, seq_len, seed):
        self.data, self.B, self.T, self.seed = data, batch_size, seq_len, seed
        self.reset()

    def reset(self):
        self.generator = torch.Generator().manual_seed(self.seed)

    def next_batch(self):
        starts = torch.randint(len(self.data) - self.T, (self.B,), generator=self.generator)
        positions = starts[:, None] + torch.arange(self.T)  # (B, T)
        # One gather each, not B slices stacked; both come out contiguous, as the model wants.
        x = self.data[positions]  # (B, T) inputs
        y = self.data[positions + 1]  # (B, T) targets: the next character at every position
        return x, y


def open_data(args):
    """(train loader, the loss estimates' loaders of both splits, vocabulary), from the flags.
    The estimates take the same batches every time (seed 0); training draws its own."""
    text = common.read_text(args.data, "a UTF-8 text file")
    vocab = Vocab(sorted(set(text)))
    train_data, val_data = split_tokens(text, vocab, args.block_size)
    train = WindowLoader(train_data, args.batch_size, args.block_size, args.seed)
    evals = {name: WindowLoader(data, args.batch_size, args.block_size, seed=0)
             for name, data in (("train_split", train_data), ("val", val_data))}
    return train, evals, vocab


# --- training

def learning_rate(step, max_lr, warmup_steps, max_steps, min_lr_ratio=0.1):
    """Linear warmup to max_lr over warmup_steps, then a cosine down to max_lr * min_lr_ratio
    at max_steps (and flat after it)."""
    min_lr = max_lr * min_lr_ratio
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_step(model, optimizer, loader, device, grad_clip):
    """One optimizer step on one batch; returns its loss."""
    optimizer.zero_grad(set_to_none=True)
    x, y = loader.next_batch()
    _, loss = model(x.to(device), y.to(device))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf, foreach=True)
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def estimate_loss(model, loader, batches, device):
    """Mean loss over the first `batches` batches of a loader (the same ones every time),
    with dropout off."""
    loader.reset()
    model.eval()
    total = 0.0
    for _ in range(batches):
        x, y = loader.next_batch()
        total += model(x.to(device), y.to(device))[1].item()
    model.train()
    return total / batches


def sample_texts(model, tokens, count, max_new_tokens, temperature, top_k, generator, decode):
    """`count` continuations of the prompt's tokens, as text; the same seed, the same text."""
    idx = torch.tensor([tokens] * count, dtype=torch.long,
                       device=next(model.parameters()).device)  # (count, T)
    model.eval()
    out = model.generate(idx, max_new_tokens, temperature, top_k or None, generator)
    model.train()
    return [decode(row) for row in out.tolist()]


def main(args):
    device = common.pick_device(args.device, threads=args.threads)
    if args.sample:
        return other_modes(args, device)

    # Every input is checked before anything is written.
    train_loader, eval_loaders, vocab = open_data(args)
    torch.manual_seed(args.seed)
    model = GPT(GPTConfig(block_size=args.block_size, vocab_size=len(vocab.chars),
                          n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                          dropout=args.dropout, attention=args.attention))
    prompt = vocab.encode(args.prompt)
    common.prepare_out_dir(args.out_dir, "checkpoint.pt", args.overwrite)
    common.print_header(device)

    model.to(device)
    optimizer = model.configure_optimizer(args.lr, args.weight_decay, device)
    print(f"preset {args.preset}: {model.config}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters; {len(train_loader.data):,} "
          f"characters to train on; the loss at init should be about ln({len(vocab.chars)}) = "
          f"{math.log(len(vocab.chars)):.4f}")
    log = common.Log(args.out_dir / "log.jsonl")

    timer, best, stopped = common.StepTimer(args.batch_size * args.block_size), None, None
    # Ctrl-C or SIGTERM: the loop ends after its step, and the run still evaluates and samples.
    with common.StopSignals() as signals:
        for step in range(args.max_steps + 1):
            last = step == args.max_steps or signals.received is not None
            # gpt2.py saves its latest weights first (a long run resumes from them); this stage
            # keeps its best ones, since a small corpus is soon overfit and the val loss turns up
            # (nanoGPT keeps the best for this reason), so here saving follows the evaluation.
            if last or (args.eval_every and step % args.eval_every == 0):
                evaluation = {f"{split}_loss": estimate_loss(model, loader, args.eval_batches,
                                                             device)
                              for split, loader in eval_loaders.items()}
                log({"step": step, **evaluation, "seconds": timer.seconds(),
                     "train_seconds": round(timer.total, 3)})
                common.print_step(step, *(f"{k} {v:.4f}" for k, v in evaluation.items()),
                                  f"{timer.total:.1f} s training ({timer.seconds():.1f} s in all)")
                val_loss = evaluation["val_loss"]
                if (step > 0 or last) and (best is None or val_loss < best["val_loss"]):
                    best = log.records[-1]
                    save_checkpoint(args, model, optimizer, vocab, step, val_loss)
            if last:  # the sample: from the best checkpoint, after the last evaluation
                stopped = signals.received
                if stopped:
                    print(f"received {stopped}: training stopped at step {step}")
                best_model, _, _ = load_model(args.out_dir / "checkpoint.pt", device)
                generator = torch.Generator(device=device).manual_seed(args.seed)
                sample = sample_texts(best_model, prompt, 1, args.sample_tokens, args.temperature,
                                      args.top_k, generator, vocab.decode)[0]
                print(f"--- a sample from the best checkpoint (step {best['step']}):")
                print(f"{sample}\n---")
                break

            timer.start()
            lr = learning_rate(step, args.lr, args.warmup_steps, args.max_steps,
                               args.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            train_loss = train_step(model, optimizer, train_loader, device, args.grad_clip).item()
            common.check_loss(train_loss, step)  # before a NaN model could be saved as the best
            log({"step": step, "train_loss": train_loss, "lr": lr, **timer.stop(step)})
    log.close()
    metrics = {"stage": STAGE, "preset": args.preset, "config": asdict(model.config),
               "params": sum(p.numel() for p in model.parameters()), "stopped": stopped,
               "steps_done": step, "seconds": timer.seconds(),
               "train_seconds": round(timer.total, 3), "tokens_per_s": timer.median(),
               "device": str(device), "steps": step, "lr": args.lr, "batch_size": args.batch_size,
               "ms_per_step": round(1000 * timer.total / max(step, 1), 3),
               "best_step": best["step"], "best_val_loss": best["val_loss"], "sample": sample,
               "vocab_size": len(vocab.chars), "data": str(args.data),
               "threads": torch.get_num_threads(), "seed": args.seed,
               **common.summarize(log.records)}
    print(f"{step} steps in {timer.seconds()} s ({timer.total:.1f} s of training); best val loss "
          f"{best['val_loss']:.4f} at step {best['step']}; outputs in {args.out_dir}")
    write_outputs(args, log.records, metrics)
    return metrics


# --- outputs and checkpoints

def write_outputs(args, records, metrics):
    """loss.png and metrics.json."""
    metrics["figure"] = draw_figure(args.out_dir / "loss.png", records, args)
    common.write_json(args.out_dir / "metrics.json", metrics)


def draw_figure(path, records, args):
    """Every step's training loss, and each evaluation's estimates on both splits, against step."""
    plt = common.pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    common.plot_curves(ax, records, ("train_loss", "train_split_loss", "val_loss"),
                       ylabel="loss (nats per character)")
    ax.set_title(f"{STAGE}.py --preset {args.preset} on {args.data.name}")
    return common.save_figure(fig, path)


def save_checkpoint(args, model, optimizer, vocab, step, val_loss):
    """The best model so far, and the vocabulary that --sample needs to use it."""
    checkpoint = {
        "stage": STAGE, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "step": step, "val_loss": val_loss, "config": asdict(model.config), "vocab": vocab.chars,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    # Written beside its final name, then renamed: a crash mid-write leaves the old one whole.
    common.write_atomic(args.out_dir / "checkpoint.pt", lambda tmp: torch.save(checkpoint, tmp))


# --- the mode without training: --sample

def other_modes(args, device):
    """--sample: text from a checkpoint; nothing is written."""
    model, vocab, checkpoint = load_model(args.init_from or args.out_dir / "checkpoint.pt", device)
    prompt = vocab.encode(args.prompt)
    common.print_header(device)
    print(f"checkpoint of step {checkpoint['step']}, val loss {checkpoint['val_loss']:.4f}")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    samples = sample_texts(model, prompt, 1, args.sample_tokens, args.temperature,
                           args.top_k, generator, vocab.decode)
    print(samples[0])
    return {"sample": samples[0]}


def load_model(source, device="cpu"):
    """(GPT in eval mode, Vocab, checkpoint) from a transformer.py checkpoint (a file, or an
    --out-dir holding checkpoint.pt); anything else dies with one line."""
    path = Path(source)
    path = path / "checkpoint.pt" if (path / "checkpoint.pt").is_file() else path
    hint = "pass --init-from with the checkpoint.pt of a transformer.py run"
    checkpoint = common.load_checkpoint(path, STAGE, hint,
                                        needs=("model", "config", "vocab", "step", "val_loss"))
    try:
        model = GPT(GPTConfig(**checkpoint["config"]))
        model.load_state_dict(checkpoint["model"])
    except (KeyError, TypeError, RuntimeError) as err:
        die(f"checkpoint {path} does not match this {STAGE}.py ({type(err).__name__}: its "
            f"config or weights differ); {hint}")
    return model.to(device).eval(), Vocab(checkpoint["vocab"]), checkpoint


# --- command line

# The model's size and the training length; a flag overrides any value. quick is nanoGPT's CPU
# recipe (4 layers, 4 heads, 128 wide, block 64, batch 12) at 3x its learning rate for 3/4 of its
# steps: a model this small tolerates a large step. cpu doubles the context and the batch (on a
# CPU, hardly slower per character, and the longer context is worth a lot of loss). gpu is the
# lecture's scale (nanoGPT's GPU configuration).
RECIPE = dict(dropout=0.0, lr=3e-3, warmup_steps=100, eval_batches=50)
PRESETS = {
    "quick": dict(RECIPE, n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12,
                  max_steps=1400, eval_every=350),
    "cpu": dict(RECIPE, n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=24,
                max_steps=1800, eval_every=300),
    "gpu": dict(RECIPE, n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64,
                dropout=0.2, lr=1e-3, max_steps=5000, eval_every=250),
}


def parse_args(argv=None):
    parser = common.make_parser(STAGE, "A character-level GPT trained on Shakespeare.",
                                "data/shakespeare.txt", "UTF-8 text to learn", seed=1337)
    preset = functools.partial(common.by_preset, PRESETS)
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu",
                        help="model size and training length: quick (about a minute on a CPU), "
                        "cpu (minutes), gpu (one GPU); a flag overrides its value (default: cpu)")
    model = parser.add_argument_group("model")
    model.add_argument("--n-layer", type=int, help="Transformer blocks " + preset("n_layer"))
    model.add_argument("--n-head", type=int, help="attention heads " + preset("n_head"))
    model.add_argument("--n-embd", type=int,
                       help="width of the residual stream " + preset("n_embd"))
    model.add_argument("--block-size", type=int,
                       help="longest context the model can take " + preset("block_size"))
    model.add_argument("--dropout", type=float,
                       help="dropout probability, 0: none " + preset("dropout"))
    model.add_argument("--attention", choices=["sdpa", "manual"], default="sdpa",
                       help="sdpa: torch's fused kernel; manual: the same computation written "
                       "out, to read (default: sdpa)")
    train = parser.add_argument_group("training")
    train.add_argument("--batch-size", type=int, help="sequences a step " + preset("batch_size"))
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
    evals = parser.add_argument_group("evaluation and samples")
    evals.add_argument("--eval-every", type=int,
                       help="steps between evaluations, 0: off " + preset("eval_every"))
    evals.add_argument("--eval-batches", type=int, help="batches in each loss estimate, always "
                       "the same ones " + preset("eval_batches"))
    evals.add_argument("--prompt", default="\n",
                       help="text the sample starts from (default: %(default)r)")
    evals.add_argument("--sample-tokens", "--num-chars", type=int, default=500,
                       help="characters to generate (default: %(default)s)")
    evals.add_argument("--temperature", type=float, default=1.0,
                       help="divide the logits by this before sampling; 0: greedy (default: 1.0)")
    evals.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest "
                       "characters (0: all; default: %(default)s)")
    modes = parser.add_argument_group("mode without training (the weights: --init-from, "
                                      "default <out-dir>/checkpoint.pt)")
    modes.add_argument("--sample", action="store_true", help="generate text")
    modes.add_argument("--init-from", "--checkpoint", type=common.path_flag,
                       help="the checkpoint --sample reads")
    args = common.use_preset(parser.parse_args(argv), PRESETS)
    common.check_args(
        args, positive=("n_layer", "n_head", "n_embd", "block_size", "batch_size", "max_steps",
                        "eval_batches", "lr"),
        non_negative=("warmup_steps", "eval_every", "sample_tokens", "top_k"),
        ranges=(("lr", 0, 10), ("min_lr_ratio", 0, 1), ("weight_decay", 0, 10),
                ("grad_clip", 0, math.inf), ("temperature", 0, 100), ("dropout", 0, 0.99)))
    if args.n_embd % args.n_head:
        die(f"--n-embd {args.n_embd} must be a multiple of --n-head {args.n_head} "
            "(each head gets n_embd / n_head channels)")
    if not args.prompt:
        die("--prompt must not be empty; give at least one character to start from")
    if args.init_from is not None and not args.sample:  # training starts from scratch
        die("--init-from is the checkpoint --sample reads; training always starts afresh "
            "(add --sample, or drop --init-from)")
    return args


if __name__ == "__main__":
    main(parse_args())
