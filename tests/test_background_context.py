"""The conversation record and the versioned context package it builds."""

from __future__ import annotations

import itertools

from microturn.server.background.context import (
    MAX_TURN_CHARS,
    SCHEMA_VERSION,
    ContextPackage,
    ConversationRecord,
    TaskSpec,
    ToolSpec,
)


def _clock() -> itertools.count:
    return itertools.count(1000.0, 0.5)


def _task(task_id: str = "task_1") -> TaskSpec:
    return TaskSpec(
        task_id=task_id,
        input="what is 17 times 23?",
        scheduling="when_idle",
        origin="client",
        created_at=999.0,
    )


def test_model_deltas_merge_into_turns_and_both_sides_are_kept() -> None:
    ticks = _clock()
    record = ConversationRecord("s1", clock=lambda: next(ticks))
    record.add_user_text("hello there")
    for delta in ["Hi", ", how", " can I help?"]:
        record.add_model_text(delta)
    record.end_model_turn()
    record.add_model_text("Still here.")
    record.add_task_result("task_0", "391")
    record.add_task_result("task_9", "calculator refused", ok=False)
    items = record.items
    assert [(i.role, i.text, i.source) for i in items] == [
        ("user", "hello there", "text"),
        ("model", "Hi, how can I help?", "model_text"),
        ("model", "Still here.", "model_text"),
        ("task", "391", "task_result"),
        ("task", "calculator refused", "task_error"),
    ]
    merged = items[1]
    assert merged.started_at < merged.ended_at
    assert items[3].task_id == "task_0"


def test_long_model_turn_is_split() -> None:
    record = ConversationRecord("s1")
    for _ in range(3):
        record.add_model_text("x" * (MAX_TURN_CHARS // 2 + 1))
    assert [len(i.text) for i in record.items] == [MAX_TURN_CHARS // 2 + 1] * 3


def test_package_is_versioned_snapshot_and_round_trips_json() -> None:
    record = ConversationRecord("s1")
    record.add_user_text("what is 17 times 23?")
    tool = ToolSpec(name="calculator", description="math", parameters={"type": "object"})
    ctx = record.build(_task(), [tool], instructions="be brief")
    assert ctx.schema_version == SCHEMA_VERSION == 1
    assert ctx.session_id == "s1" and ctx.instructions == "be brief"
    record.add_model_text("later text")
    assert len(ctx.conversation) == 1, "a built package must not change as the record grows"
    again = ContextPackage.model_validate_json(ctx.model_dump_json())
    assert again == ctx
    assert "description" in ContextPackage.model_json_schema()["properties"]["conversation"]


def test_later_package_holds_earlier_results() -> None:
    record = ConversationRecord("s1")
    record.add_task_result("task_1", "17*23 = 391")
    ctx = record.build(_task("task_2"), [])
    assert [(i.role, i.task_id, i.text) for i in ctx.conversation] == [("task", "task_1", "17*23 = 391")]
