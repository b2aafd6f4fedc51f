"""Errors that end a vmrun command, each with its own exit code.

The CLI prints ``error: <message>`` on one line and exits with ``exit_code``; nothing below
the CLI prints tracebacks for these. The table is documented in README.md ("Exit codes").
"""

from __future__ import annotations


class VmrunError(Exception):
    """Base class: a failure with a one-line message and a distinct exit code."""

    exit_code = 1
    kind = "error"

    def __init__(self, message: str, **details):
        super().__init__(message)
        self.message = message
        self.details = details

    def __str__(self) -> str:
        return self.message


# --- bad input -------------------------------------------------------------------------------
class InputFileError(VmrunError):
    """The input file is missing or unreadable."""
    exit_code = 10
    kind = "input_missing"


class NotPEError(VmrunError):
    """The input is not a PE/COFF image."""
    exit_code = 11
    kind = "not_pe"


class WrongArchitectureError(VmrunError):
    """The PE image is for a machine other than x86_64."""
    exit_code = 12
    kind = "wrong_architecture"


class MalformedImageError(VmrunError):
    """The PE image is truncated or internally inconsistent."""
    exit_code = 13
    kind = "malformed_image"


class UnsupportedSubsystemError(VmrunError):
    """The PE image is not an EFI application (or otherwise cannot be started)."""
    exit_code = 14
    kind = "unsupported_subsystem"


class BadOptionError(VmrunError):
    """A command-line option's value is unusable (a memory map that does not parse, …)."""
    exit_code = 15
    kind = "bad_option"


# --- run outcomes that are failures ------------------------------------------------------------
class PayloadFault(VmrunError):
    """The payload did something vmrun cannot or will not emulate."""
    exit_code = 20
    kind = "fault"


class RunTimeout(VmrunError):
    """The wall-clock limit of a run expired."""
    exit_code = 21
    kind = "timeout"


class MemoryCapExceeded(VmrunError):
    """The payload asked for more guest memory than the run's cap."""
    exit_code = 22
    kind = "memory_cap"


class PayloadReturned(VmrunError):
    """The payload's entry point returned instead of calling ExitBootServices."""
    exit_code = 23
    kind = "payload_returned"


# --- host problems -----------------------------------------------------------------------------
class KvmError(VmrunError):
    """/dev/kvm is missing, refused an ioctl, or behaved unexpectedly."""
    exit_code = 30
    kind = "kvm"


class GuestMemoryError(VmrunError):
    """An access to a guest-physical address that is not backed."""
    exit_code = 31
    kind = "guest_memory"

    def __init__(self, gpa: int, size: int, what: str = "access"):
        super().__init__(f"guest {what} of {size} bytes at {gpa:#x} is outside guest memory",
                         gpa=gpa, size=size)
        self.gpa = gpa
        self.size = size


class PayloadReset(VmrunError):
    """The payload called ResetSystem instead of ExitBootServices."""
    exit_code = 24
    kind = "reset"


class PayloadHalted(VmrunError):
    """The payload halted the vCPU for good: ``hlt`` with interrupts disabled, which nothing
    can ever resume."""
    exit_code = 25
    kind = "halted"


# outcome of a run → the exit code of `vmrun run`
OUTCOME_EXIT_CODES = {
    "exit_boot_services": 0,
    "fault": PayloadFault.exit_code,
    "timeout": RunTimeout.exit_code,
    "memory_cap": MemoryCapExceeded.exit_code,
    "payload_returned": PayloadReturned.exit_code,
    "reset": PayloadReset.exit_code,
    "halted": PayloadHalted.exit_code,
}
