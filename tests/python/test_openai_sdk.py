"""The official OpenAI Python SDK, unchanged, against `candela serve`."""

import asyncio
import os
import time
from pathlib import Path

import openai
import pytest

from conftest import ROOT, Server

MODEL = "stories"
PROMPT = "Once upon a time"


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model"


def test_completion_matches_stream_and_usage_is_exact(client):
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
    text = plain.choices[0].text
    assert text.startswith(", there was a little girl named Lily.")
    assert plain.choices[0].finish_reason == "length"
    assert plain.usage.prompt_tokens == 5
    assert plain.usage.completion_tokens == 24
    assert plain.usage.total_tokens == 29
    chunks = list(client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    joined = "".join(c.choices[0].text for c in chunks if c.choices)
    assert joined == text
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 24
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 1


def test_chat_matches_stream(client):
    messages = [{"role": "user", "content": "Tell me a story."}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    text = plain.choices[0].message.content
    assert plain.choices[0].message.role == "assistant"
    assert plain.usage.completion_tokens == 20
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == plain.usage.total_tokens


def test_n_choices_are_distinct_with_indexes(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, n=3, temperature=1.0, seed=7)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert len({c.text for c in r.choices}) == 3
    assert 3 <= r.usage.completion_tokens <= 72
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=16, n=3, temperature=1.0, seed=3)
    assert sorted(c.index for c in chat.choices) == [0, 1, 2]
    assert len({c.message.content for c in chat.choices}) == 3


def test_seed_reproduces(client):
    a = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0.9, seed=11)
    b = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0.9, seed=11)
    assert a.choices[0].text == b.choices[0].text


def test_logprobs_shapes(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(len(t) == 3 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0,
        logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4
    for t in content:
        assert t.logprob <= 0 and isinstance(t.bytes, list) and len(t.top_logprobs) == 2
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob


def test_stop_strings(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, stop=["girl named"])
    assert r.choices[0].text == ", there was a little "
    assert r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, stop="named", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == ", there was a little girl "


def test_errors_raise_the_sdk_exceptions(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, temperature=-1)
    assert e.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5000)
    assert "maximum context length is 512 tokens" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt=PROMPT)
    bad = openai.OpenAI(base_url=server.base + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], top_logprobs=50,
                                       logprobs=True)


def test_cancellation_storm_leaves_nothing_behind(server, async_client, client):
    # Each client goes away after its first 1-20 chunks, well before its 450 tokens: a time limit
    # instead made the storm depend on the machine (a fast one finished every stream in time).
    async def one(i):
        stream = await async_client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=450, temperature=0.8, stream=True,
            extra_body={"ignore_eos": True})
        try:
            chunks = 0
            async for _ in stream:
                chunks += 1
                if chunks > i % 20:
                    break
        finally:
            await stream.close()

    async def storm():
        await asyncio.gather(*(one(i) for i in range(100)))

    asyncio.run(storm())
    start = time.time()
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0)
    assert r.choices[0].text.startswith(", there was")
    assert time.time() - start < 5
    deadline = time.time() + 10
    while True:
        m = server.metrics()
        if m["candela:num_requests_running"] == 0 and m["candela:kv_cache_usage_perc"] == 0:
            break
        assert time.time() < deadline, m
        time.sleep(0.05)
    assert m["candela:client_disconnects_total"] >= 1


SMOL = ROOT / "models-cache" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.skipif(not SMOL.exists() and os.environ.get("CI") != "true", reason="run scripts/fetch_models.sh")
def test_real_chat_model_answers():
    s = Server("--model", str(SMOL), "--kv-cache-memory", "256MiB", "--max-model-len", "2048")
    try:
        c = openai.OpenAI(base_url=s.base + "/v1", api_key="none", max_retries=0)
        r = c.chat.completions.create(
            model=str(SMOL), messages=[{"role": "user", "content": "What is the capital of Germany?"}],
            max_tokens=32, temperature=0)
        # Served from the file's Q4_1 blocks with 8-bit activations, as llama.cpp's server
        # computes it (and answers the same). "France" is a near tie that 8-bit activations
        # flip (../shared/models/README.md; tests/real_models.rs covers it).
        assert r.choices[0].message.content == "The capital of Germany is Berlin."
        assert r.choices[0].finish_reason == "stop"
        assert r.usage.prompt_tokens == 37 and r.usage.completion_tokens == 8
    finally:
        s.stop()


MINILM = ROOT / "models-cache" / "all-MiniLM-L6-v2"


@pytest.mark.skipif(not MINILM.exists() and os.environ.get("CI") != "true", reason="run scripts/fetch_models.sh")
def test_sdk_embeddings_match_sentence_transformers():
    """The SDK asks for base64 unless told otherwise; both encodings give
    sentence-transformers' vectors (tests/fixtures/minilm_golden.json)."""
    import json
    import math

    golden = json.loads((ROOT / "tests" / "fixtures" / "minilm_golden.json").read_text())
    cases = golden["cases"][:4]
    s = Server("--model", str(MINILM), "--served-model-name", "minilm")
    try:
        c = openai.OpenAI(base_url=s.base + "/v1", api_key="none", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["minilm"]
        for fmt in [openai.NOT_GIVEN, "float", "base64"]:
            r = c.embeddings.create(model="minilm", input=[x["input"] for x in cases], encoding_format=fmt)
            assert r.object == "list" and r.model == "minilm"
            assert r.usage.prompt_tokens == sum(x["prompt_tokens"] for x in cases) == r.usage.total_tokens
            for d, x in zip(r.data, cases):
                if isinstance(d.embedding, str):  # the SDK leaves base64 to the caller when asked for it
                    import base64
                    import struct
                    raw = base64.b64decode(d.embedding)
                    d.embedding = list(struct.unpack(f"<{len(raw) // 4}f", raw))
                dot = sum(a * b for a, b in zip(d.embedding, x["embedding"]))
                norm = math.sqrt(sum(a * a for a in d.embedding)) * math.sqrt(sum(b * b for b in x["embedding"]))
                assert dot / norm >= 0.99999
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="minilm", prompt="hi")
        assert "embed" in e.value.message
    finally:
        s.stop()


def test_sigterm_finishes_in_flight_requests_then_exits():
    import signal
    import threading

    s = Server("--model", "models/stories260K", "--kv-cache-memory", "16MiB")
    c = openai.OpenAI(base_url=s.base + "/v1", api_key="none", max_retries=0)
    result = {}

    def long_request():
        result["r"] = c.completions.create(
            model="models/stories260K", prompt=PROMPT, max_tokens=400, temperature=0.7,
            extra_body={"ignore_eos": True})

    t = threading.Thread(target=long_request)
    t.start()
    time.sleep(0.3)
    s.proc.send_signal(signal.SIGTERM)
    t.join(timeout=60)
    assert result["r"].usage.completion_tokens == 400
    assert s.proc.wait(timeout=30) == 0
    with pytest.raises(openai.APIConnectionError):
        c.models.list()


@pytest.mark.skipif(not SMOL.exists() and os.environ.get("CI") != "true", reason="run scripts/fetch_models.sh")
def test_shutdown_timeout_ends_open_streams_with_an_error_then_exits_3():
    """At the shutdown deadline every open stream gets an error event and
    [DONE]; nothing is cut mid-chunk; the exit code says requests were ended."""
    import signal
    import threading

    # SmolLM2, not stories260K: the tiny model generated all 32 x 500 tokens
    # within the one-second deadline on a fast CI machine, so nothing was left
    # to end (exit 0). Two SmolLM2 streams of 500 tokens take seconds.
    s = Server("--model", str(SMOL), "--served-model-name", "smol",
               "--kv-cache-memory", "64MiB", "--shutdown-timeout", "1", "--max-num-seqs", "2")
    c = openai.OpenAI(base_url=s.base + "/v1", api_key="none", max_retries=0)
    results = [None] * 32

    def stream(i):
        chunks, error = [], None
        try:
            for chunk in c.completions.create(
                    model="smol", prompt=PROMPT, max_tokens=500, temperature=0.7,
                    stream=True, extra_body={"ignore_eos": True}):
                chunks.append(chunk)
        except openai.APIError as e:  # the SDK raises the error event it reads
            error = e
        results[i] = (chunks, error)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    # Shut down once the server has seen every request (finished, running or
    # waiting): a fixed pause raced the client threads' connections against
    # the engine, which finishes a stream of this tiny model in well under a
    # second (two at a time, so most are still queued at the deadline).
    deadline = time.time() + 30
    while time.time() < deadline:
        m = s.metrics()
        seen = sum(m.get(f"candela:{k}", 0) for k in
                   ("num_requests_running", "num_requests_waiting", "request_success_total"))
        if seen >= 32:
            break
        time.sleep(0.02)
    s.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=60)
    assert s.proc.wait(timeout=30) == 3
    ended = [r for r in results if r is not None and r[1] is not None]
    finished = [r for r in results if r is not None and r[1] is None]
    assert len(ended) + len(finished) == 32
    assert ended, "some streams were still running at the deadline"
    for _, error in ended:
        assert "shutting down" in str(error)
    for chunks, _ in finished:
        assert chunks[-1].choices[0].finish_reason == "length"
