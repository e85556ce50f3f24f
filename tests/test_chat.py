"""chat.py: the chat format (special tokens, rendering, its safety), the loss mask, the data
checks, the task mix, training (resume, DDP, outputs) and the chat loop. Tiny models and data
written to tmp_path."""
import pytest
import torch

import chat
import gpt2
from conftest import assert_user_error, run_script

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
