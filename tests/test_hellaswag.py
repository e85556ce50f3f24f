"""hellaswag.py: rendering, the three scores, batched = per-example, data errors, download, CLI."""
import hashlib
import json
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from conftest import ROOT, assert_user_error, offline_env, run_script

sys.path.insert(0, str(ROOT))
import bench  # noqa: E402  (the plain scorer, score_example, is the benchmark's reference)
import fineweb  # noqa: E402
import hellaswag  # noqa: E402

VOCAB = 50257

# Handmade examples (not from the dataset).
EXAMPLES = [
    {"ind": 0, "ctx": "The chef cracks two eggs into the bowl. She", "label": 1,
     "endings": ["flies to the moon on a spoon.", "whisks them with a fork.", "sings.",
                 "is a bowl of eggs eggs eggs."]},
    {"ind": 1, "ctx": "A boy kicks the ball toward the goal and", "label": 2,
     "endings": ["it melts.", "the goal kicks back at the boy hard.", "scores.",
                 "the referee eats the ball whole."]},
    {"ind": 2, "ctx": "Rain starts to fall, so the woman", "label": 0,
     "endings": ["opens her umbrella.", "yes yes yes",
                 "paints the rain blue with a very small brush.", "runs"]},
]


def write_examples(path, examples=EXAMPLES):
    path.write_text("".join(json.dumps(e) + "\n" for e in examples), encoding="utf-8")
    return path


class UnigramLM(nn.Module):
    """A model that ignores context: every position predicts log_probs over the vocabulary."""

    def __init__(self, log_probs):
        super().__init__()
        self.lm_head = nn.Linear(1, VOCAB)
        with torch.no_grad():
            self.lm_head.weight.zero_()
            self.lm_head.bias.copy_(log_probs)

    def hidden_states(self, idx):
        return torch.zeros(*idx.shape, 1)  # (B, T, 1)


class TinyCausalLM(nn.Module):
    """A small random model whose outputs depend on the whole prefix (a causal running mean)."""

    def __init__(self, seed=0, width=16):
        super().__init__()
        torch.manual_seed(seed)
        self.wte = nn.Embedding(VOCAB, width)
        self.mix = nn.Linear(width, width)
        self.lm_head = nn.Linear(width, VOCAB, bias=False)
        nn.init.normal_(self.lm_head.weight, std=1.0)

    def hidden_states(self, idx):
        x = self.wte(idx)  # (B, T, C)
        steps = torch.arange(1, idx.shape[1] + 1).view(1, -1, 1)  # (1, T, 1)
        return torch.tanh(self.mix(x.cumsum(dim=1) / steps))  # (B, T, C)


@pytest.fixture(scope="module")
def enc():
    return fineweb.get_encoding()


def test_render_puts_context_then_space_ending_and_masks_only_the_ending(enc):
    example = EXAMPLES[0]
    tokens, mask, label = hellaswag.render_example(example, enc)
    ctx = enc.encode(example["ctx"])
    endings = [enc.encode(" " + e) for e in example["endings"]]
    T = len(ctx) + max(map(len, endings))
    assert tokens.shape == mask.shape == (4, T) and tokens.dtype == torch.long and label == 1
    for i, ending in enumerate(endings):
        n = len(ctx) + len(ending)
        assert tokens[i, :n].tolist() == ctx + ending
        assert tokens[i, n:].tolist() == [0] * (T - n)  # right padding
        assert mask[i].tolist() == [0] * len(ctx) + [1] * len(ending) + [0] * (T - n)
    text = enc.decode(tokens[1, :len(ctx) + len(endings[1])].tolist())
    assert text == example["ctx"] + " " + example["endings"][1]


def test_scoring_picks_the_ending_the_model_prefers(enc):
    # A model that finds " yes" far likelier than anything else must pick "yes yes yes".
    log_probs = torch.full((VOCAB,), -20.0)
    log_probs[enc.encode(" yes")[0]] = 0.0
    results = hellaswag.score_examples(UnigramLM(log_probs), [EXAMPLES[2]], enc=enc)
    assert results[0]["pred"] == results[0]["pred_norm"] == results[0]["pred_norm_chars"] == 1


def test_the_three_accuracies_by_hand(enc):
    # A context-free model's loss for a token is just -log_probs[token], so every score and pick
    # can be worked out directly from the token lists, independently of hellaswag.py's batching.
    torch.manual_seed(1)
    log_probs = torch.log_softmax(torch.randn(VOCAB) * 3, dim=0)
    model = UnigramLM(log_probs)
    results = hellaswag.score_examples(model, EXAMPLES, enc=enc, batch_size=2)
    plain = [bench.score_example(model, e, enc, index=i) for i, e in enumerate(EXAMPLES)]
    correct = {"acc": 0, "acc_norm": 0, "acc_norm_chars": 0}
    for example, result, simple in zip(EXAMPLES, results, plain):
        sums = [-sum(log_probs[t].item() for t in enc.encode(" " + e)) for e in example["endings"]]
        means = [s / len(enc.encode(" " + e)) for s, e in zip(sums, example["endings"])]
        per_char = [s / len(e) for s, e in zip(sums, example["endings"])]
        assert result["loss_sum"] == pytest.approx(sums, rel=1e-5)
        assert simple["loss_sum"] == pytest.approx(sums, rel=1e-5)
        for key, values, pick in [("acc", sums, "pred"), ("acc_norm", means, "pred_norm"),
                                  ("acc_norm_chars", per_char, "pred_norm_chars")]:
            assert result[pick] == simple[pick] == values.index(min(values))
            correct[key] += values.index(min(values)) == example["label"]
    metrics = hellaswag.evaluate(UnigramLM(log_probs), EXAMPLES, enc=enc)
    assert metrics["n"] == 3
    assert metrics["correct"] == correct["acc"] and metrics["acc"] == correct["acc"] / 3
    assert metrics["correct_norm"] == correct["acc_norm"]
    assert metrics["acc_norm"] == correct["acc_norm"] / 3
    assert metrics["correct_norm_chars"] == correct["acc_norm_chars"]
    assert metrics["acc_norm_chars"] == correct["acc_norm_chars"] / 3


def test_choose_sum_mean_and_per_character_rules_can_disagree():
    # ending 0: 1 token, 10 chars, loss 3   -> sum 3 (lowest), mean 3,   per char 0.3
    # ending 1: 4 tokens, 40 chars, loss 4  -> sum 4,           mean 1 (lowest), per char 0.1
    # ending 2: 2 tokens, 60 chars, loss 5  -> sum 5,           mean 2.5, per char 0.083 (lowest)
    # ending 3: 3 tokens, 9 chars, loss 3   -> ties ending 0 on the sum: the first one wins
    assert hellaswag.choose([3.0, 4.0, 5.0, 3.0], [1, 4, 2, 3], [10, 40, 60, 9]) == (0, 1, 2)


def test_batched_scoring_equals_one_example_at_a_time(enc):
    """The batched scorer (examples sorted by length and padded, logits only where scored) gives
    the plain scorer's losses and picks, for a model whose outputs depend on the whole prefix."""
    model = TinyCausalLM().eval()
    examples = [{**e, "ind": i} for i, e in enumerate(EXAMPLES * 3)]
    plain = [bench.score_example(model, e, enc) for e in examples]
    batched = hellaswag.score_examples(model, examples, enc=enc, batch_size=4)
    for b, p in zip(batched, plain, strict=True):
        assert b["loss_sum"] == pytest.approx(p["loss_sum"], rel=1e-5)
        assert b["loss_mean"] == pytest.approx(p["loss_mean"], rel=1e-5)
        assert [b[k] for k in ("ind", "label", "pred", "pred_norm", "pred_norm_chars")] == \
            [p[k] for k in ("ind", "label", "pred", "pred_norm", "pred_norm_chars")]
    assert len({r["pred"] for r in plain}) > 1  # a model that does not always pick the same


def test_ranks_score_disjoint_shares_that_add_up(enc):
    model = TinyCausalLM().eval()
    examples = EXAMPLES * 3
    whole = hellaswag.evaluate(model, examples, enc=enc)
    parts = [hellaswag.evaluate(model, examples, enc=enc, rank=r, world_size=2) for r in range(2)]
    assert [p["n"] for p in parts] == [5, 4]
    for key in ["n", "correct", "correct_norm", "correct_norm_chars"]:
        assert parts[0][key] + parts[1][key] == whole[key]


def _gloo_worker(rank, world_size, port, examples, queue):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        model = TinyCausalLM().eval()
        queue.put((rank, hellaswag.evaluate(model, examples, rank=rank, world_size=world_size)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_counts_are_all_reduced_across_processes(enc):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    examples = EXAMPLES * 3
    context = mp.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_gloo_worker, args=(r, 2, port, examples, queue))
               for r in range(2)]
    for w in workers:
        w.start()
    results = dict(queue.get(timeout=120) for _ in workers)
    for w in workers:
        w.join(timeout=60)
    whole = hellaswag.evaluate(TinyCausalLM().eval(), examples, enc=enc)
    assert results[0] == results[1] == whole


BAD_LINES = [
    ('{"ctx": "a", "endings": ["1", "2", "3", "4"], "label": 0}\n{"ctx": "b", "endings": ',
     "bad.jsonl:2", "json"),
    ('{"ctx": "a", "endings": ["1", "2", "3"], "label": 0}\n', "bad.jsonl:1", "4 strings"),
    ('{"endings": ["1", "2", "3", "4"], "label": 0}\n', "bad.jsonl:1", "ctx"),
    ('\n{"ctx": "a", "endings": ["1", "2", "3", "4"], "label": 4}\n', "bad.jsonl:2", "label"),
    ('{"ctx": "a", "endings": ["1", "2", "3", "4"]}\n', "bad.jsonl:1", "label"),
    ('["ctx", "endings"]\n', "bad.jsonl:1", "json object"),
    ("\n\n", "bad.jsonl", "no examples"),
]


@pytest.mark.parametrize("content, where, word", BAD_LINES)
def test_a_bad_line_names_the_file_and_line(tmp_path, content, where, word):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(hellaswag.DataError) as error:
        hellaswag.load_examples(path=path)
    assert where in str(error.value) and word.lower() in str(error.value).lower()


def test_non_utf8_and_label_as_text(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"ctx": "a", "endings": ["1", "2", "3", "4"], "label": "2"}\n'
                     b'{"ctx": "caf\xe9"}\n')
    with pytest.raises(hellaswag.DataError, match="latin1.jsonl:2: not UTF-8"):
        hellaswag.load_examples(path=path)
    path.write_bytes(b'{"ctx": "a", "endings": ["1", "2", "3", "4"], "label": "2"}\n')
    assert hellaswag.load_examples(path=path)[0]["label"] == 2


def test_download_is_checked_atomic_and_cached(tmp_path, monkeypatch):
    official = write_examples(tmp_path / "official.jsonl")
    data = official.read_bytes()
    monkeypatch.setattr(hellaswag, "URL", official.as_uri().replace("official", "{split}"))
    (tmp_path / "val.jsonl").write_bytes(data)
    monkeypatch.setitem(hellaswag.CHECKSUMS, "val", (len(data), hashlib.sha256(data).hexdigest()))
    cache = tmp_path / "cache"
    assert hellaswag.load_examples("val", cache_dir=cache) == hellaswag.load_examples(path=official)
    assert (cache / "hellaswag_val.jsonl").read_bytes() == data
    (tmp_path / "val.jsonl").unlink()  # cached now: no second download needed
    assert len(hellaswag.load_examples("val", cache_dir=cache)) == 3

    (tmp_path / "train.jsonl").write_bytes(data + b"\n")  # not the published bytes
    monkeypatch.setitem(hellaswag.CHECKSUMS, "train",
                        (len(data), hashlib.sha256(data).hexdigest()))
    with pytest.raises(hellaswag.DataError, match="sha256"):
        hellaswag.load_examples("train", cache_dir=cache)
    with pytest.raises(hellaswag.DataError, match="cannot download"):
        hellaswag.load_examples("test", cache_dir=cache)  # no such "remote" file
    # nothing half-written
    assert sorted(p.name for p in cache.iterdir()) == ["hellaswag_val.jsonl"]
    # A cache that cannot be written: one line that names it, not a traceback.
    (tmp_path / "val.jsonl").write_bytes(data)
    with pytest.raises(hellaswag.DataError, match="cannot write .*hellaswag_val.jsonl"):
        hellaswag.load_examples("val", cache_dir=official / "cache")  # below a file


def test_a_failed_download_leaves_no_folder_and_names_hellaswag_pys_flag(tmp_path, monkeypatch,
                                                                          capsys):
    """Without network: one line that says how to score a local copy with hellaswag.py's own
    --data, and no empty data/hellaswag/ left behind."""
    monkeypatch.setattr(hellaswag, "URL", (tmp_path / "nowhere" / "{split}.jsonl").as_uri())
    cache = tmp_path / "data" / "hellaswag"
    with pytest.raises(hellaswag.DataError, match="cannot download") as error:
        hellaswag.load_examples("val", cache_dir=cache)
    assert "--" not in str(error.value)  # no flag: each command line adds its own fix
    assert not (tmp_path / "data").exists()
    with pytest.raises(SystemExit) as exit_info:
        hellaswag.main(hellaswag.parse_args(["--hf-model", "gpt2", "--cache-dir", str(cache),
                                             "--device", "cpu"]))
    captured = capsys.readouterr()
    assert_user_error(SimpleNamespace(returncode=exit_info.value.code, stdout=captured.out,
                                      stderr=captured.err),
                      "cannot download", "hellaswag_val.jsonl", "--data FILE")
    assert "--hellaswag-data" not in captured.err and "(" + "[Errno" not in captured.err
    assert not (tmp_path / "data").exists()


def test_help_shows_defaults_and_the_gpt2_py_command_for_a_checkpoint(capsys):
    """hellaswag.py imports no stage: its help names the gpt2.py command that scores a gpt2.py
    checkpoint, and it has no flag of its own for one."""
    with pytest.raises(SystemExit):
        hellaswag.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--checkpoint" not in text and "--hf-model" in text
    assert "python gpt2.py --eval-hellaswag --init-from CHECKPOINT" in text
    for default in ("(default: val)", "(default: data/hellaswag)", "(default: out/hellaswag)",
                    "(default: 32)", "(default: auto)", "(default: float32)"):
        assert default in text, default


def test_an_unreachable_hub_is_one_line(tmp_path):
    """--hf-model gpt2 without network and without a cached copy: one line at once that names
    the fix, instead of half a minute of retries."""
    data = write_examples(tmp_path / "mine.jsonl")
    env = offline_env(tmp_path)
    result = run_script("hellaswag.py", "--hf-model", "gpt2", "--data", data, "--device", "cpu",
                        "--out-dir", tmp_path / "out", env=env)
    assert_user_error(result, "--hf-model gpt2", "cannot reach the Hugging Face hub",
                      "local cache", "local folder")
    assert not (tmp_path / "out").exists()


def test_leaf_modules_import_no_stage():
    """No import circles: hellaswag.py, fineweb.py and common.py import no stage script,
    at the top or inside a function."""
    import ast
    stages = {"bigram", "mlp", "wavenet", "transformer", "gpt2"}
    for leaf in ("hellaswag.py", "fineweb.py", "common.py"):
        imported = set()
        for node in ast.walk(ast.parse((ROOT / leaf).read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        assert "torch" in imported or leaf == "fineweb.py"  # the walk does see imports
        assert not imported & stages, (leaf, imported & stages)


def test_cli_scores_a_local_hugging_face_gpt2_with_reference_numbers(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=128)
    torch.manual_seed(0)
    hf_dir = tmp_path / "gpt2"  # named like OpenAI's model, so the reference line is printed
    transformers.GPT2LMHeadModel(config).save_pretrained(hf_dir)
    data = write_examples(tmp_path / "mine.jsonl")
    metrics = hellaswag.main(hellaswag.parse_args([
        "--hf-model", str(hf_dir), "--data", str(data), "--device", "cpu",
        "--out-dir", str(tmp_path / "out"), "--predictions", str(tmp_path / "pred.jsonl"),
        "--batch-size", "2"]))
    out = capsys.readouterr().out
    assert "3 examples" in out and "acc_norm 0.2955" in out
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert {key: saved[key] for key in metrics} == metrics
    lines = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert [p["ind"] for p in lines] == [0, 1, 2]
    assert set(lines[0]) >= {"ind", "label", "pred", "pred_norm", "pred_norm_chars", "loss_sum",
                             "loss_mean"}
    assert metrics["n"] == 3 and metrics["correct"] == sum(p["pred"] == p["label"] for p in lines)
    # The adapter's hidden_states and lm_head give transformers' own logits.
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    model = hellaswag.HFGPT2(hf_model).eval()
    idx = torch.randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.allclose(model.lm_head(model.hidden_states(idx)), hf_model(idx).logits,
                              atol=1e-5)


def test_cli_user_errors(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ctx": "a", "endings": ["1", "2", "3", "4"], "label": 1}\n{oops}\n',
                   encoding="utf-8")
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"x")
    cases = [
        (["--data", str(bad), "--hf-model", "gpt2"], ["bad.jsonl:2"]),
        (["--data", str(tmp_path / "none.jsonl"), "--hf-model", "gpt2"],
         ["--data", "no such file"]),
        (["--hf-model", str(tmp_path / "none")], ["--hf-model", "does not exist"]),
        (["--data", str(bad)], ["--hf-model", "required"]),
        (["--checkpoint", str(ckpt), "--hf-model", "gpt2"],
         ["unrecognized arguments: --checkpoint"]),
        (["--hf-model", "gpt2", "--limit", "-1"], ["--limit"]),
        (["--hf-model", "gpt2", "--batch-size", "0"], ["--batch-size"]),
        (["--hf-model", "gpt2", "--split", "test"], ["--split"]),
    ]
    for argv, words in cases:
        with pytest.raises(SystemExit) as exit_info:
            hellaswag.main(hellaswag.parse_args(argv))
        captured = capsys.readouterr()
        assert_user_error(SimpleNamespace(returncode=exit_info.value.code, stdout=captured.out,
                                          stderr=captured.err), *words)


def main_user_error(capsys, *argv):
    """hellaswag.main in this process; its one-line error, like run_script's result."""
    with pytest.raises(SystemExit) as exit_info:
        hellaswag.main(hellaswag.parse_args([str(a) for a in argv]))
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=exit_info.value.code, stdout=captured.out,
                           stderr=captured.err)


@pytest.fixture
def tiny_model(monkeypatch):
    """--hf-model gpt2 loads a tiny local model instead (no transformers, no network)."""
    monkeypatch.setattr(hellaswag, "load_model", lambda name, device: TinyCausalLM().eval())


def no_scoring(monkeypatch):
    monkeypatch.setattr(hellaswag, "score_examples",
                        lambda *a, **k: pytest.fail("scored before the outputs were checked"))


def test_an_out_dir_that_is_a_file_is_one_line_before_scoring(tmp_path, tiny_model, monkeypatch,
                                                              capsys):
    mine = tmp_path / "mine"
    mine.write_text("not a folder", encoding="utf-8")
    no_scoring(monkeypatch)
    result = main_user_error(capsys, "--hf-model", "gpt2", "--data", write_examples(
        tmp_path / "d.jsonl"), "--device", "cpu", "--out-dir", mine)
    assert_user_error(result, f"--out-dir {mine}", "not a directory")
    assert mine.read_text(encoding="utf-8") == "not a folder"


def test_predictions_get_their_folder_and_a_bad_path_is_refused_before_scoring(tmp_path,
                                                                               tiny_model,
                                                                               monkeypatch,
                                                                               capsys):
    """--predictions in a folder not made yet is written there, as --out-dir is; a path that
    cannot be written ends the run in one line before any scoring."""
    args = ["--hf-model", "gpt2", "--data", write_examples(tmp_path / "d.jsonl"),
            "--device", "cpu", "--out-dir", tmp_path / "out"]
    new = tmp_path / "new" / "sub" / "p.jsonl"
    hellaswag.main(hellaswag.parse_args([str(a) for a in args + ["--predictions", new]]))
    assert [json.loads(line)["ind"] for line in new.read_text().splitlines()] == [0, 1, 2]
    capsys.readouterr()
    no_scoring(monkeypatch)
    (tmp_path / "file").write_text("mine", encoding="utf-8")
    for path, words in [(tmp_path / "file" / "p.jsonl", ["cannot create", "--predictions"]),
                        (tmp_path / "new", ["--predictions", "is a folder"]),
                        # one file for both would lose the metrics (it does not exist yet)
                        (tmp_path / "out" / "metrics.json",
                         ["--predictions", "metrics.json goes"])]:
        assert_user_error(main_user_error(capsys, *args, "--predictions", path), *words)
    assert (tmp_path / "file").read_text(encoding="utf-8") == "mine"


def test_an_existing_predictions_file_is_replaced_only_with_overwrite(tmp_path, tiny_model,
                                                                      monkeypatch, capsys):
    """--predictions onto a file the user made (say a model's config.json) stops before scoring
    and names --overwrite; with --overwrite the file is replaced."""
    config = tmp_path / "config.json"
    config.write_text('{"n_layer": 12}\n', encoding="utf-8")
    args = ["--hf-model", "gpt2", "--data", write_examples(tmp_path / "d.jsonl"),
            "--device", "cpu", "--out-dir", tmp_path / "out", "--predictions", config]
    with monkeypatch.context() as patch:
        no_scoring(patch)
        assert_user_error(main_user_error(capsys, *args), str(config), "already exists",
                          "--overwrite")
    assert config.read_text(encoding="utf-8") == '{"n_layer": 12}\n'
    assert not (tmp_path / "out").exists()
    hellaswag.main(hellaswag.parse_args([str(a) for a in args] + ["--overwrite"]))
    assert len(config.read_text(encoding="utf-8").splitlines()) == len(EXAMPLES)


def test_a_checkpoint_file_or_a_missing_path_is_not_sent_to_the_hub(tmp_path, monkeypatch,
                                                                    capsys):
    """--hf-model with a local file (a gpt2.py checkpoint) names gpt2.py's command for it, and
    a path that does not exist says so; neither asks the hub. owner/name stays a hub id."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(hellaswag, "load_model",
                        lambda name, device: pytest.fail("asked the hub"))
    (tmp_path / "out" / "gpt2").mkdir(parents=True)
    (tmp_path / "out" / "gpt2" / "checkpoint.pt").write_bytes(b"a gpt2.py checkpoint")
    data = write_examples(tmp_path / "d.jsonl")
    for model in ("out/gpt2/checkpoint.pt", str(tmp_path / "out" / "gpt2" / "checkpoint.pt")):
        result = main_user_error(capsys, "--hf-model", model, "--data", data)
        assert_user_error(result, "not a Hugging Face model folder",
                          f"python gpt2.py --eval-hellaswag --init-from {model}")
    for model in ("out/gpt2/lost.pt", "./lost", "../lost/model", "~/lost"):
        result = main_user_error(capsys, "--hf-model", model, "--data", data)
        assert_user_error(result, model.removeprefix("~"), "does not exist")
        assert "cannot reach" not in result.stderr
    for name in ("gpt2", "openai-community/gpt2"):
        assert hellaswag.parse_args(["--hf-model", name]).hf_model == name


def test_cli_bad_line_in_a_real_process(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ctx": "a", "endings": ["1", "2", "3", "4"], "label": 1}\n{oops}\n',
                   encoding="utf-8")
    result = run_script("hellaswag.py", "--data", bad, "--hf-model", "gpt2",
                        "--out-dir", tmp_path / "out")
    assert_user_error(result, "bad.jsonl:2")
    assert not (tmp_path / "out").exists()


def test_evaluate_scores_in_eval_mode_and_restores_the_mode(enc):
    """Dropout off while scoring, whatever mode the caller's model is in; training goes on
    in the mode it was in."""
    seen = []

    class Spy(TinyCausalLM):
        def hidden_states(self, idx):
            seen.append(self.training)
            return super().hidden_states(idx)

    model = Spy().train()
    hellaswag.evaluate(model, EXAMPLES, enc=enc)
    assert seen and not any(seen) and model.training
    hellaswag.evaluate(model.eval(), EXAMPLES, enc=enc)
    assert not model.training
