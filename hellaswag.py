"""hellaswag.py: score a language model on HellaSwag, the common-sense sentence-completion test.

HellaSwag (Zellers et al. 2019, "HellaSwag: Can a Machine Really Finish Your Sentence?") gives a
context and four endings, one of them right; the wrong ones were machine-written to fool models.
A language model answers with no training for the task: each ending is rendered after the
context (`ctx` + " " + ending), its tokens are scored by their cross-entropy, and the likeliest
ending is picked, by three rules:
- acc:            the lowest summed loss (total log-likelihood);
- acc_norm:       the lowest mean loss per token (what GPT-2 reproductions report);
- acc_norm_chars: the lowest loss per character (lm-evaluation-harness's acc_norm).
Random guessing gets 0.25; people get 0.95. gpt2.py calls `evaluate()` during training; this
file's command line scores Hugging Face GPT-2 weights.

Run (from the repository root):
    python hellaswag.py --hf-model gpt2              # OpenAI GPT-2 124M, through transformers
    python hellaswag.py --hf-model gpt2 --data path/to/hellaswag_val.jsonl --limit 500
    python gpt2.py --eval-hellaswag --init-from out/gpt2/checkpoint.pt   # a gpt2.py checkpoint
The official val split (10,042 examples) is downloaded on first use from the dataset's GitHub
repository into --cache-dir and checked against its published size and sha256; --data scores a
local copy instead (offline).

Expected (published evaluations with this method): OpenAI GPT-2 124M acc 0.2859, acc_norm
0.2955, acc_norm_chars 0.3114; 1.5B 0.3842 / 0.4893 / 0.5089. `python bench.py hellaswag` times
the scorer against the plain one (an example a forward pass); README's Performance has figures.
"""
import argparse
import contextlib
import hashlib
import http.client
import json
import os
import urllib.request
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

import common
import fineweb
from common import die

# Accuracy of OpenAI's GPT-2 with exactly this method (acc, acc_norm) and with
# lm-evaluation-harness's character normalization (acc_norm_chars); public evaluations.
REFERENCE = {"gpt2": {"acc": 0.2859, "acc_norm": 0.2955, "acc_norm_chars": 0.3114},
             "gpt2-xl": {"acc": 0.3842, "acc_norm": 0.4893, "acc_norm_chars": 0.5089}}


# --- rendering: an example as 4 rows of tokens

def render_example(example, enc):
    """(tokens, mask, label): the 4 rows ctx + " " + ending, (4, T) each, right-padded with 0.

    mask is 1 on the ending's tokens, the only ones scored.
    """
    ctx = enc.encode_ordinary(example["ctx"])
    endings = [enc.encode_ordinary(" " + ending) for ending in example["endings"]]
    T = len(ctx) + max(len(e) for e in endings)
    tokens = torch.zeros((4, T), dtype=torch.long)  # (4, T)
    mask = torch.zeros((4, T), dtype=torch.long)  # (4, T)
    for i, ending in enumerate(endings):
        row = ctx + ending
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, len(ctx):len(row)] = 1
    return tokens, mask, example["label"]


# --- scoring: a model offers hidden_states(idx) (B, T, C) and lm_head, C -> vocabulary logits

LOGITS_PER_CHUNK = 1024  # scored positions per output-layer call: bounds the (N, vocab) logits
# Every batch has a new length: keep off cuDNN's attention, which builds a plan per shape (0.1 s
# each on an H100); flash and memory-efficient attention have no such cost.
VARIABLE_LENGTH_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                             SDPBackend.MATH]


def ending_losses(model, tokens, mask, autocast_dtype=None):
    """Summed cross-entropy of each row's masked tokens: (R,) float64, for (R, T) tokens and mask.

    The output layer would map every position to a vocabulary-sized row of logits, but only the
    positions that predict an ending's token are scored: the others are skipped. With GPT-2's
    50K-word vocabulary the output layer is most of the work of a small model.
    """
    rows, positions = mask[:, 1:].nonzero(as_tuple=True)  # (N,), (N,): position t predicts t + 1
    targets = tokens[rows, positions + 1]  # (N,)
    autocast = (torch.autocast(tokens.device.type, dtype=autocast_dtype)
                if autocast_dtype is not None else contextlib.nullcontext())
    with autocast:
        hidden = model.hidden_states(tokens)[rows, positions]  # (N, C)
        losses = [F.cross_entropy(model.lm_head(h).float(), y, reduction="none")  # (n,)
                  for h, y in zip(hidden.split(LOGITS_PER_CHUNK), targets.split(LOGITS_PER_CHUNK))]
    loss = torch.cat(losses).double()  # (N,)
    sums = torch.zeros(len(tokens), dtype=torch.float64, device=loss.device)  # (R,)
    return sums.index_add_(0, rows, loss)


def choose(sums, counts, chars):
    """The picks of one example from its 4 summed losses, token counts and ending lengths in chars.

    Ties go to the first ending, the same way in every code path.
    """
    def lowest(values):
        return min(range(4), key=lambda i: values[i])
    return (lowest(sums), lowest([s / n for s, n in zip(sums, counts)]),
            lowest([s / max(c, 1) for s, c in zip(sums, chars)]))


def prediction(example, index, sums, counts):
    """One example's line of --predictions: its label, the 3 picks, the 4 summed and mean losses."""
    pred, pred_norm, pred_norm_chars = choose(sums, counts, [len(e) for e in example["endings"]])
    return {"ind": example.get("ind", index), "label": example["label"], "pred": pred,
            "pred_norm": pred_norm, "pred_norm_chars": pred_norm_chars, "loss_sum": sums,
            "loss_mean": [s / n for s, n in zip(sums, counts)]}


def score_examples(model, examples, device="cpu", enc=None, batch_size=32, autocast_dtype=None,
                   progress=False):
    """The prediction of every example (in the order given), many examples a forward pass:
    sorted by length, so that little of each batch is padding. bench.py's score_example, an
    example a pass with all the logits, is the plain scorer it is tested against."""
    enc = enc or fineweb.get_encoding()
    rendered = [render_example(example, enc) for example in examples]
    order = sorted(range(len(examples)), key=lambda i: rendered[i][0].shape[1])
    results = [None] * len(examples)
    bar = tqdm(total=len(examples), unit="ex", desc="hellaswag", disable=not progress)
    with torch.no_grad(), sdpa_kernel(VARIABLE_LENGTH_ATTENTION):
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            T = max(rendered[i][0].shape[1] for i in batch)
            tokens = torch.zeros((4 * len(batch), T), dtype=torch.long)  # (4B, T)
            mask = torch.zeros((4 * len(batch), T), dtype=torch.long)  # (4B, T)
            for j, i in enumerate(batch):
                tokens[4 * j:4 * j + 4, :rendered[i][0].shape[1]] = rendered[i][0]
                mask[4 * j:4 * j + 4, :rendered[i][1].shape[1]] = rendered[i][1]
            sums = ending_losses(model, tokens.to(device), mask.to(device), autocast_dtype)
            sums, counts = sums.cpu().view(-1, 4).tolist(), mask.sum(dim=1).view(-1, 4).tolist()
            for j, i in enumerate(batch):
                results[i] = prediction(examples[i], i, sums[j], counts[j])
            bar.update(len(batch))
    bar.close()
    return results


def summarize(results):
    """Counts and accuracies of per-example results (before any all-reduce)."""
    counts = {"n": len(results),
              "correct": sum(r["pred"] == r["label"] for r in results),
              "correct_norm": sum(r["pred_norm"] == r["label"] for r in results),
              "correct_norm_chars": sum(r["pred_norm_chars"] == r["label"] for r in results)}
    return _accuracies(counts)


def _accuracies(counts):
    n = max(counts["n"], 1)
    return {**counts, "acc": counts["correct"] / n, "acc_norm": counts["correct_norm"] / n,
            "acc_norm_chars": counts["correct_norm_chars"] / n}


def evaluate(model, examples, device="cpu", enc=None, batch_size=32, rank=0, world_size=1,
             autocast_dtype=None):
    """HellaSwag accuracies of `model` on `examples`; with several ranks each scores its share.

    Rank r scores examples[r::world_size]; when torch.distributed is initialized the counts are
    summed over the ranks, so that every rank returns the result on all the examples.
    The model is scored in eval mode, and left in the mode it was in.
    """
    training = model.training
    model.eval()
    try:
        results = score_examples(model, examples[rank::world_size], device, enc, batch_size,
                                 autocast_dtype)
    finally:
        model.train(training)
    counts = summarize(results)
    keys = ["n", "correct", "correct_norm", "correct_norm_chars"]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        totals = torch.tensor([counts[k] for k in keys], dtype=torch.long, device=device)
        torch.distributed.all_reduce(totals, op=torch.distributed.ReduceOp.SUM)
        counts = dict(zip(keys, totals.tolist()))
    return _accuracies({k: counts[k] for k in keys})


def main(args):
    device = common.pick_device(args.device, threads=args.threads)
    common.print_header(device)
    fix = ("" if args.data else f"; check the network, or download hellaswag_{args.split}.jsonl "
           "on a machine with network access and pass it with --data FILE")
    examples = examples_or_die(args.data, fix, args.limit, args.split, args.cache_dir)
    model = load_model(args.hf_model, device)
    prepare_outputs(args.out_dir, args.predictions)  # a bad path fails now, not after scoring
    dtype = None if args.dtype == "float32" else getattr(torch, args.dtype)
    results = score_examples(model, examples, device, batch_size=args.batch_size,
                             autocast_dtype=dtype, progress=True)
    metrics = summarize(results)
    source = args.data or f"official {args.split} split"
    print(f"{metrics['n']} examples of {source}: acc {metrics['acc']:.4f}  "
          f"acc_norm {metrics['acc_norm']:.4f}  acc_norm_chars {metrics['acc_norm_chars']:.4f}")
    reference = REFERENCE.get(Path(args.hf_model).name.lower())
    if reference:
        print(f"reference for OpenAI {Path(args.hf_model).name} on all 10,042 val examples: "
              f"acc {reference['acc']:.4f}  acc_norm {reference['acc_norm']:.4f}  "
              f"acc_norm_chars {reference['acc_norm_chars']:.4f}")
    common.write_json(Path(args.out_dir) / "metrics.json",
                      {**metrics, "model": args.hf_model, "data": source})
    if args.predictions:
        common.write_atomic(args.predictions, lambda tmp: tmp.write_text(
            "".join(json.dumps(r) + "\n" for r in results), encoding="utf-8"))
        print(f"wrote {len(results)} predictions to {args.predictions}")
    return metrics


# --- data: the official files, downloaded once and checked, and the examples in them

class DataError(Exception):
    """Anything wrong with the HellaSwag data; the message is one line for the user."""


URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
# Size in bytes and sha256 of the official files, as recorded by the Hugging Face `hellaswag`
# dataset script (datasets/hellaswag/dataset_infos.json, download_checksums) for these URLs.
CHECKSUMS = {
    "train": (47496131, "dae5e69249868cb9fe4e23ff925c60b66169564cfb7072d793cd7356a2b69f8d"),
    "val": (12246618, "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"),
    "test": (11752147, "da082b00543e422b8d25394614d102944586986def4de5cd1bd36d86bcb76261"),
}


def download(split, cache_dir="data/hellaswag"):
    """The official file of `split` in cache_dir, downloaded and checked on first use.

    The file (12 MB for val) is checked in memory before anything is written, so a failed
    download leaves nothing behind; it is then written to a temporary file beside its name and
    renamed, so the cache never holds half a file.
    """
    path = Path(cache_dir) / f"hellaswag_{split}.jsonl"
    if path.is_file() and _is_official(path.read_bytes(), split):
        return path
    url = URL.format(split=split)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except (OSError, http.client.HTTPException) as error:  # URLError is an OSError
        raise DataError(f"cannot download {url} ({fineweb.in_words(error)})")
    if not _is_official(data, split):
        raise DataError(f"{url} did not match its published size and sha256 (try again later)")
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # one per process: ranks may race
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as error:
        if tmp.exists():
            tmp.unlink()
        raise DataError(f"cannot write {path} ({error.strerror})")
    return path


def _is_official(data, split):
    size, sha256 = CHECKSUMS[split]
    return len(data) == size and hashlib.sha256(data).hexdigest() == sha256


def _parse_example(line, where):
    try:
        example = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: not a JSON object: {error.msg}")
    if not isinstance(example, dict):
        raise DataError(f"{where}: not a JSON object")
    if not isinstance(example.get("ctx"), str):
        raise DataError(f"{where}: no text field 'ctx'")
    endings = example.get("endings")
    if not (isinstance(endings, list) and len(endings) == 4
            and all(isinstance(e, str) for e in endings)):
        raise DataError(f"{where}: 'endings' must be a list of 4 strings")
    label = example.get("label")
    if isinstance(label, str) and label.isdigit():  # some copies store the label as text
        label = int(label)
    if not (isinstance(label, int) and 0 <= label < 4):
        raise DataError(f"{where}: 'label' must be 0, 1, 2 or 3 "
                        "(the official test split has no labels)")
    return {**example, "label": label}


def load_examples(split="val", path=None, cache_dir="data/hellaswag"):
    """HellaSwag examples (dicts with ctx, endings, label, ...) from `path` or the official split.
    What is wrong is a DataError whose message names the problem, not a flag: each command line
    adds its own fix."""
    if path is None:
        if split not in CHECKSUMS:
            raise DataError(f"unknown split {split!r}; use one of {', '.join(CHECKSUMS)}")
        path = download(split, cache_dir)
    examples = []
    try:
        with open(path, "rb") as file:
            for line_number, raw in enumerate(file, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise DataError(f"{path}:{line_number}: not UTF-8 text")
                if line.strip():
                    examples.append(_parse_example(line, f"{path}:{line_number}"))
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror}")
    if not examples:
        raise DataError(f"{path}: no examples in the file")
    return examples


def examples_or_die(path=None, hint="", limit=0, split="val", cache_dir="data/hellaswag"):
    """load_examples for a command line (the first `limit` of them, 0: all): what is wrong with
    the data is one line, followed by `hint` (the caller's fix, in its flags), and exit status 2."""
    try:
        examples = load_examples(split, path=path, cache_dir=cache_dir)
    except DataError as error:
        die(f"HellaSwag: {error}{hint}")
    return examples[:limit or None]


# --- the command line's model: a Hugging Face GPT-2

class HFGPT2(torch.nn.Module):
    """A transformers GPT2LMHeadModel seen as the scorer sees a model (no forward needed)."""

    def __init__(self, hf_model):
        super().__init__()
        self.hf_model = hf_model
        self.lm_head = hf_model.lm_head

    def hidden_states(self, idx):
        return self.hf_model.transformer(idx).last_hidden_state  # (B, T, C), after ln_f


def load_model(name_or_dir, device):
    # Before transformers is imported: without network, its offline mode (the local cache
    # only) instead of half a minute of retries.
    offline = None if Path(name_or_dir).is_dir() else fineweb.hub_offline()
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        die("--hf-model needs transformers: run `pip install transformers`")
    try:
        hf_model = GPT2LMHeadModel.from_pretrained(name_or_dir)
    except (OSError, ValueError, RuntimeError) as error:  # unknown name, no network, not a GPT-2
        if offline:
            die(f"--hf-model {name_or_dir}: cannot reach the Hugging Face hub ({offline}) and "
                "the model is not in its local cache; connect to the network, or pass a local "
                "folder with config.json and model.safetensors")
        die(f"--hf-model {name_or_dir}: transformers cannot load it: "
            f"{str(error).splitlines()[0]}")
    return HFGPT2(hf_model).to(device).eval()


# --- command line

def prepare_outputs(out_dir, predictions):
    """--out-dir and the folder of --predictions, made as the stages make --out-dir."""
    common.prepare_out_dir(out_dir)
    if predictions:
        folder = Path(predictions).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # a file where a folder should be, no permission
            die(f"cannot create {folder} for --predictions ({err.strerror}); choose another file")


def parse_args(argv=None):
    # This file imports no stage, so a gpt2.py checkpoint is scored by gpt2.py: the help says how.
    parser = argparse.ArgumentParser(
        prog="hellaswag.py", description=__doc__.split("\n\n")[0],
        epilog="A gpt2.py checkpoint is scored by gpt2.py: python gpt2.py --eval-hellaswag "
               "--init-from CHECKPOINT (--hellaswag-data FILE, --hellaswag-limit N).")
    parser.error = die
    add = parser.add_argument
    add("--hf-model", required=True, help="a Hugging Face GPT-2 by name (gpt2, gpt2-xl, ...) or "
        "local folder; needs `pip install transformers`")
    add("--split", default="val", choices=["val", "train"],
        help="official split to download and score; test has no labels (default: %(default)s)")
    add("--data", help="score this local .jsonl file instead (default: the official split, "
        "downloaded once into --cache-dir)")
    add("--cache-dir", type=common.path_flag, default="data/hellaswag",
        help="where downloads are kept (default: %(default)s)")
    add("--out-dir", type=common.path_flag, default="out/hellaswag",
        help="where metrics.json is written (default: %(default)s)")
    add("--predictions", help="also write one JSON line per example to this file (default: none)")
    add("--overwrite", action="store_true",
        help="replace an existing --predictions file (never replaced without this flag)")
    add("--limit", type=int, default=0,
        help="score only the first N examples (default: 0, all)")
    add("--batch-size", type=int, default=32,
        help="examples per forward pass (default: %(default)s)")
    add("--device", default="auto",
        help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps (default: %(default)s)")
    add("--threads", type=int, default=0, help="torch's CPU threads (default: 0, one per core)")
    add("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
        help="autocast dtype of the forward pass; float32: no autocast (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.limit < 0:
        die(f"--limit must be 0 (all) or positive, got {args.limit}")
    if args.batch_size < 1:
        die(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.data is not None and not Path(args.data).is_file():
        die(f"--data {args.data}: no such file")
    if args.hf_model.startswith("~"):  # quoted, so not expanded: transformers takes it as is
        args.hf_model = os.path.expanduser(args.hf_model)
    model = Path(args.hf_model)
    if model.exists() and not model.is_dir():  # this file imports no stage to read a checkpoint
        die(f"--hf-model {args.hf_model} is a file (a gpt2.py checkpoint?), not a Hugging Face "
            "model folder; score a gpt2.py checkpoint with `python gpt2.py --eval-hellaswag "
            f"--init-from {args.hf_model}`")
    # Only what is clearly a path: a hub id (owner/name) holds a '/' too.
    if not model.exists() and (args.hf_model.startswith((".", "/")) or model.suffix == ".pt"):
        die(f"--hf-model {args.hf_model} does not exist; pass a Hugging Face model folder or a hub "
            "name such as gpt2")
    if args.predictions and Path(args.predictions).is_dir():
        die(f"--predictions {args.predictions} is a folder; pass a file name")
    if args.predictions and Path(args.predictions).resolve() == (Path(args.out_dir)
                                                                 / "metrics.json").resolve():
        die(f"--predictions {args.predictions} is where --out-dir's metrics.json goes; choose "
            "another file")
    if args.predictions and Path(args.predictions).exists() and not args.overwrite:
        die(f"--predictions {args.predictions} already exists; pass --overwrite to replace it, "
            "or choose another file")
    return args


if __name__ == "__main__":
    main(parse_args())
