"""Locks the engine needs beyond ``threading``'s: a readers-writer lock that prefers writers.

The engine's fusions read zero-copy views of the LMDB map while other threads may write to the
store; a write that fills the map grows it (``set_mapsize``), which LMDB allows only while no
transaction is open in the process, and which moves the map under any view. So fusions holding
views are readers and store writes are writers.

What it does not know: what it protects.

    lock = LockRW()
    with lock.read(): ...      # many at once
    with lock.write(): ...     # alone; a waiting writer holds back new readers (never starves)
"""

from __future__ import annotations

import threading

__all__ = ["LockRW"]


class LockRW:
    """A readers-writer lock that prefers writers: ``with lock.read():`` for many at once, ``with
    lock.write():`` alone; a waiting writer holds back new readers, so it never starves."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    def read(self):
        return _Held(self, False)

    def write(self):
        return _Held(self, True)

    def _acquire(self, write: bool) -> None:
        with self._cond:
            if write:
                self._waiting += 1
                while self._writer or self._readers:
                    self._cond.wait()
                self._waiting -= 1
                self._writer = True
            else:
                while self._writer or self._waiting:
                    self._cond.wait()
                self._readers += 1

    def _release(self, write: bool) -> None:
        with self._cond:
            if write:
                self._writer = False
            else:
                self._readers -= 1
            self._cond.notify_all()


class _Held:
    def __init__(self, lock: LockRW, write: bool) -> None:
        self.lock, self.write = lock, write

    def __enter__(self) -> None:
        self.lock._acquire(self.write)

    def __exit__(self, *exc) -> None:
        self.lock._release(self.write)
