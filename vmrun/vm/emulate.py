"""Emulation of the privileged instructions a CPL-3 payload executes, and payload faults.

When the payload runs an instruction that needs CPL 0, the CPU raises #GP, the ring-0 monitor
forwards it, and :class:`Emulator` decodes the instruction (iced-x86) at the faulting RIP.
The defined set is emulated and the saved RIP advanced past it:

* ``mov`` to/from CR0, CR2, CR3, CR4, CR8 (CR0/CR4 writes must keep long mode: PE, PG, PAE);
* ``cli``/``sti`` (a virtual IF: no interrupt is delivered to the payload, but it decides
  whether a ``hlt`` can ever end), ``hlt`` (waits for the next interrupt, see
  :meth:`Emulator.halt`), ``wbinvd``/``invd``, ``invlpg`` (flushes the TLB);
* ``rdmsr``/``wrmsr`` of :data:`MSR_READ_ALLOW` / :data:`MSR_WRITE_ALLOW`;
* ``in``/``out`` (also ``ins``/``outs``) to the ports registered on the :class:`PortBus`
  (i8254 0x40-0x43 and 0x61, CMOS 0x70-0x71, POST 0x80, 16550 UART 0x3f8-0x3ff).

Anything else raises :class:`vmrun.errors.PayloadFault` with the vector, RIP, image+offset,
the instruction bytes and their disassembly.
"""

from __future__ import annotations

import time
from typing import Protocol

import iced_x86 as X

from vmrun.errors import GuestMemoryError, PayloadFault, PayloadHalted
from vmrun.vm import layout as L
from vmrun.vm.devices import PortBus
from vmrun.vm.kvm import abi

VECTOR_NAMES = {0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM",
                8: "#DF", 10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF",
                17: "#AC", 18: "#MC", 19: "#XM", 20: "#VE", 21: "#CP", 0xFF: "spurious"}

MSR_EFER = 0xC0000080
MSR_APIC_BASE = 0x1B
APIC_BASE_VALUE = 0xFEE00000 | (1 << 11) | (1 << 8)  # enabled, BSP
MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE = 0xC0000100, 0xC0000101, 0xC0000102

# MSRs the payload may read (value from KVM unless noted) and write (passed to KVM unless noted).
MSR_READ_ALLOW = {
    0x10: "TSC", 0x1B: "APIC_BASE (fixed)", 0x8B: "BIOS_SIGN_ID (0)", 0xFE: "MTRRCAP",
    0x1A0: "MISC_ENABLE", 0x277: "PAT", 0x2FF: "MTRR_DEF_TYPE",
    **{0x200 + i: "MTRR_PHYS" for i in range(16)},
    0x250: "MTRR_FIX64K", 0x258: "MTRR_FIX16K", 0x259: "MTRR_FIX16K",
    **{0x268 + i: "MTRR_FIX4K" for i in range(8)},
    MSR_EFER: "EFER (from sregs)", MSR_FS_BASE: "FS_BASE", MSR_GS_BASE: "GS_BASE",
    MSR_KERNEL_GS_BASE: "KERNEL_GS_BASE",
}
MSR_WRITE_ALLOW = {
    0x8B: "BIOS_SIGN_ID (ignored)", 0x277: "PAT", 0x2FF: "MTRR_DEF_TYPE",
    **{0x200 + i: "MTRR_PHYS" for i in range(16)},
    MSR_EFER: "EFER (NXE and SCE only)", MSR_FS_BASE: "FS_BASE", MSR_GS_BASE: "GS_BASE",
    MSR_KERNEL_GS_BASE: "KERNEL_GS_BASE",
}

_GPR64 = ["rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
          "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"]
_REGS: dict[int, tuple[str, int]] = {}
for _i, _n in enumerate(_GPR64):
    _REGS[X.Register.RAX + _i] = (_n, 8)
    _REGS[X.Register.EAX + _i] = (_n, 4)
    _REGS[X.Register.AX + _i] = (_n, 2)
_REGS[X.Register.AL] = ("rax", 1)
_CRS = {X.Register.CR0: 0, X.Register.CR2: 2, X.Register.CR3: 3, X.Register.CR4: 4, X.Register.CR8: 8}

_FORMATTER = X.Formatter(X.FormatterSyntax.GAS)


def translate(mem, cr3: int, va: int) -> int:
    """Walk 4-level page tables (4 KiB, 2 MiB and 1 GiB pages) from ``cr3``; raise on a miss."""
    table = cr3 & 0x000F_FFFF_FFFF_F000
    for level, shift in ((4, 39), (3, 30), (2, 21), (1, 12)):
        entry = mem.read_u64(table + 8 * ((va >> shift) & 0x1FF))
        if not entry & 1:
            raise GuestMemoryError(va, 1, f"page walk (level {level} not present) for")
        addr = entry & 0x000F_FFFF_FFFF_F000
        if level in (3, 2) and entry & 0x80:
            size = 1 << shift
            return (addr & ~(size - 1)) + (va & (size - 1))
        table = addr
    return table + (va & 0xFFF)


# The firmware's timer tick: an interrupt ends a hlt with interrupts enabled at the latest then.
TIMER_TICK_S = 0.01


class InterruptSource(Protocol):
    """What can interrupt a halted payload: the firmware's timer (its timer events)."""

    def next_deadline(self) -> float | None: ...   # time.monotonic() of the next timer event

    def interrupts_masked(self) -> bool: ...       # the firmware has interrupts off (TPL_HIGH_LEVEL)


class Emulator:
    def __init__(self, ports: PortBus, interrupts: InterruptSource | None = None) -> None:
        self.ports = ports
        self.interrupts = interrupts
        self.virtual_if = True
        self.cr8 = 0
        self.counts: dict[str, int] = {}

    # --- helpers ----------------------------------------------------------------------------
    def _fetch(self, machine, rip: int, cr3: int) -> bytes:
        out = bytearray()
        va = rip
        while len(out) < 15:
            try:
                pa = translate(machine.mem, cr3, va)
                n = min(15 - len(out), 0x1000 - (va & 0xFFF))
                out += machine.mem.read(pa, n)
                va += n
            except GuestMemoryError:
                break
        return bytes(out)

    def _fault(self, machine, frame, why: str, code: bytes = b"", sregs=None) -> PayloadFault:
        name = VECTOR_NAMES.get(frame.vector, f"vector {frame.vector}")
        err = f"({frame.error_code:#x})" if frame.vector in (8, 10, 11, 12, 13, 14, 17, 21) else ""
        where = f"rip {frame.rip:#x}{machine.describe_rip(frame.rip)}"
        text = ""
        if code:
            ins = X.Decoder(64, code, ip=frame.rip).decode()
            if ins.code != X.Code.INVALID:
                text = f" `{_FORMATTER.format(ins)}` ({code[:ins.len].hex(' ')})"
            else:
                text = f" (bytes {code[:8].hex(' ')})"
        extra = ""
        if frame.vector == 14 and sregs is not None:
            extra = f", address {sregs.cr2:#x}"
        return PayloadFault(f"payload fault {name}{err} at {where}{text}{extra}: {why}",
                            vector=frame.vector, rip=frame.rip, error_code=frame.error_code)

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    # --- entry ------------------------------------------------------------------------------
    def handle(self, machine, frame, regs: abi.kvm_regs) -> None:
        sregs = machine.vcpu.get_sregs()
        code = self._fetch(machine, frame.rip, sregs.cr3)
        if frame.vector != 13:
            why = {14: "page fault", 3: "breakpoint", 6: "invalid opcode", 0: "divide error",
                   17: "alignment check", 19: "SIMD floating-point exception",
                   16: "x87 floating-point exception"}.get(frame.vector, "exception")
            raise self._fault(machine, frame, why, code, sregs)
        if not code:
            raise self._fault(machine, frame, "cannot read the instruction")
        ins = X.Decoder(64, code, ip=frame.rip).decode()
        if ins.code == X.Code.INVALID:
            raise self._fault(machine, frame, "undecodable instruction", code)
        handled = self._emulate(machine, frame, regs, sregs, ins)
        if not handled:
            raise self._fault(machine, frame, "not an instruction vmrun emulates at CPL 3 "
                                              "(a privileged instruction, an unknown port or MSR, "
                                              "or a non-canonical/protected access)", code)
        frame.rip += ins.len
        machine.vcpu.set_regs(regs)

    def _emulate(self, machine, frame, regs, sregs, ins) -> bool:
        m = ins.mnemonic
        C = X.Code
        if ins.code == C.MOV_R64_CR:
            reg, _ = _REGS[ins.op0_register]
            cr = _CRS.get(ins.op1_register)
            if cr is None:
                return False
            value = {0: sregs.cr0, 2: sregs.cr2, 3: sregs.cr3, 4: sregs.cr4, 8: self.cr8}[cr]
            setattr(regs, reg, value)
            self._count(f"mov_from_cr{cr}")
            return True
        if ins.code == C.MOV_CR_R64:
            cr = _CRS.get(ins.op0_register)
            reg, _ = _REGS[ins.op1_register]
            if cr is None:
                return False
            value = getattr(regs, reg)
            self._write_cr(machine, frame, sregs, cr, value)
            self._count(f"mov_to_cr{cr}")
            return True
        if m == X.Mnemonic.CLI:
            self.virtual_if = False
            self._count("cli")
            return True
        if m == X.Mnemonic.STI:
            self.virtual_if = True
            self._count("sti")
            return True
        if m == X.Mnemonic.HLT:
            self._count("hlt")
            self.halt(machine, frame)
            return True
        if m in (X.Mnemonic.WBINVD, X.Mnemonic.INVD):
            self._count(m == X.Mnemonic.WBINVD and "wbinvd" or "invd")
            return True
        if m == X.Mnemonic.INVLPG:
            machine.vcpu.set_sregs(sregs)  # reloading CR3 flushes the TLB
            self._count("invlpg")
            return True
        if m == X.Mnemonic.RDMSR:
            return self._rdmsr(machine, regs, sregs)
        if m == X.Mnemonic.WRMSR:
            return self._wrmsr(machine, regs, sregs)
        if m in (X.Mnemonic.IN, X.Mnemonic.OUT):
            return self._port_io(ins, regs)
        if m in (X.Mnemonic.INSB, X.Mnemonic.INSW, X.Mnemonic.INSD,
                 X.Mnemonic.OUTSB, X.Mnemonic.OUTSW, X.Mnemonic.OUTSD):
            return self._string_io(machine, ins, regs, sregs)
        return False

    def halt(self, machine, frame) -> None:
        """``hlt``: the vCPU sleeps until the next interrupt.

        With interrupts enabled (virtual IF set, firmware below TPL_HIGH_LEVEL) the firmware's
        timer interrupt comes within one tick, or sooner when a timer event is due: the payload
        resumes after the ``hlt`` then (timer events are checked at its next service call). A
        payload that halts in a loop with interrupts enabled therefore runs until the time limit.
        With interrupts disabled no interrupt can arrive, so the vCPU never resumes: the run ends
        at once (:class:`PayloadHalted`), whatever timer events are pending.
        """
        masked = self.interrupts is not None and self.interrupts.interrupts_masked()
        if not self.virtual_if or masked:
            how = "cli" if not self.virtual_if else "TPL_HIGH_LEVEL"
            raise PayloadHalted(f"payload halted with interrupts disabled ({how}) at rip {frame.rip:#x}"
                                f"{machine.describe_rip(frame.rip)}: nothing can resume it", rip=frame.rip)
        now = time.monotonic()
        wake = now + TIMER_TICK_S
        due = self.interrupts.next_deadline() if self.interrupts is not None else None
        if due is not None:
            wake = min(wake, due)
        wake = min(wake, machine.deadline)
        if wake > now:
            time.sleep(wake - now)
        machine.check_deadline()

    def _write_cr(self, machine, frame, sregs, cr: int, value: int) -> None:
        if cr == 0:
            need = L.CR0_PE | L.CR0_PG
            if value & need != need:
                raise self._fault(machine, frame, f"CR0 write {value:#x} would leave protected/paged mode")
            sregs.cr0 = value
        elif cr == 4:
            if not value & L.CR4_PAE or (value ^ sregs.cr4) & (1 << 12):
                raise self._fault(machine, frame, f"CR4 write {value:#x} would change PAE or LA57")
            sregs.cr4 = value
        elif cr == 3:
            sregs.cr3 = value
        elif cr == 2:
            sregs.cr2 = value
        elif cr == 8:
            self.cr8 = value & 0xF
            return
        machine.vcpu.set_sregs(sregs)

    def _rdmsr(self, machine, regs, sregs) -> bool:
        index = regs.rcx & 0xFFFFFFFF
        if index not in MSR_READ_ALLOW:
            return False
        if index == MSR_EFER:
            value = sregs.efer
        elif index == MSR_APIC_BASE:
            value = APIC_BASE_VALUE
        elif index == 0x8B:
            value = 0
        else:
            got = machine.vcpu.get_msrs([index])
            if index not in got:
                return False
            value = got[index]
        regs.rax = value & 0xFFFFFFFF
        regs.rdx = value >> 32
        self._count(f"rdmsr_{index:#x}")
        return True

    def _wrmsr(self, machine, regs, sregs) -> bool:
        index = regs.rcx & 0xFFFFFFFF
        if index not in MSR_WRITE_ALLOW:
            return False
        value = ((regs.rdx & 0xFFFFFFFF) << 32) | (regs.rax & 0xFFFFFFFF)
        if index == MSR_EFER:
            keep = L.EFER_LME | L.EFER_LMA
            if value & keep != sregs.efer & keep:
                return False
            sregs.efer = (sregs.efer & ~(L.EFER_NXE | L.EFER_SCE)) | (value & (L.EFER_NXE | L.EFER_SCE))
            machine.vcpu.set_sregs(sregs)
        elif index == 0x8B:
            pass
        else:
            machine.vcpu.set_msrs({index: value})
        self._count(f"wrmsr_{index:#x}")
        return True

    def _port_io(self, ins, regs) -> bool:
        is_in = ins.mnemonic == X.Mnemonic.IN
        port_op = 1 if is_in else 0
        data_reg = ins.op0_register if is_in else ins.op1_register
        if ins.op_kind(port_op) == X.OpKind.IMMEDIATE8:
            port = ins.immediate8
        else:
            port = regs.rdx & 0xFFFF
        _, size = _REGS.get(data_reg, ("rax", 1))
        dev = self.ports.find(port)
        if dev is None:
            return False
        mask = (1 << (8 * size)) - 1
        if is_in:
            value = dev.read(port, size) & mask
            if size == 4:
                regs.rax = value  # a 32-bit write zero-extends
            else:
                regs.rax = (regs.rax & ~mask) | value
            self._count(f"in_{port:#x}")
        else:
            dev.write(port, size, regs.rax & mask)
            self._count(f"out_{port:#x}")
        return True

    def _string_io(self, machine, ins, regs, sregs) -> bool:
        size = {X.Mnemonic.INSB: 1, X.Mnemonic.OUTSB: 1, X.Mnemonic.INSW: 2, X.Mnemonic.OUTSW: 2}.get(
            ins.mnemonic, 4)
        port = regs.rdx & 0xFFFF
        dev = self.ports.find(port)
        if dev is None:
            return False
        count = regs.rcx if ins.has_rep_prefix else 1
        is_in = ins.mnemonic in (X.Mnemonic.INSB, X.Mnemonic.INSW, X.Mnemonic.INSD)
        for _ in range(count):
            if is_in:
                pa = translate(machine.mem, sregs.cr3, regs.rdi)
                machine.mem.write(pa, dev.read(port, size).to_bytes(size, "little"))
                regs.rdi += size
            else:
                pa = translate(machine.mem, sregs.cr3, regs.rsi)
                dev.write(port, size, int.from_bytes(machine.mem.read(pa, size), "little"))
                regs.rsi += size
        if ins.has_rep_prefix:
            regs.rcx = 0
        self._count(f"{'ins' if is_in else 'outs'}_{port:#x}")
        return True
