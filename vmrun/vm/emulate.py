"""Emulation of the privileged instructions a CPL-3 payload executes, and payload faults.

When the payload runs an instruction that needs CPL 0, the CPU raises #GP, the ring-0 monitor
forwards it, and :class:`Emulator` decodes the instruction (iced-x86) at the faulting RIP.
The defined set is emulated and the saved RIP advanced past it:

* ``mov`` to/from CR0, CR2, CR3, CR4, CR8 (see "Control registers" below);
* ``cli``/``sti`` (a virtual IF: no interrupt is delivered to the payload, but it decides
  whether a ``hlt`` can ever end), ``hlt`` (waits for the next interrupt, see
  :meth:`Emulator.halt`), ``wbinvd``/``invd``, ``invlpg`` (flushes the TLB);
* ``rdmsr``/``wrmsr`` of :data:`MSR_READ_ALLOW` / :data:`MSR_WRITE_ALLOW` (see "MSRs");
* ``in``/``out`` (also ``ins``/``outs``, with ``rep``) to the ports registered on the
  :class:`PortBus` (i8254 0x40-0x43 and 0x61, CMOS 0x70-0x71, POST 0x80, 16550 UART
  0x3f8-0x3ff).

Anything else raises :class:`vmrun.errors.PayloadFault` with the vector, RIP, image+offset,
the instruction bytes and their disassembly. Whatever the payload does, the outcome is a
:class:`PayloadFault` (or :class:`PayloadHalted`, :class:`RunTimeout`): never a host error.
Where the CPU would raise #GP (a reserved bit, a non-canonical address, an invalid memory
type) the fault says so and names the instruction and the value; the payload has no
exception handlers of its own under vmrun, so a #GP it would take is the end of the run.

Control registers (SDM Vol. 3 §2.5, "MOV—Move to/from Control Registers"):

* CR0: bits 63:32 set → #GP; PG without PE, NW without CD → #GP; clearing PG or PE in
  64-bit mode → #GP. Reserved bits in 31:0 are ignored (cleared), as the CPU does; ET reads 1.
  Every defined bit is honoured and carried to the handoff: WP (it only governs
  supervisor-mode writes, and the payload never runs at CPL 0 before ExitBootServices; the
  protection of vmrun's firmware area comes from its page tables, which user-mode writes
  always obey), CD/NW, TS, EM, MP, NE, AM.
* CR3: bits at or above the CPU's physical-address width → #GP. Otherwise only the current
  value is accepted (its PWT/PCD flags may change): reloading CR3 is the TLB-flush idiom and
  flushes. A payload's switch to page tables of its own before ExitBootServices is refused:
  vmrun's page tables are what keep the firmware area (monitor, IDT, GDT, TSS, page tables)
  out of the payload's reach, and a CR3 the payload built would drop that.
* CR4: bits the presented CPU does not have are reserved → #GP (as on that CPU): 15, 19,
  24-63 (KL, PKS, UINTR, LAM …), SMXE, VMXE (no VMX offered), OSXSAVE (CPUID hides XSAVE),
  FSGSBASE/UMIP/PKE/LA57 when CPUID lacks them. PAE cleared or LA57 changed in long mode
  → #GP. Refused because vmrun cannot honour them (a fault saying why):
  SMEP and SMAP (vmrun's ring-0 monitor runs on, and pushes its frames onto, pages the
  identity map marks user-accessible: every later exception would triple-fault — measured),
  PCIDE (the handoff restores CR4 before CR3, and a PCID-enabled CR4 under the previous
  kernel's CR3 would fault there; vmrun's CR3 emulation has no PCIDs), TSD and PCE (under
  this host's nested KVM the payload's CPL-3 code runs with the host's CR4: ``rdtsc`` keeps
  working with TSD set and ``rdpmc`` keeps faulting with PCE set — measured), CET (its MSRs
  are not offered), and clearing OSFXSR/OSXMMEXCPT (UEFI requires SSE enabled and the
  handoff restores both set). VME, PVI, DE, PSE, MCE, PGE, UMIP, FSGSBASE, PKE are honoured.
* CR8: bits 63:4 set → #GP. CR2: any value.

MSRs: FS_BASE, GS_BASE and KERNEL_GS_BASE must be canonical (57-bit when CPUID shows LA57,
else 48-bit); EFER may change SCE and NXE only (LME → #GP, LMA is read-only and ignored,
any other bit → #GP: not offered); PAT entries must be memory types 0, 1, 4, 5, 6, 7;
MTRR_DEF_TYPE only bits 7:0 (a valid MTRR type: 0, 1, 4, 5, 6), 10 and 11; MTRR_PHYSBASE a
valid type, bits 11:8 clear and nothing at or above the physical-address width;
MTRR_PHYSMASK bits 10:0 clear and nothing at or above the width. A value KVM still refuses
(``KvmError``) ends as a :class:`PayloadFault` naming the write too.

String port I/O (``rep ins``/``rep outs``) emulates at most :data:`STRING_IO_PER_EXIT`
iterations per exception and then leaves RIP on the instruction with RCX, RSI/RDI advanced:
the CPU re-executes it (as an interrupted ``rep`` does on hardware), and the run loop's time
limit holds between exits; each batch also checks the deadline. The element's memory is
accessed through the payload's page tables with user-mode permissions (present, U/S, and
R/W for ``ins``): a page the payload may not read or write is a fault, not a host write.

Debug exceptions: ``int3`` (#BP) is a trap and the CPU reports the next instruction; the fault
names the ``int3`` itself (RIP - 1 for ``CC``, RIP - 2 for ``CD 03``). A single-step #DB
(RFLAGS.TF) names the instruction boundary after which it trapped.
"""

from __future__ import annotations

import time
from typing import Protocol

import iced_x86 as X

from vmrun.errors import GuestMemoryError, KvmError, PayloadFault, PayloadHalted
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
MSR_PAT = 0x277
MSR_MTRR_DEF_TYPE = 0x2FF

# MSRs the payload may read (value from KVM unless noted) and write (passed to KVM unless noted).
MSR_READ_ALLOW = {
    0x10: "TSC", 0x1B: "APIC_BASE (fixed)", 0x8B: "BIOS_SIGN_ID (0)", 0xFE: "MTRRCAP",
    0x1A0: "MISC_ENABLE", 0x277: "PAT", 0x2FF: "MTRR_DEF_TYPE",
    **{0x200 + i: ("MTRR_PHYSBASE" if i % 2 == 0 else "MTRR_PHYSMASK") for i in range(16)},
    0x250: "MTRR_FIX64K", 0x258: "MTRR_FIX16K", 0x259: "MTRR_FIX16K",
    **{0x268 + i: "MTRR_FIX4K" for i in range(8)},
    MSR_EFER: "EFER (from sregs)", MSR_FS_BASE: "FS_BASE", MSR_GS_BASE: "GS_BASE",
    MSR_KERNEL_GS_BASE: "KERNEL_GS_BASE",
}
MSR_WRITE_ALLOW = {
    0x8B: "BIOS_SIGN_ID (ignored)", 0x277: "PAT", 0x2FF: "MTRR_DEF_TYPE",
    **{0x200 + i: ("MTRR_PHYSBASE" if i % 2 == 0 else "MTRR_PHYSMASK") for i in range(16)},
    MSR_EFER: "EFER (NXE and SCE only)", MSR_FS_BASE: "FS_BASE", MSR_GS_BASE: "GS_BASE",
    MSR_KERNEL_GS_BASE: "KERNEL_GS_BASE",
}

# --- control-register bits ------------------------------------------------------------------
CR0_TS, CR0_EM, CR0_AM, CR0_NW, CR0_CD = 1 << 3, 1 << 2, 1 << 18, 1 << 29, 1 << 30
CR0_DEFINED = (L.CR0_PE | L.CR0_MP | CR0_EM | CR0_TS | L.CR0_ET | L.CR0_NE | L.CR0_WP | CR0_AM
               | CR0_NW | CR0_CD | L.CR0_PG)

CR4_NAMES = {0: "VME", 1: "PVI", 2: "TSD", 3: "DE", 4: "PSE", 5: "PAE", 6: "MCE", 7: "PGE", 8: "PCE",
             9: "OSFXSR", 10: "OSXMMEXCPT", 11: "UMIP", 12: "LA57", 13: "VMXE", 14: "SMXE",
             16: "FSGSBASE", 17: "PCIDE", 18: "OSXSAVE", 19: "KL", 20: "SMEP", 21: "SMAP", 22: "PKE",
             23: "CET", 24: "PKS", 25: "UINTR", 28: "LAM_SUP"}
_B = {n: 1 << b for b, n in CR4_NAMES.items()}
# honoured as they are (no CPUID condition)
CR4_HONOURED = _B["VME"] | _B["PVI"] | _B["DE"] | _B["PSE"] | _B["MCE"] | _B["PGE"] | L.CR4_PAE \
    | L.CR4_OSFXSR | L.CR4_OSXMMEXCPT
# honoured when the presented CPUID has them: bit → (leaf, subleaf, register, bit)
CR4_CPUID = {_B["UMIP"]: (7, 0, "ecx", 2), _B["FSGSBASE"]: (7, 0, "ebx", 0), _B["PKE"]: (7, 0, "ecx", 3),
             _B["LA57"]: (7, 0, "ecx", 16)}
# refused although the CPU may have them: vmrun cannot honour them (module docstring)
CR4_REFUSED = {
    _B["SMEP"]: "vmrun's ring-0 monitor runs on pages its identity map marks user-accessible, so "
                "every later exception would triple-fault",
    _B["SMAP"]: "vmrun's ring-0 monitor pushes its frames onto pages its identity map marks "
                "user-accessible, so every later exception would triple-fault",
    _B["PCIDE"]: "vmrun's CR3 emulation has no PCIDs, and the handoff restores CR4 before CR3",
    _B["TSD"]: "under this host's KVM the payload's CPL-3 code runs with the host's CR4, so rdtsc "
               "would keep working",
    _B["PCE"]: "under this host's KVM the payload's CPL-3 code runs with the host's CR4, so rdpmc "
               "would keep faulting",
    _B["CET"]: "vmrun offers no CET MSRs",
}
CR4_KEEP_SET = L.CR4_OSFXSR | L.CR4_OSXMMEXCPT  # UEFI requires SSE; the handoff restores them set

EFER_CHANGEABLE = L.EFER_SCE | L.EFER_NXE
EFER_NAMES = {0: "SCE", 8: "LME", 10: "LMA", 11: "NXE", 12: "SVME", 13: "LMSLE", 14: "FFXSR", 15: "TCE",
              21: "AUTOIBRS"}
MTRR_TYPES = (0, 1, 4, 5, 6)     # UC WC WT WP WB (SDM Vol. 3 Table 12-8)
PAT_TYPES = (0, 1, 4, 5, 6, 7)   # … and UC- (SDM Vol. 3 Table 13-10)

# rep ins/outs: iterations emulated per exception before the CPU re-executes the instruction
STRING_IO_PER_EXIT = 4096

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
_U64 = (1 << 64) - 1
RFLAGS_TF = 1 << 8
RFLAGS_DF = 1 << 10


def translate(mem, cr3: int, va: int) -> int:
    """Walk 4-level page tables (4 KiB, 2 MiB and 1 GiB pages) from ``cr3``; raise on a miss."""
    return walk(mem, cr3, va)[0]


def walk(mem, cr3: int, va: int) -> tuple[int, bool, bool]:
    """(physical address, user-accessible, user-writable) of ``va`` under ``cr3``.

    User-accessible needs U/S at every level, user-writable R/W too (SDM Vol. 3 §4.6: a
    CPL-3 access obeys both whatever CR0.WP says). Raises :class:`GuestMemoryError` when a
    level is not present or a table lies outside guest memory.
    """
    table = cr3 & 0x000F_FFFF_FFFF_F000
    user, writable = True, True
    for level, shift in ((4, 39), (3, 30), (2, 21), (1, 12)):
        entry = mem.read_u64(table + 8 * ((va >> shift) & 0x1FF))
        if not entry & 1:
            raise GuestMemoryError(va, 1, f"page walk (level {level} not present) for")
        user = user and bool(entry & 4)
        writable = writable and bool(entry & 2)
        addr = entry & 0x000F_FFFF_FFFF_F000
        if level in (3, 2) and entry & 0x80:
            size = 1 << shift
            return (addr & ~(size - 1)) + (va & (size - 1)), user, writable
        table = addr
    return table + (va & 0xFFF), user, writable


def canonical(value: int, bits: int) -> bool:
    """``value`` (64-bit) is canonical for a ``bits``-wide linear address."""
    top = value >> (bits - 1)
    return top == 0 or top == (1 << (65 - bits)) - 1


def _bit_names(bits: int, names: dict[int, str]) -> str:
    return ", ".join(names.get(b, f"bit {b}") for b in range(64) if bits >> b & 1)


# The firmware's timer tick: an interrupt ends a hlt with interrupts enabled at the latest then.
TIMER_TICK_S = 0.01


class InterruptSource(Protocol):
    """What can interrupt a halted payload: the firmware's timer (its timer events)."""

    def next_deadline(self) -> float | None: ...   # time.monotonic() of the next timer event

    def interrupts_masked(self) -> bool: ...       # the firmware has interrupts off (TPL_HIGH_LEVEL)


class _Refused(Exception):
    """Raised inside an emulation: the payload's instruction ends the run (the reason)."""


class Emulator:
    def __init__(self, ports: PortBus, interrupts: InterruptSource | None = None) -> None:
        self.ports = ports
        self.interrupts = interrupts
        self.virtual_if = True
        self.cr8 = 0
        self.counts: dict[str, int] = {}
        self._repeat = False
        self._tlb: dict[tuple[int, bool], int] | None = None

    # --- helpers ----------------------------------------------------------------------------
    def _fetch(self, machine, rip: int, cr3: int) -> bytes:
        """Up to 15 instruction bytes at ``rip``, fewer where the mapping or memory ends."""
        out = bytearray()
        va = rip & _U64
        while len(out) < 15:
            try:
                pa = translate(machine.mem, cr3, va)
                n = min(15 - len(out), 0x1000 - (va & 0xFFF))
                out += machine.mem.read(pa, n)
                va = (va + n) & _U64
            except GuestMemoryError:
                break
        return bytes(out)

    def _fault(self, machine, frame, why: str, code: bytes = b"", sregs=None, rip: int | None = None,
               ) -> PayloadFault:
        rip = frame.rip if rip is None else rip
        name = VECTOR_NAMES.get(frame.vector, f"vector {frame.vector}")
        err = f"({frame.error_code:#x})" if frame.vector in (8, 10, 11, 12, 13, 14, 17, 21) else ""
        where = f"rip {rip:#x}{machine.describe_rip(rip)}"
        text = ""
        if code:
            ins = X.Decoder(64, code, ip=rip & _U64).decode()
            if ins.code != X.Code.INVALID:
                text = f" `{_FORMATTER.format(ins)}` ({code[:ins.len].hex(' ')})"
            else:
                text = f" (bytes {code[:8].hex(' ')})"
        extra = ""
        if frame.vector == 14 and sregs is not None:
            extra = f", address {sregs.cr2:#x}"
        return PayloadFault(f"payload fault {name}{err} at {where}{text}{extra}: {why}",
                            vector=frame.vector, rip=rip, error_code=frame.error_code)

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    @staticmethod
    def _cpuid(machine, leaf: int, sub: int = 0):
        get = getattr(machine.vcpu, "cpuid_leaf", None)
        return get(leaf, sub) if get is not None else None

    def _has(self, machine, leaf: int, sub: int, reg: str, bit: int) -> bool:
        e = self._cpuid(machine, leaf, sub)
        return e is not None and bool(getattr(e, reg) >> bit & 1)

    def _phys_bits(self, machine) -> int:
        e = self._cpuid(machine, 0x80000008)
        bits = e.eax & 0xFF if e is not None else 0
        return bits if 32 <= bits <= 52 else 52

    def _linear_bits(self, machine) -> int:
        return 57 if self._has(machine, 7, 0, "ecx", 16) else 48

    # --- entry ------------------------------------------------------------------------------
    def handle(self, machine, frame, regs: abi.kvm_regs) -> None:
        sregs = machine.vcpu.get_sregs()
        code = self._fetch(machine, frame.rip, sregs.cr3)
        if frame.vector == 3:
            raise self._breakpoint(machine, frame, sregs)
        if frame.vector == 1:
            raise self._debug_trap(machine, frame, code)
        if frame.vector != 13:
            why = {14: "page fault", 6: "invalid opcode", 0: "divide error", 7: "device not available",
                   17: "alignment check", 19: "SIMD floating-point exception",
                   16: "x87 floating-point exception", 12: "stack-segment fault",
                   4: "overflow", 5: "bound range exceeded", 21: "control-protection exception"
                   }.get(frame.vector, "exception")
            raise self._fault(machine, frame, why, code, sregs)
        if not code:
            raise self._fault(machine, frame, "cannot read the instruction (its page is not mapped "
                                              "or not backed by guest memory)")
        ins = X.Decoder(64, code, ip=frame.rip & _U64).decode()
        if ins.code == X.Code.INVALID:
            raise self._fault(machine, frame, "undecodable instruction", code)
        self._repeat = False
        try:
            handled = self._emulate(machine, frame, regs, sregs, ins)
        except _Refused as e:
            raise self._fault(machine, frame, str(e), code) from None
        except GuestMemoryError as e:
            raise self._fault(machine, frame, f"while emulating it: {e}", code) from None
        if not handled:
            raise self._fault(machine, frame, "not an instruction vmrun emulates at CPL 3 "
                                              "(a privileged instruction, an unknown port or MSR, "
                                              "or a non-canonical/protected access)", code)
        if not self._repeat:
            frame.rip = (frame.rip + ins.len) & _U64
        machine.vcpu.set_regs(regs)

    def _breakpoint(self, machine, frame, sregs) -> PayloadFault:
        """#BP is a trap: the frame's RIP follows the ``int3``; name the ``int3`` itself."""
        before = self._fetch(machine, (frame.rip - 2) & _U64, sregs.cr3)[:2]
        if before[1:2] == b"\xcc":
            at = (frame.rip - 1) & _U64
        elif before == b"\xcd\x03":
            at = (frame.rip - 2) & _U64
        else:
            at = None
        if at is None:
            return self._fault(machine, frame, f"breakpoint trap (#BP) before rip {frame.rip:#x}; "
                                               "no int3 found just before it")
        return self._fault(machine, frame, "breakpoint (int3)", self._fetch(machine, at, sregs.cr3), rip=at)

    def _debug_trap(self, machine, frame, code: bytes) -> PayloadFault:
        if frame.rflags & RFLAGS_TF:
            why = (f"single-step trap (RFLAGS.TF) after the instruction that ends at rip {frame.rip:#x}; "
                   "vmrun does not debug payloads")
        else:
            why = f"debug trap (#DB: int1 or a debug condition) after the instruction that ends at rip {frame.rip:#x}"
        return self._fault(machine, frame, why, code)

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
            self._write_cr(machine, sregs, cr, value)
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
            self._set_sregs(machine, sregs, "invlpg")  # reloading CR3 flushes the TLB
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
            return self._string_io(machine, frame, ins, regs, sregs)
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

    # --- KVM on the payload's behalf -----------------------------------------------------------
    @staticmethod
    def _set_sregs(machine, sregs, what: str) -> None:
        try:
            machine.vcpu.set_sregs(sregs)
        except KvmError as e:
            raise _Refused(f"{what}: KVM refused the resulting CPU state ({e})") from None

    # --- control registers -------------------------------------------------------------------
    def _write_cr(self, machine, sregs, cr: int, value: int) -> None:
        what = f"mov to CR{cr} of {value:#x}"
        if cr == 0:
            sregs.cr0 = self._check_cr0(value, sregs, what)
        elif cr == 4:
            sregs.cr4 = self._check_cr4(machine, value, sregs, what)
        elif cr == 3:
            sregs.cr3 = self._check_cr3(machine, value, sregs, what)
        elif cr == 2:
            sregs.cr2 = value
        elif cr == 8:
            if value >> 4:
                raise _Refused(f"{what}: bits 63:4 of CR8 are reserved (#GP)")
            self.cr8 = value
            return
        self._set_sregs(machine, sregs, what)

    @staticmethod
    def _check_cr0(value: int, sregs, what: str) -> int:
        if value >> 32:
            raise _Refused(f"{what}: bits 63:32 of CR0 are reserved (#GP)")
        if value & CR0_NW and not value & CR0_CD:
            raise _Refused(f"{what}: NW set with CD clear (#GP)")
        if value & (L.CR0_PE | L.CR0_PG) != L.CR0_PE | L.CR0_PG:
            raise _Refused(f"{what}: clearing PE or PG in 64-bit mode would leave protected/paged "
                           "mode (#GP)")
        return (value & CR0_DEFINED) | L.CR0_ET  # reserved bits 31:0 are ignored, ET is fixed

    def _check_cr4(self, machine, value: int, sregs, what: str) -> int:
        old = sregs.cr4
        allowed = CR4_HONOURED
        for bit, (leaf, sub, reg, b) in CR4_CPUID.items():
            if self._has(machine, leaf, sub, reg, b):
                allowed |= bit
        allowed |= old & _B["LA57"]  # whatever LA57 is now, keeping it is allowed
        refused = value & sum(CR4_REFUSED) & ~old
        reserved = value & ~allowed & ~sum(CR4_REFUSED)
        if reserved:
            raise _Refused(f"{what}: sets {_bit_names(reserved, CR4_NAMES)}, reserved on the CPU vmrun "
                           "presents (#GP)")
        if refused:
            reasons = "; ".join(f"{CR4_NAMES[b.bit_length() - 1]}: {r}" for b, r in CR4_REFUSED.items()
                                if refused & b)
            raise _Refused(f"{what}: sets {_bit_names(refused, CR4_NAMES)}, which vmrun cannot honour "
                           f"({reasons})")
        if not value & L.CR4_PAE:
            raise _Refused(f"{what}: clearing PAE in long mode (#GP)")
        if (value ^ old) & _B["LA57"]:
            raise _Refused(f"{what}: changing LA57 in long mode (#GP)")
        if CR4_KEEP_SET & ~value:
            raise _Refused(f"{what}: clears {_bit_names(CR4_KEEP_SET & ~value, CR4_NAMES)}, which vmrun "
                           "cannot honour (UEFI requires SSE enabled; the payload's code keeps the host's "
                           "setting under this host's KVM; the handoff restores it set)")
        return value

    def _check_cr3(self, machine, value: int, sregs, what: str) -> int:
        width = self._phys_bits(machine)
        if value >> width:
            raise _Refused(f"{what}: bits 63:{width} are reserved (physical-address width {width}) (#GP)")
        frame_mask = ((1 << width) - 1) & ~0xFFF
        if value & frame_mask != sregs.cr3 & frame_mask:
            raise _Refused(f"{what}: the payload switched to its own page tables before ExitBootServices, "
                           f"which vmrun does not support: CR3 is {sregs.cr3:#x} (vmrun's page tables, "
                           "which keep the firmware area out of the payload's reach); only reloading "
                           "that value (a TLB flush) is emulated")
        return value

    # --- MSRs ----------------------------------------------------------------------------------
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
            try:
                got = machine.vcpu.get_msrs([index])
            except KvmError as e:
                raise _Refused(f"rdmsr of {index:#x} ({MSR_READ_ALLOW[index]}): KVM cannot read it ({e})") from None
            if index not in got:
                raise _Refused(f"rdmsr of {index:#x} ({MSR_READ_ALLOW[index]}): KVM does not provide "
                               "this MSR on this host (#GP)")
            value = got[index]
        regs.rax = value & 0xFFFFFFFF
        regs.rdx = value >> 32
        self._count(f"rdmsr_{index:#x}")
        return True

    def _check_msr(self, machine, index: int, value: int, sregs, what: str) -> None:
        """Raise :class:`_Refused` where the CPU's wrmsr would raise #GP (module docstring)."""
        width = self._phys_bits(machine)
        if index in (MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE):
            bits = self._linear_bits(machine)
            if not canonical(value, bits):
                raise _Refused(f"{what}: not a canonical {bits}-bit address (#GP)")
        elif index == MSR_PAT:
            bad = [i for i in range(8) if (value >> (8 * i)) & 0xFF not in PAT_TYPES]
            if bad:
                raise _Refused(f"{what}: PA{', PA'.join(map(str, bad))} hold no valid memory type "
                               "(valid: 0, 1, 4, 5, 6, 7) (#GP)")
        elif index == MSR_MTRR_DEF_TYPE:
            if value & ~0xCFF:
                raise _Refused(f"{what}: sets reserved bits {value & ~0xCFF:#x} (#GP)")
            if value & 0xFF not in MTRR_TYPES:
                raise _Refused(f"{what}: default type {value & 0xFF} is not an MTRR memory type (#GP)")
        elif 0x200 <= index < 0x210:
            high = ~((1 << width) - 1) & _U64
            if index % 2 == 0:
                if value & 0xFF not in MTRR_TYPES:
                    raise _Refused(f"{what}: type {value & 0xFF} is not an MTRR memory type (#GP)")
                if value & (0xF00 | high):
                    raise _Refused(f"{what}: sets reserved bits {value & (0xF00 | high):#x} (#GP)")
            elif value & (0x7FF | high):
                raise _Refused(f"{what}: sets reserved bits {value & (0x7FF | high):#x} (#GP)")

    def _wrmsr(self, machine, regs, sregs) -> bool:
        index = regs.rcx & 0xFFFFFFFF
        if index not in MSR_WRITE_ALLOW:
            return False
        value = ((regs.rdx & 0xFFFFFFFF) << 32) | (regs.rax & 0xFFFFFFFF)
        what = f"wrmsr of {value:#x} to MSR {index:#x} ({MSR_WRITE_ALLOW[index]})"
        if index == MSR_EFER:
            if (value ^ sregs.efer) & L.EFER_LME:
                raise _Refused(f"{what}: changing LME while paging is enabled (#GP)")
            other = value & ~(EFER_CHANGEABLE | L.EFER_LME | L.EFER_LMA)
            if other:
                raise _Refused(f"{what}: sets {_bit_names(other, EFER_NAMES)}, which the CPU vmrun presents "
                               "does not offer (#GP)")
            sregs.efer = (sregs.efer & ~EFER_CHANGEABLE) | (value & EFER_CHANGEABLE)  # LMA is read-only
            self._set_sregs(machine, sregs, what)
        elif index == 0x8B:
            pass
        else:
            self._check_msr(machine, index, value, sregs, what)
            try:
                machine.vcpu.set_msrs({index: value})
            except KvmError as e:
                raise _Refused(f"{what}: KVM refused it ({e})") from None
        self._count(f"wrmsr_{index:#x}")
        return True

    # --- port I/O --------------------------------------------------------------------------------
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

    def _user_pa(self, machine, sregs, va: int, write: bool, bits: int) -> int:
        """The physical address of a CPL-3 access to ``va`` (one byte), checked like the CPU.

        Translations are cached for one batch of a string instruction (as the CPU's TLB would),
        so a batch walks the page tables once per page, not once per element."""
        key = (va >> 12, write)
        tlb = self._tlb
        if tlb is not None and key in tlb:
            return tlb[key] | (va & 0xFFF)
        if not canonical(va, bits):
            raise _Refused(f"address {va:#x} is not canonical (#GP)")
        try:
            pa, user, writable = walk(machine.mem, sregs.cr3, va)
        except GuestMemoryError:
            raise _Refused(f"address {va:#x} is not mapped (#PF)") from None
        if not user:
            raise _Refused(f"address {va:#x} is not user-accessible (#PF)")
        if write and not writable:
            raise _Refused(f"address {va:#x} is not writable at CPL 3 (#PF)")
        if not machine.mem.contains(pa, 1):
            raise _Refused(f"address {va:#x} (physical {pa:#x}) is not backed by guest memory")
        if tlb is not None and machine.mem.contains(pa & ~0xFFF, 0x1000):
            tlb[key] = pa & ~0xFFF
        return pa

    def _user_rw(self, machine, sregs, va: int, size: int, data: bytes | None, bits: int) -> bytes:
        """Read ``size`` bytes at ``va`` (``data`` None) or write ``data`` there, byte by byte
        across a page boundary."""
        write = data is not None
        if (va & 0xFFF) + size <= 0x1000:
            pa = self._user_pa(machine, sregs, va, write, bits)
            if not machine.mem.contains(pa, size):
                raise _Refused(f"address {va:#x} (physical {pa:#x}) is not backed by guest memory")
            if write:
                machine.mem.write(pa, data)
                return data
            return machine.mem.read(pa, size)
        pas = [self._user_pa(machine, sregs, (va + i) & _U64, write, bits) for i in range(size)]
        if write:
            for p, b in zip(pas, data):
                machine.mem.write(p, bytes([b]))
            return data
        return bytes(machine.mem.read(p, 1)[0] for p in pas)

    def _string_io(self, machine, frame, ins, regs, sregs) -> bool:
        size = {X.Mnemonic.INSB: 1, X.Mnemonic.OUTSB: 1, X.Mnemonic.INSW: 2, X.Mnemonic.OUTSW: 2}.get(
            ins.mnemonic, 4)
        port = regs.rdx & 0xFFFF
        dev = self.ports.find(port)
        if dev is None:
            return False
        is_in = ins.mnemonic in (X.Mnemonic.INSB, X.Mnemonic.INSW, X.Mnemonic.INSD)
        mem_kind = ins.op_kind(0 if is_in else 1)
        amask = 0xFFFFFFFF if mem_kind in (X.OpKind.MEMORY_ESEDI, X.OpKind.MEMORY_SEG_ESI) else _U64
        base = 0
        if not is_in:  # outs: DS by default, a segment override may name FS or GS (their bases count)
            seg = ins.memory_segment
            if seg == X.Register.FS:
                base = sregs.fs.base
            elif seg == X.Register.GS:
                base = sregs.gs.base
        ptr = "rdi" if is_in else "rsi"
        step = -size if frame.rflags & RFLAGS_DF else size
        rep = ins.has_rep_prefix or ins.has_repne_prefix
        count = (regs.rcx & amask) if rep else 1
        bits = self._linear_bits(machine)
        n = min(count, STRING_IO_PER_EXIT)
        self._tlb = {}  # page → physical page, for this batch only
        try:
            for _ in range(n):
                off = getattr(regs, ptr) & amask
                va = (base + off) & _U64
                if is_in:
                    value = dev.read(port, size) & ((1 << (8 * size)) - 1)
                    self._user_rw(machine, sregs, va, size, value.to_bytes(size, "little"), bits)
                else:
                    data = self._user_rw(machine, sregs, va, size, None, bits)
                    dev.write(port, size, int.from_bytes(data, "little"))
                new = (off + step) & amask
                setattr(regs, ptr, new)  # with a 32-bit address size ESI/EDI and ECX zero-extend
                if rep:
                    regs.rcx = ((regs.rcx & amask) - 1) & amask
        finally:
            self._tlb = None
        if rep and count > n:
            self._repeat = True  # the CPU re-executes the instruction for the rest
            machine.check_deadline()
        self._count(f"{'ins' if is_in else 'outs'}_{port:#x}")
        return True
