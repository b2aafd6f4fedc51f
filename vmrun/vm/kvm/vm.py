"""Thin wrappers around the three kinds of KVM file descriptor: system, VM and vCPU.

``Vcpu.run()`` returns a typed exit (:mod:`vmrun.vm.kvm.exits`) instead of a raw number. Every
failing ioctl raises :class:`vmrun.errors.KvmError` naming the ioctl and the errno.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

from vmrun.errors import KvmError
from vmrun.vm.kvm import abi
from vmrun.vm.kvm.exits import Exit, decode_exit

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


def _ioctl(fd: int, request: int, arg=None, *, retry_eintr: bool = True) -> int:
    if arg is None:
        ptr = None
    elif isinstance(arg, int):
        ptr = ctypes.c_void_p(arg)
    else:
        ptr = ctypes.cast(ctypes.byref(arg), ctypes.c_void_p)
    while True:
        ret = _libc.ioctl(fd, request, ptr)
        if ret >= 0:
            return ret
        err = ctypes.get_errno()
        if err == errno.EINTR and retry_eintr:
            continue
        name = abi.IOCTL_NAMES.get(request, hex(request))
        raise OSError(err, f"{name}: {os.strerror(err)}")


def ioctl(fd: int, request: int, arg=None, *, retry_eintr: bool = True) -> int:
    """ioctl(2) that raises KvmError with the ioctl's name and the errno."""
    try:
        return _ioctl(fd, request, arg, retry_eintr=retry_eintr)
    except OSError as e:
        raise KvmError(f"KVM ioctl failed: {e.strerror} (errno {errno.errorcode.get(e.errno, e.errno)})",
                       errno=e.errno) from None


class Kvm:
    """The system fd: /dev/kvm."""

    def __init__(self, path: str = "/dev/kvm"):
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmError(f"cannot open {path}: {e.strerror}; vmrun needs KVM "
                           "(is the kvm module loaded and are you allowed to use it?)") from None
        version = ioctl(self.fd, abi.KVM_GET_API_VERSION)
        if version != abi.KVM_API_VERSION_EXPECTED:
            raise KvmError(f"{path} speaks KVM API {version}, expected {abi.KVM_API_VERSION_EXPECTED}")
        self.vcpu_mmap_size = ioctl(self.fd, abi.KVM_GET_VCPU_MMAP_SIZE)

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 when ``cap`` is absent, else its (capability-specific) value."""
        return ioctl(self.fd, abi.KVM_CHECK_EXTENSION, cap)

    def supported_cpuid(self) -> list[abi.kvm_cpuid_entry2]:
        nent = 128
        while True:
            buf, hdr, entries = abi.cpuid_buffer(nent)
            try:
                _ioctl(self.fd, abi.KVM_GET_SUPPORTED_CPUID, buf)
            except OSError as e:
                if e.errno == errno.E2BIG and nent < 4096:
                    nent *= 2
                    continue
                raise KvmError(f"KVM_GET_SUPPORTED_CPUID: {e.strerror}") from None
            return [abi.kvm_cpuid_entry2.from_buffer_copy(entries[i]) for i in range(hdr.nent)]

    def create_vm(self) -> "Vm":
        return Vm(self, ioctl(self.fd, abi.KVM_CREATE_VM, 0))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Vm:
    """A VM fd: memory slots and vCPUs."""

    def __init__(self, kvm: Kvm, fd: int):
        self.kvm = kvm
        self.fd = fd
        self.slots: dict[int, abi.kvm_userspace_memory_region] = {}
        self.vcpus: list[Vcpu] = []

    def set_memory_region(self, slot: int, gpa: int, size: int, host_addr: int, flags: int = 0) -> None:
        region = abi.kvm_userspace_memory_region(slot=slot, flags=flags, guest_phys_addr=gpa,
                                                 memory_size=size, userspace_addr=host_addr)
        ioctl(self.fd, abi.KVM_SET_USER_MEMORY_REGION, region)
        self.slots[slot] = region

    def dirty_log(self, slot: int) -> bytes:
        """KVM_GET_DIRTY_LOG for one slot (needs KVM_MEM_LOG_DIRTY_PAGES): a bitmap, 1 bit a page."""
        region = self.slots[slot]
        npages = region.memory_size // mmap.PAGESIZE
        bitmap = (ctypes.c_uint64 * ((npages + 63) // 64))()
        log = abi.kvm_dirty_log(slot=slot, dirty_bitmap=ctypes.addressof(bitmap))
        ioctl(self.fd, abi.KVM_GET_DIRTY_LOG, log)
        return bytes(bitmap)

    def create_vcpu(self, index: int = 0) -> "Vcpu":
        vcpu = Vcpu(self, ioctl(self.fd, abi.KVM_CREATE_VCPU, index))
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Vcpu:
    """A vCPU fd with its mmap'ed ``struct kvm_run``."""

    def __init__(self, vm: Vm, fd: int):
        self.vm = vm
        self.fd = fd
        self._map = mmap.mmap(fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_struct = abi.kvm_run.from_buffer(self._map)
        self.cpuid: list[abi.kvm_cpuid_entry2] = []  # what set_cpuid gave the guest

    def cpuid_leaf(self, function: int, index: int = 0) -> abi.kvm_cpuid_entry2 | None:
        """The guest's CPUID leaf as set by :meth:`set_cpuid` (None when absent or not set)."""
        for e in self.cpuid:
            if e.function == function and (e.index == index or not e.flags & 1):  # KVM_CPUID_FLAG_SIGNIFCANT_INDEX
                return e
        return None

    # registers -------------------------------------------------------------------------------
    def get_regs(self) -> abi.kvm_regs:
        regs = abi.kvm_regs()
        ioctl(self.fd, abi.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: abi.kvm_regs) -> None:
        ioctl(self.fd, abi.KVM_SET_REGS, regs)

    def get_sregs(self) -> abi.kvm_sregs:
        sregs = abi.kvm_sregs()
        ioctl(self.fd, abi.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: abi.kvm_sregs) -> None:
        ioctl(self.fd, abi.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> abi.kvm_fpu:
        fpu = abi.kvm_fpu()
        ioctl(self.fd, abi.KVM_GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu: abi.kvm_fpu) -> None:
        ioctl(self.fd, abi.KVM_SET_FPU, fpu)

    def set_cpuid(self, entries: list[abi.kvm_cpuid_entry2]) -> None:
        buf, hdr, arr = abi.cpuid_buffer(len(entries))
        for i, e in enumerate(entries):
            arr[i] = e
        ioctl(self.fd, abi.KVM_SET_CPUID2, buf)
        self.cpuid = [abi.kvm_cpuid_entry2.from_buffer_copy(e) for e in entries]

    def get_xsave(self) -> bytes:
        """The vCPU's XSAVE area (standard format: legacy region, XSAVE header at 512, extended
        components at their CPUID.0xD offsets): KVM_GET_XSAVE2 when KVM has it (areas larger
        than 4 KiB, e.g. AMX), else KVM_GET_XSAVE."""
        size = self.vm.kvm.check_extension(abi.KVM_CAP_XSAVE2)
        if size > 0:
            buf = (ctypes.c_uint8 * max(size, ctypes.sizeof(abi.kvm_xsave)))()
            ioctl(self.fd, abi.KVM_GET_XSAVE2, ctypes.addressof(buf))
            return bytes(buf)
        xs = abi.kvm_xsave()
        ioctl(self.fd, abi.KVM_GET_XSAVE, xs)
        return bytes(xs)

    def get_xcrs(self) -> dict[int, int]:
        """The guest's extended control registers (XCR0 = index 0): KVM_GET_XCRS."""
        xcrs = abi.kvm_xcrs()
        ioctl(self.fd, abi.KVM_GET_XCRS, xcrs)
        return {xcrs.xcrs[i].xcr: xcrs.xcrs[i].value for i in range(min(xcrs.nr_xcrs, abi.KVM_MAX_XCRS))}

    def set_msrs(self, values: dict[int, int]) -> None:
        buf, hdr, arr = abi.msrs_buffer(len(values))
        for i, (index, data) in enumerate(values.items()):
            arr[i].index = index
            arr[i].data = data
        n = ioctl(self.fd, abi.KVM_SET_MSRS, buf)
        if n != len(values):
            bad = list(values)[n]
            raise KvmError(f"KVM_SET_MSRS refused MSR {bad:#x}")

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        buf, hdr, arr = abi.msrs_buffer(len(indices))
        for i, index in enumerate(indices):
            arr[i].index = index
        n = ioctl(self.fd, abi.KVM_GET_MSRS, buf)
        return {arr[i].index: arr[i].data for i in range(n)}

    # running ---------------------------------------------------------------------------------
    def run(self) -> Exit:
        """KVM_RUN once. A signal interrupting it yields an ``Interrupted`` exit."""
        try:
            _ioctl(self.fd, abi.KVM_RUN, None, retry_eintr=False)
        except OSError as e:
            if e.errno == errno.EINTR:
                return decode_exit(self, interrupted=True)
            raise KvmError(f"KVM_RUN failed: {e.strerror}", errno=e.errno) from None
        return decode_exit(self)

    def io_data(self) -> memoryview:
        """The data bytes of the current KVM_EXIT_IO (in/out buffer inside the kvm_run mapping)."""
        io = self.run_struct.exit.io
        n = io.size * io.count
        return memoryview(self._map)[io.data_offset:io.data_offset + n]

    def close(self) -> None:
        if self.fd >= 0:
            del self.run_struct
            self._map.close()
            os.close(self.fd)
            self.fd = -1
