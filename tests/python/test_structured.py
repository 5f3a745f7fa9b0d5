"""Structured outputs, tool calling and the Responses API with the official SDK, on the real
SmolLM2-135M-Instruct (scripts/fetch_models.sh): whatever a small model would write, the
grammar engine makes the output valid."""

import json
import os
import re
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field

from conftest import ROOT, Server

SMOL = ROOT / "models-cache" / "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL = "smol"

pytestmark = pytest.mark.skipif(
    not SMOL.exists() and os.environ.get("CI") != "true", reason="run scripts/fetch_models.sh"
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 10}},
                       "required": ["zone"], "additionalProperties": False},
    },
}


@pytest.fixture(scope="module")
def smol():
    s = Server("--model", str(SMOL), "--served-model-name", MODEL, "--kv-cache-memory", "256MiB",
               "--max-model-len", "2048", "--enable-auto-tool-choice", "--tool-call-parser", "hermes")
    yield openai.OpenAI(base_url=s.base + "/v1", api_key="none", max_retries=0)
    s.stop()


def ask(text):
    return [{"role": "user", "content": text}]


def test_json_schema_nested_enums_and_bounded_arrays(smol):
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "color": {"type": "string", "enum": ["red", "green", "blue"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                     "minItems": 1, "maxItems": 3},
            "address": {"type": "object", "properties": {"zip": {"type": "integer"}},
                        "required": ["zip"], "additionalProperties": False},
        },
        "required": ["name", "color", "tags", "address"],
        "additionalProperties": False,
    }
    r = smol.chat.completions.create(
        model=MODEL, messages=ask("Describe a cat as JSON."), max_tokens=120, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "cat", "schema": schema}})
    v = json.loads(r.choices[0].message.content)
    assert set(v) == {"name", "color", "tags", "address"}
    assert v["color"] in ("red", "green", "blue")
    assert 1 <= len(v["tags"]) <= 3 and isinstance(v["address"]["zip"], int)
    assert r.choices[0].finish_reason == "stop"


def test_json_object_and_streaming(smol):
    r = smol.chat.completions.create(
        model=MODEL, messages=ask("Give me a JSON object about Paris."), max_tokens=60,
        temperature=0, response_format={"type": "json_object"},
        extra_body={"structured_outputs": None})
    text = r.choices[0].message.content
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    assert text.lstrip().startswith("{")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    chunks = list(smol.chat.completions.create(
        model=MODEL, messages=ask("Is the sky blue?"), max_tokens=30, temperature=0, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert isinstance(json.loads(text)["ok"], bool)


def test_regex_choice_and_lark_grammar(smol):
    r = smol.chat.completions.create(
        model=MODEL, messages=ask("A phone number?"), max_tokens=20, temperature=0,
        extra_body={"structured_outputs": {"regex": r"[0-9]{3}-[0-9]{4}"}})
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", r.choices[0].message.content)
    r = smol.chat.completions.create(
        model=MODEL, messages=ask("Pick a color."), max_tokens=10, temperature=0.8, seed=1,
        extra_body={"structured_outputs": {"choice": ["red", "green", "blue"]}})
    assert r.choices[0].message.content in ("red", "green", "blue")
    lark = 'start: answer "!"\nanswer: "yes" | "no"'
    r = smol.chat.completions.create(
        model=MODEL, messages=ask("Yes or no?"), max_tokens=10, temperature=0,
        extra_body={"structured_outputs": {"grammar": lark}})
    assert r.choices[0].message.content in ("yes!", "no!")


def test_completions_with_the_older_guided_fields_and_n(smol):
    r = smol.completions.create(
        model=MODEL, prompt="The numbers:", max_tokens=30, n=2, temperature=0.9, seed=3,
        extra_body={"guided_json": {"type": "array", "items": {"type": "integer"},
                                    "minItems": 1, "maxItems": 4}})
    assert len(r.choices) == 2
    for c in r.choices:
        v = json.loads(c.text)
        assert 1 <= len(v) <= 4 and all(isinstance(x, int) for x in v)


class Cat(BaseModel):
    name: str = Field(max_length=12)
    lives: int
    mood: Literal["happy", "grumpy"]


def test_parse_with_a_pydantic_model(smol):
    r = smol.chat.completions.parse(
        model=MODEL, messages=ask("Describe a cat."), max_tokens=80, temperature=0,
        response_format=Cat)
    cat = r.choices[0].message.parsed
    assert isinstance(cat, Cat) and cat.mood in ("happy", "grumpy")


def test_forced_named_and_required_tool_calls(smol):
    r = smol.chat.completions.create(
        model=MODEL, messages=ask("What is the weather in Paris?"), tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=60, temperature=0)
    m = r.choices[0].message
    assert m.content is None and r.choices[0].finish_reason == "tool_calls"
    (call,) = m.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert args["unit"] in ("celsius", "fahrenheit") and isinstance(args["city"], str)
    # Required, streamed: the SDK's accumulation of the deltas gives whole calls.
    calls = {}
    finish = None
    for chunk in smol.chat.completions.create(
            model=MODEL, messages=ask("Weather in Rome and the time in UTC?"), tools=[WEATHER, TIME],
            tool_choice="required", max_tokens=120, temperature=0, stream=True):
        if not chunk.choices:
            continue
        for d in chunk.choices[0].delta.tool_calls or []:
            c = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
            if d.id:
                assert c["id"] is None, "the id comes once, in the first delta"
                c["id"], c["name"] = d.id, d.function.name
            c["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert calls and finish == "tool_calls"
    for c in calls.values():
        assert c["id"].startswith("call_") and c["name"] in ("get_weather", "get_time")
        assert isinstance(json.loads(c["arguments"]), dict)


def test_a_tool_round_trip_with_null_content(smol):
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
    ]
    r = smol.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER],
                                     tool_choice="none", max_tokens=16, temperature=0)
    assert r.choices[0].message.content
    # Auto: the model may answer or call; either way the response is well-formed.
    r = smol.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER],
                                     max_tokens=16, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_responses_api_plain_streamed_and_structured(smol):
    r = smol.responses.create(model=MODEL, input="Say hello.", instructions="Be brief.",
                              max_output_tokens=12, temperature=0)
    assert r.object == "response" and r.output_text
    assert r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 12
    events = list(smol.responses.create(model=MODEL, input="Say hello.", instructions="Be brief.",
                                        max_output_tokens=12, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert "response.output_text.delta" in kinds and "response.output_item.done" in kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == r.output_text
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    r = smol.responses.create(model=MODEL, input="Pick a number.", max_output_tokens=60, temperature=0,
                              text={"format": {"type": "json_schema", "name": "n", "schema": schema}})
    assert isinstance(json.loads(r.output_text)["n"], int)
    r = smol.responses.create(
        model=MODEL, input="Weather in Oslo?", max_output_tokens=60,
        tools=[{"type": "function", "name": "get_weather",
                "parameters": WEATHER["function"]["parameters"]}],
        tool_choice={"type": "function", "name": "get_weather"})
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments)["unit"]


def test_what_cannot_be_honoured_is_a_400(smol):
    bad = [
        dict(response_format={"type": "json_schema",
                              "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}),
        dict(extra_body={"structured_outputs": {"regex": "("}}),
        dict(extra_body={"structured_outputs": {"grammar": 'root ::= "a"'}}),
        dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}),
        dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
    ]
    for kw in bad:
        with pytest.raises(openai.BadRequestError):
            smol.chat.completions.create(model=MODEL, messages=ask("hi"), max_tokens=5, **kw)
    with pytest.raises(openai.BadRequestError):
        smol.responses.create(model=MODEL, input="hi", previous_response_id="resp_123")


def test_auto_tool_choice_needs_the_flag(server, client):
    # The session server runs without --enable-auto-tool-choice.
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="stories", messages=ask("hi"), tools=[WEATHER])
    assert "enable-auto-tool-choice" in str(e.value)
