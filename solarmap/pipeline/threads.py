"""The pipeline's two threads beside the model: reading ahead of it, and post-processing behind it.

Both are bounded queues, so memory stays flat however large the raster, and both hand errors back
to the caller's thread, so a failure anywhere ends the run with that error.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator

__all__ = ["BackgroundConsumer", "InlineConsumer", "prefetch"]


class _ReaderFailed:
    def __init__(self, exc: BaseException):
        self.exc = exc


def prefetch(items: Iterable, depth: int = 3, *, name: str = "solarmap-reader") -> Iterator:
    """Iterate ``items`` in a background thread, keeping up to ``depth`` ready (errors re-raised here).

    Stages chain: ``prefetch(f(x) for x in prefetch(...))`` runs each stage in its own thread.
    Closing the returned iterator stops the thread and closes ``items`` (and so any stage before it).
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        ready.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            ready.put(_ReaderFailed(exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # an earlier stage's thread stops too
        ready.put(done)

    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is done:
                return
            if isinstance(item, _ReaderFailed):
                raise item.exc
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # drain so the worker can see the stop flag
            try:
                ready.get(timeout=0.05)
            except queue.Empty:
                pass


class BackgroundConsumer:
    """Hands items to ``handle`` in one background thread, in order, at most ``depth`` waiting.

    The mirror of :func:`prefetch`: the caller produces, the thread consumes. An error in ``handle``
    is raised again in the caller by the next :meth:`put` or by :meth:`finish`; :meth:`abort` lets
    the item in hand finish and drops the rest, so the caller can clean up (nothing is handled
    after it returns).
    """

    def __init__(self, handle: Callable, depth: int = 4, *, name: str = "solarmap-consumer"):
        self._handle = handle
        self._waiting: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._end = object()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._waiting.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is self._end:
                return
            try:
                self._handle(item)
            except BaseException as exc:  # noqa: BLE001 - raised again in the caller
                self._error = exc
                return

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, item) -> None:
        while True:
            self._raise_if_failed()
            if not self._thread.is_alive():
                raise RuntimeError("the background consumer stopped")
            try:
                self._waiting.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        """Wait until every item is handled; raise the thread's error, if any."""
        self.put(self._end)
        self._thread.join()
        self._raise_if_failed()

    def abort(self) -> None:
        self._stop.set()
        self._thread.join()


class InlineConsumer:
    """:class:`BackgroundConsumer`'s interface, handling each item at once in the caller's thread."""

    def __init__(self, handle: Callable):
        self._handle = handle

    def put(self, item) -> None:
        self._handle(item)

    def finish(self) -> None:
        pass

    def abort(self) -> None:
        pass
