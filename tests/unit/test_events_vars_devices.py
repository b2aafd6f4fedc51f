"""Events/TPL semantics, the variable store, and the legacy port devices (no KVM)."""

import datetime as dt
import itertools
import uuid

import pytest

from hostsvc import events as EV
from hostsvc import status as S
from hostsvc.status import EfiError
from hostsvc.variables import BOOTSERVICE_ACCESS as BS, NON_VOLATILE as NV, RUNTIME_ACCESS as RT
from hostsvc.variables import VariableStore, parse_var_option
from vmrun.errors import BadOptionError
from vmrun.vm.devices import CmosRtc, Pit8254, PortBus, PostPort, Uart16550


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


@pytest.fixture
def ev():
    calls = []
    counter = itertools.count(0x1000, 16)
    clock = Clock()
    e = EV.Events(call_notify=lambda f, h, c: calls.append((f, h, c, e.tpl)),
                  new_handle=lambda: next(counter), free_handle=lambda h: None, clock=clock)
    e.calls, e.clock_obj = calls, clock
    return e


def test_signal_runs_notify_at_its_tpl(ev):
    h = ev.create(EV.EVT_NOTIFY_SIGNAL, EV.TPL_CALLBACK, 0xF00, 0xC0)
    ev.signal(h)
    assert ev.calls == [(0xF00, h, 0xC0, EV.TPL_CALLBACK)]
    assert ev.tpl == EV.TPL_APPLICATION


def test_notify_deferred_while_tpl_is_raised(ev):
    h = ev.create(EV.EVT_NOTIFY_SIGNAL, EV.TPL_CALLBACK, 0xF00, 0)
    old = ev.raise_tpl(EV.TPL_NOTIFY)
    ev.signal(h)
    assert ev.calls == []
    ev.restore_tpl(old)
    assert len(ev.calls) == 1


def test_invalid_creations(ev):
    with pytest.raises(EfiError) as e:
        ev.create(EV.EVT_NOTIFY_SIGNAL, EV.TPL_CALLBACK, 0, 0)  # no notify function
    assert e.value.status == S.INVALID_PARAMETER
    # UEFI 2.10 §7.1 CreateEvent: both notify types set, or a NotifyTpl that is not a
    # supported level for a notify function, are EFI_INVALID_PARAMETER
    with pytest.raises(EfiError) as e:
        ev.create(EV.EVT_NOTIFY_SIGNAL | EV.EVT_NOTIFY_WAIT, EV.TPL_CALLBACK, 1, 0)
    assert e.value.status == S.INVALID_PARAMETER
    with pytest.raises(EfiError) as e:
        ev.create(EV.EVT_NOTIFY_SIGNAL, EV.TPL_HIGH_LEVEL, 1, 0)
    assert e.value.status == S.INVALID_PARAMETER


def test_timer_relative_fires_once(ev):
    h = ev.create(EV.EVT_TIMER, 0, 0, 0)
    ev.set_timer(h, EV.TIMER_RELATIVE, 10_000)  # 1 ms in 100 ns units
    ev.poll_timers()
    assert not ev.check(h)
    ev.clock_obj.t += 0.002
    ev.poll_timers()
    assert ev.check(h) and not ev.check(h)


def test_group_signal_signals_every_member(ev):
    grp = uuid.uuid4()
    a = ev.create(EV.EVT_NOTIFY_SIGNAL, EV.TPL_CALLBACK, 0xA, 0, grp)
    ev.create(EV.EVT_NOTIFY_SIGNAL, EV.TPL_NOTIFY, 0xB, 0, grp)
    ev.signal(a)
    assert [c[0] for c in ev.calls] == [0xB, 0xA]  # higher TPL first


def test_check_event_on_notify_signal_is_invalid(ev):
    h = ev.create(EV.EVT_NOTIFY_SIGNAL, EV.TPL_CALLBACK, 1, 0)
    with pytest.raises(EfiError) as e:
        ev.check(h)
    assert e.value.status == S.INVALID_PARAMETER  # UEFI 2.10 §7.1 CheckEvent: EVT_NOTIFY_SIGNAL


def test_variables_set_get_delete_append():
    v = VariableStore()
    g = uuid.uuid4()
    v.set("Foo", g, NV | BS | RT, b"\x01\x02")
    assert v.get("Foo", g).data == b"\x01\x02"
    v.set("Foo", g, NV | BS | RT | 0x40, b"\x03")
    assert v.get("Foo", g).data == b"\x01\x02\x03"
    with pytest.raises(EfiError) as e:
        v.set("Foo", g, BS, b"x")  # different attributes
    assert e.value.status == S.INVALID_PARAMETER
    with pytest.raises(EfiError) as e:
        v.set("Bar", g, RT, b"x")  # RT without BS
    assert e.value.status == S.INVALID_PARAMETER  # UEFI 2.10 §8.2 SetVariable: invalid attributes
    v.set("Foo", g, NV | BS | RT, b"")
    with pytest.raises(EfiError) as e:
        v.get("Foo", g)
    assert e.value.status == S.NOT_FOUND


def test_variable_enumeration_order_and_end():
    v = VariableStore()
    g = uuid.uuid4()
    for n in ("A", "B"):
        v.set(n, g, BS, b"1")
    assert v.next_name("", g).name == "A"
    assert v.next_name("A", g).name == "B"
    with pytest.raises(EfiError) as e:
        v.next_name("B", g)
    assert e.value.status == S.NOT_FOUND


def test_var_option_parsing(tmp_path):
    assert parse_var_option("SecureBoot=u8:1")[2] == b"\x01"
    name, guid, data = parse_var_option("X:4a67b082-0a4c-41cf-b6c7-440b29bb8c4f=str:hi")
    assert name == "X" and str(guid) == "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
    assert data == "hi\0".encode("utf-16-le")
    for bad in ("novalue", "=u8:1", "X:nope=u8:1", "X=zzz:1", "X=hex:zz"):
        with pytest.raises(BadOptionError):
            parse_var_option(bad)


def test_port_bus_refuses_overlaps():
    bus = PortBus()
    bus.register(0x80, 1, PostPort())
    with pytest.raises(ValueError, match="overlap"):
        bus.register(0x7F, 2, PostPort())


def test_cmos_reports_host_time_in_bcd():
    t = dt.datetime(2026, 11, 22, 13, 45, 59, tzinfo=dt.timezone.utc)
    rtc = CmosRtc(now=lambda: t)
    got = {}
    for reg in (0, 2, 4, 7, 8, 9, 0x32):
        rtc.write(0x70, 1, reg)
        got[reg] = rtc.read(0x71, 1)
    assert got == {0: 0x59, 2: 0x45, 4: 0x13, 7: 0x22, 8: 0x11, 9: 0x26, 0x32: 0x20}


def test_pit_channel2_counts_down_at_1193182_hz():
    clock = Clock()
    pit = Pit8254(clock)
    pit.write(0x61, 1, 0x01)           # gate channel 2 on
    pit.write(0x43, 1, 0b10110000)     # channel 2, lo/hi, mode 0
    pit.write(0x42, 1, 0xFF)
    pit.write(0x42, 1, 0xFF)           # count 0xFFFF
    clock.t += 0.01                    # 11932 ticks
    pit.write(0x43, 1, 0b10000000)     # latch channel 2
    v = pit.read(0x42, 1) | (pit.read(0x42, 1) << 8)
    assert abs((0xFFFF - v) - 11932) <= 2
    assert not pit.read(0x61, 1) & 0x20  # OUT2 low until terminal count
    clock.t += 0.1
    assert pit.read(0x61, 1) & 0x20


def test_uart_lines():
    lines = []
    u = Uart16550(lines.append)
    for ch in b"hello\r\nworld\n":
        u.write(0x3F8, 1, ch)
    assert lines == ["hello", "world"]
    assert u.read(0x3FD, 1) & 0x60 == 0x60
