"""The ctypes mirror of <linux/kvm.h> against the C compiler's view of the same header.

The reference is independent of vmrun: a C program compiled against the system's
linux/kvm.h prints sizeof/offsetof and the ioctl numbers, and every value must match.
"""

import ctypes
import shutil
import subprocess

import pytest

from vmrun.vm.kvm import abi

STRUCTS = {
    "kvm_userspace_memory_region": ["slot", "flags", "guest_phys_addr", "memory_size", "userspace_addr"],
    "kvm_regs": ["rax", "rcx", "rsp", "r8", "r15", "rip", "rflags"],
    "kvm_segment": ["base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g", "avl",
                    "unusable"],
    "kvm_dtable": ["base", "limit"],
    "kvm_sregs": ["cs", "ds", "tr", "ldt", "gdt", "idt", "cr0", "cr2", "cr3", "cr4", "cr8", "efer",
                  "apic_base", "interrupt_bitmap"],
    "kvm_fpu": ["fpr", "fcw", "fsw", "ftwx", "last_opcode", "last_ip", "last_dp", "xmm", "mxcsr"],
    "kvm_msr_entry": ["index", "data"],
    "kvm_msrs": ["nmsrs"],
    "kvm_cpuid_entry2": ["function", "index", "flags", "eax", "ebx", "ecx", "edx"],
    "kvm_cpuid2": ["nent"],
    "kvm_dirty_log": ["slot"],
    "kvm_xsave": ["region"],
    "kvm_xcr": ["xcr", "value"],
    "kvm_xcrs": ["nr_xcrs", "flags", "xcrs", "padding"],
    "kvm_run": ["request_interrupt_window", "immediate_exit", "exit_reason", "if_flag", "flags", "cr8",
                "apic_base", "kvm_valid_regs", "kvm_dirty_regs"],
}
IOCTLS = ["KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_GET_VCPU_MMAP_SIZE",
          "KVM_GET_SUPPORTED_CPUID", "KVM_CREATE_VCPU", "KVM_GET_DIRTY_LOG", "KVM_SET_USER_MEMORY_REGION",
          "KVM_RUN", "KVM_GET_REGS", "KVM_SET_REGS", "KVM_GET_SREGS", "KVM_SET_SREGS",
          "KVM_GET_MSRS", "KVM_SET_MSRS", "KVM_GET_FPU", "KVM_SET_FPU", "KVM_SET_CPUID2",
          "KVM_CHECK_EXTENSION", "KVM_GET_XSAVE", "KVM_GET_XCRS", "KVM_GET_XSAVE2"]
CONSTANTS = ["KVM_EXIT_IO", "KVM_EXIT_HLT", "KVM_EXIT_MMIO", "KVM_EXIT_SHUTDOWN", "KVM_EXIT_FAIL_ENTRY",
             "KVM_EXIT_INTR", "KVM_EXIT_INTERNAL_ERROR", "KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT",
             "KVM_MEM_LOG_DIRTY_PAGES", "KVM_API_VERSION",
             "KVM_CAP_XSAVE", "KVM_CAP_XCRS", "KVM_CAP_XSAVE2", "KVM_MAX_XCRS"]
RUN_UNION = {"io.port": "exit.io.port", "io.data_offset": "exit.io.data_offset",
             "mmio.phys_addr": "exit.mmio.phys_addr", "mmio.len": "exit.mmio.len",
             "mmio.is_write": "exit.mmio.is_write", "internal.suberror": "exit.internal.suberror",
             "internal.data": "exit.internal.data"}


@pytest.fixture(scope="module")
def header_values(tmp_path_factory):
    if not shutil.which("cc") and not shutil.which("gcc"):
        pytest.fail("a C compiler is needed for the ABI reference (scripts/setup installs gcc)")
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include <linux/kvm.h>', 'int main(void){']
    for s, fields in STRUCTS.items():
        lines.append(f'printf("size {s} %zu\\n", sizeof(struct {s}));')
        for f in fields:
            lines.append(f'printf("off {s}.{f} %zu\\n", offsetof(struct {s}, {f}));')
    for k, v in RUN_UNION.items():
        lines.append(f'printf("run {k} %zu\\n", offsetof(struct kvm_run, {k}));')
    for name in IOCTLS + CONSTANTS:
        lines.append(f'printf("const {name} %lu\\n", (unsigned long)({name}));')
    lines.append("return 0;}")
    d = tmp_path_factory.mktemp("abi")
    (d / "abi.c").write_text("\n".join(lines))
    cc = shutil.which("cc") or shutil.which("gcc")
    subprocess.run([cc, "-o", str(d / "abi"), str(d / "abi.c")], check=True)
    out = subprocess.run([str(d / "abi")], check=True, capture_output=True, text=True).stdout
    values = {}
    for line in out.splitlines():
        kind, key, value = line.split()
        values[(kind, key)] = int(value)
    return values


@pytest.mark.parametrize("name", list(STRUCTS))
def test_struct_size_and_offsets(header_values, name):
    ctype = getattr(abi, name)
    assert ctypes.sizeof(ctype) == header_values[("size", name)]
    for f in STRUCTS[name]:
        assert getattr(ctype, f).offset == header_values[("off", f"{name}.{f}")], f


def test_kvm_run_exit_union_offsets(header_values):
    for k, path in RUN_UNION.items():
        parts = path.split(".")
        off = abi.kvm_run.exit.offset
        ctype = abi._kvm_run_exit
        for p in parts[1:]:
            field = getattr(ctype, p)
            off += field.offset
            ctype = dict(ctype._fields_)[p]
        assert off == header_values[("run", k)], k


@pytest.mark.parametrize("name", IOCTLS)
def test_ioctl_numbers(header_values, name):
    assert getattr(abi, name) == header_values[("const", name)]


@pytest.mark.parametrize("name", [c for c in CONSTANTS if c != "KVM_API_VERSION"])
def test_constants(header_values, name):
    assert getattr(abi, name) == header_values[("const", name)]


def test_api_version(header_values):
    assert abi.KVM_API_VERSION_EXPECTED == header_values[("const", "KVM_API_VERSION")]


def test_documented_sizes():
    # values quoted by rust-vmm kvm-bindings, as a second reference
    assert ctypes.sizeof(abi.kvm_regs) == 144
    assert ctypes.sizeof(abi.kvm_sregs) == 312
