"""The one door from the UEFI services (``hostsvc``) into the VM.

:class:`GuestPort` is everything the firmware in ``hostsvc`` needs of a :class:`Machine`, and
nothing more: guest memory, the firmware area (its size, installing it, the service thunk
addresses and blob symbols the tables point at), the service-call and RIP-naming hooks, calls
into the guest (image entry points, event notify functions) and the run's time limit.
Each member forwards to the machine unchanged; the runner builds the port and hands it to
``hostsvc.firmware.Firmware``, which never sees the vCPU, the KVM file descriptors or the run
loop.
"""

from __future__ import annotations

from typing import Callable

from vmrun.vm.kvm import abi
from vmrun.vm.machine import Machine
from vmrun.vm.memory import GuestMemory
from vmrun.vm.paging import NONE as NO_ACCESS, SUPERVISOR, USER_RO, USER_RW  # noqa: F401 (for hostsvc)

#: ``handler(service_id, regs) -> rax`` for a call through a service thunk.
ServiceCall = Callable[[int, abi.kvm_regs], int]


class GuestPort:
    """The VM as the UEFI services see it (forwards to one :class:`Machine`)."""

    def __init__(self, machine: Machine) -> None:
        self._machine = machine

    # --- memory -----------------------------------------------------------------------------
    @property
    def mem(self) -> GuestMemory:
        """Guest-physical memory (typed, bounds-checked accessors)."""
        return self._machine.mem

    # --- the firmware area: monitor, tables and service thunks --------------------------------
    def firmware_area_size(self) -> int:
        """Bytes :meth:`install_firmware` needs for this VM's memory (its page tables grow with it)."""
        return Machine.firmware_area_size(self._machine.max_address)

    def install_firmware(self, base: int, size: int) -> None:
        """Write GDT, IDT, TSS, the monitor blob and the identity page tables at ``base``
        (memory the caller allocated) and point the vCPU at them."""
        self._machine.install_firmware(base, size)

    def firmware_span(self) -> tuple[int, int] | None:
        """(base, size) of the installed firmware area, or None before :meth:`install_firmware`."""
        fw = self._machine.fw
        return (fw.base, fw.size) if fw else None

    # --- what the payload may touch (vmrun.vm.paging) -------------------------------------------
    def protect(self, start: int, end: int, kind: int, what: str) -> None:
        """Give [start, end) the CPL-3 access ``kind`` (``vmrun.vm.paging.NONE``, ``USER_RO`` …)
        for the whole run; only before the guest first runs."""
        self._machine.protect(start, end, kind, what)

    def restrict_to_allocations(self, allocations) -> None:
        """From now on the payload sees only RAM that allocations touch; ``allocations`` are the
        (start, end) ranges made so far, later ones are announced with :meth:`map_allocation`."""
        self._machine.restrict_to_allocations(allocations)

    def map_allocation(self, start: int, end: int) -> None:
        """A new allocation [start, end): make it present (may raise MemoryCapExceeded)."""
        self._machine.map_allocation(start, end)

    def thunk(self, service_id: int) -> int:
        """Guest address of the thunk that calls service ``service_id`` (a function pointer for
        the EFI tables and protocol interfaces)."""
        return self._machine.fw.thunk(service_id)

    def sym(self, name: str) -> int:
        """Guest address of a symbol of the firmware blob (``guest/firmware.sym.json``)."""
        return self._machine.fw.sym(name)

    # --- hooks the run loop calls ---------------------------------------------------------------
    def on_service_call(self, handler: ServiceCall) -> None:
        """Route every call through a service thunk to ``handler``; its result becomes RAX."""
        self._machine.service_handler = lambda machine, service_id, regs: handler(service_id, regs)

    def on_locate_rip(self, locate: Callable[[int], str]) -> None:
        """``locate(rip)`` names where ``rip`` lies (`` (image+0xoff)``) in fault and timeout messages."""
        self._machine.locate_rip = locate

    def describe_rip(self, rip: int) -> str:
        return self._machine.describe_rip(rip)

    # --- calling into the guest -----------------------------------------------------------------
    def call_guest(self, func: int, args: tuple[int, ...] = (), stack_top: int | None = None) -> int:
        """Call ``func`` at CPL 3 with MS x64 arguments and return its RAX; nests inside a
        service call (see :meth:`Machine.call_guest`)."""
        return self._machine.call_guest(func, args, stack_top=stack_top)

    @property
    def call_depth(self) -> int:
        """How many :meth:`call_guest` calls are running (0: nothing runs in the guest yet)."""
        return self._machine.call_depth

    def stack_pointer(self) -> int:
        """The guest's RSP now (inside a service call: it points at the thunk's return address)."""
        return self._machine.vcpu.get_regs().rsp

    # --- the run's time limit -------------------------------------------------------------------
    @property
    def deadline(self) -> float:
        """``time.monotonic()`` at which the run's time limit expires (inf before the run starts)."""
        return self._machine.deadline

    @property
    def timeout(self) -> float:
        """The run's time limit in seconds."""
        return self._machine.limits.timeout

    def check_deadline(self) -> None:
        """Raise :class:`vmrun.errors.RunTimeout` when the time limit has expired."""
        self._machine.check_deadline()
