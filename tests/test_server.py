"""`jisu serve` as a real process on 127.0.0.1, driven by the official openai client and by raw
HTTP for the error cases, auth, disconnects, the queue limit, metrics and SIGTERM draining."""

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

KEY = "test-key-123"
MODEL = "smollm2-135m-instruct"
SECRET_PROMPT = "zebra-marmalade-7731"        # must never show up in the server's log


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(path, log_file, *args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "jisu.cli", "serve", "-m", str(path), "--served-model-name", MODEL,
         "--port", str(port), "--kv-cache-gb", "0.1", *args],
        stdout=log_file, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not come up")


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log_path, "w") as log_file:
        proc, base = start_server(smollm2_path, log_file, "--api-key", KEY, "--max-num-seqs", "4",
                                  "--max-queue", "4")
        try:
            yield base, log_path
        finally:
            proc.terminate()
            proc.wait(60)


@pytest.fixture(scope="module")
def base(server):
    return server[0]


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)


def auth():
    return {"Authorization": f"Bearer {KEY}"}


def metric(base, name) -> float:
    text = httpx.get(base + "/metrics").text
    m = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def wait_idle(base, timeout=15.0):
    """Until no sequence holds KV blocks (the server frees them when requests end)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metric(base, "jisu_kv_cache_blocks_used") == 0 and metric(base, "jisu_num_requests_running") == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"blocks still in use: {metric(base, 'jisu_kv_cache_blocks_used')}")


# ---- the openai client ---------------------------------------------------------------------
def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion(client):
    out = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert "Paris" in out.choices[0].text
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 8 and out.usage.prompt_tokens > 3
    assert out.usage.total_tokens == out.usage.prompt_tokens + 8


def test_chat_uses_template_and_stops(client):
    out = client.chat.completions.create(model=MODEL, max_tokens=40, temperature=0,
                                         messages=[{"role": "user", "content": "What is the capital of France?"}])
    msg = out.choices[0]
    assert msg.message.role == "assistant" and "Paris" in msg.message.content
    assert msg.finish_reason == "stop" and "<|im_end|>" not in msg.message.content


def test_chat_stream_equals_non_stream_and_reports_usage(client):
    kw = dict(model=MODEL, max_tokens=24, temperature=0,
              messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}])
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completion_stream_with_n(client):
    stream = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, n=2,
                                       temperature=1.0, seed=5, stream=True)
    texts = {0: "", 1: ""}
    reasons = {}
    for c in stream:
        for ch in c.choices:
            texts[ch.index] += ch.text
            if ch.finish_reason:
                reasons[ch.index] = ch.finish_reason
    assert reasons == {0: "length", 1: "length"} and all(texts.values())


def test_n_and_seed_reproducible(client):
    kw = dict(model=MODEL, max_tokens=16, temperature=1.0, top_p=0.95,
              messages=[{"role": "user", "content": "Write a short poem about rain."}])
    a = client.chat.completions.create(**kw, n=3, seed=11)
    b = client.chat.completions.create(**kw, n=3, seed=11)
    c = client.chat.completions.create(**kw, n=3, seed=12)
    texts = lambda r: [ch.message.content for ch in sorted(r.choices, key=lambda ch: ch.index)]   # noqa: E731
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert texts(a) == texts(b)
    assert texts(a) != texts(c)
    assert len(set(texts(a))) > 1          # the samples differ from each other


def test_stop_string(client):
    out = client.completions.create(model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=30, temperature=0,
                                    stop=[" 6"])
    assert out.choices[0].finish_reason == "stop"
    assert " 6" not in out.choices[0].text and "5" in out.choices[0].text


def test_vllm_extra_fields(client):
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=0.7, seed=1,
                                    extra_body={"top_k": 1, "min_p": 0.1, "repetition_penalty": 1.1,
                                                "ignore_eos": True})
    greedy = client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=0,
                                       extra_body={"repetition_penalty": 1.1, "ignore_eos": True})
    assert out.choices[0].text == greedy.choices[0].text       # top_k=1 is greedy
    assert out.usage.completion_tokens == 12


def test_logprobs(client):
    out = client.chat.completions.create(model=MODEL, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3,
                                         messages=[{"role": "user", "content": "Say hi"}])
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)   # greedy takes the top one
        assert entry.logprob <= 0
    comp = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=4, temperature=0, logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == 4 and len(lp.top_logprobs[0]) <= 2
    assert "".join(lp.tokens) == comp.choices[0].text


def test_prefix_cache_hits_across_requests(client, base):
    system = "You are a helpful assistant. " * 30
    before = metric(base, "jisu_prefix_cache_hits_total")
    for q in ("What is 2+2?", "What is 3+3?"):
        client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0,
                                       messages=[{"role": "system", "content": system}, {"role": "user", "content": q}])
    assert metric(base, "jisu_prefix_cache_hits_total") - before >= 160


# ---- errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", b'{"prompt": 5}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": "10"}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": -3}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 10000000}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "hi", "temperature": -1}', 400, "temperature"),
    ("/v1/completions", b'{"prompt": "hi", "top_p": 1.5}', 400, "top_p"),
    ("/v1/completions", b'{"prompt": "hi", "n": 0}', 400, "n"),
    ("/v1/completions", b'{"prompt": []}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": [1, 2, 99999999]}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": "hi", "model": "gpt-4"}', 404, "model"),
    ("/v1/completions", b'{"prompt": "hi", "stop": [""]}', 400, "stop"),
    ("/v1/chat/completions", b'{"messages": []}', 400, "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "hi"}]}', 400, "messages"),
    ("/v1/chat/completions", b'{"messages": "hi"}', 400, "messages"),
    ("/v1/chat/completions", b'{}', 400, "messages"),
])
def test_bad_requests_get_openai_errors(base, path, body, status, param):
    r = httpx.post(base + path, content=body, headers={**auth(), "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["param"] == param


def test_huge_seed_and_too_many_sequences(base):
    r = httpx.post(base + "/v1/completions", headers=auth(),
                   json={"prompt": "hi", "max_tokens": 2, "seed": 2**62, "temperature": 1.0})
    assert r.status_code == 200, r.text
    r = httpx.post(base + "/v1/completions", headers=auth(), json={"prompt": "hi", "max_tokens": 1, "n": 9})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"       # can never fit: not a 429
    assert httpx.get(base + "/health").json() == {"status": "ok"}


def test_prompt_longer_than_context(base):
    ctx = httpx.get(base + "/v1/models", headers=auth()).json()["data"][0]["max_model_len"]
    r = httpx.post(base + "/v1/completions", headers=auth(), json={"prompt": [1] * (ctx + 5), "max_tokens": 1})
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]
    assert httpx.get(base + "/health").json() == {"status": "ok"}        # still serving


def test_unknown_route_and_method(base):
    assert httpx.get(base + "/v1/nothing", headers=auth()).status_code == 404
    r = httpx.get(base + "/v1/completions", headers=auth())
    assert r.status_code == 405 and "error" in r.json()


def test_auth(base):
    body = {"prompt": "hi", "max_tokens": 1}
    assert httpx.post(base + "/v1/completions", json=body).status_code == 401
    r = httpx.post(base + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(base + "/v1/models").status_code == 401
    assert httpx.post(base + "/v1/completions", json=body, headers=auth()).status_code == 200
    assert httpx.get(base + "/health").status_code == 200            # health stays open


# ---- load, disconnects, metrics --------------------------------------------------------------
def test_disconnects_free_blocks(base):
    body = {"prompt": "Tell me a long story about a dragon.", "max_tokens": 2000, "ignore_eos": True, "stream": True}

    async def open_and_drop(cl):
        async with cl.stream("POST", base + "/v1/completions", json=body, headers=auth()) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    return               # leaving the block closes the connection mid-stream

    async def main():
        async with httpx.AsyncClient(timeout=60) as cl:
            for _ in range(5):
                await asyncio.gather(*(open_and_drop(cl) for _ in range(4)))

    asyncio.run(main())
    wait_idle(base, timeout=5)
    # a non-streaming request whose client gives up is freed too (2000 tokens would take far
    # longer than the 5 s allowed)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base + "/v1/completions", headers=auth(), timeout=1.0,
                   json={"prompt": "Once", "max_tokens": 2000, "ignore_eos": True})
    wait_idle(base, timeout=5)
    assert metric(base, "jisu_num_requests_waiting") == 0


def test_queue_limit_gives_429(base):
    body = {"prompt": "Write about the sea.", "max_tokens": 300, "ignore_eos": True, "stream": True}

    async def main():
        async with httpx.AsyncClient(timeout=60) as cl:
            started = asyncio.Event()
            seen = 0

            async def hold():
                nonlocal seen
                async with cl.stream("POST", base + "/v1/completions", json=body, headers=auth()) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            seen += 1
                            if seen == 4:          # the batch is full; the other 4 wait in the queue
                                started.set()
                            await asyncio.sleep(30)      # keep the stream open, unread

            holders = [asyncio.create_task(hold()) for _ in range(8)]     # 4 running + 4 queued
            await asyncio.wait_for(started.wait(), 120)
            await asyncio.sleep(1.0)
            r = await cl.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, headers=auth())
            for t in holders:
                t.cancel()
            await asyncio.gather(*holders, return_exceptions=True)
            return r

    r = asyncio.run(main())
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "server_overloaded"
    wait_idle(base)
    assert httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, headers=auth()).status_code == 200


def test_concurrent_greedy_requests_match_sequential(client):
    prompts = ["The capital of France is", "def add(a, b):", "Water boils at", "My favourite food is"]
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0).choices[0].text
             for p in prompts]
    aclient = openai.AsyncOpenAI(base_url=client.base_url, api_key=KEY, max_retries=0)

    async def main():
        return await asyncio.gather(*(aclient.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0)
                                      for p in prompts))
    together = [r.choices[0].text for r in asyncio.run(main())]
    assert together == alone


def test_metrics(base, client):
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0)
    text = httpx.get(base + "/metrics").text
    for name in ("jisu_requests_total", "jisu_prompt_tokens_total", "jisu_generation_tokens_total",
                 "jisu_time_to_first_token_seconds_bucket", "jisu_inter_token_latency_seconds_bucket",
                 "jisu_num_requests_waiting", "jisu_num_requests_running", "jisu_kv_cache_blocks_used",
                 "jisu_prefix_cache_hit_rate"):
        assert name in text, name
    assert metric(base, "jisu_time_to_first_token_seconds_count") >= 1
    assert metric(base, "jisu_generation_tokens_total") >= 3
    assert re.search(r'jisu_requests_total{endpoint="/v1/completions",status="200"} [1-9]', text)
    assert re.search(r'jisu_requests_total{endpoint="/v1/completions",status="400"} [1-9]', text)


def test_prompts_stay_out_of_the_log(server, client):
    client.completions.create(model=MODEL, prompt=SECRET_PROMPT, max_tokens=2)
    time.sleep(0.5)
    log = server[1].read_text()
    assert "POST /v1/completions" in log           # the access log is there ...
    assert SECRET_PROMPT not in log                # ... the prompt is not


# ---- shutdown ------------------------------------------------------------------------------
def test_sigterm_drains_running_streams(smollm2_path, tmp_path):
    with open(tmp_path / "serve.log", "w") as log_file:
        proc, base = start_server(smollm2_path, log_file)
        try:
            with httpx.stream("POST", base + "/v1/completions", timeout=60,
                              json={"prompt": "Once upon a time", "max_tokens": 40, "ignore_eos": True,
                                    "stream": True}) as r:
                lines = r.iter_lines()
                first = next(line for line in lines if line.startswith("data: {"))
                proc.send_signal(signal.SIGTERM)
                rest = [line for line in lines if line.startswith("data: ")]
            assert first and rest[-1] == "data: [DONE]"
            assert len(rest) >= 30                # the stream ran to its end after SIGTERM
            # uvicorn re-raises the signal once shut down, so the exit status says SIGTERM
            assert proc.wait(60) in (0, -signal.SIGTERM)
        finally:
            if proc.poll() is None:
                proc.kill()
    with pytest.raises(httpx.ConnectError):
        httpx.get(base + "/health", timeout=2)
    assert "Application shutdown complete" in (tmp_path / "serve.log").read_text()


@pytest.fixture(autouse=True, scope="module")
def _no_proxy():
    # the openai client and httpx must talk to 127.0.0.1 directly
    old = {k: os.environ.pop(k) for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY")
           if k in os.environ}
    yield
    os.environ.update(old)
