"""The interleaving policy: interrupt, when_idle, silent, stale epochs and slot budgets."""

from __future__ import annotations

from microturn.server.background.scheduling import ResultScheduler


def _texts(pieces: list) -> list[str]:
    return [p.text for p in pieces]


def test_interrupt_goes_next_tick_even_while_speaking() -> None:
    s = ResultScheduler()
    s.push("t1", "391", "interrupt", epoch=0, final=True)
    pieces = s.take(model_speaking=True, epoch=0, budget=16)
    assert _texts(pieces) == ["391"] and pieces[0].final and pieces[0].task_id == "t1"
    assert s.take(model_speaking=False, epoch=0, budget=16) == []


def test_when_idle_waits_for_the_model_to_stop() -> None:
    s = ResultScheduler()
    s.push("t1", "answer", "when_idle", epoch=0)
    assert s.take(model_speaking=True, epoch=0, budget=16) == []
    assert _texts(s.take(model_speaking=False, epoch=0, budget=16)) == ["answer"]


def test_silent_is_never_spoken() -> None:
    s = ResultScheduler()
    s.push("t1", "secret", "silent", epoch=0)
    assert s.pending() == 0
    assert s.take(model_speaking=False, epoch=0, budget=16) == []


def test_barge_in_makes_waiting_when_idle_stale_but_not_interrupt() -> None:
    s = ResultScheduler()
    s.push("t1", "old", "when_idle", epoch=3)
    s.push("t2", "urgent", "interrupt", epoch=3)
    s.push("t3", "new", "when_idle", epoch=4)
    assert _texts(s.take(model_speaking=False, epoch=4, budget=64)) == ["urgent", "new"]
    assert s.dropped == 1


def test_interrupt_before_when_idle_and_arrival_order_within() -> None:
    s = ResultScheduler()
    s.push("a", "a1 ", "when_idle", epoch=0)
    s.push("b", "b1 ", "interrupt", epoch=0)
    s.push("a", "a2 ", "when_idle", epoch=0)
    s.push("b", "b2 ", "interrupt", epoch=0)
    assert _texts(s.take(model_speaking=False, epoch=0, budget=64)) == ["b1 ", "b2 ", "a1 ", "a2 "]


def test_budget_splits_an_item_and_keeps_the_rest() -> None:
    s = ResultScheduler()
    s.push("t1", "abcdefghij", "interrupt", epoch=0, final=True)
    first = s.take(model_speaking=False, epoch=0, budget=4)
    assert _texts(first) == ["abcd"] and not first[0].final
    assert _texts(s.take(model_speaking=False, epoch=0, budget=4)) == ["efgh"]
    last = s.take(model_speaking=False, epoch=0, budget=4)
    assert _texts(last) == ["ij"] and last[0].final


def test_budget_uses_the_given_measure() -> None:
    s = ResultScheduler()
    s.push("t1", "é" * 6, "interrupt", epoch=0)
    utf8 = lambda text: len(text.encode())  # noqa: E731 - a byte-level tokenizer's count
    assert _texts(s.take(model_speaking=False, epoch=0, budget=5, measure=utf8)) == ["éé"]


def test_drop_task_and_pending_bound() -> None:
    s = ResultScheduler(max_pending_chars=10)
    s.push("t1", "aaaa", "when_idle", epoch=0)
    s.push("t2", "bbbb", "when_idle", epoch=0)
    s.drop_task("t1")
    assert s.pending() == 1
    s.push("t3", "cccccccc", "when_idle", epoch=0)
    assert s.dropped == 1
    assert _texts(s.take(model_speaking=False, epoch=0, budget=64)) == ["cccccccc"]
