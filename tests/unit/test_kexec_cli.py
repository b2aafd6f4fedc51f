"""`vmrun kexec`: kexec-tools' options parsed the way kexec-tools (getopt_long) parses them, the
--reuse-cmdline filter, -s and lockdown, exit statuses, and --default-entry down to the load
(which fails on a machine without kexec, or runs a payload that cannot boot: never an exec)."""

from __future__ import annotations

import pathlib

import pytest
from click.testing import CliRunner

from tests.unit.pebuilder import SCN_CODE, SCN_RDATA, Sec, build_pe
from vmrun import kexec_cli as K
from vmrun.cli import cli


def parse(*argv):
    return K.parse(list(argv))


@pytest.mark.parametrize("argv,action,crash,kernel", [
    (["-l", "vmlinuz"], "load", False, "vmlinuz"),
    (["--load", "vmlinuz"], "load", False, "vmlinuz"),
    (["vmlinuz", "-l"], "load", False, "vmlinuz"),                      # getopt permutes
    (["-p", "vmlinuz"], "load", True, "vmlinuz"),
    (["--load-panic", "vmlinuz"], "load", True, "vmlinuz"),
    (["-u"], "unload", False, None),
    (["--unload"], "unload", False, None),
    (["-p", "-u"], "unload", True, None),                               # the man page: -u with -p
    (["-u", "-p"], "unload", True, None),
    (["-pu"], "unload", True, None),                                    # bundled short options
    (["-e"], "exec", False, None),
    (["--exec"], "exec", False, None),
    (["-f"], "exec", False, None),                                      # -e without shutdown
    (["--force", "vmlinuz"], "load+exec", False, "vmlinuz"),            # kexec -f KERNEL: load, boot
    (["-S"], "status", True, None),                                     # -S: the crash slot by default
    (["-S", "-l"], "status", False, None),
    (["--status", "-p", "x"], "status", True, "x"),
    (["--", "-weird-name"], None, False, None),
])
def test_actions(argv, action, crash, kernel):
    if action is None:
        with pytest.raises(K.KexecUsageError, match="no action"):
            parse(*argv)
        return
    r = parse(*argv)
    assert (r.action, r.crash, str(r.kernel) if r.kernel else None) == (action, crash, kernel)


@pytest.mark.parametrize("argv,cmdline", [
    (["-l", "k", "--append=a b"], "a b"),
    (["-l", "k", "--append", "a b"], "a b"),
    (["-l", "k", "--command-line=x=1"], "x=1"),
    (["-l", "k", "--append=first", "--command-line=second"], "second"),   # kexec-tools: the last wins
    (["-l", "k", "--comm=prefix"], "prefix"),                               # unique prefix of a long option
    (["-l", "k", "--append="], ""),
])
def test_command_line_options(argv, cmdline):
    assert parse(*argv).cmdline == cmdline


def test_initrd_ramdisk_type_and_syscall_options():
    r = parse("-l", "k", "--initrd=/a", "--ramdisk", "/b", "-tpe", "-s", "-d")
    assert (r.initrd, r.type, r.syscall, r.debug) == (pathlib.Path("/b"), "pe", "file", True)
    assert parse("-l", "k", "--type=efi", "-c").syscall == "load"
    assert parse("-l", "k", "-t", "PE", "-a").syscall == "auto"
    assert parse("-l", "k", "--reuse-cmdline").reuse_cmdline
    assert parse("-h").help and parse("--help").help and parse("-v").version and parse("--version").version
    r = parse("-e", "-x", "-y", "-i")
    assert r.action == "exec" and len(r.notes) == 3


@pytest.mark.parametrize("argv,message", [
    (["-l", "k", "--bogus"], "unknown option --bogus"),
    (["-l", "k", "-Q"], "unknown option -Q"),
    (["-l", "k", "--mem-max=0x1000"], "--mem-max is not supported"),
    (["-l", "k", "--args-none"], "--args-none is not supported"),
    (["-l", "k", "--dtb=x"], "--dtb is not supported"),
    (["--load-preserve-context", "k"], "--load-preserve-context is not supported"),
    (["-l", "k", "--load"], None),
    (["-l", "k", "-t", "bzImage"], "-t bzImage: vmrun kexec runs PE images only"),
    (["-l", "k", "-t", "elf-x86_64"], "runs PE images only"),
    (["-l", "k", "--append"], "requires argument"),
    (["-l", "-p", "k"], "choose the normal"),
    (["-l"], "-l needs a KERNEL"),
    (["-p"], "-p needs a KERNEL"),
    (["-e", "k"], "-e boots what is already loaded"),
    (["-l", "k", "-e"], "-e boots what is already loaded"),
    (["-u", "k"], "-u unloads and takes no kernel"),
    (["-u", "-e"], "unload and reboot"),
    (["-f", "-p", "k"], "crash kernel is booted by a panic"),
    (["k"], "no action given"),
    ([], "nothing to do"),
    (["-l", "a", "b"], "one kernel only"),
    (["-l", "--default-entry", "k"], "--default-entry picks the kernel itself"),
])
def test_usage_errors_name_the_option(argv, message):
    if message is None:
        assert parse(*argv).action == "load"
        return
    with pytest.raises(K.KexecUsageError) as e:
        parse(*argv)
    assert message in str(e.value)


def test_reuse_cmdline_drops_boot_image_and_for_a_crash_kernel_crashkernel():
    line = ('BOOT_IMAGE=/vmlinuz-6.1.0-18-amd64 root=UUID=abc ro crashkernel=256M crashkernel=72M,low '
            'quiet dyndbg="file x.c +p" crashkernelish=1 -- init-arg\n')
    assert K.reuse_cmdline(line, crash=False) == \
        'root=UUID=abc ro crashkernel=256M crashkernel=72M,low quiet dyndbg="file x.c +p" crashkernelish=1 -- init-arg'
    assert K.reuse_cmdline(line, crash=True) == \
        'root=UUID=abc ro quiet dyndbg="file x.c +p" crashkernelish=1 -- init-arg'
    assert K.reuse_cmdline("BOOT_IMAGE=x", crash=False) == ""


def test_reuse_cmdline_then_append(tmp_path):
    proc = tmp_path / "cmdline"
    proc.write_text("BOOT_IMAGE=/k root=/dev/sda1 crashkernel=256M\n")
    assert K.command_line(parse("-l", "k", "--reuse-cmdline"), str(proc)) == "root=/dev/sda1 crashkernel=256M"
    assert K.command_line(parse("-p", "k", "--reuse-cmdline", "--append=irqpoll"), str(proc)) == \
        "root=/dev/sda1 irqpoll"
    assert K.command_line(parse("-l", "k", "--append=x"), str(proc)) == "x"
    assert K.command_line(parse("-l", "k"), str(proc)) is None          # a UKI keeps its .cmdline
    with pytest.raises(K.Failed, match="cannot read"):
        K.command_line(parse("-l", "k", "--reuse-cmdline"), str(tmp_path / "missing"))


def test_kexec_file_syscall_is_explained_or_refused_under_lockdown(tmp_path):
    lock = tmp_path / "lockdown"
    lock.write_text("[none] integrity confidentiality\n")
    assert "kexec_file_load" in K.syscall_notice(parse("-s", "-l", "k"), str(lock))
    assert K.syscall_notice(parse("-c", "-l", "k"), str(lock)) is None
    assert K.syscall_notice(parse("-s", "-u"), str(lock)) is None
    assert "kexec_file_load" in K.syscall_notice(parse("-s", "-l", "k"), str(tmp_path / "no-securityfs"))
    lock.write_text("none [integrity] confidentiality\n")
    with pytest.raises(K.Failed, match=r"locked down \(integrity\)") as e:
        K.syscall_notice(parse("-s", "-l", "k"), str(lock))
    assert e.value.exit_code == 50


# --- through the click command -------------------------------------------------------------------
def vmrun(*argv):
    return CliRunner().invoke(cli, ["kexec", *argv])


def test_exit_statuses_are_kexec_like():
    r = vmrun("-h")
    assert r.exit_code == 0 and "--reuse-cmdline" in r.output and "systemctl kexec" in r.output
    r = vmrun("-v")
    assert r.exit_code == 0 and "vmrun kexec" in r.output
    r = vmrun("-l", "k", "--no-such")
    assert r.exit_code == 1 and "unknown option --no-such" in r.output and "[vmrun exit code 2]" in r.output
    r = vmrun("-l", "k", "--no-such", "--vmrun-exit-codes")
    assert r.exit_code == 2


def test_a_missing_kernel_fails_with_status_1_and_vmruns_code(tmp_path):
    r = vmrun("-l", str(tmp_path / "nope.efi"), "--no-service")
    assert r.exit_code == 1 and "nope.efi: no such file" in r.output and "[vmrun exit code 10]" in r.output
    r = vmrun("-l", str(tmp_path / "nope.efi"), "--no-service", "--vmrun-exit-codes")
    assert r.exit_code == 10


def test_status_exits_1_when_loaded_0_when_not():
    from vmrun import kexec
    r = vmrun("-S", "--no-service")
    assert r.exit_code == (1 if kexec.loaded(crash=True) else 0)
    r = vmrun("-S", "-l", "--no-service")
    assert r.exit_code == (1 if kexec.loaded(crash=False) else 0)


def test_exec_with_nothing_loaded_fails():
    from vmrun import kexec
    if kexec.loaded():
        pytest.skip("an image is loaded here: -e would reboot")
    r = vmrun("-e", "--no-service")
    assert r.exit_code == 1 and "no kexec image is loaded" in r.output


def test_an_explicit_socket_that_nothing_serves_is_an_error(tmp_path):
    r = vmrun("-u", "--socket", str(tmp_path / "no.sock"))
    assert r.exit_code == 1 and f"--socket {tmp_path / 'no.sock'}" in r.output


def fake_uki(path: pathlib.Path, osrel: str) -> pathlib.Path:
    """A PE with UKI sections whose 'kernel' cannot boot: the load fails, whatever the machine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(build_pe(sections=[Sec(".text", b"\xc3" * 16, characteristics=SCN_CODE),
                                        Sec(".osrel", osrel.encode(), characteristics=SCN_RDATA),
                                        Sec(".linux", b"not a kernel", characteristics=SCN_RDATA)]).data)
    return path


def test_default_entry_is_chosen_printed_and_loaded(tmp_path):
    esp = tmp_path / "esp"
    fake_uki(esp / "EFI" / "Linux" / "debian-6.1.0-9.efi", 'ID=debian\nPRETTY_NAME="Debian 12"\nVERSION_ID=12\n')
    fake_uki(esp / "EFI" / "Linux" / "debian-6.1.0-18.efi", 'ID=debian\nPRETTY_NAME="Debian 12"\nVERSION_ID=12\n')
    (esp / "loader").mkdir()
    (esp / "loader" / "loader.conf").write_text("default debian-6.1.0-9*\n")
    r = vmrun("-l", "--default-entry", "--esp", str(esp), "--efivars", str(tmp_path / "none"), "--no-service")
    assert "default boot entry: debian-6.1.0-9.efi (Debian 12, version 12" in r.output, r.output
    assert "chosen by loader.conf's default ('debian-6.1.0-9*')" in r.output
    assert r.exit_code == 1                       # no kexec here, or a "kernel" that cannot run
    (esp / "loader" / "loader.conf").unlink()
    r = vmrun("-l", "--default-entry", "--esp", str(esp), "--efivars", str(tmp_path / "none"), "--no-service")
    assert "default boot entry: debian-6.1.0-18.efi" in r.output and "first entry" in r.output


def test_default_entry_without_entries_fails(tmp_path):
    (tmp_path / "esp").mkdir()
    r = vmrun("-l", "--default-entry", "--esp", str(tmp_path / "esp"), "--no-service")
    assert r.exit_code == 1 and "no boot loader entries" in r.output and "[vmrun exit code 10]" in r.output


def test_type1_entry_payload_initrds_and_options(tmp_path):
    esp = tmp_path / "esp"
    (esp / "k").mkdir(parents=True)
    (esp / "k" / "linux").write_bytes(b"MZ")
    (esp / "k" / "a.img").write_bytes(b"AAAAA")
    (esp / "k" / "b.img").write_bytes(b"BB")
    (esp / "loader" / "entries").mkdir(parents=True)
    (esp / "loader" / "entries" / "deb.conf").write_text(
        "linux /k/linux\ninitrd /k/a.img\ninitrd /k/b.img\noptions root=/dev/sda1\noptions quiet\n")
    said = []
    p = K.resolve_payload(parse("-l", "--default-entry", "--esp", str(esp), "--efivars", str(tmp_path)),
                          echo=said.append)
    assert p.path == esp / "k" / "linux" and p.cmdline == "root=/dev/sda1 quiet" and p.esp == esp
    assert p.initrd == [esp / "k" / "a.img", esp / "k" / "b.img"] and "deb.conf" in said[0]
    joined, cleanup = K._join_initrds(p.initrd)
    try:
        assert joined.read_bytes() == b"AAAAA\0\0\0BB\0\0"      # each padded to 4 bytes, as sd-boot does
    finally:
        cleanup()
    assert not joined.exists()
    p = K.resolve_payload(parse("-l", "--default-entry", "--esp", str(esp), "--efivars", str(tmp_path),
                                "--append=single", "--initrd=/x"), echo=said.append)
    assert p.cmdline == "single" and p.initrd == [pathlib.Path("/x")]


def test_a_kernel_given_with_esp_is_presented_with_it(tmp_path):
    k = fake_uki(tmp_path / "esp" / "EFI" / "Linux" / "u.efi", "ID=x\n")
    p = K.resolve_payload(parse("-l", str(k), "--esp", str(tmp_path / "esp")), echo=print)
    assert p.esp == tmp_path / "esp" and not p.staged
    p = K.resolve_payload(parse("-l", str(k), "--no-esp"), echo=print)
    assert p.esp is None
