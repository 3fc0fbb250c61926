"""Work in a daemon thread beside the main thread: the demo's face models and its evaluation lanes use it to keep
both cores of a small machine busy (one jitted training or sampling call keeps about one core busy)."""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

__all__ = ["BackgroundJob"]


class BackgroundJob:
    """``fn()`` in a daemon thread (an interrupted run does not wait for it); :meth:`result` joins and returns
    its value or re-raises its exception."""

    def __init__(self, fn: Callable[[], Any]):
        self._value: Any = None
        self._error: BaseException | None = None

        def target():
            try:
                self._value = fn()
            except BaseException as err:  # handed to the joining thread
                self._error = err

        self._thread = threading.Thread(target=target, daemon=True)
        self._thread.start()

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value
