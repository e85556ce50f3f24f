"""Stage 4: a hierarchical model that fuses the context two by two (WaveNet 2016, makemore part 5).

What this adds over mlp.py: mlp.py squashes the whole context into one hidden layer at once. Here
the --block-size 8 characters are embedded and then fused in a tree, as in WaveNet's dilated
causal convolutions (van den Oord et al., "WaveNet: A Generative Model for Raw Audio", 2016):
three times FlattenConsecutive(2) -> Linear -> BatchNorm -> tanh, so that pairs of characters
become one vector, pairs of pairs another, and the last level sees all eight. Two layers are
written here because their mechanics are the lesson (and tests/test_wavenet.py checks them
against torch.nn):
  - FlattenConsecutive(n): (B, T, C) -> (B, T/n, C*n) with a single .view, no copy;
  - BatchNorm1d for (B, T, C) input: statistics over the batch *and* the time dimension, with
    running statistics for evaluation (torch.nn.BatchNorm1d wants (B, C, T) for the same thing).
Everything else is mlp.py's: Kaiming-style init, a small output layer, loss at init vs ln(V), the
fraction of saturated tanh units per layer, AdamW with a cosine learning-rate decay.

Fewer steps than the lecture's 200K of batch 32: batches of 256, AdamW instead of plain SGD, a
cosine decay of the learning rate, and, because a model this size overfits 25K training names
(the lecture's ends at train 1.77, val 1.99), a wider hidden layer held back by dropout after
each level and weight decay. See the measured numbers below.

Run:
    python wavenet.py                                    # bundled data/names.txt, CPU, ~3 min
    python wavenet.py --data path/to/names.txt           # makemore's names.txt, the canonical list
    python wavenet.py --device cuda                      # one GPU (auto picks it when present)

Measured on the canonical list (32,033 names), default flags (15,000 steps of batch 256, i.e.
3.8M examples against the lecture's 6.4M; 163,683 parameters), on the 2-core CPU (2 threads):
221 s wall; loss at init 3.2885 vs ln(27) = 3.2958; train 1.8432, val 1.9761, test 1.9676.
On the bundled data/names.txt (29,910 names): train 1.8444, val 1.9845, test 1.9832.
Anchor: the lecture's WaveNet reaches val 1.993 (76K params, 200K steps of batch 32).

Outputs in --out-dir (default out/wavenet): log.jsonl (one line per evaluation), metrics.json,
wavenet.png (per-layer histograms of tanh activations and of their gradients, and the loss curve).
"""
import argparse
import copy
import math
import random
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (Log, check_args, check_loss, die, make_parser, pick_device, plot_curves,
                    prepare_out_dir, print_header, pyplot, read_text, save_figure,
                    warn_unless_names, write_json)

STAGE = "wavenet"


# --- model

@dataclass
class ModelConfig:
    vocab_size: int
    block_size: int
    n_embd: int
    n_hidden: int
    dropout: float


class FlattenConsecutive(nn.Module):
    """(B, T, C) -> (B, T/n, C*n): concatenate each run of n consecutive time steps.

    The memory of a contiguous (B, T, C) tensor already lists the n steps of a run one after the
    other, so a .view regroups them without copying. When one step is left, drop that dimension.
    """

    def __init__(self, n):
        super().__init__()
        self.n = n

    def forward(self, x):
        B, T, C = x.shape
        x = x.view(B, T // self.n, C * self.n)  # (B, T/n, C*n)
        return x.squeeze(1) if x.shape[1] == 1 else x


class BatchNorm1d(nn.Module):
    """BatchNorm of the last dimension of (B, C) or (B, T, C) input, with running statistics.

    Training: normalize each channel with the mean and (biased) variance over every dimension but
    the channels (the batch, and the time steps too for 3-D input), then scale and shift by
    learned gamma and beta; keep exponential moving averages of the mean and of the unbiased
    variance. Eval: normalize with those averages, so the output of one example does not depend
    on the others in its batch. Same numbers as torch.nn.BatchNorm1d (which wants (B, C, T)).
    """

    def __init__(self, dim, eps=1e-5, momentum=0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(dim))  # gamma
        self.bias = nn.Parameter(torch.zeros(dim))  # beta
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, x):  # x: (B, C) or (B, T, C)
        if self.training:
            dims = tuple(range(x.dim() - 1))  # (0,) or (0, 1)
            mean = x.mean(dim=dims)  # (C,)
            var = x.var(dim=dims, unbiased=False)  # (C,)
            with torch.no_grad():
                n = x.numel() // x.shape[-1]
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * n / max(n - 1, 1), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        x_hat = (x - mean) / torch.sqrt(var + self.eps)  # same shape as x
        return self.weight * x_hat + self.bias


class WaveNet(nn.Module):
    """Embed the context, then log2(block_size) times: fuse pairs -> Linear -> BatchNorm -> tanh."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        layers = []
        width = config.n_embd
        for _ in range(config.block_size.bit_length() - 1):  # log2(block_size) levels
            # No bias: BatchNorm subtracts the mean right after, and its beta is the bias.
            layers += [FlattenConsecutive(2), nn.Linear(2 * width, config.n_hidden, bias=False),
                       BatchNorm1d(config.n_hidden), nn.Tanh(), nn.Dropout(config.dropout)]
            width = config.n_hidden
        self.levels = nn.Sequential(*layers)
        self.lm_head = nn.Linear(config.n_hidden, config.vocab_size)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        nn.init.normal_(self.wte.weight, std=1.0)
        for module in self.levels:
            if isinstance(module, nn.Linear):
                # Kaiming: std = gain / sqrt(fan_in) keeps the pre-activations at unit scale; the
                # 5/3 gain makes up for tanh squashing its input.
                nn.init.kaiming_normal_(module.weight, nonlinearity="tanh")
        # A small output layer makes every logit near 0 at the start: a uniform guess, loss ln(V),
        # instead of confident wrong answers that the first steps would spend undoing.
        nn.init.normal_(self.lm_head.weight, std=0.1 / math.sqrt(self.config.n_hidden))
        nn.init.zeros_(self.lm_head.bias)

    def forward(self, idx):  # idx: (B, block_size)
        x = self.wte(idx)  # (B, block_size, n_embd)
        x = self.levels(x)  # (B, T, C) -> (B, T/2, n_hidden) -> ... -> (B, n_hidden)
        return self.lm_head(x)  # (B, V) logits

    def configure_optimizer(self, lr, weight_decay):
        """AdamW that decays the weight matrices and embeddings only: decaying BatchNorm's gamma
        and beta or the output bias would just fight the normalization."""
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=lr)


# --- data

class Vocab:
    """Characters of the data plus token 0, which marks both the start and the end of a name."""

    def __init__(self, names):
        self.chars = sorted(set("".join(names)))
        self.size = len(self.chars) + 1

    def encode(self, name):
        return [self.chars.index(ch) + 1 for ch in name]

    def decode(self, tokens):
        return "".join(self.chars[i - 1] for i in tokens)


def build_dataset(names, vocab, block_size):
    """One example per character of every name and one for its end: the previous block_size
    tokens (padded on the left with the start token) and the token that follows."""
    xs, ys = [], []
    for name in names:
        context = [0] * block_size
        for token in vocab.encode(name) + [0]:
            xs.append(context)
            ys.append(token)
            context = context[1:] + [token]
    return torch.tensor(xs), torch.tensor(ys)  # (N, block_size), (N,)


def load_data(args, device):
    """The names of --data, one per line, shuffled with --seed and cut 80/10/10 into train, val
    and test; the vocabulary; (X, Y) on `device` per split; and a line that describes them. Every
    input is checked here, before --out-dir is touched."""
    text = read_text(args.data, "a text file of one name per line")
    names = [line.strip() for line in text.splitlines() if line.strip()]
    warn_unless_names(names, args.data)
    longest = max(len(name) for name in names)
    if args.block_size > longest + 1:  # a context that no name fills: only start tokens
        die(f"--block-size {args.block_size} is longer than any context in the data (the longest "
            f"name has {longest} characters); use --block-size {longest + 1} or less")
    if len(names) < 10:
        die(f"the data holds {len(names)} names; an 80/10/10 split needs at least 10")
    shuffled = list(names)
    random.Random(args.seed).shuffle(shuffled)
    n1, n2 = int(0.8 * len(names)), int(0.9 * len(names))
    members = {"train": shuffled[:n1], "val": shuffled[n1:n2], "test": shuffled[n2:]}
    vocab = Vocab(names)
    splits = {split: tuple(t.to(device) for t in build_dataset(group, vocab, args.block_size))
              for split, group in members.items()}  # (N, block_size), (N,)
    about = (f"{len(names)} names from {args.data}: {n1} train, {n2 - n1} val, "
             f"{len(names) - n2} test names ({len(splits['train'][0])} training examples); "
             f"vocabulary of {vocab.size} tokens (start/end + {vocab.size - 1} characters)")
    return vocab, splits, about


# --- training

@torch.no_grad()
def split_loss(model, X, Y, chunk=65536):
    """Mean cross-entropy over a whole split, in eval mode (BatchNorm uses its running stats)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(X), chunk):
        total += F.cross_entropy(model(X[i:i + chunk]), Y[i:i + chunk], reduction="sum").item()
    model.train(was_training)
    return total / len(X)


def lr_at(step, max_steps, lr):
    """Cosine decay from lr to lr/10 over the run: big steps early, fine ones at the end."""
    progress = step / max(max_steps - 1, 1)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, optimizer, splits, batch_gen, args, started):
    """--max-steps AdamW steps on random batches with the cosine learning rate. Every --eval-every
    steps (0 = never) and after the last one, the loss on the whole train and val splits goes to
    log.jsonl and the screen. Returns the batch losses, the evaluations and the final losses."""
    X, Y = splits["train"]
    step_losses, log = [], Log(args.out_dir / "log.jsonl")  # log.records: the evaluations

    def evaluate(step):
        row = {"step": step, "seconds": round(time.time() - started, 3),
               "train_loss": split_loss(model, X, Y), "val_loss": split_loss(model, *splits["val"])}
        if args.eval_every:  # off: the final losses are computed all the same, but not shown
            log(row)
            print(f"step {step:6d}  train {row['train_loss']:.4f}  val {row['val_loss']:.4f}  "
                  f"lr {lr_at(step, args.max_steps, args.lr):.2e}  {row['seconds']:.1f} s")
        return row

    model.train()
    for step in range(args.max_steps):
        if args.eval_every and step % args.eval_every == 0:
            evaluate(step)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.max_steps, args.lr)
        idx = torch.randint(0, len(X), (args.batch_size,), generator=batch_gen).to(X.device)
        loss = F.cross_entropy(model(X[idx]), Y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step_losses.append(loss.item())
        check_loss(step_losses[-1], step)
    final = evaluate(args.max_steps)
    log.close()
    return step_losses, log.records, {"train": final["train_loss"], "val": final["val_loss"]}


def tanh_saturation(model, X, Y, when, threshold=0.97):
    """One training-mode forward and backward on (X, Y). Prints and returns the fraction of each
    tanh layer's outputs in the flat tails, where almost no gradient flows back, and returns every
    tanh layer's output and gradient. It runs on a copy of the model, because a diagnostic must
    not train: in training mode BatchNorm updates its running statistics."""
    model, outputs = copy.deepcopy(model).train(), []
    for tanh in (m for m in model.modules() if isinstance(m, nn.Tanh)):
        tanh.register_forward_hook(lambda module, inputs, out: outputs.append(out))
    logits = model(X)  # (B, V)
    for out in outputs:
        out.retain_grad()  # a tensor inside the graph keeps its gradient only when asked to
    F.cross_entropy(logits, Y).backward()
    sat = [(out.abs() > threshold).float().mean().item() for out in outputs]
    print(f"saturated tanh units (|tanh| > {threshold}) {when}: "
          + ", ".join(f"{s:.1%}" for s in sat))
    return sat, [(out.detach().cpu(), out.grad.cpu()) for out in outputs]


def check_init(model, X, Y, probe):
    """The signs of a good init: the loss of a uniform guess, ln(V); few saturated tanh units."""
    init_loss, V = split_loss(model, X, Y), model.config.vocab_size
    print(f"loss at init: {init_loss:.4f}  (a uniform guess over {V} tokens: ln({V}) = "
          f"{math.log(V):.4f})")
    return init_loss, tanh_saturation(model, X[probe], Y[probe], "at init")[0]


@torch.no_grad()
def sample(model, vocab, num, generator, max_len=50):
    """Names drawn one character at a time from the model, starting from a context of start
    tokens and stopping at the end token."""
    model.eval()
    device = next(model.parameters()).device
    context = torch.zeros(num, model.config.block_size, dtype=torch.long, device=device)
    tokens = torch.zeros(num, 0, dtype=torch.long)
    for _ in range(max_len):
        probs = F.softmax(model(context), dim=-1).cpu()  # (num, V)
        nxt = torch.multinomial(probs, 1, generator=generator)  # (num, 1)
        tokens = torch.cat([tokens, nxt], dim=1)
        context = torch.cat([context[:, 1:], nxt.to(device)], dim=1)
        if (tokens == 0).any(dim=1).all():
            break
    return [vocab.decode(row[:row.index(0)] if 0 in row else row) for row in tokens.tolist()]


def draw_figure(path, outputs, step_losses, evals):
    """Per level, histograms of the tanh outputs (saturation shows as spikes at -1 and 1) and of
    their gradients (a level that learns much slower than the others stands out), and the loss
    curves. Returns the figure's path, or None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    fig, (ax_act, ax_grad, ax) = plt.subplots(1, 3, figsize=(19, 5.5))
    for level, (out, grad) in enumerate(outputs, start=1):
        sat = (out.abs() > 0.97).float().mean().item()
        for ax_hist, values, limit, label in (
                (ax_act, out, 1.0, f"std {out.std().item():.2f}, saturated {sat:.1%}"),
                (ax_grad, grad, 4 * grad.std().item() or 1.0, f"std {grad.std().item():.1e}")):
            hist = torch.histc(values.float(), bins=60, min=-limit, max=limit)
            centers = torch.linspace(-limit, limit, 61)[:-1] + limit / 60  # (60,) bin middles
            ax_hist.plot(centers.tolist(), (hist / hist.sum()).tolist(),
                         label=f"level {level}: {label}")
    ax_act.set_title("tanh outputs per level (one training batch)")
    ax_act.legend()
    ax_grad.set_title("gradients of the tanh outputs per level")
    ax_grad.legend()
    # Every step's batch loss, and the evaluations' estimates on both splits.
    batches = [{"step": step, "train_loss": loss} for step, loss in enumerate(step_losses)]
    splits = [{"step": e["step"], "train_split_loss": e["train_loss"], "val_loss": e["val_loss"]}
              for e in evals]
    plot_curves(ax, batches + splits, ("train_loss", "train_split_loss", "val_loss"))
    ax.set_title("loss")
    return save_figure(fig, path, dpi=90)


def main(args):
    started = time.time()
    device = pick_device(args.device, threads=args.threads)
    vocab, splits, about_data = load_data(args, device)
    prepare_out_dir(args.out_dir)
    print_header(device)
    print(about_data)

    torch.manual_seed(args.seed)
    config = ModelConfig(vocab.size, args.block_size, args.n_embd, args.n_hidden, args.dropout)
    model = WaveNet(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {model.config}, {n_params} parameters")
    optimizer = model.configure_optimizer(args.lr, args.weight_decay)
    X, Y = splits["train"]
    batch_gen = torch.Generator().manual_seed(args.seed)
    probe = torch.randint(0, len(X), (min(len(X), 1024),), generator=batch_gen).to(device)
    init_loss, sat_init = check_init(model, X, Y, probe)

    step_losses, evals, losses = train(model, optimizer, splits, batch_gen, args, started)
    sat_end, outputs = tanh_saturation(model, X[probe], Y[probe], "after training")
    losses["test"] = split_loss(model, *splits["test"])
    print(f"final (eval mode, BatchNorm running stats): train {losses['train']:.4f}  "
          f"val {losses['val']:.4f}  test {losses['test']:.4f}")
    samples = sample(model, vocab, args.num_samples, torch.Generator().manual_seed(args.seed))
    print("samples:", " ".join(samples))
    figure = draw_figure(args.out_dir / f"{STAGE}.png", outputs, step_losses, evals)

    metrics = {"stage": STAGE, "params": n_params, "steps": args.max_steps,
               "seconds": round(time.time() - started, 3),
               **{f"{split}_loss": loss for split, loss in losses.items()},
               "init_loss": init_loss, "ln_vocab": math.log(vocab.size),
               "tanh_saturation_init": sat_init, "tanh_saturation_end": sat_end,
               "config": asdict(model.config), "batch_size": args.batch_size, "lr": args.lr,
               "device": str(device), "data": str(args.data), "seed": args.seed, "figure": figure}
    write_json(args.out_dir / "metrics.json", metrics)
    print(f"done in {metrics['seconds']:.1f} s; metrics in {args.out_dir / 'metrics.json'}")
    return metrics


# --- command line

def parse_args(argv=None):
    parser = make_parser(STAGE, "Hierarchical (WaveNet-like) language model of names.",
                         "data/names.txt", "text file with one name per line", 42)
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter  # every help shows its default
    add = parser.add_argument
    add("--max-steps", type=int, default=15000, help="optimizer steps")
    add("--batch-size", type=int, default=256, help="examples (one next character each) per step")
    add("--lr", type=float, default=3e-3, help="peak AdamW learning rate; decays to a tenth")
    add("--weight-decay", type=float, default=0.1, help="AdamW weight decay of the weight matrices")
    add("--eval-every", type=int, default=2500, help="steps between evaluations on the whole "
        "train and val splits, logged and printed (0 = off: only the final losses)")
    add("--block-size", type=int, default=8, help="characters of context, a power of two: log2 "
        "of it is the number of fusing levels")
    add("--n-embd", type=int, default=24, help="size of each character's embedding")
    add("--n-hidden", type=int, default=192, help="units of each fusing level")
    add("--dropout", type=float, default=0.1, help="fraction of each level's outputs zeroed while "
        "training, against overfitting")
    add("--num-samples", type=int, default=20, help="names to sample at the end")
    args = check_args(parser.parse_args(argv), positive=("max_steps", "batch_size", "block_size",
                                                         "n_embd", "n_hidden", "lr"),
                      non_negative=("weight_decay", "eval_every", "num_samples"))
    if args.block_size < 2 or args.block_size & (args.block_size - 1):
        die(f"--block-size must be a power of two (2, 4, 8, 16), got {args.block_size}: each "
            "level fuses pairs")
    if not 0 <= args.dropout < 1:
        die(f"--dropout must be at least 0 and below 1, got {args.dropout}")
    return args


if __name__ == "__main__":
    main(parse_args())
