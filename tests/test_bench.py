"""bench.py: every subcommand runs, prints a table and one JSON line, and measures what it
claims (the same loss for both training implementations, the same tokens with and without the
KV cache). Tiny models, so that only the plumbing is tested here, not the speed."""
import json

import pytest

import bench
from conftest import assert_user_error, run_script

TINY = ["--preset", "cpu-tiny", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
        "--device", "cpu"]


def run(argv, capsys):
    result = bench.main(bench.parse_args(argv))
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == json.loads(json.dumps(result))  # the last line is the JSON
    return result, out


def test_train_compares_with_the_reference_on_the_same_math(capsys):
    """Ours and the straightforward reference start from the same weights and batch: the same
    first loss; both rates are reported, alternating rounds."""
    result, out = run(["train", *TINY, "--seq-len", "16", "--batch-size", "2", "--steps", "1",
                       "--rounds", "2"], capsys)
    assert result["bench"] == "train"
    assert result["first_loss_ours"] == pytest.approx(result["first_loss_reference"], abs=1e-5)
    assert len(result["ours_rounds"]) == len(result["reference_rounds"]) == 2
    assert result["ours_tokens_per_s"] > 0 and result["speedup"] > 0
    assert any(line.strip().startswith("reference") for line in out)


def test_sample_reports_kv_cache_speedup_with_identical_tokens(capsys):
    result, _ = run(["sample", *TINY, "--new-tokens", "24", "--prompt-tokens", "4"], capsys)
    assert result["same_tokens"] is True
    assert result["kv_cache_tokens_per_s"] > 0 and result["recompute_tokens_per_s"] > 0


def test_hellaswag_reports_examples_per_second(tmp_path, capsys):
    data = tmp_path / "h.jsonl"
    data.write_text("".join(json.dumps({"ctx": f"A man {i} is", "endings": ["a", "b", "c", "d"],
                                        "label": 1}) + "\n" for i in range(3)))
    result, _ = run(["hellaswag", *TINY, "--data", str(data), "--limit", "2"], capsys)
    assert result["examples"] == 2 and result["examples_per_s"] > 0


def test_every_benchmark_is_a_subcommand_and_mistakes_are_one_line(tmp_path):
    """The registry drives the command line; a bad value or a missing subcommand is a user error."""
    parser_names = set(bench.BENCHMARKS)
    assert {"train", "sample", "hellaswag"} <= parser_names
    for name in parser_names:
        assert bench.parse_args([name]).bench == name
    assert_user_error(run_script("bench.py"), "bench.py: error")
    assert_user_error(run_script("bench.py", "train", "--steps", "0", *TINY), "--steps")
    assert_user_error(run_script("bench.py", "hellaswag", *TINY, "--data", tmp_path / "none"),
                      "hellaswag")
