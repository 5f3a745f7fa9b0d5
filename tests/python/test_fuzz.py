"""HTTP fuzzing with hypothesis against a running `candela serve`: a few
thousand requests of random shape (known fields with values of every type,
unknown fields, wrong methods and content types, bytes that are not JSON).
Whatever a client sends, the server never answers 5xx, every error is an
OpenAI error object, every stream ends with `data: [DONE]`, and the server is
healthy and idle afterwards.

Reproducible: hypothesis runs derandomized (a fixed seed); a failure prints
the request. CANDELA_FUZZ_EXAMPLES sets how many requests each test sends.
"""

import http.client
import json
import os
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import Server

EXAMPLES = int(os.environ.get("CANDELA_FUZZ_EXAMPLES", "1500"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64),
    st.integers(min_value=-3, max_value=40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(min_value=-3, max_value=3),
    st.text(max_size=40),
)
anything = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=12), inner, max_size=6)
    ),
    max_leaves=20,
)


def small(strategy):
    """Mostly plausible values, sometimes anything at all."""
    return st.one_of(strategy, strategy, strategy, anything)


token_ids = st.lists(st.integers(min_value=-5, max_value=600), max_size=30)
prompts = st.one_of(
    st.text(max_size=200),
    st.lists(st.text(max_size=40), max_size=4),
    token_ids,
    st.lists(token_ids, max_size=4),
)
common = {
    "model": small(st.sampled_from(["stories", "models/stories260K", "other"])),
    "max_tokens": small(st.integers(min_value=-2, max_value=80)),
    "temperature": small(st.floats(min_value=-1, max_value=3)),
    "top_p": small(st.floats(min_value=-0.5, max_value=1.5)),
    "top_k": small(st.integers(min_value=-2, max_value=600)),
    "min_p": small(st.floats(min_value=-0.5, max_value=1.5)),
    "n": small(st.integers(min_value=-1, max_value=5)),
    "stream": small(st.booleans()),
    "stream_options": small(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "stop": small(st.one_of(st.text(max_size=8), st.lists(st.text(max_size=8), max_size=20))),
    "stop_token_ids": small(token_ids),
    "seed": small(st.integers(min_value=-(2**64), max_value=2**64)),
    "logprobs": small(st.one_of(st.booleans(), st.integers(min_value=-1, max_value=25))),
    "top_logprobs": small(st.integers(min_value=-1, max_value=25)),
    "echo": small(st.booleans()),
    "presence_penalty": small(st.floats(min_value=-3, max_value=3)),
    "frequency_penalty": small(st.floats(min_value=-3, max_value=3)),
    "repetition_penalty": small(st.floats(min_value=-1, max_value=3)),
    "logit_bias": small(st.dictionaries(st.text(max_size=4), st.floats(-200, 200), max_size=4)),
    "min_tokens": small(st.integers(min_value=-1, max_value=100)),
    "ignore_eos": small(st.booleans()),
    "skip_special_tokens": small(st.booleans()),
    "best_of": small(st.integers(min_value=-1, max_value=5)),
    "suffix": small(st.text(max_size=5)),
    "user": small(st.text(max_size=5)),
    "response_format": small(st.one_of(
        st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema", "xml"])}),
        st.fixed_dictionaries({"type": st.just("json_schema"), "json_schema": st.fixed_dictionaries(
            {"name": st.just("x"), "schema": st.one_of(
                st.just({"type": "integer"}), st.just({"type": "frobnicate"}),
                st.just({"type": "array", "items": {"type": "boolean"}, "maxItems": 2}))})}),
    )),
    "structured_outputs": small(st.fixed_dictionaries({}, optional={
        "regex": st.sampled_from(["[a-c]{1,3}", "(", "x*"]),
        "choice": st.lists(st.text(max_size=4), max_size=3),
        "grammar": st.sampled_from(['start: "a" | "b"', "start: nope", 'root ::= "a"']),
        "json_object": st.booleans()})),
    "guided_regex": small(st.sampled_from(["[0-9]{2}", "((", ".{0,5}"])),
    "guided_choice": small(st.lists(st.text(max_size=4), max_size=3)),
}
messages = st.lists(
    st.fixed_dictionaries(
        {"role": small(st.sampled_from(["system", "user", "assistant", "tool", "robot"]))},
        optional={
            "content": small(st.one_of(
                st.text(max_size=80),
                st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                                                 "text": st.text(max_size=20)}), max_size=3),
            )),
            "name": small(st.text(max_size=5)),
        },
    ),
    max_size=4,
)


def bodies():
    completion = st.fixed_dictionaries({}, optional={"prompt": small(prompts), **common})
    tool = st.fixed_dictionaries({"type": st.sampled_from(["function", "web"]), "function": st.fixed_dictionaries(
        {"name": st.sampled_from(["f", "g"])},
        optional={"parameters": st.sampled_from([{"type": "object"}, {"type": "nope"}])})})
    chat = st.fixed_dictionaries({}, optional={
        "messages": small(messages), **common, "tools": small(st.lists(tool, max_size=2)),
        "tool_choice": small(st.one_of(
            st.sampled_from(["none", "auto", "required", "sometimes"]),
            st.fixed_dictionaries({"type": st.just("function"),
                                   "function": st.fixed_dictionaries({"name": st.sampled_from(["f", "h"])})})))})
    responses = st.fixed_dictionaries({}, optional={
        "input": small(st.one_of(st.text(max_size=40), messages)), "instructions": small(st.text(max_size=20)),
        "max_output_tokens": small(st.integers(min_value=-1, max_value=20)),
        "stream": small(st.booleans()), "store": small(st.booleans()),
        "previous_response_id": small(st.text(max_size=5)),
        "text": small(st.fixed_dictionaries({"format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "bad"])})}))})
    tokenize = st.fixed_dictionaries(
        {}, optional={"prompt": small(st.text(max_size=100)), "messages": small(messages),
                      "add_special_tokens": small(st.booleans()),
                      "return_token_strs": small(st.booleans())})
    detokenize = st.fixed_dictionaries({}, optional={"tokens": small(token_ids)})
    with_extra = lambda s: st.tuples(s, st.dictionaries(st.text(max_size=8), anything, max_size=2))
    return st.one_of(
        st.tuples(st.just("/v1/completions"), with_extra(completion)),
        st.tuples(st.just("/v1/chat/completions"), with_extra(chat)),
        st.tuples(st.just("/v1/responses"), with_extra(responses)),
        st.tuples(st.just("/tokenize"), with_extra(tokenize)),
        st.tuples(st.just("/detokenize"), with_extra(detokenize)),
    )


class Response:
    def __init__(self, status, headers, content):
        self.status_code, self.headers, self.content = status, headers, content
        self.text = content.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.content)


class Client:
    """A kept-alive HTTP/1.1 connection, reopened when the server closes it."""

    def __init__(self, port):
        self.port, self.conn = port, None

    def request(self, method, path, content=None, headers=None, json_body=None):
        headers = dict(headers or {})
        if json_body is not None:
            content = json.dumps(json_body).encode()
            headers["content-type"] = "application/json"
        if isinstance(content, str):
            content = content.encode()
        for attempt in range(2):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                self.conn.request(method, path, body=content, headers=headers)
                r = self.conn.getresponse()
                data = r.read()
                hs = {k.lower(): v for k, v in r.getheaders()}
                if r.will_close:
                    self.conn.close()
                    self.conn = None
                return Response(r.status, hs, data)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise

    def get(self, path):
        return self.request("GET", path)

    def post(self, path, content=None, json=None):
        return self.request("POST", path, content=content, json_body=json)


@pytest.fixture(scope="module")
def fuzz_server():
    # A short context keeps every generation short.
    s = Server("--model", "models/stories260K", "--served-model-name", "stories",
               "--chat-template", "tests/fixtures/chatml.jinja", "--kv-cache-memory", "16MiB",
               "--max-model-len", "64")
    yield s, Client(s.port)
    assert s.proc.poll() is None, "the server died"
    s.stop()


def check_response(r, what):
    assert r.status_code < 500, f"{what}: {r.status_code} {r.text[:500]}"
    if r.status_code >= 400:
        assert r.content, f"{what}: empty error body ({r.status_code})"
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"], what
        assert isinstance(err["type"], str), what
        assert "param" in err and "code" in err, what
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        events = r.text.split("\n\n")[:-1]
        if "/v1/responses" in what:
            # The Responses API ends with its last event, not [DONE].
            last_data = [l for l in events[-1].split("\n") if l.startswith("data: ")][0]
            last = json.loads(last_data[len("data: "):])
            assert last["type"] in ("response.completed", "response.incomplete", "error"), what
        else:
            assert r.text.endswith("data: [DONE]\n\n"), f"{what}: unterminated stream {r.text[-200:]!r}"
        for event in events:
            data = [l for l in event.split("\n") if l.startswith("data: ")]
            assert len(data) == 1, f"{what}: {event!r}"
            payload = data[0][len("data: "):]
            if payload != "[DONE]":
                json.loads(payload)
    elif r.headers.get("content-type", "").startswith("application/json"):
        r.json()


@FUZZ
@given(request=bodies())
def test_json_requests_of_any_shape(fuzz_server, request):
    _, client = fuzz_server
    path, (body, extra) = request
    body = {**extra, **body}
    r = client.post(path, content=json.dumps(body, allow_nan=True).encode())
    check_response(r, f"POST {path} {body!r}")


@FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/models", "/tokenize",
                          "/detokenize", "/health", "/metrics", "/version", "/nope", "/v1/../x"]),
    content_type=st.sampled_from([None, "application/json", "text/plain", "multipart/form-data"]),
    body=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode),
                   st.just(b'{"prompt": "Once upon a time", "max_tokens": 3}')),
    origin=st.sampled_from([None, None, "http://evil.example"]),
)
def test_raw_requests_of_any_shape(fuzz_server, method, path, content_type, body, origin):
    _, client = fuzz_server
    headers = {}
    if content_type:
        headers["content-type"] = content_type
    if origin:
        headers["origin"] = origin
    r = client.request(method, path, content=body if method not in ("GET", "HEAD") else None,
                       headers=headers)
    what = f"{method} {path} {content_type} {origin} {body[:80]!r}"
    if method == "HEAD":
        assert r.status_code < 500, what
        return
    check_response(r, what)


def test_the_server_is_healthy_and_idle_after_fuzzing(fuzz_server):
    s, client = fuzz_server
    assert client.get("/health").status_code == 200
    r = client.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 8,
                                             "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith(", there was")
    deadline = time.time() + 10
    while True:
        m = s.metrics()
        if m["candela:num_requests_running"] == 0 and m["candela:kv_cache_usage_perc"] == 0:
            break
        assert time.time() < deadline, m
        time.sleep(0.05)
