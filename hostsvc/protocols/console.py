"""EFI_SIMPLE_TEXT_OUTPUT_PROTOCOL (ConOut, StdErr) and EFI_SIMPLE_TEXT_INPUT_PROTOCOL (ConIn)
(UEFI 2.10 §12.3, §12.4). Output goes to the run's console log; there are never any keys."""

from __future__ import annotations

import ctypes

import structlog

from hostsvc import guids as G
from hostsvc import status as S
from hostsvc import uefi_types as U
from hostsvc.dispatch import BOOL, PTR, UINTN, efiapi
from hostsvc.events import EVT_NOTIFY_WAIT, TPL_NOTIFY
from hostsvc.status import EfiError

log = structlog.get_logger("hostsvc.console")

MODES = [(80, 25)]
#: the run keeps (and logs) the first this many characters of console output; the rest is
#: counted in ``Firmware.console_dropped`` and the summary says how much was dropped. A single
#: OutputString reads at most 32768 characters (GuestMemory.read_utf16z's bound; longer or
#: unterminated strings are EFI_INVALID_PARAMETER).
MAX_CONSOLE_CHARS = 1 << 20


class TextOutput:
    """One instance serves ConOut and StdErr; the This pointer tells which stream it is."""

    def __init__(self, fw):
        self.fw = fw
        self.mem = fw.mem
        self.streams: dict[int, str] = {}
        self.kept = 0  # characters of output kept so far (both streams)
        self.mode_addr = fw.pool(ctypes.sizeof(U.SIMPLE_TEXT_OUTPUT_MODE))
        self.column = self.row = 0
        self.attribute = 0x07
        self.cursor_visible = True
        self._write_mode()

    def install(self, stream: str) -> tuple[int, int]:
        """Create an interface for ``stream`` on a new handle; returns (handle, interface)."""
        iface = self.fw.interface("SimpleTextOutput", self, U.EFI_SIMPLE_TEXT_OUTPUT_PROTOCOL,
                                  Mode=self.mode_addr)
        self.streams[iface] = stream
        handle = self.fw.handles.install(None, G.SIMPLE_TEXT_OUTPUT, iface)
        return handle, iface

    def _write_mode(self) -> None:
        self.mem.write_struct(self.mode_addr, U.SIMPLE_TEXT_OUTPUT_MODE(
            MaxMode=len(MODES), Mode=0, Attribute=self.attribute, CursorColumn=self.column,
            CursorRow=self.row, CursorVisible=int(self.cursor_visible)))

    def _stream(self, this: int) -> str:
        s = self.streams.get(this)
        if s is None:
            raise EfiError(S.INVALID_PARAMETER, "This is not a text output interface")
        return s

    @efiapi("Reset", ("this", PTR), ("extended_verification", BOOL))
    def reset(self, this, extended_verification):
        self._stream(this)
        self.column = self.row = 0
        self._write_mode()

    @efiapi("OutputString", ("this", PTR), ("string", PTR))
    def output_string(self, this, string):
        text = self.mem.read_utf16z(string)
        stream = self._stream(this)
        room = MAX_CONSOLE_CHARS - self.kept
        if len(text) <= room:
            self.fw.console_write(text, stream)
            self.kept += len(text)
        else:
            if room > 0:
                self.fw.console_write(text[:room], stream)
                self.kept += room
                log.warning("console.truncated", kept_chars=MAX_CONSOLE_CHARS,
                            why="the payload wrote more console output than vmrun keeps; the rest is counted")
            self.fw.console_dropped += len(text) - max(room, 0)
        for ch in text:
            if ch == "\n":
                self.row = min(self.row + 1, MODES[0][1] - 1)
            elif ch == "\r":
                self.column = 0
            else:
                self.column = (self.column + 1) % MODES[0][0]
        self._write_mode()

    @efiapi("TestString", ("this", PTR), ("string", PTR))
    def test_string(self, this, string):
        self._stream(this)
        self.mem.read_utf16z(string)

    @efiapi("QueryMode", ("this", PTR), ("mode_number", UINTN), ("columns", PTR), ("rows", PTR))
    def query_mode(self, this, mode_number, columns, rows):
        self._stream(this)
        if mode_number >= len(MODES):
            raise EfiError(S.UNSUPPORTED, f"mode {mode_number}")
        self.mem.write_u64(columns, MODES[mode_number][0])
        self.mem.write_u64(rows, MODES[mode_number][1])

    @efiapi("SetMode", ("this", PTR), ("mode_number", UINTN))
    def set_mode(self, this, mode_number):
        self._stream(this)
        if mode_number >= len(MODES):
            raise EfiError(S.UNSUPPORTED, f"mode {mode_number}")
        self.column = self.row = 0
        self._write_mode()

    @efiapi("SetAttribute", ("this", PTR), ("attribute", UINTN))
    def set_attribute(self, this, attribute):
        self._stream(this)
        if attribute & ~0x7F:
            raise EfiError(S.UNSUPPORTED, f"attribute {attribute:#x}")
        self.attribute = attribute
        self._write_mode()

    @efiapi("ClearScreen", ("this", PTR))
    def clear_screen(self, this):
        self._stream(this)
        self.column = self.row = 0
        self._write_mode()

    @efiapi("SetCursorPosition", ("this", PTR), ("column", UINTN), ("row", UINTN))
    def set_cursor_position(self, this, column, row):
        self._stream(this)
        cols, rows = MODES[0]
        if column >= cols or row >= rows:
            raise EfiError(S.UNSUPPORTED, f"position {column},{row} outside {cols}x{rows}")
        self.column, self.row = column, row
        self._write_mode()

    @efiapi("EnableCursor", ("this", PTR), ("visible", BOOL))
    def enable_cursor(self, this, visible):
        self._stream(this)
        self.cursor_visible = visible
        self._write_mode()


class TextInput:
    def __init__(self, fw):
        self.fw = fw
        self.interface_addr = 0

    def install(self) -> tuple[int, int]:
        # WaitForKey: a wait event that is never signalled (there is no keyboard)
        self.wait_for_key = self.fw.events.create(EVT_NOTIFY_WAIT, TPL_NOTIFY,
                                                  self.fw.port.sym("rt_unsupported"), 0)
        iface = self.fw.interface("SimpleTextInput", self, U.EFI_SIMPLE_TEXT_INPUT_PROTOCOL,
                                  WaitForKey=self.wait_for_key)
        self.interface_addr = iface
        handle = self.fw.handles.install(None, G.SIMPLE_TEXT_INPUT, iface)
        return handle, iface

    @efiapi("Reset", ("this", PTR), ("extended_verification", BOOL))
    def reset(self, this, extended_verification):
        if this != self.interface_addr:
            raise EfiError(S.INVALID_PARAMETER, "This")

    @efiapi("ReadKeyStroke", ("this", PTR), ("key", PTR))
    def read_key_stroke(self, this, key):
        if this != self.interface_addr:
            raise EfiError(S.INVALID_PARAMETER, "This")
        raise EfiError(S.NOT_READY, "no keys")
