"""Stage 8: serving, many clients at once, through continuous batching and an OpenAI-style API.

gpt2.py samples one batch of equal prompts and waits for the batch to end; chat.py answers one
person. A server meets many people at once, each arriving at their own moment with prompts and
replies of their own lengths. Static batching (wait for a batch, pad it, run it to its longest
reply) leaves most of the batch idle. Continuous batching (Yu et al., 2022, "Orca"; vLLM and
nano-vllm after it) schedules per token instead: the engine below keeps --max-batch slots over
one KV cache, and at every step lets new requests into free slots, runs one forward pass for
every slot at its own position (the new prompts' prefills ride in the same pass as the others'
next tokens), samples each with its own settings and frees the finished ones.
A request never waits for another to end; with temperature 0 it gets exactly the tokens of
gpt2.GPT.generate on its prompt alone, whatever else runs beside it.

Around the engine: an OpenAI-compatible HTTP API (FastAPI + uvicorn), so the official `openai`
client works unchanged (/v1/completions, /v1/chat/completions for chat.py checkpoints, streaming,
/v1/embeddings, /v1/models, /health), and a page at / (serve.html, beside this file): chat
with a chat model, text completion with a base one. A completion is raw text in, raw text out,
on a chat model too: a special token comes out as its name ("<|assistant_end|>"), so the text
holds every token its usage counts but the <|endoftext|> that ends it. SIGTERM or Ctrl-C
drains: no new connections, and the requests in flight have --drain-seconds to finish; any
still unfinished then end with an error (a stream: an error event in OpenAI's shape, then
[DONE]; any other: 503), a log line each, counted in the last line.

Run:
    python serve.py --init-from out/chat/checkpoint.pt     # or a gpt2.py checkpoint, or gpt2
    open http://127.0.0.1:8000/ , or from Python:
        from openai import OpenAI
        client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
        client.completions.create(model="chat", prompt="Hello", max_tokens=16)
    python bench.py serve     # the engine against one-at-a-time and transformers' static batches
On 2 CPU cores (Intel Xeon, torch 2.13, float32, 2026-12-02), 32 requests on GPT-2 124M's
shape: 111.9 output tokens/s with 16 clients at once, 3.77x the same requests one at a time and
1.99x transformers' static batches of 16, median time to first token 0.28 s against 5.68 s. The
table and what this server is not for are in README.md (Serving).
"""
import argparse
import asyncio
import base64
import errno
import itertools
import json
import math
import os
import queue
import random
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from fastapi import APIRouter, FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from torch.nn.attention import SDPBackend, sdpa_kernel

import chat
import common
import fineweb
import gpt2
from common import die

STAGE = "serve"


# --- the engine

@dataclass
class Request:
    """One generation: its prompt and settings, where its tokens go, and its progress."""
    prompt: list  # token ids
    max_tokens: int
    deliver: object  # deliver(event) is called from the engine's thread with each event (a dict)
    temperature: float = 1.0  # 0: the likeliest token
    top_p: float = 1.0  # sample among the likeliest tokens that hold this much probability
    top_k: int = 0  # sample among the k likeliest (0: all)
    seed: int = None  # the same seed, the same text, alone or in company
    stop: list = field(default_factory=list)  # strings that end the text (not included)
    stop_tokens: frozenset = frozenset()  # tokens that end it (not included)
    decode: object = None  # its tokens' text, decode(tokens) (None: the engine's)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    cancelled: bool = False  # set by the client's side: the engine frees its slot
    output: list = field(default_factory=list)  # the tokens generated so far
    text: str = ""  # their text, without a stop token or anything from a stop string on
    sent: int = 0  # characters of `text` already delivered
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float = None
    generator: torch.Generator = None


def gpt2_text(tokens):
    """The text of GPT-2 tokens; the special and padded ids past its 50,257 have none."""
    enc = chat.encoding()
    return enc.decode([t for t in tokens if t < enc.n_vocab])


class Stopped(RuntimeError):
    """submit() after stop(): the server is shutting down."""


class Engine:
    """Continuous batching over `max_batch` slots. One KV cache holds every slot's keys and
    values: (layers, slots, heads, context, head size). Its loop, in a thread of its own, repeats
    step(): pack the running slots to the front, admit waiting requests into the free slots
    after them, one forward pass for all (the new prompts' prefills and the others' next
    tokens), sample, deliver, free. Requests come in through a thread-safe queue (submit);
    each goes out through its own deliver callback."""

    def __init__(self, model, max_batch=16, max_queue=256, decode=None, log=print, seed=None,
                 step_tokens=512):
        self.model, self.max_batch, self.log = model, max_batch, log
        self.step_tokens = step_tokens  # prompt tokens admitted per step (see admit)
        self.seeds = random.Random(seed)  # the seeds of requests that bring none
        config, weight = model.config, model.transformer.wte.weight
        self.block_size, self.vocab_size = config.block_size, config.vocab_size
        shape = (config.n_layer, max_batch, config.n_head, config.block_size,
                 config.n_embd // config.n_head)
        self.k = torch.zeros(shape, dtype=weight.dtype, device=weight.device)  # (L, S, nh, T, hs)
        self.v = torch.zeros_like(self.k)  # (L, S, nh, T, hs)
        self.slots = [None] * max_batch  # the request in each slot, None where free
        self.pos = [0] * max_batch  # tokens in each slot's cache
        self.waiting = queue.Queue(max_queue)  # thread-safe: submit() puts, the engine takes
        self.decode = decode or gpt2_text
        self.stopping = threading.Event()
        self.stop_error = "the server stopped before this request finished"
        self.unfinished = 0  # requests that stop() cut short, running or waiting
        self.lock = threading.Lock()  # no request joins the queue after the loop's last look
        self.thread = threading.Thread(target=self.loop, name="engine", daemon=True)

    def submit(self, request):
        """Queue a request for the next free slot; raises queue.Full when --max-queue wait, and
        Stopped once stop() was called."""
        with self.lock:
            if self.stopping.is_set():
                raise Stopped(self.stop_error)
            self.waiting.put_nowait(request)

    def active(self):
        return sum(request is not None for request in self.slots)

    # The loop and its step.

    def start(self):
        self.thread.start()
        return self

    def stop(self, error=None):
        """End the loop; every request still running or waiting ends with an error event
        (`error`, code "server_shutting_down") and a log line, counted in self.unfinished."""
        self.stop_error = error or self.stop_error
        self.stopping.set()
        self.thread.join()

    @torch.no_grad()
    def loop(self):
        # Every step attends over a new length: kernels without cuDNN's per-length plans.
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                          SDPBackend.MATH]):
            while not self.stopping.is_set():
                self.step()
        left = [request for request in self.slots if request is not None]
        self.slots, self.pos = [None] * self.max_batch, [0] * self.max_batch
        with self.lock:  # submit() refuses from now on: nothing is left behind in the queue
            while not self.waiting.empty():
                left.append(self.waiting.get_nowait())
        for request in left:
            if request.cancelled:  # its client left: nobody to tell
                self.end(request, "cancelled")
            else:
                self.unfinished += 1
                self.end(request, error=self.stop_error, code="server_shutting_down")

    def step(self):
        for slot, request in enumerate(self.slots):
            if request is not None and request.cancelled:  # the client is gone
                self.finish(slot, "cancelled")
        running = self.pack()  # slots 0..running-1 decode
        n = self.admit(running)  # slots running..n-1 start: their prompts ride in this forward
        if n == 0:
            return
        try:
            logits = self.forward(running, n)  # (n, V)
        except Exception as err:  # noqa: BLE001 (the engine outlives any request)
            for slot in range(n):
                self.finish(slot, error=f"the forward pass failed: {err}")
            return
        for slot in range(n):
            self.emit(slot, logits[slot])

    def pack(self):
        """Move requests from the last slots into the free ones before them (their cache rows
        too), so that the running slots are 0..n-1 and a step computes n rows, not a row for
        every hole that finished requests left. Returns n."""
        while True:
            active = [slot for slot, request in enumerate(self.slots) if request is not None]
            if not active or len(active) == active[-1] + 1:
                return len(active)
            hole, last = self.slots.index(None), active[-1]
            T = self.pos[last]
            self.k[:, hole, :, :T] = self.k[:, last, :, :T]  # (L, nh, T, hs)
            self.v[:, hole, :, :T] = self.v[:, last, :, :T]
            self.slots[hole], self.pos[hole] = self.slots[last], T
            self.slots[last], self.pos[last] = None, 0

    def admit(self, n):
        """Put waiting requests into the free slots n, n+1, ... until this step holds
        step_tokens prompt tokens (at least one request; the last may go past it). A bigger
        step prefills more prompts per pass; a smaller one makes the running requests wait less
        for their next token. When nothing runs, wait a moment for work, not spinning.
        Returns the number of slots now in use."""
        tokens = 0
        while n < self.max_batch and tokens < self.step_tokens:
            try:
                request = self.waiting.get(block=n == 0, timeout=0.05)
            except queue.Empty:
                break
            if request.cancelled:
                continue
            self.slots[n], self.pos[n] = request, 0
            try:  # a request that cannot start fails alone, before it joins the forward pass
                prompt = request.prompt
                if not 0 < len(prompt) < self.block_size or not 0 <= min(prompt) <= max(
                        prompt) < self.vocab_size:
                    raise ValueError(f"a prompt needs 1 to {self.block_size - 1} token ids "
                                     f"below {self.vocab_size}")
                seed = request.seed if request.seed is not None else self.seeds.getrandbits(63)
                request.generator = torch.Generator(self.k.device).manual_seed(seed)
            except Exception as err:  # noqa: BLE001 (a bad request fails alone)
                self.finish(n, error=f"the request could not start: {err}")
                continue
            tokens += len(request.prompt)
            n += 1
        return n

    # The model: one forward pass for every slot, whether it decodes or starts.

    def forward(self, running, n):
        """gpt2.GPT's blocks for slots 0..n-1 at once; the next-token logits of each (n, V).
        A running slot (0..running-1) feeds its newest token at its own position; a starting
        slot (running..n-1) feeds its whole prompt from position 0: its prefill. All these
        tokens go through the linear layers as one matrix (N, C): the weights, most of the
        work, are read once per step for prefills and decodes together, and a short prompt
        does not run alone through matrices built for many tokens. Only attention tells the
        slots apart (attend, below). A prompt that an earlier starting slot of this step holds
        too (rl.py's G replies to one question, clients sending one prompt together) is
        computed once: its twin copies the keys, values and logits, as vLLM's prefix caching
        shares a prefix."""
        transformer, device, nh = self.model.transformer, self.k.device, self.model.config.n_head
        owner, source = {}, {}  # prompt -> its first starting slot; starting slot -> that slot
        for slot in range(running, n):
            source[slot] = owner.setdefault(tuple(self.slots[slot].prompt), slot)
        fed = list(owner.values())  # the starting slots whose prompts this pass computes
        prompts = [self.slots[slot].prompt for slot in fed]
        tokens = [self.slots[slot].output[-1] for slot in range(running)] + sum(prompts, [])
        positions = self.pos[:running] + [t for p in prompts for t in range(len(p))]
        tokens = torch.tensor(tokens, device=device)  # (N,)
        positions = torch.tensor(positions, device=device)  # (N,)
        # (running, 1, 1, length), added to the running slots' attention scores: 0 where a slot
        # may look (its cache up to its own position), -inf beyond, the same for every head
        length = max(self.pos[:running], default=0) + 1  # the longest running context
        visible = torch.arange(length, device=device) <= positions[:running, None]
        mask = torch.zeros(visible.shape, dtype=self.k.dtype, device=device).masked_fill(
            ~visible, float("-inf"))[:, None, None]
        x = transformer.wte(tokens) + transformer.wpe(positions)  # (N, C)
        N, C = x.shape
        for layer, block in enumerate(transformer.h):
            q, k, v = block.attn.c_attn(block.ln_1(x)).split(C, dim=1)  # 3 x (N, C)
            q, k, v = (t.reshape(N, nh, C // nh) for t in (q, k, v))  # (N, nh, hs) each
            y = self.attend(layer, q, k, v, positions[:running], mask, dict(zip(fed, prompts)))
            x = x + block.attn.c_proj(y.reshape(N, C))  # (N, C)
            x = x + block.mlp(block.ln_2(x))  # (N, C)
        for slot in range(running):
            self.pos[slot] += 1
        # each slot's last row: a running slot's one token, a prompt's last token (its twin's)
        last = dict(zip(fed, (running - 1 + end for end in
                              itertools.accumulate(len(p) for p in prompts))))
        for slot, first in source.items():
            T = self.pos[slot] = len(self.slots[slot].prompt)
            if slot != first:  # a twin: the keys and values its prompt's first slot computed
                self.k[:, slot, :, :T] = self.k[:, first, :, :T]  # (L, nh, T, hs)
                self.v[:, slot, :, :T] = self.v[:, first, :, :T]
        rows = list(range(running)) + [last[first] for first in source.values()]
        return self.model.lm_head(transformer.ln_f(x[rows])).float()  # (n, V)

    def attend(self, layer, q, k, v, positions, mask, prompts):
        """Write the step's keys and values into the cache and attend: the running slots
        together, each to its own cache up to its position (mask hides the longer contexts of
        the others); each prompt ({slot: prompt}) causally within itself, as in
        gpt2.GPT.generate."""
        running, y = len(positions), torch.empty_like(q)  # (N, nh, hs)
        if running:
            slots = torch.arange(running, device=q.device)
            self.k[layer, slots, :, positions] = k[:running]  # (running, nh, hs), each slot
            self.v[layer, slots, :, positions] = v[:running]  # at its own position
            keys = self.k[layer, :running, :, :mask.size(-1)]  # (running, nh, length, hs)
            values = self.v[layer, :running, :, :mask.size(-1)]
            y[:running] = F.scaled_dot_product_attention(
                q[:running, :, None], keys, values, attn_mask=mask)[:, :, 0]  # (running, nh, hs)
        start = running
        for slot, prompt in prompts.items():
            rows, T = slice(start, start + len(prompt)), len(prompt)
            qs, ks, vs = (t[rows].transpose(0, 1) for t in (q, k, v))  # (nh, T, hs) each
            self.k[layer, slot, :, :T], self.v[layer, slot, :, :T] = ks, vs
            y[rows] = F.scaled_dot_product_attention(
                qs[None], ks[None], vs[None], is_causal=T > 1)[0].transpose(0, 1)  # (T, nh, hs)
            start += T
        return y

    # Sampling, delivering and finishing, one request at a time.

    def sample(self, request, logits):
        """A token from logits (V,) with the request's own settings and generator, through
        gpt2.py's sampler (as generate and chat.py pick theirs)."""
        return int(gpt2.sample_next_token(logits[None], request.temperature, request.top_k,
                                          request.top_p, request.generator))

    def emit(self, slot, logits):
        """Sample the slot's next token, deliver its text, and free the slot if it is done."""
        request = self.slots[slot]
        try:
            token = self.sample(request, logits)
        except Exception as err:  # noqa: BLE001 (a bad setting fails its own request only)
            return self.finish(slot, error=f"sampling failed: {err}")
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        request.output.append(token)
        reason = "stop" if token in request.stop_tokens else self.update_text(request)
        if reason is None and (len(request.output) >= request.max_tokens
                               or len(request.prompt) + len(request.output) >= self.block_size):
            reason = "length"  # max_tokens reached, or the context is full
        self.send(request, {"token": token, "text": self.pending_text(request, reason is not None)})
        if reason:
            self.finish(slot, reason)

    def update_text(self, request):
        """Decode the output; a stop string cuts the text before it and ends the request."""
        request.text = (request.decode or self.decode)(request.output)
        cuts = [request.text.find(s) for s in request.stop if s in request.text]
        if cuts:
            request.text = request.text[:min(cuts)]
            return "stop"
        return None

    def pending_text(self, request, final):
        """The text not yet delivered. Before the end, hold back what may still change: a
        tail that could begin a stop string, or a character whose bytes are incomplete."""
        end = len(request.text)
        if not final:
            end -= max((n for s in request.stop for n in range(len(s) - 1, 0, -1)
                        if request.text.endswith(s[:n])), default=0)
            while end > request.sent and request.text[end - 1] == "\ufffd":
                end -= 1
        delta = request.text[request.sent:end]
        request.sent = max(request.sent, end)
        return delta

    def send(self, request, event):
        try:
            request.deliver(event)
        except Exception:  # noqa: BLE001 (nobody listens any more: the request is cancelled)
            request.cancelled = True

    def finish(self, slot, reason=None, error=None):
        """Free the slot and end its request."""
        request, self.slots[slot], self.pos[slot] = self.slots[slot], None, 0
        self.end(request, reason, error)

    def end(self, request, reason=None, error=None, code=None):
        """Tell the client how its request ended (unless it left); log one line."""
        done, n = time.perf_counter(), len(request.output)
        if error:
            self.send(request, {"error": error, "code": code})
        elif reason != "cancelled":
            self.send(request, {"finish": reason, "prompt_tokens": len(request.prompt),
                                "completion_tokens": n})
        first = (f"first token {request.first_token_at - request.arrived:.3f} s"
                 if request.first_token_at else "no token")
        self.log(f"request {request.id}: {len(request.prompt)} prompt + {n} completion tokens, "
                 f"{first}, {n / max(done - request.arrived, 1e-9):.1f} tokens/s, "
                 f"{error or reason}", flush=True)


@torch.no_grad()
def embed(model, token_lists, batch_size=16):
    """One unit vector per input: the mean of the final hidden states (after ln_f) over its
    tokens, L2-normalised. Inputs are right-padded into batches: causal attention never lets a
    real token see the padding after it, and the mean skips it, so batching changes nothing."""
    device = model.transformer.wte.weight.device
    vectors = []
    for start in range(0, len(token_lists), batch_size):
        chunk = token_lists[start:start + batch_size]
        T = max(map(len, chunk))
        idx = torch.zeros(len(chunk), T, dtype=torch.long)  # (B, T), padded with token 0
        mask = torch.zeros(len(chunk), T, 1)  # (B, T, 1), 1 on real tokens
        for row, tokens in enumerate(chunk):
            idx[row, :len(tokens)] = torch.tensor(tokens)
            mask[row, :len(tokens)] = 1
        hidden = model.hidden_states(idx.to(device)).float().cpu()  # (B, T, C)
        mean = (hidden * mask).sum(1) / mask.sum(1)  # (B, C)
        vectors.append(F.normalize(mean, dim=-1))  # (B, C)
    return torch.cat(vectors).tolist()


# --- the API: one handler per route; the engine and the server's settings are on app.state

MAX_BODY = 1 << 20  # bytes of a request body (413 beyond)
PAGE = Path(__file__).with_name("serve.html")  # the chat page at /, shipped beside this file
routes = APIRouter()


def create_app(engine, name, chat_format=None, api_key=None, max_body=MAX_BODY):
    """The HTTP API around a running engine: every generation request becomes an engine
    Request whose events come back through an asyncio queue."""
    app = FastAPI(title="serve.py", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.name, app.state.chat_format = engine, name, chat_format
    app.state.api_key, app.state.max_body = api_key, max_body
    app.add_exception_handler(ApiError, lambda request, err: err.response())
    app.add_exception_handler(HTTPException, lambda request, err: ApiError(
        err.status_code, f"{request.method} {request.url.path}: {err.detail}",
        code=err.status_code).response())
    app.include_router(routes)
    return app


@routes.post("/v1/completions")
async def completions(http: HttpRequest):
    """Raw text in, raw text out, on a chat model too: every token counted is in the text, a
    special token written as its name (chat.decode: "<|assistant_end|>", a padded id as
    "<|50300|>"), as skip_special_tokens=False writes them. The text ends at <|endoftext|>,
    max_tokens or a stop string, which may name a special token: stop="<|assistant_end|>"."""
    body = await read_body(http)
    prompts = token_inputs(body.get("prompt", ""), "prompt")
    settings = sampling(body, 16)  # OpenAI's default max_tokens for completions
    top = head("text_completion", http.app.state.name)
    if body.get("stream"):
        if len(prompts) > 1:
            raise ApiError(400, "stream takes one prompt; send one request per prompt", "prompt")
        job, events = start(http, prompts[0], settings, {fineweb.EOT}, chat.decode)

        def chunk(text, finish):
            if text is None:
                return None  # completions have no opening chunk
            return {**top, "choices": [{"text": text, "index": 0, "logprobs": None,
                                        "finish_reason": finish}]}
        return stream(job, events, chunk, body)
    jobs = []
    try:
        for prompt in prompts:
            jobs.append(start(http, prompt, settings, {fineweb.EOT}, chat.decode))
    except ApiError:
        for job, _ in jobs:  # all or none: the ones already queued would run for nobody
            job.cancelled = True
        raise
    results = await asyncio.gather(*(collect(http, *job) for job in jobs))
    if any(result is None for result in results):
        return JSONResponse({}, 499)  # the client left; nobody reads this
    return {**top, "choices": [{"text": text, "index": i, "logprobs": None,
                                "finish_reason": final["finish"]}
                               for i, (text, final) in enumerate(results)],
            "usage": usage([final for _, final in results])}


@routes.post("/v1/chat/completions")
async def chat_completions(http: HttpRequest):
    body, state = await read_body(http), http.app.state
    if state.chat_format is None:
        raise ApiError(400, f"{state.name} is a base model, not a chat model: "
                       "/v1/chat/completions needs a checkpoint written by chat.py (use "
                       "/v1/completions here)", "model", "not_a_chat_model")
    try:
        prompt = chat.render_prompt(body.get("messages"))
    except ValueError as err:
        raise ApiError(400, f"messages: {err}", "messages") from None
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is not None:
        body["max_tokens"] = body["max_completion_tokens"]
    settings = sampling(body, state.engine.block_size)  # default: until the context is full
    job, events = start(http, prompt, settings, {chat.ASSISTANT_END, fineweb.EOT})
    top = head("chat.completion", state.name)
    if body.get("stream"):
        top["object"] = "chat.completion.chunk"

        def chunk(text, finish):
            delta = ({"role": "assistant", "content": ""} if text is None else
                     {"content": text} if text else {})
            return {**top, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                        "finish_reason": finish}]}
        return stream(job, events, chunk, body)
    result = await collect(http, job, events)
    if result is None:
        return JSONResponse({}, 499)
    text, final = result
    return {**top, "choices": [{"index": 0, "logprobs": None, "finish_reason": final["finish"],
                                "message": {"role": "assistant", "content": text}}],
            "usage": usage([final])}


@routes.post("/v1/embeddings")
async def embeddings(http: HttpRequest):
    body, engine = await read_body(http), http.app.state.engine
    encoding_format = body.get("encoding_format") or "float"
    if encoding_format not in ("float", "base64"):
        raise ApiError(400, "encoding_format must be float or base64", "encoding_format")
    inputs = token_inputs(body.get("input"), "input")
    for tokens in inputs:
        if (not tokens or len(tokens) > engine.block_size or min(tokens) < 0
                or max(tokens) >= engine.vocab_size):
            raise ApiError(400, f"each input must be 1 to {engine.block_size} tokens with "
                           f"ids from 0 to {engine.vocab_size - 1}", "input")
    # In a worker thread: the event loop stays free. The model is only read, so this is safe
    # beside the engine's thread.
    vectors = await asyncio.to_thread(embed, engine.model, inputs)
    if encoding_format == "base64":  # little-endian float32 bytes (the openai client's ask)
        vectors = [base64.b64encode(torch.tensor(v).numpy().tobytes()).decode()
                   for v in vectors]
    n = sum(map(len, inputs))
    return {"object": "list", "model": http.app.state.name,
            "data": [{"object": "embedding", "index": i, "embedding": vector}
                     for i, vector in enumerate(vectors)],
            "usage": {"prompt_tokens": n, "total_tokens": n}}


@routes.get("/v1/models")
async def models(http: HttpRequest):
    check_key(http)
    state = http.app.state  # "chat" (an extension): whether /v1/chat/completions works here
    return {"object": "list", "data": [{"id": state.name, "object": "model", "created": 0,
                                        "owned_by": "serve.py",
                                        "chat": state.chat_format is not None}]}


@routes.get("/health")
async def health(http: HttpRequest):
    engine = http.app.state.engine
    return {"status": "ok", "active": engine.active(), "waiting": engine.waiting.qsize()}


@routes.get("/")
async def page():
    return FileResponse(PAGE, media_type="text/html")


# The handlers' parts: the request's checks, then a generation's way in and out of the engine.

class ApiError(Exception):
    """An error answered with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error",
                 headers=None):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind
        self.headers = headers

    def body(self):
        return {"error": {"message": str(self), "type": self.kind, "param": self.param,
                          "code": self.code}}

    def response(self):
        return JSONResponse(self.body(), self.status, headers=self.headers)


def check_key(http):
    """401 unless the request carries the server's --api-key (when it has one)."""
    api_key = http.app.state.api_key
    if api_key is not None and http.headers.get("authorization") != f"Bearer {api_key}":
        raise ApiError(401, "a missing or wrong API key: send Authorization: Bearer <key> "
                       "with the server's --api-key", code="invalid_api_key")


async def read_body(http):
    """The JSON body, after the key and the size are checked."""
    check_key(http)
    max_body, name = http.app.state.max_body, http.app.state.name
    too_large = ApiError(413, f"the request body is larger than {max_body:,} bytes",
                         code="request_too_large")
    if int(http.headers.get("content-length") or 0) > max_body:
        raise too_large
    raw = await http.body()
    if len(raw) > max_body:
        raise too_large
    try:
        body = json.loads(raw)
    except ValueError:
        raise ApiError(400, "the request body is not JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if body.get("model") not in (None, name):
        raise ApiError(400, f"unknown model {str(body['model'])[:80]!r}; this server serves "
                       f"{name!r} (GET /v1/models)", "model", "model_not_found")
    return body


def number(body, name, default, low, high, integer=False, open_low=False):
    """body[name] (default when absent or null), checked to lie in [low, high] (or (low, high])."""
    value = body.get(name)
    if value is None:
        return default
    kind = int if integer else (int, float)
    inside = (isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
              and (low < value if open_low else low <= value) and value <= high)
    if not inside:
        what = "an integer" if integer else "a number"
        if not integer:  # integers in full: 1048576, not 1.04858e+06
            low, high = f"{low:g}", f"{high:g}"
        where = f"{'(' if open_low else '['}{low}, {high}]"
        raise ApiError(400, f"{name} must be {what} in {where}, got {json.dumps(value)}", name)
    return value


def sampling(body, max_tokens):
    """The generation settings of a request body, checked (400 names the bad one)."""
    if body.get("n") not in (None, 1):
        raise ApiError(400, "n must be 1 (send several requests for several completions)", "n")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if (not isinstance(stop, list) or len(stop) > 4
            or not all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, "stop must be a non-empty string or a list of at most 4", "stop")
    if not isinstance(body.get("stream_options") or {}, dict):
        raise ApiError(400, "stream_options must be an object, such as "
                       '{"include_usage": true}', "stream_options")
    return dict(max_tokens=number(body, "max_tokens", max_tokens, 1, 1 << 20, integer=True),
                temperature=number(body, "temperature", 1.0, 0, 2),
                top_p=number(body, "top_p", 1.0, 0, 1, open_low=True),
                top_k=max(0, number(body, "top_k", 0, -1, 1 << 20, integer=True)),  # -1: off
                seed=number(body, "seed", None, -(1 << 63), (1 << 64) - 1, integer=True),
                stop=stop)


def token_inputs(value, name):
    """A string, a list of strings, a list of token ids or a list of lists of them, as lists
    of token ids (OpenAI accepts all four for prompts and embedding inputs)."""
    def is_tokens(x):
        return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                           for t in x)
    if isinstance(value, str) or (is_tokens(value) and value):
        value = [value]
    if not isinstance(value, list) or not value or not all(
            isinstance(x, str) or is_tokens(x) for x in value):
        raise ApiError(400, f"{name} must be a string, a list of strings or token ids", name)
    return [chat.encode_text(x) if isinstance(x, str) else x for x in value]


def start(http, prompt, settings, stop_tokens, decode=None):
    """Submit one generation; (the engine Request, the asyncio queue of its events)."""
    engine = http.app.state.engine
    if not prompt:
        prompt = [fineweb.EOT]  # an empty prompt starts where every document starts
    if len(prompt) >= engine.block_size:
        raise ApiError(400, f"the prompt is {len(prompt)} tokens; this model's context is "
                       f"{engine.block_size}, with room for at least one new token: shorten it",
                       "prompt", "context_length_exceeded")
    if max(prompt) >= engine.vocab_size or min(prompt) < 0:
        raise ApiError(400, f"token ids must lie in [0, {engine.vocab_size})", "prompt")
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    request = Request(prompt=prompt, stop_tokens=frozenset(stop_tokens), decode=decode, **settings,
                      deliver=lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
    try:
        engine.submit(request)
    except queue.Full:
        raise ApiError(503, f"the server is busy: {engine.waiting.maxsize} requests are waiting "
                       "already; retry shortly", kind="server_error", code="overloaded",
                       headers={"Retry-After": "1"}) from None
    except Stopped as err:
        raise shutting_down(str(err)) from None
    return request, events


def shutting_down(message):
    return ApiError(503, message, kind="server_error", code="server_shutting_down")


def engine_error(event):
    """An engine's error event as an ApiError: 503 when shutdown cut the request, else 500."""
    if event.get("code") == "server_shutting_down":
        return shutting_down(event["error"])
    return ApiError(500, event["error"], kind="server_error", code=event.get("code"))


async def collect(http, job, events):
    """A whole completion: (text, final event); cancelled if the client leaves first."""
    parts = []
    try:
        while True:
            try:
                event = await asyncio.wait_for(events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    return None
                continue
            if "error" in event:
                raise engine_error(event)
            parts.append(event.get("text", ""))
            if "finish" in event:
                return "".join(parts), event
    finally:
        job.cancelled = True  # frees the slot if it still runs; harmless once finished


def stream(job, events, chunk, body):
    """Server-sent events: one chunk per piece of text, a last one with finish_reason (and
    usage when stream_options.include_usage asks), then [DONE]. Closing the stream (the client
    left) cancels."""
    include_usage = (body.get("stream_options") or {}).get("include_usage")

    async def generate():
        try:
            yield f"data: {json.dumps(chunk(None, None))}\n\n" if chunk(None, None) else ""
            while True:
                event = await events.get()
                if "error" in event:  # the status is sent already: the error goes in the stream
                    yield f"data: {json.dumps(engine_error(event).body())}\n\n"
                    break
                if event.get("text"):
                    yield f"data: {json.dumps(chunk(event['text'], None))}\n\n"
                if "finish" in event:
                    yield f"data: {json.dumps(chunk('', event['finish']))}\n\n"
                    if include_usage:
                        last = {**chunk("", None), "choices": [], "usage": usage([event])}
                        yield f"data: {json.dumps(last)}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled = True
    return StreamingResponse(generate(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


def usage(finals):
    prompt = sum(f["prompt_tokens"] for f in finals)
    completion = sum(f["completion_tokens"] for f in finals)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def head(kind, name):
    """The fields every completion and chunk starts with."""
    return {"id": f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": kind, "created": int(time.time()), "model": name}


# --- main

def model_name(source):
    """The name /v1/models gives: the checkpoint's folder (out/chat/checkpoint.pt: chat), a
    folder's or file's own name, or the hub name."""
    path = Path(source)
    if path.name == "checkpoint.pt":
        return path.resolve().parent.name
    if path.is_file():
        return path.stem
    return path.resolve().name if path.exists() else path.name  # "." is its folder's name


def kv_cache_or_die(config, slots, device, dtype, flag):
    """die() naming `flag` if the engine's KV cache for `slots` would not fit in the device's
    memory (a GPU's free memory, else the machine's RAM): one line now rather than an
    out-of-memory traceback, or a kill once the cache fills."""
    need = 2 * config.n_layer * slots * config.block_size * config.n_embd * dtype.itemsize
    if device.type == "cuda":
        have = torch.cuda.mem_get_info(device)[0]
    elif hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    else:
        return
    if need > have:
        die(f"{flag} {slots}: the KV cache of {slots} contexts of {config.block_size} tokens "
            f"needs {need / 2**30:,.1f} GiB, more than the {have / 2**30:,.1f} GiB of {device}'s "
            f"memory; lower {flag}")


def main(args):
    device = common.pick_device(args.device, threads=args.threads)
    dtype = gpt2.pick_dtype(args.dtype, device)
    sock = listen(args.host, args.port)  # first: a taken port is one line before the model loads
    common.print_header(device)
    model, chat_format = chat.load_chat_model(args.init_from, device)
    model.to(dtype)  # inference only: the weights themselves in bf16 on a GPU, no autocast
    kv_cache_or_die(model.config, args.max_batch, device, dtype, "--max-batch")
    name = args.model_name or model_name(args.init_from)
    engine = Engine(model, args.max_batch, args.max_queue, seed=args.seed,
                    step_tokens=args.step_tokens)
    app = create_app(engine, name, chat_format, args.api_key, args.max_body)

    import uvicorn
    host, port = sock.getsockname()[:2]
    params = sum(p.numel() for p in model.parameters())
    page = ("chat page at /" if chat_format else
            "page at / continues text (a base model; chat needs a chat.py checkpoint)")
    print(f"serving {name} ({'chat' if chat_format else 'base'} model, {params:,} parameters, "
          f"context {model.config.block_size}) on http://{host}:{port} with {args.max_batch} "
          f"slots, {device} {str(dtype).removeprefix('torch.')}; {page}, API at /v1; Ctrl-C "
          "or SIGTERM drains and stops", flush=True)
    engine.start()
    # uvicorn turns SIGINT/SIGTERM into a graceful shutdown (no new connections; those in
    # flight finish) and then raises the signal again: these handlers take that second
    # delivery, so the process exits 0. The drain's end is ours (end_drain); uvicorn's own
    # deadline, later, is a last resort only: it cancels handlers mid-response.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=args.drain_seconds + 10))
    threading.Thread(target=end_drain, args=(server, engine, args.drain_seconds),
                     name="drain", daemon=True).start()
    server.run(sockets=[sock])
    engine.stop()
    n = engine.unfinished
    print(f"stopped ({n} request{'' if n == 1 else 's'} unfinished"
          f"{': --drain-seconds ran out' if n else ''})", flush=True)
    return {"host": host, "port": port, "unfinished": n}


def listen(host, port):
    """The server's socket, or one line naming the flag to change."""
    where = f"{host}:{port}" if port else host  # port 0 is any free one: nothing to name
    try:  # resolved first: a bad address is not a busy port
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        die(f"--host {host} is not a valid address (neither an IP address nor a name this "
            "machine can resolve); use 127.0.0.1 (this machine only), 0.0.0.0 (every "
            "interface) or one of this machine's addresses")
    try:
        return socket.create_server((host, port), backlog=2048)
    except OSError as err:
        flag = {errno.EADDRINUSE: "--port", errno.EACCES: "--port",
                errno.EADDRNOTAVAIL: "--host"}.get(err.errno, "--port or --host")
        die(f"cannot listen on {where} ({os.strerror(err.errno or 0)}); choose another {flag}")


def end_drain(server, engine, seconds):
    """--drain-seconds after uvicorn's graceful shutdown begins, stop the engine: a request
    still running or waiting then ends as the API says (a stream with an error chunk and
    [DONE], any other request with 503), so its connection closes cleanly."""
    while not server.should_exit:
        time.sleep(0.05)
    time.sleep(seconds)
    engine.stop(f"the server shut down before this request finished (--drain-seconds "
                f"{seconds:g} ran out); send it again")


# --- command line

def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog=f"{STAGE}.py", description="Serve a model over an "
                                     "OpenAI-compatible HTTP API.")
    parser.error = die  # argparse's own complaints: one line, exit 2, like every mistake
    parser.add_argument("--init-from", required=True, help="a chat.py, rl.py or gpt2.py "
                        "checkpoint (a file, or the folder that holds its checkpoint.pt), a "
                        "Hugging Face GPT-2 folder, or a hub name such as gpt2")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: %(default)s, this machine only)")
    parser.add_argument("--port", type=int, default=8000,
                        help="port (default: %(default)s; 0: any free one)")
    parser.add_argument("--max-batch", type=int, default=16,
                        help="slots: requests generated together (default: %(default)s)")
    parser.add_argument("--step-tokens", type=int, default=512,
                        help="prompt tokens a step admits (at least one prompt); more: faster "
                        "prefills, fewer: steadier tokens for the running requests (default: "
                        "%(default)s)")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="requests that may wait for a slot; more get 503 (default: "
                        "%(default)s)")
    parser.add_argument("--api-key", help="require Authorization: Bearer <key> on /v1 "
                        "(default: none, no key asked)")
    parser.add_argument("--max-body", type=int, default=MAX_BODY,
                        help="largest request body in bytes; larger gets 413 (default: "
                        "%(default)s)")
    parser.add_argument("--drain-seconds", type=float, default=30.0,
                        help="on SIGTERM or Ctrl-C, time for requests in flight to finish; "
                        "those still unfinished then end with an error (a stream: an error "
                        "event, then [DONE]; others: 503) (default: %(default)s)")
    parser.add_argument("--model-name", help="the model's id in the API (default: from "
                        "--init-from)")
    parser.add_argument("--device", default="auto",
                        help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps "
                        "(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch's CPU threads (default: 0, one per core)")
    parser.add_argument("--seed", type=int, help="seed of the requests that bring none (default: "
                        "a new one at each start)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                        default="auto", help="weights' dtype; auto: float32 on CPU, bfloat16 on "
                        "GPUs that have it, float16 on older ones (default: %(default)s)")
    args = parser.parse_args(argv)
    common.check_args(args, positive=("max_batch", "step_tokens", "max_queue", "max_body"),
                      non_negative=("drain_seconds",), ranges=(("port", 0, 65535),))
    if args.api_key is not None and not args.api_key.strip():
        die("--api-key is empty; give a key or leave the flag out")
    return args


if __name__ == "__main__":
    main(parse_args())
