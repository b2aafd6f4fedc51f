"""`vmrun kexec` with real Debian payloads on this machine, in-process (--no-service). Nothing is
ever executed: where this machine cannot kexec (no CONFIG_KEXEC, not root) the load must fail
before the payload runs, with vmrun's message and kexec's exit status 1."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.e2e.uki import build_uki
from vmrun import bootentry as B

pytestmark = [pytest.mark.payloads]


def kexec_works_here() -> bool:
    return os.path.exists("/sys/kernel/kexec_loaded") and os.geteuid() == 0


def vmrun_kexec(*argv, timeout=120):
    return subprocess.run([sys.executable, "-m", "vmrun.cli", "kexec", *map(str, argv)],
                          capture_output=True, text=True, timeout=timeout)


def test_load_of_a_debian_kernel_fails_like_kexec_where_kexec_cannot_work(bookworm_kernel):
    if kexec_works_here():
        pytest.skip("kexec works here; the target tests load payloads for real")
    p = vmrun_kexec("-l", bookworm_kernel, "--append=console=ttyS0", "--no-service")
    assert p.returncode == 1, p.stderr
    assert p.stderr.startswith("vmrun kexec: error: ") and "[vmrun exit code 50]" in p.stderr, p.stderr
    assert "without kexec support" in p.stderr or "not running as root" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and "run.start" not in p.stderr and p.stdout == ""  # the payload never ran
    q = vmrun_kexec("-p", bookworm_kernel, "--reuse-cmdline", "--no-service", "--vmrun-exit-codes")
    assert q.returncode == 50, q.stderr


def test_kexec_file_syscall_is_explained_then_the_load_goes_on(bookworm_kernel):
    if kexec_works_here():
        pytest.skip("kexec works here")
    p = vmrun_kexec("-s", "-l", bookworm_kernel, "--no-service")
    assert p.returncode == 1
    assert "-s: vmrun loads with kexec_load(2)" in p.stderr and "[vmrun exit code 50]" in p.stderr, p.stderr


def test_a_file_that_is_not_pe_is_named(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a kernel\n" * 100)
    p = vmrun_kexec("-l", junk, "--no-service")
    assert p.returncode == 1 and "junk.bin" in p.stderr and "[vmrun exit code 11]" in p.stderr, p.stderr


def test_default_entry_finds_a_real_uki_with_its_sidecars(tmp_path, stub_257, bookworm_kernel, test_initrd):
    """A UKI built from Debian's systemd-stub 257 on an ESP tree: bootctl's rules pick it (its real
    .osrel gives title and version), `vmrun kexec -l --default-entry` says so and passes the ESP."""
    esp = tmp_path / "esp"
    uki = build_uki(stub_257, esp / "EFI" / "Linux" / "debian-6.1.efi", linux=bookworm_kernel,
                    initrd=test_initrd, cmdline="console=ttyS0 quiet")
    build_uki(stub_257, esp / "EFI" / "Linux" / "debian-old+0-3.efi", linux=bookworm_kernel,
              initrd=None, cmdline="console=ttyS0")                       # bad: no tries left, sorts last
    (esp / "EFI" / "Linux" / "debian-6.1.efi.extra.d").mkdir()
    (esp / "EFI" / "Linux" / "debian-6.1.efi.extra.d" / "x.cred").write_bytes(b"cred")
    choice = B.default_entry(esp, efivars=tmp_path / "no-efivars")
    assert [e.id for e in choice.entries] == ["debian-6.1.efi", "debian-old.efi"]
    e = choice.entry
    assert (e.title, e.version, e.sort_key, e.options, e.payload) == \
        ("Debian GNU/Linux 12 (bookworm)", "12 (bookworm)", "debian", "console=ttyS0 quiet", uki)
    if kexec_works_here():
        pytest.skip("kexec works here; loading for real is the target tests' job")
    p = vmrun_kexec("-l", "--default-entry", "--esp", esp, "--efivars", tmp_path / "no-efivars", "--no-service")
    assert "vmrun kexec: default boot entry: debian-6.1.efi (Debian GNU/Linux 12 (bookworm), version 12 " \
           "(bookworm); type2, " in p.stderr, p.stderr
    assert p.returncode == 1 and "[vmrun exit code 50]" in p.stderr, p.stderr


def test_exec_never_happens_with_nothing_loaded():
    from vmrun import kexec
    if kexec.loaded():
        pytest.skip("an image is loaded here: -e would reboot")
    p = vmrun_kexec("-e", "--no-service")
    assert p.returncode == 1 and "no kexec image is loaded" in p.stderr, p.stderr
