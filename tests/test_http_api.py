"""OpenAI-compatible HTTP API on the real SmolLM2 engine (in-process fake backend), driven by the
official `openai` package and, for the error cases, raw httpx.

Generation is slow on this shared 2-core machine, so requests ask for a handful of tokens and
short prompts; answers are compared with dsd.shard.engine.Engine run directly (greedy).
"""
from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from dsd.daemon.http_api import ServerThread, create_app
from dsd.shard.sampling import SamplingParams
from tests.http_fake_backend import EngineBackend

PROMPT = "The capital of France is"
CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name the capital of France."}]
N = 5
MODEL = "smollm2-test"
KEY = "sk-test-123"


@pytest.fixture(scope="module")
def engine():
    from dsd.shard.engine import Engine
    return Engine()


def direct(engine, ids, **kw) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens) from the engine itself: the reference."""
    steps = list(engine.generate(ids, SamplingParams(**kw)))
    return "".join(s.text for s in steps), steps[-1].finish_reason, len(steps)


@pytest.fixture(scope="module")
def refs(engine):
    return {
        "completion": direct(engine, engine.encode_prompt(PROMPT), temperature=0.0, max_tokens=N),
        "chat": direct(engine, engine.encode_chat(CHAT), temperature=0.0, max_tokens=N),
    }


@pytest.fixture(scope="module")
def backend(engine):
    return EngineBackend(engine)


@pytest.fixture(scope="module")
def server(backend):
    srv = ServerThread(create_app(backend, model_name=MODEL), "127.0.0.1", 0).start()
    try:
        yield srv
    finally:
        srv.stop()
    assert not srv.thread.is_alive()


@pytest.fixture(scope="module")
def keyed(backend):
    srv = ServerThread(create_app(backend, api_key=KEY, model_name=MODEL), "127.0.0.1", 0).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture()
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, timeout=600) as c:
        yield c


@pytest.fixture(autouse=True)
def idle_backend(backend):
    """Each test starts and ends with the engine slot free (a cancelled generation may still be
    finishing its current token)."""
    backend.fail_after = None
    wait_for(lambda: backend.active == 0 and backend.queued == 0)
    yield
    backend.fail_after = None
    wait_for(lambda: backend.active == 0 and backend.queued == 0)


def wait_for(cond, timeout=300.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def metric(text: str, line_prefix: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{line_prefix} not in /metrics:\n{text}")


def check_error(r: httpx.Response, status: int, param=..., code=...) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param is not ...:
        assert body["error"]["param"] == param, body
    if code is not ...:
        assert body["error"]["code"] == code, body
    return body["error"]


# -- endpoints without generation ----------------------------------------------------------------
def test_models_health(oai, http, engine):
    models = oai.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].owned_by == "dsd"
    assert oai.models.retrieve(MODEL).id == MODEL
    check_error(http.get("/v1/models/other-model"), 404, "model", "model_not_found")
    r = http.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


# -- generation on the real model ------------------------------------------------------------------
def test_completion_matches_engine(oai, refs, engine):
    text, finish, n = refs["completion"]
    r = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0)
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    assert len(r.choices) == 1
    assert r.choices[0].text == text
    assert r.choices[0].finish_reason == finish
    assert r.usage.prompt_tokens == len(engine.encode_prompt(PROMPT))
    assert r.usage.completion_tokens == n
    assert r.usage.total_tokens == r.usage.prompt_tokens + n


def test_completion_stream_with_usage(oai, http, refs, engine):
    text, finish, n = refs["completion"]
    chunks = list(oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == finish and all(f is None for f in finishes[:-1])
    # the usage chunk comes last, with no choices; all others carry usage: null
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n
    assert chunks[-1].usage.prompt_tokens == len(engine.encode_prompt(PROMPT))
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1

    # the raw wire format: SSE events, each a JSON object, closed by [DONE]
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])
    assert "usage" not in json.loads(events[0][6:])      # only with include_usage


def test_chat_matches_engine(oai, refs, engine):
    text, finish, n = refs["chat"]
    r = oai.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=N, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == finish
    assert r.usage.prompt_tokens == len(engine.encode_chat(CHAT))
    assert r.usage.completion_tokens == n

    chunks = list(oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=N,
                                              temperature=0, stream=True))
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == finish
    assert all(c.usage is None for c in chunks)


def test_stop_string(oai, refs):
    text, _, _ = refs["completion"]
    # a stop string taken from the middle of the greedy answer cuts it right before it
    cut = max(1, len(text) // 2)
    stop = text[cut:cut + 2]
    assert stop.strip(), f"reference text too short to pick a stop string: {text!r}"
    want = text[:text.index(stop)]
    r = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0,
                               stop=[stop, "never-appears-xyz"])
    assert r.choices[0].text == want
    assert r.choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats_and_maps_fields(oai, backend, engine):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=1.3, top_p=0.9, seed=1234)
    a = oai.completions.create(**kw).choices[0].text
    assert backend.last_sampling == {"max_tokens": 4, "temperature": 1.3, "top_p": 0.9, "seed": 1234}
    b = oai.completions.create(**kw).choices[0].text
    assert a == b
    ref, _, _ = direct(engine, engine.encode_prompt(PROMPT), max_tokens=4, temperature=1.3,
                       top_p=0.9, seed=1234)
    assert a == ref
    # dsd extensions travel as extra body fields
    oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0,
                           extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1})
    assert backend.last_sampling == {"max_tokens": 1, "temperature": 0.0, "top_k": 5, "min_p": 0.1,
                                     "repetition_penalty": 1.1}


# -- errors --------------------------------------------------------------------------------------
BAD_BODIES = [
    # (body, status, param, code)
    ({"model": MODEL}, 400, "messages", "missing_required_parameter"),
    ({"messages": "hi"}, 400, "messages", "invalid_type"),
    ({"messages": []}, 400, "messages", "invalid_value"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role", "invalid_value"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "invalid_type"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages[0].content[0].type", "unsupported_parameter"),
    ({"messages": CHAT, "temperature": "hot"}, 400, "temperature", "invalid_type"),
    ({"messages": CHAT, "temperature": 7}, 400, "temperature", "invalid_value"),
    ({"messages": CHAT, "max_tokens": -3}, 400, "max_tokens", "invalid_value"),
    ({"messages": CHAT, "max_tokens": 2.5}, 400, "max_tokens", "invalid_type"),
    ({"messages": CHAT, "max_completion_tokens": 0}, 400, "max_completion_tokens", "invalid_value"),
    ({"messages": CHAT, "top_p": 1.5}, 400, "top_p", "invalid_value"),
    ({"messages": CHAT, "stop": 7}, 400, "stop", "invalid_type"),
    ({"messages": CHAT, "seed": "x"}, 400, "seed", "invalid_type"),
    ({"messages": CHAT, "stream": "yes"}, 400, "stream", "invalid_type"),
    ({"messages": CHAT, "n": 2}, 400, "n", "unsupported_parameter"),
    ({"messages": CHAT, "logprobs": True}, 400, "logprobs", "unsupported_parameter"),
    ({"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": "required"}, 400, "tool_choice", "unsupported_parameter"),
    ({"messages": CHAT, "tools": [{"type": "function"}]}, 400, "tools[0]", "invalid_value"),
    ({"messages": CHAT, "response_format": {"type": "json_object"}}, 400, "response_format",
     "unsupported_parameter"),
    ({"messages": CHAT, "presence_penalty": 0.5}, 400, "presence_penalty", "unsupported_parameter"),
]


@pytest.mark.parametrize("body,status,param,code", BAD_BODIES)
def test_bad_chat_requests(http, backend, body, status, param, code):
    started = backend.started
    check_error(http.post("/v1/chat/completions", json=body), status, param, code)
    assert backend.started == started        # refused before reaching the engine


@pytest.mark.parametrize("body,param,code", [
    ({}, "prompt", "missing_required_parameter"),
    ({"prompt": ""}, "prompt", "invalid_value"),
    ({"prompt": [1, 2, 3]}, "prompt", "unsupported_parameter"),
    ({"prompt": ["a", "b"]}, "prompt", "unsupported_parameter"),
    ({"prompt": {"x": 1}}, "prompt", "invalid_type"),
    ({"prompt": "hi", "suffix": "end"}, "suffix", "unsupported_parameter"),
    ({"prompt": "hi", "best_of": 3}, "best_of", "unsupported_parameter"),
    ({"prompt": "hi", "max_tokens": -1}, "max_tokens", "invalid_value"),
    ({"prompt": "hi", "top_k": -1}, "top_k", "invalid_value"),
])
def test_bad_completion_requests(http, body, param, code):
    check_error(http.post("/v1/completions", json=body), 400, param, code)


def test_malformed_bodies_and_routes(http, oai):
    check_error(http.post("/v1/chat/completions", content=b"{not json"), 400, None, "invalid_json")
    check_error(http.post("/v1/chat/completions", content=b"\xff\xfe"), 400, None, "invalid_json")
    check_error(http.post("/v1/completions", content=b"[1, 2]"), 400, None, "invalid_json")
    check_error(http.post("/v1/completions", content=b'{"prompt": "a", "temperature": NaN}'),
                400, None, "invalid_json")
    check_error(http.post("/v1/completions", content=b""), 400, None, "invalid_json")
    huge = b'{"prompt": "' + b"a" * (9 * 1024 * 1024) + b'"}'
    check_error(http.post("/v1/completions", content=huge), 413, None, "request_too_large")
    check_error(http.get("/v1/chat/completions"), 405, None, "method_not_allowed")
    check_error(http.get("/v2/nothing"), 404, None, "not_found")
    # ignored fields do not change anything; the server still answers normally
    r = http.post("/v1/completions", json={"model": "whatever", "prompt": PROMPT, "max_tokens": 1,
                                           "temperature": 0, "user": "u1", "metadata": {"a": "b"},
                                           "n": 1, "logprobs": None, "frequency_penalty": 0,
                                           "some_future_field": [1]})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == MODEL
    assert oai.models.list().data[0].id == MODEL


def test_prompt_longer_than_context(http, oai, engine, backend):
    ctx = engine.model.args.context_length
    long_prompt = "hello " * (ctx + 100)
    started = backend.started
    err = check_error(http.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 1}),
                      400, code="context_length_exceeded")
    assert str(ctx) in err["message"]
    with pytest.raises(openai.BadRequestError) as ei:
        oai.chat.completions.create(model=MODEL, max_tokens=1, stream=True,
                                    messages=[{"role": "user", "content": long_prompt}])
    assert ei.value.code == "context_length_exceeded"
    assert backend.started == started


def test_api_key(keyed, backend):
    with httpx.Client(base_url=keyed.url, timeout=600) as c:
        check_error(c.get("/v1/models"), 401, None, "invalid_api_key")
        check_error(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        check_error(c.post("/v1/completions", json={"prompt": "x"},
                           headers={"Authorization": f"Basic {KEY}"}), 401)
        check_error(c.get("/metrics"), 401)
        assert c.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert c.get("/health").status_code == 200        # liveness probes need no key
    bad = openai.OpenAI(base_url=keyed.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0, timeout=600)
    assert good.models.list().data[0].id == MODEL
    r = good.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0)
    assert r.usage.completion_tokens == 1


# -- disconnects and failures --------------------------------------------------------------------
def test_disconnect_mid_stream_frees_slot(server, http, backend):
    cancelled, finished = backend.cancelled, backend.finished
    before = http.get("/metrics").text
    body = {"prompt": PROMPT, "max_tokens": 500, "temperature": 0, "ignore_eos": True, "stream": True}
    got = 0
    with httpx.Client(base_url=server.url, timeout=600) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    got += 1
                if got >= 2:
                    break
    # closing the connection cancelled the generation long before 500 tokens
    wait_for(lambda: backend.cancelled == cancelled + 1 and backend.active == 0, timeout=120)
    assert backend.finished == finished
    after = http.get("/metrics").text
    assert metric(after, "dsd_http_client_disconnects_total") == \
        metric(before, "dsd_http_client_disconnects_total") + 1
    assert metric(after, "dsd_http_requests_in_flight") == 0
    # the slot is free: the next request is answered
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1


def test_disconnect_while_waiting_non_stream(server, backend):
    cancelled = backend.cancelled
    body = {"prompt": PROMPT, "max_tokens": 500, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=server.url, timeout=httpx.Timeout(600, read=1.0)) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/completions", json=body)
    wait_for(lambda: backend.cancelled == cancelled + 1 and backend.active == 0, timeout=120)


def test_backend_failure_is_reported(oai, http, backend):
    backend.fail_after = 1
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "temperature": 0})
    check_error(r, 500, None, "request_failed")
    with pytest.raises(openai.APIError) as ei:
        list(oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, stream=True))
    assert "worker 0 died" in str(ei.value)
    backend.fail_after = None
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1, "temperature": 0})
    assert r.status_code == 200


def test_concurrent_requests_queue_and_match(server, http, backend, refs):
    """Two requests at once on the one-slot backend: the second queues (visible in /metrics),
    both get the greedy reference answer."""
    import concurrent.futures as cf

    text, _, _ = refs["completion"]
    backend.gate = threading.Event()
    body = {"prompt": PROMPT, "max_tokens": N, "temperature": 0}
    try:
        with cf.ThreadPoolExecutor(2) as pool:
            futs = [pool.submit(httpx.post, server.url + "/v1/completions", json=body, timeout=600)
                    for _ in range(2)]
            wait_for(lambda: backend.queued == 1 and backend.active == 1, timeout=60)
            m = http.get("/metrics").text
            assert metric(m, "dsd_queue_depth") == 1
            assert metric(m, "dsd_http_requests_in_flight") == 2
            backend.gate.set()
            answers = [f.result() for f in futs]
    finally:
        backend.gate.set()
        backend.gate = None
    assert [a.status_code for a in answers] == [200, 200]
    assert [a.json()["choices"][0]["text"] for a in answers] == [text, text]


def test_metrics_count_tokens(http, oai, engine):
    before = http.get("/metrics").text
    r = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0)
    after = http.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    a = after.text
    p = 'dsd_http_requests_total{code="200",endpoint="completions"}'
    assert metric(a, p) == metric(before, p) + 1
    assert metric(a, "dsd_prompt_tokens_total") == metric(before, "dsd_prompt_tokens_total") + r.usage.prompt_tokens
    assert metric(a, "dsd_completion_tokens_total") == \
        metric(before, "dsd_completion_tokens_total") + r.usage.completion_tokens
    assert metric(a, "dsd_decode_tokens_total") == metric(before, "dsd_decode_tokens_total") + r.usage.completion_tokens - 1
    assert metric(a, 'dsd_decode_tokens_per_second{window="last"}') > 0
    # from backend.status()
    assert metric(a, "dsd_daemon_up") == 1
    assert metric(a, "dsd_queue_depth") == 0
    import os
    size = os.path.getsize(engine.path)
    assert metric(a, 'dsd_node_weight_bytes{node="0",worker="0"}') == size
    assert metric(a, 'dsd_node_page_bytes{node="0",page_size="4k",worker="0"}') == size
    # 4xx answers are counted by status code
    http.post("/v1/completions", content=b"{")
    p400 = 'dsd_http_requests_total{code="400",endpoint="completions"}'
    assert metric(http.get("/metrics").text, p400) >= 1
