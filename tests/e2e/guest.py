"""Boots a real QEMU guest whose virtio-fs share is served by the daemon under test.

The guest (Debian kernel + busybox initramfs, see scripts/build-guest.sh and scripts/guest-init) mounts
the share on /mnt, runs the test's shell script there, reports its exit status on the console, unmounts
and powers off. The script reaches the guest as /cmd.sh in a small cpio archive appended to a copy of
the initrd: the kernel unpacks every archive of a concatenation, so the base image is never rebuilt.
"""

import functools
import gzip
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.needs import running_in_ci, skip_unless_ci  # noqa: F401 (the harness's rule, for the tests)

REPO = Path(__file__).resolve().parents[2]
BUILD_GUEST = REPO / "scripts" / "build-guest.sh"
# build-guest.sh's status for "something needed cannot be had here" (see scripts/common.sh).
EXIT_UNAVAILABLE = 3
# What build-guest.sh needs on the host; it installs them itself when it runs as root with apt-get.
HOST_TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "busybox": "busybox-static",
    "depmod": "kmod",
    "cpio": "cpio",
}

DAEMON_ENV = "VHOSTFS_E2E_DAEMON"
DEFAULT_DAEMON = [sys.executable, "-m", "vhostfs", "--socket-path", "{sock}", "--shared-dir", "{dir}"]

# Seconds QEMU may go on running after the daemon has exited (see _run_qemu).
DAEMON_EXIT_GRACE = 10

_EXIT_MARKER = re.compile(r"^VHOSTFS-GUEST-EXIT=(\d+)$", re.MULTILINE)


class GuestUnavailable(Exception):
    """The guest cannot be built on this machine; the message says what is missing."""


class GuestError(Exception):
    """Booting failed before the guest ran, e.g. the daemon never created its socket."""


# The stacks a guest can be booted on (scripts/stack.sh): Debian 12's QEMU 7.2 with a Linux 6.1 guest,
# Debian 13's QEMU 10.0 with Linux 6.12, and Debian testing's QEMU 11.1 with Linux 7.2.
STACKS = ("debian12", "debian13", "forky")
DEFAULT_STACK = "debian12"


@dataclass(frozen=True)
class GuestImages:
    kernel: Path
    initrd: Path
    qemu: str  # the stack's qemu-system-x86_64


@dataclass(frozen=True)
class GuestResult:
    exit_status: int | None  # the script's, or None when the guest never reported one
    console_output: str
    daemon_log: str

    @property
    def mounted(self) -> bool:
        return _has_marker(self.console_output, "VHOSTFS-GUEST-MOUNTED")

    @property
    def unmounted(self) -> bool:
        return _has_marker(self.console_output, "VHOSTFS-GUEST-UNMOUNTED")

    def lines_starting(self, prefix: str) -> list[str]:
        """The console lines that start with prefix, with it removed."""
        return [
            line.removeprefix(prefix) for line in self.console_output.splitlines() if line.startswith(prefix)
        ]

    def describe(self, tail: int = 60) -> str:
        """The ends of the console and the daemon log, for assertion messages."""
        console = "\n".join(self.console_output.splitlines()[-tail:])
        daemon = "\n".join(self.daemon_log.splitlines()[-tail:])
        return (
            f"exit status {self.exit_status}\n--- guest console ---\n{console}\n--- daemon log ---\n{daemon}"
        )


def _has_marker(console: str, marker: str) -> bool:
    return re.search(rf"^{marker}\b", console, re.MULTILINE) is not None


def daemon_command() -> list[str]:
    """The daemon under test: $VHOSTFS_E2E_DAEMON (shell-quoted, with {sock} and {dir}) or vhostfs."""
    override = os.environ.get(DAEMON_ENV)
    return shlex.split(override) if override else list(DEFAULT_DAEMON)


@functools.cache
def build_guest(stack: str = DEFAULT_STACK) -> GuestImages:
    """Builds the guest of stack with scripts/build-guest.sh (once per process and stack).

    For the stacks other than debian12 this first unpacks that Debian release's QEMU and kernel
    (scripts/stack.sh), which takes a minute or two the first time on a machine.
    """
    if stack not in STACKS:
        raise ValueError(f"unknown stack {stack!r}; one of {', '.join(STACKS)}")
    missing = [
        f"{tool} (package {package})" for tool, package in HOST_TOOLS.items() if not shutil.which(tool)
    ]
    if missing and (os.geteuid() != 0 or not shutil.which("apt-get")):
        raise GuestUnavailable(
            f"missing {', '.join(missing)}; build-guest.sh installs them only as root with apt"
        )
    proc = subprocess.run(
        [str(BUILD_GUEST), "--stack", stack], stdin=subprocess.DEVNULL, capture_output=True, text=True
    )
    if proc.returncode == EXIT_UNAVAILABLE:
        raise GuestUnavailable(f"cannot build the guest: {proc.stderr.strip()}")
    if proc.returncode != 0:
        raise RuntimeError(f"{BUILD_GUEST} failed with status {proc.returncode}:\n{proc.stderr}")
    kernel, initrd, qemu = proc.stdout.split()
    return GuestImages(Path(kernel), Path(initrd), qemu)


def static_program(name: str, c_source: str) -> bytes:
    """The guest program `name` compiled from `c_source`, linked static: the busybox guest has no libc
    of its own. Raises GuestUnavailable, saying what is missing, when it cannot be built here."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise GuestUnavailable(f"no C compiler (gcc) to build the guest program {name}")
    with tempfile.TemporaryDirectory(prefix=f"vhostfs-{name}-") as tmp:
        out = Path(tmp) / name
        proc = subprocess.run([cc, "-static", "-O2", "-Wall", "-x", "c", "-o", str(out), "-"], input=c_source,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise GuestUnavailable(f"cannot build the guest program {name} static (gcc, libc6-dev): "
                                   f"{proc.stderr.strip()}")
        return out.read_bytes()


def cpio_archive(files: Mapping[str, bytes]) -> bytes:
    """A gzip'd newc cpio archive of executable regular files owned by root."""
    out = bytearray()

    def member(ino: int, mode: int, name: str, data: bytes) -> None:
        encoded = name.encode() + b"\0"
        # c_ino, c_mode, c_uid, c_gid, c_nlink, c_mtime, c_filesize, c_devmajor, c_devminor,
        # c_rdevmajor, c_rdevminor, c_namesize, c_check
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        out.extend(b"070701" + b"".join(b"%08X" % field for field in fields) + encoded)
        out.extend(b"\0" * (-len(out) % 4))  # the name is padded so that the data starts 4-aligned
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, data) in enumerate(files.items(), start=1):
        member(ino, 0o100755, name, data)
    member(0, 0, "TRAILER!!!", b"")
    return gzip.compress(bytes(out))


def boot_guest(
    script: str,
    shared_dir: str | os.PathLike[str],
    daemon_cmd: Sequence[str],
    *,
    mem: int = 1024,
    queue_size: int = 1024,
    num_request_queues: int = 1,
    smp: int = 2,
    tag: str = "vhostfs",
    mount_opts: str | None = None,
    timeout: float = 600,
    daemon_started: Callable[[int], None] | None = None,
    stack: str = DEFAULT_STACK,
    dax_window_size: str | None = None,
    reboot: bool = False,
    files: Mapping[str, bytes] | None = None,
    run_dir_owner: tuple[int, int] | None = None,
) -> GuestResult:
    """Serves shared_dir with daemon_cmd ({sock}, {dir} substituted) and runs script in a guest on it.

    stack names the QEMU and guest kernel (one of STACKS).

    dax_window_size (e.g. "64M") gives the guest a DAX window: the daemon gets --tag and
    --dax-window-size, and the device is QEMU 11.1's generic vhost-user device as virtio-fs, which
    takes the window, tag and queues from the back end (stack "forky"); the guest mounts with
    dax=always unless mount_opts says otherwise. With reboot, a guest that reboots goes on running
    (the script then runs again: it can tell the boots apart by a file it leaves in the share).

    daemon_started, if given, is called with the daemon's pid once its socket exists, before QEMU
    starts (e.g. to watch the daemon's resources from another thread while the guest runs).
    files are more executables for the guest's root (name -> contents), beside /cmd.sh.
    run_dir_owner (uid, gid) gives the directory of the socket to that user, for a daemon that runs
    as someone else than the tests.
    """
    images = build_guest(stack)
    with tempfile.TemporaryDirectory(prefix="vhostfs-e2e-") as tmp:
        run = Path(tmp)
        if run_dir_owner is not None:
            os.chown(run, *run_dir_owner)
        sock = run / "vhostfs.sock"
        initrd = run / "initrd.img"
        archive = cpio_archive({"cmd.sh": script.encode(), **(files or {})})
        initrd.write_bytes(images.initrd.read_bytes() + archive)
        argv = [
            arg.replace("{sock}", str(sock)).replace("{dir}", os.fspath(shared_dir)) for arg in daemon_cmd
        ]
        device = (
            f"vhost-user-fs-pci,chardev=vhostfs,tag={tag},queue-size={queue_size},"
            f"num-request-queues={num_request_queues}"
        )
        if dax_window_size is not None:
            argv += ["--tag", tag, "--dax-window-size", dax_window_size]
            # virtio-fs is device 26: the hiprio queue and the request queues, and a configuration
            # space of the 36-byte tag and the request queue count (virtio 1.2, 5.11.4).
            device = (
                f"vhost-user-test-device-pci,chardev=vhostfs,virtio-id=26,num_vqs={1 + num_request_queues},"
                f"config_size=40,vq_size={queue_size}"
            )
            mount_opts = mount_opts or "dax=always"
        log_path = run / "daemon.log"
        with open(log_path, "wb") as log:
            # cwd: `python -m vhostfs` then finds the package even where it is not installed.
            daemon = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            _wait_for_socket(sock, daemon, log_path)
            if daemon_started is not None:
                daemon_started(daemon.pid)
            append = f"console=ttyS0 quiet panic=-1 vhostfs.tag={tag}"
            if mount_opts:
                append += f" vhostfs.opts={mount_opts}"
            qemu = [
                images.qemu, "-accel", "tcg", "-cpu", "max", "-smp", str(smp), "-m", str(mem),
                # vhost-user needs guest RAM in a shareable memfd that the daemon can map.
                "-object", f"memory-backend-memfd,id=mem,size={mem}M,share=on", "-numa", "node,memdev=mem",
                "-kernel", str(images.kernel), "-initrd", str(initrd), "-append", append,
                "-chardev", f"socket,id=vhostfs,path={sock}", "-device", device,
                "-serial", "stdio", "-monitor", "none", "-display", "none", "-vga", "none", "-net", "none",
                *([] if reboot else ["-no-reboot"]),
            ]  # fmt: skip
            console = _run_qemu(qemu, timeout, daemon, run / "console.log")
        finally:
            _stop(daemon)
        daemon_log = log_path.read_text(errors="replace")
    matches = _EXIT_MARKER.findall(console)
    return GuestResult(int(matches[-1]) if matches else None, console, daemon_log)


def _wait_for_socket(sock: Path, daemon: subprocess.Popen[bytes], log_path: Path, limit: float = 20) -> None:
    deadline = time.monotonic() + limit
    while not sock.is_socket():
        if daemon.poll() is not None:
            raise GuestError(
                f"daemon exited with status {daemon.returncode} before creating its socket:\n"
                f"{log_path.read_text(errors='replace')}"
            )
        if time.monotonic() > deadline:
            raise GuestError(
                f"daemon created no socket in {limit} s:\n{log_path.read_text(errors='replace')}"
            )
        time.sleep(0.05)


def _run_qemu(argv: list[str], timeout: float, daemon: subprocess.Popen[bytes], console_path: Path) -> str:
    """Runs QEMU to completion and returns its console output (the serial line, without CRs).

    A guest whose daemon has died waits for its replies forever, so QEMU is stopped a little after
    the daemon exits (a little: some daemons exit by themselves once QEMU disconnects at power-off).
    """
    with open(console_path, "wb") as console:
        qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    daemon_gone: float | None = None
    note = ""
    while qemu.poll() is None:
        now = time.monotonic()
        if daemon_gone is None and daemon.poll() is not None:
            daemon_gone = now
        if daemon_gone is not None and now - daemon_gone > DAEMON_EXIT_GRACE:
            note = f"[qemu killed: the daemon exited with status {daemon.returncode} while the guest ran]"
        elif now > deadline:
            note = f"[qemu killed after {timeout} s]"
        if note:
            qemu.kill()
            qemu.wait()
            break
        time.sleep(0.2)
    if not note and qemu.returncode != 0:
        note = f"[qemu exited with status {qemu.returncode}]"
    output = console_path.read_bytes().decode(errors="replace").replace("\r", "")
    return f"{output}\n{note}" if note else output


def _stop(daemon: subprocess.Popen[bytes]) -> None:
    if daemon.poll() is None:
        daemon.terminate()
        try:
            daemon.wait(timeout=10)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
