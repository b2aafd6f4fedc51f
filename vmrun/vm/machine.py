"""The micro-VM: guest memory over the target's RAM, one vCPU at CPL 3, and the run loop.

The payload runs deprivileged (CPL 3) with a ring-0 monitor from ``guest/firmware.S`` that only
forwards exceptions to the host. Three kinds of exit matter:

* an MMIO write to ``HCALL_SVC`` from a service thunk: a UEFI service call, handed to the
  service table (``hostsvc``);
* an MMIO write to ``HCALL_RET``: a guest function that the host called (the image entry point,
  an event notify function) returned;
* ``out PORT_EXC`` from the monitor: an exception at CPL 3, handed to :mod:`vmrun.vm.emulate`
  which emulates the privileged instruction or raises :class:`PayloadFault`.

``call_guest`` nests: a service handler (StartImage, SignalEvent) may call back into the guest,
and the inner loop returns when that call's ``ret_thunk`` fires.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import structlog

from vmrun.errors import GuestMemoryError, KvmError, MemoryCapExceeded, PayloadFault, RunTimeout
from vmrun.vm import cpu, layout as L, paging
from vmrun.vm.kvm import abi, exits
from vmrun.vm.kvm.vm import Kvm, Vcpu, Vm
from vmrun.vm.memory import GuestMemory, merge_spans

log = structlog.get_logger("vmrun.vm.machine")

# CPUID feature bits (leaf 1)
_ECX_XSAVE = 1 << 26
_ECX_OSXSAVE = 1 << 27
_ECX_AVX = 1 << 28
_ECX_RDRAND = 1 << 30
_EDX_TSC = 1 << 4


class ServiceHandler(Protocol):
    def __call__(self, machine: "Machine", service_id: int, regs: abi.kvm_regs) -> int: ...


@dataclass
class Frame:
    """The CPU's exception frame as the monitor left it on its stack."""
    addr: int  # where vector sits; RIP is at addr+16
    vector: int
    error_code: int
    rip: int
    cs: int
    rflags: int
    rsp: int
    ss: int

    def write_back(self, mem: GuestMemory) -> None:
        for off, val in ((16, self.rip), (24, self.cs), (32, self.rflags), (40, self.rsp), (48, self.ss)):
            mem.write_u64(self.addr + off, val)


@dataclass
class FirmwareArea:
    base: int
    blob: cpu.Blob
    page_tables: int
    size: int
    paging: paging.IdentityMap

    def sym(self, name: str) -> int:
        return self.base + L.FW_BLOB + self.blob.symbols[name]

    def thunk(self, service_id: int) -> int:
        if not 0 <= service_id < L.NR_SVC_THUNKS:
            raise ValueError(f"service id {service_id} out of thunk range")
        return self.sym("svc_thunks") + L.SVC_THUNK_SIZE * service_id


@dataclass
class RunLimits:
    timeout: float = L.DEFAULT_TIMEOUT_S
    memory_cap: int = L.DEFAULT_MEMORY_CAP


@dataclass
class Stats:
    exits: int = 0
    hypercalls: int = 0
    exceptions: int = 0


def table_pages(tables: list[tuple[int, bytes]], ram_ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The page ranges that hold ``tables`` outside ``ram_ranges`` and below 4 GiB (what the
    firmware's identity map covers), merged; tables that touch RAM are left out."""
    spans = []
    for addr, data in tables:
        start, end = addr & ~(L.PAGE_SIZE - 1), (addr + len(data) + L.PAGE_SIZE - 1) & ~(L.PAGE_SIZE - 1)
        if not data or end > 4 * L.GIB or any(start < e and s < end for s, e in ram_ranges):
            continue
        spans.append((start, end))
    return merge_spans(spans)


class Machine:
    """One VM, one vCPU, guest memory covering the target's RAM ranges."""

    def __init__(self, ram_ranges: list[tuple[int, int]], limits: RunLimits | None = None,
                 dirty_log: bool = False, tables: list[tuple[int, bytes]] = ()):
        """``tables``: (physical address, bytes) of the target firmware's own tables (SMBIOS)
        that the payload may read where the target has them, outside its RAM; their pages are
        backed and filled, and belong to no allocation (so a write to them is a stray write)."""
        self.limits = limits or RunLimits()
        self.kvm = Kvm()
        self.vm: Vm = self.kvm.create_vm()
        self.mem = GuestMemory()
        self.max_address = 0
        self.dirty_log = dirty_log
        flags = abi.KVM_MEM_LOG_DIRTY_PAGES if dirty_log else 0
        for slot, (start, end) in enumerate(ram_ranges):
            region = self.mem.add_region(start, end - start)
            self.vm.set_memory_region(slot, start, end - start, region.host_addr, flags)
            self.max_address = max(self.max_address, end)
        slot = len(ram_ranges)
        self.table_ranges = table_pages(tables, ram_ranges)
        for start, end in self.table_ranges:
            region = self.mem.add_region(start, end - start)
            self.vm.set_memory_region(slot, start, end - start, region.host_addr, flags)
            slot += 1
        self.tables = [(addr, data) for addr, data in tables if self.mem.contains(addr, len(data))]
        self._fw_mem = self.mem.unguarded()
        for addr, data in self.tables:
            self.mem.write(addr, data)
        self.vcpu: Vcpu = self.vm.create_vcpu(0)
        self.fw: FirmwareArea | None = None
        self.service_handler: ServiceHandler | None = None
        self.exception_handler: Callable[["Machine", Frame, abi.kvm_regs], None] | None = None
        self.locate_rip: Callable[[int], str] | None = None  # names the image a RIP lies in
        self.stats = Stats()
        self.deadline = float("inf")
        self.call_depth = 0
        self._in_guest = False
        self._setup_cpuid()

    # --- set-up ----------------------------------------------------------------------------
    def _setup_cpuid(self) -> None:
        entries = self.kvm.supported_cpuid()
        for e in entries:
            if e.function == 1:
                # no XSAVE/AVX: CR4.OSXSAVE stays off (under this host's nested KVM, PVM, `xgetbv`
                # at CPL 0 ends in KVM_EXIT_INTERNAL_ERROR, emulation failure: measured);
                # RDRAND and TSC must be visible or the Linux stub polls the i8254 forever.
                e.ecx &= ~(_ECX_XSAVE | _ECX_OSXSAVE | _ECX_AVX)
                if not (e.ecx & _ECX_RDRAND) and not (e.edx & _EDX_TSC):
                    log.warning("cpuid.missing_feature", rdrand=bool(e.ecx & _ECX_RDRAND),
                                tsc=bool(e.edx & _EDX_TSC))
            if e.function == 7 and e.index == 0:
                e.ebx &= ~((1 << 5) | (1 << 16) | (1 << 17) | (1 << 28) | (1 << 30) | (1 << 31))  # AVX2/AVX512*
        self.vcpu.set_cpuid(entries)

    def install_firmware(self, base: int, size: int) -> FirmwareArea:
        """Write GDT, IDT, TSS, the monitor blob and identity page tables at ``base``."""
        blob = cpu.load_blob()
        if len(blob.code) > L.FW_BLOB_MAX:
            raise KvmError(f"guest blob is {len(blob.code)} bytes, more than {L.FW_BLOB_MAX}")
        limit = max(self.max_address, 4 * L.GIB)
        pt = base + L.FW_PAGE_TABLES
        need = self.firmware_area_size(self.max_address)
        if size < need:
            raise KvmError(f"firmware area of {size:#x} bytes is smaller than {need:#x}")
        m = self.mem
        m.fill(base, size, 0)
        m.write(base + L.FW_GDT, cpu.build_gdt(base + L.FW_TSS))
        m.write(base + L.FW_IDT, cpu.build_idt(base + L.FW_BLOB, blob.symbols))
        m.write(base + L.FW_TSS, cpu.build_tss(base + L.FW_MONITOR_STACK_TOP))
        m.write(base + L.FW_BLOB, blob.code)
        pg = paging.IdentityMap(m, pt, limit)
        # what CPL 3 may do with the firmware area (vmrun.vm.paging)
        pg.protect(base + L.FW_GDT, base + L.FW_BLOB, paging.SUPERVISOR, "vmrun's GDT, IDT and TSS")
        pg.protect(base + L.FW_BLOB, base + L.FW_MONITOR_STACK, paging.USER_RO,
                   "vmrun's monitor and service thunks")
        pg.protect(base + L.FW_MONITOR_STACK, base + L.FW_MONITOR_STACK_TOP, paging.SUPERVISOR,
                   "vmrun's monitor stack")
        pg.protect(pt, base + size, paging.SUPERVISOR, "vmrun's page tables")
        pg.protect(0, L.PAGE_SIZE, paging.NONE, "page 0 (NULL)")
        for start, end in self.table_ranges:
            pg.protect(start, end, paging.USER_RO, "the target firmware's tables (SMBIOS)")
        self.fw = FirmwareArea(base, blob, pt, size, pg)
        self._setup_sregs()
        return self.fw

    @staticmethod
    def firmware_area_size(max_address: int) -> int:
        limit = max(max_address, 4 * L.GIB)
        return L.FW_FIXED_SIZE + paging.IdentityMap.size(limit)

    # --- what the payload may touch (vmrun.vm.paging) -------------------------------------------
    def protect(self, start: int, end: int, kind: int, what: str) -> None:
        """Give [start, end) the CPL-3 access ``kind`` (``vmrun.vm.paging``) for the whole run."""
        self.fw.paging.protect(start, end, kind, what)

    def restrict_to_allocations(self, allocations) -> None:
        """Only RAM that allocations touch is present for the payload (and writable by the host
        on its behalf) from now on; ``allocations``: (start, end) of those made so far."""
        self.fw.paging.restrict(allocations)
        self.mem.write_guard = self.fw.paging.host_may_write

    def map_allocation(self, start: int, end: int) -> None:
        """An allocation [start, end) was made: make its frames present. The frames mapped in a
        run are host memory the guest can make resident; more than the memory cap (plus
        ``FRAME_SLACK``) ends the run with the memory_cap outcome."""
        pg = self.fw.paging
        new = pg.frames_to_map(start, end) * paging.FRAME
        limit = self.limits.memory_cap + L.FRAME_SLACK
        if new and pg.mapped_bytes + new > limit:
            raise MemoryCapExceeded(
                f"the allocations reach {(pg.mapped_bytes + new) >> 20} MiB of 2 MiB frames of guest "
                f"RAM, more than the memory cap of {self.limits.memory_cap >> 20} MiB + "
                f"{L.FRAME_SLACK >> 20} MiB (allocations spread thinly over RAM cost the host a "
                "whole frame each)", mapped=pg.mapped_bytes, asked=new, cap=self.limits.memory_cap)
        pg.map_allocation(start, end)

    def describe_address(self, addr: int) -> str:
        """What ``addr`` is to the payload (a protected firmware range, RAM no allocation covers),
        or ""."""
        return self.fw.paging.describe(addr) if self.fw else ""

    def end_run(self) -> None:
        """The payload stopped running (ExitBootServices or any other end): the plain identity
        map for the handoff, and the host writes freely again (staging)."""
        if self.fw and self.fw.paging.restricted:
            self.fw.paging.handoff()
        self.mem.write_guard = None

    def _setup_sregs(self) -> None:
        fw = self.fw
        s = self.vcpu.get_sregs()

        def seg(sel: int, code: bool, dpl: int) -> abi.kvm_segment:
            return abi.kvm_segment(base=0, limit=0xFFFFFFFF, selector=sel, present=1, dpl=dpl, s=1, g=1,
                                   type=0xB if code else 0x3, l=1 if code else 0, db=0 if code else 1)

        s.cs = seg(L.SEL_USER_CS, True, 3)
        s.ds = s.es = s.fs = s.gs = s.ss = seg(L.SEL_USER_DS, False, 3)
        s.tr = abi.kvm_segment(base=fw.base + L.FW_TSS, limit=103, selector=L.SEL_TSS, type=0xB, present=1)
        s.ldt = abi.kvm_segment(unusable=1)
        s.gdt.base, s.gdt.limit = fw.base + L.FW_GDT, 8 * L.GDT_ENTRIES - 1
        s.idt.base, s.idt.limit = fw.base + L.FW_IDT, 256 * 16 - 1
        s.cr0, s.cr3, s.cr4, s.efer = L.INITIAL_CR0, fw.page_tables, L.INITIAL_CR4, L.INITIAL_EFER
        self.vcpu.set_sregs(s)
        self.vcpu.set_msrs({L.MSR_MTRR_DEF_TYPE: L.MTRR_DEF_TYPE_WB_ENABLED, L.MSR_PAT: L.PAT_DEFAULT})
        fpu = self.vcpu.get_fpu()
        fpu.fcw = 0x037F  # UEFI 2.10 §2.3.4: x87 control word 0x037F, MXCSR 0x1F80
        fpu.mxcsr = 0x1F80
        self.vcpu.set_fpu(fpu)

    # --- calling into the guest -------------------------------------------------------------
    def call_guest(self, func: int, args: tuple[int, ...] = (), stack_top: int | None = None) -> int:
        """Call ``func`` at CPL 3 with MS x64 arguments; return its RAX.

        The vCPU's registers are saved and restored around the call, so a service handler can
        call back into the guest and then return to its own caller normally. ``stack_top`` is
        used when nothing is running yet (the first call); nested calls run below the caller's
        stack pointer.
        """
        if len(args) > 4:
            raise ValueError("call_guest passes at most 4 arguments")
        saved = self.vcpu.get_regs()
        top = stack_top if stack_top is not None else saved.rsp - 256  # keep the caller's red zone
        # as after a `call` from 16-byte-aligned code that reserved the 32-byte shadow space:
        # at entry [RSP] is the return address and RSP + 8 is 16-byte aligned (UEFI 2.10 §2.3.4.1)
        rsp = (top & ~0xF) - 32 - 8
        try:
            self.mem.write_u64(rsp, self.fw.sym("ret_thunk"))
        except GuestMemoryError:
            raise PayloadFault(f"the payload's stack pointer {saved.rsp:#x} does not point into its "
                               f"memory, so vmrun cannot call back into it (function {func:#x})",
                               rip=saved.rip) from None
        if self.call_depth == 0 and self.fw:
            self.fw.paging.seal()
        regs = abi.kvm_regs()
        regs.rip = func
        regs.rsp = rsp
        regs.rflags = L.PAYLOAD_RFLAGS
        for name, val in zip(("rcx", "rdx", "r8", "r9"), args):
            setattr(regs, name, val & 0xFFFFFFFFFFFFFFFF)
        self.vcpu.set_regs(regs)
        nested = self.call_depth > 0
        self.call_depth += 1
        try:
            rax = self._loop()
        except BaseException as e:
            # an exception that unwinds guest frames (Exit() of a nested image) resumes the
            # caller; anything else (ExitBootServices, faults) keeps the state where it is
            if nested and getattr(e, "unwinds_guest", False):
                self.vcpu.set_regs(saved)
            raise
        finally:
            self.call_depth -= 1
            if self.call_depth == 0:
                self.end_run()
        if nested:
            self.vcpu.set_regs(saved)
        return rax

    # --- the run loop -------------------------------------------------------------------------
    def start_watchdog(self) -> None:
        self.deadline = time.monotonic() + self.limits.timeout
        if threading.current_thread() is threading.main_thread():
            self._old_alarm = signal.signal(signal.SIGALRM, self._on_alarm)
            signal.setitimer(signal.ITIMER_REAL, 0.1, 0.1)

    def stop_watchdog(self) -> None:
        if threading.current_thread() is threading.main_thread() and hasattr(self, "_old_alarm"):
            signal.setitimer(signal.ITIMER_REAL, 0, 0)
            signal.signal(signal.SIGALRM, self._old_alarm)
            del self._old_alarm

    def _on_alarm(self, *_) -> None:
        """The watchdog's tick. In the guest (KVM_RUN) it only interrupts the run, which checks
        the deadline; in host code working on the payload's behalf for longer than the limit plus
        ``WATCHDOG_GRACE_S`` it ends the run from here (the exception surfaces in that code)."""
        if (self.call_depth > 0 and not self._in_guest
                and time.monotonic() > self.deadline + L.WATCHDOG_GRACE_S):
            regs = self.vcpu.get_regs()
            raise RunTimeout(f"run exceeded its time limit of {self.limits.timeout:g} s while vmrun "
                             f"worked on the payload's behalf (service called from rip "
                             f"{regs.rip:#x}{self.describe_rip(regs.rip)})", rip=regs.rip)

    def check_deadline(self) -> None:
        if time.monotonic() > self.deadline:
            regs = self.vcpu.get_regs()
            raise RunTimeout(f"run exceeded its time limit of {self.limits.timeout:g} s "
                             f"(guest at rip {regs.rip:#x}{self.describe_rip(regs.rip)})",
                             rip=regs.rip)

    def describe_rip(self, rip: int) -> str:
        """`` (image+0xoff)`` when ``rip`` lies in a known image (``locate_rip``, set by the firmware)."""
        return self.locate_rip(rip) if self.locate_rip else ""

    def _loop(self) -> int:
        vcpu = self.vcpu
        hcall_svc, hcall_ret = L.HCALL_SVC, L.HCALL_RET
        while True:
            self._in_guest = True
            try:
                ex = vcpu.run()
            finally:
                self._in_guest = False
            self.stats.exits += 1
            if type(ex) is exits.Mmio:
                if ex.is_write and ex.addr == hcall_svc:
                    self.stats.hypercalls += 1
                    regs = vcpu.get_regs()
                    rax = self.service_handler(self, int.from_bytes(ex.data, "little"), regs)
                    regs = vcpu.get_regs()  # a nested call may have run; keep what it restored
                    regs.rax = rax & 0xFFFFFFFFFFFFFFFF
                    vcpu.set_regs(regs)
                    continue
                if ex.is_write and ex.addr == hcall_ret:
                    return vcpu.get_regs().rax
                regs = vcpu.get_regs()
                raise PayloadFault(
                    f"payload {'wrote' if ex.is_write else 'read'} {ex.size} bytes at unbacked "
                    f"guest-physical address {ex.addr:#x} (rip {regs.rip:#x}{self.describe_rip(regs.rip)})",
                    rip=regs.rip, address=ex.addr)
            if type(ex) is exits.IoOut and ex.port == L.PORT_EXC:
                self.stats.exceptions += 1
                if not self.stats.exceptions & 63:  # a storm of fast exits spends its time here
                    self.check_deadline()
                self._exception()
                continue
            if type(ex) is exits.Interrupted:
                self.check_deadline()
                continue
            self._unexpected_exit(ex)

    def _exception(self) -> None:
        regs = self.vcpu.get_regs()
        sp = regs.rsp
        q = [self.mem.read_u64(sp + 8 * i) for i in range(7)]
        frame = Frame(sp, q[0], q[1], q[2], q[3], q[4], q[5], q[6])
        if frame.cs & 3 != 3:
            raise PayloadFault(f"exception {frame.vector} in the ring-0 monitor at rip {frame.rip:#x}: "
                               "vmrun's own guest code failed", rip=frame.rip, vector=frame.vector)
        try:
            self.exception_handler(self, frame, regs)
        except PayloadFault as e:
            if frame.vector == 14:  # say what the faulting address is to the payload
                cr2 = self.vcpu.get_sregs().cr2
                what = self.describe_address(cr2)
                if what:
                    e.message = f"{e.message}; {cr2:#x} is {what}"
                    e.args = (e.message,)
                    e.details["address_is"] = what
            raise
        frame.write_back(self._fw_mem)  # the monitor's stack: vmrun's own page

    def _unexpected_exit(self, ex: exits.Exit) -> None:
        regs = self.vcpu.get_regs()
        where = f"rip {regs.rip:#x}{self.describe_rip(regs.rip)}"
        if isinstance(ex, exits.Shutdown):
            raise PayloadFault(f"guest triple fault (shutdown) at {where}", rip=regs.rip)
        if isinstance(ex, exits.InternalError):
            raise PayloadFault(f"KVM could not emulate the guest at {where}: {ex.describe()}",
                               rip=regs.rip)
        if isinstance(ex, exits.Hlt):
            raise PayloadFault(f"guest halted at {where}", rip=regs.rip)
        if isinstance(ex, exits.FailEntry):
            raise KvmError(f"KVM could not enter the guest (hardware reason {ex.reason:#x}) at {where}")
        if isinstance(ex, (exits.IoOut, exits.IoIn)):
            raise PayloadFault(f"unexpected port I/O exit ({ex}) at {where}", rip=regs.rip)
        raise KvmError(f"unexpected KVM exit {ex} at {where}")

    def dirty_pages(self) -> list[int]:
        """Guest-physical pages the guest wrote since the last call (KVM dirty log; host
        writes through the mapping are not counted)."""
        if not self.dirty_log:
            raise KvmError("dirty logging was not enabled for this machine")
        pages = []
        for slot, region in self.vm.slots.items():
            bitmap = self.vm.dirty_log(slot)
            base = region.guest_phys_addr
            for i in range(0, len(bitmap), 8):
                word = int.from_bytes(bitmap[i:i + 8], "little")
                while word:
                    bit = (word & -word).bit_length() - 1
                    pages.append(base + ((i * 8 + bit) << 12))
                    word &= word - 1
        return pages

    def close(self) -> None:
        self.stop_watchdog()
        self.vm.close()
        self.kvm.close()
        self.mem.close()
