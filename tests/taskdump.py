"""What every asyncio task of the process is waiting on: for a test that hangs.

pytest-timeout's stack dump shows threads, and a hung asyncio test shows only its event
loop parked in `select`.  `describe_tasks()` finds every running event loop in the process
(the test's own, and the servers' loops in their threads), and for each of its tasks walks
the chain of awaits from the task's coroutine down to the innermost one, one line per
frame (``file:line in function``), ending with the future it is parked on.  It runs on
pytest-timeout's timer thread while the loops are stuck, so it reads the tasks without
their loops' help (`asyncio.all_tasks(loop)` is safe from another thread: it retries when
the task set changes under it).
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Iterator
from types import CodeType, FrameType
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MAX_DEPTH = 64


def running_loops() -> list[asyncio.AbstractEventLoop]:
    """Every event loop of the process that is running now (any thread).  Tested with
    `type()`, not `isinstance`, which reads a `__class__` that lazy modules and proxies
    among the objects compute (torch warns)."""
    return [
        obj
        for obj in gc.get_objects()
        if issubclass(type(obj), asyncio.AbstractEventLoop) and obj.is_running()
    ]


def _frame_of(awaitable: Any) -> FrameType | None:
    frame = getattr(awaitable, "cr_frame", None) or getattr(awaitable, "gi_frame", None)
    return frame if isinstance(frame, FrameType) else None


def _code_of(awaitable: Any) -> CodeType | None:
    code = getattr(awaitable, "cr_code", None) or getattr(awaitable, "gi_code", None)
    return code if isinstance(code, CodeType) else None


def _where(path: str) -> str:
    return os.path.relpath(path, _ROOT) if path.startswith(_ROOT) else path


def await_chain(awaitable: Any, waits_on: object = None) -> Iterator[str]:
    """One line per coroutine (or generator) in the chain of awaits from `awaitable` in,
    then what the innermost one waits on: `waits_on` (a task's future) when given, else
    the innermost awaited object if it is not a coroutine."""
    for _ in range(_MAX_DEPTH):
        frame, code = _frame_of(awaitable), _code_of(awaitable)
        if code is None:
            last = waits_on if waits_on is not None else awaitable
            if last is not None:
                yield f"waits on {last!r:.300}"
            return
        line = frame.f_lineno if frame is not None else code.co_firstlineno
        yield f"{_where(code.co_filename)}:{line} in {code.co_qualname}"
        awaitable = getattr(awaitable, "cr_await", None) or getattr(awaitable, "gi_yieldfrom", None)
    yield "..."


def describe_tasks() -> str:
    """Every running loop's tasks and their await chains, as text."""
    loops = running_loops()
    if not loops:
        return "no running asyncio event loop\n"
    lines: list[str] = []
    for loop in loops:
        tasks = sorted(asyncio.all_tasks(loop), key=lambda task: task.get_name())  # pending only
        lines.append(f"event loop {type(loop).__name__} at {id(loop):#x}: {len(tasks)} task(s)")
        for task in tasks:
            lines.append(f"  task {task.get_name()} (pending)")
            waiter = getattr(task, "_fut_waiter", None)  # the future it is parked on
            lines.extend(f"    {step}" for step in await_chain(task.get_coro(), waiter))
    return "\n".join(lines) + "\n"
