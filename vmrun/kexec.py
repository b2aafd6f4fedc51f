"""kexec_load(2) and reboot(2) through ctypes: ``vmrun load`` / ``unload`` / ``exec``.

The handoff ELF's PT_LOAD segments go to kexec_load exactly as kexec-tools would pass them
(page-aligned physical destinations, entry = the purgatory), after checking that the file was
staged for this machine: its memory-map digest must equal this host's map (for ``--crash``,
every segment must lie inside the crash kernel reservation instead).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import pathlib
import re

from hostsvc.memmap import TargetMemoryMap
from vmrun.errors import VmrunError
from vmrun.handoff import elf
from vmrun.vm.layout import PAGE_SIZE

SYS_KEXEC_LOAD = 246
SYS_REBOOT = 169
KEXEC_ON_CRASH = 0x1
KEXEC_ARCH_X86_64 = 62 << 16
LINUX_REBOOT_MAGIC1 = 0xFEE1DEAD
LINUX_REBOOT_MAGIC2 = 672274793
LINUX_REBOOT_CMD_KEXEC = 0x45584543
KEXEC_SEGMENT_MAX = 16

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class KexecError(VmrunError):
    """kexec_load/reboot refused, or the handoff does not fit this machine."""
    exit_code = 50
    kind = "kexec"


class HandoffMismatch(KexecError):
    exit_code = 51
    kind = "handoff_mismatch"


class kexec_segment(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("bufsz", ctypes.c_size_t),
                ("mem", ctypes.c_void_p), ("memsz", ctypes.c_size_t)]


def _explain_eperm(euid: int | None = None, proc: str = "/proc", security: str = "/sys/kernel/security") -> str:
    """Why kexec_load/reboot said EPERM: not root, the sysctl, or kernel lockdown."""
    reasons = []
    if (os.geteuid() if euid is None else euid) != 0:
        reasons.append("not running as root (kexec needs CAP_SYS_BOOT)")
    try:
        if pathlib.Path(proc, "sys/kernel/kexec_load_disabled").read_text().strip() == "1":
            reasons.append("kexec_load is disabled (sysctl kernel.kexec_load_disabled=1, "
                           "which cannot be undone until reboot)")
    except OSError:
        pass
    try:
        lockdown = pathlib.Path(security, "lockdown").read_text()
        m = re.search(r"\[(\w+)\]", lockdown)
        if m and m.group(1) != "none":
            reasons.append(f"kernel lockdown is active ({m.group(1)}): kexec_load of unsigned images is forbidden")
    except OSError:
        pass
    return "; ".join(reasons) or "operation not permitted"


CAP_SYS_BOOT = 22


def _has_cap_sys_boot(status: str = "/proc/self/status") -> bool:
    try:
        for line in pathlib.Path(status).read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_SYS_BOOT & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


def precheck(sys_kernel: str = "/sys/kernel", proc: str = "/proc") -> None:
    """Refuse at once, before a payload runs for nothing, what kexec_load(2) would refuse for
    sure: a kernel without kexec, a caller without CAP_SYS_BOOT, kexec_load disabled."""
    if not pathlib.Path(sys_kernel, "kexec_loaded").exists():
        raise KexecError("kexec_load: this kernel was built without kexec support (CONFIG_KEXEC): "
                         f"{sys_kernel}/kexec_loaded is missing")
    try:
        disabled = pathlib.Path(proc, "sys/kernel/kexec_load_disabled").read_text().strip() == "1"
    except OSError:
        disabled = False
    if disabled or not _has_cap_sys_boot():
        raise KexecError(f"kexec_load refused: {_explain_eperm(proc=proc)}")


def crash_regions(iomem: str = "/proc/iomem") -> list[tuple[int, int]]:
    """The ``Crash kernel`` ranges of /proc/iomem as [start, end); empty when there are none or
    the file cannot say (unreadable, or all zeros for a reader without CAP_SYS_ADMIN)."""
    from vmrun.kdump import KdumpError, parse_crash_regions
    try:
        return [(r.start, r.end) for r in parse_crash_regions(pathlib.Path(iomem).read_text(), iomem)]
    except (OSError, KdumpError):
        return []


def check_fits(h: elf.ElfHandoff, name: str, *, crash: bool, host: TargetMemoryMap | None = None) -> dict:
    """The handoff's metadata, after checking it was staged for this machine."""
    if elf.NOTE_METADATA not in h.notes:
        raise HandoffMismatch(f"{name} has no vmrun metadata note: not a vmrun handoff")
    meta = json.loads(h.notes[elf.NOTE_METADATA])
    if crash:
        regions = crash_regions()
        if not regions:
            raise KexecError("no crash kernel reservation (boot with crashkernel=…) for --crash")
        # KEXEC_ON_CRASH takes segments only inside crashk_res: the highest reservation (a
        # crashkernel=…,high boot also has a low one, which is not a place to load)
        s, e = max(regions)
        for off, filesz, paddr, memsz in h.segments:
            if not (s <= paddr and paddr + memsz <= e):
                raise HandoffMismatch(f"{name}: segment {paddr:#x}+{memsz:#x} is outside the crash kernel "
                                      f"reservation {s:#x}-{e - 1:#x}; load the payload itself with "
                                      "`vmrun load --crash PAYLOAD`")
        return meta
    host = host or TargetMemoryMap.from_host()
    if meta.get("memmap", {}).get("digest") != host.digest():
        raise HandoffMismatch(f"{name} was staged for another memory map ({meta.get('memmap', {}).get('source')}, "
                              f"digest {meta.get('memmap', {}).get('digest', '?')[:12]}…) than this machine's "
                              f"({host.digest()[:12]}…): stage it again for this machine")
    ram = [(r.start, r.end) for r in host.ram()]
    for off, filesz, paddr, memsz in h.segments:
        if not any(s <= paddr and paddr + memsz <= e for s, e in ram):
            raise HandoffMismatch(f"{name}: segment {paddr:#x}+{memsz:#x} is outside this machine's RAM")
    return meta


def read_handoff(path: str | os.PathLike) -> tuple[bytearray, elf.ElfHandoff]:
    """The file in one writable buffer (its segments go to kexec_load(2) without a copy)."""
    p = pathlib.Path(path)
    try:
        with open(p, "rb") as f:
            data = bytearray(os.fstat(f.fileno()).st_size)
            n = f.readinto(data)
        del data[n:]
    except OSError as e:
        raise KexecError(f"cannot read {p}: {e.strerror}") from None
    return data, elf.read_elf(data, p.name)


def load(path: str | os.PathLike, *, crash: bool = False) -> dict:
    """kexec_load(2) a staged handoff file after checking it was staged for this machine."""
    p = pathlib.Path(path)
    data, h = read_handoff(p)
    meta = check_fits(h, p.name, crash=crash)
    view = memoryview(data)
    load_segments(h.entry, [elf.LoadSegment(paddr, view[off:off + filesz], memsz)
                            for off, filesz, paddr, memsz in h.segments], crash=crash, name=p.name)
    return meta


def load_segments(entry: int, segments: list[elf.LoadSegment], *, crash: bool = False,
                  name: str = "the handoff") -> None:
    """kexec_load(2) with these segments (physical destinations) and entry."""
    if len(segments) > KEXEC_SEGMENT_MAX:
        raise KexecError(f"{name} has {len(segments)} segments; kexec takes at most {KEXEC_SEGMENT_MAX}")
    keep = []
    segs = (kexec_segment * len(segments))()
    for i, sg in enumerate(segments):
        if sg.paddr % PAGE_SIZE or sg.memsz % PAGE_SIZE:
            raise KexecError(f"{name}: segment {sg.paddr:#x}+{sg.memsz:#x} is not page-aligned")
        addr = None
        if len(sg.data):
            view = memoryview(sg.data)
            if view.readonly:  # bytes: one copy; guest memory and file buffers are passed as is
                view = memoryview(bytearray(view))
            buf = (ctypes.c_char * len(view)).from_buffer(view)
            keep.append((view, buf))
            addr = ctypes.addressof(buf)
        segs[i] = kexec_segment(addr, len(sg.data), sg.paddr, sg.memsz)
    flags = KEXEC_ARCH_X86_64 | (KEXEC_ON_CRASH if crash else 0)
    ret = _libc.syscall(ctypes.c_long(SYS_KEXEC_LOAD), ctypes.c_ulong(entry), ctypes.c_ulong(len(segments)),
                        segs, ctypes.c_ulong(flags))
    if ret != 0:
        err = ctypes.get_errno()
        if err == errno.EPERM:
            raise KexecError(f"kexec_load refused: {_explain_eperm()}")
        if err == errno.EADDRNOTAVAIL:
            raise KexecError(f"kexec_load refused {name}: a segment is outside usable RAM (EADDRNOTAVAIL)"
                             + (" or outside the crash kernel reservation" if crash else ""))
        if err == errno.ENOSYS:
            raise KexecError("kexec_load: this kernel was built without kexec support (CONFIG_KEXEC)")
        if err == errno.EBUSY:
            raise KexecError("kexec_load: another kexec image is being loaded or executed (EBUSY)")
        raise KexecError(f"kexec_load failed: {os.strerror(err)} ({errno.errorcode.get(err, err)})")


def unload(*, crash: bool = False) -> None:
    flags = KEXEC_ARCH_X86_64 | (KEXEC_ON_CRASH if crash else 0)
    ret = _libc.syscall(ctypes.c_long(SYS_KEXEC_LOAD), ctypes.c_ulong(0), ctypes.c_ulong(0), None,
                        ctypes.c_ulong(flags))
    if ret != 0:
        err = ctypes.get_errno()
        raise KexecError(f"unloading the kexec image failed: "
                         f"{_explain_eperm() if err == errno.EPERM else os.strerror(err)}")


def loaded(crash: bool = False) -> bool:
    name = "kexec_crash_loaded" if crash else "kexec_loaded"
    try:
        return pathlib.Path(f"/sys/kernel/{name}").read_text().strip() == "1"
    except OSError:
        return False


def execute() -> None:
    """Reboot into the loaded image (does not return on success)."""
    if not loaded():
        raise KexecError("no kexec image is loaded (vmrun load STAGED first)")
    os.sync()
    ret = _libc.syscall(ctypes.c_long(SYS_REBOOT), ctypes.c_uint(LINUX_REBOOT_MAGIC1),
                        ctypes.c_uint(LINUX_REBOOT_MAGIC2), ctypes.c_uint(LINUX_REBOOT_CMD_KEXEC), None)
    err = ctypes.get_errno()
    raise KexecError(f"reboot(LINUX_REBOOT_CMD_KEXEC) failed: "
                     f"{_explain_eperm() if err == errno.EPERM else os.strerror(err)} (returned {ret})")
