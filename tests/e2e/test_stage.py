"""Staging real Debian kernels: the handoff ELF holds what the frozen guest needs, and
`vmrun load` refuses a handoff staged for another machine."""

import json
import struct
import subprocess
import sys

import pytest

from vmrun import errors as E
from vmrun.handoff import elf, state
from vmrun.handoff.stage import stage
from vmrun.runner import RunOptions, run_payload

pytestmark = [pytest.mark.kvm, pytest.mark.payloads]


@pytest.fixture(scope="module", params=["bookworm", "trixie"])
def staged(request, payload_cache, test_initrd, tmp_path_factory):
    kernel = payload_cache / "kernels" / request.param / "vmlinuz"
    r = run_payload(kernel, RunOptions(cmdline="console=ttyS0 stage-test", initrd=test_initrd, dirty_log=True),
                    keep=True)
    out = tmp_path_factory.mktemp("stage") / "staged.elf"
    report = stage(r, out)
    yield r, report, elf.read_elf(out.read_bytes()), out.read_bytes()
    r.machine.close()


def test_segments_hold_every_allocation(staged):
    r, report, h, data = staged
    assert len(h.segments) <= 16
    assert report.stray_writes == []
    spans = [(paddr, paddr + memsz) for _o, _f, paddr, memsz in h.segments]
    for a in r.firmware.alloc.allocations:
        if a.start == 0:
            continue
        assert any(s <= a.start and a.start + a.pages * 4096 <= e for s, e in spans), a
    # the bytes in the file are the guest's bytes (the kernel the stub decompressed included)
    for off, filesz, paddr, memsz in h.segments:
        sample = min(filesz, 1 << 20)
        assert data[off:off + sample] == r.machine.mem.read(paddr, sample)


def test_entry_is_the_purgatory_and_its_state_matches_the_freeze(staged):
    r, report, h, data = staged
    seg = next((o, f, p) for o, f, p, m in h.segments if p <= h.entry < p + m)
    off = seg[0] + (report.purgatory - seg[2])
    area = data[off:off + state.PURGATORY_SIZE]
    code, _ = state.load_purgatory()
    assert area[:len(code)] == code
    st = area[state.STATE:state.STATE + state.STATE_SIZE]
    assert st[:8] == b"VMRUNST1"
    f = r.frozen
    cr0, cr3, cr4, efer, rflags, rsp = struct.unpack_from("<6Q", st, state.ST_CR0)
    assert cr3 == f.sregs["cr3"] and rsp == f.regs["rsp"] and efer == f.sregs["efer"]
    assert struct.unpack_from("<Q", st, state.ST_GPRS)[0] == 0  # EFI_SUCCESS
    # [RSP] is the return address into the stub: inside the loaded kernel image
    ret = r.machine.mem.read_u64(f.regs["rsp"])
    img_base, img_size = int(r.image["base"], 16), r.image["size"]
    assert img_base <= ret < img_base + img_size


def test_runtime_services_answer_unsupported_without_a_host(staged):
    r, report, h, data = staged
    fw = r.firmware
    rt = fw.runtime_services_table
    n = (fw.mem.read_u32(rt + 12) - 24) // 8
    targets = {fw.mem.read_u64(rt + 24 + 8 * i) for i in range(n)}
    assert targets == {fw.rt_unsupported}
    code = fw.mem.read(fw.rt_unsupported, 11)
    assert code == bytes.fromhex("48b80300000000000080c3")  # movabs rax, EFI_UNSUPPORTED; ret
    kinds = {d.type for d in fw.alloc.descriptors() if d.start <= fw.rt_unsupported < d.start + d.pages * 4096}
    assert kinds == {5}  # EfiRuntimeServicesCode


def test_what_is_left_of_boot_services_on_the_target_is_defined(staged):
    """After ExitBootServices no host answers: every boot service thunk returns EFI_UNSUPPORTED
    (independently decoded with iced-x86) and an image returning from its entry point halts
    (cli; hlt loop) instead of exiting to a host that is not there."""
    import iced_x86 as X
    r, report, h, data = staged
    fw = r.firmware

    def asm(addr, n):
        return [str(i) for i in X.Decoder(64, fw.mem.read(addr, n), ip=addr)][:3]

    for sid in (0, 7, 511):
        ins = asm(fw.port.thunk(sid), 11)
        assert ins[0] == "mov rax,8000000000000003h" and ins[1] == "ret", ins
    ret = fw.port.sym("ret_thunk")
    assert asm(ret, 4) == ["cli", "hlt", f"jmp short {ret + 1:016X}h"]


def test_metadata_note(staged):
    r, report, h, data = staged
    meta = json.loads(h.notes[elf.NOTE_METADATA])
    assert meta["format"] == "vmrun-handoff" and meta["format_version"] == 1
    assert meta["cmdline"] == "console=ttyS0 stage-test"
    assert meta["payload"]["sha256"] == r.payload["sha256"]
    assert meta["memmap"]["digest"] == r.memory["target_digest"]
    # the TCG event log travels with the handoff, and its replay gives the recorded PCRs
    from hostsvc import tpm as T
    log = h.notes[elf.NOTE_EVENT_LOG]
    assert log == r.event_log and meta["pcrs"] == r.pcrs
    replayed = T.replay(T.parse(log), ("sha256",))["sha256"]
    assert {str(i): v.hex() for i, v in replayed.items()} == meta["pcrs"]["sha256"]


def test_load_refuses_a_handoff_for_another_memory_map(tmp_path, bookworm_kernel):
    m = tmp_path / "other.e820"
    m.write_text("BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable\n"
                 "BIOS-e820: [mem 0x0000000000100000-0x000000005ffdffff] usable\n")
    out = tmp_path / "other.elf"
    p = subprocess.run([sys.executable, "-m", "vmrun.cli", "-q", "stage", str(bookworm_kernel), "--memmap", str(m),
                        "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    p = subprocess.run([sys.executable, "-m", "vmrun.cli", "-q", "load", str(out)], capture_output=True, text=True,
                       timeout=60)
    from vmrun.kexec import HandoffMismatch
    assert p.returncode == HandoffMismatch.exit_code, p.stderr
    assert "another memory map" in p.stderr and "Traceback" not in p.stderr


def test_stray_writes_are_refused_and_reported(tmp_path):
    from tests.e2e.efiapps import build_apps
    from vmrun.handoff.stage import StrayWritesError
    app = build_apps() / "stray.efi"
    out = tmp_path / "s.elf"
    p = subprocess.run([sys.executable, "-m", "vmrun.cli", "-q", "stage", str(app), "-o", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == StrayWritesError.exit_code, p.stderr
    assert "does not own" in p.stderr and not out.exists()
    p = subprocess.run([sys.executable, "-m", "vmrun.cli", "-q", "stage", str(app), "-o", str(out),
                        "--allow-stray-writes", "--json"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    written = int(d["run"]["console"].split("writing to unallocated ", 1)[1].split()[0], 16)
    pages = [(int(s["start"], 16), int(s["end"], 16)) for s in d["stage"]["stray_writes"]]
    assert any(s <= written < e for s, e in pages), (hex(written), pages)
    assert out.exists()


@pytest.fixture(scope="module")
def host_staged(bookworm_kernel):
    import pathlib
    import shutil
    import tempfile
    d = pathlib.Path(tempfile.mkdtemp(prefix="vmrun-host-stage-"))  # readable by another user
    d.chmod(0o755)
    out = d / "host.elf"
    p = subprocess.run([sys.executable, "-m", "vmrun.cli", "-q", "stage", str(bookworm_kernel), "-o", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out.chmod(0o644)
    yield out
    shutil.rmtree(d, ignore_errors=True)


def test_load_as_an_unprivileged_user_explains_why(host_staged):
    import shutil
    from vmrun.kexec import KexecError
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) missing")
    p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                        "vmrun.cli", "-q", "load", str(host_staged)], capture_output=True, text=True, timeout=60,
                       cwd=str(host_staged.parent))
    assert p.returncode == KexecError.exit_code, p.stderr
    assert "Traceback" not in p.stderr
    # a kernel without kexec says ENOSYS before it checks privileges
    assert "not running as root" in p.stderr or "without kexec support" in p.stderr, p.stderr


def test_crash_load_without_a_reservation_is_refused(host_staged):
    from vmrun.kexec import KexecError, crash_regions
    if crash_regions():
        pytest.skip("this machine has a crashkernel= reservation")
    p = subprocess.run([sys.executable, "-m", "vmrun.cli", "-q", "load", "--crash", str(host_staged)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == KexecError.exit_code and "crash kernel reservation" in p.stderr


def test_load_refuses_a_file_that_is_neither_a_payload_nor_a_handoff(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a kernel\n" * 100)
    p = subprocess.run([sys.executable, "-m", "vmrun.cli", "-q", "load", str(junk)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == E.NotPEError.exit_code and "junk.bin" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_load_of_a_payload_fails_before_running_it_where_kexec_cannot_work(bookworm_kernel):
    """This host's kernel has no kexec (or the caller no CAP_SYS_BOOT): `vmrun load PAYLOAD`
    says so at once instead of running the payload first."""
    from vmrun.kexec import KexecError
    import os
    if os.path.exists("/sys/kernel/kexec_loaded") and os.geteuid() == 0:
        pytest.skip("kexec works here; the target tests load payloads for real")
    p = subprocess.run([sys.executable, "-m", "vmrun.cli", "load", str(bookworm_kernel)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == KexecError.exit_code, p.stderr
    assert "without kexec support" in p.stderr or "not running as root" in p.stderr, p.stderr
    assert "run.start" not in p.stderr and "outcome:" not in p.stdout, p.stderr  # the payload never ran


def test_load_refuses_run_options_for_a_staged_file(host_staged):
    p = subprocess.run([sys.executable, "-m", "vmrun.cli", "-q", "load", str(host_staged), "--cmdline", "x"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == E.BadOptionError.exit_code and "--cmdline only applies" in p.stderr, p.stderr
