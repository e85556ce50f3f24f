"""serve.py: the engine gives each request exactly what gpt2.GPT.generate gives it alone, whatever
else runs; the API works with the official openai client, answers every error with OpenAI's body
and status, survives 32 clients at once, frees the slot of a client that leaves, and drains on
SIGTERM. A tiny random-weight model written to tmp_path; servers on 127.0.0.1, on a free port."""
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict

import httpx
import pytest
import torch

import chat
import fineweb
import gpt2
import serve
from conftest import ROOT

CONFIG = gpt2.GPTConfig(block_size=1024, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)


def tiny_model(seed=0):
    """Random weights, attention's scaled up: at GPT-2's initial scale every attention score is
    about 0 and attention adds almost nothing to the residual stream, so that the next token
    would hang on the last one alone and no test would notice a wrong key or value in a cache."""
    torch.manual_seed(seed)
    model = gpt2.GPT(CONFIG).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight[:2 * CONFIG.n_embd] *= 30  # the q and k rows
            block.attn.c_proj.weight *= 30
    return model


def write_checkpoint(path, model, chat_format=None):
    """A gpt2.py checkpoint, or a chat.py one when chat_format is given."""
    checkpoint = {"stage": "chat" if chat_format else "gpt2", "model": model.state_dict(),
                  "config": asdict(model.config)}
    if chat_format:
        checkpoint["chat_format"] = chat_format
    torch.save(checkpoint, path)
    return path


def greedy(model, prompt, n):
    idx = torch.tensor([prompt], device=model.transformer.wte.weight.device)  # (1, T)
    return model.generate(idx, n, temperature=0)[0, len(prompt):].tolist()


def decode(tokens):
    enc = fineweb.get_encoding()
    return enc.decode([t for t in tokens if t < enc.n_vocab])


# --- the engine, in this process

def run_engine(engine, requests, delays=None):
    """Submit each request (after its delay, from a thread of its own, as clients would) and
    wait for all; returns each one's events."""
    events = [queue.Queue() for _ in requests]
    for request, inbox in zip(requests, events):
        request.deliver = inbox.put

    def client(i):
        time.sleep(delays[i] if delays else 0)
        engine.submit(requests[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    results = []
    for inbox in events:
        got = []
        while not got or not ({"finish", "error"} & set(got[-1])):
            got.append(inbox.get(timeout=60))
        results.append(got)
    for thread in threads:
        thread.join()
    return results


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture
def engine(model):
    engine = serve.Engine(model, max_batch=3, log=lambda *a, **k: None).start()
    yield engine
    engine.stop()


def test_engine_greedy_equals_generate_with_staggered_arrivals(model, engine):
    """Temperature 0: every request gets generate's tokens for its prompt alone, although
    requests arrive while others decode, wait for one of 3 slots, and differ in prompt length
    and max_tokens."""
    g = torch.Generator().manual_seed(1)
    lengths, max_tokens = [5, 40, 1, 17, 90, 3, 26, 8], [30, 6, 45, 12, 20, 35, 4, 25]
    prompts = [torch.randint(0, 50257, (n,), generator=g).tolist() for n in lengths]
    requests = [serve.Request(prompt=p, max_tokens=m, temperature=0, deliver=None)
                for p, m in zip(prompts, max_tokens)]
    results = run_engine(engine, requests, delays=[0.01 * i for i in range(len(requests))])
    for request, events, prompt, n in zip(requests, results, prompts, max_tokens):
        assert events[-1]["finish"] == "length" and events[-1]["completion_tokens"] == n
        assert request.output == greedy(model, prompt, n)
        assert [e["token"] for e in events[:-1]] == request.output  # one event per token
    assert engine.active() == 0 and engine.waiting.qsize() == 0


def test_engine_packs_slots_when_requests_finish_out_of_order(model):
    """When a request in a front slot ends with nobody waiting, the last slot's request (and its
    cache) moves into the hole; it still gets exactly generate's tokens."""
    prompts, max_tokens = [[5, 6], list(range(700, 760)), [9] * 7], [2, 30, 24]
    finished = queue.Queue()
    requests = [serve.Request(prompt=p, max_tokens=m, temperature=0,
                              deliver=lambda event: "finish" in event and finished.put(event))
                for p, m in zip(prompts, max_tokens)]
    engine = serve.Engine(model, max_batch=3, log=lambda *a, **k: None)
    for request in requests:  # queued before the engine starts: slots 0, 1, 2 in this order
        engine.submit(request)
    slot_of_third = []
    forward = engine.forward  # the third request's slot at each step's forward pass
    engine.forward = lambda running, n: (slot_of_third.append(
        engine.slots.index(requests[2]) if requests[2] in engine.slots else None),
        forward(running, n))[1]
    engine.start()
    for _ in requests:
        finished.get(timeout=60)
    engine.stop()
    assert slot_of_third[0] == 2 and 0 in slot_of_third  # it moved into the first one's slot
    for request, prompt, n in zip(requests, prompts, max_tokens):
        assert request.output == greedy(model, prompt, n)


def test_engine_prefills_ride_with_decodes_within_the_step_budget(model):
    """Prompts join a step until it holds step_tokens prompt tokens (at least one prompt), and
    the running slots decode in the same forward pass; every request still gets generate's
    tokens."""
    prompts, max_tokens = [[5] * 5, list(range(300, 306)), [7, 8] * 4], [12, 9, 10]
    finished = queue.Queue()
    requests = [serve.Request(prompt=p, max_tokens=m, temperature=0,
                              deliver=lambda event: "finish" in event and finished.put(event))
                for p, m in zip(prompts, max_tokens)]
    engine = serve.Engine(model, max_batch=3, log=lambda *a, **k: None, step_tokens=10)
    for request in requests:  # queued before the engine starts
        engine.submit(request)
    steps, forward = [], engine.forward
    engine.forward = lambda running, n: (steps.append((running, n)), forward(running, n))[1]
    engine.start()
    for _ in requests:
        finished.get(timeout=60)
    engine.stop()
    assert steps[:3] == [(0, 2), (2, 3), (3, 3)]  # 5 + 6 >= 10 tokens; then 8 more with two
    for request, prompt, n in zip(requests, prompts, max_tokens):
        assert request.output == greedy(model, prompt, n)


def test_engine_seeded_sampling_is_the_same_alone_or_in_company(model, engine):
    """A seeded sampled request gives the same tokens alone and among others; with top_p 1 they
    are generate's with a generator of that seed (the same operations in the same order)."""
    prompt = [464, 3290, 318]
    settings = dict(prompt=prompt, max_tokens=20, temperature=0.9, top_k=40, seed=7)
    alone = serve.Request(**settings, deliver=None)
    run_engine(engine, [alone])
    crowd = [serve.Request(prompt=[11, 12, 13, 14], max_tokens=30, temperature=1.0, seed=i,
                           deliver=None) for i in range(4)]
    nucleus = [serve.Request(**settings, top_p=0.8, deliver=None) for _ in range(2)]
    again = serve.Request(**settings, deliver=None)
    run_engine(engine, crowd[:2] + [again] + crowd[2:] + nucleus, delays=[0, 0.01, 0.02, 0, 0,
                                                                          0.01, 0.03])
    assert again.output == alone.output
    reference = model.generate(torch.tensor([prompt]), 20, temperature=0.9, top_k=40,
                               generator=torch.Generator().manual_seed(7))[0, 3:].tolist()
    assert alone.output == reference
    assert nucleus[0].output == nucleus[1].output != alone.output  # top_p acts, reproducibly
    assert len({tuple(r.output) for r in crowd}) == 4  # different seeds, different text



def test_a_prompt_that_starts_in_several_slots_is_computed_once(model):
    """Requests with one prompt that start in the same step (rl.py's G replies to a question)
    prefill it once: the pass holds its tokens once, the twins copy the keys, values and
    logits, and every request's tokens are the same as when it runs alone."""
    shared, other = [464, 3290, 318, 257], [11, 12, 13]
    settings = [(shared, 1), (other, 2), (shared, 3), (shared, 4), (other, 5)]

    def run(pairs):  # queued first, then stepped in this thread until done (as rl.py does)
        engine = serve.Engine(model, max_batch=5, log=lambda *a, **k: None)
        requests = [serve.Request(prompt=prompt, max_tokens=6, temperature=1.0, seed=seed,
                                  deliver=lambda event: None) for prompt, seed in pairs]
        for request in requests:
            engine.submit(request)
        with torch.no_grad():
            while engine.active() or not engine.waiting.empty():
                engine.step()
        return [request.output for request in requests]
    alone = [run([pair])[0] for pair in settings]
    fed, wte = [], model.transformer.wte.forward
    model.transformer.wte.forward = lambda tokens: (fed.append(len(tokens)), wte(tokens))[1]
    try:
        together = run(settings)
    finally:
        model.transformer.wte.forward = wte
    assert fed[0] == len(shared) + len(other)  # the first pass: each prompt once
    assert together == alone
    assert len({tuple(output) for output in alone}) == 5  # their own seeds, their own replies


def test_engine_survives_failing_requests(model, engine):
    """A request that fails at admission (a seed torch cannot take) or at sampling (a broken
    setting) gets an error event; the others finish with generate's tokens; no slot stays busy."""
    good = [serve.Request(prompt=[100 + i, 200, 300], max_tokens=15, temperature=0, deliver=None)
            for i in range(3)]
    bad_seed = serve.Request(prompt=[1, 2], max_tokens=5, seed=1 << 80, deliver=None)
    bad_setting = serve.Request(prompt=[1, 2], max_tokens=5, temperature="hot", deliver=None)
    results = run_engine(engine, [good[0], bad_seed, good[1], bad_setting, good[2]])
    assert "error" in results[1][-1] and "error" in results[3][-1]
    for request in good:
        assert request.output == greedy(model, request.prompt, 15)
    assert engine.active() == 0


@pytest.mark.gpu
def test_engine_on_cuda_equals_generate_in_float32_and_runs_in_bfloat16():
    """On a GPU too, in float32: generate's tokens for each prompt, 16 slots, staggered; in
    bfloat16 (serve.py's default there) every request completes with its length."""
    model = tiny_model().cuda()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 50257, (n,), generator=g).tolist() for n in range(1, 100, 5)]
    for dtype in (torch.float32, torch.bfloat16):
        engine = serve.Engine(model.to(dtype), max_batch=16, log=lambda *a, **k: None).start()
        requests = [serve.Request(prompt=p, max_tokens=10 + i, temperature=0, deliver=None)
                    for i, p in enumerate(prompts)]
        results = run_engine(engine, requests, delays=[0.002 * i for i in range(len(prompts))])
        engine.stop()
        assert all(r[-1]["completion_tokens"] == 10 + i for i, r in enumerate(results))
        if dtype == torch.float32:
            assert [r.output for r in requests] == [greedy(model, p, 10 + i)
                                                    for i, p in enumerate(prompts)]


def test_engine_stops_at_end_tokens_stop_strings_and_a_full_context(model, engine):
    """finish_reason stop at an end token (not in the text) or at a stop string (the text cut
    before it, held back while it might still begin one); length when the context is full."""
    prompt = [464, 3290, 318, 257]
    tokens = greedy(model, prompt, 12)
    text = decode(tokens)
    stop_token = serve.Request(prompt=prompt, max_tokens=12, temperature=0, deliver=None,
                               stop_tokens=frozenset({tokens[5]}))
    stop_string = text[len(decode(tokens[:4])):][:3]  # begins in the 5th token's text
    stopped = serve.Request(prompt=prompt, max_tokens=12, temperature=0, deliver=None,
                            stop=["\u2603 never", stop_string])
    long_prompt = list(range(1000, 1000 + CONFIG.block_size - 3))
    full = serve.Request(prompt=long_prompt, max_tokens=50, temperature=0, deliver=None)
    results = run_engine(engine, [stop_token, stopped, full])
    end = tokens.index(tokens[5])  # its first occurrence
    assert results[0][-1]["finish"] == "stop" and stop_token.output == tokens[:end + 1]
    assert "".join(e.get("text", "") for e in results[0]) == decode(tokens[:end])
    assert results[1][-1]["finish"] == "stop"
    streamed = "".join(e.get("text", "") for e in results[1])
    assert streamed == text[:text.index(stop_string)] and stop_string not in streamed
    assert results[2][-1] == {"finish": "length", "prompt_tokens": CONFIG.block_size - 3,
                              "completion_tokens": 3}
    assert full.output == greedy(model, long_prompt, 3)


def test_embeddings_are_the_same_alone_or_batched(model):
    """The mean of the final hidden states over the input's tokens, unit length; padding in a
    batch changes nothing (within 1e-5 in float32)."""
    inputs = [[464, 3290], list(range(300, 340)), [7]]
    batched = torch.tensor(serve.embed(model, inputs))  # (3, C)
    for row, tokens in zip(batched, inputs):
        alone = torch.tensor(serve.embed(model, [tokens])[0])
        assert torch.allclose(row, alone, atol=1e-5)
        with torch.no_grad():
            mean = model.hidden_states(torch.tensor([tokens]))[0].mean(0)  # (C,)
        assert torch.allclose(row, mean / mean.norm(), atol=1e-5)
    assert torch.allclose(batched.norm(dim=1), torch.ones(3))


# --- the API in this process: the errors that need a special set-up

def test_api_key_base_model_and_full_queue(model, tmp_path):
    """401 without the right key; 400 for chat on a base model; 503 with Retry-After when
    --max-queue requests already wait; all in OpenAI's error body, no slot left busy."""
    from fastapi.testclient import TestClient
    engine = serve.Engine(model, max_batch=2, max_queue=1, log=lambda *a, **k: None)
    client = TestClient(serve.create_app(engine, "base", None, api_key="sesame"))
    key = {"Authorization": "Bearer sesame"}
    body = {"model": "base", "prompt": "Hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer nope"}):
        response = client.post("/v1/completions", json=body, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers=key).json()["data"][0]["chat"] is False
    response = client.post("/v1/chat/completions", headers=key, json={
        "model": "base", "messages": [{"role": "user", "content": "Hi"}]})
    assert response.status_code == 400 and "not a chat model" in response.json()["error"][
        "message"]
    engine.submit(serve.Request(prompt=[1], max_tokens=1, deliver=lambda event: None))
    response = client.post("/v1/completions", json=body, headers=key)  # the engine is paused
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "overloaded"
    engine.start()
    assert client.post("/v1/completions", json=body, headers=key).status_code == 200
    assert client.get("/health").json() == {"status": "ok", "active": 0, "waiting": 0}
    engine.stop()


def test_chat_page_is_served_from_its_file_beside_serve_py(model, tmp_path, monkeypatch):
    """GET / answers serve.html, the file shipped next to serve.py, as HTML, wherever the
    server was started from (here an empty folder), and without the API key (the page asks for
    one)."""
    from fastapi.testclient import TestClient
    monkeypatch.chdir(tmp_path)
    engine = serve.Engine(model, max_batch=1, log=lambda *a, **k: None)
    response = TestClient(serve.create_app(engine, "chat", chat.FORMAT, api_key="k")).get("/")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/html")
    assert response.text == (ROOT / "serve.html").read_text()
    assert "/v1/chat/completions" in response.text


def test_completions_write_special_tokens_as_their_names(model):
    """A completion is raw text, on a chat model too: the special tokens it generates come out
    as their names (a padded id as <|id|>), so its text holds every token its usage counts, but
    the <|endoftext|> that ends it; streamed, one chunk per token; a stop string may name one."""
    from fastapi.testclient import TestClient
    script = [chat.USER_END, chat.ASSISTANT_START, 40, chat.ASSISTANT_END, 50300, fineweb.EOT]
    engine = serve.Engine(model, max_batch=1, log=lambda *a, **k: None)
    engine.sample = lambda request, logits: script[len(request.output)]  # the model's choices
    engine.start()
    client = TestClient(serve.create_app(engine, "chat", chat.FORMAT))
    text = "<|user_end|><|assistant_start|>I<|assistant_end|><|50300|>"
    try:
        short = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).json()
        assert short["choices"][0]["text"] == "<|user_end|><|assistant_start|>"
        assert short["usage"]["completion_tokens"] == 2
        whole = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 10}).json()
        assert whole["choices"][0] == {"text": text, "index": 0, "logprobs": None,
                                       "finish_reason": "stop"}
        assert whole["usage"]["completion_tokens"] == len(script)  # <|endoftext|> counted
        with client.stream("POST", "/v1/completions", json={
                "prompt": "hi", "max_tokens": 10, "stream": True,
                "stream_options": {"include_usage": True}}) as response:
            events = [json.loads(line[6:]) for line in response.iter_lines()
                      if line.startswith("data: {")]
        pieces = [e["choices"][0]["text"] for e in events if e["choices"]]
        assert "".join(pieces) == text and len([p for p in pieces if p]) == len(script) - 1
        assert events[-1]["usage"]["completion_tokens"] == len(script)
        stopped = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 10,
                                                       "stop": "<|assistant_end|>"}).json()
        assert stopped["choices"][0]["text"] == "<|user_end|><|assistant_start|>I"
        assert stopped["choices"][0]["finish_reason"] == "stop"
    finally:
        engine.stop()


# --- a real server in a subprocess

class Server:
    """python serve.py ... --port 0 in a subprocess; its output lines are collected."""

    def __init__(self, *args):
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "serve.py"), "--port", "0", "--device", "cpu", *args],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines, self.url, ready = [], None, threading.Event()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line)
                found = re.search(r"on (http://[\d.]+:\d+)", line)
                if found:
                    self.url = found.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(120) or self.url is None:
            self.proc.kill()
            raise RuntimeError("serve.py did not start:\n" + "".join(self.lines))

    def health(self):
        return httpx.get(self.url + "/health").json()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    directory = tmp_path_factory.mktemp("serve")
    model = tiny_model()
    return {"chat": write_checkpoint(directory / "chat.pt", model, chat.FORMAT),
            "base": write_checkpoint(directory / "base.pt", model)}


@pytest.fixture(scope="module")
def server(checkpoints):
    server = Server("--init-from", checkpoints["chat"], "--max-batch", "8",
                    "--max-queue", "64", "--max-body", "100000")
    yield server
    server.stop()


def test_server_prints_where_it_listens_on_loopback(server):
    """127.0.0.1 unless --host says otherwise; the model, the slots and the device."""
    line = next(line for line in server.lines if "serving" in line)
    assert server.url.startswith("http://127.0.0.1:")
    assert "chat" in line and "8 slots" in line and "cpu" in line


def test_openai_client(server, model):
    """The official client unchanged: completions (greedy: generate's text), streaming (the
    same text in chunks), chat (rendered by chat.py, ending at the assistant's end token),
    embeddings (its default base64 and floats), models, and errors as its exceptions."""
    import openai
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert [(m.id, m.chat) for m in client.models.list()] == [("chat", True)]
    prompt = "The meaning of life is"
    tokens = greedy(model, chat.encode_text(prompt), 12)
    done = client.completions.create(model="chat", prompt=prompt, max_tokens=12, temperature=0)
    assert done.choices[0].text == decode(tokens) and done.choices[0].finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (5, 12)
    chunks = list(client.completions.create(model="chat", prompt=prompt, max_tokens=12,
                                            temperature=0, stream=True))
    assert len(chunks) > 2 and "".join(c.choices[0].text for c in chunks) == decode(tokens)
    assert chunks[-1].choices[0].finish_reason == "length"
    sampled = [client.completions.create(model="chat", prompt=prompt, max_tokens=12, seed=seed,
                                         temperature=1.0, top_p=0.95).choices[0].text
               for seed in (3, 3, 4)]
    assert sampled[0] == sampled[1] != sampled[2]  # a seed gives its text, every time

    messages = [{"role": "user", "content": "Hello, who are you?"}]
    rendered = chat.render_prompt(messages)
    reply = greedy(model, rendered, 20)
    if chat.ASSISTANT_END in reply:
        reply = reply[:reply.index(chat.ASSISTANT_END)]
    answer = client.chat.completions.create(model="chat", messages=messages, max_tokens=20,
                                            temperature=0)
    assert answer.choices[0].message.content == decode(reply)
    assert answer.usage.prompt_tokens == len(rendered)
    stream = client.chat.completions.create(model="chat", messages=messages, max_tokens=20,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        decode(reply)
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens

    texts = ["a cat", "a dog sat on the mat"]
    batch = client.embeddings.create(model="chat", input=texts)
    alone = client.embeddings.create(model="chat", input=texts[1], encoding_format="float")
    assert torch.allclose(torch.tensor(batch.data[1].embedding),
                          torch.tensor(alone.data[0].embedding), atol=1e-5)
    expected = serve.embed(model, [chat.encode_text(t) for t in texts])
    assert torch.allclose(torch.tensor([d.embedding for d in batch.data]),
                          torch.tensor(expected), atol=1e-5)

    with pytest.raises(openai.BadRequestError, match="unknown model"):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model="chat", prompt="x", top_p=0)
    with pytest.raises(openai.BadRequestError, match="message 1 is user"):
        client.chat.completions.create(model="chat", messages=messages * 2)
    assert server.health() == {"status": "ok", "active": 0, "waiting": 0}


ERRORS = [  # (path, body, status, the error's param or code, words of its message)
    ("/v1/completions", {"prompt": "x " * 1100}, 400, "context_length_exceeded", "context"),
    ("/v1/completions", {"prompt": [5, 60000]}, 400, "prompt", "token ids"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature", "[0, 2]"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature", "number"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens",
     "max_tokens must be an integer in [1, 1048576], got 0"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens", "integer"),
    ("/v1/completions", {"prompt": "x", "top_k": -2}, 400, "top_k", "integer"),
    ("/v1/completions", {"prompt": "x", "seed": True}, 400, "seed", "integer"),
    ("/v1/completions", {"prompt": "x", "stop": ["a"] * 5}, 400, "stop", "at most 4"),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n", "n must be 1"),
    ("/v1/completions", {"prompt": {"a": 1}}, 400, "prompt", "string"),
    ("/v1/completions", {"prompt": ["a", "b"], "stream": True}, 400, "prompt", "one prompt"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 400, "model_not_found", "unknown"),
    ("/v1/completions", "not json", 400, None, "not JSON"),
    ("/v1/completions", [1, 2], 400, None, "JSON object"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "non-empty"),
    ("/v1/chat/completions", {"messages": [{"role": "bot", "content": "x"}]}, 400, "messages",
     "unknown role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_p": 2}, 400,
     "top_p", "(0, 1]"),
    ("/v1/embeddings", {"input": ""}, 400, "input", "1 to 1024"),
    ("/v1/embeddings", {"input": [-1, 3]}, 400, "input", "ids from 0 to"),
    ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": "yes"}, 400,
     "stream_options", "must be an object"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": True,
                              "stream_options": [1]}, 400, "stream_options", "an object"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "hex"}, 400, "encoding_format", "base64"),
    ("/v1/completions", {"prompt": "x" * 200000}, 413, "request_too_large", "larger than"),
    ("/v1/nothing", {}, 404, 404, "Not Found"),
]


@pytest.mark.parametrize("path, body, status, where, words", ERRORS,
                         ids=[f"{e[2]}-{e[3]}-{i}" for i, e in enumerate(ERRORS)])
def test_errors_have_their_status_and_openai_body(server, path, body, status, where, words):
    """Each mistake: its status and {"error": {"message", "type", "param", "code"}}; nothing
    left waiting or busy."""
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(server.url + path, content=content,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert where in (error["param"], error["code"]) and words in error["message"], error
    assert server.health() == {"status": "ok", "active": 0, "waiting": 0}


def test_load_32_clients_x_3_requests(server, model):
    """32 clients at once (8 slots, the rest waiting), 3 requests each with its own prompt and
    length: every answer is the greedy text of its own prompt, of the asked length; the server
    is healthy and idle afterwards."""
    def job(client, turn):
        prompt = [1000 + 37 * client + turn, 2000 + turn, 300 + client]
        return prompt, 3 + (5 * client + 3 * turn) % 11

    failures, answers = [], {}

    def client(i):
        with httpx.Client(base_url=server.url, timeout=120) as http:
            for turn in range(3):
                prompt, n = job(i, turn)
                response = http.post("/v1/completions", json={
                    "prompt": prompt, "max_tokens": n, "temperature": 0})
                if response.status_code != 200:
                    failures.append(response.text)
                    return
                answers[i, turn] = response.json()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert not failures and len(answers) == 96
    for (i, turn), answer in answers.items():
        prompt, n = job(i, turn)
        tokens = greedy(model, prompt, n)
        assert answer["usage"] == {"prompt_tokens": 3, "completion_tokens": n,
                                   "total_tokens": 3 + n}
        assert answer["choices"][0]["text"] == decode(tokens)
    assert server.health() == {"status": "ok", "active": 0, "waiting": 0}


def test_a_client_that_leaves_mid_stream_frees_its_slot(server):
    """Closing a stream cancels its request: /health's active count drops at once, long before
    the request would have ended, and the log says so."""
    with httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json={
                "prompt": "Once upon a time", "max_tokens": 1000, "temperature": 0,
                "stream": True}) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            assert server.health()["active"] == 1
    left = time.perf_counter()
    while server.health()["active"] and time.perf_counter() - left < 5:
        time.sleep(0.01)
    assert server.health() == {"status": "ok", "active": 0, "waiting": 0}
    time.sleep(0.2)
    line = [line for line in server.lines if "cancelled" in line][-1]
    assert int(re.search(r"(\d+) completion tokens", line).group(1)) < 1000


def test_sigterm_drains_the_requests_in_flight_and_exits_0(checkpoints):
    """After SIGTERM no new connection is taken, the stream in flight still gets every token
    and [DONE], and the process exits 0."""
    server = Server("--init-from", checkpoints["base"], "--drain-seconds", "30")
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            with http.stream("POST", "/v1/completions", json={
                    "prompt": "Once", "max_tokens": 200, "temperature": 0,
                    "stream": True}) as response:
                lines = response.iter_lines()
                first = next(line for line in lines if line.startswith("data:"))
                server.proc.send_signal(signal.SIGTERM)
                time.sleep(0.5)
                with pytest.raises(httpx.ConnectError):
                    httpx.get(server.url + "/health")
                rest = [line for line in lines if line.startswith("data:")]
        assert rest[-1] == "data: [DONE]"
        final = json.loads(rest[-2][len("data: "):])
        assert final["choices"][0]["finish_reason"] == "length"
        assert server.proc.wait(60) == 0
        assert "200 completion tokens" in "".join(server.lines), "".join(server.lines)
        assert server.lines[-1] == "stopped (0 requests unfinished)\n"
        assert len(first) > 6
    finally:
        server.stop()


def test_requests_cut_when_the_drain_runs_out_end_cleanly(checkpoints):
    """SIGTERM with a short --drain-seconds while 4 long requests are in flight (3 slots: a
    stream and two others running, one waiting): when the drain runs out the stream ends with
    an error event in OpenAI's shape and [DONE], the others get 503 in OpenAI's body; the log
    has one line per cut request, the count in its last line, and no traceback; exit 0."""
    server = Server("--init-from", checkpoints["base"], "--drain-seconds", "0.2",
                    "--max-batch", "3")
    assert "page at / continues text (a base model" in "".join(server.lines)
    answers = []

    def plain(prompt):  # 1,000 greedy tokens: seconds of work, cut long before its end
        answers.append(httpx.post(server.url + "/v1/completions", timeout=60, json={
            "prompt": prompt, "max_tokens": 1000, "temperature": 0}))

    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            with http.stream("POST", "/v1/completions", json={
                    "prompt": "Once", "max_tokens": 1000, "temperature": 0,
                    "stream": True}) as response:
                lines = response.iter_lines()
                assert next(line for line in lines if line.startswith("data:"))
                threads = [threading.Thread(target=plain, args=(prompt,))
                           for prompt in ("Twice", "Thrice", "Four times")]
                for thread in threads:
                    thread.start()
                while server.health() != {"status": "ok", "active": 3, "waiting": 1}:
                    time.sleep(0.01)
                server.proc.send_signal(signal.SIGTERM)
                rest = [line for line in lines if line.startswith("data:")]
        for thread in threads:
            thread.join(60)
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2][len("data: "):])["error"]
        assert error["code"] == "server_shutting_down" and error["type"] == "server_error"
        assert set(error) == {"message", "type", "param", "code"} and error["param"] is None
        assert "--drain-seconds 0.2 ran out" in error["message"]
        assert all("choices" in json.loads(line[6:]) for line in rest[:-2])  # text until then
        assert [answer.status_code for answer in answers] == [503] * 3
        assert all(answer.json()["error"] == error for answer in answers)
        assert server.proc.wait(60) == 0
        log = "".join(server.lines)
        assert "Traceback" not in log and "CancelledError" not in log and "Cancel " not in log
        assert log.count(error["message"]) == 4  # a line per cut request
        assert server.lines[-1] == "stopped (4 requests unfinished: --drain-seconds ran out)\n"
    finally:
        server.stop()


def test_model_name_is_the_checkpoints_folder_or_the_files_name(tmp_path, monkeypatch):
    """What /v1/models lists, and what clients then send as "model"."""
    run = tmp_path / "chat"
    run.mkdir()
    (run / "checkpoint.pt").write_text("x")
    (run / "best.pt").write_text("x")
    monkeypatch.chdir(run)
    assert serve.model_name(run / "checkpoint.pt") == "chat"
    assert serve.model_name(run / "best.pt") == "best"
    assert serve.model_name(".") == serve.model_name(run) == "chat"  # never "" for "."
    assert serve.model_name("gpt2") == "gpt2"  # a hub name


def test_command_line_mistakes_are_one_line(tmp_path, capsys):
    """A bad flag or a checkpoint that is not one: one line on stderr naming the fix, exit 2."""
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    write_checkpoint(tmp_path / "tiny.pt", tiny_model())
    taken = socket.create_server(("127.0.0.1", 0))
    for argv, words in ((["--init-from", "x", "--max-batch", "0"], "--max-batch"),
                        (["--init-from", "x", "--port", str(taken.getsockname()[1])],
                         "already in use"),
                        (["--init-from", "x", "--port", "70000"], "--port"),
                        (["--init-from", "x", "--api-key", " "], "--api-key"),
                        (["--init-from", "x", "--host", "256.1.1.1"],
                         "--host 256.1.1.1 is not a valid address"),
                        (["--init-from", "x", "--out-dir", "y"], "unrecognized arguments"),
                        (["--init-from", str(tmp_path / "tiny.pt"), "--max-batch", "10000000000",
                          "--port", "0"], "--max-batch 10000000000: the KV cache"),
                        (["--init-from", str(tmp_path / "junk.pt")], "--init-from")):
        with pytest.raises(SystemExit) as exit_info:
            serve.main(serve.parse_args(argv))
        assert exit_info.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("serve.py: error:") and words in lines[0]
        assert ":0" not in lines[0]
    taken.close()


def test_help_shows_every_default_and_only_serve_py_flags(capsys):
    """--help: each flag with a default shows it (--device's auto too), and no flag's help
    names an option that serve.py does not have."""
    with pytest.raises(SystemExit) as exit_info:
        serve.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split("options:")[1].split())  # past the usage
    flags = set(re.findall(r"--[a-z][a-z-]+", text))
    assert flags <= {"--help", "--init-from", "--host", "--port", "--max-batch", "--step-tokens",
                     "--max-queue", "--api-key", "--max-body", "--drain-seconds",
                     "--model-name", "--device", "--threads", "--seed", "--dtype"}, flags
    for action in serve.parse_args(["--init-from", "x"]).__dict__:
        if action != "init_from":  # required: it has none
            flag = "--" + action.replace("_", "-")
            help_text = text[text.index(flag + " "):][:400].split(" --")[0]
            assert "(default:" in help_text, flag
    assert "cpu, cuda, cuda:N or mps (default: auto)" in text


def test_bench_serve_runs_the_three_designs_on_the_same_work(capsys):
    """bench.py serve, tiny: the engine's greedy tokens are the same with 3 clients as one at
    a time, and transformers' static batches produce them too (float32): the same work."""
    import bench
    result = bench.main(bench.parse_args([
        "serve", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--device", "cpu",
        "--requests", "4", "--clients", "2", "--prompt-tokens", "4", "12", "--new-tokens", "3",
        "8"]))
    assert result["same_tokens_engine"] and result["same_tokens_static"] == 4
    out = capsys.readouterr().out
    assert "2 clients at once" in out and "static batches of 2" in out
