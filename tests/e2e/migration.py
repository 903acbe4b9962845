"""Live migration of a real guest between two QEMU processes, each with its own vhostfs.

QEMU 8.2 and later migrate a vhost-user-fs device through its back end's state (SET_DEVICE_STATE_FD),
so these tests need QEMU 10 (the debian13 stack); the guest is the usual busybox initramfs, which
carries its workload itself (a guest on a 9p root cannot migrate). The destination QEMU has the
source's command line plus `-incoming URI`; the source is told to `migrate` over QMP.

`Qmp` is a QMP client in a few lines over the monitor's Unix socket; `Vm` is one QEMU with its daemon.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from .guest import REPO, cpio_archive


class QmpError(Exception):
    """A QMP command failed; the message is QEMU's."""


class Qmp:
    """A QMP connection (docs/interop/qmp-spec.rst): greeting, qmp_capabilities, then commands."""

    def __init__(self, path: Path, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rb")
        self._read()  # the greeting
        self.command("qmp_capabilities")

    def _read(self) -> dict:
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("QMP connection closed")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def command(self, name: str, **arguments: object) -> object:
        self.sock.sendall(json.dumps({"execute": name, "arguments": arguments}).encode() + b"\n")
        reply = self._read()
        if "error" in reply:
            raise QmpError(f"{name}: {reply['error'].get('desc')}")
        return reply.get("return")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class Vm:
    """One QEMU (binary `qemu`) with its own vhostfs daemon on `share`; `incoming` makes it a
    migration destination. Console output goes to `run/NAME.console`, the daemon's log to
    `run/NAME.daemon`. The initrd (the guest's initramfs with `script` as /cmd.sh and `extra_files`)
    is made by the first Vm of a `run` directory and shared by the others, which must be the same
    guest: a migration destination has the source's command line. `daemon` replaces vhostfs
    (`python -m vhostfs`) with another back end taking --socket-path and --shared-dir (virtiofsd)."""

    def __init__(self, name: str, run: Path, qemu: str, images, share: Path, script: str,
                 extra_files: dict[str, bytes], daemon_args: list[str], *, mem: int = 512, smp: int = 2,
                 num_request_queues: int = 1, incoming: str | None = None,
                 daemon: list[str] | None = None) -> None:
        self.name = name
        self.run = run
        self.console_path = run / f"{name}.console"
        self.daemon_log = run / f"{name}.daemon"
        sock = run / f"{name}.sock"
        self.qmp_path = run / f"{name}.qmp"
        initrd = run / "initrd.img"
        if not initrd.exists():
            initrd.write_bytes(images.initrd.read_bytes()
                               + cpio_archive({"cmd.sh": script.encode(), **extra_files}))
        with open(self.daemon_log, "wb") as log:
            self.daemon = subprocess.Popen(
                [*(daemon or [sys.executable, "-m", "vhostfs"]), "--socket-path", str(sock),
                 "--shared-dir", str(share), *daemon_args],
                cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while not sock.is_socket():
            if self.daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon {name} did not start:\n{self.daemon_log.read_text()}")
            time.sleep(0.05)
        tag = "vhostfs"
        argv = [
            qemu, "-accel", "tcg", "-cpu", "max", "-smp", str(smp), "-m", str(mem),
            "-object", f"memory-backend-memfd,id=mem,size={mem}M,share=on", "-numa", "node,memdev=mem",
            "-kernel", str(images.kernel), "-initrd", str(initrd),
            "-append", f"console=ttyS0 quiet panic=-1 vhostfs.tag={tag}",
            "-chardev", f"socket,id=vhostfs,path={sock}",
            "-device", f"vhost-user-fs-pci,chardev=vhostfs,tag={tag},queue-size=1024,"
            f"num-request-queues={num_request_queues}",
            "-serial", f"file:{self.console_path}", "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-display", "none", "-vga", "none", "-net", "none", "-no-reboot",
        ]  # fmt: skip
        if incoming is not None:
            argv += ["-incoming", incoming]
        self.qemu_log = run / f"{name}.qemu"
        with open(self.qemu_log, "wb") as log:
            self.qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self.qmp = Qmp(self.qmp_path)

    def console(self) -> str:
        try:
            return self.console_path.read_bytes().decode(errors="replace").replace("\r", "")
        except FileNotFoundError:
            return ""

    def wait_console(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.console():
            if self.qemu.poll() is not None:
                raise AssertionError(f"{self.name}: QEMU exited before {text!r}:\n{self.describe()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {text!r} in {timeout} s:\n{self.describe()}")
            time.sleep(0.2)

    def migrate(self, uri: str, timeout: float = 300) -> dict:
        """Migrates to `uri` and waits for the outcome; returns query-migrate's last answer."""
        self.qmp.command("migrate", uri=uri)
        deadline = time.monotonic() + timeout
        while True:
            info = self.qmp.command("query-migrate")
            assert isinstance(info, dict)
            if info.get("status") in ("completed", "failed", "cancelled"):
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: migration did not end in {timeout} s: {info}")
            time.sleep(0.1)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.qemu.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name}: QEMU still runs after {timeout} s:\n{self.describe()}") from None

    def describe(self, tail: int = 40) -> str:
        def last(path: Path) -> str:
            try:
                return "\n".join(path.read_text(errors="replace").splitlines()[-tail:])
            except FileNotFoundError:
                return ""
        return (f"--- {self.name} console ---\n{last(self.console_path)}\n--- {self.name} QEMU ---\n"
                f"{last(self.qemu_log)}\n--- {self.name} daemon ---\n{last(self.daemon_log)}")

    def stop(self) -> None:
        try:
            self.qmp.close()
        except OSError:
            pass
        for proc in (self.qemu, self.daemon):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
