"""The UEFI target with **systemd as PID 1**: vmrun's units as a real system runs them.

The guest is :mod:`tests.e2e.target`'s (Debian's kernel under OVMF, nested /dev/kvm, efivarfs,
this machine's root over 9p), but its /init does not run the steps itself. It builds a root
for systemd and hands over:

- a tmpfs root with this machine's /usr, /opt and the trees vmrun and its Python come from
  (:data:`RO_TREES`) bound read-only from the 9p share, the usr-merge symlinks, a copy of its
  /etc and an empty /var (systemd-tmpfiles fills it in): the layout of ``systemd.volatile=yes``,
  writable everywhere but /usr, and nothing reaches this machine. (An overlayfs over the whole
  share would need ``overlay.ko``, which the payload cache does not hold: ``scripts/fetch-payloads``
  keeps only the modules in its ``TARGET_MODULES``.)
- ``root_files`` (guest path -> file or bytes) copied into it, with the harness' own: the step
  runner ``/etc/vmrun-test/steps.sh`` and ``vmrun-test.service`` + ``vmrun-test.target`` (the
  default target: multi-user.target, then the steps);
- /dev, /proc, /sys moved into it and a tmpfs on its /run (as initramfs-tools does);
- vmrun's units installed the documented way, ``scripts/install-units --vmrun
  .venv/bin/vmrun`` (run with the guest's /usr/bin/python3, chrooted), ``systemctl enable`` of
  ``enable`` (offline, from their [Install] sections), :data:`MASK` masked (units this machine's
  Debian has that only cost time here or wait for what the guest lacks) and
  ``vmrun-test.target`` the default, with the symlinks ``systemctl mask``/``set-default`` make;
- ``exec switch_root /newroot /lib/systemd/systemd``: Debian's systemd 252 of this machine.

``shutdown_hooks=True`` gives a root in which systemd-shutdown's hooks can run, as on a machine
whose / and /usr are on a local disk. systemd-shutdown runs the programs in
/usr/lib/systemd/system-shutdown/ only after unmounting what it can (systemd 252's shutdown.c);
Debian's build (split-usr) keeps nothing but / and what is under /run/initramfs, and it unmounts
with ``MNT_FORCE``, which makes 9p abandon its connection (``v9fs_umount_begin``): every bind
of the share, /usr included, answers EIO from then on, so no hook could even start its shell.
So the share is bound at :data:`SHARE` (under /run/initramfs, which systemd leaves mounted "from
before we boot until after we shutdown"), /usr and the other :data:`RO_TREES` are symlinks into
it, and a tmpfs over its usr/lib/systemd/system-shutdown is where install-units writes vmrun's
hook (the share is read-only).

``vmrun-test.service`` (Type=oneshot, After=multi-user.target, output on /dev/console) runs the
steps with :func:`target.step_lines` (each ``/bin/sh -c COMMAND``, with the same markers as the
chroot runner), then ``poweroff`` (orderly). A step that ends the system (``systemctl kexec``,
a sysrq crash) is followed by what systemd's shutdown and the next kernel print; the runner
leaves quietly when systemd stops it (SIGTERM).

Markers on the console, besides :mod:`target`'s: ``VMRUN-SYSTEMD-SETUP <name> <uptime>s`` before
each setup command of the /init, ``VMRUN-SYSTEMD-SWITCH <uptime>s`` just before switch_root,
``VMRUN-SYSTEMD-PID1 <comm of PID 1>`` when the steps start (READY is printed then too).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from tests.e2e import qemu as Q
from tests.e2e import target as T

NEWROOT = "/newroot"
VMRUN_BIN = str(Path(sys.executable).parent / "vmrun")   # what install-units writes into the units
INSTALL_UNITS = str(Q.REPO / "scripts" / "install-units")
TEST_TARGET = "vmrun-test.target"
# With shutdown_hooks: where the share stays mounted until systemd-shutdown's hooks have run
SHARE = "/run/initramfs/host"


def _ro_trees() -> tuple[str, ...]:
    """This machine's folders the guest's root shows (bound read-only from the share): the OS
    (/usr; /opt), vmrun's checkout, its virtualenv and the Python installation under it (which
    may live elsewhere, e.g. under /root); none inside another."""
    paths = sorted({Path("/usr"), Path("/opt"), Q.REPO.resolve(), Path(sys.prefix).resolve(),
                    Path(sys.base_prefix).resolve()})
    keep: list[Path] = []
    for p in paths:
        if not any(p.is_relative_to(k) for k in keep):
            keep.append(p)
    return tuple(str(p) for p in keep)


RO_TREES = _ro_trees()
# Units of this machine's Debian that only cost time in the guest or wait for what it lacks:
# its database server, gettys (the serial one would take the console), time sync (no
# network), the ext4 scrubber, pstore archiving, timers, and udev (its coldplug takes ~20 s
# of TCG time; vmrun needs no device it creates: /dev/kvm is devtmpfs's).
MASK = ("postgresql.service", "getty.target", "serial-getty@ttyS0.service", "e2scrub_reap.service",
        "systemd-timesyncd.service", "systemd-pstore.service", "apt-daily.timer", "apt-daily-upgrade.timer",
        "dpkg-db-backup.timer", "e2scrub_all.timer", "fstrim.timer", "man-db.timer",
        "systemd-udevd.service", "systemd-udev-trigger.service", "systemd-udevd-control.socket",
        "systemd-udevd-kernel.socket")
# systemd's own messages on the console, uncoloured, with its status lines.
APPEND = (f"{Q.DEFAULT_APPEND} systemd.show_status=1 systemd.log_target=console systemd.log_level=info "
          "systemd.log_color=0")
# A failure of one of vmrun's units, systemd giving up, or any failure of target.py's.
FAIL_PATTERN = (rf"{T.FAIL_PATTERN}|Failed to start [^\n]*vmrun|You are in emergency mode|"
                r"Freezing execution|Failed to switch root")

TEST_UNIT = """\
[Unit]
Description=vmrun test steps (tests/e2e/systemd_target.py)
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/bin/sh /etc/vmrun-test/steps.sh
StandardOutput=tty
StandardError=inherit
TTYPath=/dev/console
TTYReset=no
TTYVHangup=no
Environment=SYSTEMD_COLORS=0 SYSTEMD_PAGER=cat PAGER=cat
"""

TEST_TARGET_UNIT = """\
[Unit]
Description=vmrun test target: multi-user.target, then the test steps
Requires=multi-user.target
After=multi-user.target
Wants=vmrun-test.service
"""


def steps_script(steps: list[T.Step]) -> str:
    """The runner vmrun-test.service starts: the markers, the steps, then an orderly poweroff.
    SIGTERM (systemd stopping the unit for a kexec or a poweroff) ends it without a word."""
    lines = ["#!/bin/sh", "trap 'exit 0' TERM", T.READY_LINE, 'echo "VMRUN-SYSTEMD-PID1 $(cat /proc/1/comm)"',
             Q.PAGING_MODE_PROBE.rstrip("\n")]
    lines += T.step_lines(steps, "/bin/sh -c")
    lines += ["sync", "poweroff", ""]
    return "\n".join(lines)


def systemd_init(modules: list[str], *, enable: list[str], mask=MASK, shutdown_hooks: bool = False) -> str:
    """The /init: :func:`target.setup_lines`, the new root, vmrun's units, switch_root."""
    q = shlex.quote
    r = NEWROOT
    fail = f"echo {T.SETUP_FAILED}; poweroff -f"
    lines = T.setup_lines(modules, fail)

    # the guest's uptime, before and after /proc moves into the new root
    lines.append(f'up() {{ cut -d" " -f1 /proc/uptime 2>/dev/null || cut -d" " -f1 {r}/proc/uptime; }}')

    def setup(name: str, command: str) -> None:
        lines.extend([f'echo "VMRUN-SYSTEMD-SETUP {name} $(up)s"',
                      f"{command} || {{ echo '{name} failed'; {fail}; }}"])

    # the root: a tmpfs with this machine's /usr and vmrun's trees bound read-only, the usr-merge
    # symlinks, a copy of its /etc, an empty /var (systemd-tmpfiles fills it in). With
    # ``shutdown_hooks`` the trees are symlinks into the share kept at SHARE instead (see the module)
    if shutdown_hooks:
        hooks = f"{r}{SHARE}/usr/lib/systemd/system-shutdown"
        trees = " && ".join(f"mkdir -p {r}{q(str(Path(d).parent))} && ln -s {SHARE}{q(d)} {r}{q(d)}" for d in RO_TREES)
        trees = (f"mkdir -p {r}/run && mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs {r}/run && "
                 f"mkdir -p {r}{SHARE} && mount --bind {Q.GUEST_HOSTROOT} {r}{SHARE} && "
                 f"mount -t tmpfs -o mode=0755 tmpfs {hooks} && {trees}")
    else:
        trees = " && ".join(f"mkdir -p {r}{q(d)} && mount --bind {Q.GUEST_HOSTROOT}{q(d)} {r}{q(d)}" for d in RO_TREES)
    links = " && ".join(f"ln -s usr/{d} {r}/{d}" for d in ("bin", "sbin", "lib", "lib64"))
    setup("root", f"mkdir -p {r} && mount -t tmpfs -o mode=0755 tmpfs {r} && {trees} && {links} && "
                  f"mkdir -p {r}/dev {r}/proc {r}/sys {r}/run {r}/boot {r}/mnt {r}/media {r}/srv "
                  f"{r}/var/lib {r}/var/log {r}/var/cache {r}/var/spool {r}/var/tmp "
                  f"{r}/tmp && chmod 1777 {r}/var/tmp {r}/tmp && ln -s /run {r}/var/run && "
                  f"ln -s /run/lock {r}/var/lock && cp -a {Q.GUEST_HOSTROOT}/etc {r}/etc")
    setup("files", f"find /rootfs -type f | xargs chmod 0644 && cp -a /rootfs/. {r}/")
    run = "" if shutdown_hooks else f"mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs {r}/run && "
    setup("mounts", f"{run}mount --move /dev {r}/dev && mount --move /proc {r}/proc && mount --move /sys {r}/sys")
    chroot = f"chroot {r} /usr/bin/env PATH=/usr/sbin:/usr/bin:/sbin:/bin"
    setup("install-units", f"{chroot} /usr/bin/python3 {q(INSTALL_UNITS)} --vmrun {q(VMRUN_BIN)} 2>&1")
    if enable:
        setup("enable", f"{chroot} systemctl enable {' '.join(map(q, enable))} 2>&1")
    # what `systemctl mask` and `systemctl set-default` write (each systemctl run loads every unit)
    units = f"{r}/etc/systemd/system"
    masks = [*(f"ln -sf /dev/null {units}/{q(u)}" for u in mask), f"ln -sf {TEST_TARGET} {units}/default.target"]
    if shutdown_hooks:
        # systemd-gpt-auto-generator looks for the block device behind / and /usr, and fails
        # ("exit status 1") where /usr is a symlink: there is no such device to find here
        generators = f"{r}/etc/systemd/system-generators"
        masks += [f"mkdir -p {generators}", f"ln -sf /dev/null {generators}/systemd-gpt-auto-generator"]
    setup("mask", " && ".join(masks))
    lines += [
        'echo "VMRUN-SYSTEMD-SWITCH $(up)s"',
        f"exec switch_root {r} /lib/systemd/systemd",
        f"echo 'switch_root failed'; {fail}",
        "",
    ]
    return "\n".join(lines)


def systemd_boot(kernel: Path, steps: list[T.Step], *, root_files: dict[str, Path | bytes] | None = None,
                 enable=("vmrun.socket",), cpu: str = "la57", append: str = "", timeout: float = 240,
                 until: str | None = None, fail: str | None = FAIL_PATTERN, shutdown_hooks: bool = False,
                 **kw) -> Q.QemuResult:
    """Boot ``kernel`` as a UEFI target with systemd as PID 1 (see the module) and run
    ``steps`` from vmrun-test.service; ``root_files``: guest path -> file or bytes, put into the
    root before systemd starts; ``enable``: units enabled with ``systemctl enable``;
    ``append``: more kernel command line; ``shutdown_hooks``: the root in which
    systemd-shutdown's hooks run (see the module). One bounded boot (:func:`target.boot_init`,
    which takes ``tpm=True`` for a TPM): stops at ``until``, ``fail``, QEMU's exit or ``timeout``."""
    files: dict[str, Path | bytes] = {
        "rootfs/etc/vmrun-test/steps.sh": steps_script(steps).encode(),
        "rootfs/etc/systemd/system/vmrun-test.service": TEST_UNIT.encode(),
        f"rootfs/etc/systemd/system/{TEST_TARGET}": TEST_TARGET_UNIT.encode(),
    }
    for where, content in (root_files or {}).items():
        files["rootfs/" + where.lstrip("/")] = content
    # a checkout (and so the vmrun executable the units name) under /tmp is hidden by the units'
    # PrivateTmp=yes: bind it into their private /tmp, as an admin would for such a path
    hidden = [t for t in RO_TREES if Path(t).is_relative_to("/tmp") or Path(t).is_relative_to("/var/tmp")]
    if hidden:
        dropin = "[Service]\n" + "".join(f"BindReadOnlyPaths={t}\n" for t in hidden)
        for unit in ("vmrun.service", "vmrun-kdump.service"):
            files[f"rootfs/etc/systemd/system/{unit}.d/checkout-in-tmp.conf"] = dropin.encode()
        if shutdown_hooks:
            # there the trees are symlinks, which systemd-tmpfiles' boot-time clean-up of /tmp
            # and /var/tmp (Debian's tmp.conf: "D") would delete: keep them (create, never clean)
            files["rootfs/etc/tmpfiles.d/tmp.conf"] = b"d /tmp 1777 root root -\nd /var/tmp 1777 root root -\n"
    init = systemd_init([m.name for m in T.target_modules(kernel)], enable=list(enable), shutdown_hooks=shutdown_hooks)
    return T.boot_init(kernel, init, files=files, cpu=cpu, append=f"{APPEND} {append}".strip(), timeout=timeout,
                       until=until, fail=fail, serial_text=Q.clean_console, **kw)
