"""The hung-test dump names what each asyncio task waits on, across threads."""

from __future__ import annotations

import asyncio
import threading

from tests.taskdump import await_chain, describe_tasks


async def _innermost(gate: asyncio.Future[None]) -> None:
    await gate


async def _middle(gate: asyncio.Future[None]) -> None:
    await _innermost(gate)


def test_a_task_parked_in_another_threads_loop_is_described_down_to_its_future() -> None:
    loop = asyncio.new_event_loop()
    parked = threading.Event()
    gate: asyncio.Future[None] = loop.create_future()

    async def outer() -> None:
        loop.call_soon(parked.set)  # runs once this task is parked on `gate`
        await _middle(gate)

    task = loop.create_task(outer(), name="parked-task")
    thread = threading.Thread(target=loop.run_until_complete, args=(task,), daemon=True)
    thread.start()
    try:
        assert parked.wait(10)
        text = describe_tasks()
        block = text[text.index("task parked-task (pending)") :].splitlines()
        assert "in test_a_task_parked_in_another_threads_loop_is_described" in block[1]
        assert block[2].endswith("in _middle") and "tests/test_taskdump.py:" in block[2]
        assert block[3].endswith("in _innermost")
        assert block[4].startswith("    waits on <Future pending")
    finally:
        loop.call_soon_threadsafe(gate.set_result, None)
        thread.join(10)
        loop.close()
    assert task.done() and not thread.is_alive()


def test_a_finished_coroutine_is_one_line_with_nothing_waited_on() -> None:
    async def done() -> int:
        return 1

    coro = done()
    assert asyncio.run(coro) == 1
    (line,) = await_chain(coro)
    assert line.startswith("tests/test_taskdump.py:")
    assert line.endswith(".<locals>.done")
