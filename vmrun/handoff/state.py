"""The purgatory page: guest/purgatory.bin, then the state block it restores, then its stack.

Layout of the 8 KiB purgatory area (offsets from its base; guest/purgatory.S has the same):

    0x0000  code (guest/purgatory.bin, entered at ``purgatory_entry``)
    0x0400  state block (STATE_*)
    0x2000  top of the purgatory's own stack (it grows down into the first page)

State block (all little-endian):

    0x000 magic b"VMRUNST1"   0x008 version u32, size u32
    0x010 GDTR: limit u16, base u64      0x020 IDTR: limit u16, base u64
    0x030 CR0   0x038 CR3   0x040 CR4   0x048 EFER   0x050 RFLAGS   0x058 RSP
    0x060 FS base   0x068 GS base
    0x070 RAX RBX RCX RDX RSI RDI RBP R8 R9 R10 R11 R12 R13 R14 R15 (u64 each)
    0x0e8 PAT (u64)
    0x100 FXSAVE image, 512 bytes (Intel SDM Vol. 1 Table 10-2, 64-bit layout)
    0x300 GDT: null, ring-0 code64 (selector 0x08), ring-0 data (selector 0x10),
          ring-0 code32 (selector 0x18, for the switch from 5-level to 4-level paging)

RSP is the payload's stack pointer at its ExitBootServices thunk: [RSP] is the return address,
so the purgatory's final ``ret`` is exactly the return from ExitBootServices; RAX = EFI_SUCCESS.

The purgatory and the frozen CR3 must lie below 4 GiB: a 5-level entry passes through 32-bit
compatibility mode to switch to the frozen 4-level paging (guest/purgatory.S explains why).

Extended (XSAVE) state is not carried, on purpose, and a payload that leaves some in use is
reported (:func:`extended_state_in_use`, :func:`extended_state_warning`). Measured on this
project's machines (nested PVM, AMD EPYC host with AVX2 and no AVX-512;
``tests/kvm/test_cpu_state.py``): the CPUID vmrun presents hides XSAVE, OSXSAVE, AVX, AVX2 and
AVX-512, and KVM keeps the guest's XCR0 at 1 (x87 only), yet the payload's CPL-3 code runs
with the host's CR4.OSXSAVE and XCR0 (``xgetbv`` returns 0x207): ``vpxor``/``vmovdqu`` on YMM
registers execute, ``xsave`` executes, the YMM upper halves survive every exit to the host,
and ``KVM_GET_XSAVE`` shows them (XSTATE_BV bit 2, the YMM_Hi128 component at offset 576).
AVX-512 raises #UD because the host lacks it; ``xsetbv`` raises #GP (a payload fault). vmrun
cannot hide AVX from CPL-3 code on such a host, and it does not carry the state either:

* the frozen CR4 has OSXSAVE clear (the CPUID the payload saw has no XSAVE, and vmrun
  refuses ``mov`` to CR4 setting it), so after the handoff, on the target, every VEX/EVEX
  instruction raises #UD whatever state was saved: restoring YMM/ZMM contents would give the
  payload nothing it could use. Saving it would need CR4.OSXSAVE and an XCR0 the payload was
  never offered, and XRSTOR in the purgatory — a CPU interface the payload did not see;
* a payload that checks CPUID (as the Linux EFI stub and systemd-stub do, both built without
  SIMD code) never executes them.

So at ExitBootServices the runner reads the vCPU's XSAVE area (``Vcpu.get_xsave``): when a
component other than x87/SSE (and PKRU, which governs nothing with the frozen CR4.PKE clear and
whose value under PVM is the host's) is in use — its XSTATE_BV bit set and, for the AVX and
AVX-512 components, non-zero contents — the run records it and logs
:func:`extended_state_warning`: the handoff carries only x87/SSE state. It is a warning, not a
fault: upper-half contents a payload left behind after using AVX (it should have run
``vzeroupper``) matter only to code that would #UD on the target anyway.
"""

from __future__ import annotations

import json
import pathlib
import struct

from vmrun.vm import layout as L
from vmrun.vm.kvm import abi

GUEST_DIR = pathlib.Path(__file__).resolve().parents[2] / "guest"

PURGATORY_SIZE = 0x2000
STATE = 0x400
STATE_MAGIC = b"VMRUNST1"
STATE_VERSION = 2
STATE_SIZE = 0x340

ST_GDTR, ST_IDTR = 0x010, 0x020
ST_CR0, ST_CR3, ST_CR4, ST_EFER, ST_RFLAGS, ST_RSP = 0x030, 0x038, 0x040, 0x048, 0x050, 0x058
ST_FS_BASE, ST_GS_BASE = 0x060, 0x068
ST_GPRS = 0x070
ST_PAT = 0x0e8
GPR_ORDER = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
ST_FXSAVE = 0x100
ST_GDT = 0x300

GDT_CODE64 = 0x00AF9A000000FFFF   # present, DPL 0, execute/read, L=1, G
GDT_DATA = 0x00CF92000000FFFF     # present, DPL 0, read/write, D/B, G
GDT_CODE32 = 0x00CF9A000000FFFF   # present, DPL 0, execute/read, D=1 (32-bit), G
GDT = (0, GDT_CODE64, GDT_DATA, GDT_CODE32)
RFLAGS_KEEP = 0xCD5               # CF PF AF ZF SF DF OF: the payload's arithmetic flags only


def load_purgatory() -> tuple[bytes, dict[str, int]]:
    code = (GUEST_DIR / "purgatory.bin").read_bytes()
    symbols = json.loads((GUEST_DIR / "purgatory.sym.json").read_text())
    if len(code) > STATE:
        raise ValueError(f"purgatory.bin is {len(code)} bytes; the state block starts at {STATE:#x}")
    return code, symbols


def fxsave_image(fpu: abi.kvm_fpu) -> bytes:
    """The 512-byte FXSAVE/FXRSTOR image of a ``struct kvm_fpu``."""
    img = bytearray(512)
    struct.pack_into("<HHBxHQQII", img, 0, fpu.fcw, fpu.fsw, fpu.ftwx, fpu.last_opcode,
                     fpu.last_ip, fpu.last_dp, fpu.mxcsr, 0xFFFF)
    for i in range(8):
        img[32 + 16 * i:32 + 16 * i + 16] = bytes(fpu.fpr[i])
    for i in range(16):
        img[160 + 16 * i:160 + 16 * i + 16] = bytes(fpu.xmm[i])
    return bytes(img)


# XSAVE components (SDM Vol. 1 §13.1) and, for those whose contents are checked, their offset
# and size in the standard (non-compacted) format KVM_GET_XSAVE returns (CPUID.(0xD, i) on
# every CPU that has them).
XSTATE_NAMES = {2: "AVX (YMM upper halves)", 3: "MPX BNDREGS", 4: "MPX BNDCSR", 5: "AVX-512 opmask",
                6: "AVX-512 ZMM_Hi256", 7: "AVX-512 Hi16_ZMM", 8: "PT", 9: "PKRU", 10: "PASID",
                11: "CET user", 12: "CET supervisor", 13: "HDC", 14: "UINTR", 15: "LBR", 16: "HWP",
                17: "AMX TILECFG", 18: "AMX TILEDATA"}
XSTATE_CONTENTS = {2: (576, 256), 5: (1088, 64), 6: (1152, 512), 7: (1664, 1024)}
XSTATE_IGNORED = (1 << 0) | (1 << 1) | (1 << 9)   # x87, SSE (carried by FXSAVE), PKRU
XSAVE_HEADER = 512                                 # XSTATE_BV at +0, XCOMP_BV at +8


def extended_state_in_use(xsave: bytes) -> list[str]:
    """Names of the XSAVE components beyond x87/SSE/PKRU that an XSAVE image (standard format,
    as ``KVM_GET_XSAVE``/``KVM_GET_XSAVE2`` return it) holds in a non-initial state."""
    if len(xsave) < XSAVE_HEADER + 64:
        raise ValueError(f"an XSAVE image is at least {XSAVE_HEADER + 64} bytes, got {len(xsave)}")
    xstate_bv = int.from_bytes(xsave[XSAVE_HEADER:XSAVE_HEADER + 8], "little")
    used = []
    for bit in range(64):
        if not xstate_bv >> bit & 1 or XSTATE_IGNORED >> bit & 1:
            continue
        if bit in XSTATE_CONTENTS:
            off, size = XSTATE_CONTENTS[bit]
            if off + size <= len(xsave) and not any(xsave[off:off + size]):
                continue  # marked in use but all zero: the same as its initial state
        used.append(XSTATE_NAMES.get(bit, f"XSAVE component {bit}"))
    return used


def extended_state_warning(used: list[str]) -> str:
    """The message for a payload that left extended state in use at ExitBootServices."""
    return (f"the payload left {', '.join(used)} state in use at ExitBootServices; the handoff "
            "carries only x87/SSE state (the CPU it was shown has no XSAVE/AVX, and its frozen "
            "CR4.OSXSAVE is clear, so such instructions raise #UD after the handoff)")


def build_state(base: int, regs: dict[str, int], sregs: dict[str, int], fpu: abi.kvm_fpu,
                fs_base: int = 0, gs_base: int = 0, rax: int = 0, pat: int = L.PAT_DEFAULT) -> bytes:
    """The state block for a purgatory at ``base``."""
    if base + PURGATORY_SIZE > L.FOUR_GIB:
        raise ValueError(f"purgatory at {base:#x} is not below 4 GiB")
    if sregs["cr3"] >= L.FOUR_GIB:
        raise ValueError(f"the frozen CR3 {sregs['cr3']:#x} is not below 4 GiB; a 5-level kexec entry "
                         "could not load it from 32-bit mode")
    st = bytearray(STATE_SIZE)
    st[0:8] = STATE_MAGIC
    struct.pack_into("<II", st, 8, STATE_VERSION, STATE_SIZE)
    gdt_base = base + STATE + ST_GDT
    struct.pack_into("<HQ", st, ST_GDTR, 8 * len(GDT) - 1, gdt_base)
    struct.pack_into("<HQ", st, ST_IDTR, 0, 0)  # no IDT: a fault before the kernel is fatal anyway
    cr0 = sregs["cr0"] | L.CR0_PE | L.CR0_PG
    cr4 = sregs["cr4"] | L.CR4_PAE | L.CR4_OSFXSR | L.CR4_OSXMMEXCPT
    rflags = (regs["rflags"] & RFLAGS_KEEP) | L.RFLAGS_FIXED  # IF, TF, IOPL, RF clear
    struct.pack_into("<QQQQQQQQ", st, ST_CR0, cr0, sregs["cr3"], cr4, sregs["efer"], rflags,
                     regs["rsp"], fs_base, gs_base)
    for i, name in enumerate(GPR_ORDER):
        value = rax if name == "rax" else regs[name]
        struct.pack_into("<Q", st, ST_GPRS + 8 * i, value)
    struct.pack_into("<Q", st, ST_PAT, pat)
    st[ST_FXSAVE:ST_FXSAVE + 512] = fxsave_image(fpu)
    struct.pack_into(f"<{len(GDT)}Q", st, ST_GDT, *GDT)
    return bytes(st)


def build_purgatory_area(base: int, regs, sregs, fpu, **kw) -> tuple[bytes, int]:
    """(the 8 KiB area for ``base``, the entry address)."""
    if base % L.PAGE_SIZE:
        raise ValueError(f"purgatory base {base:#x} is not page-aligned")
    code, symbols = load_purgatory()
    area = bytearray(PURGATORY_SIZE)
    area[0:len(code)] = code
    area[STATE:STATE + STATE_SIZE] = build_state(base, regs, sregs, fpu, **kw)
    return bytes(area), base + symbols["purgatory_entry"]
