"""Shard progress of the running flows, for whoever listens in this process (the CLI's rich progress bars).

Prefect progress artifacts carry the same numbers to the UI; this is the in-process channel for a terminal.
"""

from __future__ import annotations

from collections.abc import Callable

Listener = Callable[[str, int, int], None]
_LISTENERS: list[Listener] = []


def subscribe(listener: Listener) -> Callable[[], None]:
    """Call `listener(stage, done, total)` on every shard finished; returns the unsubscribe function."""
    _LISTENERS.append(listener)
    return lambda: _LISTENERS.remove(listener)


def publish(stage: str, done: int, total: int) -> None:
    for listener in list(_LISTENERS):
        listener(stage, done, total)
