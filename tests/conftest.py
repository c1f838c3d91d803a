"""Suite-wide test settings: what a hung test prints before pytest-timeout ends the run."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_timeout

from tests.taskdump import describe_tasks

_thread_stacks = pytest_timeout.dump_stacks


def _stacks_and_tasks(terminal: Any) -> None:
    """pytest-timeout's dump of every thread's stack, then every asyncio task's chain of
    awaits (a hung asyncio test otherwise shows only its loop parked in `select`)."""
    _thread_stacks(terminal)
    terminal.sep("~", title="asyncio tasks")
    try:
        terminal.write(describe_tasks())
    except Exception as exc:  # a dump must never hide the timeout itself
        terminal.write(f"could not list the asyncio tasks: {exc!r}\n")


def pytest_configure(config: pytest.Config) -> None:
    # pytest-timeout has no hook for what it prints on a timeout; its timeout handlers call
    # the module's `dump_stacks` by name, so wrapping that adds the tasks to both methods.
    pytest_timeout.dump_stacks = _stacks_and_tasks
