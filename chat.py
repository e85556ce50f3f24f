"""Stage 7: chat, from a pre-trained GPT-2 to an assistant by supervised fine-tuning.

gpt2.py pre-trained a model that continues text. This stage teaches it to answer: conversations
are written into GPT-2 tokens with a few special tokens that mark who speaks (the chat format),
the loss is taken only on what the assistant says (the loss mask), and a chat loop renders the
history the same way, samples the reply with the KV cache and stops at the assistant's end token.
The model is gpt2.py's, imported: this file's lesson is the format, the mask and the loop.
"""
import functools
from pathlib import Path

import torch

import common
import fineweb
import gpt2
from common import die

STAGE = "chat"


# --- the chat format

# Special tokens live in the rows GPT-2's vocabulary was padded with (50,257 to 50,303): a
# gpt2.py checkpoint already has them, and no text encodes to them (they have no BPE merges).
USER_START, USER_END = 50257, 50258
ASSISTANT_START, ASSISTANT_END = 50259, 50260  # generation stops at ASSISTANT_END
SYSTEM_START, SYSTEM_END = 50261, 50262
BOS = fineweb.EOT  # a conversation starts like every pre-training document: after <|endoftext|>
SPECIALS = {USER_START: "<|user_start|>", USER_END: "<|user_end|>",
            ASSISTANT_START: "<|assistant_start|>", ASSISTANT_END: "<|assistant_end|>",
            SYSTEM_START: "<|system_start|>", SYSTEM_END: "<|system_end|>",
            BOS: fineweb.EOT_TEXT}
TURNS = {"system": (SYSTEM_START, SYSTEM_END), "user": (USER_START, USER_END),
         "assistant": (ASSISTANT_START, ASSISTANT_END)}
# Recorded in every checkpoint: a reader renders conversations as the model was trained on them.
FORMAT = {"name": "chat.py", "version": 1, "bos": BOS,
          "tokens": {name: ids for name, ids in TURNS.items()}}
VOCAB_SIZE = 50304  # GPT-2's 50,257 tokens padded to a multiple of 64, as gpt2.py does


@functools.lru_cache(maxsize=1)
def encoding():
    return fineweb.get_encoding()


def encode_text(text):
    """Ordinary text only: "<|user_end|>" or "<|endoftext|>" typed by a user or found in a data
    file are plain characters, never a special token (tiktoken's encode_ordinary)."""
    return encoding().encode_ordinary(text)


def decode(tokens):
    """Text for tokens, the special tokens spelled out (for reading a rendered conversation)."""
    text, run = [], []
    for token in list(tokens) + [None]:
        if token is None or token in SPECIALS or token >= encoding().n_vocab:
            text.append(encoding().decode(run))
            run = []
            if token is not None:
                text.append(SPECIALS.get(token, f"<|{token}|>"))
        else:
            run.append(token)
    return "".join(text)


def check_messages(messages):
    """None for a well-formed conversation, else ValueError with a one-line reason: a list of
    {"role", "content"} dicts, an optional system message first, then user and assistant
    alternating, starting with the user, no content empty."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("a conversation is a non-empty list of messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            raise ValueError(f"message {i} is not an object with a role and a content")
        role, content = message["role"], message["content"]
        if role not in TURNS:
            raise ValueError(f"message {i} has the unknown role {str(role)[:40]!r}; "
                             "roles are system, user and assistant")
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"message {i} ({role}) has empty or non-text content")
    roles = [m["role"] for m in messages]
    if roles[0] == "system":
        roles = roles[1:]
    for i, role in enumerate(roles):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            where = i + (len(messages) - len(roles))
            raise ValueError(f"message {where} is {role} where {expected} was due: a system "
                             "message may only come first, then user and assistant alternate, "
                             "starting with the user")
    if not roles:
        raise ValueError("a conversation needs a user message, not only a system message")


def render_conversation(messages):
    """(tokens, mask) of a conversation, the one rendering used for training, chat and serving:
    <|endoftext|>, then each turn as start token, its text, end token. mask[i] is 1 exactly where
    tokens[i] is a target the loss learns: the assistant's text and its end token."""
    check_messages(messages)
    tokens, mask = [BOS], [0]
    for message in messages:
        start, end = TURNS[message["role"]]
        text = encode_text(message["content"])
        learn = int(message["role"] == "assistant")
        tokens += [start, *text, end]
        mask += [0] + [learn] * (len(text) + 1)  # the start token is given, not predicted
    return tokens, mask


def render_prompt(messages):
    """The generation form: a conversation that ends with the user's turn, rendered as in
    training, then the assistant's start token: the model's next tokens are the reply."""
    check_messages(messages)
    if messages[-1]["role"] != "user":
        raise ValueError("a prompt ends with a user message, for the assistant to answer")
    return render_conversation(messages)[0] + [ASSISTANT_START]


def parse_conversation(tokens):
    """The messages that render_conversation turned into `tokens` (its inverse)."""
    if not tokens or tokens[0] != BOS:
        raise ValueError("a rendered conversation starts with <|endoftext|>")
    messages, i = [], 1
    by_start = {start: (role, end) for role, (start, end) in TURNS.items()}
    while i < len(tokens):
        if tokens[i] not in by_start:
            raise ValueError(f"token {i} ({tokens[i]}) does not start a turn")
        role, end = by_start[tokens[i]]
        if end not in tokens[i + 1:]:
            raise ValueError(f"the {role} turn at token {i} has no end token")
        stop = tokens.index(end, i + 1)
        messages.append({"role": role, "content": encoding().decode(tokens[i + 1:stop])})
        i = stop + 1
    return messages


# --- the model: gpt2.py's, with the special tokens' rows made ready

def init_special_rows(model, first=50257, seed=0):
    """Rows from `first` on never saw a token in pre-training (OpenAI's file has none; gpt2.py's
    padded rows were only ever pushed down as wrong answers). Each becomes the mean of the
    trained rows plus a little noise (Hewitt, 2021, "Initializing new word embeddings"): as an
    output its logit starts near an average token's, neither certain nor impossible, and the
    noise lets the rows of different special tokens part ways. The head is tied: one write."""
    wte = model.transformer.wte.weight  # (V, C)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        trained = wte[:first]  # (first, C)
        noise = torch.randn(wte.size(0) - first, wte.size(1), generator=generator)  # (V-first, C)
        wte[first:] = trained.mean(0) + noise.to(wte) * trained.std(0) * 0.1


def pad_vocab(model, vocab_size=VOCAB_SIZE):
    """A copy of `model` with vocab_size rows (OpenAI's 50,257 become 50,304), trained rows kept."""
    if model.config.vocab_size >= vocab_size:
        return model
    config = gpt2.GPTConfig(**{**vars(model.config), "vocab_size": vocab_size})
    padded = gpt2.GPT(config)
    state = model.state_dict()
    old = state["transformer.wte.weight"]  # (V_old, C)
    state["transformer.wte.weight"] = torch.cat([old, old.new_zeros(vocab_size - len(old),
                                                                   old.size(1))])  # (V, C)
    state["lm_head.weight"] = state["transformer.wte.weight"]
    padded.load_state_dict(state)
    return padded


LOAD_HINT = ("pass --init-from with a chat.py or gpt2.py checkpoint, a Hugging Face GPT-2 folder "
             "or a hub name such as gpt2")


def read_checkpoint(path):
    """A checkpoint file's dict (weights only, never code), or die() naming --init-from."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a file that is not a checkpoint
        die(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}); {LOAD_HINT}")
    if not isinstance(checkpoint, dict) or checkpoint.get("stage") not in (STAGE, gpt2.STAGE):
        die(f"{path} is not a chat.py or gpt2.py checkpoint; {LOAD_HINT}")
    return checkpoint


def model_from_checkpoint(checkpoint, path):
    try:
        model = gpt2.GPT(gpt2.GPTConfig(**checkpoint["config"]))
        model.load_state_dict(checkpoint["model"])
    except (KeyError, TypeError, RuntimeError) as err:
        die(f"checkpoint {path} does not hold a GPT that gpt2.py builds "
            f"({type(err).__name__}); {LOAD_HINT}")
    return model


def load_chat_model(source, device="cpu"):
    """(model in eval mode, chat format) from a chat.py checkpoint (its recorded format), or
    (model, None) from a base model: a gpt2.py checkpoint, a Hugging Face GPT-2 folder or a hub
    name, padded to 50,304 rows with the special tokens' rows initialised by init_special_rows.
    A file, or a folder holding checkpoint.pt; anything else dies in one line."""
    path = Path(source)
    path = path / "checkpoint.pt" if (path / "checkpoint.pt").is_file() else path
    if path.is_file():
        checkpoint = read_checkpoint(path)
        model = model_from_checkpoint(checkpoint, path)
        chat_format = checkpoint.get("chat_format") if checkpoint["stage"] == STAGE else None
    else:  # a Hugging Face folder or hub name
        try:
            model = gpt2.GPT.from_pretrained(str(source))
        except (ImportError, OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
            die(f"cannot load weights from {source} ({type(err).__name__}); {LOAD_HINT}")
        chat_format = None
    if chat_format is None:
        if model.config.vocab_size < max(SPECIALS) + 1:
            model = pad_vocab(model)
        init_special_rows(model)
    return model.to(device).eval(), chat_format
