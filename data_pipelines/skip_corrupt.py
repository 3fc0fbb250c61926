"""The last stage of every loader: skip corrupt examples — counted, with a bound — then batch.

A loader's ``make_example`` turns a record that cannot be decoded into ``{"__corrupt__": True, "error": …}``
instead of raising, so one bad record does not end a run. :class:`CollectDataset` drops those elements, counts
them (``it.stats``; the counts are part of the iterator's checkpointable state) and raises
:class:`CorruptDataError` once ``skipped > max_fraction · max(seen, grace)``; then it stacks ``batch_size`` good
examples into one batch (or passes them through one by one); docs/data.md.
"""
from __future__ import annotations

import collections
import logging

import grain
import numpy as np

from dynamicid_jax.errors import DynamicIDError

__all__ = ["CorruptDataError", "CollectDataset", "CollectIterator"]

log = logging.getLogger(__name__)


class CorruptDataError(DynamicIDError, RuntimeError):
    """More corrupt examples than ``max_corrupt_fraction`` allows (the message names the last bad shard/record)."""



def _collate(items: list[dict]) -> dict:
    return {k: np.stack([it[k] for it in items]) for k in items[0]}


class CollectIterator(grain.DatasetIterator):
    """Skips corrupt examples (counted, bounded), then stacks ``batch_size`` examples (or passes them through)."""

    def __init__(self, parent: grain.DatasetIterator, batch_size: int | None, drop_remainder: bool,
                 max_fraction: float, grace: int):
        super().__init__(parent)
        self._batch_size, self._drop_remainder = batch_size, drop_remainder
        self._max_fraction, self._grace = max_fraction, grace
        self._seen = 0
        self._skipped = 0
        self._recent: collections.deque[str] = collections.deque(maxlen=5)

    @property
    def stats(self) -> dict:
        """``{"seen", "skipped", "recent_errors"}`` — examples read and corrupt ones skipped (since the start of
        the run, restored with the iterator state)."""
        return {"seen": self._seen, "skipped": self._skipped, "recent_errors": list(self._recent)}

    def _next_good(self) -> dict:
        while True:
            element = next(self._parent)
            self._seen += 1
            if "__corrupt__" not in element:
                return element
            self._skipped += 1
            self._recent.append(element["error"])
            if self._skipped <= 10 or self._skipped % 1000 == 0:
                log.warning("skipping corrupt example (%d skipped of %d): %s", self._skipped, self._seen,
                            element["error"])
            if self._skipped > self._max_fraction * max(self._seen, self._grace):
                raise CorruptDataError(
                    f"{self._skipped} of {self._seen} examples were corrupt, more than max_corrupt_fraction="
                    f"{self._max_fraction} allows (counted over at least {self._grace}); last error: "
                    f"{element['error']}")

    def __next__(self) -> dict:
        if self._batch_size is None:
            return self._next_good()
        items = []
        while len(items) < self._batch_size:
            try:
                items.append(self._next_good())
            except StopIteration:
                if items and not self._drop_remainder:
                    break
                raise
        return _collate(items)

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state(), "seen": self._seen, "skipped": self._skipped}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._seen, self._skipped = int(state["seen"]), int(state["skipped"])
        self._recent.clear()

    def __str__(self) -> str:
        return f"CollectIterator(batch_size={self._batch_size})"


class CollectDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, batch_size: int | None, drop_remainder: bool,
                 max_fraction: float, grace: int):
        super().__init__(parent)
        self._args = (batch_size, drop_remainder, max_fraction, grace)

    def __iter__(self) -> CollectIterator:
        return CollectIterator(self._parent.__iter__(), *self._args)

    def __str__(self) -> str:
        return f"CollectDataset(batch_size={self._args[0]})"
