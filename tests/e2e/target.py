"""A UEFI kexec target: vmrun run *on* the machine that kexecs, inside QEMU.

The guest is what vmrun's users have: Debian's kernel booted by real UEFI firmware (Debian's
OVMF, ``-bios``, which boots ``-kernel`` as an EFI application through its fw_cfg loader), with
its own memory map (``/sys/firmware/memmap``), EFI system table
(``/sys/firmware/efi/systab``), UEFI variables (efivarfs), optionally a TPM 2.0 (swtpm on the
TIS interface, ``/dev/tpmrm0``), 5-level paging with ``-cpu max`` (4-level with
``-cpu max,la57=off``) and a working ``/dev/kvm``: QEMU's TCG emulates AMD SVM with
``-cpu max``, so the guest loads ``kvm_amd`` and vmrun runs its micro-VM nested in it.

The initramfs loads the cached modules (``load-order`` for the virtio 9p share,
``load-order-target`` for KVM and efivarfs; see ``scripts/fetch-payloads``), mounts efivarfs and
securityfs, mounts this machine's root read-only over 9p at /host (:func:`qemu.hostroot_args`)
with the guest's /proc, /sys (recursively: efivarfs and securityfs come along) and /dev bound
into it and a tmpfs on /host/run (``$TMPDIR``; the rest is read-only), and runs ``steps``: shell commands executed
``chroot /host`` — vmrun from this checkout's virtualenv, with no cross-staging option: every
machine fact it reads is the target's.

Markers on the serial console: ``VMRUN-TARGET-READY`` (setup done), for each step
``VMRUN-STEP-BEGIN <name>`` / ``VMRUN-STEP-END <name> rc=<n>``, ``VMRUN-STEP-FAILED <name>``
(then the guest powers off), ``VMRUN-TARGET-SETUP-FAILED``. A step that does not return (``vmrun
exec``) is followed by whatever the next kernel prints.

The same guest with systemd as PID 1 instead of this chrooted runner, vmrun's units installed:
:mod:`tests.e2e.systemd_target` (it shares :func:`setup_lines`, :func:`step_lines` and
:func:`boot_init`).
"""

from __future__ import annotations

import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.e2e import qemu as Q

OVMF = Path("/usr/share/ovmf/OVMF.fd")
SETUP_FAILED = "VMRUN-TARGET-SETUP-FAILED"
STEP_FAILED = "VMRUN-STEP-FAILED"
READY = "VMRUN-TARGET-READY"
# A setup or step failure, or a dying kernel, ends a run at once.
# A panic counts once its line is complete: the one `echo c > /proc/sysrq-trigger` causes
# ("…: sysrq triggered crash") starts the kdump kernel and is not a failure.
FAIL_PATTERN = (rf"{SETUP_FAILED}|{STEP_FAILED}|"
                r"Kernel panic - not syncing(?!: sysrq triggered crash)[^\n]*\n")
CPUS = {"la57": "max", "no-la57": "max,la57=off"}
DEFAULT_MB = 2048
# vmrun as the steps run it: this checkout's virtualenv Python, the same path inside /host.
VMRUN = f"{shlex.quote(sys.executable)} -m vmrun.cli"


@dataclass(frozen=True)
class Step:
    name: str
    command: str          # shell text, run inside ``chroot /host``
    may_fail: bool = False  # go on when it exits non-zero (a test of an error)


def target_modules(kernel: Path) -> list[Path]:
    """The 9p modules, then KVM and efivarfs, for ``kernel`` (from the payload cache)."""
    d = Path(kernel).parent / "modules"
    order = d / "load-order-target"
    if not order.is_file():
        raise FileNotFoundError(f"{order} is missing: run scripts/fetch-payloads")
    return Q.ninep_modules(kernel) + [d / name for name in order.read_text().split()]


def setup_lines(modules: list[str], fail: str) -> list[str]:
    """The /init's common start: ``modules`` loaded (file names under /modules, in order), the
    KVM and UEFI checks, efivarfs and securityfs, the 9p share of this machine's root mounted
    read-only at /host. ``fail``: the shell text run when a part of it fails."""
    q = shlex.quote
    lines = [Q.INIT_PREAMBLE.rstrip("\n")]
    for m in modules:
        lines.append(f"insmod /modules/{q(m)} || {{ echo \"insmod {m} failed\"; {fail}; }}")
    lines += [
        f"[ -c /dev/kvm ] || {{ echo 'no /dev/kvm after loading kvm_amd'; {fail}; }}",
        f"[ -d /sys/firmware/efi ] || {{ echo 'not booted through UEFI'; {fail}; }}",
        f"mount -t efivarfs efivarfs /sys/firmware/efi/efivars || {{ echo 'efivarfs'; {fail}; }}",
        "mount -t securityfs securityfs /sys/kernel/security 2>/dev/null",
        f"mkdir -p {Q.GUEST_HOSTROOT}",
        f"mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose {Q.HOSTROOT_TAG} {Q.GUEST_HOSTROOT} "
        f"|| {{ echo 'mounting the 9p share failed'; {fail}; }}",
    ]
    return lines


def step_lines(steps: list[Step], run: str) -> list[str]:
    """Shell lines running ``steps`` one by one, each as ``RUN 'COMMAND'`` (``run``: e.g.
    ``chroot /host /bin/sh -c``), between the step markers; a failing step (unless
    ``may_fail``) prints :data:`STEP_FAILED` and powers off at once."""
    q = shlex.quote
    lines = []
    for st in steps:
        lines += [
            f'echo "VMRUN-STEP-BEGIN {st.name} $(cut -d" " -f1 /proc/uptime)s"',
            f"{run} {q(st.command)} 2>&1",
            "rc=$?",
            f'echo "VMRUN-STEP-END {st.name} rc=$rc $(cut -d" " -f1 /proc/uptime)s"',
        ]
        if not st.may_fail:
            lines.append(f'if [ $rc -ne 0 ]; then echo "{STEP_FAILED} {st.name}"; sync; poweroff -f; fi')
    return lines


READY_LINE = f'echo "{READY} $(cut -d" " -f1 /proc/uptime)s"'


def target_init(modules: list[str], steps: list[Step]) -> str:
    """The /init of :func:`target_boot`: setup, the guest's /proc, /sys, /dev and a tmpfs /run in
    the share, then ``steps`` chrooted there."""
    root = Q.GUEST_HOSTROOT
    fail = f"echo {SETUP_FAILED}; poweroff -f"
    lines = setup_lines(modules, fail)
    lines += [
        f"mount -o rbind /proc {root}/proc && mount -o rbind /sys {root}/sys && "
        f"mount -o rbind /dev {root}/dev || {{ echo 'bind mounts'; {fail}; }}",
        f"mount -t tmpfs tmpfs {root}/run || {{ echo 'tmpfs on /run'; {fail}; }}",
        "export TMPDIR=/run",
        Q.PAGING_MODE_PROBE.rstrip("\n"),
        READY_LINE,
    ]
    lines += step_lines(steps, f"chroot {root} /bin/sh -c")
    lines += ["sync", "poweroff -f", ""]
    return "\n".join(lines)


def boot_init(kernel: Path, init: str, *, files: dict[str, Path | bytes] | None = None, cpu: str = "la57",
              memory_mb: int = DEFAULT_MB, append: str = Q.DEFAULT_APPEND, timeout: float = 300,
              until: str | None = None, fail: str | None = FAIL_PATTERN, tpm: bool = False, extra_args=(),
              serial_text=None) -> Q.QemuResult:
    """Boot ``kernel`` under OVMF as a UEFI target (``cpu``: ``la57`` or ``no-la57``) with an
    initramfs holding the target's modules (under /modules), ``files`` (initramfs path ->
    file or bytes) and ``init`` as /init; the 9p share of this machine's root is attached.
    Bounded by ``timeout``; stops at ``until``, at ``fail`` or when QEMU exits. ``tpm``: a
    fresh TPM 2.0 (swtpm) on the TIS interface, which OVMF measures into and the kernel offers
    as /dev/tpmrm0 with the firmware's event log in securityfs. ``serial_text``: see
    :func:`qemu.boot`."""
    from tests.e2e import ovmf_tpm
    modules = target_modules(kernel)
    files = {**{f"modules/{m.name}": m for m in modules}, **(files or {})}
    args = ["-bios", str(OVMF), "-cpu", CPUS[cpu], *Q.hostroot_args(), *extra_args]
    more = {} if serial_text is None else {"serial_text": serial_text}
    with tempfile.TemporaryDirectory(dir=Q.work_dir()) as t:
        img = Q.build_initramfs(Path(t, "target.cpio"), files, init, with_kexec=False)
        swtpm = None
        try:
            if tpm:
                swtpm, ctrl, _log = ovmf_tpm._start_swtpm(Path(t))
                args += ovmf_tpm.tpm_args(ctrl)
            return Q.boot(kernel, img, memory_mb=memory_mb, append=append, timeout=timeout,
                          until=until, fail=fail, extra_args=args, **more)
        finally:
            if swtpm is not None:
                ovmf_tpm._kill(swtpm)


def target_boot(kernel: Path, steps: list[Step], *, cpu: str = "la57", memory_mb: int = DEFAULT_MB,
                append: str = Q.DEFAULT_APPEND, timeout: float = 300, until: str | None = None,
                fail: str | None = FAIL_PATTERN, tpm: bool = False, extra_args=()) -> Q.QemuResult:
    """Boot ``kernel`` as a UEFI target (:func:`boot_init`) and run ``steps`` in it, chrooted
    in the 9p share; returns the whole serial session (see the module's markers)."""
    init = target_init([m.name for m in target_modules(kernel)], steps)
    return boot_init(kernel, init, cpu=cpu, memory_mb=memory_mb, append=append, timeout=timeout,
                     until=until, fail=fail, tpm=tpm, extra_args=extra_args)


def step_output(serial: str, name: str) -> tuple[str, int | None]:
    """What step ``name`` printed, and its exit status (None if it never returned)."""
    begin = f"VMRUN-STEP-BEGIN {name} "
    if begin not in serial:
        return "", None
    body = serial.split(begin, 1)[1].split("\n", 1)[-1]
    end = f"VMRUN-STEP-END {name} rc="
    if end not in body:
        return body, None
    text, tail = body.split(end, 1)
    return text, int(tail.split()[0])
