"""Legacy port-I/O devices the payload may touch: i8254 PIT, CMOS RTC, 16550 UART, POST port.

Port I/O from CPL 3 faults (#GP) and reaches :mod:`vmrun.vm.emulate`, which looks the port up in a
:class:`PortBus`. A port nobody registered is a payload fault, not a silent 0xFF.
"""

from __future__ import annotations

import datetime as _dt
import time
from typing import Callable, Protocol

import structlog

log = structlog.get_logger("vmrun.vm.devices")


class PortDevice(Protocol):
    name: str

    def read(self, port: int, size: int) -> int: ...

    def write(self, port: int, size: int, value: int) -> None: ...


class PortBus:
    """A port registry that refuses overlapping registrations (like kvmtool's ``kvm__register_pio``)."""

    def __init__(self) -> None:
        self._ranges: list[tuple[int, int, PortDevice]] = []

    def register(self, start: int, count: int, device: PortDevice) -> None:
        for s, c, d in self._ranges:
            if start < s + c and s < start + count:
                raise ValueError(f"ports {start:#x}-{start + count - 1:#x} ({device.name}) overlap "
                                 f"{s:#x}-{s + c - 1:#x} ({d.name})")
        self._ranges.append((start, count, device))

    def find(self, port: int) -> PortDevice | None:
        for s, c, d in self._ranges:
            if s <= port < s + c:
                return d
        return None


class PostPort:
    """Port 0x80: writes are the classic I/O delay / POST code; reads return 0xFF."""
    name = "post"

    def read(self, port: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, port: int, size: int, value: int) -> None:
        pass


class Pit8254:
    """Intel 8254 PIT at 0x40-0x43 plus the port-0x61 gate/status bits of channel 2.

    Counters run at 1.193182 MHz against the host's monotonic clock. Supported: counter latch,
    lobyte/hibyte/lo-hi access, modes 0 (interrupt on terminal count: OUT goes high when the
    count reaches zero) and 2/3 (periodic). Enough for the calibration loops EFI stubs run when
    they have no TSC; nothing raises an interrupt.
    """
    name = "i8254"
    HZ = 1_193_182

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.reload = [0x10000] * 3
        self.mode = [0] * 3
        self.access = [3] * 3
        self.start = [clock()] * 3
        self.latched: list[list[int]] = [[], [], []]
        self.write_lo: list[int | None] = [None] * 3
        self.read_hi_next = [False] * 3
        self.gate2 = False
        self.port61 = 0

    def _count(self, ch: int) -> tuple[int, bool]:
        if ch == 2 and not self.gate2:
            return self.reload[2] & 0xFFFF, self.mode[2] != 0
        ticks = int((self.clock() - self.start[ch]) * self.HZ)
        reload = self.reload[ch] or 0x10000
        if self.mode[ch] == 0:
            remaining = reload - ticks
            return (max(remaining, 0) & 0xFFFF), remaining <= 0
        value = reload - (ticks % reload)
        return value & 0xFFFF, (ticks % reload) < reload // 2

    def read(self, port: int, size: int) -> int:
        if port == 0x61:
            out2 = self._count(2)[1]
            return (self.port61 & 0x0F) | (0x20 if out2 else 0)
        if port == 0x43:
            return 0xFF
        ch = port - 0x40
        if self.latched[ch]:
            return self.latched[ch].pop(0)
        value, _ = self._count(ch)
        acc = self.access[ch]
        if acc == 1:
            return value & 0xFF
        if acc == 2:
            return value >> 8
        hi = self.read_hi_next[ch]
        self.read_hi_next[ch] = not hi
        return (value >> 8) if hi else (value & 0xFF)

    def write(self, port: int, size: int, value: int) -> None:
        value &= 0xFF
        if port == 0x61:
            self.port61 = value
            gate = bool(value & 1)
            if gate and not self.gate2:
                self.start[2] = self.clock()
            self.gate2 = gate
            return
        if port == 0x43:
            ch = value >> 6
            if ch == 3:  # read-back: latch counts of the selected channels
                for c in range(3):
                    if value & (2 << c) and not value & 0x20:
                        v, _ = self._count(c)
                        self.latched[c] = [v & 0xFF, v >> 8]
                return
            acc = (value >> 4) & 3
            if acc == 0:  # counter latch
                v, _ = self._count(ch)
                self.latched[ch] = [v & 0xFF, v >> 8] if self.access[ch] == 3 else \
                    [v & 0xFF] if self.access[ch] == 1 else [v >> 8]
                return
            self.access[ch] = acc
            self.mode[ch] = (value >> 1) & 7 if ((value >> 1) & 7) < 6 else ((value >> 1) & 3)
            self.write_lo[ch] = None
            self.read_hi_next[ch] = False
            return
        ch = port - 0x40
        acc = self.access[ch]
        if acc == 3:
            if self.write_lo[ch] is None:
                self.write_lo[ch] = value
                return
            value = self.write_lo[ch] | (value << 8)
            self.write_lo[ch] = None
        elif acc == 2:
            value <<= 8
        self.reload[ch] = value or 0x10000
        self.start[ch] = self.clock()


def _bcd(v: int) -> int:
    return ((v // 10) << 4) | (v % 10)


class CmosRtc:
    """MC146818 RTC/CMOS at 0x70-0x71: the time of day from the host clock (UTC, BCD, 24 h)."""
    name = "cmos"

    def __init__(self, now: Callable[[], _dt.datetime] | None = None) -> None:
        self.now = now or (lambda: _dt.datetime.now(_dt.timezone.utc))
        self.index = 0
        self.nvram = bytearray(128)

    def read(self, port: int, size: int) -> int:
        if port == 0x70:
            return self.index
        t = self.now()
        regs = {0x00: _bcd(t.second), 0x02: _bcd(t.minute), 0x04: _bcd(t.hour),
                0x06: _bcd(t.isoweekday() % 7 + 1), 0x07: _bcd(t.day), 0x08: _bcd(t.month),
                0x09: _bcd(t.year % 100), 0x32: _bcd(t.year // 100),
                0x0A: 0x26, 0x0B: 0x02, 0x0C: 0x00, 0x0D: 0x80}
        return regs.get(self.index, self.nvram[self.index])

    def write(self, port: int, size: int, value: int) -> None:
        if port == 0x70:
            self.index = value & 0x7F  # bit 7 is the NMI mask
        elif self.index >= 0x0E:
            self.nvram[self.index] = value & 0xFF


class Uart16550:
    """A 16550 at 0x3f8-0x3ff whose transmitted bytes go to the console log, line by line.

    Host memory stays bounded whatever the payload sends: a line is handed to the sink at
    :attr:`LINE_MAX` bytes even without a newline, and :attr:`output` (every byte, for tests
    and summaries) keeps the first :attr:`OUTPUT_MAX` bytes and counts the rest in
    :attr:`dropped`.
    """
    name = "uart"
    LINE_MAX = 4096
    OUTPUT_MAX = 4 << 20

    def __init__(self, sink: Callable[[str], None]) -> None:
        self.sink = sink
        self.regs = bytearray(8)
        self.regs[3] = 0x03  # LCR: 8N1
        self.line = bytearray()
        self.output = bytearray()
        self.dropped = 0

    def read(self, port: int, size: int) -> int:
        off = port - 0x3F8
        if off == 5:
            return 0x60  # LSR: THR empty, transmitter empty, no data ready
        if off == 2:
            return 0x01  # IIR: no interrupt pending
        if off == 6:
            return 0xB0  # MSR: DCD, DSR, CTS
        if off == 0 and not (self.regs[3] & 0x80):
            return 0  # RBR: nothing received
        return self.regs[off]

    def write(self, port: int, size: int, value: int) -> None:
        off = port - 0x3F8
        value &= 0xFF
        if off == 0 and not (self.regs[3] & 0x80):
            if len(self.output) < self.OUTPUT_MAX:
                self.output.append(value)
            else:
                self.dropped += 1
            if value == 0x0A:
                self.flush()
            elif value != 0x0D:
                self.line.append(value)
                if len(self.line) >= self.LINE_MAX:
                    self.flush()
            return
        self.regs[off] = value

    def flush(self) -> None:
        if self.line:
            self.sink(self.line.decode("latin-1"))
            self.line.clear()


def standard_bus(uart_sink: Callable[[str], None]) -> tuple[PortBus, Uart16550]:
    bus = PortBus()
    pit = Pit8254()
    bus.register(0x40, 4, pit)
    bus.register(0x61, 1, pit)
    bus.register(0x70, 2, CmosRtc())
    bus.register(0x80, 1, PostPort())
    uart = Uart16550(uart_sink)
    bus.register(0x3F8, 8, uart)
    return bus, uart
