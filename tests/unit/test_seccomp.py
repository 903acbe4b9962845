"""The seccomp filter blocks what is off its list, in each mode, and refuses machines without a table.

Each case installs the real filter in a forked child (a filter cannot be removed again) and makes one
call that is on the list and one that is not: getppid(2), which the daemon never makes.
"""

from __future__ import annotations

import os
import signal

import pytest

from vhostfs import cli, seccomp

pytestmark = pytest.mark.skipif(not seccomp.supported(), reason=f"{seccomp.UNSUPPORTED}")

assert "getppid" not in seccomp.SYSCALLS_X86_64
_GETPPID_X86_64 = 110


def _in_child(mode: str, body) -> tuple[int, bytes]:
    """Runs body() in a child under the filter of `mode`; returns its wait status and what it wrote
    (`_in_child.pid` is the child's pid)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            seccomp.install(mode)
            os.write(w, b"installed\n")
            os.write(w, body())
        finally:
            os._exit(0)
    os.close(w)
    _in_child.pid = pid
    _, status = os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        return status, f.read()


def test_kill_ends_the_process_at_the_first_call_off_the_list():
    status, out = _in_child("kill", lambda: b"ppid %d\n" % os.getppid())
    assert out == b"installed\n"  # write(2) is on the list; nothing after getppid(2) ran
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS


def test_trap_raises_sigsys_and_the_call_does_not_happen():
    def body() -> bytes:
        hits = []
        signal.signal(signal.SIGSYS, lambda signum, frame: hits.append(signum))
        try:
            os.getppid()
        except OSError:
            pass
        return b"sigsys %d\n" % len(hits)

    status, out = _in_child("trap", body)
    assert out == b"installed\nsigsys 1\n"
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_log_lets_the_call_through_and_the_kernel_logs_it():
    parent = os.getpid()
    status, out = _in_child("log", lambda: b"ppid %d\n" % os.getppid())
    assert out == b"installed\nppid %d\n" % parent
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    try:
        logged = open("/proc/sys/kernel/seccomp/actions_logged").read().split()
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        pytest.skip(f"cannot read the kernel log here: {e}")
    assert "log" in logged
    records = []
    try:
        while True:
            try:
                records.append(os.read(fd, 8192).decode(errors="replace"))  # one record per read
            except BrokenPipeError:
                continue  # records overwritten while reading: go on with the next
            except BlockingIOError:
                break
    finally:
        os.close(fd)
    pid = _in_child.pid
    assert any("type=1326" in rec and f" pid={pid} " in rec and f" syscall={_GETPPID_X86_64} " in rec
               for rec in records), \
        "no seccomp audit record of getppid(2) in the kernel log"


def test_every_mode_allows_what_is_on_the_list():
    for mode in seccomp.ACTIONS:
        status, out = _in_child(mode, lambda: b"pid ok %d\n" % (os.getpid() > 0))
        assert out == b"installed\npid ok 1\n" and os.WIFEXITED(status), mode


def test_a_machine_without_a_table_is_refused_clearly(monkeypatch, capsys):
    real = os.uname()
    fake = os.uname_result((real.sysname, real.nodename, real.release, real.version, "riscv64"))
    monkeypatch.setattr(seccomp.os, "uname", lambda: fake)
    with pytest.raises(seccomp.SeccompError, match="riscv64"):
        seccomp.install("kill")
    with pytest.raises(SystemExit) as exc:
        cli._parse(["--socket-path", "/nonexistent/s", "--shared-dir", "/", "--seccomp", "kill"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "riscv64" in err and "x86_64" in err and "--seccomp=none" in err
