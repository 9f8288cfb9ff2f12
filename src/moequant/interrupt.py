"""SIGTERM handled like Ctrl-C: ``sigterm_as_interrupt`` turns it into ``Terminated`` (a
``KeyboardInterrupt``), so every ``with AtomicDir`` / temp-directory block unwinds and cleans up; the
CLI then exits with 143 (128 + SIGTERM) instead of Ctrl-C's 130."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises ``Terminated`` in the main thread (once: a second SIGTERM during the
    cleanup is ignored, SIGKILL still ends everything). The previous handler is restored on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupt_exit_code(e: KeyboardInterrupt) -> int:
    """143 for SIGTERM, 130 for Ctrl-C (the shell's 128 + signal number)."""
    return 128 + signal.SIGTERM if isinstance(e, Terminated) else 128 + signal.SIGINT
