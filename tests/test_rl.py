"""rl.py: the advantage arithmetic, the policy loss (only reply tokens, nothing from a group that
scored alike), rollouts through serve.py's engine against GPT.generate, the verifier, resume and
the one-line errors. Tiny random chat models written to tmp_path."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import chat
import gpt2
import rl
import serve
from conftest import ROOT, assert_user_error, offline_env, run_script, signal_after


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return gpt2.GPT(gpt2.GPTConfig(block_size=64, vocab_size=chat.VOCAB_SIZE, n_layer=2,
                                   n_head=2, n_embd=32))


@pytest.fixture
def chat_checkpoint(tmp_path):
    """A checkpoint as chat.py writes it (stage chat, the chat format) of a tiny random GPT."""
    model = tiny_gpt()
    path = tmp_path / "chat.pt"
    torch.save({"stage": chat.STAGE, "chat_format": chat.FORMAT, "model": model.state_dict(),
                "config": vars(model.config)}, path)
    return path


def tiny_args(init_from, out_dir, *extra):
    return rl.parse_args([str(a) for a in (
        "--init-from", init_from, "--out-dir", out_dir, "--task-n", 4, "--sft-examples", 8,
        "--sft-steps", 2, "--train-questions", 40, "--questions-per-step", 2, "--group", 3,
        "--batch-size", 4, "--max-steps", 4, "--warmup-steps", 1, "--lr", 1e-2, "--k", 2,
        "--max-new-tokens", 4, "--rollout-batch", 8, "--eval-every", 2, "--threads", 1,
        *extra)])


# --- the arithmetic

def test_advantages_are_reward_minus_the_group_mean_and_optionally_over_its_std():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.equal(rl.group_advantages(rewards), torch.tensor(
        [[0.5, -0.5, -0.5, 0.5], [0.25, 0.25, 0.25, -0.75], [0.0, 0.0, 0.0, 0.0]]))
    scaled = rl.group_advantages(rewards, divide_std=True)
    std = torch.tensor([1 / 3, 0.25]).sqrt()  # the unbiased std of each group's rewards
    assert torch.allclose(scaled[:2], rl.group_advantages(rewards)[:2] / std[:, None], atol=1e-5)
    assert torch.equal(scaled[2], torch.zeros(4))  # no 0/0 for a group that scored alike


def policy_inputs():
    prompts = [[chat.BOS, chat.USER_START, 40, 41, chat.USER_END, chat.ASSISTANT_START]] * 3
    replies = [[300, 301, chat.ASSISTANT_END], [302, chat.ASSISTANT_END], [303, 304, 305]]
    return prompts, replies


def test_a_group_that_scored_alike_sends_no_gradient():
    model = tiny_gpt()
    prompts, replies = policy_inputs()
    advantages = rl.group_advantages(torch.tensor([[1.0, 1.0, 1.0]]))[0]  # (3,) zeros
    rl.PolicyLoss(model)(*rl.policy_batch(prompts, replies, advantages)).backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    # ...and a group that did not score alike does send one.
    rl.PolicyLoss(model)(*rl.policy_batch(prompts, replies, torch.tensor([1.0, -1, 0]))).backward()
    assert any(p.grad is not None and p.grad.any() for p in model.parameters())


def test_the_loss_is_minus_advantage_times_log_prob_over_the_reply_tokens_only():
    model = tiny_gpt()
    prompts, replies = policy_inputs()
    advantages = torch.tensor([0.5, -1.0, 2.0])
    x, y, weight = rl.policy_batch(prompts, replies, advantages)
    expected = 0.0
    for prompt, reply, advantage in zip(prompts, replies, advantages):
        tokens = torch.tensor([prompt + reply])  # (1, T)
        log_probs = torch.log_softmax(model(tokens)[0][0, :-1].float(), -1)  # (T-1, V)
        for i, token in enumerate(reply):  # reply token i is predicted at len(prompt) + i - 1
            expected -= advantage * log_probs[len(prompt) + i - 1, token]
    loss = rl.PolicyLoss(model)(x, y, weight)
    assert torch.allclose(loss, expected, rtol=1e-4)
    # Prompt targets never count: changing them (and the padding's) leaves the loss as it was.
    y_changed = torch.where(weight == 0, (y + 7) % 50000, y)
    assert torch.equal(rl.PolicyLoss(model)(x, y_changed, weight), loss)


# --- rollouts through the engine, the verifier

def test_engine_rollouts_equal_gpt_generate_at_temperature_0():
    model = tiny_gpt().eval()
    prompts = [chat.render_prompt([{"role": "user", "content": text}])
               for text in ("How many words: king love night", "Hello", "a b c d e f g")]
    engine = serve.Engine(model, max_batch=4, max_queue=0, log=lambda *a, **k: None)
    replies = rl.rollouts(engine, prompts, 2, 6, 0.0, 0, rl.rollout_seeds(0, 0, 3, 2))
    for prompt, group in zip(prompts, replies):
        expected = model.generate(torch.tensor([prompt]), 6, temperature=0)[0, len(prompt):]
        expected = expected.tolist()
        if chat.ASSISTANT_END in expected or chat.BOS in expected:  # the engine stops there
            expected = expected[:min(expected.index(t) for t in rl.STOPS if t in expected) + 1]
        assert group == [expected, expected]


def test_sampled_rollouts_follow_their_seeds_alone():
    model = tiny_gpt().eval()
    prompt = chat.render_prompt([{"role": "user", "content": "Hello"}])
    engine = serve.Engine(model, max_batch=4, max_queue=0, log=lambda *a, **k: None)
    group = rl.rollouts(engine, [prompt, prompt], 3, 5, 1.0, 0, [[1, 2, 3], [4, 1, 5]])
    assert group[0][0] == group[1][1]  # seed 1, in company of other replies or not
    assert len({tuple(r) for r in group[0]}) > 1


@pytest.mark.parametrize("reply, answer, reward", [
    (" love", "love", 1.0), ("love", "love", 1.0), (" king", "love", 0.0),
    (" love love", "love", 0.0), ("", "love", 0.0),
    ("3 + 4 = 7, so 7 * 2 = 14. The answer is 14.", "14", 1.0),
    ("The total is 1,250 dollars", "1250", 1.0), ("14 or 15", "14", 0.0),
    ("no number here", "14", 0.0), ("-3.5", "-3.5", 1.0),
    ("There are 7.", "There are 7.", 1.0), (" There are 7 words", "There are 7.", 1.0),
    ("There are 6.", "There are 7.", 0.0), ("There are", "There are 7.", 0.0)])
def test_verifier(reply, answer, reward):
    assert rl.verify(reply, answer) == reward


def test_the_bundled_task_is_seeded_distinct_and_held_out_questions_stay_out():
    rows = rl.task_rows(5, 300)
    assert rows == rl.task_rows(5, 300) and len(set(rows)) == 300
    for question, answer in rows:
        words = question.split(": ")[1].split()
        assert 6 <= len(words) <= 10 and set(words) <= set(chat.WORDS)
        assert answer == f"There are {len(words)}."
    args = rl.parse_args(["--task-n", "50", "--sft-examples", "30", "--train-questions", "200"])
    labelled, questions, heldout = rl.open_data(args, rl.read_rows(args), 64)
    asked = {q for q, _ in heldout}
    assert len(heldout) == 50 and len(labelled) == 30 and len(questions) == 200
    assert not asked & {q for q, _ in questions}
    assert not asked & {chat.parse_conversation(t)[0]["content"] for t, _ in labelled}


# --- runs: outputs, resume, errors

def test_a_run_writes_metrics_and_resumes_exactly(tmp_path, chat_checkpoint, monkeypatch):
    # A random tiny model never answers right: a reward of its own (odd first token) gives the
    # groups advantages, so that the RL steps do change the weights that resume must reproduce.
    monkeypatch.setattr(rl, "score", lambda replies, answers: torch.tensor(
        [[float(reply[0] % 2) for reply in row] for row in replies]))
    whole = rl.main(tiny_args(chat_checkpoint, tmp_path / "whole"))
    for key in ("heldout_pass1", "heldout_pass1_before", "heldout_passk",
                "heldout_passk_before", "k"):
        assert whole[key] is not None, key
    assert json.loads((tmp_path / "whole" / "metrics.json").read_text())["k"] == 2
    records = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").open()]
    assert {"reward", "reply_tokens", "pass1"} <= set(records[0])
    assert all(r["grad_norm"] > 0 for r in records if "grad_norm" in r)
    assert rl.main(tiny_args(chat_checkpoint, tmp_path / "parts", "--stop-step", 2))[
        "stopped"] == "--stop-step"
    rl.main(tiny_args(chat_checkpoint, tmp_path / "parts", "--resume"))
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert ((tmp_path / "whole" / "log.jsonl").read_text()
            .count('"reward"') == (tmp_path / "parts" / "log.jsonl").read_text().count('"reward"'))
    # A finished run resumed changes nothing.
    before = (tmp_path / "whole" / "checkpoint.pt").read_bytes()
    result = rl.main(tiny_args(chat_checkpoint, tmp_path / "whole", "--resume"))
    assert result["complete"] and (tmp_path / "whole" / "checkpoint.pt").read_bytes() == before



def test_an_rl_checkpoint_is_a_chat_model_for_chat_and_serve(tmp_path, chat_checkpoint):
    """rl.py's checkpoint loads where a chat.py one does: chat.load_chat_model (serve.py's and
    chat.py's loader) gives its weights and the chat format, and chat.py --prompt answers."""
    rl.main(tiny_args(chat_checkpoint, tmp_path / "rl", "--max-steps", 1, "--eval-every", 0))
    path = tmp_path / "rl" / "checkpoint.pt"
    model, chat_format = chat.load_chat_model(path)
    saved = torch.load(path, weights_only=True)["model"]
    assert chat_format == chat.FORMAT
    assert all(torch.equal(value, saved[key]) for key, value in model.state_dict().items())
    result = run_script("chat.py", "--prompt", "How many words: king love", "--init-from", path,
                        "--max-new-tokens", 3, "--threads", 1)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("assistant: ") == 1

def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path, chat_checkpoint):
    out = tmp_path / "o"
    args = ["--init-from", chat_checkpoint, "--out-dir", out, "--task-n", 4, "--sft-examples", 8,
            "--sft-steps", 1, "--questions-per-step", 2, "--group", 2, "--k", 2,
            "--max-new-tokens", 3, "--eval-every", 0, "--threads", 1]
    returncode, rest, err = signal_after("rl.py", args + ["--max-steps", 100000], "step     2 |",
                                         signal.SIGTERM)
    assert returncode == 0, err
    assert "received SIGTERM" in rest
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert step >= 3
    result = run_script("rl.py", *args, "--max-steps", step + 1, "--resume")
    assert result.returncode == 0, result.stderr
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == step + 1


@pytest.mark.parametrize("extra, words", [
    (("--group", "1"), ["--group", "at least 2"]),
    (("--temperature", "-1"), ["--temperature"]),
    (("--questions-per-step", "0"), ["--questions-per-step", "positive"]),
    (("--lr", "nan"), ["--lr"]),
    # Greedy replies are all alike: every advantage 0, a run that learns nothing.
    (("--temperature", "0"), ["--temperature 0", "every advantage is 0"]),
    (("--top-k", "1"), ["--top-k 1", "every advantage is 0"]),
    # sft without examples had nothing to draw a batch from (it hung).
    (("--method", "sft", "--sft-examples", "0", "--sft-steps", "0"),
     ["--method sft", "--sft-examples"]),
    (("--max-new-tokens", "64"), ["--max-new-tokens 64", "context of 64"]),
    (("--rollout-batch", "10000000000"), ["--rollout-batch 10000000000", "GiB", "lower"])])
def test_nonsense_flags_are_one_line(tmp_path, chat_checkpoint, extra, words):
    result = run_script("rl.py", "--init-from", chat_checkpoint, "--out-dir", tmp_path / "o",
                        *extra)
    assert_user_error(result, *words)



def test_a_hub_dataset_without_network_is_one_line_at_once(tmp_path, chat_checkpoint):
    """--data owner/name with the hub unreachable and nothing cached: one line saying so, at
    once (datasets is switched to its cache, not left to retry for half a minute)."""
    result = run_script("rl.py", "--init-from", chat_checkpoint, "--out-dir", tmp_path / "o",
                        "--data", "nobody/no-such-set", env=offline_env(tmp_path), timeout=20)
    assert_user_error(result, "--data nobody/no-such-set", "hub cannot be reached", ".jsonl")

def test_a_base_model_and_a_bad_task_file_are_one_line(tmp_path, chat_checkpoint):
    base = tmp_path / "base.pt"
    model = tiny_gpt()
    torch.save({"stage": gpt2.STAGE, "model": model.state_dict(), "config": vars(model.config)},
               base)
    assert_user_error(run_script("rl.py", "--init-from", base, "--out-dir", tmp_path / "o"),
                      "not a chat model")
    other = tmp_path / "other.pt"  # a chat model, in a chat format this chat.py does not speak
    torch.save({**torch.load(chat_checkpoint, weights_only=True),
                "chat_format": {"name": "elsewhere", "version": 9}}, other)
    assert_user_error(run_script("rl.py", "--init-from", other, "--out-dir", tmp_path / "o"),
                      "another chat format", "elsewhere")
    # No checkpoint at all: the fix names chat.py, not the base models that rl.py refuses.
    assert_user_error(run_script("rl.py", "--init-from", tmp_path / "none.pt", "--out-dir",
                                 tmp_path / "o"), "none.pt does not exist",
                      "fine-tune one with `python chat.py`")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "2+2?", "answer": "#### 4"}\n{"question": "x"}\n')
    assert_user_error(run_script("rl.py", "--init-from", chat_checkpoint, "--data", bad,
                                 "--out-dir", tmp_path / "o"), "row 2", "question and an answer")
    bad.write_text('{"question": "2+2?", "answer": "#### 4"}\nnot json\n')
    assert_user_error(run_script("rl.py", "--init-from", chat_checkpoint, "--data", bad,
                                 "--out-dir", tmp_path / "o"), "row 2", "not valid JSON")
    assert_user_error(run_script("rl.py", "--init-from", chat_checkpoint, "--data",
                                 tmp_path / "missing.jsonl", "--out-dir", tmp_path / "o"),
                      "does not exist")
    # --data is read before any model loads: a typo costs no download of weights.
    assert_user_error(run_script("rl.py", "--init-from", "gpt2-xl", "--data",
                                 tmp_path / "missing.jsonl", "--out-dir", tmp_path / "o"),
                      "--data", "missing.jsonl does not exist")


def test_a_gsm8k_file_trains_offline(tmp_path, chat_checkpoint):
    """The gpt2 preset's data path on a small local GSM8K-style file: the cold start on worked
    solutions, rewards on the final number."""
    rows = [{"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = <<{a}+{b}={a + b}>>"
             f"{a + b}\n#### {a + b}"} for a in range(6) for b in range(4)]
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = rl.main(tiny_args(chat_checkpoint, tmp_path / "g", "--data", data, "--max-steps", 2))
    assert result["steps_done"] == 2 and result["heldout_pass1"] is not None


def answering_checkpoint(path):
    """A tiny chat model that, whatever it is asked, says " love" or ends its reply, each about
    as likely as all other tokens together: ln_f's output is the constant bias b, and the rows
    of those two tokens are along b. Groups then mix right and wrong replies."""
    model = tiny_gpt()
    b = torch.ones(model.config.n_embd)  # (C,)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(b)
        for token in (*chat.encode_text(" love"), chat.ASSISTANT_END):
            model.transformer.wte.weight[token] = b * 11 / b.dot(b)  # logit 11
    torch.save({"stage": chat.STAGE, "chat_format": chat.FORMAT, "model": model.state_dict(),
                "config": vars(model.config)}, path)
    return path


@pytest.mark.slow
def test_two_ranks_under_torchrun_equal_one_process(tmp_path):
    """DDP over 2 gloo ranks, each rolling out half of the step's questions, logs the rewards and
    losses of one process and ends with its weights."""
    data = tmp_path / "love.jsonl"
    data.write_text("".join(json.dumps({"question": f"Say love {i}", "answer": "#### love"})
                            + "\n" for i in range(30)))
    init = answering_checkpoint(tmp_path / "love.pt")
    argv = [str(a) for a in ("--init-from", init, "--data", data, "--task-n", 4,
                             "--sft-examples", 0, "--sft-steps", 0, "--questions-per-step", 4,
                             "--group", 4, "--batch-size", 4, "--max-steps", 3, "--lr", 1e-2,
                             "--k", 2, "--max-new-tokens", 3, "--eval-every", 0)]
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "rl.py"), *argv, "--out-dir", tmp_path / "ddp"], cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    rl.main(rl.parse_args(argv + ["--out-dir", str(tmp_path / "one"), "--threads", "1"]))
    logs = [[json.loads(line) for line in (tmp_path / name / "log.jsonl").open()]
            for name in ("ddp", "one")]
    rewards = [[r["reward"] for r in log if "reward" in r] for log in logs]
    assert rewards[0] == rewards[1] and 0 < sum(rewards[0]) < len(rewards[0])
    for a, b in zip(*logs):
        assert a.get("loss") == pytest.approx(b.get("loss"), abs=1e-6)
    weights = [torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["model"]
               for name in ("ddp", "one")]
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-6) for k in weights[0])


def test_bench_rl_compares_engine_and_generate_on_the_same_greedy_tokens(capsys):
    import bench
    result = bench.main(bench.parse_args([
        "rl", "--preset", "cpu-tiny", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
        "--device", "cpu", "--questions", "2", "--group", "3", "--new-tokens", "4",
        "--rounds", "1"]))
    assert result["same_tokens_greedy"] is True
    assert result["engine_tokens_per_s"] > 0 and result["generate_tokens_per_s"] > 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["bench"] == "rl"


@pytest.mark.gpu
def test_on_a_gpu_the_cold_start_and_rl_steps_run_in_bf16(tmp_path):
    """On CUDA: the cold start and the policy steps under bf16 autocast, rollouts through the
    engine on the GPU (its slots' cache there too), rewards that mix right and wrong, and a
    checkpoint that chat.py answers from on the GPU."""
    data = tmp_path / "love.jsonl"
    data.write_text("".join(json.dumps({"question": f"Say love {i}", "answer": "#### love"})
                            + "\n" for i in range(30)))
    out = tmp_path / "out"
    metrics = rl.main(rl.parse_args([str(a) for a in (
        "--init-from", answering_checkpoint(tmp_path / "love.pt"), "--data", data,
        "--out-dir", out, "--task-n", 4, "--sft-examples", 8, "--sft-steps", 2,
        "--questions-per-step", 4, "--group", 4, "--batch-size", 4, "--max-steps", 4,
        "--lr", 1e-3, "--k", 2, "--max-new-tokens", 3, "--eval-every", 2, "--device", "cuda")]))
    assert metrics["device"] == "cuda:0" and metrics["steps_done"] == 4
    ampere = torch.cuda.get_device_capability()[0] >= 8  # not is_bf16_supported(): emulated
    assert metrics["dtype"] == ("bfloat16" if ampere else "float16")
    records = [json.loads(line) for line in (out / "log.jsonl").open()]
    rewards = [r["reward"] for r in records if "reward" in r]
    assert len(rewards) == 4 and 0 < sum(rewards) < 4
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)
    result = run_script("chat.py", "--prompt", "Say love 1", "--init-from", out / "checkpoint.pt",
                        "--device", "cuda", "--max-new-tokens", 3)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "device cuda" in result.stdout and "assistant: " in result.stdout
