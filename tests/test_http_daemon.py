"""End to end: `dsd start --http 127.0.0.1:PORT (key in DSD_API_KEY)` (coordinator + worker processes),
driven with the official `openai` package and httpx, then `dsd stop`; no process may remain.

Greedy answers must equal the single-process engine's token for token.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid

import httpx
import openai
import psutil
import pytest

from dsd.shard.sampling import SamplingParams

KEY = "sk-e2e-" + uuid.uuid4().hex[:8]
PROMPT = "The capital of France is"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dsd(*args, timeout=600, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsd.cli", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL,
                          env=None if env is None else {**os.environ, **env})


def instance_procs(instance: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if instance in " ".join(p.info["cmdline"] or []):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


@pytest.fixture(scope="module")
def daemon():
    instance = "httpe2e" + uuid.uuid4().hex[:8]
    port = free_port()
    # the key goes through the environment: `--api-key KEY` would show it in `ps`, and is refused
    r = dsd("start", "--instance", instance, "--http", f"127.0.0.1:{port}", env={"DSD_API_KEY": KEY})
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        url = f"http://127.0.0.1:{port}"
        # the HTTP thread starts with the coordinator; give it a moment to bind
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "HTTP API did not come up"
            time.sleep(0.2)
        yield {"url": url, "instance": instance}
    finally:
        s = dsd("stop", "--instance", instance, timeout=120)
        deadline = time.monotonic() + 30
        while instance_procs(instance) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = instance_procs(instance)
        for p in left:
            p.kill()
        assert not left, f"processes left after dsd stop: {[p.pid for p in left]} ({s.stderr})"


@pytest.fixture(scope="module")
def engine():
    from dsd.shard.engine import Engine
    return Engine(threads=1)


def direct(engine, ids, n):
    steps = list(engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=n)))
    return "".join(s.text for s in steps), steps[-1].finish_reason, len(steps)


def status(instance):
    from dsd.client import Client
    return Client(instance=instance).status()


def test_openai_client_against_daemon(daemon, engine):
    oai = openai.OpenAI(base_url=daemon["url"] + "/v1", api_key=KEY, max_retries=0, timeout=600)
    models = oai.models.list().data
    assert len(models) == 1
    name = models[0].id
    assert name == os.path.basename(engine.path)[:-len(".gguf")]

    text, finish, n = direct(engine, engine.encode_prompt(PROMPT), 4)
    r = oai.completions.create(model=name, prompt=PROMPT, max_tokens=4, temperature=0)
    assert r.choices[0].text == text and r.choices[0].finish_reason == finish
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(engine.encode_prompt(PROMPT)), n)

    text, finish, n = direct(engine, engine.encode_chat(CHAT), 3)
    chunks = list(oai.chat.completions.create(model=name, messages=CHAT, max_tokens=3, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
    assert chunks[-1].usage.completion_tokens == n
    assert chunks[-1].usage.prompt_tokens == len(engine.encode_chat(CHAT))


def test_errors_against_daemon(daemon):
    url = daemon["url"]
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=url, timeout=600) as c:
        r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": -1}, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        ctx = c.get("/v1/models", headers=auth).json()["data"][0].get("context_length", 8192)
        r = c.post("/v1/completions", json={"prompt": "hello " * (ctx + 50), "max_tokens": 1},
                   headers=auth)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "context_length_exceeded"
        assert r.json()["error"]["param"] == "prompt"
        assert c.get("/health").json() == {"status": "ok"}


def test_disconnect_cancels_in_daemon(daemon):
    url, instance = daemon["url"], daemon["instance"]
    tokens_before = status(instance)["workers"][0]["tokens"]
    body = {"prompt": PROMPT, "max_tokens": 300, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=url, timeout=600, headers={"Authorization": f"Bearer {KEY}"}) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            got = 0
            for line in r.iter_lines():
                got += line.startswith("data: ")
                if got >= 2:
                    break
    # the daemon drops the sequence long before 300 tokens
    deadline = time.monotonic() + 120
    while status(instance)["scheduler"]["active"] != 0:
        assert time.monotonic() < deadline, "the daemon kept generating after the client left"
        time.sleep(0.2)
    # the worker processed the prompt and a few tokens, not the 300 asked for
    assert status(instance)["workers"][0]["tokens"] - tokens_before < 300
    with httpx.Client(base_url=url, timeout=600, headers={"Authorization": f"Bearer {KEY}"}) as c:
        m = c.get("/metrics").text
        assert "dsd_http_client_disconnects_total 1" in m
        assert "dsd_queue_depth 0" in m
        assert "dsd_node_weight_bytes{" in m
        r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1


def test_api_key_on_the_command_line_is_refused():
    r = dsd("start", "--instance", "apikeyrefused" + uuid.uuid4().hex[:8], "--http", "127.0.0.1:1",
            "--api-key", KEY, timeout=120)
    assert r.returncode != 0
    assert "DSD_API_KEY" in r.stderr and "--api-key-file" in r.stderr
    assert KEY not in r.stderr and "Traceback" not in r.stderr
