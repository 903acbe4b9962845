"""The daemon a benchmark measures, started so that the benchmark cannot hang on it.

`daemon(sock, share, *options)` starts `python -m vhostfs` and waits for its socket (at most 30 s; a
daemon that exits first is reported at once). Until the benchmark calls `done()` on what it yields
(before it disconnects: the daemon then exits by itself), a watcher thread waits on the daemon: if it
exits, the benchmark's main thread gets `DaemonDied` even while it blocks waiting for a reply (a
signal interrupts the wait), and `main_guard` turns that into a message and exit status 1 instead of
a traceback or a hang.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager


class DaemonDied(Exception):
    """The daemon exited while the benchmark was using it."""


class Watched:
    """The running daemon (`proc`); `done()` says the benchmark no longer needs it."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.finished = threading.Event()

    def done(self) -> None:
        self.finished.set()


@contextmanager
def daemon(sock: str, share: str, *options: str, wrapper: Sequence[str] = ()) -> Iterator[Watched]:
    """Runs the daemon on `sock` serving `share` for the `with` block (under `wrapper`, e.g. a
    profiler, if given); stops it afterwards."""
    proc = subprocess.Popen([*wrapper, sys.executable, "-m", "vhostfs", "--socket-path", sock,
                             "--shared-dir", share, "--log-level", "error", *options])
    watched = Watched(proc)
    done = watched.finished
    main = threading.main_thread().ident
    assert main is not None

    def _raise(signum: int, frame: object) -> None:
        if not done.is_set():
            raise DaemonDied(f"the daemon exited with status {proc.returncode} during the benchmark")

    previous = signal.signal(signal.SIGUSR1, _raise)

    def watch() -> None:
        proc.wait()
        if not done.is_set():
            print(f"benchmark: the daemon exited with status {proc.returncode}", file=sys.stderr, flush=True)
            signal.pthread_kill(main, signal.SIGUSR1)

    watcher = threading.Thread(target=watch, daemon=True)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if proc.poll() is not None:
                raise DaemonDied(f"the daemon exited with status {proc.returncode} before it listened")
            if time.monotonic() > deadline:
                raise DaemonDied("the daemon did not listen within 30 s")
            time.sleep(0.05)
        watcher.start()
        yield watched
    finally:
        done.set()
        if proc.poll() is None:
            # It exits by itself once the front end disconnects; a daemon that does not is stopped.
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait()
        signal.signal(signal.SIGUSR1, previous)


def main_guard(main: Callable[[], None]) -> None:
    """Runs a benchmark's `main`, exiting with status 1 and a message if the daemon died."""
    try:
        main()
    except DaemonDied as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        sys.exit(1)
