"""Stage 1: a bigram language model of first names, first by counting, then as a neural net.

A bigram model predicts the next character from the current one only. Counting how often each
character follows each other one (a (V, V) table, V = the characters of the data plus one token
that marks both the start and the end of a name) and normalizing the rows gives the model that
maximizes the likelihood of the training names. The second half trains the same model as the
smallest possible neural network, one-hot input -> one (V, V) weight matrix -> softmax, by
gradient descent on the negative log-likelihood, and shows that it arrives at the counts: the
weights become the log-counts. Every later stage keeps this loss and this training loop and
only changes the function from context to logits.

Run (CPU, a few seconds; a GPU is never needed here):
    python bigram.py                                   # bundled data/names.txt
    python bigram.py --data ../shared/data/names.txt   # the canonical makemore list
    python bigram.py --smoothing 0                     # see why val NLL becomes inf

Measured on the canonical list (32,033 names) on a quiet 2-core CPU, default flags:
    count model fit on all names, no smoothing: NLL 2.4540 (the number to beat with a bigram)
    count model (fit on train, smoothing 1): train 2.4548, val 2.4533, test 2.4584
    neural bigram after 200 steps of full-batch gradient descent: train 2.4627
    whole run 12 s, figure included
On the bundled data/names.txt (29,910 names): count model train 2.4542, val 2.4541; neural
bigram train 2.4620.

Outputs in --out-dir (default out/bigram): log.jsonl (the neural bigram's losses as it trains),
metrics.json, bigram_counts.png (the count table, each cell with its pair and count).
"""
import argparse
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

STAGE = "bigram"


def die(message):
    print(f"{STAGE}.py: error: {message}", file=sys.stderr)
    sys.exit(2)


# --- config

def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Bigram model of names: a count table, then the same model as a neural net.")
    parser.error = die
    parser.add_argument("--data", type=Path, default=Path("data/names.txt"),
                        help="text file with one name per line (default: %(default)s)")
    parser.add_argument("--out-dir", type=Path, default=Path("out") / STAGE,
                        help="where log.jsonl, metrics.json and the figure go "
                             "(default: %(default)s)")
    parser.add_argument("--device", default="auto",
                        help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    parser.add_argument("--seed", type=int, default=42,
                        help="seed of the split, the initial weights and the samples")
    parser.add_argument("--smoothing", type=float, default=1.0,
                        help="count added to every cell of the table before normalizing, so that "
                             "no pair has probability 0 (0 = none; default: %(default)s)")
    parser.add_argument("--max-steps", type=int, default=200,
                        help="gradient-descent steps of the neural bigram (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="pairs per step of the neural bigram (default: all training pairs, "
                             "i.e. full-batch gradient descent)")
    parser.add_argument("--lr", type=float, default=50.0,
                        help="learning rate of the neural bigram's plain gradient descent; large "
                             "because the gradient of a mean over one-hot rows is tiny "
                             "(default: %(default)s)")
    parser.add_argument("--l2", type=float, default=1e-4,
                        help="weight of the penalty mean(W**2), the neural cousin of smoothing: "
                             "it pulls the logits toward equal probabilities "
                             "(default: %(default)s)")
    parser.add_argument("--eval-every", type=int, default=20,
                        help="steps between log.jsonl lines of the neural bigram (0 = only the "
                             "final one; default: %(default)s)")
    parser.add_argument("--num-samples", type=int, default=10,
                        help="names to sample from each model (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.max_steps <= 0:
        die(f"--max-steps must be positive, got {args.max_steps}")
    if args.batch_size is not None and args.batch_size <= 0:
        die(f"--batch-size must be positive, got {args.batch_size}")
    if not args.lr > 0 or math.isinf(args.lr):
        die(f"--lr must be a positive number, got {args.lr}")
    if not args.smoothing >= 0 or math.isinf(args.smoothing):
        die(f"--smoothing must be zero or a positive number, got {args.smoothing}")
    if not args.l2 >= 0 or math.isinf(args.l2):
        die(f"--l2 must be zero or a positive number, got {args.l2}")
    if args.eval_every < 0:
        die(f"--eval-every must be 0 (off) or positive, got {args.eval_every}")
    if args.num_samples < 0:
        die(f"--num-samples must be 0 or positive, got {args.num_samples}")
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

def read_names(path):
    """The names in `path`, one per line, blank lines skipped; a bad file ends the run via die()."""
    if not path.exists():
        die(f"data file {path} does not exist; pass --data with a text file of one name per line")
    if not path.is_file():
        die(f"data path {path} is not a file; pass --data with a text file of one name per line")
    try:
        text = path.read_bytes().decode("utf-8")
    except PermissionError:
        die(f"cannot read data file {path} (permission denied); fix its permissions or copy it")
    except OSError as err:
        die(f"cannot read data file {path} ({err.strerror}); pass --data with a readable file")
    except UnicodeDecodeError as err:
        die(f"data file {path} is not UTF-8 text (bad byte at offset {err.start}); "
            "re-encode it as UTF-8")
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        die(f"data file {path} holds no names; it needs one name per line")
    return names


def split_names(names, seed):
    """A seeded shuffle cut 80/10/10 into train, val and test names."""
    if len(names) < 10:
        die(f"the data holds {len(names)} names; an 80/10/10 split needs at least 10")
    names = list(names)
    random.Random(seed).shuffle(names)
    n1, n2 = int(0.8 * len(names)), int(0.9 * len(names))
    return names[:n1], names[n1:n2], names[n2:]


@dataclass
class Vocab:
    """Characters of the data plus token 0, which marks both the start and the end of a name."""
    chars: list

    @property
    def size(self):
        return len(self.chars) + 1

    def encode(self, name):
        return [self.chars.index(ch) + 1 for ch in name]

    def label(self, index):
        """How token `index` is drawn in the figure: '.' for the start/end token."""
        return "." if index == 0 else self.chars[index - 1]

    def decode(self, indices):
        return "".join(self.chars[i - 1] for i in indices)


def build_vocab(names):
    return Vocab(sorted(set("".join(names))))


def bigram_pairs(names, vocab):
    """Every (current, next) token pair of every name, start and end tokens included."""
    xs, ys = [], []
    for name in names:
        tokens = [0] + vocab.encode(name) + [0]
        xs.extend(tokens[:-1])
        ys.extend(tokens[1:])
    return torch.tensor(xs), torch.tensor(ys)  # (N,), (N,)


# --- model

def count_table(xs, ys, vocab_size):
    """(V, V) table: counts[i, j] = how often token j follows token i."""
    counts = torch.zeros(vocab_size * vocab_size, dtype=torch.long)
    counts.index_add_(0, xs * vocab_size + ys, torch.ones_like(xs))
    return counts.view(vocab_size, vocab_size)  # (V, V)


def count_probs(counts, smoothing):
    """Rows of the count table normalized to next-token probabilities, after smoothing."""
    table = counts.double() + smoothing
    rows = table.sum(dim=1, keepdim=True)
    # A token never seen in the training names has an empty row even without smoothing: give it
    # a uniform guess instead of 0/0.
    return torch.where(rows > 0, table / rows.clamp(min=1e-300), 1.0 / counts.shape[1])  # (V, V)


def nll(probs, xs, ys):
    """Average negative log-likelihood of the pairs; inf if one has probability 0."""
    return -probs[xs, ys].log().mean().item()


@dataclass
class BigramConfig:
    vocab_size: int


class NeuralBigram(torch.nn.Module):
    """One-hot input -> (V, V) weights -> logits: a one-layer net that is only a lookup table."""

    def __init__(self, config, generator):
        super().__init__()
        self.config = config
        self.W = torch.nn.Parameter(torch.randn(config.vocab_size, config.vocab_size,
                                                generator=generator))  # (V, V)

    def forward(self, x):
        # Multiplying a one-hot row by W picks one row of W: the logits are log-counts to learn.
        xenc = F.one_hot(x, self.config.vocab_size).float()  # (N, V)
        return xenc @ self.W  # (N, V) logits


# --- training and evaluation helpers

def neural_loss(model, xs, ys):
    return F.cross_entropy(model(xs), ys).item()


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


def write_json_atomic(path, obj):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def draw_count_table(path, counts, vocab):
    """The count table as a heatmap, each cell labelled with its pair and count; False without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    V = vocab.size
    fig, ax = plt.subplots(figsize=(0.6 * V, 0.6 * V))
    ax.imshow(counts.numpy(), cmap="Blues")
    for i in range(V):
        for j in range(V):
            ax.text(j, i, vocab.label(i) + vocab.label(j), ha="center", va="bottom",
                    color="gray", fontsize=7)
            ax.text(j, i, str(counts[i, j].item()), ha="center", va="top", color="gray",
                    fontsize=7)
    ax.set_title("bigram counts on the training names: row = current, column = next character")
    ax.axis("off")
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=80, bbox_inches="tight")
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


def main(args):
    started = time.time()
    device = pick_device(args.device)
    names = read_names(args.data)
    train_names, val_names, test_names = split_names(names, args.seed)
    prepare_out_dir(args.out_dir)
    print("command:", " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    print(f"python {platform.python_version()}, torch {torch.__version__}, device {device}")

    vocab = build_vocab(names)
    V = vocab.size
    print(f"{len(names)} names from {args.data}: {len(train_names)} train, {len(val_names)} val, "
          f"{len(test_names)} test; vocabulary of {V} tokens (start/end + {V - 1} characters)")
    splits = {"train": bigram_pairs(train_names, vocab), "val": bigram_pairs(val_names, vocab),
              "test": bigram_pairs(test_names, vocab)}

    # 1. Counting. Fit and evaluated on all names without smoothing, this is the best NLL any
    # bigram model can reach on the data; fit on train, it is what generalizes.
    all_xs, all_ys = bigram_pairs(names, vocab)
    full_nll = nll(count_probs(count_table(all_xs, all_ys, V), 0.0), all_xs, all_ys)
    print(f"count model fit on all names, no smoothing: NLL {full_nll:.4f} "
          f"(uniform guess: ln({V}) = {math.log(V):.4f})")
    counts = count_table(*splits["train"], V)  # (V, V)
    probs = count_probs(counts, args.smoothing)  # (V, V)
    count_losses = {split: nll(probs, xs, ys) for split, (xs, ys) in splits.items()}
    print(f"count model fit on train, smoothing {args.smoothing:g}: "
          + ", ".join(f"{split} {loss:.4f}" for split, loss in count_losses.items()))

    # 2. The same model as a neural net, trained by gradient descent on the same loss.
    torch.manual_seed(args.seed)
    init_gen = torch.Generator().manual_seed(args.seed)
    model = NeuralBigram(BigramConfig(vocab_size=V), init_gen).to(device)
    train_x, train_y = (t.to(device) for t in splits["train"])
    val_x, val_y = (t.to(device) for t in splits["val"])
    batch_gen = torch.Generator().manual_seed(args.seed + 1)
    print(f"neural bigram: {V * V} weights, {args.max_steps} steps of "
          f"{'full-batch' if args.batch_size is None else f'batch {args.batch_size}'} "
          f"gradient descent at lr {args.lr:g}, L2 {args.l2:g}")

    log = open(args.out_dir / "log.jsonl", "w", encoding="utf-8")

    def evaluate(step):
        with torch.no_grad():
            row = {"step": step, "seconds": round(time.time() - started, 3),
                   "train_loss": neural_loss(model, train_x, train_y),
                   "val_loss": neural_loss(model, val_x, val_y)}
        log.write(json.dumps(row) + "\n")
        log.flush()
        print(f"step {step:5d}  neural train {row['train_loss']:.4f}  val {row['val_loss']:.4f}"
              f"   | count model train {count_losses['train']:.4f}  val {count_losses['val']:.4f}")

    for step in range(args.max_steps):
        if args.eval_every and step % args.eval_every == 0:
            evaluate(step)
        if args.batch_size is None:
            xb, yb = train_x, train_y
        else:
            idx = torch.randint(0, len(train_x), (args.batch_size,), generator=batch_gen)
            xb, yb = train_x[idx.to(device)], train_y[idx.to(device)]
        loss = F.cross_entropy(model(xb), yb) + args.l2 * (model.W ** 2).mean()
        model.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            model.W -= args.lr * model.W.grad
    evaluate(args.max_steps)
    log.close()

    with torch.no_grad():
        neural_losses = {"train": neural_loss(model, train_x, train_y),
                         "val": neural_loss(model, val_x, val_y),
                         "test": neural_loss(model, *(t.to(device) for t in splits["test"]))}
        neural_probs = F.softmax(model.W, dim=1).double().cpu()  # (V, V)
    gap = neural_losses["train"] - count_losses["train"]
    print(f"neural bigram: train {neural_losses['train']:.4f} vs count model "
          f"{count_losses['train']:.4f} (gap {gap:+.4f}); largest difference between the two "
          f"probability tables: {(neural_probs - probs).abs().max().item():.4f}")

    for label, table in (("count model", probs), ("neural bigram", neural_probs)):
        # The same seed for both: once the tables agree, so do the samples.
        samples = sample(table, vocab, args.num_samples, torch.Generator().manual_seed(args.seed))
        print(f"samples from the {label}:", " ".join(samples))

    figure = args.out_dir / "bigram_counts.png"
    if draw_count_table(figure, counts, vocab):
        print(f"figure: {figure}")
    else:
        figure = None
        print("matplotlib is not installed: no figure was drawn (pip install matplotlib)")

    metrics = {
        "stage": STAGE, "params": V * V, "steps": args.max_steps,
        "seconds": round(time.time() - started, 3),
        "train_loss": neural_losses["train"], "val_loss": neural_losses["val"],
        "test_loss": neural_losses["test"],
        "count_train_loss": count_losses["train"], "count_val_loss": count_losses["val"],
        "count_test_loss": count_losses["test"], "count_full_data_nll": full_nll,
        "smoothing": args.smoothing, "vocab_size": V, "device": str(device),
        "data": str(args.data), "seed": args.seed, "figure": figure and str(figure),
    }
    write_json_atomic(args.out_dir / "metrics.json", metrics)
    print(f"done in {metrics['seconds']:.1f} s; metrics in {args.out_dir / 'metrics.json'}")
    return metrics


if __name__ == "__main__":
    main(parse_args())
