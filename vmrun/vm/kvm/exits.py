"""Typed vCPU exits: what ``Vcpu.run()`` returns instead of a raw exit-reason number."""

from __future__ import annotations

from dataclasses import dataclass

from vmrun.vm.kvm import abi


@dataclass(frozen=True)
class Exit:
    """Base class of every exit."""


@dataclass(frozen=True)
class IoOut(Exit):
    port: int
    size: int
    data: bytes

    @property
    def value(self) -> int:
        return int.from_bytes(self.data[: self.size], "little")


@dataclass(frozen=True)
class IoIn(Exit):
    port: int
    size: int


@dataclass(frozen=True)
class Mmio(Exit):
    addr: int
    size: int
    is_write: bool
    data: bytes


@dataclass(frozen=True)
class Hlt(Exit):
    pass


@dataclass(frozen=True)
class Shutdown(Exit):
    """Triple fault."""


@dataclass(frozen=True)
class InternalError(Exit):
    suberror: int
    data: tuple[int, ...]

    SUBERRORS = {1: "emulation failure", 2: "simultaneous exceptions", 3: "delivery event",
                 4: "unexpected exit reason"}

    def describe(self) -> str:
        return self.SUBERRORS.get(self.suberror, f"suberror {self.suberror}")


@dataclass(frozen=True)
class FailEntry(Exit):
    reason: int


@dataclass(frozen=True)
class Interrupted(Exit):
    """KVM_RUN returned EINTR (our watchdog signal)."""


@dataclass(frozen=True)
class Other(Exit):
    reason: int


def decode_exit(vcpu, interrupted: bool = False) -> Exit:
    if interrupted:
        return Interrupted()
    run = vcpu.run_struct
    reason = run.exit_reason
    if reason == abi.KVM_EXIT_IO:
        io = run.exit.io
        if io.direction == abi.KVM_EXIT_IO_OUT:
            return IoOut(io.port, io.size, bytes(vcpu.io_data()))
        return IoIn(io.port, io.size)
    if reason == abi.KVM_EXIT_MMIO:
        m = run.exit.mmio
        return Mmio(m.phys_addr, m.len, bool(m.is_write), bytes(m.data)[: m.len])
    if reason == abi.KVM_EXIT_HLT:
        return Hlt()
    if reason == abi.KVM_EXIT_SHUTDOWN:
        return Shutdown()
    if reason == abi.KVM_EXIT_INTERNAL_ERROR:
        i = run.exit.internal
        return InternalError(i.suberror, tuple(i.data[: min(i.ndata, 16)]))
    if reason == abi.KVM_EXIT_FAIL_ENTRY:
        return FailEntry(run.exit.fail_entry.hardware_entry_failure_reason)
    if reason == abi.KVM_EXIT_INTR:
        return Interrupted()
    return Other(reason)
