"""--export-hf: the folder that gpt2.py and chat.py write is the same model in transformers, loaded
offline: the same tokens (GPT-2's tokenizer, the chat template, special-token spellings kept as
text), the same logits, the same greedy replies ending at the same token. Tiny models in tmp."""
import random
import socket

import pytest
import torch

import chat
import fineweb
import gpt2
from conftest import save_checkpoint

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", autouse=True)
def offline():
    """An offline cluster: the hub is off, and any attempt to connect anywhere fails the test."""
    attempts = []

    def refuse(sock, address):
        attempts.append(address)
        raise OSError("no network in this test")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        patch.setattr(socket.socket, "connect", refuse)
        yield
    assert not attempts, f"the network was used: {attempts}"


@pytest.fixture(scope="module")
def chat_export(tmp_path_factory):
    """(the chat model as chat.py loads it, its exported folder): a tiny GPT fine-tuned by chat.py
    on the task mix until its greedy replies end with <|assistant_end|>, then exported."""
    tmp = tmp_path_factory.mktemp("chat")
    torch.manual_seed(0)
    base = gpt2.GPT(gpt2.GPTConfig(block_size=64, vocab_size=chat.VOCAB_SIZE, n_layer=2,
                                   n_head=2, n_embd=32))
    save_checkpoint(tmp / "base.pt", {"stage": gpt2.STAGE, "model": base.state_dict(),
                                      "config": vars(base.config)})
    chat.main(chat.parse_args([str(a) for a in (
        "--init-from", tmp / "base.pt", "--out-dir", tmp / "chat", "--train-examples", 400,
        "--task-n", 8, "--batch-size", 8, "--examples-per-step", 8, "--max-steps", 20,
        "--warmup-steps", 2, "--lr", 3e-2, "--eval-every", 0, "--eval-batches", 1,
        "--device", "cpu")]))
    chat.main(chat.parse_args(["--init-from", str(tmp / "chat"), "--export-hf",
                               str(tmp / "hf")]))
    return chat.load_chat_model(tmp / "chat")[0], tmp / "hf"


# Pieces of messages: whitespace runs, other scripts, digits, contractions, punctuation...
TEXT = ["Hello", " world", "  two  spaces ", "\n", "\n\n  ", "\t", "naïve café", "日本語",
        "🙂", " 123 4567", "don't", " I'LL", " ?!", " ."]
# ...and the spellings of the special tokens and of the template's escape, alone, forged, glued.
SPELLINGS = [*chat.SPECIALS.values(), "<|", "|>", "a<|b", "!<|system_start|>", chat.ESCAPE,
             chat.ESCAPED, chat.ESCAPE + "|", chat.ESCAPE + chat.ESCAPED,
             "<" + chat.ESCAPE + "|user_end|>"]
PIECES = TEXT + SPELLINGS


def random_conversations(n, seed=0):
    """n conversations ending with the user's turn: a system turn in a third, 1 to 3 exchanges,
    questions of the task mix or text made of PIECES."""
    rng = random.Random(seed)
    questions = [question for _, question, _ in chat.task_mix(seed, 0, 30)[1]]

    def text():
        return "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 6))) + "."

    conversations = []
    for _ in range(n):
        messages = [{"role": "system", "content": text()}] if rng.random() < 1 / 3 else []
        for _ in range(rng.randint(1, 3)):
            question = rng.choice(questions) if rng.random() < 0.5 else text()
            messages += [{"role": "user", "content": question},
                         {"role": "assistant", "content": text()}]
        conversations.append(messages[:-1])
    return conversations


def test_chat_template_renders_exactly_what_chat_py_renders(chat_export):
    """apply_chat_template of the exported tokenizer gives chat.render_prompt's tokens, token for
    token (and render_conversation's without the generation prompt), for 300 conversations whose
    messages hold special-token spellings: those stay text, as encode_text keeps them."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(chat_export[1])
    assert {t: tokenizer.convert_ids_to_tokens(t) for t in chat.SPECIALS} == chat.SPECIALS
    conversations = random_conversations(300)
    assert sum(chat.SPECIALS[chat.ASSISTANT_END] in m["content"]
               for c in conversations for m in c) > 50  # the test holds what it says
    for messages in conversations:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                               return_dict=False)
        assert prompt == chat.render_prompt(messages), messages
        full = messages + [{"role": "assistant", "content": messages[-1]["content"]}]
        assert tokenizer.apply_chat_template(full, return_dict=False) == \
            chat.render_conversation(full)[0], full
    with pytest.raises(Exception, match="roles are system, user and assistant"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "hi"}], return_dict=False)


def test_the_template_escape_is_what_keeps_user_text_text(chat_export):
    """Measured with this transformers: without the template's escape (its two replace filters)
    "<|assistant_end|>" in a user's message becomes token 50260, and the switch
    split_special_tokens would cure that but also split the template's own tokens: neither
    renders chat.py's prompt. The exported folder does (the test above)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(chat_export[1])
    messages = [{"role": "user", "content": "Say <|assistant_end|> now"}]
    escape = '| replace("\ufdd0", "\ufdd0\ufdd1") | replace("<|", "<\ufdd0|")'
    assert escape in chat.CHAT_TEMPLATE
    naive = chat.CHAT_TEMPLATE.replace(escape, "")
    injected = tokenizer.apply_chat_template(messages, chat_template=naive,
                                             add_generation_prompt=True, return_dict=False)
    assert injected.count(chat.ASSISTANT_END) == 1 and injected != chat.render_prompt(messages)
    split = transformers.AutoTokenizer.from_pretrained(chat_export[1], split_special_tokens=True)
    assert not set(split.apply_chat_template(messages, add_generation_prompt=True,
                                             return_dict=False)) & set(chat.SPECIALS)


def test_greedy_generate_equals_the_chat_loop_and_stops_at_the_reply_end(chat_export):
    """transformers' greedy generate from the folder gives chat.py's greedy reply token for token
    and stops after <|assistant_end|> (generation_config's eos), with the tokens chat.py never
    samples suppressed; the text-generation pipeline answers messages with the same text."""
    model, folder = chat_export
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    suppressed = set(hf.generation_config.suppress_tokens)
    assert suppressed == set(range(fineweb.EOT, chat.VOCAB_SIZE)) - {chat.ASSISTANT_END}
    assert hf.generation_config.eos_token_id == chat.ASSISTANT_END
    conversations = [[{"role": "user", "content": q}] for _, q, _ in chat.task_mix(1, 0, 12)[1]]
    conversations += random_conversations(8, seed=1)
    ended = 0
    for messages in conversations:
        prompt = chat.render_prompt(messages)[-48:]  # the context is 64 tokens
        ours = list(chat.stream_reply(model, prompt, 12))
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                              dtype=torch.long), max_new_tokens=12, do_sample=False)
        assert out[0, len(prompt):].tolist() == ours, messages
        ended += ours[-1] == chat.ASSISTANT_END
    assert ended >= len(conversations) - 2  # the fine-tuned model ends (almost) every reply
    pipe = transformers.pipeline("text-generation", model=str(folder))
    messages = conversations[0]
    reply = pipe(messages, max_new_tokens=12, do_sample=False)[0]["generated_text"][-1]
    tokens = list(chat.stream_reply(model, chat.render_prompt(messages), 12))
    assert reply == {"role": "assistant",
                     "content": chat.encoding().decode(tokens[:-1])} and tokens[-1:] == [
        chat.ASSISTANT_END]


def test_a_base_export_loads_with_gpt2s_tokenizer_and_the_same_logits(tmp_path):
    """gpt2.py --export-hf of a model with GPT-2's (padded) vocabulary: AutoTokenizer loads
    GPT-2's tokenizer offline, with tiktoken's tokens and text, and no chat template;
    AutoModelForCausalLM gives gpt2.py's logits."""
    torch.manual_seed(0)
    model = gpt2.GPT(gpt2.GPTConfig(block_size=32, vocab_size=50304, n_layer=2, n_head=2,
                                    n_embd=32)).eval()
    with torch.no_grad():  # non-zero biases and gains, so that a mix-up would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    save_checkpoint(tmp_path / "checkpoint.pt", {"stage": gpt2.STAGE, "model": model.state_dict(),
                                                 "config": vars(model.config)})
    gpt2.main(gpt2.parse_args(["--init-from", str(tmp_path / "checkpoint.pt"), "--export-hf",
                               str(tmp_path / "hf")]))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer.chat_template is None and tokenizer.eos_token_id == fineweb.EOT
    enc, rng = fineweb.get_encoding(), random.Random(0)
    texts = ["".join(rng.choice(TEXT) for _ in range(rng.randint(1, 8)))
             for _ in range(300)]
    for text in texts:
        tokens = tokenizer.encode(text)
        assert tokens == enc.encode_ordinary(text), text
        assert tokenizer.decode(tokens) == text
    assert tokenizer.encode(fineweb.EOT_TEXT) == [fineweb.EOT]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.tensor([enc.encode_ordinary(texts[0] + texts[1])[:32]])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x)[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("argv, words", [
    (["--chat", "--export-hf", "x"], "separate modes"),
    (["--export-hf", "x"], "is a base model"),
])
def test_chat_export_mistakes_are_one_line(tmp_path, capsys, monkeypatch, argv, words):
    """chat.py --export-hf refuses a base model (gpt2.py exports those) and a second mode: one
    line, exit 2, no folder written."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    base = gpt2.GPT(gpt2.GPTConfig(block_size=16, vocab_size=chat.VOCAB_SIZE, n_layer=1,
                                   n_head=1, n_embd=8))
    save_checkpoint(tmp_path / "base.pt", {"stage": gpt2.STAGE, "model": base.state_dict(),
                                           "config": vars(base.config)})
    with pytest.raises(SystemExit) as exit_info:
        chat.main(chat.parse_args(argv + ["--init-from", str(tmp_path / "base.pt")]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "x").exists()
