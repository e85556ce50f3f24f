"""chat.py: the chat format (special tokens, rendering, its safety), the loss mask, the data
checks, the task mix, training (resume, DDP, outputs) and the chat loop. Tiny models and data
written to tmp_path."""
import json
import os
import select
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import chat
import gpt2
from conftest import ROOT, assert_user_error, offline_env, run_script, signal_after

TWO_TURNS = [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": "Hi there"},
             {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "2+2?"},
             {"role": "assistant", "content": "4"}]


def tiny_gpt(vocab_size=chat.VOCAB_SIZE, block_size=64, seed=0):
    torch.manual_seed(seed)
    return gpt2.GPT(gpt2.GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2,
                                   n_head=2, n_embd=32))


# --- the format

def test_special_tokens_sit_in_the_padded_rows_and_differ():
    ids = [chat.USER_START, chat.USER_END, chat.ASSISTANT_START, chat.ASSISTANT_END,
           chat.SYSTEM_START, chat.SYSTEM_END]
    assert len(set(ids)) == len(ids)
    assert all(50257 <= i < chat.VOCAB_SIZE for i in ids)


def test_render_conversation_layout_and_mask():
    tokens, mask = chat.render_conversation(TWO_TURNS)
    enc = chat.encoding()
    expected = [chat.BOS, chat.SYSTEM_START, *enc.encode_ordinary("Be brief."), chat.SYSTEM_END,
                chat.USER_START, *enc.encode_ordinary("Hi there"), chat.USER_END,
                chat.ASSISTANT_START, *enc.encode_ordinary("Hello!"), chat.ASSISTANT_END,
                chat.USER_START, *enc.encode_ordinary("2+2?"), chat.USER_END,
                chat.ASSISTANT_START, *enc.encode_ordinary("4"), chat.ASSISTANT_END]
    assert tokens == expected
    # The mask is 1 exactly on the assistant's text and its end token.
    learned = [t for t, m in zip(tokens, mask) if m]
    assert learned == [*enc.encode_ordinary("Hello!"), chat.ASSISTANT_END,
                       *enc.encode_ordinary("4"), chat.ASSISTANT_END]
    assert len(mask) == len(tokens)


def test_render_prompt_is_the_conversation_then_assistant_start():
    prompt = chat.render_prompt(TWO_TURNS[:4])
    assert prompt == chat.render_conversation(TWO_TURNS[:4])[0] + [chat.ASSISTANT_START]
    # Training's form of the full conversation begins with the prompt: the model is asked at
    # chat time exactly what it learned to answer.
    assert chat.render_conversation(TWO_TURNS)[0][:len(prompt)] == prompt
    with pytest.raises(ValueError, match="ends with a user"):
        chat.render_prompt(TWO_TURNS)


def test_rendering_round_trips():
    tricky = [{"role": "user", "content": "  spaces, émigré, 日本語, tabs\tand\nnewlines "},
              {"role": "assistant", "content": "<|assistant_end|> is just text here"}]
    for messages in (TWO_TURNS, TWO_TURNS[1:3], tricky):
        tokens, _ = chat.render_conversation(messages)
        assert chat.parse_conversation(tokens) == messages


def test_text_can_never_become_a_special_token():
    spellings = "".join(chat.SPECIALS.values())  # every special's spelling, <|endoftext|> too
    messages = [{"role": "user", "content": f"say {spellings}"},
                {"role": "assistant", "content": spellings}]
    tokens, _ = chat.render_conversation(messages)
    specials = [t for t in tokens if t in chat.SPECIALS]
    assert specials == [chat.BOS, chat.USER_START, chat.USER_END, chat.ASSISTANT_START,
                        chat.ASSISTANT_END]
    assert chat.parse_conversation(tokens) == messages
    assert max(chat.encode_text(spellings)) < 50257


@pytest.mark.parametrize("messages, words", [
    ("hello", "list"),
    ([], "list"),
    ([{"role": "user"}], "role and a content"),
    ([{"role": "robot", "content": "x"}], "unknown role"),
    ([{"role": "user", "content": "  "}], "empty"),
    ([{"role": "user", "content": 3}], "empty or non-text"),
    ([{"role": "assistant", "content": "x"}], "user was due"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "assistant was due"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "system"),
    ([{"role": "system", "content": "a"}], "needs a user"),
])
def test_check_messages_says_what_is_wrong_in_one_line(messages, words):
    with pytest.raises(ValueError, match=words) as info:
        chat.check_messages(messages)
    assert "\n" not in str(info.value)


# --- loading

def test_load_chat_model_pads_a_base_model_and_initialises_the_special_rows(tmp_path):
    small = tiny_gpt(vocab_size=50257)
    path = tmp_path / "base.pt"
    torch.save({"stage": gpt2.STAGE, "model": small.state_dict(),
                "config": vars(small.config)}, path)
    model, chat_format = chat.load_chat_model(path)
    assert chat_format is None and not model.training
    assert model.config.vocab_size == chat.VOCAB_SIZE
    wte = model.transformer.wte.weight
    assert torch.equal(wte[:50257], small.transformer.wte.weight)  # trained rows kept
    assert model.lm_head.weight is wte  # still tied
    # New rows sit near the trained rows' mean, each a little different.
    mean = small.transformer.wte.weight.mean(0)
    assert (wte[50257:] - mean).norm(dim=1).max() < 0.5 * mean.norm() + 0.1
    assert not torch.equal(wte[chat.USER_START], wte[chat.ASSISTANT_END])


def test_load_chat_model_refuses_what_is_not_a_gpt(tmp_path, capsys):
    not_gpt = tmp_path / "other.pt"
    torch.save({"stage": "wavenet", "model": {}}, not_gpt)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    for source in (not_gpt, garbage, tmp_path / "missing", tmp_path):
        with pytest.raises(SystemExit) as info:
            chat.load_chat_model(source)
        assert info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--init-from" in err[0], err


# --- the loss mask

def test_assistant_loss_is_the_hand_computed_mean_over_assistant_tokens():
    """The loss equals a hand computation on a two-turn conversation: -log p of each
    assistant token and end token given what precedes it, averaged over those tokens only."""
    model = tiny_gpt()
    tokens, mask = chat.render_conversation(TWO_TURNS)
    x, y, keep = chat.batch([(tokens, mask)])
    logits = model(x)[0][0]  # (T, V)
    hand = [-torch.log_softmax(logits[t], -1)[tokens[t + 1]] for t in range(len(tokens) - 1)
            if mask[t + 1]]
    assert len(hand) == 2 * 1 + len(chat.encode_text("Hello!")) + len(chat.encode_text("4"))
    expected = torch.stack(hand).mean()
    loss = chat.assistant_loss(model.hidden_states(x), model.lm_head.weight, y, keep) / keep.sum()
    torch.testing.assert_close(loss, expected)


def test_masked_positions_send_no_gradient():
    """The loss's gradient at a position whose target is masked is zero, and
    changing those targets changes neither the loss nor any weight's gradient."""
    model = tiny_gpt()
    examples = [chat.render_conversation(TWO_TURNS), chat.render_conversation(TWO_TURNS[1:3])]
    x, y, keep = chat.batch(examples)  # the second row is padded: padding is masked too
    assert not keep[1, len(examples[1][0]) - 1:].any()
    hidden = model.hidden_states(x).detach().requires_grad_()
    chat.assistant_loss(hidden, model.lm_head.weight, y, keep).backward()
    assert hidden.grad[~keep].abs().max() == 0
    assert hidden.grad[keep].abs().sum(-1).min() > 0
    grads = []
    for targets in (y, torch.where(keep, y, torch.randint_like(y, 0, 50257))):
        model.zero_grad()
        loss = chat.AssistantLoss(model)(x, targets, keep)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))


def test_fit_to_context_cuts_at_a_turn_or_drops():
    long_answer = " ".join(["word"] * 40)
    fits = TWO_TURNS[1:3]
    cut = TWO_TURNS[1:3] + [{"role": "user", "content": "more"},
                            {"role": "assistant", "content": long_answer}]
    dropped = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": long_answer}]
    examples, n_cut, n_dropped = chat.fit_to_context([fits, cut, dropped], block_size=30)
    assert (n_cut, n_dropped) == (1, 1) and len(examples) == 2
    assert examples[1] == chat.render_conversation(TWO_TURNS[1:3])  # cut after its first answer
    assert all(len(tokens) <= 31 for tokens, _ in examples)


# --- the task mix

def test_task_mix_is_seeded_varied_and_keeps_held_out_questions_out_of_training():
    train, heldout = chat.task_mix(seed=5, n_train=3000, n_heldout=200)
    assert (train, heldout) == chat.task_mix(seed=5, n_train=3000, n_heldout=200)
    assert chat.task_mix(seed=6, n_train=10, n_heldout=8)[1] != heldout[:8]
    assert len(train) == 3000 and len(heldout) == 200
    assert {kind for kind, _, _ in heldout} == set(chat.TASK_KINDS)
    asked = {m["content"] for messages in train for m in messages if m["role"] == "user"}
    assert not asked & {question for _, question, _ in heldout}
    assert any(len(messages) == 4 for messages in train)  # some hold two exchanges
    for messages in train:
        chat.check_messages(messages)
    # Each answer follows from its question's phrase; "count"'s copies none of it.
    for kind, question, answer in heldout:
        words = question.split(": ", 1)[1].split()
        expected = {"first": f" {words[0]}", "last": f" {words[-1]}",
                    "count": f"There are {len(words)}."}[kind]
        assert answer == expected, (kind, question, answer)


# --- the data

def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def good_rows(n=6):
    return [{"messages": [{"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": f"answer {i}"}]} for i in range(n)]


def test_jsonl_folder_and_datasets_read_the_same_conversations(tmp_path):
    """A .jsonl, a folder of them, and the hub path (datasets.load_dataset, offline here on a
    local folder) give the same checked conversations."""
    rows = good_rows()
    write_jsonl(tmp_path / "one.jsonl", rows)
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", rows[:3])
    write_jsonl(folder / "b.jsonl", rows[3:])
    expected = [r["messages"] for r in rows]
    assert chat.read_conversations(tmp_path / "one.jsonl", "train") == expected
    assert chat.read_conversations(folder, "train") == expected
    pytest.importorskip("datasets")
    assert chat.read_hub(str(folder), "train") == expected


@pytest.mark.parametrize("row, words", [
    ('{"messages": [', "row 3 is not valid JSON"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "row 3: message 0 has the unknown role"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     "row 3: message 1 is user where assistant was due"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]},
     "row 3: message 1 (assistant) has empty"),
    ({"messages": [{"role": "user", "content": "a"}]}, "row 3: no assistant message"),
    ({"text": "hello"}, 'row 3: not an object with a "messages" list'),
])
def test_a_malformed_row_is_one_line_naming_file_and_row(tmp_path, capsys, row, words):
    path = write_jsonl(tmp_path / "bad.jsonl", good_rows(2) + [row])
    with pytest.raises(SystemExit) as info:
        chat.read_conversations(path, "train")
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and words in err[0], err


# --- training end to end (a tiny GPT, a few steps)

@pytest.fixture
def base_checkpoint(tmp_path):
    """A gpt2.py checkpoint of a tiny GPT with the padded vocabulary and a short context."""
    model = tiny_gpt()
    path = tmp_path / "base.pt"
    torch.save({"stage": gpt2.STAGE, "model": model.state_dict(), "config": vars(model.config)},
               path)
    return path


def tiny_args(base, out_dir, *extra):
    return [str(a) for a in ("--init-from", base, "--out-dir", out_dir, "--train-examples", 200,
                             "--task-n", 8, "--batch-size", 4, "--examples-per-step", 8,
                             "--max-steps", 6, "--warmup-steps", 2, "--lr", 1e-2,
                             "--eval-every", 3, "--eval-batches", 2, "--device", "cpu", *extra)]


def train(argv):
    return chat.main(chat.parse_args(argv))


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def train_losses(out_dir):
    return [r["train_loss"] for r in read_log(out_dir / "log.jsonl") if "train_loss" in r]


def test_tiny_run_writes_log_metrics_figure_and_a_checkpoint_with_the_format(tmp_path,
                                                                             base_checkpoint):
    out = tmp_path / "out"
    metrics = train(tiny_args(base_checkpoint, out))
    losses = train_losses(out)
    assert len(losses) == 6 and losses[-1] < losses[0]
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("val_loss", "task_accuracy", "base_task_accuracy", "task_n",
                "task_accuracy_by_kind", "cut", "dropped"):
        assert key in saved
    assert saved["task_n"] == 8 and saved["val_loss"] == metrics["val_loss"]
    assert set(saved["task_accuracy_by_kind"]) == set(chat.TASK_KINDS)
    # gpt2.py's loop: the last evaluation measures the weights after the last step.
    assert [r["step"] for r in read_log(out / "log.jsonl") if "val_loss" in r] == [0, 3, 6]
    assert (out / "chat.png").read_bytes()[:4] == b"\x89PNG"
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["stage"] == "chat" and checkpoint["chat_format"] == chat.FORMAT
    model, chat_format = chat.load_chat_model(out)
    assert chat_format == chat.FORMAT
    torch.testing.assert_close(model.state_dict()["lm_head.weight"],
                               checkpoint["model"]["lm_head.weight"])


def test_gradient_accumulation_equals_one_large_batch(tmp_path, base_checkpoint):
    train(tiny_args(base_checkpoint, tmp_path / "a", "--batch-size", 8))
    train(tiny_args(base_checkpoint, tmp_path / "b", "--batch-size", 2))  # 4 micro-steps
    np.testing.assert_allclose(train_losses(tmp_path / "a"), train_losses(tmp_path / "b"),
                               atol=1e-5, rtol=0)


def test_resume_is_exact_and_a_finished_run_stays_as_it_is(tmp_path, base_checkpoint, capsys):
    train(tiny_args(base_checkpoint, tmp_path / "whole"))
    train(tiny_args(base_checkpoint, tmp_path / "split", "--stop-step", 3))
    assert json.loads((tmp_path / "split" / "metrics.json").read_text())["stopped"] == \
        "--stop-step"
    train(tiny_args(base_checkpoint, tmp_path / "split", "--resume"))
    key = lambda r: (r["step"], r.get("train_loss"), r.get("val_loss"))  # noqa: E731
    assert [key(r) for r in read_log(tmp_path / "split" / "log.jsonl")] == \
        [key(r) for r in read_log(tmp_path / "whole" / "log.jsonl")]
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    split = json.loads((tmp_path / "split" / "metrics.json").read_text())
    assert split["task_accuracy"] == whole["task_accuracy"]
    assert split["base_task_accuracy"] == whole["base_task_accuracy"]
    # --resume of a finished run says so and touches nothing.
    files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "split").iterdir()}
    capsys.readouterr()
    assert train(tiny_args(base_checkpoint, tmp_path / "split", "--resume"))["complete"]
    assert "complete" in capsys.readouterr().out
    assert files == {p: (p.read_bytes(), p.stat().st_mtime_ns)
                     for p in (tmp_path / "split").iterdir()}


def test_a_checkpoint_is_never_overwritten_without_the_flag(tmp_path, base_checkpoint):
    out = tmp_path / "out"
    train(tiny_args(base_checkpoint, out, "--max-steps", 1))
    before = (out / "checkpoint.pt").read_bytes()
    result = run_script("chat.py", *tiny_args(base_checkpoint, out, "--max-steps", 1))
    assert_user_error(result, "--overwrite", "--resume")
    assert (out / "checkpoint.pt").read_bytes() == before


# --- the chat

def test_stream_reply_with_the_cache_equals_recomputing_the_whole_text():
    """Greedy replies sampled with the KV cache equal a full forward pass per token, limited to
    text and the end token; a reply stops at the end of the context."""
    model = tiny_gpt(block_size=40).eval()
    prompt = chat.render_prompt(TWO_TURNS[:2])
    cached = list(chat.stream_reply(model, prompt, 100))
    tokens = list(prompt)
    with torch.no_grad():
        while len(tokens) <= 40:  # the last token is predicted from 40 inputs
            logits = model(torch.tensor([tokens]))[0][0, -1]  # (V,)
            allowed = torch.full_like(logits, float("-inf"))
            allowed[:chat.BOS] = 0  # text, not <|endoftext|> (50256)
            allowed[chat.ASSISTANT_END] = 0
            tokens.append(int((logits + allowed).argmax()))
            if tokens[-1] == chat.ASSISTANT_END:
                break
    assert cached == tokens[len(prompt):]
    assert len(prompt) + len(cached) <= 41


def test_fit_history_drops_the_oldest_exchanges_and_keeps_the_system_message():
    history = TWO_TURNS[:4]  # system, user, assistant, user
    full = chat.render_prompt(history)
    assert chat.fit_history(history, len(full), 0) == (full, 0)
    prompt, dropped = chat.fit_history(history, len(full) - 1, 0)
    assert dropped == 1 and prompt == chat.render_prompt([history[0], history[3]])
    assert chat.fit_history(history, 5, 0)[0] is None


@pytest.fixture
def chat_checkpoint(tmp_path, base_checkpoint):
    out = tmp_path / "chat"
    train(tiny_args(base_checkpoint, out, "--max-steps", 2))
    return out / "checkpoint.pt"


def run_chat(*args, stdin=""):
    return subprocess.run([sys.executable, str(ROOT / "chat.py"), *map(str, args)], cwd=ROOT,
                          input=stdin, capture_output=True, text=True, timeout=120)


def test_piped_chat_keeps_history_clears_drops_and_exits(chat_checkpoint):
    long = " ".join(["cat dog"] * 10)
    lines = ["hello", long, long, long, "/clear", "again", "/exit", "never read"]
    result = run_chat("--chat", "--init-from", chat_checkpoint, "--temperature", 0,
                      "--max-new-tokens", 4, stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("assistant: ") == 5 and "user: hello" in out and "user: never" not in out
    assert "exchange(s) are forgotten" in out  # a 64-token context fills up
    assert out.index("(history cleared)") < out.index("user: again")


def test_terminal_chat_prompts_for_each_turn(chat_checkpoint):
    """At a terminal (a pseudo-terminal here) each turn of the user starts after `user: `, and
    Ctrl-D ends the chat without a traceback."""
    pty = pytest.importorskip("pty")
    pid, fd = pty.fork()
    if pid == 0:  # the child: chat.py on the pseudo-terminal's other end
        os.chdir(ROOT)
        os.execv(sys.executable, [sys.executable, "chat.py", "--chat", "--init-from",
                                  str(chat_checkpoint), "--temperature", "0",
                                  "--max-new-tokens", "3"])
    seen = b""

    def read_until(marker, count):
        nonlocal seen
        while seen.count(marker) < count:
            ready, _, _ = select.select([fd], [], [], 60)
            assert ready, f"no {marker!r} in {seen!r}"
            seen += os.read(fd, 4096)

    read_until(b"user: ", 1)
    os.write(fd, b"hello\n")
    read_until(b"user: ", 2)  # the reply came, then the next turn's prompt
    os.write(fd, b"\x04")  # Ctrl-D
    try:
        while chunk := os.read(fd, 4096):
            seen += chunk
    except OSError:  # the child closed the terminal
        pass
    _, status = os.waitpid(pid, 0)
    text = seen.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert text.index("user: ") < text.index("hello") < text.index("assistant: ")
    assert "Traceback" not in text


def test_prompt_answers_once_and_a_too_long_prompt_is_one_line(chat_checkpoint):
    result = run_chat("--prompt", "Repeat: cat dog", "--init-from", chat_checkpoint,
                      "--max-new-tokens", 3, "--seed", 1)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("assistant: ") == 1
    again = run_chat("--prompt", "Repeat: cat dog", "--init-from", chat_checkpoint,
                     "--max-new-tokens", 3, "--seed", 1)
    reply = [line for line in result.stdout.splitlines() if line.startswith("assistant: ")]
    # the same seed, the same reply (the header's note on a busy machine may come and go)
    assert [line for line in again.stdout.splitlines() if line.startswith("assistant: ")] == reply
    assert_user_error(run_chat("--prompt", "cat " * 80, "--init-from", chat_checkpoint),
                      "--prompt", "longer than the model's context of 64 tokens")
    # A system message is checked too: blank is a mistake (it was a traceback), and one that
    # leaves no room for any question is named, not the short --prompt beside it.
    for mode in (["--prompt", "hi"], ["--chat"]):
        assert_user_error(run_chat(*mode, "--init-from", chat_checkpoint, "--system", "  "),
                          "--system is empty")
        assert_user_error(run_chat(*mode, "--init-from", chat_checkpoint, "--system",
                                   "cat " * 80, stdin="hi\n"), "--system:", "longer")


def test_bad_inputs_are_one_line_and_exit_2(tmp_path, base_checkpoint):
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    bad_json = write_jsonl(tmp_path / "bad.jsonl", good_rows(3) + ["{nope"])
    roles = write_jsonl(tmp_path / "roles.jsonl",
                        [{"messages": [{"role": "human", "content": "x"}]}])
    turns = write_jsonl(tmp_path / "turns.jsonl", [{"messages": [
        {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
        {"role": "assistant", "content": "z"}]}])
    not_gpt = tmp_path / "not_gpt.pt"
    torch.save({"stage": "gpt2", "model": {"w": torch.zeros(2)}, "config": {"n_layer": 1}},
               not_gpt)
    out = tmp_path / "out"
    for argv, words in (
            (["--data", empty], ["holds 0 conversation"]),
            (["--data", bad_json], [str(bad_json), "row 4", "not valid JSON"]),
            (["--data", roles], [str(roles), "row 1", "unknown role"]),
            (["--data", turns], [str(turns), "row 1", "assistant where user was due"]),
            (["--data", tmp_path / "missing.jsonl"], ["does not exist"]),
            (["--init-from", not_gpt], ["--init-from", "not_gpt.pt"]),
            (["--examples-per-step", 6], ["--examples-per-step", "multiple"]),
            (["--lr", -1], ["--lr"])):
        result = run_script("chat.py", *tiny_args(base_checkpoint, out, *argv))
        assert_user_error(result, *words)
        assert not out.exists()  # checked before anything is written
    assert_user_error(run_chat("--chat", "--init-from", tmp_path / "nothing"), "--init-from")
    # --data is read before any model loads: a typo costs no download of weights.
    assert_user_error(run_script("chat.py", "--init-from", "gpt2-xl", "--data",
                                 tmp_path / "typo.jsonl", "--out-dir", out), "typo.jsonl",
                      "does not exist")
    # Talking before fine-tuning: the fix is to fine-tune (into that --out-dir), then to talk.
    assert_user_error(run_chat("--chat", "--out-dir", tmp_path / "never"),
                      "never/checkpoint.pt does not exist", "fine-tune a model first")
    assert_user_error(run_script("chat.py", "--init-from", tmp_path / "no-base.pt", "--out-dir",
                                 out), "no-base.pt does not exist", "pre-train a base model")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, base_checkpoint, monkeypatch,
                                                       capsys):
    """A non-finite loss ends the run with status 1 and one line; the checkpoint on disk is the
    last good one, not the poisoned step's."""
    forward, calls = chat.AssistantLoss.forward, {"n": 0}

    def poisoned(self, x, y, mask):
        loss = forward(self, x, y, mask)
        if torch.is_grad_enabled():  # training's passes, not evaluation's
            calls["n"] += 1
            if calls["n"] > 6:  # steps 0-2 are fine (2 micro-steps each), step 3 is not
                loss = loss * float("nan")
        return loss

    monkeypatch.setattr(chat.AssistantLoss, "forward", poisoned)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        train(tiny_args(base_checkpoint, out, "--checkpoint-every", 2, "--eval-every", 0))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "loss is nan at step 3" in err and "last good checkpoint" in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path, base_checkpoint):
    """SIGTERM (preemption) finishes the step, saves, exits 0; --resume goes on from there."""
    out = tmp_path / "out"
    args = tiny_args(base_checkpoint, out, "--max-steps", 100000, "--eval-every", 0)
    returncode, rest, err = signal_after("chat.py", args, "step     2 |", signal.SIGTERM)
    assert returncode == 0, err
    assert "received SIGTERM" in rest
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert step >= 3 and len(train_losses(out)) == step


@pytest.mark.slow
def test_two_ranks_under_torchrun_equal_one_process(tmp_path, base_checkpoint):
    """DDP over 2 gloo ranks (one micro-step each) logs the losses, the val losses and the task
    accuracy of one process with the same conversations a step (two micro-steps)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "chat.py"), *tiny_args(base_checkpoint, tmp_path / "ddp", "--max-steps", 4)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "on 2 rank(s), 1 micro-step(s)" in ddp.stdout
    train(tiny_args(base_checkpoint, tmp_path / "one", "--max-steps", 4))
    a, b = (read_log(tmp_path / name / "log.jsonl") for name in ("ddp", "one"))
    np.testing.assert_allclose(train_losses(tmp_path / "ddp"), train_losses(tmp_path / "one"),
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose([r["val_loss"] for r in a if "val_loss" in r],
                               [r["val_loss"] for r in b if "val_loss" in r], atol=1e-5, rtol=0)
    metrics = [json.loads((tmp_path / name / "metrics.json").read_text())
               for name in ("ddp", "one")]
    assert metrics[0]["task_accuracy_by_kind"] == metrics[1]["task_accuracy_by_kind"]
    assert metrics[0]["world_size"] == 2


def test_batched_greedy_replies_equal_one_at_a_time():
    """task_accuracy's batched replies equal stream_reply's greedy ones, prompt by prompt."""
    model = tiny_gpt().eval()
    _, heldout = chat.task_mix(seed=1, n_train=0, n_heldout=12)
    prompts = [chat.render_prompt([{"role": "user", "content": q}]) for _, q, _ in heldout]
    assert len({len(p) for p in prompts}) > 1  # several lengths, several batches
    assert chat.greedy_replies(model, prompts, 6) == \
        [list(chat.stream_reply(model, p, 6)) for p in prompts]


@pytest.mark.gpu
def test_fine_tuning_on_a_gpu_with_bf16_and_compile(tmp_path, base_checkpoint):
    """On CUDA: bf16 autocast, torch.compile of the masked loss, the loss falling, the task
    accuracy measured, and a reply from the checkpoint."""
    out = tmp_path / "out"
    args = tiny_args(base_checkpoint, out, "--max-steps", 8, "--lr", 3e-3)
    args[args.index("--device") + 1] = "cuda"
    metrics = train(args)
    assert metrics["compile"] and metrics["dtype"] == "bfloat16"
    losses = train_losses(out)
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert 0 <= metrics["task_accuracy"] <= 1
    result = run_chat("--prompt", "First word: cat dog", "--init-from", out, "--device", "cuda",
                      "--max-new-tokens", 4)
    assert result.returncode == 0, result.stderr
    assert "device cuda" in result.stdout and "assistant: " in result.stdout


@pytest.mark.parametrize("script", ["chat.py", "serve.py"])
def test_an_unreachable_hub_is_gpt2_pys_one_line(tmp_path, script):
    """--init-from gpt2 without network and without a cached copy: gpt2.py's own words (the hub
    cannot be reached, what to pass instead), not a suggestion of the name that just failed."""
    env = offline_env(tmp_path)
    result = run_script(script, "--init-from", "gpt2", "--device", "cpu", env=env)
    assert_user_error(result, "--init-from gpt2", "hub cannot be reached", "local checkpoint")
    assert "such as gpt2" not in result.stderr


def test_a_hub_dataset_without_network_is_one_line_at_once(tmp_path, base_checkpoint):
    """--data owner/name with the hub unreachable and nothing cached: one line saying so, at
    once (datasets is switched to its cache, not left to retry for half a minute)."""
    result = run_script("chat.py", "--init-from", base_checkpoint, "--out-dir", tmp_path / "o",
                        "--data", "nobody/no-such-set", env=offline_env(tmp_path), timeout=20)
    assert_user_error(result, "--data nobody/no-such-set", "hub cannot be reached", ".jsonl")
