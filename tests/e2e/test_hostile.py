"""Hostile payloads: every class of misbehaviour must end as a payload outcome within
the run's limits.

Each case runs one of the tests/efi/hostile_*.c apps through the CLI (`vmrun -q run APP
--cmdline MODE --timeout T --memory-cap 256M --json`) in its own process and asserts:

- the outcome and exit code the case's docstring gives (what the UEFI spec or the CPU says);
- no internal or host error: exit code not 1/30/31, no "internal error" or traceback on stderr,
  a JSON result whose error kind is a payload outcome;
- the run's own time (JSON `seconds`) <= --timeout + WALL_SLACK_S, and the whole process's
  wall time (time.monotonic around it) <= that + PROCESS_SLACK_S;
- peak RSS of the vmrun process <= the cap + RSS_OVERHEAD (os.wait4's ru_maxrss of exactly that
  child).

The apps that finish print what the firmware answered and then call ExitBootServices, so
"the service refused it and the run went on" is exit code 0 with the status on the console.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import pytest

from tests.e2e.efiapps import ROOT, build_apps

pytestmark = [pytest.mark.kvm, pytest.mark.efiapps]

# ---- limits ------------------------------------------------------------------------------------
#: --memory-cap of every hostile run
MEMORY_CAP = 256 << 20
#: what the vmrun process may use beyond the cap: the Python interpreter with vmrun, click,
#: structlog and ctypes loaded (~60-120 MB measured for a small run), the firmware area and page
#: tables vmrun itself touches, the console/trace/event-log buffers at their bounds, and the
#: JSON result. 300 MB: a fixed overhead.
RSS_OVERHEAD = 300 << 20
#: the time limit holds "within about a second": the run's own `seconds` (VM creation to
#: outcome, in the JSON) may exceed --timeout by at most this
WALL_SLACK_S = 1.0
#: the whole process may take this much longer again: interpreter start-up and imports before
#: the VM exists, the summary and exit after it (0.4 s measured on an idle 2-core machine; the
#: suite runs two tests at once, each with QEMU or KVM work, so up to several times that)
PROCESS_SLACK_S = 2.0
#: --timeout for the time-class cases (and the CPU/firmware ones, which must end at once)
TIME_CASE_TIMEOUT = 5
#: --timeout for the memory-class cases (touching 256 MiB page by page takes a few seconds)
MEMORY_CASE_TIMEOUT = 20
#: safety net for this machine, not an assertion: a run still alive this long after its
#: --timeout, or with this much resident memory, is killed (and the test fails on the limits)
KILL_AFTER_S = 20
KILL_RSS = 3 << 30

EXIT = {"exit_boot_services": 0, "fault": 20, "timeout": 21, "memory_cap": 22, "payload_returned": 23,
        "reset": 24, "halted": 25}
HOST_ERROR_CODES = {1: "internal error", 30: "kvm", 31: "guest_memory"}


@dataclass
class Run:
    args: list[str]
    returncode: int
    wall: float
    peak_rss: int            # bytes
    stdout: str
    stderr: str
    killed: str = ""         # why the safety net killed it, if it did
    result: dict | None = field(default=None)

    @property
    def console(self) -> str:
        return (self.result or {}).get("console", "").replace("\r", "")

    @property
    def error(self) -> dict:
        return (self.result or {}).get("error") or {}

    def describe(self) -> str:
        msg = self.error.get("message") or self.stderr.strip()[-600:]
        return (f"exit {self.returncode} ({HOST_ERROR_CODES.get(self.returncode, '')}"
                f"{(self.result or {}).get('outcome', '')}) after {self.wall:.1f} s, peak RSS "
                f"{self.peak_rss >> 20} MiB{', killed: ' + self.killed if self.killed else ''}; "
                f"message: {msg!r}; console tail: {self.console[-400:]!r}")


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) << 10
    except OSError:
        pass
    return 0


def run_vmrun(app, cmdline: str, timeout: float, memory_cap: int = MEMORY_CAP, extra=()) -> Run:
    """`vmrun -q run APP --json` in a new process: exit code, wall time (time.monotonic around
    it), peak RSS (ru_maxrss from os.wait4 for exactly that process) and the parsed JSON."""
    args = [sys.executable, "-m", "vmrun.cli", "-q", "run", str(app), "--cmdline", cmdline,
            "--timeout", str(timeout), "--memory-cap", str(memory_cap), "--json", *extra]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        p = subprocess.Popen(args, stdout=out, stderr=err, cwd=ROOT, start_new_session=True)
        killed = ""
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            elapsed = time.monotonic() - t0
            if not killed:
                if elapsed > timeout + KILL_AFTER_S:
                    killed = f"still running {elapsed:.0f} s after start"
                elif _rss(p.pid) > KILL_RSS:
                    killed = f"RSS above {KILL_RSS >> 30} GiB"
                if killed:
                    os.killpg(p.pid, signal.SIGKILL)
            time.sleep(0.02)
        wall = time.monotonic() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    run = Run(args, p.returncode, wall, usage.ru_maxrss << 10, stdout, stderr, killed)
    try:
        run.result = json.loads(stdout) if stdout.strip() else None
    except ValueError:
        run.result = None
    return run


def assert_limits(r: Run, timeout: float, memory_cap: int = MEMORY_CAP) -> None:
    """No internal/host error, time limit + slack, RSS below cap + overhead."""
    assert not r.killed, r.describe()
    assert r.returncode not in HOST_ERROR_CODES, r.describe()
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr, r.describe()
    assert r.result is not None, f"no JSON result: {r.describe()}"
    assert r.error.get("kind") in (None, *EXIT), r.describe()
    seconds = r.result.get("seconds", 0)
    assert seconds <= timeout + WALL_SLACK_S, f"run time {seconds:.1f} s > {timeout} + {WALL_SLACK_S} s: {r.describe()}"
    assert r.wall <= timeout + WALL_SLACK_S + PROCESS_SLACK_S, (
        f"process wall time {r.wall:.1f} s > {timeout} + {WALL_SLACK_S} + {PROCESS_SLACK_S} s: {r.describe()}")
    assert r.peak_rss <= memory_cap + RSS_OVERHEAD, (
        f"peak RSS {r.peak_rss >> 20} MiB > cap {memory_cap >> 20} MiB + {RSS_OVERHEAD >> 20} MiB: {r.describe()}")


def assert_outcome(r: Run, *outcomes: str) -> None:
    outcome = (r.result or {}).get("outcome")
    assert outcome in outcomes and r.returncode == EXIT[outcome], f"expected {outcomes}: {r.describe()}"


def printed_status(r: Run, label: str) -> str:
    m = re.search(rf"^{re.escape(label)}:? .*?(EFI_[A-Z_]+|0x[0-9a-f]+)", r.console, re.M)
    assert m, f"the app printed no {label!r} line: {r.describe()}"
    return m[1]


@pytest.fixture(scope="module")
def apps():
    return build_apps()


# ---- time ----------------------------------------------------------------------------------------
T = TIME_CASE_TIMEOUT


@pytest.mark.parametrize("mode", ["outsb80", "outsb3f8"])
def test_rep_outsb_with_a_huge_count(apps, mode):
    """`rep outsb` with RCX = 2^40 to the POST port / the UART: the emulation may run the string
    until the time limit (timeout) or refuse the instruction (fault naming it); never past the
    limit, and the UART log stays bounded (RSS)."""
    r = run_vmrun(apps / "hostile_time.efi", mode, T)
    assert_limits(r, T)
    assert_outcome(r, "timeout", "fault")
    assert "rep outsb returned" not in r.console


def test_output_string_of_megabytes_forever(apps):
    """OutputString of a 4 MiB string in an endless loop: each call is bounded and the loop runs
    into the time limit (timeout); the kept console is bounded (RSS)."""
    r = run_vmrun(apps / "hostile_time.efi", "output-mb", T)
    assert_limits(r, T)
    assert_outcome(r, "timeout")


def test_load_image_ten_thousand_times(apps):
    """LoadImage of a small PE from a buffer 10,000 times, never unloaded: either all (or the
    first failing one's status) is printed and the app exits boot services, or the time limit
    ends it; per-call cost must not grow with the number of images so far."""
    r = run_vmrun(apps / "hostile_time.efi", "loadimage", T)
    assert_limits(r, T)
    assert_outcome(r, "exit_boot_services", "timeout")
    if r.returncode == 0:
        assert re.search(r"^loadimage: \d+ loaded", r.console, re.M), r.describe()


def test_install_configuration_table_a_million_guids(apps):
    """InstallConfigurationTable with 1,000,000 distinct GUIDs: the app prints how many were
    installed and the last status (EFI_OUT_OF_RESOURCES is the spec's answer when the table is
    full) and exits boot services, or the time limit ends it."""
    r = run_vmrun(apps / "hostile_time.efi", "configtable", T)
    assert_limits(r, T)
    assert_outcome(r, "exit_boot_services", "timeout")
    if r.returncode == 0:
        assert re.search(r"^configtable: \d+ installed", r.console, re.M), r.describe()


def test_wait_for_event_with_two_billion_events(apps):
    """WaitForEvent(NumberOfEvents = 2^31) over a one-page array (512 copies of one valid
    unsignalled event, then memory that holds no events): the entries past the page are not
    events, so EFI_INVALID_PARAMETER, printed, then ExitBootServices; waiting on the valid ones
    until the time limit is also a payload outcome."""
    r = run_vmrun(apps / "hostile_time.efi", "waitforevent", T)
    assert_limits(r, T)
    assert_outcome(r, "exit_boot_services", "timeout")
    if r.returncode == 0:
        assert printed_status(r, "waitforevent: status") == "EFI_INVALID_PARAMETER", r.describe()


def test_two_hundred_thousand_pools(apps):
    """200,000 small AllocatePool, then FreePool in an order that makes a naive search
    quadratic: finishes (counts printed, ExitBootServices) or ends at the time limit."""
    r = run_vmrun(apps / "hostile_time.efi", "pool", T)
    assert_limits(r, T)
    assert_outcome(r, "exit_boot_services", "timeout")


@pytest.mark.parametrize("mode", ["setmem8g", "setmemmax", "copymem8g", "copymemmax", "crc8g", "crcmax"])
def test_memory_services_over_huge_lengths(apps, mode):
    """SetMem / CopyMem / CalculateCrc32 from a 4 KiB pool buffer over 8 GiB or 2^64-1 bytes:
    the range runs over memory the app never allocated (and, for 2^64-1, off the end of the
    address space). Acceptable: the service refuses (CalculateCrc32 prints an error status;
    SetMem/CopyMem return and the app exits boot services), a fault, the time limit or the
    memory cap; not an internal error, not past the limits, not gigabytes of host memory."""
    r = run_vmrun(apps / "hostile_time.efi", mode, T)
    assert_limits(r, T)
    assert_outcome(r, "exit_boot_services", "fault", "timeout", "memory_cap")
    if r.returncode == 0 and mode.startswith("crc"):
        assert printed_status(r, "crc: status") != "EFI_SUCCESS", r.describe()


@pytest.mark.parametrize("mode", ["nonul", "nonul-end"])
def test_output_string_without_a_terminator(apps, mode):
    """OutputString of a page of 'A' with no NUL, followed by a freed page (nonul) or by a hole
    in the address space (nonul-end: the last page of a conventional range no descriptor
    follows): the read is bounded; the service answers (any status after the freed page, which
    may read as zeros; EFI_INVALID_PARAMETER when the string runs into no memory at all), the
    app prints it and exits boot services. At once: no timeout."""
    r = run_vmrun(apps / "hostile_time.efi", mode, T)
    assert_limits(r, T)
    assert_outcome(r, "exit_boot_services")
    if mode == "nonul-end" and "nonul: no conventional range ends at a hole" in r.console:
        pytest.skip("this machine's memory map has no conventional range followed by a hole")
    status = printed_status(r, "nonul: status")
    if mode == "nonul-end":   # the string runs into no memory at all: a bad pointer
        assert status == "EFI_INVALID_PARAMETER", r.describe()


def test_notify_function_that_signals_its_own_event(apps):
    """A notify function (EVT_NOTIFY_SIGNAL, TPL_CALLBACK) that calls SignalEvent on its own
    event: the signal is queued while the notify runs (UEFI 2.10 §7.1), so notifications follow
    each other forever: the time limit ends it (or vmrun names it as a payload fault). Not a
    RecursionError / internal error."""
    r = run_vmrun(apps / "hostile_time.efi", "signal-self", T)
    assert_limits(r, T)
    assert_outcome(r, "timeout", "fault")


def test_image_that_starts_a_copy_of_itself(apps):
    """Each copy LoadImage's its own image from a buffer and StartImage's it: unbounded nesting
    ends at the memory cap, at a LoadImage/StartImage error status that unwinds every level
    (the outermost prints it, then exits boot services), at a stack fault or at the time limit;
    never an internal error (RecursionError)."""
    r = run_vmrun(apps / "hostile_time.efi", "image-self", T)
    assert_limits(r, T)
    assert_outcome(r, "exit_boot_services", "fault", "timeout", "memory_cap")
    if r.returncode == 0:
        assert "image-self: the outermost StartImage returned EFI_" in r.console, r.describe()


def test_get_rng_of_two_to_the_62_bytes(apps):
    """RNG GetRNG(length 2^62) into a 4 KiB buffer: no firmware can fill it; the spec's errors
    are EFI_INVALID_PARAMETER / EFI_DEVICE_ERROR / EFI_NOT_READY. The app prints the status and
    exits boot services (or a payload fault / memory cap); never MemoryError/OverflowError."""
    r = run_vmrun(apps / "hostile_time.efi", "getrng", T)
    assert_limits(r, T)
    assert_outcome(r, "exit_boot_services", "fault", "memory_cap")
    if r.returncode == 0:
        assert printed_status(r, "getrng: status") != "EFI_SUCCESS", r.describe()


# ---- memory --------------------------------------------------------------------------------------
M = MEMORY_CASE_TIMEOUT


def test_writing_every_page_never_allocated(apps):
    """One byte written to each 4 KiB page of conventional RAM the app never allocated, 8 GiB
    of pages from 1 MiB up: vmrun either refuses the first write (a fault: unallocated RAM is
    not the payload's) or maps pages on demand and counts them, ending at the cap
    (memory_cap). Host RSS stays below cap + overhead either way."""
    r = run_vmrun(apps / "hostile_memory.efi", "touch", M)
    assert_limits(r, M)
    assert_outcome(r, "fault", "memory_cap")


def test_setmem_over_memory_never_allocated(apps):
    """SetMem over 8 GiB of conventional RAM nobody allocated: refused (the app goes on to exit
    boot services), a fault, or the memory cap; host RSS bounded."""
    r = run_vmrun(apps / "hostile_memory.efi", "setmem", M)
    assert_limits(r, M)
    assert_outcome(r, "exit_boot_services", "fault", "memory_cap")


def test_load_image_with_a_huge_source_size(apps):
    """LoadImage of a valid PE in a small buffer but SourceSize 2^40: an error status (the
    buffer is not that long), printed, then ExitBootServices; or a fault / the memory cap.
    Never a host buffer of SourceSize."""
    r = run_vmrun(apps / "hostile_memory.efi", "loadimage-huge", M)
    assert_limits(r, M)
    assert_outcome(r, "exit_boot_services", "fault", "memory_cap")
    if r.returncode == 0:
        assert printed_status(r, "loadimage-huge: status") != "EFI_SUCCESS", r.describe()


def _query_variable_info(r: Run, when: str) -> tuple[int, int, int]:
    m = re.search(rf"^QueryVariableInfo {when}: EFI_SUCCESS max_storage (\d+) remaining (\d+) max_variable (\d+)",
                  r.console, re.M)
    assert m, f"no QueryVariableInfo {when} line: {r.describe()}"
    return int(m[1]), int(m[2]), int(m[3])


def test_set_variable_of_64_mib(apps):
    """SetVariable (NV|BS|RT) with 64 MiB of data: more than the store's advertised maximum
    variable size (QueryVariableInfo), so EFI_OUT_OF_RESOURCES or EFI_INVALID_PARAMETER (UEFI 2.10
    §8.2 SetVariable), printed, then ExitBootServices."""
    r = run_vmrun(apps / "hostile_memory.efi", "setvar-64m", M)
    assert_limits(r, M)
    assert_outcome(r, "exit_boot_services")
    _, _, max_var = _query_variable_info(r, "before")
    assert max_var < 64 << 20, f"QueryVariableInfo advertises a maximum variable size of {max_var}: {r.describe()}"
    assert printed_status(r, "setvar-64m: status") in ("EFI_OUT_OF_RESOURCES", "EFI_INVALID_PARAMETER"), r.describe()


def test_thousands_of_60_kib_variables(apps):
    """Up to 5000 SetVariable of 60 KiB each: the store fills and the next one answers
    EFI_OUT_OF_RESOURCES (or EFI_INVALID_PARAMETER if 60 KiB is above the maximum variable
    size); what was stored is within what QueryVariableInfo advertised; then ExitBootServices."""
    r = run_vmrun(apps / "hostile_memory.efi", "setvar-many", M)
    assert_limits(r, M)
    assert_outcome(r, "exit_boot_services")
    max_storage, _, _ = _query_variable_info(r, "before")
    m = re.search(r"^setvar-many: (\d+) variables of (\d+) bytes stored, last status (EFI_[A-Z_]+)", r.console, re.M)
    assert m, r.describe()
    stored, size, status = int(m[1]), int(m[2]), m[3]
    assert status in ("EFI_OUT_OF_RESOURCES", "EFI_INVALID_PARAMETER"), r.describe()
    assert stored * size <= max_storage, f"stored {stored * size} bytes > advertised {max_storage}: {r.describe()}"


def test_allocating_to_the_cap_at_2_mib_strides(apps):
    """One 4 KiB AllocatePages(AllocateAddress) at every 2 MiB boundary of conventional RAM, each
    touched, up to the cap: the allocations count 4 KiB each, but host memory must also stay
    below cap + overhead (a 2 MiB host page per 4 KiB allocation would not). The app exits boot
    services when RAM or the cap's worth of pages runs out, or the run ends at the cap."""
    r = run_vmrun(apps / "hostile_memory.efi", f"alloc-cap {MEMORY_CAP}", M)
    assert_limits(r, M)
    assert_outcome(r, "exit_boot_services", "memory_cap")


# ---- CPU -----------------------------------------------------------------------------------------
def test_reserved_low_cr0_bits_are_ignored_as_by_the_cpu(apps):
    """Setting a reserved bit of CR0[31:0] (bit 28) is ignored by the CPU (SDM Vol. 3 §2.5), not
    a #GP: the payload goes on, and reads CR0 back without it."""
    r = run_vmrun(apps / "hostile_cpu.efi", "cr0-bit28", T)
    assert_limits(r, T)
    assert_outcome(r, "exit_boot_services")
    m = re.search(r"^cr0 read back (0x[0-9a-f]+)", r.console, re.M)
    assert m and not int(m[1], 16) >> 28 & 1, r.describe()


@pytest.mark.parametrize("mode", ["cr4-bit63", "cr0-bit63", "cr3-other", "fsbase", "efer"])
def test_privileged_writes_real_hardware_refuses(apps, mode):
    """mov to CR4 / CR0 with bit 63 (reserved: #GP), mov to CR3 of a zeroed page (no
    mappings: the next fetch faults), wrmsr IA32_FS_BASE non-canonical / IA32_EFER reserved bit
    (#GP): a payload fault that names the app (hostile_cpu.efi+0x…), not exit 30 (KVM_SET_SREGS
    EINVAL) or an internal error."""
    r = run_vmrun(apps / "hostile_cpu.efi", mode, T)
    assert_limits(r, T)
    assert_outcome(r, "fault")
    assert "survived" not in r.console
    if mode != "cr3-other":   # after a CR3 switch the faulting RIP may be anywhere
        assert "hostile_cpu.efi+0x" in r.error["message"], r.describe()


def _address(r: Run, pattern: str) -> int:
    m = re.search(pattern, r.console, re.M)
    assert m, r.describe()
    return int(m[1], 16)


def test_int3_fault_names_the_instruction(apps):
    """int3: a payload fault (#BP) whose RIP is the int3 instruction itself, not the address
    after the trap."""
    r = run_vmrun(apps / "hostile_cpu.efi", "int3", T)
    assert_limits(r, T)
    assert_outcome(r, "fault")
    at = _address(r, r"^int3 at (0x[0-9a-f]+)")
    assert int(r.error["rip"], 16) == at, f"fault RIP {r.error['rip']} != int3 at {at:#x}: {r.describe()}"


def test_single_step_trap(apps):
    """TF set through pushf/popf: the #DB single-step trap after the instruction following popf
    is a payload fault whose RIP names the stepped instruction (nop1), or, as the trap frame has
    it, the next one (nop2); not some later address."""
    r = run_vmrun(apps / "hostile_cpu.efi", "single-step", T)
    assert_limits(r, T)
    assert_outcome(r, "fault")
    nop1 = _address(r, r"nop1 at (0x[0-9a-f]+)")
    nop2 = _address(r, r"nop2 at (0x[0-9a-f]+)")
    assert int(r.error["rip"], 16) in (nop1, nop2), r.describe()


@pytest.mark.parametrize("mode", ["avx", "xgetbv"])
def test_avx_and_xgetbv_agree_with_cpuid(apps, mode):
    """vpxor %ymm0 / xgetbv: the state must be consistent. If CPUID.1:ECX says AVX
    (for vpxor) / OSXSAVE (for xgetbv) is absent, the instruction is a payload fault (#UD); if
    present, it runs and the app exits boot services (and the XSAVE state is then vmrun's to
    keep in the handoff)."""
    r = run_vmrun(apps / "hostile_cpu.efi", mode, T)
    assert_limits(r, T)
    m = re.search(r"^cpuid avx (\d) osxsave (\d)", r.console, re.M)
    assert m, r.describe()
    avx, osxsave = int(m[1]), int(m[2])
    present = (avx and osxsave) if mode == "avx" else osxsave
    if present:
        assert_outcome(r, "exit_boot_services")
    else:
        assert_outcome(r, "fault")
        assert "survived" not in r.console, r.describe()


# ---- firmware memory -----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["idt", "gdt", "monitor", "thunk", "pml4"])
def test_firmware_memory_is_not_writable(apps, mode):
    """A write (of the byte already there) to the IDT (found with sidt), the GDT (sgdt), the
    monitor's #GP handler (from the IDT gate), the AllocatePool thunk's code, or the PML4 (CR3
    read through the emulated mov): a payload fault (#PF) naming the app; sidt/sgdt may
    themselves fault under UMIP, which is also a fault. Not exit 31, not a silent success."""
    r = run_vmrun(apps / "hostile_fw.efi", mode, T)
    assert_limits(r, T)
    assert f"FAIL {mode}-writable" not in r.console, r.describe()
    assert_outcome(r, "fault")
    assert "hostile_fw.efi+0x" in r.error["message"], r.describe()


def test_free_pool_of_firmware_blocks_is_refused(apps):
    """FreePool(gBS), FreePool(ImageHandle), FreePool(gST): not pool the payload allocated, so
    EFI_INVALID_PARAMETER (UEFI 2.10 §7.2 FreePool), and later AllocatePool never hands those
    blocks out; then ExitBootServices."""
    r = run_vmrun(apps / "hostile_fw.efi", "freepool", T)
    assert_limits(r, T)
    assert_outcome(r, "exit_boot_services")
    for label in ("freepool-bs", "freepool-image-handle", "freepool-system-table"):
        assert printed_status(r, label) == "EFI_INVALID_PARAMETER", r.describe()
    assert "freepool-reused: 0" in r.console, r.describe()


def test_hooking_a_boot_service_still_works(apps):
    """Writing gBS->AllocatePool (the table entry, not the code) is legal UEFI (shim and
    systemd-stub hook services): the hook runs, calls the original, which succeeds."""
    r = run_vmrun(apps / "hostile_fw.efi", "hook", T)
    assert_limits(r, T)
    assert_outcome(r, "exit_boot_services")
    assert "ok hook-works" in r.console, r.describe()


# ---- quieter defects -----------------------------------------------------------------------------
def test_stack_overflow_is_a_fault_that_names_the_stack(apps):
    """Unbounded recursion: a stack guard turns it into a payload fault at once (well inside the
    time limit, not after overwriting firmware tables), and the message says it was the stack."""
    r = run_vmrun(apps / "hostile_quiet.efi", "stack", T)
    assert_limits(r, T)
    assert_outcome(r, "fault")
    assert "stack" in r.error["message"].lower(), r.describe()
    assert r.result["seconds"] < 3, r.describe()


def test_exit_boot_services_from_a_child_image_is_handed_off(apps):
    """A child image may call ExitBootServices: systemd-stub's Linux is one (LoadImage +
    StartImage). The call returns into the child's own code, which exists on the target; should
    the child later return from its entry point, the handoff's return thunk halts the CPU there
    (tests/e2e/test_stage.py) instead of exiting to a host that is not there."""
    r = run_vmrun(apps / "hostile_quiet.efi", "ebs-child", T)
    assert_limits(r, T)
    assert_outcome(r, "exit_boot_services")
    assert "main: proper ExitBootServices" not in r.console, "the parent's call was the one handed off"


@pytest.mark.parametrize("mode,where", [("ebs-notify", "in-notify"), ("ebs-timer", "in-notify")])
def test_exit_boot_services_from_a_notify_function_is_not_staged(apps, mode, where):
    """ExitBootServices from a notify function (at TPL_CALLBACK, where UEFI 2.10 §7.1 does not
    allow it; the function returns into the firmware's event dispatch, which does not exist
    after the handoff) must not become the run's exit_boot_services outcome: it is refused with
    an error status (the app prints it, returns to efi_main, which then exits boot services
    itself) or the run ends as a payload fault."""
    r = run_vmrun(apps / "hostile_quiet.efi", mode, T)
    assert_limits(r, T)
    assert_outcome(r, "exit_boot_services", "fault")
    if r.returncode == 0:
        m = re.search(rf"^{where} ExitBootServices: (EFI_[A-Z_]+|0x[0-9a-f]+)", r.console, re.M)
        assert m and m[1] != "EFI_SUCCESS", f"the {where} ExitBootServices was not refused: {r.describe()}"
        assert "main: proper ExitBootServices" in r.console, r.describe()
