"""Events, timers and task priority levels (UEFI 2.10 §7.1 Event, Timer, and Task Priority Services).

There are no interrupts in the micro-VM: timers are checked against the host's monotonic clock
whenever the payload enters a service (and while WaitForEvent/Stall wait), and notify
functions run through ``GuestPort.call_guest`` at their TPL, in TPL order, as soon as the current
TPL drops below it — the observable semantics the spec gives.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from hostsvc import status as S
from hostsvc.guids import EVENT_GROUP_EXIT_BOOT_SERVICES, EVENT_GROUP_VIRTUAL_ADDRESS_CHANGE
from hostsvc.status import EfiError
from vmrun.errors import PayloadFault

EVT_TIMER = 0x80000000
EVT_RUNTIME = 0x40000000
EVT_NOTIFY_WAIT = 0x00000100
EVT_NOTIFY_SIGNAL = 0x00000200
EVT_SIGNAL_EXIT_BOOT_SERVICES = 0x00000201
EVT_SIGNAL_VIRTUAL_ADDRESS_CHANGE = 0x60000202

TPL_APPLICATION, TPL_CALLBACK, TPL_NOTIFY, TPL_HIGH_LEVEL = 4, 8, 16, 31

TIMER_CANCEL, TIMER_PERIODIC, TIMER_RELATIVE = 0, 1, 2

_VALID_TYPES = {0, EVT_TIMER, EVT_RUNTIME, EVT_NOTIFY_WAIT, EVT_NOTIFY_SIGNAL,
                EVT_SIGNAL_EXIT_BOOT_SERVICES, EVT_SIGNAL_VIRTUAL_ADDRESS_CHANGE}
_TICK = 1e-7  # timer units are 100 ns

#: CreateEvent refuses more live events than this (EFI_OUT_OF_RESOURCES): every service call
#: polls the timers, and signalling a group looks at every event
MAX_EVENTS = 16384
#: notify functions running inside one another (a notify that lowers the TPL with RestoreTPL and
#: so lets its own event run again, …): deeper is a payload fault. Each level is a nested guest
#: call and some ten host stack frames (see also hostsvc.images.MAX_IMAGE_NESTING).
MAX_NOTIFY_NESTING = 32


@dataclass
class Event:
    handle: int
    type: int
    notify_tpl: int
    notify_function: int
    notify_context: int
    group: uuid.UUID | None = None
    signaled: bool = False
    timer_deadline: float | None = None
    timer_period: float = 0.0
    order: int = 0


@dataclass
class Events:
    """The event database. ``call_notify(function, event, context)`` runs guest code;
    ``new_handle()`` gives a unique guest address for an event."""
    call_notify: object
    new_handle: object
    free_handle: object
    clock: object = time.monotonic
    events: dict[int, Event] = field(default_factory=dict)
    tpl: int = TPL_APPLICATION
    pending: list[Event] = field(default_factory=list)
    _order: int = 0
    #: how many notify functions are running now (nested guest calls); ExitBootServices refuses
    #: to run inside one
    notify_depth: int = 0

    def get(self, handle: int) -> Event:
        ev = self.events.get(handle)
        if ev is None:
            raise EfiError(S.INVALID_PARAMETER, f"{handle:#x} is not an event")
        return ev

    # --- creation -------------------------------------------------------------------------
    def create(self, type_: int, notify_tpl: int, notify_function: int, notify_context: int,
               group: uuid.UUID | None = None) -> int:
        """CreateEvent / CreateEventEx (§7.1)."""
        if type_ not in _VALID_TYPES and type_ & ~(EVT_TIMER | EVT_RUNTIME | EVT_NOTIFY_WAIT | EVT_NOTIFY_SIGNAL):
            raise EfiError(S.INVALID_PARAMETER, f"event type {type_:#x}")
        if group is not None and type_ in (EVT_SIGNAL_EXIT_BOOT_SERVICES, EVT_SIGNAL_VIRTUAL_ADDRESS_CHANGE):
            raise EfiError(S.INVALID_PARAMETER, "group given with an implicit-group type")
        if type_ == EVT_SIGNAL_EXIT_BOOT_SERVICES:
            group = EVENT_GROUP_EXIT_BOOT_SERVICES
        elif type_ == EVT_SIGNAL_VIRTUAL_ADDRESS_CHANGE:
            group = EVENT_GROUP_VIRTUAL_ADDRESS_CHANGE
        notify = type_ & (EVT_NOTIFY_WAIT | EVT_NOTIFY_SIGNAL)
        if notify == (EVT_NOTIFY_WAIT | EVT_NOTIFY_SIGNAL):
            raise EfiError(S.INVALID_PARAMETER, "both NOTIFY_WAIT and NOTIFY_SIGNAL")
        if notify:
            if not notify_function:
                raise EfiError(S.INVALID_PARAMETER, "notify event without NotifyFunction")
            if not TPL_APPLICATION < notify_tpl < TPL_HIGH_LEVEL:
                raise EfiError(S.INVALID_PARAMETER, f"NotifyTpl {notify_tpl}")
        if len(self.events) >= MAX_EVENTS:
            raise EfiError(S.OUT_OF_RESOURCES, f"{len(self.events)} events exist, vmrun's limit "
                                               "(CloseEvent frees one)")
        handle = self.new_handle()
        self._order += 1
        self.events[handle] = Event(handle, type_, notify_tpl, notify_function, notify_context,
                                    group, order=self._order)
        return handle

    def close(self, handle: int) -> None:
        ev = self.get(handle)
        self.pending = [p for p in self.pending if p is not ev]
        del self.events[handle]
        self.free_handle(handle)

    # --- signalling -----------------------------------------------------------------------
    def signal(self, handle: int) -> None:
        """SignalEvent (§7.1): a grouped event signals its whole group."""
        ev = self.get(handle)
        if ev.group is not None:
            self.signal_group(ev.group)
        else:
            self._signal_one(ev)
        self.dispatch()

    def signal_group(self, group: uuid.UUID) -> None:
        for ev in sorted(self.events.values(), key=lambda e: e.order):
            if ev.group == group:
                self._signal_one(ev)

    def _signal_one(self, ev: Event) -> None:
        if ev.signaled:
            return
        if ev.type & EVT_NOTIFY_SIGNAL:
            if ev not in self.pending:  # a NOTIFY_SIGNAL event is cleared as its notify is queued
                self.pending.append(ev)
        else:
            ev.signaled = True

    def dispatch(self) -> None:
        """Run queued notify functions whose TPL is above the current one, highest first."""
        while True:
            ready = [e for e in self.pending if e.notify_tpl > self.tpl]
            if not ready:
                return
            ev = max(ready, key=lambda e: (e.notify_tpl, -e.order))
            self.pending.remove(ev)
            self._notify(ev)

    def _notify(self, ev: Event) -> None:
        """Run ``ev``'s notify function at its TPL (nested at most :data:`MAX_NOTIFY_NESTING`)."""
        if self.notify_depth >= MAX_NOTIFY_NESTING:
            raise PayloadFault(
                f"notify functions nested deeper than {MAX_NOTIFY_NESTING}: the notify function at "
                f"{ev.notify_function:#x} (event {ev.handle:#x}, TPL {ev.notify_tpl}) was to run inside "
                f"{self.notify_depth} running ones (a notify function that lowers the TPL below its "
                "own, or re-signals its event from a lower TPL?)", rip=ev.notify_function)
        old = self.tpl
        self.tpl = max(old, ev.notify_tpl)
        self.notify_depth += 1
        try:
            self.call_notify(ev.notify_function, ev.handle, ev.notify_context)
        finally:
            self.notify_depth -= 1
            self.tpl = old

    # --- TPL --------------------------------------------------------------------------------
    def raise_tpl(self, new: int) -> int:
        old = self.tpl
        if new < old or new > TPL_HIGH_LEVEL:
            raise EfiError(S.INVALID_PARAMETER, f"RaiseTPL({new}) from {old}")
        self.tpl = new
        return old

    def restore_tpl(self, old: int) -> None:
        if old > self.tpl:
            raise EfiError(S.INVALID_PARAMETER, f"RestoreTPL({old}) above current {self.tpl}")
        self.tpl = old
        self.dispatch()

    # --- timers -----------------------------------------------------------------------------
    def set_timer(self, handle: int, kind: int, trigger_100ns: int) -> None:
        ev = self.get(handle)
        if not ev.type & EVT_TIMER:
            raise EfiError(S.INVALID_PARAMETER, "not a timer event")
        now = self.clock()
        if kind == TIMER_CANCEL:
            ev.timer_deadline = None
        elif kind == TIMER_RELATIVE:
            ev.timer_deadline = now + trigger_100ns * _TICK
            ev.timer_period = 0.0
        elif kind == TIMER_PERIODIC:
            period = max(trigger_100ns * _TICK, 1e-3)
            ev.timer_deadline = now + period
            ev.timer_period = period
        else:
            raise EfiError(S.INVALID_PARAMETER, f"timer type {kind}")

    def poll_timers(self) -> None:
        now = self.clock()
        fired = False
        for ev in list(self.events.values()):
            if ev.timer_deadline is not None and now >= ev.timer_deadline:
                if ev.timer_period:
                    ev.timer_deadline += ev.timer_period * max(1, int((now - ev.timer_deadline) / ev.timer_period) + 1)
                else:
                    ev.timer_deadline = None
                if ev.group is not None:
                    self.signal_group(ev.group)
                else:
                    self._signal_one(ev)
                fired = True
        if fired:
            self.dispatch()

    def next_deadline(self) -> float | None:
        ds = [e.timer_deadline for e in self.events.values() if e.timer_deadline is not None]
        return min(ds) if ds else None

    def interrupts_masked(self) -> bool:
        """Interrupts are disabled at TPL_HIGH_LEVEL (UEFI 2.10 §7.1, TPL restrictions)."""
        return self.tpl >= TPL_HIGH_LEVEL

    # --- waiting ----------------------------------------------------------------------------
    def check(self, handle: int) -> bool:
        """CheckEvent semantics: True (and cleared) when signaled; NOTIFY_SIGNAL → INVALID_PARAMETER.

        An unsignaled NOTIFY_WAIT event queues its notify function (once: an event already
        queued stays queued, §7.1 CheckEvent / EDK2 CoreCheckEvent), which runs now if its TPL
        is above the current one. So a wait notify function that calls CheckEvent on its own
        event (running at that event's TPL) does not run itself again."""
        ev = self.get(handle)
        if ev.type & EVT_NOTIFY_SIGNAL:
            raise EfiError(S.INVALID_PARAMETER, "CheckEvent on a NOTIFY_SIGNAL event")
        if not ev.signaled and ev.type & EVT_NOTIFY_WAIT:
            if ev not in self.pending:
                self.pending.append(ev)
            self.dispatch()
        if ev.signaled:
            ev.signaled = False
            return True
        return False
