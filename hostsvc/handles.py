"""Handle / protocol database (UEFI 2.10 §7.3 "Protocol Handler Services").

Pure Python model of the firmware's handle database, written to follow the
spec text of §7.3 and, where the spec leaves room, the reference behaviour of
EDK2 ``MdeModulePkg/Core/Dxe/Hand/{Handle,Notify,Locate}.c``:

* handles are opaque integers obtained from ``new_handle()`` (the caller backs
  them with guest memory); a handle exists while it carries at least one
  protocol interface and is freed (``free_handle(h)`` if given) when its last
  interface is uninstalled (§7.3 UninstallProtocolInterface);
* interfaces are guest pointers (ints, 0 allowed — "NULL" tag protocols);
* per protocol GUID the database keeps the list of installed interfaces in
  install order; ReinstallProtocolInterface moves the interface to the tail
  (EDK2), which is the order used by LocateHandle(ByProtocol),
  LocateProtocol and the RegisterProtocolNotify cursors;
* RegisterProtocolNotify registrations are cursors into that list.  As in EDK2
  (``ProtNotify->Position = &ProtEntry->Protocols`` "start at the beginning")
  a fresh registration will also hand out interfaces installed *before* it
  was made, one per LocateHandle(ByRegisterNotify)/LocateProtocol(Registration)
  call.
  Installing or reinstalling the protocol signals every registered event via
  ``signal_event(event)``; events are signalled after the database is updated.

Simplifications (no UEFI driver model here): DisconnectController cannot be
run, so an interface opened BY_DRIVER / BY_CHILD_CONTROLLER / EXCLUSIVE cannot
be uninstalled or reinstalled (ACCESS_DENIED), and an EXCLUSIVE open on an
interface someone holds BY_DRIVER is refused with ACCESS_DENIED.  Failing calls
leave the database unchanged (EDK2 would already have dropped GET/TEST/
BY_HANDLE open entries in the failing uninstall case).

Failures are reported by raising ``EfiError(status)``; OpenProtocol's
ALREADY_STARTED raises :class:`AlreadyStartedError`, which also carries the
interface pointer the spec says to return in that case.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterable
from uuid import UUID

from . import devicepath as dp
from .guids import DEVICE_PATH, guid_name
from .status import (ACCESS_DENIED, ALREADY_STARTED, INVALID_PARAMETER, NOT_FOUND,
                     OUT_OF_RESOURCES, UNSUPPORTED, EfiError)

__all__ = [
    "HandleDB", "OpenInfo", "AlreadyStartedError",
    "ALL_HANDLES", "BY_REGISTER_NOTIFY", "BY_PROTOCOL",
    "BY_HANDLE_PROTOCOL", "GET_PROTOCOL", "TEST_PROTOCOL", "BY_CHILD_CONTROLLER",
    "BY_DRIVER", "EXCLUSIVE",
]

# EFI_LOCATE_SEARCH_TYPE (§7.3 LocateHandle)
ALL_HANDLES, BY_REGISTER_NOTIFY, BY_PROTOCOL = 0, 1, 2

# OpenProtocol attributes (§7.3 OpenProtocol)
BY_HANDLE_PROTOCOL = 0x01
GET_PROTOCOL = 0x02
TEST_PROTOCOL = 0x04
BY_CHILD_CONTROLLER = 0x08
BY_DRIVER = 0x10
EXCLUSIVE = 0x20

_VALID_ATTRIBUTES = {BY_HANDLE_PROTOCOL, GET_PROTOCOL, TEST_PROTOCOL, BY_CHILD_CONTROLLER,
                     BY_DRIVER, BY_DRIVER | EXCLUSIVE, EXCLUSIVE}
# Open entries that Uninstall/Reinstall may drop by themselves (EDK2
# CoreDisconnectControllersUsingProtocolInterface); anything else blocks them.
_SOFT = BY_HANDLE_PROTOCOL | GET_PROTOCOL | TEST_PROTOCOL

# Bounds on what a payload can pile up (each install, open or registration is one service call,
# but every later LocateHandle, OpenProtocol or install walks them): beyond them the call fails
# with EFI_OUT_OF_RESOURCES, the spec's status for "no memory for it".
#: protocol interfaces installed at once, on all handles (a new handle needs one)
MAX_INTERFACES = 65536
#: open entries (distinct agent/controller/attributes) on one protocol interface
MAX_OPENS = 1024
#: RegisterProtocolNotify registrations alive at once
MAX_REGISTRATIONS = 4096


class AlreadyStartedError(EfiError):
    """OpenProtocol → EFI_ALREADY_STARTED; ``interface`` is still returned (§7.3 OpenProtocol)."""

    def __init__(self, interface: int, why: str = ""):
        super().__init__(ALREADY_STARTED, why)
        self.interface = interface


@dataclass(frozen=True)
class OpenInfo:
    """EFI_OPEN_PROTOCOL_INFORMATION_ENTRY (§7.3 OpenProtocolInformation)."""

    agent: int
    controller: int
    attributes: int
    open_count: int


@dataclass
class _Open:
    agent: int
    controller: int
    attributes: int
    open_count: int = 1


@dataclass
class _Iface:
    handle: int
    guid: UUID
    interface: int
    seq: int                      # position in the per-protocol list (install/reinstall order)
    opens: list[_Open] = field(default_factory=list)


@dataclass
class _Registration:
    key: int
    guid: UUID
    event: int
    cursor: int                   # last seq handed out


class HandleDB:
    """The boot-services handle database (§7.3)."""

    def __init__(self, new_handle: Callable[[], int], read_device_path: Callable[[int], bytes],
                 signal_event: Callable[[int], None], *,
                 free_handle: Callable[[int], None] | None = None):
        """
        new_handle / free_handle: allocate / release the opaque handle value.
        read_device_path(ptr): the bytes of the device path at guest pointer ``ptr``
            (at least up to and including its End node).
        signal_event(event): SignalEvent for protocol-notify events.
        """
        self._new_handle = new_handle
        self._free_handle = free_handle
        self._read_dp = read_device_path
        self._signal = signal_event
        self._reg_keys = itertools.count(1)           # RegisterProtocolNotify keys: 1, 2, ...
        self._handles: dict[int, dict[UUID, _Iface]] = {}       # creation order; protocols in install order
        self._by_guid: dict[UUID, list[_Iface]] = {}            # per protocol, ordered by seq
        self._regs: dict[int, _Registration] = {}
        self._seq = itertools.count(1)
        self._count = 0                                         # interfaces installed now

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def _check_guid(guid) -> UUID:
        if guid is None:
            raise EfiError(INVALID_PARAMETER, "Protocol is NULL")
        if not isinstance(guid, UUID):
            raise TypeError(f"protocol GUID must be a uuid.UUID, not {type(guid).__name__}")
        return guid

    def _protos(self, handle) -> dict[UUID, _Iface]:
        try:
            return self._handles[handle]
        except (KeyError, TypeError):
            raise EfiError(INVALID_PARAMETER, f"{handle!r} is not a handle") from None

    def _alloc_handle(self) -> int:
        h = self._new_handle()
        if not h or h in self._handles:
            raise EfiError(OUT_OF_RESOURCES, f"new_handle() returned unusable value {h!r}")
        return h

    def _room(self, n: int) -> None:
        if self._count + n > MAX_INTERFACES:
            raise EfiError(OUT_OF_RESOURCES, f"{self._count} protocol interfaces are installed, vmrun's "
                                             f"limit is {MAX_INTERFACES}")

    def _add(self, handle: int, guid: UUID, interface: int) -> _Iface:
        self._count += 1
        rec = _Iface(handle, guid, interface, next(self._seq))
        self._handles.setdefault(handle, {})[guid] = rec
        self._by_guid.setdefault(guid, []).append(rec)
        return rec

    def _remove(self, rec: _Iface) -> None:
        protos = self._handles[rec.handle]
        del protos[rec.guid]
        self._count -= 1
        self._by_guid[rec.guid].remove(rec)
        if not protos:
            del self._handles[rec.handle]
            if self._free_handle is not None:
                self._free_handle(rec.handle)

    def _events_for(self, guids: Iterable[UUID]) -> list[int]:
        gs = set(guids)
        return [r.event for r in self._regs.values() if r.guid in gs]

    def _fire(self, events: list[int]) -> None:
        for ev in events:
            self._signal(ev)

    def _device_path_nodes(self, handle: int) -> list[dp.Node] | None:
        rec = self._handles.get(handle, {}).get(DEVICE_PATH)
        if rec is None or not rec.interface:
            return None
        try:
            return dp.parse(self._read_dp(rec.interface))
        except EfiError:
            return None

    @staticmethod
    def _blocking_opens(rec: _Iface) -> list[_Open]:
        return [o for o in rec.opens if not (o.attributes & _SOFT)]

    # ---------------------------------------------------------------- install / uninstall
    def install(self, handle: int | None, guid: UUID, interface: int) -> int:
        """InstallProtocolInterface (§7.3).  ``handle`` None/0 creates a new handle.

        INVALID_PARAMETER: unknown handle, NULL protocol, or the protocol is
        already on the handle.  Signals the protocol's notify events.  Returns
        the handle.
        """
        guid = self._check_guid(guid)
        if handle:
            if guid in self._protos(handle):
                raise EfiError(INVALID_PARAMETER, f"{guid_name(guid)} already installed on {handle:#x}")
        self._room(1)
        if not handle:
            handle = self._alloc_handle()
        self._add(handle, guid, interface)
        self._fire(self._events_for([guid]))
        return handle

    def install_multiple(self, handle: int | None, pairs: list[tuple[UUID, int]]) -> int:
        """InstallMultipleProtocolInterfaces (§7.3); all or nothing.

        ALREADY_STARTED if a DEVICE_PATH interface in ``pairs`` equals the device
        path of an existing handle (found with LocateDevicePath, the remaining
        path being empty).  INVALID_PARAMETER for an unknown handle, a GUID given
        twice or a protocol already on the handle.  Returns the handle (a new
        one when ``handle`` is None/0; 0 if ``pairs`` is empty and no handle was given).
        """
        pairs = [(self._check_guid(g), i) for g, i in pairs]
        existing = self._protos(handle) if handle else {}
        seen: set[UUID] = set()
        for g, iface in pairs:
            if g in seen or g in existing:
                raise EfiError(INVALID_PARAMETER, f"{guid_name(g)} given twice or already installed")
            seen.add(g)
            if g == DEVICE_PATH and iface:
                raw = self._read_dp(iface)
                try:
                    h, off = self.locate_device_path(DEVICE_PATH, raw)
                except EfiError as e:
                    if e.status != NOT_FOUND:
                        raise
                else:
                    # EDK2: IsDevicePathEnd(remaining) -- the whole (single-instance) path matched.
                    if off == dp.nodes_size(dp.parse(raw)):
                        raise EfiError(ALREADY_STARTED, f"device path already on handle {h:#x}")
        if not pairs:
            return handle or 0
        self._room(len(pairs))
        created = not handle
        if created:
            handle = self._alloc_handle()
        added: list[_Iface] = []
        try:
            for g, iface in pairs:
                added.append(self._add(handle, g, iface))
        except BaseException:
            for rec in reversed(added):
                self._remove(rec)          # frees a created handle once it is empty
            if created and not added:
                self._handles.pop(handle, None)
                if self._free_handle is not None:
                    self._free_handle(handle)
            raise
        self._fire(self._events_for(g for g, _ in pairs))
        return handle

    def _check_removable(self, rec: _Iface) -> None:
        blocking = self._blocking_opens(rec)
        if blocking:
            o = blocking[0]
            raise EfiError(ACCESS_DENIED, f"{guid_name(rec.guid)} on {rec.handle:#x} is open by agent "
                                          f"{o.agent:#x} with attributes {o.attributes:#x}")

    def _find(self, handle, guid, interface) -> _Iface:
        guid = self._check_guid(guid)
        rec = self._protos(handle).get(guid)
        if rec is None or rec.interface != interface:
            raise EfiError(NOT_FOUND, f"{guid_name(guid)} with interface {interface:#x} not on {handle:#x}")
        return rec

    def reinstall(self, handle: int, guid: UUID, old_interface: int, new_interface: int) -> None:
        """ReinstallProtocolInterface (§7.3).  NOT_FOUND if ``old_interface`` is not
        installed for ``guid`` on ``handle``; ACCESS_DENIED if it is open BY_DRIVER
        / EXCLUSIVE / BY_CHILD_CONTROLLER.  Drops GET/TEST/BY_HANDLE open entries,
        moves the interface to the tail of the protocol's list and signals the
        protocol's notify events (old == new is allowed and just re-notifies)."""
        rec = self._find(handle, guid, old_interface)
        self._check_removable(rec)
        rec.opens.clear()
        rec.interface = new_interface
        lst = self._by_guid[rec.guid]
        lst.remove(rec)
        rec.seq = next(self._seq)
        lst.append(rec)
        self._fire(self._events_for([rec.guid]))

    def uninstall(self, handle: int, guid: UUID, interface: int) -> None:
        """UninstallProtocolInterface (§7.3).  NOT_FOUND if not installed with that
        interface; ACCESS_DENIED if open BY_DRIVER / EXCLUSIVE / BY_CHILD_CONTROLLER.
        GET/TEST/BY_HANDLE opens are closed implicitly.  The handle is freed when
        its last protocol goes."""
        rec = self._find(handle, guid, interface)
        self._check_removable(rec)
        self._remove(rec)

    def uninstall_multiple(self, handle: int, pairs: list[tuple[UUID, int]]) -> None:
        """UninstallMultipleProtocolInterfaces (§7.3): all or nothing.  Any failure
        (NOT_FOUND / ACCESS_DENIED / INVALID_PARAMETER) leaves everything installed;
        EDK2 reports INVALID_PARAMETER for any failure here, the spec's table lists
        INVALID_PARAMETER for "one of the protocol interfaces was not previously
        installed", so that is what is raised."""
        self._protos(handle)
        recs: list[_Iface] = []
        seen: set[UUID] = set()
        try:
            for g, iface in pairs:
                rec = self._find(handle, g, iface)
                if rec.guid in seen:
                    raise EfiError(INVALID_PARAMETER, f"{guid_name(rec.guid)} given twice")
                seen.add(rec.guid)
                self._check_removable(rec)
                recs.append(rec)
        except EfiError as e:
            raise EfiError(INVALID_PARAMETER, e.why) from e
        for rec in recs:
            self._remove(rec)

    # ---------------------------------------------------------------- queries
    def handle_protocol(self, handle: int, guid: UUID) -> int:
        """HandleProtocol (§7.3): the interface.  INVALID_PARAMETER for an unknown
        handle or NULL protocol, UNSUPPORTED if the handle lacks the protocol."""
        guid = self._check_guid(guid)
        rec = self._protos(handle).get(guid)
        if rec is None:
            raise EfiError(UNSUPPORTED, f"{handle:#x} has no {guid_name(guid)}")
        return rec.interface

    def get_interface(self, handle: int, guid: UUID) -> int | None:
        """Non-raising lookup for host code: the interface or None."""
        rec = self._handles.get(handle, {}).get(guid)
        return None if rec is None else rec.interface

    def protocols_per_handle(self, handle: int) -> list[UUID]:
        """ProtocolsPerHandle (§7.3): the handle's protocol GUIDs in install order."""
        return list(self._protos(handle))

    def handles(self) -> list[int]:
        """All handles, in creation order."""
        return list(self._handles)

    def is_handle(self, h) -> bool:
        try:
            return h in self._handles
        except TypeError:
            return False

    # ---------------------------------------------------------------- open / close
    def open_protocol(self, handle: int, guid: UUID, agent: int, controller: int, attributes: int) -> int:
        """OpenProtocol (§7.3), following the spec's attribute table and EDK2 CoreOpenProtocol.

        Returns the interface (0 for TEST_PROTOCOL).  Raises
        INVALID_PARAMETER (unknown handle; bad attributes; for BY_CHILD_CONTROLLER
        an invalid agent/controller or controller == handle; for BY_DRIVER(|EXCLUSIVE)
        an invalid agent or controller; for EXCLUSIVE an invalid agent),
        UNSUPPORTED (protocol not on handle),
        AlreadyStartedError (BY_DRIVER(|EXCLUSIVE) already open by the same agent and
        controller with the same attributes; carries the interface),
        ACCESS_DENIED (BY_DRIVER while opened BY_DRIVER by another agent or EXCLUSIVE;
        EXCLUSIVE while opened EXCLUSIVE, or while opened BY_DRIVER since no driver
        can be disconnected here).
        An identical (agent, controller, attributes) non-exclusive open increments
        that entry's OpenCount; otherwise a new entry is recorded unless ``agent`` is 0.
        """
        guid = self._check_guid(guid)
        protos = self._protos(handle)
        if attributes not in _VALID_ATTRIBUTES:
            raise EfiError(INVALID_PARAMETER, f"bad OpenProtocol attributes {attributes:#x}")
        if attributes == BY_CHILD_CONTROLLER:
            if not (self.is_handle(agent) and self.is_handle(controller)) or controller == handle:
                raise EfiError(INVALID_PARAMETER, "BY_CHILD_CONTROLLER needs valid agent/controller != handle")
        elif attributes in (BY_DRIVER, BY_DRIVER | EXCLUSIVE):
            if not (self.is_handle(agent) and self.is_handle(controller)):
                raise EfiError(INVALID_PARAMETER, "BY_DRIVER needs valid agent and controller handles")
        elif attributes == EXCLUSIVE:
            if not self.is_handle(agent):
                raise EfiError(INVALID_PARAMETER, "EXCLUSIVE needs a valid agent handle")
        rec = protos.get(guid)
        if rec is None:
            raise EfiError(UNSUPPORTED, f"{handle:#x} has no {guid_name(guid)}")
        result = 0 if attributes == TEST_PROTOCOL else rec.interface

        by_driver = exclusive = False
        for o in rec.opens:
            exact = o.agent == agent and o.attributes == attributes and o.controller == controller
            if o.attributes & BY_DRIVER:
                by_driver = True
                if exact:
                    raise AlreadyStartedError(rec.interface, f"{guid_name(guid)} already opened by {agent:#x}")
            if o.attributes & EXCLUSIVE:
                exclusive = True
            elif exact:
                o.open_count += 1
                return result
        if attributes == BY_DRIVER:
            if exclusive or by_driver:
                raise EfiError(ACCESS_DENIED, f"{guid_name(guid)} on {handle:#x} already managed")
        elif attributes & EXCLUSIVE:
            if exclusive:
                raise EfiError(ACCESS_DENIED, f"{guid_name(guid)} on {handle:#x} already opened EXCLUSIVE")
            if by_driver:
                raise EfiError(ACCESS_DENIED, f"{guid_name(guid)} on {handle:#x} is opened BY_DRIVER "
                                              "(DisconnectController not supported)")
        if agent:
            if len(rec.opens) >= MAX_OPENS:
                raise EfiError(OUT_OF_RESOURCES, f"{guid_name(guid)} on {handle:#x} is open {len(rec.opens)} "
                                                 f"times, vmrun's limit")
            rec.opens.append(_Open(agent, controller or 0, attributes))
        return result

    def close_protocol(self, handle: int, guid: UUID, agent: int, controller: int) -> None:
        """CloseProtocol (§7.3): removes every open entry of (agent, controller).
        INVALID_PARAMETER for an invalid handle/agent or a non-zero invalid controller;
        NOT_FOUND if the handle lacks the protocol or no such entry exists."""
        guid = self._check_guid(guid)
        protos = self._protos(handle)
        if not self.is_handle(agent):
            raise EfiError(INVALID_PARAMETER, f"agent {agent!r} is not a handle")
        if controller and not self.is_handle(controller):
            raise EfiError(INVALID_PARAMETER, f"controller {controller!r} is not a handle")
        rec = protos.get(guid)
        if rec is None:
            raise EfiError(NOT_FOUND, f"{handle:#x} has no {guid_name(guid)}")
        controller = controller or 0
        keep = [o for o in rec.opens if not (o.agent == agent and o.controller == controller)]
        if len(keep) == len(rec.opens):
            raise EfiError(NOT_FOUND, f"{guid_name(guid)} on {handle:#x} not opened by {agent:#x}/{controller:#x}")
        rec.opens[:] = keep

    def open_protocol_information(self, handle: int, guid: UUID) -> list[OpenInfo]:
        """OpenProtocolInformation (§7.3); NOT_FOUND if the handle lacks the protocol."""
        guid = self._check_guid(guid)
        rec = self._handles.get(handle, {}).get(guid) if self.is_handle(handle) else None
        if rec is None:
            raise EfiError(NOT_FOUND, f"{handle!r} has no {guid_name(guid)}")
        return [OpenInfo(o.agent, o.controller, o.attributes, o.open_count) for o in rec.opens]

    def close_all_by_agent(self, agent: int) -> int:
        """Drop every open entry whose agent is ``agent`` (what the core does when
        an image exits/unloads, §7.4 Exit/UnloadImage).  Returns how many went."""
        n = 0
        for protos in self._handles.values():
            for rec in protos.values():
                before = len(rec.opens)
                rec.opens[:] = [o for o in rec.opens if o.agent != agent]
                n += before - len(rec.opens)
        return n

    # ---------------------------------------------------------------- notify / locate
    def register_protocol_notify(self, guid: UUID, event: int) -> int:
        """RegisterProtocolNotify (§7.3): returns a new registration key.  Later
        installs/reinstalls of ``guid`` call ``signal_event(event)``."""
        guid = self._check_guid(guid)
        if not event:
            raise EfiError(INVALID_PARAMETER, "Event is NULL")
        if len(self._regs) >= MAX_REGISTRATIONS:
            raise EfiError(OUT_OF_RESOURCES, f"{len(self._regs)} protocol notify registrations exist, "
                                             "vmrun's limit (CloseEvent drops an event's)")
        key = next(self._reg_keys)
        # EDK2 starts the cursor at the head of the protocol's list
        self._regs[key] = _Registration(key, guid, event, 0)
        return key

    def unregister_event(self, event: int) -> int:
        """Remove all registrations of ``event`` (CloseEvent on a notify event,
        EDK2 CoreUnregisterProtocolNotify).  Returns how many were removed."""
        keys = [k for k, r in self._regs.items() if r.event == event]
        for k in keys:
            del self._regs[k]
        return len(keys)

    def registration(self, key: int) -> tuple[UUID, int] | None:
        """(guid, event) of a registration key, or None."""
        r = self._regs.get(key)
        return None if r is None else (r.guid, r.event)

    def _reg(self, key) -> _Registration:
        try:
            return self._regs[key]
        except (KeyError, TypeError):
            raise EfiError(INVALID_PARAMETER, f"{key!r} is not a registration key") from None

    def _next_for(self, reg: _Registration) -> _Iface | None:
        for rec in self._by_guid.get(reg.guid, []):
            if rec.seq > reg.cursor:
                return rec
        return None

    def locate_handle(self, search_type: int, guid: UUID | None, search_key: int | None,
                      *, consume: bool = True) -> list[int]:
        """LocateHandle (§7.3).

        ALL_HANDLES: every handle (creation order).  BY_PROTOCOL: handles with
        ``guid`` (protocol-list order).  BY_REGISTER_NOTIFY: ``[next handle]`` for the
        registration ``search_key`` (``guid`` ignored), advancing it unless
        ``consume`` is False (for a BUFFER_TOO_SMALL size probe).
        INVALID_PARAMETER for a bad search type, NULL protocol (BY_PROTOCOL) or
        unknown search key; NOT_FOUND if nothing matches.
        """
        if search_type == ALL_HANDLES:
            out = list(self._handles)
        elif search_type == BY_PROTOCOL:
            guid = self._check_guid(guid)
            out = [r.handle for r in self._by_guid.get(guid, [])]
        elif search_type == BY_REGISTER_NOTIFY:
            if not search_key:
                raise EfiError(INVALID_PARAMETER, "SearchKey is NULL")
            reg = self._reg(search_key)
            rec = self._next_for(reg)
            out = [] if rec is None else [rec.handle]
            if rec is not None and consume:
                reg.cursor = rec.seq
        else:
            raise EfiError(INVALID_PARAMETER, f"bad search type {search_type}")
        if not out:
            raise EfiError(NOT_FOUND, "no matching handles")
        return out

    def locate_protocol(self, guid: UUID, registration: int | None = None) -> int:
        """LocateProtocol (§7.3): the first interface of ``guid`` (protocol-list
        order) or, with ``registration``, the next one not yet returned for it.
        NOT_FOUND if none (also for a NULL protocol, as EDK2)."""
        if guid is None:
            raise EfiError(NOT_FOUND, "Protocol is NULL")
        guid = self._check_guid(guid)
        if registration:
            reg = self._reg(registration)
            rec = self._next_for(reg)
            if rec is None:
                raise EfiError(NOT_FOUND, f"no new {guid_name(reg.guid)} for registration {registration}")
            reg.cursor = rec.seq
            return rec.interface
        lst = self._by_guid.get(guid)
        if not lst:
            raise EfiError(NOT_FOUND, f"no {guid_name(guid)} installed")
        return lst[0].interface

    def locate_device_path(self, guid: UUID, device_path: bytes) -> tuple[int, int]:
        """LocateDevicePath (§7.3).

        Among handles that carry ``guid`` and a DEVICE_PATH, picks the one whose
        device path is the longest node-wise prefix of the first instance of
        ``device_path`` and returns ``(handle, offset)`` where ``offset`` is the
        byte offset of the remaining path inside ``device_path`` (the caller
        advances the guest's DevicePath pointer by it).  On equal lengths the first
        handle in protocol-list order wins.  NOT_FOUND if no handle matches;
        INVALID_PARAMETER for a NULL protocol or a malformed ``device_path``.
        """
        guid = self._check_guid(guid)
        if device_path is None:
            raise EfiError(INVALID_PARAMETER, "DevicePath is NULL")
        source = dp.split_instances(dp.parse(device_path))[0]
        best: tuple[int, int] | None = None
        for rec in self._by_guid.get(guid, []):
            nodes = self._device_path_nodes(rec.handle)
            if nodes is None or not dp.is_prefix(nodes, source):
                continue
            sz = dp.nodes_size(nodes)
            if best is None or sz > best[1]:
                best = (rec.handle, sz)
        if best is None:
            raise EfiError(NOT_FOUND, f"no {guid_name(guid)} handle on a prefix of {dp.to_text(source)!r}")
        return best

    # ---------------------------------------------------------------- debugging
    def dump(self) -> str:
        lines = []
        for h, protos in self._handles.items():
            lines.append(f"handle {h:#x}")
            for g, rec in protos.items():
                extra = ""
                if g == DEVICE_PATH:
                    nodes = self._device_path_nodes(h)
                    extra = f" {dp.to_text(nodes)!r}" if nodes is not None else " <bad device path>"
                lines.append(f"  {guid_name(g)} = {rec.interface:#x}{extra}"
                             + "".join(f"\n    open agent={o.agent:#x} ctl={o.controller:#x} "
                                       f"attr={o.attributes:#x} count={o.open_count}" for o in rec.opens))
        return "\n".join(lines)
