"""hellaswag.py: score a language model on HellaSwag, the common-sense sentence-completion benchmark.

HellaSwag (Zellers et al. 2019, "HellaSwag: Can a Machine Really Finish Your Sentence?") gives a
context and four endings, one of them right; the wrong ones were machine-written to fool models.
A language model answers with no training for the task: it scores each ending by how likely it
finds the ending's tokens after the context, and picks the most likely one. Random guessing gets
0.25; people get 0.95. gpt2.py calls `evaluate()` during training and scores its checkpoints with
`python gpt2.py --eval-hellaswag`; this file's command line scores Hugging Face GPT-2 weights.

Rendering (as GPT-2-style evaluations do it): the tokens of `ctx`, then " " + ending. Only the
ending's tokens are scored, by the cross-entropy of predicting each from everything before it:
- acc:            the ending with the lowest summed loss (total log-likelihood);
- acc_norm:       the lowest mean loss per token (what GPT-2 reproductions report);
- acc_norm_chars: the highest log-likelihood per character of the ending (lm-evaluation-harness's
                  acc_norm), to compare with its leaderboards.

Run (from the repository root):
    python hellaswag.py --hf-model gpt2                         # OpenAI GPT-2 124M (transformers)
    python gpt2.py --eval-hellaswag --init-from out/gpt2/checkpoint.pt   # a gpt2.py checkpoint
    python hellaswag.py --hf-model gpt2 --data my_copy.jsonl --limit 500 --device cuda
The official val split (10,042 examples) is downloaded from the dataset's GitHub repository on
first use into --cache-dir and checked against its published size and sha256; --data scores a
local copy instead (works offline).

Expected: OpenAI GPT-2 124M acc 0.2859, acc_norm 0.2955 with this method (1.5B: 0.3842 / 0.4893);
with the harness's character normalization 0.3114 (1.5B: 0.5089).

Speed: many examples per forward pass, sorted by length so that little is padding, and logits
computed only at the positions that are scored (when the model offers `hidden_states` and
`lm_head`): with GPT-2's 50K-word vocabulary the output layer is most of the work of a small
model. Measured with `python bench.py hellaswag --data hellaswag_val.jsonl --limit 0` on all
10,042 validation examples (4 layers, 256 wide, vocabulary 50,304, random weights; 2 CPU cores,
2 threads; the two designs take turns on chunks of 250 examples) against one forward pass per
example with full logits: 16.11 vs 4.87 examples/s, 3.31x (CPU time 3.37x), the same picks for
every example (2026-11-25).
"""
import argparse
import contextlib
import hashlib
import json
import os
import urllib.error
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
URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
# Size in bytes and sha256 of the official files, as recorded by the Hugging Face `hellaswag`
# dataset script (datasets/hellaswag/dataset_infos.json, download_checksums) for these URLs.
CHECKSUMS = {
    "train": (47496131, "dae5e69249868cb9fe4e23ff925c60b66169564cfb7072d793cd7356a2b69f8d"),
    "val": (12246618, "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"),
    "test": (11752147, "da082b00543e422b8d25394614d102944586986def4de5cd1bd36d86bcb76261"),
}
VARIABLE_LENGTH_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                             SDPBackend.MATH]
LOGITS_PER_CHUNK = 1024  # scored positions per output-layer call: bounds the (N, vocab) logits


class DataError(Exception):
    """Anything wrong with the HellaSwag data; the message is one line for the user."""


# --- config

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = die
    common.PROG = "hellaswag.py"
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="a gpt2.py checkpoint: scored by `python gpt2.py "
                                            "--eval-hellaswag --init-from CHECKPOINT` instead")
    model.add_argument("--hf-model", help="a Hugging Face GPT-2 by name (gpt2, gpt2-xl, ...) or local "
                                          "folder; needs `pip install transformers`")
    parser.add_argument("--split", default="val", choices=["val", "train"],
                        help="official split to download and score (test has no labels)")
    parser.add_argument("--data", help="score this local .jsonl file instead of downloading")
    parser.add_argument("--cache-dir", default="data/hellaswag", help="where downloads are kept")
    parser.add_argument("--out-dir", default="out/hellaswag", help="where metrics.json is written")
    parser.add_argument("--predictions", help="also write one JSON line per example to this file")
    parser.add_argument("--limit", type=int, default=0, help="score only the first N examples (0: all)")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per forward pass")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, mps")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="autocast dtype for the forward pass (float32: no autocast)")
    args = parser.parse_args(argv)
    if args.limit < 0:
        die(f"--limit must be 0 (all) or positive, got {args.limit}")
    if args.batch_size < 1:
        die(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.checkpoint is not None:
        # gpt2.py imports this file; this file imports no stage, so gpt2.py scores its own.
        die(f"hellaswag.py scores Hugging Face models; score a gpt2.py checkpoint with `python "
            f"gpt2.py --eval-hellaswag --init-from {args.checkpoint}` (--hellaswag-data FILE, "
            "--hellaswag-limit N)")
    if args.data is not None and not Path(args.data).is_file():
        die(f"--data {args.data}: no such file")
    if args.hf_model is not None and args.hf_model.startswith((".", "/")) and not Path(args.hf_model).is_dir():
        die(f"--hf-model {args.hf_model}: no such folder")
    return args


# --- data

def download(split, cache_dir="data/hellaswag"):
    """The official file of `split` in cache_dir, downloaded and checked on first use."""
    size, sha256 = CHECKSUMS[split]
    path = Path(cache_dir) / f"hellaswag_{split}.jsonl"
    if path.is_file() and path.stat().st_size == size and _sha256(path) == sha256:
        return path
    url = URL.format(split=split)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: ranks may race here
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as file:
            while chunk := response.read(1 << 20):
                file.write(chunk)
    except (urllib.error.URLError, OSError) as error:
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot download {url} ({getattr(error, 'reason', error)}); "
                        f"check the network, or score a local copy with --data")
    if tmp.stat().st_size != size or _sha256(tmp) != sha256:
        tmp.unlink()
        raise DataError(f"{url} did not match its published size and sha256; try again later")
    os.replace(tmp, path)  # atomic: the cache never holds half a file
    return path


def _sha256(path):
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


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
    if not (isinstance(endings, list) and len(endings) == 4 and all(isinstance(e, str) for e in endings)):
        raise DataError(f"{where}: 'endings' must be a list of 4 strings")
    label = example.get("label")
    if isinstance(label, str) and label.isdigit():  # some copies store the label as text
        label = int(label)
    if not (isinstance(label, int) and 0 <= label < 4):
        raise DataError(f"{where}: 'label' must be 0, 1, 2 or 3 (the official test split has no labels)")
    return {**example, "label": label}


def load_examples(split="val", path=None, cache_dir="data/hellaswag"):
    """HellaSwag examples (dicts with ctx, endings, label, ...) from `path` or the official split."""
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
    the data is one line, followed by `hint`, and exit status 2."""
    try:
        examples = load_examples(split, path=path, cache_dir=cache_dir)
    except DataError as error:
        die(f"HellaSwag: {error}{hint}")
    return examples[:limit or None]


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


# --- scoring

def _has_fast_path(model):
    return callable(getattr(model, "hidden_states", None)) and isinstance(getattr(model, "lm_head", None),
                                                                         torch.nn.Module)


def ending_losses(model, tokens, mask, autocast_dtype=None):
    """Summed cross-entropy over each row's masked tokens: (R,) float64, for (R, T) tokens and mask.

    Token t is predicted from position t - 1, so a scored token at t uses the output at t - 1.
    """
    rows, positions = mask[:, 1:].nonzero(as_tuple=True)  # (N,), (N,): outputs that predict a scored token
    targets = tokens[rows, positions + 1]  # (N,)
    device_type = tokens.device.type
    autocast = (torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    losses = []
    with autocast:
        if _has_fast_path(model):
            # The output layer maps every position to a vocabulary-sized row of logits, but only
            # the positions that predict ending tokens are scored: skip all the others.
            hidden = model.hidden_states(tokens)[rows, positions]  # (N, C)
            for start in range(0, len(rows), LOGITS_PER_CHUNK):
                logits = model.lm_head(hidden[start:start + LOGITS_PER_CHUNK]).float()  # (n, V)
                losses.append(F.cross_entropy(logits, targets[start:start + LOGITS_PER_CHUNK], reduction="none"))
        else:
            # Any model(idx) -> logits (or a tuple starting with them): a few rows per call, so
            # that the (rows, T, V) logits stay a few hundred MB.
            step = max(1, 1024 // tokens.shape[1])
            for start in range(0, tokens.shape[0], step):
                out = model(tokens[start:start + step])
                logits = out[0] if isinstance(out, (tuple, list)) else out  # (r, T, V)
                keep = (rows >= start) & (rows < start + step)
                logits = logits[rows[keep] - start, positions[keep]].float()  # (n, V)
                losses.append(F.cross_entropy(logits, targets[keep], reduction="none"))
    loss = torch.cat(losses).double()  # (N,)
    return torch.zeros(tokens.shape[0], dtype=torch.float64, device=loss.device).index_add_(0, rows, loss)


def choose(sums, counts, chars):
    """The picks of one example from its 4 summed losses, token counts and ending lengths in chars.

    Ties go to the first ending, the same way in every code path.
    """
    def lowest(values):
        return min(range(4), key=lambda i: values[i])
    return (lowest(sums), lowest([s / n for s, n in zip(sums, counts)]),
            lowest([s / max(c, 1) for s, c in zip(sums, chars)]))


def score_examples(model, examples, device="cpu", enc=None, batch_size=32, autocast_dtype=None,
                   progress=False):
    """Per-example results (in the order given): label, the 3 picks, the 4 summed and mean losses."""
    enc = enc or fineweb.get_encoding()
    rendered = [render_example(example, enc) for example in examples]
    # Examples of similar length share a batch, so that little of each forward pass is padding.
    order = sorted(range(len(examples)), key=lambda i: rendered[i][0].shape[1])
    results = [None] * len(examples)
    bar = tqdm(total=len(examples), unit="ex", desc="hellaswag", disable=not progress)
    # Every batch has a new length: keep off cuDNN's attention, which builds a plan per shape
    # (0.1 s each on an H100); flash and memory-efficient attention have no such cost.
    with torch.no_grad(), sdpa_kernel(VARIABLE_LENGTH_ATTENTION):
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            T = max(rendered[i][0].shape[1] for i in batch)
            tokens = torch.zeros((4 * len(batch), T), dtype=torch.long)  # (4B, T)
            mask = torch.zeros((4 * len(batch), T), dtype=torch.long)  # (4B, T)
            for j, i in enumerate(batch):
                tokens[4 * j:4 * j + 4, :rendered[i][0].shape[1]] = rendered[i][0]
                mask[4 * j:4 * j + 4, :rendered[i][1].shape[1]] = rendered[i][1]
            sums = ending_losses(model, tokens.to(device), mask.to(device), autocast_dtype).cpu()  # (4B,)
            counts = mask.sum(dim=1)  # (4B,)
            for j, i in enumerate(batch):
                s, n = sums[4 * j:4 * j + 4].tolist(), counts[4 * j:4 * j + 4].tolist()
                chars = [len(ending) for ending in examples[i]["endings"]]
                pred, pred_norm, pred_norm_chars = choose(s, n, chars)
                results[i] = {"ind": examples[i].get("ind", i), "label": rendered[i][2], "pred": pred,
                              "pred_norm": pred_norm, "pred_norm_chars": pred_norm_chars,
                              "loss_sum": s, "loss_mean": [a / b for a, b in zip(s, n)]}
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


def evaluate(model, examples, device="cpu", enc=None, batch_size=32, rank=0, world_size=1, autocast_dtype=None):
    """HellaSwag accuracies of `model` on `examples`; with several ranks each scores its share.

    Rank r scores examples[r::world_size]; when torch.distributed is initialized the counts are
    summed over the ranks, so that every rank returns the result on all the examples.
    The model is scored in eval mode, and left in the mode it was in.
    """
    training = model.training
    model.eval()
    try:
        results = score_examples(model, examples[rank::world_size], device, enc, batch_size, autocast_dtype)
    finally:
        model.train(training)
    counts = summarize(results)
    keys = ["n", "correct", "correct_norm", "correct_norm_chars"]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        totals = torch.tensor([counts[k] for k in keys], dtype=torch.long, device=device)
        torch.distributed.all_reduce(totals, op=torch.distributed.ReduceOp.SUM)
        counts = dict(zip(keys, totals.tolist()))
    return _accuracies({k: counts[k] for k in keys})


# --- GPT-2 weights in Hugging Face's layout: OpenAI's GPT-2 to compare with, and a gpt2.py
# model exported for the Hugging Face evaluators (lm-evaluation-harness and the like)

# Hugging Face's GPT-2 stores these four weights as Conv1D, (in, out): nn.Linear's transpose.
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HUB = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # OpenAI's weights on the hub


def read_hf_gpt2(name_or_dir):
    """(config, weights) of a GPT-2 in Hugging Face's layout, for gpt2.py's GPTConfig and GPT:
    a hub name (downloaded once into the Hugging Face cache, which also serves offline runs) or a
    folder with config.json and model.safetensors or pytorch_model.bin."""
    directory = Path(name_or_dir)
    if not directory.is_dir():
        if name_or_dir not in HUB:
            raise FileNotFoundError(f"{name_or_dir} is neither a folder nor one of {HUB}")
        from huggingface_hub import snapshot_download
        directory = Path(snapshot_download(f"openai-community/{name_or_dir}",
                                           allow_patterns=["config.json", "model.safetensors"]))
    hf = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    gpt2 = dict(model_type="gpt2", layer_norm_epsilon=1e-5, scale_attn_weights=True,
                scale_attn_by_inverse_layer_idx=False)
    if (any(hf.get(key, value) != value for key, value in gpt2.items())
            or hf.get("n_inner") not in (None, 4 * hf["n_embd"])
            or hf.get("activation_function") not in ("gelu_new", "gelu_pytorch_tanh", None)):
        raise ValueError(f"{directory}/config.json is not a GPT-2 that gpt2.py implements")
    if (directory / "model.safetensors").is_file():
        from safetensors.torch import load_file
        weights = load_file(directory / "model.safetensors")
    else:
        weights = torch.load(directory / "pytorch_model.bin", weights_only=True)
    # GPT2LMHeadModel prefixes "transformer."; GPT2Model (OpenAI's hub files) does not. The
    # attention masks of old files are buffers, not weights.
    weights = {"transformer." + k.removeprefix("transformer."): w.t() if k.endswith(CONV1D) else w
               for k, w in weights.items() if not k.endswith((".attn.bias", ".masked_bias"))
               and not k.startswith("lm_head")}
    config = dict(block_size=hf["n_positions"], vocab_size=hf["vocab_size"],
                  n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"])
    return config, weights


def write_hf_gpt2(directory, state_dict, config):
    """config.json and model.safetensors of a gpt2.py model that GPT2LMHeadModel loads with the
    same logits. A folder that cannot be written ends the run with one line."""
    from safetensors.torch import save_file
    tensors = {key: (w.t() if key.endswith(CONV1D) else w).detach().float().contiguous().cpu()
               for key, w in state_dict.items() if key != "lm_head.weight"}  # tied to wte
    hf_config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_inner": None,
        "vocab_size": config["vocab_size"], "n_positions": config["block_size"],
        "n_ctx": config["block_size"], "n_embd": config["n_embd"], "n_layer": config["n_layer"],
        "n_head": config["n_head"], "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "tie_word_embeddings": True, "bos_token_id": fineweb.EOT, "eos_token_id": fineweb.EOT}
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        common.write_atomic(Path(directory) / "model.safetensors",
                            lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
        common.write_json(Path(directory) / "config.json", hf_config)
    except OSError as err:
        die(f"cannot write to {directory} ({err.strerror}); choose another folder")
    print(f"wrote {directory}: config.json and model.safetensors for GPT2LMHeadModel")


# --- models for the command line

class HFGPT2(torch.nn.Module):
    """A transformers GPT2LMHeadModel behind the interface evaluate() expects (with the fast path)."""

    def __init__(self, hf_model):
        super().__init__()
        self.hf_model = hf_model
        self.lm_head = hf_model.lm_head

    def hidden_states(self, idx):
        return self.hf_model.transformer(idx).last_hidden_state  # (B, T, C), after ln_f

    def forward(self, idx):
        return self.hf_model(idx).logits  # (B, T, V)


def load_model(args, device):
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        die("--hf-model needs transformers: run `pip install transformers`")
    try:
        hf_model = GPT2LMHeadModel.from_pretrained(args.hf_model)
    except OSError as error:  # transformers reports unknown names and no network as OSError
        die(f"cannot load {args.hf_model!r} with transformers: {str(error).splitlines()[0]}")
    return HFGPT2(hf_model).to(device).eval()


# --- main

def main(args):
    device = common.pick_device(args.device)
    common.print_header(device)
    examples = examples_or_die(args.data, "", args.limit, args.split, args.cache_dir)
    model = load_model(args, device)
    dtype = None if args.dtype == "float32" else getattr(torch, args.dtype)
    results = score_examples(model, examples, device, batch_size=args.batch_size, autocast_dtype=dtype,
                             progress=True)
    metrics = summarize(results)
    source = args.data or f"official {args.split} split"
    print(f"{metrics['n']} examples of {source}: acc {metrics['acc']:.4f}  acc_norm {metrics['acc_norm']:.4f}"
          f"  acc_norm_chars {metrics['acc_norm_chars']:.4f}")
    reference = REFERENCE.get(Path(args.hf_model).name.lower()) if args.hf_model else None
    if reference:
        print(f"reference for OpenAI {Path(args.hf_model).name} on all 10,042 val examples: "
              f"acc {reference['acc']:.4f}  acc_norm {reference['acc_norm']:.4f}  "
              f"acc_norm_chars {reference['acc_norm_chars']:.4f}")
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    common.write_json(Path(args.out_dir) / "metrics.json", {**metrics, "model": args.hf_model, "data": source})
    if args.predictions:
        common.write_atomic(args.predictions, lambda tmp: tmp.write_text(
            "".join(json.dumps(r) + "\n" for r in results), encoding="utf-8"))
        print(f"wrote {len(results)} predictions to {args.predictions}")
    return metrics


if __name__ == "__main__":
    main(parse_args())
