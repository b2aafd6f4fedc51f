"""The one dispatch path for every UEFI service and protocol function.

A service is a Python callable declared with :func:`efiapi`: its name as the spec has it and its
parameters with their MS-x64 types. The :class:`ServiceTable` gives each registered callable a
thunk (``vmrun.vm.port.GuestPort.thunk``); a call through that thunk arrives here, where the
arguments are read from RCX, RDX, R8, R9 and the stack, checked (a NULL where the spec requires
a pointer → EFI_INVALID_PARAMETER), handed to the handler as Python values, traced, and the
handler's result or :class:`hostsvc.status.EfiError` becomes RAX.

Unimplemented table slots get :meth:`ServiceTable.unsupported`, which returns EFI_UNSUPPORTED and
says so in the trace: never a silent success.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import structlog

from hostsvc import status as S
from hostsvc.status import EfiError
from hostsvc.uefi_types import EFI_GUID
from vmrun.errors import GuestMemoryError

log = structlog.get_logger("hostsvc.dispatch")

_ARG_REGS = ("rcx", "rdx", "r8", "r9")
MASK64 = (1 << 64) - 1
#: ``--trace`` keeps the first this many calls and counts the rest (``trace_dropped``), so that
#: neither the run nor the summary built after it grows without bound
MAX_TRACE_ENTRIES = 100_000


# Argument kinds -------------------------------------------------------------------------------
U8, U16, U32, U64 = "u8", "u16", "u32", "u64"
UINTN = "uintn"
BOOL = "bool"
PTR = "ptr"           # a pointer the spec requires: NULL → EFI_INVALID_PARAMETER
OPTPTR = "optptr"     # a pointer that may be NULL
GUIDPTR = "guid"      # EFI_GUID* (required), decoded to uuid.UUID
OPTGUIDPTR = "optguid"
HANDLE = "handle"     # EFI_HANDLE (validity checked by the handler)
EVENT = "event"
TPL = "tpl"

_WIDTH = {U8: 0xFF, U16: 0xFFFF, U32: 0xFFFFFFFF, BOOL: 0xFF, TPL: MASK64}


@dataclass(frozen=True)
class Param:
    name: str
    kind: str


@dataclass
class Call:
    """One call in progress: raw access for variadic services and out-parameters."""
    table: "ServiceTable"
    regs: Any
    mem: Any

    def raw_arg(self, index: int) -> int:
        if index < 4:
            return getattr(self.regs, _ARG_REGS[index])
        return self.mem.read_u64(self.regs.rsp + 0x28 + 8 * (index - 4))


def size_in_out(mem, size_ptr: int, need: int, what: str) -> None:
    """The UEFI IN OUT size convention: ``*size_ptr`` becomes the size needed, and the call fails
    with EFI_BUFFER_TOO_SMALL when the caller's buffer (the value it passed in) was smaller."""
    have = mem.read_u64(size_ptr)
    mem.write_u64(size_ptr, need)
    if have < need:
        raise EfiError(S.BUFFER_TOO_SMALL, f"{what} needs {need} bytes, got {have}")


def efiapi(name: str, *params: tuple[str, str], variadic: bool = False):
    """Declare a service: ``@efiapi("AllocatePages", ("type", U32), …)``."""

    def wrap(func: Callable) -> Callable:
        func.__efiapi__ = (name, tuple(Param(n, k) for n, k in params), variadic)
        return func

    return wrap


@dataclass
class Service:
    id: int
    name: str
    group: str
    params: tuple[Param, ...]
    handler: Callable
    variadic: bool = False
    implemented: bool = True


@dataclass
class TraceEntry:
    seq: int
    service: str
    group: str
    args: dict[str, str]
    status: str
    depth: int
    implemented: bool
    note: str = ""
    t: float = 0.0  # seconds since the table was created


@dataclass
class ServiceTable:
    mem: Any
    trace_enabled: bool = False
    services: list[Service] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    trace: list[TraceEntry] = field(default_factory=list)
    unimplemented_calls: Counter = field(default_factory=Counter)
    depth: int = 0
    seq: int = 0
    host_seconds: float = 0.0
    before_call: Callable[[], None] | None = None
    t0: float = field(default_factory=time.perf_counter)
    #: the run's deadline check (raises RunTimeout), made before every call: a payload whose
    #: loop goes through services (and so spends most of its time in the host, where the
    #: run loop's timer tick may not interrupt it) still stops at the time limit
    check_deadline: Callable[[], None] | None = None
    trace_dropped: int = 0

    def _record(self, entry_args: tuple) -> None:
        if len(self.trace) < MAX_TRACE_ENTRIES:
            self.trace.append(TraceEntry(*entry_args))
        else:
            self.trace_dropped += 1

    def register(self, group: str, func: Callable) -> int:
        name, params, variadic = func.__efiapi__
        sid = len(self.services)
        self.services.append(Service(sid, name, group, params, func, variadic))
        return sid

    def register_unsupported(self, group: str, name: str) -> int:
        sid = len(self.services)

        def unsupported(**_):
            raise EfiError(S.UNSUPPORTED, "not implemented by vmrun")

        self.services.append(Service(sid, name, group, (), unsupported, implemented=False))
        return sid

    def register_all(self, group: str, obj: Any, names: list[str]) -> list[int]:
        """Register the methods of ``obj`` declared with @efiapi for ``names`` (spec order);
        names with no method get an EFI_UNSUPPORTED stub."""
        by_name = {}
        for attr in dir(type(obj)):
            f = getattr(type(obj), attr, None)
            meta = getattr(f, "__efiapi__", None)
            if meta:
                by_name[meta[0]] = getattr(obj, attr)
        ids = []
        for n in names:
            if n in by_name:
                ids.append(self.register(group, by_name[n]))
            else:
                ids.append(self.register_unsupported(group, n))
        return ids

    # --- the call path --------------------------------------------------------------------
    def dispatch(self, service_id: int, regs: Any) -> int:
        if not 0 <= service_id < len(self.services):
            return S.UNSUPPORTED
        svc = self.services[service_id]
        self.counts[svc.name] += 1
        self.seq += 1
        seq = self.seq
        t0 = time.perf_counter()
        call = Call(self, regs, self.mem)
        shown: dict[str, str] = {}
        note = ""
        try:
            if self.check_deadline:
                self.check_deadline()
            if self.before_call:
                self.before_call()
            kwargs = {}
            for i, p in enumerate(svc.params):
                raw = call.raw_arg(i)
                value = self._decode(p, raw)
                kwargs[p.name] = value
                shown[p.name] = _show(p, value)
            if svc.variadic:
                kwargs["call"] = call
            self.depth += 1
            try:
                result = svc.handler(**kwargs)
            finally:
                self.depth -= 1
            status = S.SUCCESS if result is None else result
        except EfiError as e:
            status = e.status
            note = e.why
        except GuestMemoryError as e:
            status = S.INVALID_PARAMETER
            note = f"bad pointer: {e}"
        except BaseException as e:
            # the call does not return to the guest here (ExitBootServices, Exit, ResetSystem,
            # a fault in a nested call): trace it with what it means, then let it unwind
            if self.trace_enabled:
                self._record((seq, svc.name, svc.group, shown, getattr(e, "trace_status", type(e).__name__),
                              self.depth, svc.implemented, str(e)[:200], round(t0 - self.t0, 6)))
            raise
        if not svc.implemented:
            self.unimplemented_calls[svc.name] += 1
        self.host_seconds += time.perf_counter() - t0
        if self.trace_enabled:
            self._record((seq, svc.name, svc.group, shown, S.name(status), self.depth, svc.implemented,
                          note[:200], round(t0 - self.t0, 6)))
        if not svc.implemented:
            log.info("efi.unimplemented", service=svc.name, group=svc.group)
        return status

    def _decode(self, p: Param, raw: int):
        k = p.kind
        if k in _WIDTH:
            v = raw & _WIDTH[k]
            return bool(v) if k == BOOL else v
        if k in (U64, UINTN, HANDLE, EVENT, OPTPTR):
            return raw
        if k == PTR:
            if raw == 0:
                raise EfiError(S.INVALID_PARAMETER, f"{p.name} is NULL")
            return raw
        if k in (GUIDPTR, OPTGUIDPTR):
            if raw == 0:
                if k == OPTGUIDPTR:
                    return None
                raise EfiError(S.INVALID_PARAMETER, f"{p.name} is NULL")
            return self.mem.read_struct(raw, EFI_GUID).uuid
        raise ValueError(f"unknown parameter kind {k}")


def _show(p: Param, value) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, uuid.UUID):
        from hostsvc.guids import guid_name
        return guid_name(value)
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return hex(value) if value > 9 or p.kind in (PTR, OPTPTR, HANDLE, EVENT) else str(value)
    return repr(value)
