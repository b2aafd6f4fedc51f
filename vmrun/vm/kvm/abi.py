"""ctypes mirror of the parts of the Linux KVM ABI (<linux/kvm.h>, x86_64) that vmrun uses.

Every structure's size and field offsets are asserted in ``tests/unit/test_kvm_abi.py`` against
the values in the kernel header, and every ioctl number is computed from the structure it
carries, the way ``_IOW(KVMIO, 0x46, struct kvm_userspace_memory_region)`` does in C.
"""

from __future__ import annotations

import ctypes
from ctypes import c_uint8 as u8, c_uint16 as u16, c_uint32 as u32, c_uint64 as u64

KVMIO = 0xAE

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _iow(nr: int, struct: type) -> int:
    return _ioc(_IOC_WRITE, nr, ctypes.sizeof(struct))


def _ior(nr: int, struct: type) -> int:
    return _ioc(_IOC_READ, nr, ctypes.sizeof(struct))


def _iowr(nr: int, struct: type) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, ctypes.sizeof(struct))


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


KVM_MEM_LOG_DIRTY_PAGES = 1 << 0


class kvm_regs(ctypes.Structure):
    _fields_ = [(name, u64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
        "rip", "rflags")]


class kvm_segment(ctypes.Structure):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(ctypes.Structure):
    _fields_ = [
        ("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment), ("fs", kvm_segment),
        ("gs", kvm_segment), ("ss", kvm_segment), ("tr", kvm_segment), ("ldt", kvm_segment),
        ("gdt", kvm_dtable), ("idt", kvm_dtable),
        ("cr0", u64), ("cr2", u64), ("cr3", u64), ("cr4", u64), ("cr8", u64),
        ("efer", u64), ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_fpu(ctypes.Structure):
    _fields_ = [
        ("fpr", (u8 * 16) * 8),
        ("fcw", u16),
        ("fsw", u16),
        ("ftwx", u8),
        ("pad1", u8),
        ("last_opcode", u16),
        ("last_ip", u64),
        ("last_dp", u64),
        ("xmm", (u8 * 16) * 16),
        ("mxcsr", u32),
        ("pad2", u32),
    ]


class kvm_xsave(ctypes.Structure):
    """The legacy 4 KiB XSAVE area (KVM_GET_XSAVE); KVM_GET_XSAVE2 writes as many bytes as
    KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) says, into a larger buffer of the same layout."""
    _fields_ = [("region", u32 * 1024)]


KVM_MAX_XCRS = 16


class kvm_xcr(ctypes.Structure):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class kvm_xcrs(ctypes.Structure):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", kvm_xcr * KVM_MAX_XCRS), ("padding", u64 * 16)]


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(ctypes.Structure):
    """Header only; the entries follow it (see :func:`msrs_buffer`)."""
    _fields_ = [("nmsrs", u32), ("pad", u32)]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [
        ("function", u32), ("index", u32), ("flags", u32),
        ("eax", u32), ("ebx", u32), ("ecx", u32), ("edx", u32),
        ("padding", u32 * 3),
    ]


class kvm_cpuid2(ctypes.Structure):
    """Header only; the entries follow it (see :func:`cpuid_buffer`)."""
    _fields_ = [("nent", u32), ("padding", u32)]


class kvm_dirty_log(ctypes.Structure):
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


# --- struct kvm_run and the exit payloads we read -------------------------------------------

class _kvm_run_io(ctypes.Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32), ("data_offset", u64)]


class _kvm_run_mmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class _kvm_run_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class _kvm_run_internal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class _kvm_run_exit(ctypes.Union):
    _fields_ = [
        ("io", _kvm_run_io),
        ("mmio", _kvm_run_mmio),
        ("fail_entry", _kvm_run_fail_entry),
        ("internal", _kvm_run_internal),
        ("padding", ctypes.c_char * 256),
    ]


class kvm_run(ctypes.Structure):
    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("exit", _kvm_run_exit),
        ("kvm_valid_regs", u64),
        ("kvm_dirty_regs", u64),
        ("s", u8 * 2048),  # union { struct kvm_sync_regs regs; char padding[SYNC_REGS_SIZE_BYTES]; }
    ]


KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT = 0, 1

# exit reasons
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17

KVM_API_VERSION_EXPECTED = 12

# --- ioctls -----------------------------------------------------------------------------------
# system
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, kvm_cpuid2)
# vm
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, kvm_userspace_memory_region)
# vcpu
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, kvm_regs)
KVM_SET_REGS = _iow(0x82, kvm_regs)
KVM_GET_SREGS = _ior(0x83, kvm_sregs)
KVM_SET_SREGS = _iow(0x84, kvm_sregs)
KVM_GET_MSRS = _iowr(0x88, kvm_msrs)
KVM_SET_MSRS = _iow(0x89, kvm_msrs)
KVM_GET_FPU = _ior(0x8C, kvm_fpu)
KVM_SET_FPU = _iow(0x8D, kvm_fpu)
KVM_SET_CPUID2 = _iow(0x90, kvm_cpuid2)
KVM_GET_XSAVE = _ior(0xA4, kvm_xsave)
KVM_GET_XCRS = _ior(0xA6, kvm_xcrs)
KVM_GET_XSAVE2 = _ior(0xCF, kvm_xsave)

# KVM_CHECK_EXTENSION capabilities
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_XSAVE2 = 208

IOCTL_NAMES = {v: k for k, v in dict(globals()).items()
               if k.startswith("KVM_") and isinstance(v, int) and k.split("_")[1] in
               ("GET", "SET", "CREATE", "RUN", "CHECK")}


def cpuid_buffer(nent: int) -> tuple[ctypes.Array, kvm_cpuid2, ctypes.Array]:
    """A contiguous ``struct kvm_cpuid2`` with room for ``nent`` entries."""
    size = ctypes.sizeof(kvm_cpuid2) + nent * ctypes.sizeof(kvm_cpuid_entry2)
    buf = (ctypes.c_uint8 * size)()
    hdr = kvm_cpuid2.from_buffer(buf)
    hdr.nent = nent
    entries = (kvm_cpuid_entry2 * nent).from_buffer(buf, ctypes.sizeof(kvm_cpuid2))
    return buf, hdr, entries


def msrs_buffer(nent: int) -> tuple[ctypes.Array, kvm_msrs, ctypes.Array]:
    """A contiguous ``struct kvm_msrs`` with room for ``nent`` entries."""
    size = ctypes.sizeof(kvm_msrs) + nent * ctypes.sizeof(kvm_msr_entry)
    buf = (ctypes.c_uint8 * size)()
    hdr = kvm_msrs.from_buffer(buf)
    hdr.nmsrs = nent
    entries = (kvm_msr_entry * nent).from_buffer(buf, ctypes.sizeof(kvm_msrs))
    return buf, hdr, entries


__all__ = [n for n in dir() if n.startswith(("kvm_", "KVM_"))] + [
    "cpuid_buffer", "msrs_buffer", "IOCTL_NAMES"]
