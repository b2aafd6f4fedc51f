"""The Varlink interface ``io.vmrun.Manager``, described by the annotations of its methods
(asyncvarlink renders ``org.varlink.service.GetInterfaceDescription`` from them and from the
docstrings below, which are the interface's documentation).

One ``Manager`` exists per client connection: it knows the caller (``Connection.peer``) and
hands the work to the daemon-wide ``Service`` (vmrun/service/daemon.py).
"""


import typing

from asyncvarlink import FileDescriptor, TypedVarlinkErrorReply, VarlinkInterface, varlinkmethod
from asyncvarlink.error import GenericVarlinkErrorReply

NAME = "io.vmrun.Manager"


class BadInput(TypedVarlinkErrorReply, interface=NAME):
    """A file or a parameter is unusable: exit_code as vmrun's (10 missing or unreadable, 11 not
    PE/COFF, 12 another architecture, 13 malformed, 14 not an EFI application, 15 unusable
    value, e.g. a timeout or memory_cap above the service's maxima)."""

    class Parameters:
        message: str
        exit_code: int


class RunFailed(TypedVarlinkErrorReply, interface=NAME):
    """Load: the payload did not reach ExitBootServices (outcome fault, timeout, memory_cap,
    payload_returned, reset or halted; exit_code 20-25); result is what Run would have returned."""

    class Parameters:
        message: str
        exit_code: int
        outcome: str
        result: typing.Any


class KexecFailed(TypedVarlinkErrorReply, interface=NAME):
    """Staging or kexec refused it: exit_code 40 (cannot be staged), 41 (stray writes), 50
    (kexec_load/reboot refused, no crash kernel reservation), 51 (staged for another machine),
    52 (the crash kernel reservation is too small)."""

    class Parameters:
        message: str
        exit_code: int


class Busy(TypedVarlinkErrorReply, interface=NAME):
    """The request's lane is taken and max_queue requests already wait: try again later."""

    class Parameters:
        message: str
        exit_code: int


class TooLarge(TypedVarlinkErrorReply, interface=NAME):
    """The payload, initrd or staged file is larger than the service's max_payload_size."""

    class Parameters:
        message: str
        exit_code: int


class InternalError(TypedVarlinkErrorReply, interface=NAME):
    """vmrun failed (exit_code 1, 30 or 31 as on the command line), or the request's worker
    process died, ran out of time or memory; the service itself carries on."""

    class Parameters:
        message: str
        exit_code: int


# exit codes of the service-only errors (the command line has no equivalent)
EXIT_BUSY = 75          # EX_TEMPFAIL
EXIT_DENIED = 77        # EX_NOPERM


def permission_denied(message: str) -> GenericVarlinkErrorReply:
    """org.varlink.service.PermissionDenied, with the same message/exit_code pair as the others."""
    return GenericVarlinkErrorReply("org.varlink.service.PermissionDenied",
                                    {"message": message, "exit_code": EXIT_DENIED})


class _LoadResult(typing.TypedDict):
    slot: str
    status: typing.Any


class _StatusResult(typing.TypedDict):
    normal: typing.Any
    crash: typing.Any


class Manager(VarlinkInterface, name=NAME):
    """vmrun: run a PE kernel or UKI in a KVM micro-VM up to ExitBootServices and hand it to kexec.
    Files are paths the service opens (for a caller other than root, with the caller's rights)
    or descriptors passed with the call (payload_fd, initrd_fd, esp_fd; then payload is only
    the file's name). timeout (seconds) and memory_cap (bytes) default to 60 s and 2 GiB, at
    most the service's max_timeout and max_memory_cap; more is refused (BadInput, 15).
    Callers: root may call every method, members of the configured allow_group Status and Run,
    others get org.varlink.service.PermissionDenied."""

    errors = (BadInput, RunFailed, KexecFailed, Busy, TooLarge, InternalError)

    def __init__(self, service, conn):
        self._service = service
        self._conn = conn

    @varlinkmethod(return_parameter="result", allow_foreign=True)
    async def Run(self, *, payload: str, payload_fd: FileDescriptor | None = None,
                  initrd: str | None = None, initrd_fd: FileDescriptor | None = None,
                  esp: str | None = None, esp_fd: FileDescriptor | None = None,
                  esp_partuuid: str | None = None,
                  cmdline: str | None = None, timeout: float | None = None,
                  memory_cap: int | None = None, host_vars: bool | None = None) -> typing.Any:
        """Run the payload to ExitBootServices (like vmrun run --json) and return that object.
        An outcome other than exit_boot_services is a normal reply: result.outcome and
        result.error say what the payload did."""
        return await self._service.call(self._conn, "Run", dict(
            payload=payload, payload_fd=payload_fd, initrd=initrd, initrd_fd=initrd_fd, esp=esp,
            esp_fd=esp_fd, esp_partuuid=esp_partuuid, cmdline=cmdline, timeout=timeout,
            memory_cap=memory_cap, host_vars=host_vars))

    @varlinkmethod(allow_foreign=True)
    async def Load(self, *, payload: str | None = None, payload_fd: FileDescriptor | None = None,
                   staged: str | None = None, crash: bool | None = None,
                   initrd: str | None = None, initrd_fd: FileDescriptor | None = None,
                   esp: str | None = None, esp_fd: FileDescriptor | None = None,
                   esp_partuuid: str | None = None,
                   cmdline: str | None = None, kdump_append: str | None = None,
                   timeout: float | None = None, memory_cap: int | None = None,
                   host_vars: bool | None = None) -> _LoadResult:
        """Load a payload for this machine (run it, stage it in memory, kexec_load it), or a
        file written by vmrun stage (staged, or a payload that is one), into the normal slot
        or, with crash, the crash (kdump) slot; like vmrun load [--crash]. Returns the slot
        ("normal" or "crash") and what Status shows for it. Root only."""
        return await self._service.call(self._conn, "Load", dict(
            payload=payload, payload_fd=payload_fd, staged=staged, crash=crash, initrd=initrd,
            initrd_fd=initrd_fd, esp=esp, esp_fd=esp_fd, esp_partuuid=esp_partuuid, cmdline=cmdline,
            kdump_append=kdump_append,
            timeout=timeout, memory_cap=memory_cap, host_vars=host_vars))

    @varlinkmethod
    async def Unload(self, *, crash: bool | None = None) -> None:
        """Unload the normal slot (or, with crash, the crash kernel). Root only."""
        await self._service.call(self._conn, "Unload", dict(crash=crash))

    @varlinkmethod
    async def Exec(self) -> None:
        """Reboot into the loaded kernel at once, like vmrun exec / kexec -e: no orderly
        shutdown, and no reply when it works. systemctl kexec is the orderly way. Root only."""
        await self._service.call(self._conn, "Exec", {})

    @varlinkmethod(allow_foreign=True)
    async def Status(self) -> _StatusResult:
        """What is loaded in the normal and the crash slot, as vmrun status --json shows it:
        loaded, by_vmrun, stale, and the record (payload, sha256, options, since when, command
        line, PCR values the next kernel will see, kdump details)."""
        return await self._service.call(self._conn, "Status", {})
