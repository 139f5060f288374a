"""The OpenAI backend against a real local chat-completions SSE server, through the real `openai` client."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from microturn.server.background.backends import OpenAIBackend, OpenAIBackendConfig, TaskDelta, TaskResult
from microturn.server.background.context import ConversationRecord, TaskSpec, ToolSpec
from microturn.server.background.pool import WorkerPool
from microturn.server.background.tools import Tool, ToolRegistry, default_registry
from microturn.server.background_service import SessionBackground

API_KEY = "sk-test-key"
START_WAIT_S = 10.0  # bound on waiting for uvicorn to come up
SPLIT_ARGUMENTS = ('{"ord', 'er": "A1', '7", "note": "caf\\u00', 'e9"}')  # {"order": "A17", "note": "café"}
SHORT_TIMEOUT_S = 1.0  # a task whose client tool never answers


def _chunk(model: str, delta: dict[str, Any], finish: str | None = None) -> str:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(body)}\n\n"


def _tool_call_stream(model: str, name: str = "calculator", arguments: tuple[str, ...] = (
        '{"expression":', ' "17*23"}')) -> Iterator[str]:
    yield _chunk(model, {"role": "assistant", "content": "Let me compute. "})
    yield _chunk(
        model,
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": name, "arguments": ""},
                }
            ]
        },
    )
    for part in arguments:
        yield _chunk(model, {"tool_calls": [{"index": 0, "function": {"arguments": part}}]})
    yield _chunk(model, {}, finish="tool_calls")
    yield "data: [DONE]\n\n"


def _text_stream(model: str, parts: list[str]) -> Iterator[str]:
    yield _chunk(model, {"role": "assistant", "content": ""})
    for part in parts:
        yield _chunk(model, {"content": part})
    yield _chunk(model, {}, finish="stop")
    yield "data: [DONE]\n\n"


def make_app(requests: list[dict[str, Any]]) -> FastAPI:
    """A tiny OpenAI-compatible endpoint: a tool call first, then an answer built from the tool result."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def completions(request: Request) -> Any:
        body = await request.json()
        requests.append({"body": body, "auth": request.headers.get("authorization")})
        model = body["model"]
        if model == "broken":
            return JSONResponse(
                {"error": {"message": "model exploded", "type": "server_error"}}, status_code=500
            )
        last = body["messages"][-1]
        if model.startswith("client-tools") and last["role"] == "tool":
            stream = _text_stream(model, [f"your order: {last['content']}"])
        elif model == "client-tools":
            stream = _tool_call_stream(model, "lookup_order", ('{"order": ', '"A17"}'))
        elif model == "client-tools-split":
            # the arguments JSON cut mid-key, mid-value and inside a \u escape, as streaming endpoints do
            stream = _tool_call_stream(model, "lookup_order", SPLIT_ARGUMENTS)
        elif last["role"] == "tool":
            stream = _text_stream(model, [f"17 times 23 is {last['content']}", "."])
        elif body.get("tools"):
            stream = _tool_call_stream(model)
        else:
            stream = _text_stream(model, ["plain ", "answer"])
        return StreamingResponse(stream, media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def endpoint() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    requests: list[dict[str, Any]] = []
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(requests), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_WAIT_S
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/v1", requests
    server.should_exit = True
    thread.join(START_WAIT_S)
    sock.close()


def _ctx(registry: ToolRegistry, text: str, tools: bool = True):
    record = ConversationRecord("s1")
    record.add_user_text("hi, can you help me with some math?")
    record.add_model_text("Sure, ")
    record.add_model_text("go ahead.")
    record.add_task_result("task_0", "It is Monday.")
    spec = TaskSpec(task_id="task_1", input=text, scheduling="when_idle", origin="client", created_at=0.0)
    return record.build(spec, registry.specs() if tools else [], instructions="Speak like a pirate.")


def _backend(url: str, registry: ToolRegistry, model: str = "test-model") -> OpenAIBackend:
    return OpenAIBackend(
        OpenAIBackendConfig(base_url=url, model=model, api_key=API_KEY, max_retries=0), registry
    )


async def test_streamed_tool_call_round_trip(endpoint: tuple[str, list]) -> None:
    url, requests = endpoint
    requests.clear()
    registry = default_registry()
    backend = _backend(url, registry)
    events = [e async for e in backend.run(_ctx(registry, "what is 17 times 23?"))]
    await backend.aclose()
    deltas = [e.text for e in events if isinstance(e, TaskDelta)]
    assert deltas == ["Let me compute. ", "17 times 23 is 391", "."]
    result = events[-1]
    assert isinstance(result, TaskResult) and result.text == "Let me compute. 17 times 23 is 391."
    assert result.data == {
        "tool_calls": [{"name": "calculator", "arguments": '{"expression": "17*23"}', "output": "391"}]
    }

    first, second = (r["body"] for r in requests)
    assert all(r["auth"] == f"Bearer {API_KEY}" for r in requests)
    assert first["stream"] is True and first["model"] == "test-model"
    assert {t["function"]["name"] for t in first["tools"]} == {"calculator", "clock", "knowledge_search"}
    system, user = first["messages"]
    assert system["role"] == "system" and "Speak like a pirate." in system["content"]
    assert user["role"] == "user" and user["content"].endswith("Task: what is 17 times 23?")
    for seen in (
        "user: hi, can you help me",
        "model: Sure, go ahead.",
        "task task_0 result: It is Monday.",
    ):
        assert seen in user["content"]
    assistant, tool = second["messages"][2:]
    assert assistant["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "calculator", "arguments": '{"expression": "17*23"}'},
        }
    ]
    assert tool == {"role": "tool", "tool_call_id": "call_1", "content": "391"}


async def test_plain_streaming_without_tools(endpoint: tuple[str, list]) -> None:
    url, requests = endpoint
    requests.clear()
    registry = default_registry()
    backend = _backend(url, registry)
    events = [e async for e in backend.run(_ctx(registry, "say something", tools=False))]
    await backend.aclose()
    assert [e.text for e in events] == ["plain ", "answer", "plain answer"]
    assert "tools" not in requests[0]["body"]


async def test_endpoint_failure_fails_the_task_through_the_pool(endpoint: tuple[str, list]) -> None:
    url, _ = endpoint
    registry = default_registry()
    backend = _backend(url, registry, model="broken")
    done = asyncio.Event()
    events: list[dict[str, Any]] = []

    def sink(event: dict[str, Any]) -> None:
        events.append(event)
        if event["type"] != "task.created":
            done.set()

    WorkerPool(backend).submit(_ctx(registry, "anything"), sink)
    await asyncio.wait_for(done.wait(), START_WAIT_S)
    await backend.aclose()
    error = events[-1]["error"]
    assert error["code"] == "backend_error" and "model exploded" in error["message"]


async def test_the_model_calls_a_client_declared_tool_and_the_client_answers(endpoint: tuple[str, list]):
    """A tool the server registry lacks runs on the client: the call goes out as
    response.function_call_arguments.done and the client's function_call_output goes back to the model."""
    url, requests = endpoint
    requests.clear()
    registry = default_registry()
    backend = _backend(url, registry, model="client-tools")
    events: list[dict[str, Any]] = []
    tasks = SessionBackground("s1", WorkerPool(backend), registry, events.append)
    order = {"type": "object", "properties": {"order": {"type": "string"}}, "required": ["order"]}
    tasks.client_tools = [ToolSpec(name="lookup_order", description="an order's status", parameters=order)]
    task_id = tasks.submit("where is my order A17?")
    deadline = time.monotonic() + START_WAIT_S
    while not any(e["type"] == "response.function_call_arguments.done" for e in events):
        assert time.monotonic() < deadline, events
        await asyncio.sleep(0.01)
    (call,) = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert call["task_id"] == task_id and call["name"] == "lookup_order"
    assert json.loads(call["arguments"]) == {"order": "A17"}
    assert not tasks.function_call_output("call_unknown", "x")
    assert tasks.function_call_output(call["call_id"], "shipped on Monday")
    while events[-1]["type"] != "task.done":
        assert time.monotonic() < deadline, events
        await asyncio.sleep(0.01)
    await backend.aclose()
    assert events[-1]["result"]["text"] == "Let me compute. your order: shipped on Monday"
    first, second = (r["body"] for r in requests)
    assert "lookup_order" in {t["function"]["name"] for t in first["tools"]}
    answer = {"role": "tool", "tool_call_id": "call_1", "content": "shipped on Monday"}
    assert second["messages"][-1] == answer
    assert not tasks.function_call_output(call["call_id"], "again"), "a call is answered once"


ORDER_SCHEMA = {
    "type": "object",
    "properties": {"order": {"type": "string"}, "note": {"type": "string"}},
    "required": ["order"],
}


async def _until(events: list[dict[str, Any]], kind: str, count: int = 1) -> list[dict[str, Any]]:
    deadline = time.monotonic() + START_WAIT_S
    while len(found := [e for e in events if e["type"] == kind]) < count:
        assert time.monotonic() < deadline, events
        await asyncio.sleep(0.01)
    return found


async def test_a_client_tool_gets_the_exact_streamed_arguments_and_its_output_answers(
    endpoint: tuple[str, list],
) -> None:
    """The pool hands the task its session's client tools; the LLM's call to one (arguments streamed in
    pieces) runs it with exactly those arguments, and its output goes back as the `tool` message."""
    url, requests = endpoint
    requests.clear()
    registry = default_registry()
    received: list[dict[str, Any]] = []

    async def lookup_order(**arguments: Any) -> str:
        received.append(arguments)
        return "shipped on Monday"

    client_tool = Tool("lookup_order", "an order's status", ORDER_SCHEMA, lookup_order)
    backend = _backend(url, registry, model="client-tools-split")
    ctx = _ctx(registry, "where is my order A17?")
    ctx.tools.append(client_tool.spec())
    events: list[dict[str, Any]] = []
    WorkerPool(backend).submit(ctx, events.append, tools={"lookup_order": client_tool})
    (done,) = await _until(events, "task.done")
    await backend.aclose()
    assert received == [{"order": "A17", "note": "café"}]
    assert done["result"]["text"] == "Let me compute. your order: shipped on Monday"
    call = done["result"]["tool_calls"][0]
    assert call["name"] == "lookup_order" and json.loads(call["arguments"]) == received[0]
    assert call["output"] == "shipped on Monday"
    first, second = (r["body"] for r in requests)
    assert [t["function"]["name"] for t in first["tools"]].count("lookup_order") == 1
    answer = {"role": "tool", "tool_call_id": "call_1", "content": "shipped on Monday"}
    assert second["messages"][-1] == answer


async def test_a_client_tool_named_like_a_registered_one_is_offered_once(endpoint: tuple[str, list]) -> None:
    url, requests = endpoint
    requests.clear()
    registry = default_registry()
    backend = _backend(url, registry)
    ctx = _ctx(registry, "what is 17 times 23?")
    mine = ToolSpec(name="clock", description="the client's own clock", parameters={"type": "object"})
    ctx.tools.append(mine)
    [e async for e in backend.run(ctx)]
    await backend.aclose()
    offered = [t["function"] for t in requests[0]["body"]["tools"]]
    assert sorted(t["name"] for t in offered) == ["calculator", "clock", "knowledge_search"]
    (clock,) = [t for t in offered if t["name"] == "clock"]
    assert clock["description"] == registry.get("clock").description, "the registry's clock runs"


async def test_a_client_tool_that_never_answers_times_out_and_the_other_tasks_go_on(
    endpoint: tuple[str, list],
) -> None:
    url, _ = endpoint
    registry = default_registry()
    backend = _backend(url, registry, model="client-tools")
    events: list[dict[str, Any]] = []
    tasks = SessionBackground("s1", WorkerPool(backend), registry, events.append)
    tasks.client_tools = [ToolSpec(name="lookup_order", description="order status", parameters=ORDER_SCHEMA)]
    silent = tasks.submit("where is my order A17?", timeout_s=SHORT_TIMEOUT_S)
    answered = tasks.submit("and order A17 again?")
    calls = await _until(events, "response.function_call_arguments.done", 2)
    by_task = {c["task_id"]: c["call_id"] for c in calls}
    assert tasks.function_call_output(by_task[answered], "delivered")
    (done,) = await _until(events, "task.done")
    assert done["task_id"] == answered and done["result"]["text"].endswith("your order: delivered")
    (error,) = await _until(events, "task.error")
    await backend.aclose()
    assert error["task_id"] == silent and error["error"]["code"] == "timeout"
    assert not tasks.function_call_output(by_task[silent], "too late"), "a timed-out call waits no more"
