"""GET /openapi.json is a valid OpenAPI 3.1 document that covers every route the server has, and
its schemas accept the requests the SDK tests send and describe the responses the server sends."""

import json
import urllib.request

from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

ROUTES = {
    ("post", "/v1/completions"), ("post", "/v1/chat/completions"), ("post", "/v1/responses"),
    ("post", "/v1/embeddings"), ("get", "/v1/models"), ("get", "/v1/models/{id}"),
    ("post", "/tokenize"), ("post", "/detokenize"), ("post", "/reset_prefix_cache"),
    ("get", "/health"), ("get", "/ping"), ("get", "/version"), ("get", "/metrics"), ("get", "/openapi.json"),
    ("get", "/v1/engine/stats"), ("get", "/"), ("get", "/dashboard/app.js"), ("get", "/dashboard/style.css"),
}


def get(server, path, body=None):
    req = urllib.request.Request(server.base + path, data=body and json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json",
                                          "Authorization": "Bearer test-key"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def schema_of(doc, name):
    """A component schema with its references resolvable (for jsonschema)."""
    return {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}


def test_openapi_document_is_valid_and_complete(server):
    doc = get(server, "/openapi.json")
    validate(doc)  # raises on an invalid OpenAPI 3.1 document
    routes = {(m, p) for p, item in doc["paths"].items() for m in item if m in ("get", "post")}
    assert routes == ROUTES
    # Routes behind the API key say so.
    assert doc["paths"]["/v1/completions"]["post"]["security"] == [{"api_key": []}]
    assert "security" not in doc["paths"]["/health"]["get"]

    # Real responses match their schemas.
    completion = get(server, "/v1/completions", {"prompt": "Once", "max_tokens": 3, "logprobs": 1})
    Draft202012Validator(schema_of(doc, "CompletionResponse")).validate(completion)
    chat = get(server, "/v1/chat/completions",
               {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "logprobs": True,
                "top_logprobs": 2})
    Draft202012Validator(schema_of(doc, "ChatResponse")).validate(chat)
    Draft202012Validator(schema_of(doc, "ModelList")).validate(get(server, "/v1/models"))
    tok = get(server, "/tokenize", {"prompt": "Once upon", "return_token_strs": True})
    Draft202012Validator(schema_of(doc, "TokenizeResponse")).validate(tok)
    # And the requests the SDK sends fit the request schemas.
    Draft202012Validator(schema_of(doc, "CompletionRequest")).validate(
        {"model": "m", "prompt": ["a", "b"], "max_tokens": 5, "stop": ["x"], "temperature": 0.5,
         "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    Draft202012Validator(schema_of(doc, "ChatRequest")).validate(
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
