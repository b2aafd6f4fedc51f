"""QEMU (TCG) end-to-end harness: boot a real Debian kernel, and kexec an ELF from inside it.

This machine's /dev/kvm is nested PVM, on which ``qemu-system-x86_64 -enable-kvm`` cannot run
firmware, so every boot here is ``-accel tcg`` (a Debian 6.1 kernel reaches its initramfs in
about 5 s). The pieces:

- :func:`build_initramfs` writes a newc cpio with the project's one writer, :mod:`scripts.newc`
  (no root, deterministic: fixed inode numbers, mtime 0, sorted entries) holding static
  busybox, Debian's ``kexec`` with the shared objects it needs, ``/dev/console`` and any extra
  files.
- :func:`boot` runs one bounded QEMU, streams the serial port and stops as soon as a regex
  appears (or a failure regex, or the timeout). QEMU is always killed. It is the one
  boot-and-wait loop: a kernel booted directly (SeaBIOS, or OVMF for ``target.py``), or
  firmware booting a disk (``ovmf_tpm.boot_uki``, ``tests/efi/run_ovmf.py``).
- :func:`guest_e820` boots once per (kernel, memory size) and test session and returns the
  ``BIOS-e820:`` lines that guest's kernel printed: the target map for ``vmrun run --memmap``.
- :func:`kexec_boot` boots a kernel whose /init runs ``kexec -l /staged.elf -t elf-x86_64
  --args-none`` and ``kexec -e``, and returns the serial text of the whole session.
- :func:`build_kexec_hello` assembles ``kexec_hello.S`` into a one-segment ELF at 16 MiB.

Debian's kexec-tools 2.0.25 is linked against ``libxenctrl.so.4.17`` (only used when running as a
Xen dom0). The host does not have it, so a stub with the same soname and symbol versions is
compiled here whose ``xc_interface_open`` returns NULL: kexec-tools then takes the native
``kexec_load(2)`` path, exactly as on a machine without Xen.

Markers printed on the serial port by the /init scripts: ``VMRUN-E820-BEGIN`` /
``VMRUN-E820-END``, ``VMRUN-KEXEC-LOADING``, ``VMRUN-KEXEC-LOADED``, ``VMRUN-KEXEC-EXEC`` and
``VMRUN-KEXEC-FAILED``.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from scripts import fetch_payloads, newc

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

QEMU = "qemu-system-x86_64"
DEFAULT_APPEND = "console=ttyS0,115200 panic=-1 loglevel=6"
# The marker kexec_boot's /init prints when anything before the jump fails, and what a dying
# kernel prints: either ends a run at once instead of waiting for the timeout.
KEXEC_FAILED = "VMRUN-KEXEC-FAILED"
FAIL_PATTERN = rf"{KEXEC_FAILED}|Kernel panic - not syncing"
KEXEC_HELLO_BASE = 0x1000000  # 16 MiB: RAM on any PC guest with >= 32 MiB
KEXEC_HELLO_MARKER = "HELLO-FROM-KEXEC"


# --------------------------------------------------------------------------
# where things are
# --------------------------------------------------------------------------

def payload_cache() -> Path:
    return Path(os.environ.get("VMRUN_CACHE") or REPO / ".cache" / "payloads")


def work_dir() -> Path:
    """A per-user directory for what this harness builds (shared by xdist workers)."""
    d = Path(os.environ.get("VMRUN_E2E_WORK") or
             Path(tempfile.gettempdir()) / f"vmrun-e2e-{os.getuid()}")
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextmanager
def _locked(name: str):
    """An exclusive lock across processes (pytest-xdist workers build things once)."""
    with open(work_dir() / f"{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --------------------------------------------------------------------------
# kexec-tools and what it needs
# --------------------------------------------------------------------------

def kexec_binary() -> Path:
    p = payload_cache() / "tools" / "kexec-tools" / "sbin" / "kexec"
    if not p.is_file():
        raise FileNotFoundError(f"{p} is missing: run scripts/fetch-payloads")
    return p


def busybox_binary() -> Path:
    p = payload_cache() / "tools" / "busybox"
    if not p.is_file():
        raise FileNotFoundError(f"{p} is missing: run scripts/fetch-payloads")
    return p


_XENCTRL_STUB_C = r"""
/* Stands in for Xen's libxenctrl.so.4.17, which Debian's kexec is linked against. Opening the
   Xen control interface fails, so kexec-tools decides it is not a Xen dom0 and uses the
   kexec_load(2) system call; nothing else here is ever called. The signatures only need to
   link: the symbols' names, versions and (for the data object) size are what count. */
#include <stddef.h>
void *xc_interface_open(void *a, void *b, unsigned c) { return NULL; }
int xc_interface_close(void *x) { return 0; }
int xc_version(void *x, int cmd, void *arg) { return -1; }
int xc_get_max_cpus(void *x) { return -1; }
int xc_get_machine_memory_map(void *x, void *e, unsigned n) { return -1; }
int xc_kexec_get_range(void *x, int r, int n, unsigned long *s, unsigned long *st) { return -1; }
int xc_kexec_load(void *x, int t, int a, unsigned long e, unsigned n, void *s) { return -1; }
int xc_kexec_unload(void *x, int t) { return -1; }
int xc_kexec_exec(void *x, int t) { return -1; }
int xc_kexec_status(void *x, int t) { return -1; }
void *xc__hypercall_buffer_array_alloc(void *x, void *a, unsigned i, void *b, size_t s)
{ return NULL; }
void *xc_hypercall_buffer_array_create(void *x, unsigned n) { return NULL; }
void xc_hypercall_buffer_array_destroy(void *x, void *a) { }
/* kexec references this 40-byte object (xc_hypercall_buffer_t) through a copy relocation */
unsigned char xc__hypercall_buffer_HYPERCALL_BUFFER_NULL[40];
"""

_XENCTRL_STUB_VERSIONS = "VERS_4.17.0 { global: xc_*; local: *; };\n"


def xenctrl_stub(soname: str = "libxenctrl.so.4.17") -> Path:
    """Compile (once) a stub ``libxenctrl`` with kexec-tools' soname and symbol versions."""
    key = hashlib.sha256((soname + _XENCTRL_STUB_C + _XENCTRL_STUB_VERSIONS).encode()).hexdigest()
    out = work_dir() / f"{soname}.{key[:12]}"
    with _locked("xenctrl"):
        if out.is_file():
            return out
        with tempfile.TemporaryDirectory(dir=work_dir()) as t:
            src, ver, so = Path(t, "xenctrl.c"), Path(t, "xenctrl.map"), Path(t, soname)
            src.write_text(_XENCTRL_STUB_C)
            ver.write_text(_XENCTRL_STUB_VERSIONS)
            subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-nostartfiles",
                            f"-Wl,-soname,{soname}", f"-Wl,--version-script,{ver}",
                            "-o", str(so), str(src)], check=True, capture_output=True)
            os.replace(so, out)
    return out


_LDD_FOUND = re.compile(r"^\s*(\S+)\s+=>\s+(/\S+)\s+\(0x[0-9a-f]+\)\s*$")
_LDD_MISSING = re.compile(r"^\s*(\S+)\s+=>\s+not found\s*$")
_LDD_LOADER = re.compile(r"^\s*(/\S+)\s+\(0x[0-9a-f]+\)\s*$")


def shared_objects(binary: Path) -> dict[str, Path]:
    """Where each shared object ``binary`` needs goes in the initramfs -> the file to put there.

    Resolved with the host's ``ldd`` (the host is Debian 12, the binaries' own release), at the
    host's paths, so the loader's built-in search path finds them. A missing libxenctrl is
    replaced by :func:`xenctrl_stub`.
    """
    r = subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ldd {binary} failed: {r.stdout}{r.stderr}")
    out: dict[str, Path] = {}
    for line in r.stdout.splitlines():
        if m := _LDD_FOUND.match(line):
            out[m[2]] = Path(m[2]).resolve()
        elif m := _LDD_MISSING.match(line):
            if not m[1].startswith("libxenctrl.so."):
                raise RuntimeError(f"{binary} needs {m[1]}, which this host does not have")
            out[f"/lib/x86_64-linux-gnu/{m[1]}"] = xenctrl_stub(m[1])
        elif m := _LDD_LOADER.match(line):
            out[m[1]] = Path(m[1]).resolve()
    return out


# --------------------------------------------------------------------------
# initramfs
# --------------------------------------------------------------------------

INIT_PREAMBLE = """\
#!/bin/busybox sh
/bin/busybox mkdir -p /bin /sbin /proc /sys /dev /tmp
/bin/busybox --install -s /bin
export PATH=/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
"""


def build_initramfs(out: Path, files: dict[str, Path | bytes], init_script: str, *,
                    with_kexec: bool = True, compress: bool = False) -> Path:
    """Write a newc initramfs to ``out`` and return ``out``.

    Contents: ``/bin/busybox`` (static; /bin/sh links to it, and ``busybox --install -s /bin``
    at the start of a script makes the other applets), ``/sbin/kexec`` with its shared objects
    and the dynamic loader (``with_kexec``), ``/dev/console`` and ``/dev/null``, ``/init`` =
    ``init_script`` (use :data:`INIT_PREAMBLE` to mount proc/sys/dev first), and ``files``
    (initramfs path -> host file or bytes). Deterministic for the same inputs. ``compress``:
    gzip (mtime 0); plain is faster to unpack for a TCG guest.
    """
    t = newc.Tree()
    for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "etc", "root"):
        t.dir(d)
    t.chardev("dev/console", 5, 1)
    t.chardev("dev/null", 1, 3, 0o666)
    t.file("bin/busybox", busybox_binary())
    t.symlink("bin/sh", "busybox")
    if with_kexec:
        kexec = kexec_binary()
        t.file("sbin/kexec", kexec)
        for where, src in shared_objects(kexec).items():
            t.file(where, src)
    for where, content in files.items():
        t.file(where, content if isinstance(content, bytes) else Path(content))
    t.file("init", init_script.encode())
    data = t.cpio()
    if compress:
        data = newc.gzipped(data, level=6)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(out, data)
    return out


# --------------------------------------------------------------------------
# running QEMU
# --------------------------------------------------------------------------

@dataclass
class QemuResult:
    serial: str                 # everything the guest wrote to COM1 (the console)
    returncode: int | None      # QEMU's exit status; None when we killed it
    seconds: float              # wall clock, start to end
    timed_out: bool             # the timeout ended the run
    matched: bool = False       # the ``until`` regex appeared (the run was then stopped)
    failed: bool = False        # the ``fail`` regex appeared (the run was then stopped)
    stderr: str = ""            # QEMU's own messages
    command: list[str] = field(default_factory=list)
    qemu_log: str = ""          # the -d log, with debug_log=True
    raw_serial: bytes = b""     # the serial bytes as they came (``serial`` is their text)

    def __str__(self) -> str:  # what an assertion message should show
        state = ("timed out" if self.timed_out else "matched" if self.matched
                 else "failure marker" if self.failed else f"exit {self.returncode}")
        tail = "\n".join(self.serial.splitlines()[-60:])
        s = f"QEMU {state} after {self.seconds:.1f}s\n--- serial (tail) ---\n{tail}"
        if self.stderr.strip():
            s += f"\n--- qemu stderr ---\n{self.stderr.strip()[-2000:]}"
        if self.qemu_log:
            s += f"\n--- qemu -d log (tail) ---\n{self.qemu_log[-4000:]}"
        return s


def _die_with_parent() -> None:
    """In the child: SIGKILL when the test process dies, so no QEMU outlives a killed pytest."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass
    os.setsid()


def qemu_command(kernel: Path | None, initramfs: Path | None, *, memory_mb: int,
                 append: str = DEFAULT_APPEND, extra_args=(), monitor: str = "none",
                 bios: Path | str | None = None, qemu: str = QEMU) -> list[str]:
    """One TCG QEMU with the console (COM1) on stdout and no reboot. ``kernel``: boot it
    directly (``-kernel``, ``-initrd`` when ``initramfs``, ``-append``); None: the firmware
    boots from whatever ``extra_args`` attach (a disk). ``bios``: the firmware image
    (``-bios``, e.g. OVMF) instead of QEMU's SeaBIOS; ``qemu``: another QEMU binary."""
    cmd = [qemu, "-accel", "tcg", "-m", str(memory_mb), "-smp", "1",
           *(["-bios", str(bios)] if bios is not None else []),
           "-nodefaults", "-display", "none", "-serial", "stdio", "-monitor", monitor,
           "-no-reboot"]
    if kernel is not None:
        cmd += ["-kernel", str(kernel)]
        if initramfs is not None:
            cmd += ["-initrd", str(initramfs)]
        cmd += ["-append", append]
    return [*cmd, *extra_args]


# Terminal escape sequences (CSI, charset selection, other two-byte escapes): UEFI firmware's
# ConOut adds them to what it mirrors on the serial port.
_ESCAPES = re.compile(rb"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[@-_]")


def clean_console(raw: bytes) -> str:
    """Serial bytes as plain text: terminal escape sequences, CRs and other control characters
    but newline and tab removed. What :func:`boot` gets as ``serial_text`` for firmware
    (OVMF) consoles."""
    text = _ESCAPES.sub(b"", raw).decode("utf-8", "replace")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return "".join(ch for ch in text if ch in "\n\t" or ch >= " ")


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


DEBUG_ITEMS_AT_START = "guest_errors,unimp"
DEBUG_ITEMS_LATER = "int,cpu_reset,guest_errors,unimp"


def _hmp(path: str, command: str, timeout: float = 10) -> str:
    """Send one command to QEMU's human monitor on a unix socket; return its answer."""
    import socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        buf = b""

        def until_prompt() -> bytes:
            nonlocal buf
            while b"(qemu) " not in buf:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                buf += chunk
            out, _, buf = buf.partition(b"(qemu) ")
            return out

        until_prompt()  # the banner
        sock.sendall(command.encode() + b"\n")
        return until_prompt().decode(errors="replace")



def spawn_captured(cmd: list[str]):
    """Start ``cmd`` with its stdout and stderr collected by two reader threads.

    Returns (process, stdout chunks, stderr chunks, condition, readers): the condition is
    notified whenever a chunk arrives and when a stream ends, so callers can wait for output.
    The process dies with this one (PDEATHSIG)."""
    chunks: list[bytes] = []
    err_chunks: list[bytes] = []
    cond = threading.Condition()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=_die_with_parent)

    def pump(stream, sink) -> None:
        for chunk in iter(lambda: os.read(stream.fileno(), 65536), b""):
            with cond:
                sink.append(chunk)
                cond.notify_all()
        with cond:
            cond.notify_all()

    readers = [threading.Thread(target=pump, args=(proc.stdout, chunks), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, err_chunks), daemon=True)]
    for r in readers:
        r.start()
    return proc, chunks, err_chunks, cond, readers

def boot(kernel: Path | None, initramfs: Path | None = None, *, memory_mb: int = 1536,
         append: str = DEFAULT_APPEND, timeout: float = 120, until: str | None = None,
         fail: str | None = None, extra_args=(), debug_log: bool = False,
         debug_from: str | None = None, bios: Path | str | None = None, qemu: str = QEMU,
         serial_text: Callable[[bytes], str] = _decode, linger: float = 0.0) -> QemuResult:
    """Boot ``kernel`` + ``initramfs`` under QEMU/TCG with the console on COM1 (stdout): the one
    boot-and-wait loop of the QEMU tests (the SeaBIOS and UEFI kexec guests, the OVMF+swtpm
    reference in ``ovmf_tpm.py`` and ``tests/efi/run_ovmf.py``).

    Returns when QEMU exits (poweroff, or reboot/triple fault with ``-no-reboot``), when the
    regex ``until`` (``matched``) or ``fail`` (``failed``) appears in the serial text, or after
    ``timeout`` seconds (``timed_out``); QEMU is killed in every case (and by ``timeout -s KILL``
    30 s later should this process be stopped first).

    ``kernel`` None: no ``-kernel``; the firmware (``bios``, e.g. OVMF; see
    :func:`qemu_command`) boots from a disk that ``extra_args`` attach. ``serial_text`` turns
    the serial bytes into the text that ``until`` and ``fail`` are searched in and that comes
    back as ``serial`` (default: UTF-8; :func:`clean_console` for firmware consoles, whose
    escape sequences would split markers); ``raw_serial`` has the bytes. ``linger``: after
    ``until`` matched, go on reading this many seconds before QEMU is killed (the rest of the
    marker's line).

    ``debug_log``: QEMU's ``-d`` log comes back in ``qemu_log``: ``guest_errors,unimp`` from the
    start and, once the regex ``debug_from`` appears on the serial port (switched on through
    the monitor; at once when ``debug_from`` is None), also ``int,cpu_reset``: every exception
    and interrupt with the registers, so a fault after a kexec shows vector, RIP, CR2, error
    code. (``-no-reboot`` ends QEMU at a triple fault, before any reset dump; ``int`` is the
    record of it.)
    """
    extra_args = list(extra_args)
    log_path = monitor_path = None
    monitor = "none"
    tmpdir = None
    if debug_log:
        tmpdir = tempfile.TemporaryDirectory(dir=work_dir())
        log_path = os.path.join(tmpdir.name, "qemu.log")
        items = DEBUG_ITEMS_LATER if debug_from is None else DEBUG_ITEMS_AT_START
        extra_args += ["-d", items, "-D", log_path]
        if debug_from is not None:
            monitor_path = os.path.join(tmpdir.name, "hmp.sock")
            monitor = f"unix:{monitor_path},server=on,wait=off"
    cmd = qemu_command(kernel, initramfs, memory_mb=memory_mb, append=append,
                       extra_args=extra_args, monitor=monitor, bios=bios, qemu=qemu)
    # timeout(1) as a second bound, in case this process is stopped before it kills QEMU.
    full = ["timeout", "-s", "KILL", str(int(timeout) + 30), *cmd]
    until_re = re.compile(until) if until else None
    fail_re = re.compile(fail) if fail else None
    debug_re = re.compile(debug_from) if monitor_path else None

    start = time.monotonic()
    proc, chunks, err_chunks, cond, readers = spawn_captured(full)

    matched = failed = timed_out = False
    searched_upto = 0  # bytes of serial output already searched
    monitor_note = ""
    try:
        with cond:
            while True:
                raw = b"".join(chunks)
                # search a little before the new output too: a marker may straddle two reads
                window = serial_text(raw[max(0, searched_upto - 256):])
                if debug_re and debug_re.search(window):
                    debug_re = None
                    try:
                        _hmp(monitor_path, f"log {DEBUG_ITEMS_LATER}")
                        monitor_note = f"[harness: 'log {DEBUG_ITEMS_LATER}' sent at " \
                                       f"{time.monotonic() - start:.2f}s]\n"
                    except OSError as e:
                        monitor_note = f"[harness: monitor command failed: {e}]\n"
                if until_re and until_re.search(window):
                    matched = True
                    break
                if fail_re and fail_re.search(window):
                    failed = True
                    break
                searched_upto = len(raw)
                if proc.poll() is not None and not readers[0].is_alive():
                    break
                left = timeout - (time.monotonic() - start)
                if left <= 0:
                    timed_out = True
                    break
                cond.wait(min(left, 0.5))
        if matched and linger > 0:
            time.sleep(linger)  # the reader threads go on collecting meanwhile
    finally:
        returncode = proc.poll()
        if returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.kill()
            proc.wait()
        for r in readers:
            r.join(5)
        proc.stdout.close()
        proc.stderr.close()
    seconds = time.monotonic() - start
    qemu_log = ""
    if tmpdir is not None:
        try:
            with open(log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - (8 << 20)))  # the last 8 MiB at most
                qemu_log = monitor_note + f.read().decode("utf-8", "replace")
        except OSError:
            qemu_log = monitor_note
        tmpdir.cleanup()
    raw = b"".join(chunks)
    return QemuResult(serial=serial_text(raw), returncode=returncode, seconds=seconds,
                      timed_out=timed_out, matched=matched, failed=failed,
                      stderr=b"".join(err_chunks).decode("utf-8", "replace"),
                      command=cmd, qemu_log=qemu_log, raw_serial=raw)


# --------------------------------------------------------------------------
# the guest's memory map
# --------------------------------------------------------------------------

_E820_LINE = re.compile(r"BIOS-e820: \[mem 0x[0-9a-f]+-0x[0-9a-f]+\] .*")
_RSDP_LINE = re.compile(r"ACPI: RSDP 0x([0-9A-Fa-f]+)\b")

E820_INIT = INIT_PREAMBLE + """\
echo VMRUN-E820-BEGIN
dmesg | grep -E "BIOS-e820:|ACPI: RSDP "
echo VMRUN-E820-END
sync
poweroff -f
"""


_E820_MEMO: dict[str, str] = {}


def _guest_boot_facts(kernel: Path, memory_mb: int, timeout: float, extra_args) -> str:
    """The first kernel's ``BIOS-e820:`` and ``ACPI: RSDP`` dmesg lines (one boot, cached)."""
    key = hashlib.sha256(repr((fetch_payloads.sha256(Path(kernel)), memory_mb, list(extra_args),
                               E820_INIT)).encode()).hexdigest()[:16]
    if key in _E820_MEMO:
        return _E820_MEMO[key]
    run = re.sub(r"[^0-9A-Za-z]", "", os.environ.get("PYTEST_XDIST_TESTRUNUID", ""))
    shared = work_dir() / f"e820-{memory_mb}m-{key}-{run}.txt" if run else None
    with _locked(f"e820-{key}"):
        if shared is not None and shared.is_file():
            text = shared.read_text()
        else:
            with tempfile.TemporaryDirectory(dir=work_dir()) as t:
                initrd = build_initramfs(Path(t, "e820.cpio"), {}, E820_INIT, with_kexec=False)
                r = boot(kernel, initrd, memory_mb=memory_mb, timeout=timeout,
                         until=r"VMRUN-E820-END", extra_args=extra_args)
            body = r.serial.split("VMRUN-E820-BEGIN", 1)[-1].split("VMRUN-E820-END", 1)[0]
            lines = [m[0].strip() for m in _E820_LINE.finditer(body)]
            if not r.matched or not lines:
                raise RuntimeError(f"no BIOS-e820 lines from the guest: {r}")
            lines += [f"ACPI: RSDP 0x{m[1]}" for m in _RSDP_LINE.finditer(body)][:1]
            text = "\n".join(lines) + "\n"
            if shared is not None:
                _atomic_write(shared, text.encode())
    _E820_MEMO[key] = text
    return text


def guest_e820(kernel: Path, memory_mb: int = 1536, *, timeout: float = 120,
               extra_args=()) -> str:
    """The ``BIOS-e820: [mem 0x…-0x…] TYPE`` lines a ``memory_mb`` QEMU guest's kernel prints.

    The text is what ``vmrun run --memmap FILE`` and ``TargetMemoryMap.from_text`` read. One
    boot per (kernel contents, memory size, extra QEMU arguments) and test session (shared with
    :func:`guest_acpi_rsdp`): remembered in this process, and shared by the pytest-xdist
    workers of one run through a file under :func:`work_dir` named after the run
    (``PYTEST_XDIST_TESTRUNUID``). A new session boots again, so a test of this function always
    tests a real boot.
    """
    text = _guest_boot_facts(kernel, memory_mb, timeout, extra_args)
    return "".join(line + "\n" for line in text.splitlines() if line.startswith("BIOS-e820:"))


def guest_acpi_rsdp(kernel: Path, memory_mb: int = 1536, *, timeout: float = 120,
                    extra_args=()) -> int | None:
    """The physical address of the guest's ACPI RSDP (SeaBIOS puts it in the BIOS area), as
    its kernel prints it: what ``vmrun stage --acpi-rsdp`` needs so that the kexec'd kernel,
    booted through EFI (no legacy scan), finds ACPI, e.g. to power off."""
    text = _guest_boot_facts(kernel, memory_mb, timeout, extra_args)
    m = _RSDP_LINE.search(text)
    return int(m[1], 16) if m else None


# --------------------------------------------------------------------------
# kexec inside the guest
# --------------------------------------------------------------------------

# Which paging mode the running kernel uses: Linux clears the la57 CPU flag when it does not
# run with 5-level paging (so /proc/cpuinfo shows it only under CR4.LA57 = 1).
PAGING_MODE_PROBE = ("if grep -qw la57 /proc/cpuinfo; then echo VMRUN-PAGING-5-LEVEL; "
                     "else echo VMRUN-PAGING-4-LEVEL; fi\n")

KEXEC_INIT = INIT_PREAMBLE + PAGING_MODE_PROBE + """\
echo VMRUN-KEXEC-LOADING
grep -i "system ram" /proc/iomem
if kexec -d -l /staged.elf -t elf-x86_64 --args-none >/tmp/kexec.log 2>&1; then
    cat /tmp/kexec.log
    echo VMRUN-KEXEC-LOADED
else
    echo "kexec -l exited with $?:"
    cat /tmp/kexec.log
    echo """ + KEXEC_FAILED + """
    poweroff -f
fi
echo VMRUN-KEXEC-EXEC
kexec -e
echo "kexec -e exited with $?"
echo """ + KEXEC_FAILED + """
poweroff -f
"""


def kexec_boot(kernel: Path, staged_elf: Path, *, memory_mb: int = 1536, timeout: float = 180,
               until: str | None = KEXEC_HELLO_MARKER, fail: str | None = FAIL_PATTERN,
               append: str = DEFAULT_APPEND, extra_args=(), debug_log: bool = False,
               debug_from: str | None = "VMRUN-KEXEC-LOADED",
               initramfs: Path | None = None) -> QemuResult:
    """Boot ``kernel``; its /init loads ``staged_elf`` with ``kexec -l … -t elf-x86_64
    --args-none`` (``-d``: kexec-tools' debug lines are printed), then ``kexec -e``.

    The serial text covers the whole session: the first kernel, the markers, and whatever the
    kexec'd code prints. The run stops at ``until`` (default: the hello program's marker),
    at ``fail`` (the /init's failure marker or a panic), at QEMU's exit (a triple fault resets,
    and ``-no-reboot`` turns that into an exit) or at ``timeout``. ``debug_log``: QEMU's
    exception log from ``debug_from`` on (see :func:`boot`), in ``qemu_log``. ``initramfs``:
    where to write the initramfs (default: a temporary file, removed afterwards).
    """
    files = {"staged.elf": Path(staged_elf)}
    if initramfs is not None:
        img = build_initramfs(Path(initramfs), files, KEXEC_INIT)
        return boot(kernel, img, memory_mb=memory_mb, append=append, timeout=timeout,
                    until=until, fail=fail, extra_args=extra_args, debug_log=debug_log,
                    debug_from=debug_from)
    with tempfile.TemporaryDirectory(dir=work_dir()) as t:
        img = build_initramfs(Path(t, "kexec.cpio"), files, KEXEC_INIT)
        return boot(kernel, img, memory_mb=memory_mb, append=append, timeout=timeout,
                    until=until, fail=fail, extra_args=extra_args, debug_log=debug_log,
                    debug_from=debug_from)


def build_flat_elf(source: Path | str, out: Path, base: int) -> Path:
    """Assemble 64-bit GNU as ``source`` (a file, or the text itself) into an ELF64 ET_EXEC
    with one PT_LOAD at physical = virtual address ``base`` and the entry at ``_start``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    obj = out.with_suffix(".o")
    if isinstance(source, Path):
        src_args, src_input = [str(source)], None
    else:
        src_args, src_input = ["-"], source.encode()
    subprocess.run(["as", "--64", "-o", str(obj), *src_args], input=src_input,
                   check=True, capture_output=True)
    # -N: text not page-aligned in the file, so the ELF headers are not loaded (one PT_LOAD)
    subprocess.run(["ld", "-m", "elf_x86_64", "-N", "-nostdlib", "-static", "--build-id=none",
                    "--no-warn-rwx-segments", "-z", "noexecstack", f"-Ttext={base:#x}",
                    "-e", "_start", "-o", str(out), str(obj)], check=True, capture_output=True)
    obj.unlink()
    return out


def build_kexec_hello(out: Path, base: int = KEXEC_HELLO_BASE) -> Path:
    """``kexec_hello.S`` as an ELF64 ET_EXEC: one PT_LOAD at ``base`` (= its entry) that prints
    :data:`KEXEC_HELLO_MARKER` on COM1 and halts."""
    return build_flat_elf(HERE / "kexec_hello.S", out, base)


def have_qemu() -> bool:
    return shutil.which(QEMU) is not None


# --------------------------------------------------------------------------
# vmrun itself inside the guest: the host's root over virtio 9p
# --------------------------------------------------------------------------

HOSTROOT_TAG = "hostroot"
GUEST_HOSTROOT = "/host"
VMRUN_LOAD_OK = "VMRUN-LOAD-OK"
VMRUN_LOAD_FAILED = "VMRUN-LOAD-FAILED"      # followed by " rc=N"
VMRUN_EXEC = "VMRUN-EXEC"
VMRUN_EXEC_FAILED = "VMRUN-EXEC-FAILED"      # followed by " rc=N": vmrun exec came back
GUEST_SETUP_FAILED = "VMRUN-GUEST-SETUP-FAILED"  # a module or the 9p mount did not work
# Ends a vmrun_load_boot run at once: setup failed, vmrun exec returned, or a kernel died.
VMRUN_LOAD_FAIL_PATTERN = rf"{GUEST_SETUP_FAILED}|{VMRUN_EXEC_FAILED}|Kernel panic - not syncing"


def ninep_modules(kernel: Path) -> list[Path]:
    """The kernel modules a guest running ``kernel`` loads (in this order) to mount a virtio
    9p share: ``scripts/fetch-payloads`` keeps them next to the cached kernel, in
    ``modules/`` with a ``load-order`` file (the ones the kernel has built in are left out)."""
    d = Path(kernel).parent / "modules"
    order = d / "load-order"
    if not order.is_file():
        raise FileNotFoundError(f"{order} is missing: run scripts/fetch-payloads")
    return [d / name for name in order.read_text().split()]


def hostroot_args(tag: str = HOSTROOT_TAG) -> list[str]:
    """QEMU arguments sharing this machine's ``/`` read-only with the guest (virtio 9p over
    PCI), mounted in the guest with ``mount -t 9p -o trans=virtio TAG DIR``. ``multidevs=remap``:
    / spans several host file systems, whose inode numbers could otherwise collide."""
    return ["-virtfs", f"local,path=/,mount_tag={tag},security_model=none,readonly=on,"
                       "multidevs=remap"]


def vmrun_load_init(modules: list[str], vmrun: list[str], staged: Path | str, *,
                    env: dict[str, str] | None = None, execute: bool = True) -> str:
    """A /init that loads ``modules`` (file names under /modules, in order), mounts the host's
    root (:func:`hostroot_args`) read-only at /host with the guest's /proc, /sys and /dev
    bound into it, then runs, chrooted there, ``VMRUN load STAGED`` (``vmrun``: the command
    as argv, host paths; ``env``: variables for it) and, when that worked and ``execute``,
    ``VMRUN exec``. Markers: ``VMRUN-LOAD-BEGIN Ts`` and ``VMRUN-LOAD-END Ts kexec_loaded=0|1``
    (guest uptime; what /sys/kernel/kexec_loaded says after ``load``) around the output of
    ``load``, :data:`VMRUN_LOAD_OK`, ``VMRUN-LOAD-FAILED rc=N``,
    :data:`VMRUN_EXEC`, ``VMRUN-EXEC-FAILED rc=N``, :data:`GUEST_SETUP_FAILED`; vmrun's own
    output goes to the console between them. The guest powers off unless the kexec happens."""
    import shlex
    q = shlex.quote
    root = GUEST_HOSTROOT
    setenv = " ".join(f"{k}={q(v)}" for k, v in (env or {}).items())
    prefix = f"{setenv + ' ' if setenv else ''}chroot {root} {' '.join(map(q, vmrun))}"
    fail = f'echo {GUEST_SETUP_FAILED}; poweroff -f'
    lines = [INIT_PREAMBLE.rstrip("\n")]
    for m in modules:
        lines.append(f"insmod /modules/{q(m)} || {{ echo \"insmod {m} failed\"; {fail}; }}")
    lines += [
        f"mkdir -p {root}",
        f"mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose {HOSTROOT_TAG} {root} "
        f"|| {{ echo 'mounting the 9p share failed'; {fail}; }}",
        *(f"mount -o bind /{d} {root}/{d} || {{ {fail}; }}" for d in ("proc", "sys", "dev")),
        'echo "VMRUN-LOAD-BEGIN $(cut -d" " -f1 /proc/uptime)s"',
        f"{prefix} load {q(str(staged))} 2>&1",
        "rc=$?",
        'echo "VMRUN-LOAD-END $(cut -d" " -f1 /proc/uptime)s kexec_loaded=$(cat /sys/kernel/kexec_loaded)"',
        f'if [ $rc -ne 0 ]; then echo "{VMRUN_LOAD_FAILED} rc=$rc"; sync; poweroff -f; fi',
        f"echo {VMRUN_LOAD_OK}",
    ]
    if execute:
        lines += [
            f"echo {VMRUN_EXEC}",
            f"{prefix} exec 2>&1",
            f'echo "{VMRUN_EXEC_FAILED} rc=$?"',
        ]
    lines += ["sync", "poweroff -f", ""]
    return "\n".join(lines)


def vmrun_load_boot(kernel: Path, staged_elf: Path, vmrun: list[str], *,
                    memory_mb: int = 1536, timeout: float = 180, until: str | None = None,
                    fail: str | None = VMRUN_LOAD_FAIL_PATTERN, append: str = DEFAULT_APPEND,
                    env: dict[str, str] | None = None, execute: bool = True,
                    extra_args=()) -> QemuResult:
    """Boot ``kernel`` with this machine's root shared read-only (:func:`hostroot_args`); its
    /init (:func:`vmrun_load_init`) runs vmrun's own ``load STAGED`` and ``exec`` inside the
    guest, from the host's files: ``vmrun`` is the command as argv and ``staged_elf`` a path
    on this machine (both seen at the same paths through the share). Stops at QEMU's exit
    (the guest powers off: after a failed load, or the kexec'd payload's own poweroff), at
    ``until``, at ``fail`` or at ``timeout``; the serial text covers both kernels."""
    modules = ninep_modules(kernel)
    files = {f"modules/{m.name}": m for m in modules}
    init = vmrun_load_init([m.name for m in modules], vmrun, Path(staged_elf).resolve(),
                           env=env, execute=execute)
    with tempfile.TemporaryDirectory(dir=work_dir()) as t:
        img = build_initramfs(Path(t, "vmrun-load.cpio"), files, init, with_kexec=False)
        return boot(kernel, img, memory_mb=memory_mb, append=append, timeout=timeout,
                    until=until, fail=fail, extra_args=[*hostroot_args(), *extra_args])
