"""Stage 3: an MLP over the last few characters (Bengio et al. 2003), with BatchNorm.

What this adds over bigram.py: the context grows from one character to --block-size characters,
each looked up in a learned embedding table; the embeddings are concatenated and fed through a
hidden layer, BatchNorm and tanh to the logits (Bengio, Ducharme, Vincent, Jauvin, "A Neural
Probabilistic Language Model", JMLR 2003; BatchNorm: Ioffe & Szegedy 2015). The lessons of
training a deep net are visible in the code and in what a run prints:
  - the loss at initialization should be ln(V), a uniform guess; it is printed next to ln(V);
  - the output layer starts scaled down and the hidden layer gets a Kaiming-style init (gain 5/3
    for tanh), which is what keeps that first loss near ln(V) and the tanh units out of their
    flat tails; the fraction of saturated tanh units is printed at init and at the end;
  - BatchNorm normalizes with the batch's statistics while training and with running statistics
    at evaluation (model.eval()), so that one name's prediction does not depend on its batch;
  - the learning rate decays (cosine, down to a tenth) as training ends.
It trains with AdamW on batches of 256 rather than the lecture's SGD on batches of 32: fewer,
better-used steps on a CPU, and weight decay against overfitting the 25K training names.

Run:
    python mlp.py                                    # bundled data/names.txt, CPU, < 1 min
    python mlp.py --data path/to/names.txt           # makemore's names.txt, the canonical list
    python mlp.py --device cuda                      # one GPU (auto picks it when present)

Measured on the canonical list (32,033 names), default flags (8,000 steps of batch 256,
32,675 parameters), on the 2-core CPU (2 threads): 32 s wall; loss at init 3.3044 vs
ln(27) = 3.2958; train 1.9278, val 2.0211, test 2.0209.
On the bundled data/names.txt (29,910 names): train 1.9310, val 2.0373, test 2.0378.
Anchors: the lecture's MLP reaches val 2.17 (11,897 params, 200K steps of batch 32), 2.1048 with
BatchNorm and the init fixes.

Outputs in --out-dir (default out/mlp): log.jsonl (one line per evaluation), metrics.json,
mlp.png (the character embeddings in 2-D next to the loss curve).
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

STAGE = "mlp"


# --- model

@dataclass
class ModelConfig:
    vocab_size: int
    block_size: int
    n_embd: int
    n_hidden: int


class BatchNorm1d(nn.Module):
    """BatchNorm over the batch dimension of (B, C) input, with running statistics for eval.

    Training: normalize each channel with the batch's mean and (biased) variance, then scale and
    shift by learned gamma and beta; keep exponential moving averages of the mean and of the
    unbiased variance. Eval: normalize with those averages, so the output of one example does not
    depend on the others in its batch. Same numbers as torch.nn.BatchNorm1d.
    """

    def __init__(self, dim, eps=1e-5, momentum=0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(dim))  # gamma
        self.bias = nn.Parameter(torch.zeros(dim))  # beta
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, x):  # x: (B, C)
        if self.training:
            mean = x.mean(dim=0)  # (C,)
            var = x.var(dim=0, unbiased=False)  # (C,)
            with torch.no_grad():
                n = x.shape[0]
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * n / max(n - 1, 1), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        x_hat = (x - mean) / torch.sqrt(var + self.eps)  # (B, C)
        return self.weight * x_hat + self.bias


class MLP(nn.Module):
    """Embed each context character, concatenate, hidden layer -> BatchNorm -> tanh -> logits."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        # No bias: BatchNorm subtracts the mean right after, and its beta is the bias.
        self.hidden = nn.Linear(config.block_size * config.n_embd, config.n_hidden, bias=False)
        self.bn = BatchNorm1d(config.n_hidden)
        self.act = nn.Tanh()
        self.lm_head = nn.Linear(config.n_hidden, config.vocab_size)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        nn.init.normal_(self.wte.weight, std=1.0)
        # Kaiming: std = gain / sqrt(fan_in) keeps the pre-activations at unit scale; the 5/3 gain
        # makes up for tanh squashing its input.
        nn.init.kaiming_normal_(self.hidden.weight, nonlinearity="tanh")
        # A small output layer makes every logit near 0 at the start: a uniform guess, loss ln(V),
        # instead of confident wrong answers that the first steps would spend undoing.
        nn.init.normal_(self.lm_head.weight, std=0.1 / math.sqrt(self.config.n_hidden))
        nn.init.zeros_(self.lm_head.bias)

    def forward(self, idx):  # idx: (B, block_size)
        emb = self.wte(idx)  # (B, block_size, n_embd)
        x = emb.view(emb.shape[0], -1)  # (B, block_size * n_embd): the concatenation
        x = self.act(self.bn(self.hidden(x)))  # (B, n_hidden)
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

    def label(self, token):
        """How a token is drawn in the figure: '.' for the start/end token."""
        return "." if token == 0 else self.chars[token - 1]


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


def draw_figure(path, model, vocab, step_losses, evals):
    """Left: the first two embedding dimensions of every character. Right: the loss curves.
    Returns the figure's path, or None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    fig, (ax_emb, ax) = plt.subplots(1, 2, figsize=(13, 5.5))
    emb = model.wte.weight.detach().cpu()  # (V, n_embd)
    ax_emb.scatter(emb[:, 0], emb[:, 1], s=250, c="lightsteelblue")
    for i in range(vocab.size):
        ax_emb.text(emb[i, 0].item(), emb[i, 1].item(), vocab.label(i), ha="center",
                    va="center", fontsize=10)
    ax_emb.set_title("character embeddings, dimensions 0 and 1 ('.' = start/end)")
    ax_emb.grid(alpha=0.3)
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
    model = MLP(ModelConfig(vocab.size, args.block_size, args.n_embd, args.n_hidden)).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {model.config}, {n_params} parameters")
    optimizer = model.configure_optimizer(args.lr, args.weight_decay)
    X, Y = splits["train"]
    batch_gen = torch.Generator().manual_seed(args.seed)
    probe = torch.randint(0, len(X), (min(len(X), 1024),), generator=batch_gen).to(device)
    init_loss, sat_init = check_init(model, X, Y, probe)

    step_losses, evals, losses = train(model, optimizer, splits, batch_gen, args, started)
    sat_end = tanh_saturation(model, X[probe], Y[probe], "after training")[0]
    losses["test"] = split_loss(model, *splits["test"])
    print(f"final (eval mode, BatchNorm running stats): train {losses['train']:.4f}  "
          f"val {losses['val']:.4f}  test {losses['test']:.4f}")
    samples = sample(model, vocab, args.num_samples, torch.Generator().manual_seed(args.seed))
    print("samples:", " ".join(samples))
    figure = draw_figure(args.out_dir / f"{STAGE}.png", model, vocab, step_losses, evals)

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
    parser = make_parser(STAGE, "MLP language model of names (Bengio et al. 2003) with BatchNorm.",
                         "data/names.txt", "text file with one name per line", 42)
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter  # every help shows its default
    add = parser.add_argument
    add("--max-steps", type=int, default=8000, help="optimizer steps")
    add("--batch-size", type=int, default=256, help="examples (one next character each) per step")
    add("--lr", type=float, default=3e-3, help="peak AdamW learning rate; decays to a tenth")
    add("--weight-decay", type=float, default=0.1, help="AdamW weight decay of the weight matrices")
    add("--eval-every", type=int, default=1000, help="steps between evaluations on the whole "
        "train and val splits, logged and printed (0 = off: only the final losses)")
    add("--block-size", type=int, default=4, help="characters of context")
    add("--n-embd", type=int, default=24, help="size of each character's embedding")
    add("--n-hidden", type=int, default=256, help="units of the hidden layer")
    add("--num-samples", type=int, default=20, help="names to sample at the end")
    args = check_args(parser.parse_args(argv), positive=("max_steps", "batch_size", "block_size",
                                                         "n_embd", "n_hidden", "lr"),
                      non_negative=("weight_decay", "eval_every", "num_samples"))
    return args


if __name__ == "__main__":
    main(parse_args())
