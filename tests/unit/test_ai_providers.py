"""LLM providers through the real `openai` and `anthropic` SDKs against the in-process local LLM server:
completions, streaming, tool calls, our retry and failover policy, routing, pricing and request hashing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from email.utils import format_datetime

import openai
import pytest
from django.core.exceptions import ImproperlyConfigured

from runs.ai.cache import request_hash
from runs.ai.pricing import cost_usd, price_for
from runs.ai.providers import (
    AllModelsFailed,
    Completion,
    LLMRequest,
    ProviderConfig,
    ProviderError,
    Router,
    call_with_failover,
    default_provider_configs,
    default_router,
    provider_configs_from,
    retry_after_seconds,
)
from runs.ai.testserver import LLMServer, serve_in_thread

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def llm() -> Iterator[tuple[LLMServer, str]]:
    server, base_url = serve_in_thread()
    yield server, base_url
    server.stop()


@pytest.fixture
def server(llm: tuple[LLMServer, str]) -> LLMServer:
    llm[0].reset()
    return llm[0]


@pytest.fixture
def local(llm: tuple[LLMServer, str]) -> Router:
    return Router.from_config({"local": {"kind": "openai", "base_url": llm[1], "models": ["*"]}})


@pytest.fixture
def anthropic_local(llm: tuple[LLMServer, str]) -> Router:
    # The Anthropic SDK appends /v1/messages to its base URL itself.
    return Router.from_config({"anthropic": {"kind": "anthropic", "base_url": llm[1].removesuffix("/v1")}})


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


# --- OpenAI protocol ----------------------------------------------------------------------------------------


def test_it_completes_with_usage(server: LLMServer, local: Router):
    result = call_with_failover(LLMRequest("gpt-5-mini", user("Durable execution keeps agents alive")), router=local)

    completion = result.completion
    assert completion.text == "Summary: Durable execution keeps agents alive"
    assert (completion.model, completion.provider, completion.response_model) == ("gpt-5-mini", "local", "gpt-5-mini")
    assert (completion.input_tokens, completion.output_tokens) == (5, 6)
    assert completion.usage == {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}
    assert completion.finish_reason == "stop"
    assert completion.tool_calls == []
    assert completion.latency_ms >= 0
    assert [(a.model, a.ok) for a in result.attempts] == [("gpt-5-mini", True)]
    assert server.stats() == {"requests": 1, "by_model": {"gpt-5-mini": 1}, "by_status": {"200": 1}}


def test_it_answers_a_reply_directive_and_counts_every_message(server: LLMServer, local: Router):
    messages = [{"role": "system", "content": "[[reply: Paris is the capital.]]"}, *user("Capital of France?")]
    completion = call_with_failover(LLMRequest("local-small", messages), router=local).completion
    assert completion.text == "Paris is the capital."
    assert (completion.input_tokens, completion.output_tokens) == (8, 4)  # directives are words too


def test_it_streams_chunks_and_the_final_usage(server: LLMServer, local: Router):
    chunks: list[str] = []
    request = LLMRequest("gpt-5-mini", user("stream these five words please"))

    completion = call_with_failover(request, stream=True, on_chunk=chunks.append, router=local).completion

    assert chunks == ["Summary: ", "stream ", "these ", "five ", "words ", "please"]
    assert completion.text == "".join(chunks)
    assert (completion.input_tokens, completion.output_tokens) == (5, 6)
    assert completion.finish_reason == "stop"


def test_it_round_trips_a_tool_call(server: LLMServer, local: Router):
    messages = user('What should I wear? [[tool: get_weather {"city": "Paris"}]]')
    first = call_with_failover(LLMRequest("gpt-5-mini", messages, tools=[WEATHER_TOOL]), router=local).completion
    assert first.finish_reason == "tool_calls"
    assert first.text == ""
    [call] = first.tool_calls
    assert (call["name"], call["arguments"]) == ("get_weather", {"city": "Paris"})

    messages += [first.message(), {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 24C"}]
    second = call_with_failover(LLMRequest("gpt-5-mini", messages, tools=[WEATHER_TOOL]), router=local).completion
    assert second.text == "Tool get_weather returned: sunny, 24C"
    assert second.tool_calls == []


def test_it_streams_a_tool_call(server: LLMServer, local: Router):
    request = LLMRequest("gpt-5-mini", user('[[tool: get_weather {"city": "Oslo"}]]'), tools=[WEATHER_TOOL])
    completion = call_with_failover(request, stream=True, router=local).completion
    assert [(c["name"], c["arguments"]) for c in completion.tool_calls] == [("get_weather", {"city": "Oslo"})]
    assert completion.tool_calls[0]["id"].startswith("call_")
    assert completion.finish_reason == "tool_calls"


def test_it_ignores_a_tool_directive_when_no_tools_are_offered(server: LLMServer, local: Router):
    completion = call_with_failover(LLMRequest("m", user("[[tool: get_weather {}]] hello")), router=local).completion
    assert completion.tool_calls == []
    assert completion.text == "Summary: hello"


def test_the_sdk_lists_models_and_the_stats_count_requests(server: LLMServer, llm: tuple[LLMServer, str]):
    client = openai.OpenAI(api_key="dex-local", base_url=llm[1], max_retries=0)
    assert "local-small" in {model.id for model in client.models.list()}
    client.chat.completions.create(model="a", messages=user("one"))
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="b", messages=user("[[fail: 500 x1]]"))
    assert server.stats() == {"requests": 2, "by_model": {"a": 1, "b": 1}, "by_status": {"200": 1, "500": 1}}


# --- retries and failover -------------------------------------------------------------------------------------


def test_it_retries_a_429_after_retry_after_and_bills_one_usage(server: LLMServer, local: Router):
    sleeps = Sleeps()
    request = LLMRequest("gpt-5-mini", user("[[fail: 429 x1]] summarise the quarterly report"))

    result = call_with_failover(request, router=local, sleep=sleeps)

    assert sleeps == [0.1]  # the server's Retry-After, not our back-off
    assert server.stats()["requests"] == 2
    assert server.stats()["by_status"] == {"429": 1, "200": 1}
    assert [(a.model, a.ok, a.status, a.waited) for a in result.attempts] == [
        ("gpt-5-mini", False, 429, 0.1),
        ("gpt-5-mini", True, None, 0.0),
    ]
    assert (result.completion.input_tokens, result.completion.output_tokens) == (7, 5)  # one call's usage


def test_it_fails_over_when_a_model_is_down_and_records_every_attempt(server: LLMServer, local: Router):
    sleeps = Sleeps()
    request = LLMRequest("gpt-5-mini", user("[[model-down: gpt-5-mini]] hello there"))

    result = call_with_failover(request, ["gpt-5-mini", "claude-haiku"], router=local, sleep=sleeps)

    assert result.completion.model == "claude-haiku"
    assert result.completion.text == "Summary: hello there"
    assert [(a.model, a.ok, a.status) for a in result.attempts] == [
        ("gpt-5-mini", False, 503),
        ("gpt-5-mini", False, 503),
        ("gpt-5-mini", False, 503),
        ("claude-haiku", True, None),
    ]
    assert sleeps == [0.5, 1.0]  # exponential back-off without a Retry-After; none after the last try
    assert server.stats()["by_model"] == {"gpt-5-mini": 3, "claude-haiku": 1}


def test_it_moves_on_at_once_after_an_error_a_retry_cannot_fix(server: LLMServer, llm: tuple[LLMServer, str]):
    server.rules = [{"model": "bad-model", "status": 400, "error": "context too long"}]
    server.reset()
    routes = Router.from_config({"local": {"kind": "openai", "base_url": llm[1]}})
    try:
        result = call_with_failover(LLMRequest("bad-model", user("hi")), ["bad-model", "good-model"], router=routes)
    finally:
        server.rules = []
        server.reset()
    assert [(a.model, a.status) for a in result.attempts] == [("bad-model", 400), ("good-model", None)]
    assert "context too long" in result.attempts[0].error


def test_it_raises_with_the_attempts_when_every_model_fails(server: LLMServer, local: Router):
    request = LLMRequest("a", user("[[model-down]]"))
    with pytest.raises(AllModelsFailed) as failed:
        call_with_failover(request, ["a", "b"], router=local, retries_per_model=1, sleep=Sleeps())
    assert [(a.model, a.status) for a in failed.value.attempts] == [("a", 503), ("a", 503), ("b", 503), ("b", 503)]
    assert failed.value.retryable
    assert "a: " in str(failed.value) and "b: " in str(failed.value)


def test_it_caps_retry_after(server: LLMServer, llm: tuple[LLMServer, str]):
    server.rules = [{"status": 429, "retry_after": 3600, "times": 1}]
    server.reset()
    sleeps = Sleeps()
    routes = Router.from_config({"local": {"kind": "openai", "base_url": llm[1]}})
    try:
        call_with_failover(LLMRequest("m", user("hi")), router=routes, max_retry_after=2.0, sleep=sleeps)
    finally:
        server.rules = []
        server.reset()
    assert sleeps == [2.0]


def test_a_slow_answer_past_the_timeout_is_a_retryable_connection_error(server: LLMServer, local: Router):
    request = LLMRequest("m", user("[[slow: 1]] hi"), timeout=0.2)
    with pytest.raises(AllModelsFailed) as failed:
        call_with_failover(request, router=local, retries_per_model=0)
    [attempt] = failed.value.attempts
    assert attempt.status is None and "connection error" in attempt.error
    assert failed.value.retryable


def test_a_scripted_sequence_is_followed_exactly(llm: tuple[LLMServer, str]):
    script = {"rules": [{"contains": "go", "times": 2, "status": 500}, {"contains": "go", "reply": "third time"}]}
    server, base_url = serve_in_thread(script=script)
    try:
        routes = Router.from_config({"local": {"kind": "openai", "base_url": base_url}})
        result = call_with_failover(LLMRequest("m", user("go")), router=routes, sleep=Sleeps())
    finally:
        server.stop()
    assert [a.status for a in result.attempts] == [500, 500, None]
    assert result.completion.text == "third time"


TRIP_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer", "minimum": 2},
        "mood": {"enum": ["calm", "busy"]},
        "stops": {"type": "array", "items": {"$ref": "#/$defs/Stop"}},
        "note": {"anyOf": [{"type": "null"}, {"type": "string"}]},
    },
    "required": ["city", "days", "mood", "stops", "note"],
    "$defs": {"Stop": {"type": "object", "properties": {"name": {"type": "string"}, "open": {"type": "boolean"}}}},
}


@pytest.mark.parametrize("stream", [False, True])
def test_structured_output_follows_the_json_schema_asked_for(llm: tuple[LLMServer, str], stream: bool):
    client = openai.OpenAI(api_key="dex-local", base_url=llm[1], max_retries=0)
    response_format = {"type": "json_schema", "json_schema": {"name": "trip", "schema": TRIP_SCHEMA, "strict": True}}
    kwargs = {"model": "gpt-5-mini", "messages": user("plan a trip"), "response_format": response_format}
    if stream:
        text = "".join(
            chunk.choices[0].delta.content or ""
            for chunk in client.chat.completions.create(stream=True, **kwargs)
            if chunk.choices
        )
    else:
        text = client.chat.completions.create(**kwargs).choices[0].message.content
    trip = json.loads(text)
    assert trip == {
        "city": "Summary: plan a trip",
        "days": 4,  # the answer's words, at least the minimum
        "mood": "calm",
        "stops": [{"name": "Summary: plan a trip", "open": True}],
        "note": "Summary: plan a trip",
    }


def test_a_rule_without_an_answer_only_delays_and_the_directives_answer():
    server, base_url = serve_in_thread(script={"rules": [{"calls": 1, "delay": 0.01}]})
    try:
        routes = Router.from_config({"local": {"kind": "openai", "base_url": base_url}})
        completion = call_with_failover(LLMRequest("m", user("[[reply: as directed]]")), router=routes).completion
    finally:
        server.stop()
    assert completion.text == "as directed"


def test_a_rule_gives_the_structured_output_and_may_match_the_nth_call():
    script = {"rules": [{"calls": 2, "output": {"city": "Oslo"}}, {"reply": "not JSON at all"}]}
    server, base_url = serve_in_thread(script=script)
    try:
        client = openai.OpenAI(api_key="dex-local", base_url=base_url, max_retries=0)
        fmt = {"type": "json_object"}
        first = client.chat.completions.create(model="m", messages=user("a"), response_format=fmt)
        second = client.chat.completions.create(model="m", messages=user("b"), response_format=fmt)
    finally:
        server.stop()
    assert json.loads(first.choices[0].message.content) == {"answer": "not JSON at all"}
    assert json.loads(second.choices[0].message.content) == {"city": "Oslo"}


def test_without_directives_it_calls_each_offered_tool_once_the_most_relevant_first(server: LLMServer, local: Router):
    tools = [
        {"name": "lookup_order", "description": "Find an order.", "parameters": {"type": "object", "properties": {}}},
        WEATHER_TOOL,
        {
            "name": "final_result",
            "description": "The final answer.",
            "parameters": {"type": "object", "properties": {"verdict": {"enum": ["go", "stay"]}}},
        },
    ]
    messages = user("what is the weather in Oslo")
    calls = []
    for _ in range(4):
        completion = call_with_failover(LLMRequest("gpt-5-mini", messages, tools=tools), router=local).completion
        if not completion.tool_calls:
            break
        [call] = completion.tool_calls
        calls.append((call["name"], call["arguments"]))
        messages += [completion.message(), {"role": "tool", "tool_call_id": call["id"], "content": "done"}]
    assert calls == [
        ("get_weather", {"city": "what is the weather in Oslo"}),  # shares "weather" with the question
        ("lookup_order", {}),
        ("final_result", {"verdict": "go"}),  # the output tool once every other tool was called
    ]


# --- Anthropic protocol ---------------------------------------------------------------------------------------


def test_the_anthropic_provider_maps_system_usage_and_stop_reason(server: LLMServer, anthropic_local: Router):
    messages = [{"role": "system", "content": "Be brief."}, *user("Explain durable execution")]
    result = call_with_failover(LLMRequest("claude-haiku", messages, params={"max_tokens": 50}), router=anthropic_local)
    completion = result.completion
    assert completion.text == "Summary: Explain durable execution"
    assert (completion.provider, completion.finish_reason) == ("anthropic", "stop")
    assert (completion.input_tokens, completion.output_tokens) == (5, 4)  # the system prompt's words count too
    assert completion.usage["input_tokens"] == 5


def test_the_anthropic_provider_streams(server: LLMServer, anthropic_local: Router):
    chunks: list[str] = []
    completion = call_with_failover(
        LLMRequest("claude-haiku", user("three short words")),
        stream=True,
        on_chunk=chunks.append,
        router=anthropic_local,
    ).completion
    assert chunks == ["Summary: ", "three ", "short ", "words"]
    assert (completion.text, completion.output_tokens) == ("Summary: three short words", 4)


def test_the_anthropic_provider_round_trips_a_tool_call(server: LLMServer, anthropic_local: Router):
    messages = user('[[tool: get_weather {"city": "Rome"}]]')
    first = call_with_failover(LLMRequest("claude-haiku", messages, tools=[WEATHER_TOOL]), router=anthropic_local)
    [call] = first.completion.tool_calls
    assert (call["name"], call["arguments"], first.completion.finish_reason) == (
        "get_weather",
        {"city": "Rome"},
        "tool_calls",
    )

    messages += [first.completion.message(), {"role": "tool", "tool_call_id": call["id"], "content": "rain"}]
    second = call_with_failover(
        LLMRequest("claude-haiku", messages, tools=[WEATHER_TOOL]), stream=True, router=anthropic_local
    )
    assert second.completion.text == "Tool get_weather returned: rain"


def test_the_anthropic_provider_retries_a_429(server: LLMServer, anthropic_local: Router):
    sleeps = Sleeps()
    result = call_with_failover(
        LLMRequest("claude-haiku", user("[[fail: 429 x1]] hi")), router=anthropic_local, sleep=sleeps
    )
    assert [a.status for a in result.attempts] == [429, None]
    assert sleeps == [0.1]


# --- keys, routing, configuration ---------------------------------------------------------------------------


def test_an_api_key_never_reaches_an_error_or_a_repr(
    server: LLMServer, llm: tuple[LLMServer, str], monkeypatch: pytest.MonkeyPatch
):
    key = "sk-test-0123456789abcdefSECRET"
    monkeypatch.setenv("DEX_TEST_LLM_KEY", key)
    server.rules = [{"status": 401, "error": f"Incorrect API key provided: {key}"}]
    server.reset()
    routes = Router.from_config({"p": {"kind": "openai", "base_url": llm[1], "api_key_env": "DEX_TEST_LLM_KEY"}})
    try:
        with pytest.raises(AllModelsFailed) as failed:
            call_with_failover(LLMRequest("m", user("hi")), router=routes)
    finally:
        server.rules = []
        server.reset()
    provider = routes.provider_for("m")
    for text in (str(failed.value), repr(failed.value.attempts), repr(provider), repr(routes.configs)):
        assert "0123456789abcdef" not in text
    assert failed.value.attempts[0].status == 401
    assert not failed.value.retryable


def test_a_missing_key_is_a_clear_error_naming_the_variable(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("DEX_TEST_ABSENT_KEY", raising=False)
    routes = Router.from_config({"openai": {"kind": "openai", "api_key_env": "DEX_TEST_ABSENT_KEY"}})
    with pytest.raises(AllModelsFailed, match="DEX_TEST_ABSENT_KEY is not set"):
        call_with_failover(LLMRequest("gpt-5", user("hi")), router=routes)


def test_a_model_goes_to_the_first_provider_whose_glob_matches():
    routes = Router.from_config(
        json.dumps(
            {
                "anthropic": {"kind": "anthropic", "api_key_env": "X", "models": ["claude-*"]},
                "openai": {"kind": "openai", "api_key_env": "Y", "models": ["gpt-*", "o[0-9]*"]},
                "local": {"kind": "openai", "base_url": "http://127.0.0.1:8090/v1", "models": ["*"]},
            }
        )
    )
    assert routes.provider_for("claude-haiku").name == "anthropic"
    assert routes.provider_for("gpt-5-mini").name == "openai"
    assert routes.provider_for("o3").name == "openai"
    assert routes.provider_for("llama-3").name == "local"
    assert routes.provider_for("gpt-5").__class__.__name__ == "OpenAIProvider"


def test_a_model_no_provider_serves_fails_over_to_the_next(server: LLMServer, llm: tuple[LLMServer, str]):
    routes = Router.from_config({"local": {"kind": "openai", "base_url": llm[1], "models": ["local-*"]}})
    result = call_with_failover(LLMRequest("gpt-5", user("hi")), ["gpt-5", "local-small"], router=routes)
    assert [(a.model, a.ok) for a in result.attempts] == [("gpt-5", False), ("local-small", True)]
    assert "no provider configured for model 'gpt-5'" in result.attempts[0].error


def test_the_default_providers_follow_the_keys_in_the_environment():
    assert default_provider_configs({}) == [ProviderConfig("local", "openai", base_url="http://127.0.0.1:8090/v1")]
    assert default_provider_configs({"DEX_LLM_LOCAL_URL": "http://127.0.0.1:9/v1"})[0].base_url == (
        "http://127.0.0.1:9/v1"
    )
    both = default_provider_configs({"OPENAI_API_KEY": "k", "ANTHROPIC_API_KEY": "k"})
    assert [(c.name, c.kind, c.models) for c in both] == [
        ("openai", "openai", ("gpt-*", "o[0-9]*")),
        ("anthropic", "anthropic", ("claude-*",)),
    ]


def test_the_providers_setting_wins_over_the_environment(settings, llm: tuple[LLMServer, str], server: LLMServer):
    settings.DEX_LLM_PROVIDERS = {"mine": {"kind": "openai", "base_url": llm[1]}}
    assert [c.name for c in default_router().configs] == ["mine"]
    assert default_router() is default_router()  # one router (and one SDK client) per configuration
    assert call_with_failover(LLMRequest("local-small", user("hi"))).completion.provider == "mine"


@pytest.mark.parametrize(
    "raw",
    [
        "{not json",
        "[]",
        {"x": {"kind": "gemini"}},
        {"x": {"kind": "openai", "models": "gpt-*"}},
        {"x": {"kind": "openai", "api_key": "sk-inline"}},
    ],
)
def test_a_bad_providers_setting_fails_loudly(raw):
    with pytest.raises(ImproperlyConfigured):
        provider_configs_from(raw)


def test_retry_after_is_read_in_every_form():
    assert retry_after_seconds({"retry-after": "0.1"}) == 0.1
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_seconds({}) is None
    assert retry_after_seconds({"retry-after": "soon"}) is None
    date = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 < retry_after_seconds({"retry-after": date}) <= 30


def test_a_completion_survives_json():
    completion = Completion(
        text="hi",
        tool_calls=[{"id": "c1", "name": "f", "arguments": {"x": 1}}],
        model="m",
        provider="p",
        input_tokens=1,
        output_tokens=2,
        latency_ms=3,
        finish_reason="tool_calls",
        usage={"prompt_tokens": 1},
    )
    assert Completion.from_dict(json.loads(json.dumps(completion.to_dict()))) == completion
    assert completion.message()["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"x": 1}'}


def test_provider_error_keeps_status_and_retryability():
    error = ProviderError("boom", status=429, retryable=True, retry_after=1.5)
    assert (error.status, error.retryable, error.retry_after, str(error)) == (429, True, 1.5, "boom")


# --- pricing and hashing ---------------------------------------------------------------------------------------


def test_cost_uses_the_longest_matching_price():
    assert cost_usd("gpt-4o-mini-2024-07-18", 1_000_000, 1_000_000) == Decimal("0.75")
    assert cost_usd("gpt-4o", 1000, 500) == Decimal("0.0075")
    assert cost_usd("claude-haiku", 2000, 1000) == Decimal("0.007")
    assert cost_usd("local-small", 10**9, 10**9) == Decimal(0)
    assert cost_usd("dex-echo", 10, 10) == Decimal(0)


def test_an_unknown_model_has_no_price_and_costs_nothing_recorded():
    assert price_for("mystery-model") is None
    assert cost_usd("mystery-model", 100, 100) == Decimal(0)


def test_pricing_can_be_overridden_in_settings(settings):
    settings.DEX_LLM_PRICING = {"mystery-*": {"input": 1, "output": 2}, "gpt-4o": [100, 200]}
    assert cost_usd("mystery-model", 1_000_000, 500_000) == Decimal(2)
    assert cost_usd("gpt-4o", 1_000_000, 0) == Decimal(100)
    assert cost_usd("gpt-4o-mini", 1_000_000, 0) == Decimal("0.15")  # the longer name still wins


def test_a_bad_pricing_setting_fails_loudly(settings):
    settings.DEX_LLM_PRICING = {"x": {"input": 1}}
    with pytest.raises(ImproperlyConfigured):
        cost_usd("x", 1, 1)


def test_request_hash_is_stable_and_canonical():
    messages = [{"role": "user", "content": "héllo"}]
    a = request_hash("gpt-5-mini", messages, {"temperature": 0.2, "max_tokens": 10}, [WEATHER_TOOL])
    reordered = [{"content": "héllo", "role": "user"}]
    b = request_hash(
        "gpt-5-mini", tuple(reordered), {"max_tokens": 10, "temperature": 0.2, "stream": True}, [WEATHER_TOOL]
    )
    assert a == b
    assert len(a) == 64
    assert request_hash("m", messages) == request_hash("m", messages, {}, []) == request_hash("m", messages, None, None)
    # Pinned: changing the canonical form would silently orphan every cached response.
    assert request_hash("m", user("hi")) == "7e3cce27064e982f7e6fe7b665bb18855e1d713c9f16043f952e47d5fac5cfe8"


def test_request_hash_changes_with_anything_that_changes_the_answer():
    base = request_hash("m", user("hi"), {"temperature": 0})
    assert base != request_hash("n", user("hi"), {"temperature": 0})
    assert base != request_hash("m", user("hi!"), {"temperature": 0})
    assert base != request_hash("m", user("hi"), {"temperature": 1})
    assert base != request_hash("m", user("hi"), {"temperature": 0}, [WEATHER_TOOL])


def test_request_hash_refuses_what_is_not_json():
    with pytest.raises(TypeError):
        request_hash("m", [{"role": "user", "content": datetime.now()}])


# --- manage.py dev --------------------------------------------------------------------------------------------


def test_dev_runs_the_llm_server_and_points_the_children_at_it():
    from runs.management.commands.dev import child_env, children

    specs = children(port=8000, workers=1, queues=["dex"], llm_port=8091)
    assert specs[-1].name == "llm"
    assert list(specs[-1].argv[-3:]) == ["llm_server", "--port", "8091"]
    providers = json.loads(child_env(llm_port=8091)["DEX_LLM_PROVIDERS"])
    assert providers == {"local": {"kind": "openai", "base_url": "http://127.0.0.1:8091/v1", "models": ["*"]}}
    assert "llm" not in {spec.name for spec in children(port=8000, workers=1, queues=["dex"])}
