"""Stage 2: an MLP over the last few characters (Bengio et al. 2003), with BatchNorm.

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
    python mlp.py --data ../shared/data/names.txt    # the canonical makemore list
    python mlp.py --device cuda                      # one GPU (auto picks it when present)

Measured on the canonical list (32,033 names), default flags (8,000 steps of batch 256,
32,675 parameters), on a quiet 2-core CPU (2 threads): 20 s wall; loss at init 3.3044 vs
ln(27) = 3.2958; train 1.9278, val 2.0211, test 2.0209.
On the bundled data/names.txt (29,910 names): train 1.9310, val 2.0373, test 2.0378.
Anchors: the lecture's MLP reaches val 2.17 (11,897 params, 200K steps of batch 32), 2.1048 with
BatchNorm and the init fixes.

Outputs in --out-dir (default out/mlp): log.jsonl (one line per evaluation), metrics.json,
mlp.png (the character embeddings in 2-D next to the loss curve).
"""
import argparse
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

STAGE = "mlp"


def die(message):
    print(f"{STAGE}.py: error: {message}", file=sys.stderr)
    sys.exit(2)


# --- config

def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="MLP language model of names (Bengio et al. 2003) with BatchNorm.")
    parser.error = die
    parser.add_argument("--data", type=Path, default=Path("data/names.txt"),
                        help="text file with one name per line (default: %(default)s)")
    parser.add_argument("--out-dir", type=Path, default=Path("out") / STAGE,
                        help="where log.jsonl, metrics.json and the figure go "
                             "(default: %(default)s)")
    parser.add_argument("--device", default="auto",
                        help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    parser.add_argument("--seed", type=int, default=42,
                        help="seed of the split, the initial weights, the batches and the samples")
    parser.add_argument("--max-steps", type=int, default=8000,
                        help="optimizer steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="examples (one next character each) per step (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=3e-3,
                        help="peak AdamW learning rate; decays to a tenth by the last step "
                             "(default: %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=0.1,
                        help="AdamW weight decay of the weight matrices (default: %(default)s)")
    parser.add_argument("--eval-every", type=int, default=1000,
                        help="steps between evaluations on the full train and val splits "
                             "(0 = only at the end; default: %(default)s)")
    parser.add_argument("--block-size", type=int, default=4,
                        help="characters of context (default: %(default)s)")
    parser.add_argument("--n-embd", type=int, default=24,
                        help="size of each character's embedding (default: %(default)s)")
    parser.add_argument("--n-hidden", type=int, default=256,
                        help="units of the hidden layer (default: %(default)s)")
    parser.add_argument("--num-samples", type=int, default=20,
                        help="names to sample at the end (default: %(default)s)")
    args = parser.parse_args(argv)
    for flag in ("max_steps", "batch_size", "block_size", "n_embd", "n_hidden"):
        if getattr(args, flag) <= 0:
            die(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if not args.lr > 0 or math.isinf(args.lr):
        die(f"--lr must be a positive number, got {args.lr}")
    if not args.weight_decay >= 0 or math.isinf(args.weight_decay):
        die(f"--weight-decay must be zero or a positive number, got {args.weight_decay}")
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


def check_block_size(block_size, names):
    """A context longer than the longest name plus its start token is never filled by data."""
    longest = max(len(name) for name in names)
    if block_size > longest + 1:
        die(f"--block-size {block_size} is longer than any context in the data (the longest name "
            f"has {longest} characters); use --block-size {longest + 1} or less")


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


# --- training and evaluation helpers

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


def tanh_outputs(model, X, Y):
    """One training-mode forward and backward on (X, Y): every tanh layer's output and gradient.
    The BatchNorm running statistics are put back afterwards: a diagnostic must not train."""
    outputs = []
    running = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}

    def keep(module, inputs, output):
        output.retain_grad()
        outputs.append(output)

    hooks = [m.register_forward_hook(keep) for m in model.modules() if isinstance(m, nn.Tanh)]
    was_training = model.training
    model.train()
    try:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(X), Y).backward()
    finally:
        for hook in hooks:
            hook.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        model.load_state_dict(running, strict=False)
    return [(out.detach().cpu(), out.grad.cpu()) for out in outputs]


def saturation(outputs, threshold=0.97):
    """Fraction of tanh outputs in the flat tails, where almost no gradient flows back."""
    return [(out.abs() > threshold).float().mean().item() for out, _ in outputs]


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
    names = []
    for row in tokens.tolist():
        names.append(vocab.decode(row[:row.index(0)] if 0 in row else row))
    return names


def write_json_atomic(path, obj):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def draw_figure(path, model, vocab, step_losses, evals):
    """Left: the first two embedding dimensions of every character. Right: the loss curves.
    Returns False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_emb, ax_loss) = plt.subplots(1, 2, figsize=(13, 5.5))
    emb = model.wte.weight.detach().cpu()  # (V, n_embd)
    ax_emb.scatter(emb[:, 0], emb[:, 1], s=250, c="lightsteelblue")
    for i in range(vocab.size):
        ax_emb.text(emb[i, 0].item(), emb[i, 1].item(), vocab.label(i), ha="center",
                    va="center", fontsize=10)
    ax_emb.set_title("character embeddings, dimensions 0 and 1 ('.' = start/end)")
    ax_emb.grid(alpha=0.3)
    window = max(1, len(step_losses) // 100)
    smooth = torch.tensor(step_losses[:len(step_losses) // window * window])
    smooth = smooth.view(-1, window).mean(dim=1)
    ax_loss.plot((torch.arange(len(smooth)) * window + window / 2).tolist(), smooth.tolist(),
                 label=f"train batch loss (mean of {window} steps)", alpha=0.6)
    ax_loss.plot([e["step"] for e in evals], [e["train_loss"] for e in evals], "o-",
                 label="train split")
    ax_loss.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "o-",
                 label="val split")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy (nats)")
    ax_loss.set_title("loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight")
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
    check_block_size(args.block_size, names)
    train_names, val_names, test_names = split_names(names, args.seed)
    prepare_out_dir(args.out_dir)
    print("command:", " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    print(f"python {platform.python_version()}, torch {torch.__version__}, device {device}")

    vocab = build_vocab(names)
    V = vocab.size
    splits = {}
    for split, members in (("train", train_names), ("val", val_names), ("test", test_names)):
        X, Y = build_dataset(members, vocab, args.block_size)  # (N, block_size), (N,)
        splits[split] = (X.to(device), Y.to(device))
    print(f"{len(names)} names from {args.data}: {len(train_names)} train, {len(val_names)} val, "
          f"{len(test_names)} test names ({len(splits['train'][0])} training examples); "
          f"vocabulary of {V} tokens (start/end + {V - 1} characters)")

    torch.manual_seed(args.seed)
    config = ModelConfig(vocab_size=V, block_size=args.block_size, n_embd=args.n_embd,
                         n_hidden=args.n_hidden)
    model = MLP(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {config}, {n_params} parameters")
    # Weight decay shrinks the weight matrices and embeddings only: decaying BatchNorm's gamma
    # and beta or the output bias would just fight the normalization.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)

    Xtr, Ytr = splits["train"]
    batch_gen = torch.Generator().manual_seed(args.seed)
    probe = torch.randint(0, len(Xtr), (min(len(Xtr), 1024),), generator=batch_gen).to(device)
    init_loss = split_loss(model, Xtr, Ytr)
    print(f"loss at init: {init_loss:.4f}  (a uniform guess over {V} tokens: ln({V}) = "
          f"{math.log(V):.4f})")
    sat_init = saturation(tanh_outputs(model, Xtr[probe], Ytr[probe]))
    print("saturated tanh units (|tanh| > 0.97) at init: "
          + ", ".join(f"{s:.1%}" for s in sat_init))

    log = open(args.out_dir / "log.jsonl", "w", encoding="utf-8")
    evals, step_losses = [], []

    def evaluate(step):
        row = {"step": step, "seconds": round(time.time() - started, 3),
               "train_loss": split_loss(model, Xtr, Ytr),
               "val_loss": split_loss(model, *splits["val"])}
        evals.append(row)
        log.write(json.dumps(row) + "\n")
        log.flush()
        print(f"step {step:6d}  train {row['train_loss']:.4f}  val {row['val_loss']:.4f}  "
              f"lr {lr_at(step, args.max_steps, args.lr):.2e}  {row['seconds']:.1f} s")

    model.train()
    for step in range(args.max_steps):
        if args.eval_every and step % args.eval_every == 0:
            evaluate(step)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.max_steps, args.lr)
        idx = torch.randint(0, len(Xtr), (args.batch_size,), generator=batch_gen).to(device)
        loss = F.cross_entropy(model(Xtr[idx]), Ytr[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step_losses.append(loss.item())
    evaluate(args.max_steps)
    log.close()

    sat_end = saturation(tanh_outputs(model, Xtr[probe], Ytr[probe]))
    print("saturated tanh units (|tanh| > 0.97) after training: "
          + ", ".join(f"{s:.1%}" for s in sat_end))
    losses = {"train": evals[-1]["train_loss"], "val": evals[-1]["val_loss"],
              "test": split_loss(model, *splits["test"])}
    print(f"final (eval mode, BatchNorm running stats): train {losses['train']:.4f}  "
          f"val {losses['val']:.4f}  test {losses['test']:.4f}")
    samples = sample(model, vocab, args.num_samples, torch.Generator().manual_seed(args.seed))
    print("samples:", " ".join(samples))

    figure = args.out_dir / f"{STAGE}.png"
    if draw_figure(figure, model, vocab, step_losses, evals):
        print(f"figure: {figure}")
    else:
        figure = None
        print("matplotlib is not installed: no figure was drawn (pip install matplotlib)")

    metrics = {
        "stage": STAGE, "params": n_params, "steps": args.max_steps,
        "seconds": round(time.time() - started, 3),
        "train_loss": losses["train"], "val_loss": losses["val"], "test_loss": losses["test"],
        "init_loss": init_loss, "ln_vocab": math.log(V),
        "tanh_saturation_init": sat_init, "tanh_saturation_end": sat_end,
        "config": asdict(config), "batch_size": args.batch_size, "lr": args.lr,
        "device": str(device), "data": str(args.data), "seed": args.seed,
        "figure": figure and str(figure),
    }
    write_json_atomic(args.out_dir / "metrics.json", metrics)
    print(f"done in {metrics['seconds']:.1f} s; metrics in {args.out_dir / 'metrics.json'}")
    return metrics


if __name__ == "__main__":
    main(parse_args())
