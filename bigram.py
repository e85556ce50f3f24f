"""Stages 1 and 2: a bigram language model of first names, first by counting, then as a neural net.

A bigram model predicts the next character from the current one only. Stage 1 counts how often
each character follows each other one (a (V, V) table, V = the characters of the data plus one
token that marks both the start and the end of a name); normalizing the rows gives the model that
maximizes the likelihood of the training names. Stage 2 trains the same model as the smallest
possible neural network, one-hot input -> one (V, V) weight matrix -> softmax, by gradient descent
on the negative log-likelihood, and shows that it arrives at the counts: the weights become the
log-counts. Every later stage keeps this loss and this training loop and only changes the
function from context to logits.

Run (CPU, a few seconds; a GPU is never needed here):
    python bigram.py                                   # bundled data/names.txt
    python bigram.py --data path/to/names.txt          # makemore's names.txt, the canonical list
    python bigram.py --smoothing 0                     # see why val NLL becomes inf

Measured on the canonical list (32,033 names), default flags, on the 2-core CPU in 11 s:
    count model fit on all names, no smoothing: NLL 2.4540 (the number to beat with a bigram)
    count model (fit on train, smoothing 1): train 2.4548, val 2.4533, test 2.4584
    neural bigram after 200 steps of full-batch gradient descent: train 2.4627
On the bundled data/names.txt (29,910 names): count model train 2.4542, val 2.4541; neural
bigram train 2.4620.

Outputs in --out-dir (default out/bigram): log.jsonl (the neural bigram's losses as it trains),
metrics.json, bigram_counts.png (the count table, each cell with its pair and count).
"""
import argparse
import itertools
import math
import random
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (Log, check_args, check_loss, die, make_parser, pick_device, prepare_out_dir,
                    print_header, pyplot, read_text, save_figure, warn_unless_names, write_json)

STAGE = "bigram"


# --- model

def count_table(xs, ys, vocab_size):
    """Stage 1: the (V, V) table counts[i, j] = how often token j follows token i."""
    counts = torch.zeros(vocab_size * vocab_size, dtype=torch.long)
    counts.index_add_(0, xs * vocab_size + ys, torch.ones_like(xs))
    return counts.view(vocab_size, vocab_size)  # (V, V)


def count_probs(counts, smoothing):
    """Rows of the count table normalized to next-token probabilities, after smoothing."""
    table = counts.double() + smoothing
    rows = table.sum(dim=1, keepdim=True)
    # A token never seen in training has an empty row even without smoothing: a uniform guess.
    return torch.where(rows > 0, table / rows.clamp(min=1e-300), 1.0 / counts.shape[1])  # (V, V)


def nll(probs, xs, ys):
    """Average negative log-likelihood of the pairs; inf if one has probability 0."""
    return -probs[xs, ys].log().mean().item()


class NeuralBigram(nn.Module):
    """Stage 2: the bigram model as a one-layer net, one-hot input -> (V, V) weights W -> logits.

    Multiplying the one-hot row of the current token by W picks row W[current]: the net is a lookup
    table of logits, and softmax turns a row into next-token probabilities. Read exp(W) as counts
    and softmax as the normalization of a row, and this is the count model with log-counts for
    weights; gradient descent on the same negative log-likelihood finds them without counting.
    """

    def __init__(self, vocab_size, generator):
        super().__init__()
        self.vocab_size = vocab_size
        self.W = nn.Parameter(torch.randn(vocab_size, vocab_size, generator=generator))  # (V, V)

    def forward(self, x):  # x: (N,) current tokens
        xenc = F.one_hot(x, self.vocab_size).float()  # (N, V)
        return xenc @ self.W  # (N, V) logits

    def loss(self, x, y, l2=0.0):
        """NLL of the pairs (x, y) plus l2 * mean(W**2), the neural cousin of smoothing: it pulls
        every logit toward 0, i.e. every row toward equal probabilities."""
        return F.cross_entropy(self(x), y) + l2 * (self.W ** 2).mean()

    @torch.no_grad()
    def descend(self, lr):
        """One step of plain gradient descent, the optimizer every later stage refines."""
        self.W -= lr * self.W.grad

    @torch.no_grad()
    def probs(self):
        """The (V, V) next-token table, in float64 like the count model's so that they compare."""
        return F.softmax(self.W, dim=1).double().cpu()


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


def bigram_pairs(names, vocab):
    """Every (current, next) token pair of every name, start and end tokens included."""
    xs, ys = [], []
    for name in names:
        tokens = [0] + vocab.encode(name) + [0]
        xs.extend(tokens[:-1])
        ys.extend(tokens[1:])
    return torch.tensor(xs), torch.tensor(ys)  # (N,), (N,)


def load_data(args):
    """The names of --data shuffled with --seed and cut 80/10/10; the vocabulary; the pairs of
    each split; a line that describes them. Every input is checked before --out-dir is touched."""
    text = read_text(args.data, "a text file of one name per line")
    names = [line.strip() for line in text.splitlines() if line.strip()]
    warn_unless_names(names, args.data)
    if len(names) < 10:
        die(f"the data holds {len(names)} names; an 80/10/10 split needs at least 10")
    shuffled = list(names)
    random.Random(args.seed).shuffle(shuffled)
    n1, n2 = int(0.8 * len(names)), int(0.9 * len(names))
    members = {"train": shuffled[:n1], "val": shuffled[n1:n2], "test": shuffled[n2:]}
    vocab = Vocab(names)
    splits = {split: bigram_pairs(group, vocab) for split, group in members.items()}
    about = (f"{len(names)} names from {args.data}: {n1} train, {n2 - n1} val, "
             f"{len(names) - n2} test; vocabulary of {vocab.size} tokens (start/end + "
             f"{vocab.size - 1} characters)")
    return names, vocab, splits, about


# --- training

def fit_counts(names, vocab, splits, smoothing):
    """Stage 1. The NLL of counts fit on all names, unsmoothed (the best a bigram model does on
    this data); then the smoothed counts of the training pairs and their NLL on every split."""
    all_xs, all_ys = bigram_pairs(names, vocab)
    full_nll = nll(count_probs(count_table(all_xs, all_ys, vocab.size), 0.0), all_xs, all_ys)
    print(f"count model fit on all names, no smoothing: NLL {full_nll:.4f} "
          f"(uniform guess: ln({vocab.size}) = {math.log(vocab.size):.4f})")
    counts = count_table(*splits["train"], vocab.size)  # (V, V)
    probs = count_probs(counts, smoothing)  # (V, V)
    losses = {split: nll(probs, xs, ys) for split, (xs, ys) in splits.items()}
    print(f"count model fit on train, smoothing {smoothing:g}: "
          + ", ".join(f"{split} {loss:.4f}" for split, loss in losses.items()))
    return counts, probs, losses, full_nll


@torch.no_grad()
def split_losses(model, splits):
    """The neural bigram's NLL on each split, without the L2 term: what compares with counting."""
    return {split: F.cross_entropy(model(x), y).item() for split, (x, y) in splits.items()}


def train(model, splits, args, count_losses, started):
    """Stage 2: --max-steps of gradient descent on the NLL (+ L2) of the training pairs, all of
    them in every step unless --batch-size. Every --eval-every steps (0 = never) and after the
    last one, the train and val NLL go to log.jsonl and the screen. Returns the final NLLs."""
    splits = {split: (x.to(model.W.device), y.to(model.W.device))
              for split, (x, y) in splits.items()}
    X, Y = splits["train"]
    batch_gen = torch.Generator().manual_seed(args.seed + 1)
    log = Log(args.out_dir / "log.jsonl")
    print(f"neural bigram: {model.W.numel()} weights, {args.max_steps} steps of "
          f"{'full-batch' if args.batch_size is None else f'batch {args.batch_size}'} "
          f"gradient descent at lr {args.lr:g}, L2 {args.l2:g}")

    def report(step, losses):
        log({"step": step, "seconds": round(time.time() - started, 3),
             "train_loss": losses["train"], "val_loss": losses["val"]})
        print(f"step {step:5d}  neural train {losses['train']:.4f}  val {losses['val']:.4f}"
              f"   | count model train {count_losses['train']:.4f}  val {count_losses['val']:.4f}")

    for step in range(args.max_steps):
        if args.eval_every and step % args.eval_every == 0:
            report(step, split_losses(model, {split: splits[split] for split in ("train", "val")}))
        if args.batch_size is None:
            loss = model.loss(X, Y, args.l2)  # full batch: every training pair in every step
        else:
            idx = torch.randint(0, len(X), (args.batch_size,), generator=batch_gen).to(X.device)
            loss = model.loss(X[idx], Y[idx], args.l2)
        check_loss(loss.item(), step)
        model.zero_grad(set_to_none=True)
        loss.backward()
        model.descend(args.lr)
    final = split_losses(model, splits)
    if args.eval_every:
        report(args.max_steps, final)
    log.close()
    return final


def sample(probs, vocab, num, generator, max_len=50):
    """Draw names token by token from a (V, V) next-token table until the end token."""
    names = []
    for _ in range(num):
        tokens, current = [], 0
        while len(tokens) < max_len:
            current = torch.multinomial(probs[current], 1, generator=generator).item()
            if current == 0:
                break
            tokens.append(current)
        names.append(vocab.decode(tokens))
    return names


def draw_count_table(path, counts, vocab):
    """The count table as a heatmap, each cell labelled with its pair and count. Returns the
    figure's path, or None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    V = vocab.size
    fig, ax = plt.subplots(figsize=(0.6 * V, 0.6 * V))
    ax.imshow(counts.numpy(), cmap="Blues")
    for i, j in itertools.product(range(V), repeat=2):  # parse_math: "$$" is a pair, not TeX
        ax.text(j, i, vocab.label(i) + vocab.label(j), ha="center", va="bottom", color="gray",
                fontsize=7, parse_math=False)
        ax.text(j, i, str(counts[i, j].item()), ha="center", va="top", color="gray", fontsize=7)
    ax.set_title("bigram counts on the training names: row = current, column = next character")
    ax.axis("off")
    return save_figure(fig, path, dpi=80)


def main(args):
    started = time.time()
    device = pick_device(args.device, threads=args.threads)
    names, vocab, splits, about_data = load_data(args)
    prepare_out_dir(args.out_dir)
    print_header(device)
    print(about_data)

    counts, probs, count_losses, full_nll = fit_counts(names, vocab, splits, args.smoothing)
    model = NeuralBigram(vocab.size, torch.Generator().manual_seed(args.seed))
    losses = train(model.to(device), splits, args, count_losses, started)
    neural_probs = model.probs()  # (V, V)
    print(f"neural bigram: train {losses['train']:.4f} vs count model {count_losses['train']:.4f} "
          f"(gap {losses['train'] - count_losses['train']:+.4f}); largest difference between the "
          f"two probability tables: {(neural_probs - probs).abs().max().item():.4f}")
    for label, table in (("count model", probs), ("neural bigram", neural_probs)):
        # The same seed for both: once the tables agree, so do the samples.
        samples = sample(table, vocab, args.num_samples, torch.Generator().manual_seed(args.seed))
        print(f"samples from the {label}:", " ".join(samples))
    figure = draw_count_table(args.out_dir / "bigram_counts.png", counts, vocab)

    metrics = {"stage": STAGE, "params": model.W.numel(), "steps": args.max_steps,
               "seconds": round(time.time() - started, 3),
               **{f"{split}_loss": loss for split, loss in losses.items()},
               **{f"count_{split}_loss": loss for split, loss in count_losses.items()},
               "count_full_data_nll": full_nll, "smoothing": args.smoothing,
               "vocab_size": vocab.size, "device": str(device), "data": str(args.data),
               "seed": args.seed, "figure": figure}
    write_json(args.out_dir / "metrics.json", metrics)
    print(f"done in {metrics['seconds']:.1f} s; metrics in {args.out_dir / 'metrics.json'}")
    return metrics


# --- command line

def parse_args(argv=None):
    parser = make_parser(STAGE, "Bigram model of names: a count table, then the same model as a "
                         "neural net.", "data/names.txt", "text file with one name per line", 42)
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter  # every help shows its default
    add = parser.add_argument
    add("--smoothing", type=float, default=1.0, help="count added to every cell of the table "
        "before normalizing, so that no pair has probability 0 (0 = none)")
    add("--max-steps", type=int, default=200, help="gradient-descent steps of the neural bigram")
    add("--batch-size", type=int, help="pairs per step of the neural bigram; unset: all the "
        "training pairs, i.e. full-batch gradient descent")
    add("--lr", type=float, default=50.0, help="learning rate of the plain gradient descent; "
        "large because the gradient of a mean over one-hot rows is tiny")
    add("--l2", type=float, default=1e-4, help="weight of the penalty mean(W**2), the neural "
        "cousin of smoothing: it pulls the logits toward equal probabilities")
    add("--eval-every", type=int, default=20, help="steps between evaluations of the neural "
        "bigram, logged and printed (0 = off: only the final losses)")
    add("--num-samples", type=int, default=10, help="names to sample from each model")
    args = check_args(parser.parse_args(argv), positive=("max_steps", "batch_size", "lr"),
                      non_negative=("smoothing", "l2", "eval_every", "num_samples"))
    return args


if __name__ == "__main__":
    main(parse_args())
