"""Every fixed number of the guest's layout, in one table.

vmrun presents the *target* machine's memory map to the payload, so nothing of ours lives at
a hard-coded physical address: the firmware area is allocated out of the presented RAM at
start-up (highest free range below 4 GiB, like real firmware) and everything in it sits at a
fixed offset from its base, listed here.
"""

from __future__ import annotations

PAGE_SIZE = 0x1000       # the x86 and UEFI page (EFI_PAGE_SIZE)
PAGE_2M = 0x20_0000
GIB = 1 << 30
FOUR_GIB = 4 * GIB

# --- hypercalls (must match guest/firmware.S; checked by tests) --------------------------------
# CPL-3 thunks write to an unbacked guest-physical page (an MMIO exit): PVM runs CPL-3 code with
# IOPL 0, so `out` from there faults. The page lies in the x86 flash/reset-vector window below
# 4 GiB, which no PC memory map describes as RAM; vmrun refuses a map that does.
HCALL_PAGE = 0xFFE00000
HCALL_SVC = HCALL_PAGE + 0x0  # service thunk: the 32-bit value written = service id
HCALL_RET = HCALL_PAGE + 0x8  # a host-initiated guest call returned: RAX = its result
PORT_EXC = 0xE2  # the ring-0 monitor forwards an exception: [RSP] = vector, [RSP+8] = error code

SVC_THUNK_SIZE = 16
NR_SVC_THUNKS = 512

# --- GDT selectors -----------------------------------------------------------------------------
SEL_KERNEL_CS = 0x08
SEL_KERNEL_DS = 0x10
SEL_USER_DS = 0x18 | 3
SEL_USER_CS = 0x20 | 3
SEL_TSS = 0x28
GDT_ENTRIES = 7  # null, kcode, kdata, udata, ucode, tss (2 slots)

# --- the firmware area: offsets from its base ---------------------------------------------------
# One contiguous EfiBootServicesData/Code allocation, made before the payload is loaded.
FW_GDT = 0x0000          # GDT (one page)
FW_IDT = 0x1000          # 256 16-byte gates
FW_TSS = 0x2000          # 104-byte 64-bit TSS
FW_BLOB = 0x3000         # guest/firmware.bin (monitor stubs, trampolines, service thunks)
FW_BLOB_MAX = 0x4000
FW_MONITOR_STACK = 0x7000  # ring-0 stack for exception frames, grows down from FW_MONITOR_STACK_TOP
FW_MONITOR_STACK_TOP = 0x9000
FW_PAGE_TABLES = 0x9000  # PML4, PDPT(s), PDs, spare PTs: see vmrun.vm.paging.IdentityMap
FW_FIXED_SIZE = FW_PAGE_TABLES  # page tables follow; their size depends on the map
FW_SPARE_PTS = 16        # 4 KiB page tables for the frames with protected pages (vmrun.vm.paging)

# --- payload stack ------------------------------------------------------------------------------
# UEFI 2.10 §2.3.4.2: at least 128 KiB of stack is available to the image at entry.
PAYLOAD_STACK_SIZE = 0x40000

# --- limits ---------------------------------------------------------------------------------------
FIRMWARE_BELOW = FOUR_GIB          # where the firmware area and tables are placed
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MEMORY_CAP = 2 * GIB      # bytes of guest memory the payload may allocate
# Guest RAM becomes host memory only in the 2 MiB frames allocations touch (vmrun.vm.paging);
# their total may exceed the allocations by this much (partly used frames, the firmware's own
# allocations) before the run ends with the memory_cap outcome.
FRAME_SLACK = 64 * 1024 * 1024
# The host notices an expired time limit at the next exit of the vCPU; host work on the payload's
# behalf that runs this long past the limit is interrupted by the watchdog's signal instead.
WATCHDOG_GRACE_S = 0.3
MAX_IDENTITY_MAP = 1 << 39        # 512 GiB: one PDPT

# --- CPU state -------------------------------------------------------------------------------------
CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11
RFLAGS_FIXED = 1 << 1
RFLAGS_IOPL3 = 3 << 12

INITIAL_CR0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
INITIAL_CR4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
INITIAL_EFER = EFER_LME | EFER_LMA | EFER_NXE
# The payload sees IF=1 as under firmware (it is virtual: no interrupts are ever delivered).
# IOPL=3 is asked for, but this host's nested KVM (PVM) runs CPL-3 code with IOPL 0, so the
# payload's port I/O raises #GP and is emulated (tests/kvm/test_machine.py, UART and CMOS tests);
# the service thunks exit through HCALL_PAGE instead.
PAYLOAD_RFLAGS = RFLAGS_FIXED | RFLAGS_IOPL3

MSR_MTRR_DEF_TYPE = 0x2FF
MTRR_DEF_TYPE_WB_ENABLED = 0x806  # MTRRs enabled, default write-back; a new KVM vCPU reads 0 (off)
MSR_PAT = 0x277
PAT_DEFAULT = 0x0007040600070406
