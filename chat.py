"""Stage 7: chat, from a pre-trained GPT-2 to an assistant by supervised fine-tuning.

gpt2.py pre-trained a model that continues text. This stage teaches it to answer: conversations
are written into GPT-2 tokens with a few special tokens that mark who speaks (the chat format),
the loss is taken only on what the assistant says (the loss mask), and a chat loop renders the
history the same way, samples the reply with the KV cache and stops at the assistant's end token.
The model is gpt2.py's, imported: this file's lesson is the format, the mask and the loop
(InstructGPT's first step, Ouyang et al., 2022; nanochat's SFT and chat do the same for its
models). serve.py serves the same format: render_prompt is its rendering too.

Run (CPU quick start: gpt2.py's `cpu` checkpoint taught a bundled task mix, generated from the
seed: name the first or the last word of a phrase, or count its words):
    python fineweb.py --dataset data/shakespeare.txt --out-dir data/shards/shakespeare \\
        --shard-size 50000
    python gpt2.py --preset cpu --data data/shards/shakespeare
    python chat.py --init-from out/gpt2/checkpoint.pt
    echo "Last word: king love night" | python chat.py --chat --temperature 0
GPU (OpenAI's GPT-2 124M on HuggingFaceTB/smol-smoltalk, a real chat dataset from the hub):
    python chat.py --preset gpt2                       # one GPU
    torchrun --standalone --nproc_per_node=8 chat.py --preset gpt2
    python chat.py --chat                              # talk to out/chat/checkpoint.pt
    python chat.py --export-hf out/chat-hf             # a folder for vLLM and transformers

Measured (2-core development machine, torch 2.13, 2 threads, 2026-11-26): the quick start's
fine-tuning (1,800 steps of 32 conversations) took 7 min 2 s for the whole command; val loss on
the assistant's tokens 11.50 -> 0.0019; held-out task_accuracy 1.00 for every kind (first, last,
count), base_task_accuracy 0.00. Counting comes within 100 steps; copying the asked-for word
after a plateau, between steps 600 and 1,500 (see the task mix below).

Outputs in --out-dir (default out/chat): log.jsonl, metrics.json (val_loss over the assistant's
tokens; on the task mix task_accuracy and base_task_accuracy, overall and by kind, and task_n),
chat.png, checkpoint.pt (model, optimizer, step, data position, RNG state and the chat format).
"""
import argparse
import contextlib
import functools
import json
import math
import os
import random
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

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


LOAD_HINT = ("pass --init-from with a chat.py, rl.py or gpt2.py checkpoint, a Hugging Face GPT-2 "
             "folder or a hub name such as gpt2")
CHAT_STAGES = (STAGE, "rl")  # checkpoints of chat models: this file's and rl.py's (stage 10)


def read_checkpoint(path):
    """A checkpoint file's dict (weights only, never code), or die() naming --init-from."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a file that is not a checkpoint
        die(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}); {LOAD_HINT}")
    if not isinstance(checkpoint, dict) or checkpoint.get("stage") not in (*CHAT_STAGES,
                                                                            gpt2.STAGE):
        die(f"{path} is not a chat.py, rl.py or gpt2.py checkpoint; {LOAD_HINT}")
    return checkpoint


def model_from_checkpoint(checkpoint, path):
    try:
        model = gpt2.GPT(gpt2.GPTConfig(**checkpoint["config"]))
        model.load_state_dict(checkpoint["model"])
    except (KeyError, TypeError, RuntimeError) as err:
        die(f"checkpoint {path} does not hold a GPT that gpt2.py builds "
            f"({type(err).__name__}); {LOAD_HINT}")
    return model


def load_chat_model(source, device="cpu", fix=LOAD_HINT):
    """(model in eval mode, chat format) from a chat.py or rl.py checkpoint (its format), or
    (model, None) from a base model: a gpt2.py checkpoint, a Hugging Face GPT-2 folder or a hub
    name, padded to 50,304 rows with the special tokens' rows initialised by init_special_rows.
    A file, or a folder holding checkpoint.pt; anything else dies in one line (`fix` its end)."""
    path = Path(source)
    path = path / "checkpoint.pt" if (path / "checkpoint.pt").is_file() else path
    if not path.exists() and str(source) not in gpt2.HUB:
        die(f"{source} does not exist; {fix}")
    if path.is_file():
        checkpoint = read_checkpoint(path)
        model = model_from_checkpoint(checkpoint, path)
        chat_format = (checkpoint.get("chat_format") if checkpoint["stage"] in CHAT_STAGES
                       else None)
    else:  # a Hugging Face folder or hub name: gpt2.py's loader and its errors (offline too)
        model, chat_format = gpt2.load_model(source), None
    if chat_format is None:
        if model.config.vocab_size < max(SPECIALS) + 1:
            model = pad_vocab(model)
        init_special_rows(model)
    return model.to(device).eval(), chat_format


# --- data: conversations from files, the hub, or the bundled task mix

def rows_to_conversations(rows, where):
    """The checked messages of each row ({"messages": [...]}); die() on the first bad row, naming
    it (`where(i)`), before any training starts."""
    conversations = []
    for i, row in enumerate(rows):
        try:
            if not isinstance(row, dict) or "messages" not in row:
                raise ValueError('not an object with a "messages" list')
            check_messages(row["messages"])
            if not any(m["role"] == "assistant" for m in row["messages"]):
                raise ValueError("no assistant message, so nothing to learn from")
        except ValueError as err:
            die(f"{where(i)}: {err}; fix or remove that row")
        conversations.append([{"role": m["role"], "content": m["content"]}
                              for m in row["messages"]])
    return conversations


def read_jsonl(path):
    """The conversations of one .jsonl file, one {"messages": [...]} object a line."""
    path = Path(path)
    if not path.is_file():
        die(f"--data {path} {'is not a file' if path.exists() else 'does not exist'}; pass a "
            ".jsonl of conversations, a folder of them, a hub dataset name or tasks")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        die(f"cannot read --data {path} as UTF-8 text ({type(err).__name__}); fix the file")
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                die(f"{path} row {number} is not valid JSON ({err.msg}); fix or remove that row")
    return rows_to_conversations([row for _, row in rows],
                                 lambda i: f"{path} row {rows[i][0]}")


def read_hub(name, split):
    """A dataset through Hugging Face `datasets` (a hub name such as HuggingFaceTB/smol-smoltalk,
    downloaded once into its cache): rows with a "messages" column, as in a .jsonl file."""
    offline = fineweb.hub_offline()  # unreachable: datasets reads its cache, without retries
    try:
        import datasets
        rows = datasets.load_dataset(name, split=split)
    except ImportError:
        die(f"--data {name} needs the datasets package (pip install datasets), or pass a .jsonl")
    except Exception as err:  # datasets raises many kinds: offline, not found, bad split
        if offline:
            die(f"cannot load --data {name}: the Hugging Face hub cannot be reached ({offline}) "
                "and this machine's cache has no copy; connect once (the download is kept) or "
                "pass a .jsonl")
        die(f"cannot load --data {name} split {split} through datasets ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:160] if str(err) else ''}); check the name and --split")
    return rows_to_conversations(rows, lambda i: f"{name} ({split}) row {i + 1}")


def read_conversations(data, split):
    """--data: a .jsonl file, a folder of them, or a hub dataset name."""
    path = Path(data)
    if path.is_dir():
        files = sorted(path.rglob("*.jsonl"))
        if not files:
            die(f"--data folder {path} holds no .jsonl files of conversations")
        return [c for file in files for c in read_jsonl(file)]
    if path.exists() or path.suffix == ".jsonl" or str(data).count("/") != 1:
        return read_jsonl(path)  # which names a missing file
    return read_hub(str(data), split)


def fit_to_context(conversations, block_size):
    """Rendered (tokens, mask) pairs that fit the context: block_size inputs and their targets,
    block_size + 1 tokens. A longer conversation is cut after its last assistant turn that fits,
    or dropped if even the first one does not. Returns (examples, cut, dropped)."""
    examples, cut, dropped = [], 0, 0
    for messages in conversations:
        tokens, mask = render_conversation(messages)
        if len(tokens) > block_size + 1:
            # Text never encodes to ASSISTANT_END: each one is the end of an assistant turn.
            ends = [i + 1 for i, t in enumerate(tokens) if t == ASSISTANT_END and i <= block_size]
            if not ends:
                dropped += 1
                continue
            tokens, mask, cut = tokens[:ends[-1]], mask[:ends[-1]], cut + 1
        examples.append((tokens, mask))
    return examples, cut, dropped


# The bundled task mix, sized for a 4-layer model and a few minutes of CPU: every answer depends
# on the question's phrase (no answer can be memorised). Counting is learnt in a hundred steps;
# copying the asked-for word takes far longer: the base model has no head yet that finds a token
# by its content, and fine-tuning must build one (the loss plateaus, then falls between steps
# 600 and 1,500). Three choices make that possible in minutes: the reply is the word alone, so
# its one token is the whole target and nothing stands between question and answer; it is the
# very token the question holds (" king", after a space, not "king"), which tied embeddings make
# easiest to copy; and a few words, each seen often (with 28 or 35 words, or replies of the form
# "It is king.", copying had not started after 600 to 1,000 steps).
WORDS = ("lord love king death night queen blood crown").split()
TASK_KINDS = ("first", "last", "count")


def make_task(kind, rng):
    """(question, answer) of one kind: the first or the last word of a phrase of three distinct
    words, or how many words a phrase of 2 to 5 has."""
    words = rng.sample(WORDS, 3 if kind != "count" else rng.randint(2, 5))
    phrase = " ".join(words)
    if kind == "first":
        return f"First word: {phrase}", f" {words[0]}"
    if kind == "last":
        return f"Last word: {phrase}", f" {words[-1]}"
    return f"How many words: {phrase}", f"There are {len(words)}."


def task_mix(seed, n_train, n_heldout):
    """(training conversations, held-out tasks as (kind, question, answer)), from the seed alone.
    The held-out questions come first and no training conversation asks any of them. One in ten
    training conversations holds two exchanges, so that the model learns to answer the last
    question of a history, as in the chat."""
    rng = random.Random(seed)
    heldout = [(kind, *make_task(kind, rng)) for i in range(n_heldout)
               for kind in [TASK_KINDS[i % len(TASK_KINDS)]]]
    asked = {question for _, question, _ in heldout}
    train = []
    while len(train) < n_train:
        messages = []
        for _ in range(1 + (rng.random() < 1 / 10)):
            question, answer = make_task(rng.choice(TASK_KINDS), rng)
            if question in asked:
                break
            messages += [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]
        else:
            train.append(messages)
    return train, heldout


def split_off_val(conversations, fraction, seed):
    """(train, val): a seeded shuffle, then the last `fraction` (at least one) for validation."""
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(fraction * len(order)))
    return [conversations[i] for i in order[:-n_val]], [conversations[i] for i in order[-n_val:]]


def batch(examples):
    """(x, y, mask), each (B, T): inputs, targets shifted by one, and which targets the loss
    learns. Rows pad to the longest with masked targets, at the end: causal attention never
    lets a real position see the padding after it."""
    T = max(len(tokens) for tokens, _ in examples) - 1
    x = torch.full((len(examples), T), BOS, dtype=torch.long)  # (B, T)
    y = torch.zeros((len(examples), T), dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(examples), T), dtype=torch.bool)  # (B, T)
    for row, (tokens, learn) in enumerate(examples):
        n = len(tokens) - 1
        x[row, :n] = torch.tensor(tokens[:-1])
        y[row, :n] = torch.tensor(tokens[1:])
        mask[row, :n] = torch.tensor(learn[1:], dtype=torch.bool)  # the target's own mask bit
    return x, y, mask


class ConversationLoader:
    """Optimizer steps of `per_step` conversations, visited in an order drawn from (seed, epoch).
    Micro-step i of rank r takes the step's conversations (i * world_size + r) * B onwards, so
    the step covers the same conversations with any number of ranks and micro-steps. Resumable
    from (epoch, offset) alone."""

    def __init__(self, examples, per_step, batch_size, rank=0, world_size=1, seed=0):
        self.examples, self.per_step, self.B = examples, per_step, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.layout = {"examples": len(examples), "per_step": per_step, "seed": seed}
        self.epoch, self.offset = 0, 0
        self._plan()

    def _plan(self):
        generator = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        self.order = torch.randperm(len(self.examples), generator=generator).tolist()

    def next_step(self):
        """(this rank's micro-batches, the number of learned targets in the whole step)."""
        chosen = []
        while len(chosen) < self.per_step:
            take = self.order[self.offset:self.offset + self.per_step - len(chosen)]
            chosen += [self.examples[i] for i in take]
            self.offset += len(take)
            if self.offset == len(self.order):
                self.epoch, self.offset = self.epoch + 1, 0
                self._plan()
        n_targets = sum(sum(mask[1:]) for _, mask in chosen)
        stride = self.B * self.world_size
        micro = [batch(chosen[start + self.rank * self.B:start + (self.rank + 1) * self.B])
                 for start in range(0, self.per_step, stride)]
        return micro, n_targets

    def state_dict(self):
        return {"epoch": self.epoch, "offset": self.offset, **self.layout}

    def load_state_dict(self, state):
        for key, value in self.layout.items():
            if state[key] != value:
                raise ValueError(f"the checkpoint's data position was taken with {key} "
                                 f"{state[key]}, this run has {value}")
        self.epoch, self.offset = state["epoch"], state["offset"]
        self._plan()


# --- training: the loss mask, the step, evaluation

def assistant_loss(hidden, weight, targets, mask):
    """The sum of the cross-entropies of the targets the mask keeps (the assistant's tokens and
    end tokens); every other target adds nothing, and so sends no gradient. hidden (B, T, C) are
    the final LayerNorm's outputs, weight (V, C) the output layer. Only the kept positions reach
    the output layer: its (N, 50,304) logits are most of a small model's cost, and most targets
    (the user's turns, the padding) are masked."""
    logits = F.linear(hidden[mask], weight)  # (N, V), N = mask.sum()
    return F.cross_entropy(logits.float(), targets[mask], reduction="sum")


class AssistantLoss(nn.Module):
    """gpt's summed assistant_loss on a batch. No weights of its own: DDP and torch.compile wrap
    it, and checkpoints hold the plain GPT's."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, x, y, mask):
        return assistant_loss(self.gpt.hidden_states(x), self.gpt.lm_head.weight, y, mask)


def train_step(model, optimizer, scaler, micro_batches, n_targets, device, autocast, grad_clip,
               stop):
    """One optimizer step: the mean loss over all the step's assistant tokens (every rank's,
    every micro-step's), its gradient norm, and whether any rank was asked to stop."""
    ddp = isinstance(model, DDP)
    world_size = dist.get_world_size() if ddp else 1
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=device)
    for i, (x, y, mask) in enumerate(micro_batches):
        # DDP syncs gradients on the last micro-step only, and averages them over the ranks;
        # each rank's share of the sum is scaled by world_size so the average is the sum.
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last or not ddp else model.no_sync():
            with autocast:
                loss = model(x.to(device), y.to(device), mask.to(device)) / n_targets
            loss_sum += loss.detach().float()
            scaler.scale(loss * world_size).backward()
    report = torch.stack([loss_sum, torch.tensor(float(stop), device=device)])
    if ddp:
        dist.all_reduce(report)
    loss, norm = report[0].item(), torch.tensor(math.nan)
    if math.isfinite(loss):
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
        scaler.step(optimizer)
        scaler.update()
    return loss, norm.item(), report[1].item() > 0


@torch.no_grad()
def estimate_loss(model, examples, batch_size, batches, device, autocast, rank, world_size):
    """Mean loss over the assistant tokens of the first `batches` batches of `examples` (the same
    ones every time), the batches dealt out to the ranks."""
    total = torch.zeros(2, device=device)  # summed loss, targets
    starts = range(0, min(len(examples), batches * batch_size), batch_size)
    for start in list(starts)[rank::world_size]:
        x, y, mask = batch(examples[start:start + batch_size])
        with autocast:
            loss = model(x.to(device), y.to(device), mask.to(device))
        total += torch.stack([loss.float(), mask.sum().to(device).float()])
    if world_size > 1:
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


def reply_logit_mask(model, device):
    """(V,): 0 for the tokens a reply may hold (text, then ASSISTANT_END), -inf for the rest."""
    allowed = torch.full((model.config.vocab_size,), float("-inf"), device=device)  # (V,)
    allowed[:BOS] = 0  # text: every GPT-2 token below <|endoftext|> (50256)
    allowed[ASSISTANT_END] = 0
    return allowed


@torch.no_grad()
def stream_reply(model, prompt, max_new_tokens, temperature=0.0, top_k=None, generator=None):
    """Yield the reply to `prompt` (render_prompt's tokens) a token at a time, sampled with the KV
    cache: the prompt in one pass, then one new token per step. Only text and ASSISTANT_END can
    be sampled; ASSISTANT_END is yielded last when it comes. Also stops after max_new_tokens, or
    when the context is full."""
    device = next(model.parameters()).device
    block_size = model.config.block_size
    cache = gpt2.KVCache(model.config.n_layer, block_size)
    allowed = reply_logit_mask(model, device)  # (V,)
    new = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)
    for _ in range(min(max_new_tokens, block_size - len(prompt) + 1)):
        x = model.hidden_states(new, cache)[:, -1]  # (1, C)
        logits = model.lm_head(x).float() + allowed  # (1, V)
        token = int(gpt2.sample_next_token(logits, temperature, top_k, generator=generator))
        yield token
        if token == ASSISTANT_END or cache.pos >= block_size:
            return
        new = torch.tensor([[token]], dtype=torch.long, device=device)  # (1, 1)


@torch.no_grad()
def greedy_replies(model, prompts, max_new_tokens):
    """stream_reply's greedy replies (ASSISTANT_END included where it came) to many prompts at
    once: the prompts of one length share a batch, so that a step reads the 50,304-row output
    layer once for the whole batch instead of once per prompt."""
    device = next(model.parameters()).device
    block_size = model.config.block_size
    allowed = reply_logit_mask(model, device)  # (V,)
    by_length, replies = {}, [None] * len(prompts)
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(i)
    for length, rows in by_length.items():
        cache = gpt2.KVCache(model.config.n_layer, block_size)
        new = torch.tensor([prompts[i] for i in rows], dtype=torch.long, device=device)  # (B, T)
        out, done = [], torch.zeros(len(rows), dtype=torch.bool, device=device)  # (B,)
        for _ in range(min(max_new_tokens, block_size - length + 1)):
            x = model.hidden_states(new, cache)[:, -1]  # (B, C)
            new = gpt2.sample_next_token(model.lm_head(x).float() + allowed, 0)  # (B, 1)
            out.append(new)
            done |= new[:, 0] == ASSISTANT_END
            if done.all() or cache.pos >= block_size:
                break
        for i, reply in zip(rows, torch.cat(out, 1).tolist()):
            replies[i] = reply[:reply.index(ASSISTANT_END) + 1] if ASSISTANT_END in reply else reply
    return replies


def task_accuracy(model, tasks, autocast, rank=0, world_size=1):
    """Greedy exact match of the whole reply (its text, then ASSISTANT_END) on the held-out tasks,
    {"overall": ..., kind: ...}; the tasks are dealt out to the ranks and the counts summed."""
    device = next(model.parameters()).device
    mine = tasks[rank::world_size]
    prompts = [render_prompt([{"role": "user", "content": question}]) for _, question, _ in mine]
    longest = max([len(encode_text(answer)) for _, _, answer in mine], default=0)
    model.eval()
    with autocast:
        replies = greedy_replies(model, prompts, longest + 2)
    counts = torch.zeros(len(TASK_KINDS), 2, device=device)  # (kinds, [right, asked])
    for (kind, _, answer), reply in zip(mine, replies):
        right = reply[-1:] == [ASSISTANT_END] and decode(reply[:-1]) == answer
        counts[TASK_KINDS.index(kind)] += torch.tensor([float(right), 1.0], device=device)
    if world_size > 1:
        dist.all_reduce(counts)
    result = {"overall": (counts[:, 0].sum() / counts[:, 1].sum()).item()}
    result.update({kind: (c[0] / c[1]).item() for kind, c in zip(TASK_KINDS, counts) if c[1]})
    return result


def draw_figure(path, records, base, final, title):
    """The train and val loss against step and, on the task mix, each kind's accuracy before and
    after fine-tuning."""
    plt = common.pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 1 + bool(final), figsize=(7 + 5 * bool(final), 4), squeeze=False)
    for key, style in (("train_loss", dict(lw=0.8)), ("val_loss", dict(marker="o"))):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            axes[0][0].plot(*zip(*points), label=key.removesuffix("_loss"), **style)
    axes[0][0].set(xlabel="step", ylabel="loss on assistant tokens (nats)", title=title,
                   yscale="log")  # the first steps fall from ~10, the rest move in the decimals
    axes[0][0].legend()
    if final:
        kinds = list(final)
        ax = axes[0][1]
        ax.bar([i - 0.2 for i in range(len(kinds))], [base.get(k, 0) for k in kinds], 0.4,
               label="before (base model)")
        ax.bar([i + 0.2 for i in range(len(kinds))], [final[k] for k in kinds], 0.4,
               label="after fine-tuning")
        ax.set_xticks(range(len(kinds)), kinds)
        ax.set(ylabel="held-out exact match", ylim=(0, 1.05), title="task accuracy")
        ax.legend()
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    return common.save_figure(fig, path)


# --- the chat

def fit_history(history, block_size, reserve):
    """(prompt tokens, exchanges dropped): the oldest user/assistant exchanges (a system message
    stays) go until the prompt leaves `reserve` tokens of the context for the reply; None for
    the prompt if the last question alone does not fit."""
    system = history[:1] if history[0]["role"] == "system" else []
    turns, dropped = history[len(system):], 0
    while True:
        prompt = render_prompt(system + turns)
        if len(prompt) + reserve <= block_size:
            return prompt, dropped
        if len(turns) == 1:
            return None, dropped
        turns, dropped = turns[2:], dropped + 1


def reply_to(model, history, args, generator):
    """Print the reply to `history` (it ends with the user's turn) as it is sampled and return
    its text; None if the last message alone is longer than the context. When the history
    outgrows the context, its oldest exchanges are dropped (from `history` too), with a line."""
    block_size = model.config.block_size
    reserve = min(args.max_new_tokens, block_size // 4)  # room the reply is sure to have
    prompt, dropped = fit_history(history, block_size, reserve)
    if prompt is None:
        return None
    if dropped:
        first = 1 if history[0]["role"] == "system" else 0
        del history[first:first + 2 * dropped]
        print(f"(the context of {block_size} tokens is full: the oldest {dropped} exchange(s) "
              "are forgotten)")
    print("assistant: ", end="", flush=True)
    tokens, shown = [], ""
    for token in stream_reply(model, prompt, args.max_new_tokens, args.temperature,
                              args.top_k or None, generator):
        if token == ASSISTANT_END:
            break
        tokens.append(token)
        text = encoding().decode(tokens)
        if not text.endswith("\ufffd"):  # a character split over tokens waits for its rest
            print(text[len(shown):], end="", flush=True)
            shown = text
    text = encoding().decode(tokens)
    print(text[len(shown):], flush=True)
    return text


def too_long(block_size, args):
    return (f"the message is longer than the model's context of {block_size} tokens less "
            f"{min(args.max_new_tokens, block_size // 4)} kept for the reply; shorten it")


def chat(model, args, device, lines, echo):
    """The terminal chat: a user's turn per line of `lines` (stdin; a pipe works), the reply
    streamed, the history kept. /clear starts afresh; /exit or the end of input ends."""
    generator = torch.Generator(device=device).manual_seed(args.seed)
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    print("a message a line; /clear starts afresh, /exit or end of input (Ctrl-D) ends")
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/clear":
            history = list(start)
            print("(history cleared)")
            continue
        if echo:  # piped input: show the question beside its answer
            print(f"user: {text}")
        history.append({"role": "user", "content": text})
        reply = reply_to(model, history, args, generator)
        if reply is None:
            print(f"{STAGE}.py: {too_long(model.config.block_size, args)}", file=sys.stderr)
            history.pop()
        elif reply.strip():
            history.append({"role": "assistant", "content": reply})
        else:  # an empty reply cannot be rendered: the question is forgotten with it
            history.pop()
    return {"turns": len(history)}


def typed_lines():
    """What a person types at the terminal, a line after each `user: ` prompt, until Ctrl-D or
    Ctrl-C."""
    while True:
        try:
            yield input("user: ")
        except (EOFError, KeyboardInterrupt):
            print()
            return


def check_format(source, chat_format):
    """die() if `source` was fine-tuned with a chat format other than this file's."""
    if chat_format is not None and chat_format != FORMAT:
        die(f"{source} was fine-tuned with another chat format ({chat_format.get('name')} "
            f"version {chat_format.get('version')}); fine-tune it again with this chat.py")


def fine_tuned(args, device="cpu"):
    """(source, model, chat format) for --chat, --prompt and --export-hf: --init-from, by default
    the model that training wrote, <out-dir>/checkpoint.pt."""
    source = args.init_from or args.out_dir / "checkpoint.pt"
    fix = LOAD_HINT if args.init_from else (f"fine-tune a model first with `python chat.py "
                                            f"--out-dir {args.out_dir}`, or {LOAD_HINT}")
    return (source, *load_chat_model(source, device, fix))


def talk(args, device):
    """--chat and --prompt: the fine-tuned model (--init-from, default <out-dir>/checkpoint.pt)."""
    source, model, chat_format = fine_tuned(args, device)
    if chat_format is None:
        print(f"note: {source} is a base model, not fine-tuned by chat.py: expect text, not "
              "answers")
    check_format(source, chat_format)
    block_size = model.config.block_size
    system = [{"role": "system", "content": args.system}] if args.system else []
    if system and fit_history(system + [{"role": "user", "content": "?"}], block_size,
                              min(args.max_new_tokens, block_size // 4))[0] is None:
        die(f"--system: {too_long(block_size, args)}")  # no question would ever fit beside it
    if args.prompt is None:
        common.print_header(device)
        typing = sys.stdin.isatty()  # a person at a terminal, not a pipe
        return chat(model, args, device, typed_lines() if typing else sys.stdin, echo=not typing)
    history = system + [{"role": "user", "content": args.prompt}]
    if fit_history(history, block_size, min(args.max_new_tokens, block_size // 4))[0] is None:
        die(f"--prompt: {too_long(block_size, args)}")
    common.print_header(device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    return {"reply": reply_to(model, history, args, generator)}


# --- the format in Hugging Face's terms: --export-hf, for vLLM, TGI, SGLang and transformers

# Those engines render a conversation with a folder's Jinja chat template into one string, then
# tokenize it: any spelling of a special token in that string becomes the token. So a user who
# types "<|assistant_end|>" would end the turn (transformers gives token 50260 for it), unlike
# encode_text. Their switch `split_special_tokens` is no cure: it splits the template's own tokens
# too. So the template writes each "<|" of a message as "<" ESCAPE "|", which no special token
# spells, and the tokenizer's normalizer, which runs after the special tokens are found, turns
# it back before BPE: the message's tokens are encode_text's. An ESCAPE in the message itself is
# written ESCAPE ESCAPED, and turned back too: every text comes through.
ESCAPE, ESCAPED = "\ufdd0", "\ufdd1"  # Unicode noncharacters, kept for a program's own use
# The normalizer's replacements, in order: only the template's escapes have "|" after an ESCAPE
# (a message's own ESCAPE has ESCAPED after it), then the message's own ESCAPEs.
UNESCAPE = [(ESCAPE + "|", "|"), (ESCAPE + ESCAPED, ESCAPE)]

# render_prompt (add_generation_prompt) and render_conversation in Jinja, for tokenizer_config.json;
# in a message, ESCAPE ("\ufdd0") is escaped first, so that the escapes of "<|" are not escaped
# again. "{%-" and "-}}" drop the whitespace around them: the lines render nothing between.
CHAT_TEMPLATE = """
{%- set turns = {"system": ["<|system_start|>", "<|system_end|>"],
                 "user": ["<|user_start|>", "<|user_end|>"],
                 "assistant": ["<|assistant_start|>", "<|assistant_end|>"]} -%}
{{- "<|endoftext|>" -}}
{%- for message in messages -%}
    {%- if message.role not in turns -%}
        {{- raise_exception("roles are system, user and assistant") -}}
    {%- endif -%}
    {{- turns[message.role][0] -}}
    {{- message.content | replace("\ufdd0", "\ufdd0\ufdd1") | replace("<|", "<\ufdd0|") -}}
    {{- turns[message.role][1] -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- "<|assistant_start|>" -}}
{%- endif -%}
"""


def hf_chat(model):
    """This chat format, for gpt2.write_hf_gpt2: the special tokens, the normalizer's
    replacements, the chat template, the token that ends a reply, and the tokens stream_reply
    never samples (generation_config's suppress_tokens)."""
    never = torch.isinf(reply_logit_mask(model, "cpu"))  # (V,)
    return {"special_tokens": {t: SPECIALS[t] for t in sorted(SPECIALS) if t != BOS},
            "replacements": UNESCAPE, "chat_template": CHAT_TEMPLATE,
            "eos_token_id": ASSISTANT_END, "suppress_tokens": never.nonzero()[:, 0].tolist()}


def export(args):
    """--export-hf: a chat.py model (--init-from, default <out-dir>/checkpoint.pt) as a folder
    that transformers and vLLM load, with this chat format."""
    source, model, chat_format = fine_tuned(args)
    if chat_format is None:
        die(f"{source} is a base model, not fine-tuned by chat.py; export it with gpt2.py "
            "--export-hf, or fine-tune it first")
    check_format(source, chat_format)
    gpt2.write_hf_gpt2(args.export_hf, model.state_dict(), vars(model.config), chat=hf_chat(model),
                       overwrite=args.overwrite)
    return {"export_hf": str(args.export_hf)}


# --- main: fine-tune

def read_data(args):
    """(train conversations, val conversations, held-out tasks or None) of --data, read before
    the model loads: a mistake in --data is one line before a download of weights."""
    if str(args.data) == "tasks":
        train, tasks = task_mix(args.seed, args.train_examples, args.task_n)
        val = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
               for _, q, a in tasks]
        return train, val, tasks
    conversations = read_conversations(args.data, args.split)
    if len(conversations) < 2:
        die(f"--data {args.data} holds {len(conversations)} conversation(s); training needs "
            "at least 2 (one is kept for validation)")
    return *split_off_val(conversations, args.val_fraction, args.seed), None


def fit_data(args, train, val, block_size):
    """(train examples, val examples, counts for the log): the conversations that fit the
    model's context, all checked before anything is written."""
    train_examples, cut, dropped = fit_to_context(train, block_size)
    val_examples, val_cut, val_dropped = fit_to_context(val, block_size)
    if not train_examples or not val_examples:
        die(f"no conversation of --data {args.data} fits the model's context of {block_size} "
            "tokens, even cut after its first answer; use shorter conversations")
    counts = {"train_conversations": len(train_examples), "val_conversations": len(val_examples),
              "cut": cut + val_cut, "dropped": dropped + val_dropped}
    return train_examples, val_examples, counts


def start_from(args):
    """(resume checkpoint or None, model on the CPU in training mode)."""
    if args.resume is not None:
        checkpoint = common.load_checkpoint(args.resume or args.out_dir / "checkpoint.pt", STAGE,
                                            "cannot resume; drop --resume to start afresh",
                                            needs=("config", "model", "step", "rng"))
        return checkpoint, model_from_checkpoint(checkpoint, args.resume).train()
    model, chat_format = load_chat_model(args.init_from, fix="pre-train a base model first "
                                         "(README's CPU quick start for gpt2.py writes "
                                         "out/gpt2/checkpoint.pt), or " + LOAD_HINT)
    if chat_format is not None and chat_format != FORMAT:
        die(f"--init-from {args.init_from} was fine-tuned with another chat format; start from "
            "its base model")
    return None, model.train()


def save_checkpoint(args, model, optimizer, scaler, loader, base, step):
    checkpoint = {
        "stage": STAGE, "chat_format": FORMAT, "model": model.state_dict(),
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step,
        "max_steps": args.max_steps, "config": vars(model.config), "loader": loader.state_dict(),
        "rng": gpt2.rng_state(), "base_task_accuracy": base,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    # Written beside its final name, then renamed: a crash mid-write leaves the old one whole.
    common.write_atomic(args.out_dir / "checkpoint.pt", lambda tmp: torch.save(checkpoint, tmp))


def main(args):
    # torchrun's environment, as in gpt2.py: RANK among all processes, LOCAL_RANK (its GPU) on
    # this machine, WORLD_SIZE. A plain `python chat.py` is rank 0 of 1.
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    master = rank == 0  # the one that prints, logs and writes
    device = common.pick_device(args.device, int(os.environ["LOCAL_RANK"]) if ddp else None,
                                args.threads)
    dtype = gpt2.pick_dtype(args.dtype, device)
    if args.export_hf:
        return export(args)
    if args.chat or args.prompt is not None:
        return talk(args, device)

    # Every input is checked before anything is written or any process group is joined.
    if args.examples_per_step % (args.batch_size * world_size):
        die(f"--examples-per-step {args.examples_per_step} is not a multiple of --batch-size x "
            f"ranks = {args.batch_size} x {world_size}; change one of them")
    torch.manual_seed(args.seed)
    train_talks, val_talks, tasks = read_data(args)  # conversations, not yet tokens
    checkpoint, model = start_from(args)
    end_step = gpt2.last_step(args)
    if checkpoint is not None and checkpoint["step"] >= end_step:
        return {**gpt2.already_done(args, checkpoint["step"]), "stage": STAGE, "complete": True}
    train_set, val_set, counts = fit_data(args, train_talks, val_talks, model.config.block_size)
    gpt2.prepare_run_dir(args, checkpoint)
    if ddp:  # join the other ranks: NCCL moves gradients GPU to GPU, gloo is the CPU's backend
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32, as in gpt2.py
    # Autocast as in gpt2.py: bfloat16 (float16 on older GPUs) where safe, the weights float32.
    half = dtype if dtype != torch.float32 else None  # None: float32 throughout
    autocast = torch.autocast(device.type, dtype=dtype, enabled=half is not None)
    common.print_header(device, world_size)
    gpt2.print0(f"data {args.data}: {counts['train_conversations']:,} training and "
                f"{counts['val_conversations']:,} validation conversations; {counts['cut']} cut "
                f"at a turn to fit the context of {model.config.block_size} tokens, "
                f"{counts['dropped']} dropped")

    model.to(device)
    optimizer = model.configure_optimizer(args.lr, args.weight_decay, device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    loader = ConversationLoader(train_set, args.examples_per_step, args.batch_size, rank,
                                world_size, args.seed)
    start_step = gpt2.restore_training(
        checkpoint, "--data, --seed, --examples-per-step, --train-examples", optimizer=optimizer,
        scaler=scaler, loader=loader) if checkpoint else 0
    use_compile = device.type == "cuda" if args.compile is None else args.compile
    loss_model = AssistantLoss(model)  # the masked loss; the task accuracy runs on `model`
    loss_model = torch.compile(loss_model) if use_compile else loss_model
    train_model = (DDP(loss_model, device_ids=[device.index] if device.type == "cuda" else None)
                   if ddp else loss_model)
    micro_steps = args.examples_per_step // (args.batch_size * world_size)
    gpt2.print0(f"preset {args.preset}: {model.config} from {args.init_from}; {args.batch_size} "
                f"conversations a micro-batch on {world_size} rank(s), {micro_steps} "
                f"micro-step(s) = {args.examples_per_step} a step; {dtype}, compile "
                f"{use_compile}" + (f"; resumed at step {start_step}" if checkpoint else ""))
    # The base model's held-out task accuracy, measured once and kept in every checkpoint.
    evaluate_tasks = functools.partial(task_accuracy, model, tasks or [], autocast, rank,
                                       world_size)
    base = checkpoint["base_task_accuracy"] if checkpoint else (evaluate_tasks() if tasks
                                                                 else None)
    if base and not checkpoint:
        gpt2.print0("base model's task accuracy (greedy exact match, held-out): "
                    + ", ".join(f"{k} {v:.3f}" for k, v in base.items()))
    model.train()
    log = common.Log(args.out_dir / "log.jsonl", keep_before=start_step, write=master)
    save = (functools.partial(save_checkpoint, args, model, optimizer, scaler, loader, base)
            if master else lambda step: None)
    timer, stopped = common.StepTimer(args.examples_per_step), None
    with common.StopSignals() as signals:
        for step in range(start_step, end_step + 1):
            last = step == end_step  # --max-steps, or --stop-step to go on later with --resume
            if step > start_step and (last or args.checkpoint_every and
                                      step % args.checkpoint_every == 0):
                save(step)  # before evaluating: what the first `step` steps made
            if last or args.eval_every and step % args.eval_every == 0:
                val_loss = estimate_loss(loss_model, val_set, args.batch_size, args.eval_batches,
                                         device, autocast, rank, world_size)
                log({"step": step, "val_loss": val_loss})
                common.print_step(step, f"val loss {val_loss:.4f}")
            if last:
                break

            timer.start()
            lr = gpt2.learning_rate(step, args.lr, args.warmup_steps, args.max_steps,
                                    args.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro_batches, n_targets = loader.next_step()
            train_loss, norm, stop = train_step(train_model, optimizer, scaler, micro_batches,
                                                n_targets, device, autocast, args.grad_clip,
                                                signals.received is not None)
            if not math.isfinite(train_loss):
                gpt2.stop_on_bad_loss(train_loss, step, args.out_dir / "checkpoint.pt", log)
            timing = timer.stop(step)
            log({"step": step, "train_loss": train_loss, "lr": lr, "grad_norm": norm,
                 "ms": timing["ms"]})
            common.print_step(step, f"loss {train_loss:.6f}", f"lr {lr:.4e}", f"norm {norm:.4f}",
                              f"{timing['ms']:.1f} ms")
            if stop:  # no evaluation now: a machine that is going away gives a minute or two
                stopped = gpt2.stop_and_save(signals, save, step + 1, args.out_dir)
                break
    log.close()
    steps_done = start_step + len(timer.rates)
    stopped = stopped or gpt2.paused(args, steps_done)
    # The lesson's measure: the held-out tasks answered after fine-tuning, once, at the end.
    final = evaluate_tasks() if tasks and steps_done == args.max_steps else None
    if final:
        gpt2.print0("task accuracy after fine-tuning (greedy exact match, held-out): "
                    + ", ".join(f"{k} {v:.3f}" for k, v in final.items()))
    val_losses = [r["val_loss"] for r in log.records if "val_loss" in r]
    metrics = {"stage": STAGE, "preset": args.preset, "init_from": str(args.init_from),
               "data": str(args.data), "config": vars(model.config), "stopped": stopped,
               "steps_done": steps_done, "world_size": world_size, "device": str(device),
               "dtype": str(dtype)[6:], "compile": use_compile, "seconds": timer.seconds(),
               "val_loss": val_losses[-1] if val_losses else None,
               "task_accuracy": final and final["overall"],
               "task_accuracy_by_kind": final and {k: final[k] for k in TASK_KINDS},
               "base_task_accuracy": base and base["overall"],
               "base_task_accuracy_by_kind": base and {k: base[k] for k in TASK_KINDS},
               "task_n": len(tasks) if tasks else 0, **counts, **common.summarize(log.records)}
    gpt2.print0(f"{steps_done} steps in {metrics['seconds']} s" + (
        f", val loss {metrics['val_loss']:.4f}" if val_losses else "")
        + f"; outputs in {args.out_dir}")
    if master:
        title = f"chat.py --preset {args.preset} on {args.data}"
        metrics["figure"] = draw_figure(args.out_dir / "chat.png", log.records, base or {},
                                        final or {}, title)
        common.write_json(args.out_dir / "metrics.json", metrics)
    gpt2.end_ranks()
    return metrics


# --- command line

# The training defaults of each preset; a flag overrides any value.
PRESETS = {
    # gpt2.py's `cpu` checkpoint on the bundled task mix: under 10 minutes on 2 CPU cores.
    "cpu": dict(init_from="out/gpt2/checkpoint.pt", data="tasks", batch_size=32,
                examples_per_step=32, max_steps=1800, warmup_steps=30, lr=3e-3, eval_every=300,
                eval_batches=8, checkpoint_every=0),
    # OpenAI's GPT-2 124M on HuggingFaceTB/smol-smoltalk (the SFT mix of SmolLM2's small
    # models), at SmolLM-Instruct's SFT learning rate (3e-4, HuggingFaceTB's SmolLM model card).
    "gpt2": dict(init_from="gpt2", data="HuggingFaceTB/smol-smoltalk", batch_size=16,
                 examples_per_step=64, max_steps=6000, warmup_steps=200, lr=3e-4,
                 eval_every=250, eval_batches=20, checkpoint_every=500),
}


def parse_args(argv=None):
    parser = common.make_parser(STAGE, "Fine-tune a GPT-2 into an assistant, or chat with one.",
                                None, "tasks (the bundled task mix), a .jsonl of "
                                '{"messages": [...]} rows, a folder of them, or a hub dataset '
                                "name " + common.by_preset(PRESETS, "data"), seed=1337)
    preset = functools.partial(common.by_preset, PRESETS)
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu",
                        help="training defaults: cpu (gpt2.py's cpu checkpoint, the task mix) or "
                        "gpt2 (OpenAI's 124M, smol-smoltalk; a GPU); a flag overrides its value "
                        "(default: cpu)")
    parser.add_argument("--init-from", help="the model to fine-tune: a gpt2.py, chat.py or rl.py "
                        "checkpoint, a Hugging Face GPT-2 folder or hub name (gpt2); with --chat/"
                        "--prompt/--export-hf, the fine-tuned model (default: "
                        "<out-dir>/checkpoint.pt)")
    train = parser.add_argument_group("training")
    train.add_argument("--max-steps", type=int,
                       help="optimizer steps; the cosine ends here " + preset("max_steps"))
    train.add_argument("--batch-size", type=int, help="conversations per micro-batch and rank "
                       + preset("batch_size"))
    train.add_argument("--examples-per-step", type=int, help="conversations per optimizer step, "
                       "over ranks and micro-steps " + preset("examples_per_step"))
    train.add_argument("--lr", type=float, help="peak learning rate " + preset("lr"))
    train.add_argument("--warmup-steps", type=int,
                       help="steps of linear warmup to --lr " + preset("warmup_steps"))
    train.add_argument("--eval-every", type=int, help="steps between validation losses, 0: only "
                       "at the end " + preset("eval_every"))
    train.add_argument("--eval-batches", type=int, help="validation batches in each loss "
                       "estimate, always the same ones " + preset("eval_batches"))
    train.add_argument("--checkpoint-every", type=int, help="steps between checkpoints, 0: only "
                       "at the end " + preset("checkpoint_every"))
    train.add_argument("--min-lr-ratio", type=float, default=0.1,
                       help="the cosine ends at lr x this (default: %(default)s)")
    train.add_argument("--weight-decay", type=float, default=0.0,
                       help="AdamW weight decay of the matrices; fine-tuning usually takes none "
                       "(default: %(default)s)")
    train.add_argument("--grad-clip", type=float, default=1.0,
                       help="clip the gradient's global norm to this (0: off; default: 1.0)")
    train.add_argument("--stop-step", type=int, help="stop (and save) after this step; --resume "
                       "goes on")
    train.add_argument("--resume", nargs="?", const="", metavar="CHECKPOINT",
                       help="continue from a checkpoint (default: <out-dir>/checkpoint.pt)")
    train.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                       default="auto", help="autocast dtype; auto: bfloat16 on GPUs that have "
                       "it, float16 with a gradient scaler on older ones, float32 elsewhere")
    train.add_argument("--compile", action=argparse.BooleanOptionalAction,
                       help="torch.compile the training step (default: on with CUDA)")
    data = parser.add_argument_group("data")
    data.add_argument("--train-examples", type=int, default=40000,
                      help="task mix: training conversations to generate (default: %(default)s)")
    data.add_argument("--task-n", type=int, default=200,
                      help="task mix: held-out questions, never trained on (default: %(default)s)")
    data.add_argument("--val-fraction", type=float, default=0.01,
                      help="files and hub: the share of conversations kept for validation "
                      "(default: %(default)s)")
    data.add_argument("--split", default="train",
                      help="hub dataset: the split to read (default: %(default)s)")
    talk_group = parser.add_argument_group("chat (no training)")
    talk_group.add_argument("--chat", action="store_true", help="chat in the terminal, a "
                            "message a line from standard input (a pipe works)")
    talk_group.add_argument("--prompt", help="answer this one message and exit")
    talk_group.add_argument("--system", help="a system message that starts the conversation")
    talk_group.add_argument("--max-new-tokens", type=int, default=256,
                            help="longest reply in tokens (default: %(default)s)")
    talk_group.add_argument("--temperature", type=float, default=0.6,
                            help="divide the logits by this before sampling; 0: greedy "
                            "(default: %(default)s)")
    talk_group.add_argument("--top-k", type=int, default=50,
                            help="sample among the k likeliest tokens (0: all; default: "
                            "%(default)s)")
    parser.add_argument_group("export (no training)").add_argument(
        "--export-hf", type=common.path_flag, metavar="DIR", help="write the model, GPT-2's "
        "tokenizer with the chat tokens and the chat template as a folder that transformers and "
        "vLLM load (into a folder that holds files only with --overwrite)")
    args = parser.parse_args(argv)
    given = args.init_from  # --chat, --prompt, --export-hf: the fine-tuned model, not the base
    args = common.use_preset(args, PRESETS)
    if args.chat or args.prompt is not None or args.export_hf:
        args.init_from = given
    common.check_args(args, positive=("max_steps", "batch_size", "examples_per_step", "lr",
                                      "eval_batches", "train_examples", "task_n",
                                      "max_new_tokens"),
                      non_negative=("warmup_steps", "eval_every", "checkpoint_every", "top_k",
                                    "stop_step"),
                      ranges=(("lr", 0, 10), ("min_lr_ratio", 0, 1), ("weight_decay", 0, 10),
                              ("grad_clip", 0, math.inf), ("temperature", 0, 100),
                              ("val_fraction", 0, 0.5)))
    if sum([args.chat, args.prompt is not None, args.export_hf is not None]) > 1:
        die("--chat, --prompt and --export-hf are separate modes; give one of them")
    if args.prompt is not None and not args.prompt.strip():
        die("--prompt is empty; give the message to answer")
    if args.system is not None and not args.system.strip():
        die("--system is empty; give the system message or drop the flag")
    return args


if __name__ == "__main__":
    main(parse_args())
