"""Real firmware with a real TPM as the reference for vmrun's measurements.

Boots a UKI (or any x86_64 EFI application that ends in a Linux kernel) the way a PC does:
Debian's OVMF (``/usr/share/ovmf/OVMF.fd`` as ``-bios``) in QEMU/TCG with a TPM 2.0 on the
TIS interface, backed by ``swtpm socket --tpm2`` (a fresh TPM per boot), the application on a
GPT disk's EFI System Partition as the removable-media boot file ``\\EFI\\BOOT\\BOOTX64.EFI``.
The kernel's initramfs is :func:`make_reference_initrd`'s: its /init prints the TPM's PCRs
(every bank, PCR 0-15, from ``/sys/class/tpm/tpm0/pcr-<bank>/<n>``), the firmware's event log
(``/sys/kernel/security/tpm0/binary_bios_measurements``, base64) and ``/proc/cmdline`` on the
serial console, and :func:`boot_uki` returns them as a :class:`Reference`.

    initrd = make_reference_initrd(tmp / "ref.cpio")
    uki = build_uki(stub, tmp / "uki.efi", linux=kernel, initrd=initrd,
                    cmdline="console=ttyS0 x=1", osrel=OSREL)
    ref = boot_uki(uki)                      # ~15 s under TCG
    ref.pcrs["sha256"][11]                   # hex, lower case
    hostsvc.tpm.parse(ref.event_log)

The UKI's command line must name ``console=ttyS0`` for the kernel's own messages to reach the
serial port; /init writes to ``/dev/ttyS0`` itself when it does not, so the markers always do.

Needs qemu-system-x86, ovmf, swtpm, mtools and dosfstools (mkfs.fat), binutils (objcopy).
KVM cannot run firmware on this machine's nested /dev/kvm, so QEMU always runs ``-accel tcg``.

Serial markers printed by /init: ``VMRUN-REF-BEGIN``, ``PCR <bank> <n> <hex>``,
``EVENTLOG-SIZE <n>``, ``EVENTLOG-BEGIN`` … base64 … ``EVENTLOG-END``, ``CMDLINE <text>``,
``VMRUN-REF-END``; ``VMRUN-REF-ERROR <why>`` when something is missing (no TPM, no log).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from tests.e2e import qemu as Q

from tests.e2e.uki import DEBIAN_OSREL, SECTION_ORDER, build_uki, check_uki  # noqa: F401 (re-exported)

QEMU = os.environ.get("QEMU", "qemu-system-x86_64")
OVMF = Path(os.environ.get("OVMF_FD", "/usr/share/ovmf/OVMF.fd"))
SWTPM = "swtpm"
BANKS = ("sha1", "sha256", "sha384", "sha512")
PCR_INDICES = range(16)
END_MARKER = "VMRUN-REF-END"
ERROR_MARKER = "VMRUN-REF-ERROR"
# The kernel dying, or the firmware giving up on every boot option, ends a run at once.
FAIL_PATTERN = r"Kernel panic - not syncing|No bootable option or device was found"
PAGE = 0x1000
# The ESP's partition GUID unless boot_uki is given one (fixed, so device paths repeat).
DEFAULT_ESP_PARTUUID = uuid.UUID("3e1f7a2c-5b6d-4e8f-9a0b-1c2d3e4f5a6b")
ESP_TYPE_GUID = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")



def available() -> str | None:
    """None when everything a reference boot needs is installed, else what is missing."""
    for tool in (QEMU, SWTPM, "mkfs.fat", "mcopy", "mmd", "objcopy"):
        if shutil.which(tool) is None and not Path("/sbin", tool).exists():
            return f"{tool} not found (apt-get install qemu-system-x86 swtpm mtools dosfstools binutils)"
    if not OVMF.is_file():
        return f"{OVMF} not found (apt-get install ovmf)"
    return None


# --------------------------------------------------------------------------
# the initramfs
# --------------------------------------------------------------------------

REFERENCE_INIT = Q.INIT_PREAMBLE + r"""
mkdir -p /sys/kernel/security
mount -t securityfs securityfs /sys/kernel/security 2>/dev/null
# only errors from the kernel from now on, so its messages do not split our lines
echo 1 > /proc/sys/kernel/printk
case " $(cat /proc/cmdline) " in
  *" console=ttyS0"*) ;;
  *) [ -c /dev/ttyS0 ] && exec > /dev/ttyS0 2>&1 ;;
esac
i=0
while [ ! -d /sys/class/tpm/tpm0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
echo
echo VMRUN-REF-BEGIN
[ -d /sys/class/tpm/tpm0 ] || echo "VMRUN-REF-ERROR no /sys/class/tpm/tpm0"
for bank in sha1 sha256 sha384 sha512; do
  [ -d /sys/class/tpm/tpm0/pcr-$bank ] || continue
  n=0
  while [ $n -le 15 ]; do
    echo "PCR $bank $n $(cat /sys/class/tpm/tpm0/pcr-$bank/$n)"
    n=$((n + 1))
  done
done
log=/sys/kernel/security/tpm0/binary_bios_measurements
if [ -r $log ]; then
  cat $log > /tmp/eventlog
  echo "EVENTLOG-SIZE $(wc -c < /tmp/eventlog)"
  echo EVENTLOG-BEGIN
  base64 /tmp/eventlog
  echo EVENTLOG-END
else
  echo "VMRUN-REF-ERROR no $log"
fi
echo "CMDLINE $(cat /proc/cmdline)"
echo VMRUN-REF-END
sync
poweroff -f
"""


def make_reference_initrd(out: Path, *, compress: bool = False) -> Path:
    """Write the reference initramfs (newc cpio; gzip with ``compress``) to ``out``.

    Static busybox as /bin/busybox, /dev/console and /dev/null, and /init =
    :data:`REFERENCE_INIT`. Deterministic: the same bytes for the same busybox.
    """
    return Q.build_initramfs(Path(out), {}, REFERENCE_INIT, with_kexec=False, compress=compress)


# --------------------------------------------------------------------------
# a UKI from a stub, with objcopy
# --------------------------------------------------------------------------

def _round_up(x: int, a: int = PAGE) -> int:
    return (x + a - 1) & ~(a - 1)


# --------------------------------------------------------------------------
# the ESP: a GPT disk with one FAT partition
# --------------------------------------------------------------------------

SECTOR = 512
_GPT_ENTRIES = 128
_GPT_ENTRY_SIZE = 128
_GPT_ARRAY_SECTORS = _GPT_ENTRIES * _GPT_ENTRY_SIZE // SECTOR  # 32


def _gpt_header(current: int, backup: int, first: int, last: int, disk_guid: uuid.UUID,
                entries_lba: int, entries_crc: int) -> bytes:
    def pack(crc: int) -> bytes:
        return struct.pack("<8sIIIIQQQQ16sQIII", b"EFI PART", 0x00010000, 92, crc, 0,
                           current, backup, first, last, disk_guid.bytes_le, entries_lba,
                           _GPT_ENTRIES, _GPT_ENTRY_SIZE, entries_crc)
    hdr = pack(zlib.crc32(pack(0)))
    return hdr + b"\0" * (SECTOR - len(hdr))


def gpt_disk(partition: bytes, part_uuid: uuid.UUID, *, disk_guid: uuid.UUID | None = None,
             name: str = "EFI System Partition") -> bytes:
    """A GPT disk image (protective MBR, primary and backup GPT) whose only partition, an EFI
    System Partition starting at 1 MiB, holds ``partition`` (a multiple of 512 bytes)."""
    if len(partition) % SECTOR:
        raise ValueError("partition size must be a multiple of 512")
    first = (1 << 20) // SECTOR
    n = len(partition) // SECTOR
    last_part = first + n - 1
    total = _round_up(first + n + _GPT_ARRAY_SECTORS + 1, (1 << 20) // SECTOR)
    disk_guid = disk_guid or uuid.uuid5(part_uuid, "disk")
    entry = struct.pack("<16s16sQQQ72s", ESP_TYPE_GUID.bytes_le, part_uuid.bytes_le, first,
                        last_part, 0, name.encode("utf-16-le"))
    entries = entry + b"\0" * (_GPT_ENTRIES * _GPT_ENTRY_SIZE - len(entry))
    crc = zlib.crc32(entries)
    first_usable, last_usable = 2 + _GPT_ARRAY_SECTORS, total - 2 - _GPT_ARRAY_SECTORS
    # protective MBR: one 0xEE partition over the whole disk
    mbr = bytearray(SECTOR)
    size_field = min(total - 1, 0xFFFFFFFF)
    mbr[446:462] = struct.pack("<B3sB3sII", 0, b"\x00\x02\x00", 0xEE, b"\xff\xff\xff", 1, size_field)
    mbr[510:512] = b"\x55\xaa"
    disk = bytearray(total * SECTOR)
    disk[0:SECTOR] = mbr
    disk[SECTOR:2 * SECTOR] = _gpt_header(1, total - 1, first_usable, last_usable, disk_guid, 2, crc)
    disk[2 * SECTOR:2 * SECTOR + len(entries)] = entries
    disk[first * SECTOR:first * SECTOR + len(partition)] = partition
    backup_entries = total - 1 - _GPT_ARRAY_SECTORS
    disk[backup_entries * SECTOR:backup_entries * SECTOR + len(entries)] = entries
    disk[(total - 1) * SECTOR:] = _gpt_header(total - 1, 1, first_usable, last_usable, disk_guid,
                                              backup_entries, crc)
    return bytes(disk)


def _tool(name: str) -> str:
    return shutil.which(name) or str(Path("/sbin", name))


def fat_image(files: dict[str, bytes], out: Path, *, label: str = "ESP") -> Path:
    """A FAT file system image at ``out`` holding ``files`` (path with '/' -> contents)."""
    payload = sum(_round_up(len(d), 4096) for d in files.values())
    size_kib = max(64 << 10, _round_up(payload + payload // 8 + (8 << 20), 1 << 20) >> 10)
    out.unlink(missing_ok=True)
    subprocess.run([_tool("mkfs.fat"), "-C", "-F", "32", "-n", label, "-i", "12345678",
                    str(out), str(size_kib)], check=True, capture_output=True)
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1", MTOOLS_NO_VFAT="0")
    made: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="esp-", dir=out.parent) as t:
        for i, (path, data) in enumerate(sorted(files.items())):
            parts = [p for p in path.replace("\\", "/").split("/") if p]
            for k in range(1, len(parts)):
                d = "/".join(parts[:k])
                if d not in made:
                    subprocess.run(["mmd", "-i", str(out), "::/" + d], check=True,
                                   capture_output=True, env=env)
                    made.add(d)
            src = Path(t, str(i))
            src.write_bytes(data)
            subprocess.run(["mcopy", "-i", str(out), "-o", str(src), "::/" + "/".join(parts)],
                           check=True, capture_output=True, env=env)
    return out


def esp_disk(files: dict[str, bytes], out: Path, *, part_uuid: uuid.UUID = DEFAULT_ESP_PARTUUID) -> Path:
    """A GPT disk image at ``out`` with an ESP holding ``files``."""
    part = fat_image(files, out.with_name(out.name + ".fat"))
    try:
        out.write_bytes(gpt_disk(part.read_bytes(), part_uuid))
    finally:
        part.unlink(missing_ok=True)
    return out


# --------------------------------------------------------------------------
# booting
# --------------------------------------------------------------------------

@dataclass
class Reference:
    pcrs: dict[str, dict[int, str]]     # bank -> PCR index -> lower-case hex, as the TPM holds
    event_log: bytes                    # binary_bios_measurements (crypto-agile, TCG2 format)
    cmdline: str                        # /proc/cmdline in the booted kernel
    serial: str                         # the whole serial console, escape sequences removed
    seconds: float                      # wall clock of the QEMU run
    complete: bool = False              # VMRUN-REF-END was seen
    errors: list[str] = field(default_factory=list)   # VMRUN-REF-ERROR lines, parse problems
    swtpm_log: str = ""
    qemu_stderr: str = ""

    def pcr(self, index: int, bank: str = "sha256") -> bytes:
        return bytes.fromhex(self.pcrs[bank][index])

    def events(self):
        """The event log parsed with :func:`hostsvc.tpm.parse`."""
        from hostsvc import tpm as T
        return T.parse(self.event_log)

    def __str__(self) -> str:  # what an assertion message should show
        tail = "\n".join(self.serial.splitlines()[-80:])
        s = (f"OVMF+swtpm reference: {'complete' if self.complete else 'INCOMPLETE'} after "
             f"{self.seconds:.1f}s, banks {sorted(self.pcrs)}, event log {len(self.event_log)} bytes"
             f"{', errors: ' + '; '.join(self.errors) if self.errors else ''}\n"
             f"--- serial (tail) ---\n{tail}")
        if self.qemu_stderr.strip():
            s += f"\n--- qemu stderr ---\n{self.qemu_stderr.strip()[-2000:]}"
        if not self.complete and self.swtpm_log.strip():
            s += f"\n--- swtpm log ---\n{self.swtpm_log.strip()[-2000:]}"
        return s


# Serial bytes as text, OVMF's terminal escape sequences and CRs removed (one cleaner for every
# firmware console: tests/e2e/qemu.py's).
clean_serial = Q.clean_console


_PCR_LINE = re.compile(r"^PCR (sha1|sha256|sha384|sha512) (\d+) ([0-9A-Fa-f]+)\s*$")
_B64_LINE = re.compile(r"^[A-Za-z0-9+/=]+$")


def parse_reference_output(serial: str) -> tuple[dict[str, dict[int, str]], bytes, str, list[str]]:
    """(pcrs, event log, cmdline, errors) from the text the reference /init printed."""
    errors: list[str] = []
    body = serial.rsplit("VMRUN-REF-BEGIN", 1)[-1] if "VMRUN-REF-BEGIN" in serial else ""
    if not body:
        errors.append("no VMRUN-REF-BEGIN on the serial console")
    pcrs: dict[str, dict[int, str]] = {}
    cmdline = ""
    size = None
    b64: list[str] | None = None
    log_parts: list[str] = []
    for line in body.splitlines():
        line = line.strip()
        if b64 is not None:
            if line == "EVENTLOG-END":
                log_parts, b64 = b64, None
            elif _B64_LINE.match(line):
                b64.append(line)
            # anything else is a stray kernel message: skip it
            continue
        if m := _PCR_LINE.match(line):
            pcrs.setdefault(m[1], {})[int(m[2])] = m[3].lower()
        elif line.startswith("EVENTLOG-SIZE "):
            size = int(line.split()[1])
        elif line == "EVENTLOG-BEGIN":
            b64 = []
        elif line.startswith("CMDLINE "):
            cmdline = line[len("CMDLINE "):]
        elif line.startswith(ERROR_MARKER):
            errors.append(line)
        elif line == END_MARKER:
            break
    event_log = b""
    try:
        event_log = base64.b64decode("".join(log_parts), validate=True)
    except (binascii.Error, ValueError) as e:
        errors.append(f"event log base64: {e}")
    if size is not None and len(event_log) != size:
        errors.append(f"event log: {len(event_log)} bytes decoded, {size} printed")
    for bank, values in pcrs.items():
        if sorted(values) != list(PCR_INDICES):
            errors.append(f"bank {bank}: PCRs {sorted(values)}")
    return pcrs, event_log, cmdline, errors


def _start_swtpm(state: Path) -> tuple[subprocess.Popen, Path, Path]:
    (state / "tpm").mkdir(parents=True, exist_ok=True)
    ctrl, log = state / "swtpm.sock", state / "swtpm.log"
    cmd = [SWTPM, "socket", "--tpm2", "--tpmstate", f"dir={state / 'tpm'}",
           "--ctrl", f"type=unixio,path={ctrl}", "--log", f"file={log},level=1",
           "--terminate"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, preexec_fn=Q._die_with_parent)
    deadline = time.monotonic() + 10
    while not ctrl.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"swtpm exited ({proc.returncode}): "
                               f"{log.read_text(errors='replace') if log.exists() else ''}")
        if time.monotonic() > deadline:
            _kill(proc)
            raise RuntimeError("swtpm did not create its control socket in 10 s")
        time.sleep(0.02)
    return proc, ctrl, log


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.kill()
    proc.wait()


def tpm_args(swtpm_ctrl: Path) -> list[str]:
    """QEMU arguments for a TPM 2.0 on the TIS interface backed by the swtpm at ``swtpm_ctrl``."""
    return ["-chardev", f"socket,id=chrtpm,path={swtpm_ctrl}",
            "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
            "-device", "tpm-tis,tpmdev=tpm0"]


def disk_args(disk: Path, swtpm_ctrl: Path) -> list[str]:
    """What OVMF boots from and measures into: ``disk`` on virtio-blk (boot index 0), the TPM
    at ``swtpm_ctrl`` on TIS, and virtio-rng (OVMF publishes EFI_RNG_PROTOCOL only with it)."""
    return ["-drive", f"if=none,id=esp,format=raw,file={disk}",
            "-device", "virtio-blk-pci,drive=esp,bootindex=0",
            *tpm_args(swtpm_ctrl),
            "-device", "virtio-rng-pci"]


def qemu_command(disk: Path, swtpm_ctrl: Path, *, memory_mb: int, extra_args=()) -> list[str]:
    """The QEMU command :func:`boot_uki` runs (OVMF as ``-bios``, :func:`disk_args`)."""
    return Q.qemu_command(None, None, memory_mb=memory_mb, bios=OVMF, qemu=QEMU,
                          extra_args=[*disk_args(disk, swtpm_ctrl), *extra_args])


def boot_uki(uki: Path, *, esp_extra: dict[str, bytes] | None = None, timeout: float = 240,
             memory_mb: int = 1024, part_uuid: uuid.UUID = DEFAULT_ESP_PARTUUID,
             extra_args=(), keep: Path | None = None) -> Reference:
    """Boot ``uki`` under OVMF with a fresh swtpm and return what the reference /init printed.

    The UKI is ``\\EFI\\BOOT\\BOOTX64.EFI`` on an ESP (GPT partition ``part_uuid`` on a
    virtio disk); ``esp_extra`` adds files (``"EFI/BOOT/BOOTX64.EFI.extra.d/x.cred": b"…"``).
    The run (:func:`tests.e2e.qemu.boot`) ends at ``VMRUN-REF-END`` (``complete``), a kernel
    panic, QEMU's exit or after ``timeout`` seconds; QEMU and swtpm are always killed. ``keep``:
    a directory to leave the disk image, serial log and swtpm log in. Raises nothing for a
    failed boot: check ``complete`` and ``errors`` (``str(ref)`` shows the console).
    """
    reason = available()
    if reason:
        raise FileNotFoundError(reason)
    files = {"EFI/BOOT/BOOTX64.EFI": Path(uki).read_bytes()}
    files.update(esp_extra or {})
    tmp = tempfile.TemporaryDirectory(prefix="ovmf-tpm-", dir=Q.work_dir())
    work = Path(tmp.name)
    swtpm = r = None
    swtpm_log_text = ""
    try:
        disk = esp_disk(files, work / "esp.img", part_uuid=part_uuid)
        swtpm, ctrl, _log = _start_swtpm(work)
        r = Q.boot(None, memory_mb=memory_mb, timeout=timeout, bios=OVMF, qemu=QEMU,
                   extra_args=[*disk_args(disk, ctrl), *extra_args],
                   until=re.escape(END_MARKER), fail=FAIL_PATTERN,
                   serial_text=clean_serial, linger=0.2)  # linger: the rest of the marker line
    finally:
        if swtpm is not None:
            _kill(swtpm)
        try:
            swtpm_log_text = (work / "swtpm.log").read_text(errors="replace")
        except OSError:
            pass
        if keep is not None:
            keep = Path(keep)
            keep.mkdir(parents=True, exist_ok=True)
            (keep / "serial.log").write_bytes(r.raw_serial if r is not None else b"")
            for name in ("esp.img", "swtpm.log"):
                if (work / name).exists():
                    shutil.copyfile(work / name, keep / name)
        tmp.cleanup()
    pcrs, event_log, cmdline, errors = parse_reference_output(r.serial)
    if not r.matched:
        errors.insert(0, "kernel panic or firmware found nothing to boot" if r.failed else
                      f"timed out after {timeout}s" if r.timed_out else "QEMU exited before "
                      f"{END_MARKER}")
    return Reference(pcrs=pcrs, event_log=event_log, cmdline=cmdline, serial=r.serial,
                     seconds=r.seconds, complete=r.matched, errors=errors,
                     swtpm_log=swtpm_log_text, qemu_stderr=r.stderr)
