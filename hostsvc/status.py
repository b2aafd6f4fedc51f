"""EFI_STATUS values (UEFI 2.10 Appendix D) and the exception services raise to return one."""

from __future__ import annotations

ERROR_BIT = 1 << 63


def _err(n: int) -> int:
    return ERROR_BIT | n


SUCCESS = 0
LOAD_ERROR = _err(1)
INVALID_PARAMETER = _err(2)
UNSUPPORTED = _err(3)
BAD_BUFFER_SIZE = _err(4)
BUFFER_TOO_SMALL = _err(5)
NOT_READY = _err(6)
DEVICE_ERROR = _err(7)
WRITE_PROTECTED = _err(8)
OUT_OF_RESOURCES = _err(9)
VOLUME_CORRUPTED = _err(10)
VOLUME_FULL = _err(11)
NO_MEDIA = _err(12)
MEDIA_CHANGED = _err(13)
NOT_FOUND = _err(14)
ACCESS_DENIED = _err(15)
NO_RESPONSE = _err(16)
NO_MAPPING = _err(17)
TIMEOUT = _err(18)
NOT_STARTED = _err(19)
ALREADY_STARTED = _err(20)
ABORTED = _err(21)
ICMP_ERROR = _err(22)
TFTP_ERROR = _err(23)
PROTOCOL_ERROR = _err(24)
INCOMPATIBLE_VERSION = _err(25)
SECURITY_VIOLATION = _err(26)
CRC_ERROR = _err(27)
END_OF_MEDIA = _err(28)
END_OF_FILE = _err(31)
INVALID_LANGUAGE = _err(32)
COMPROMISED_DATA = _err(33)
HTTP_ERROR = _err(35)

WARN_UNKNOWN_GLYPH = 1
WARN_DELETE_FAILURE = 2
WARN_WRITE_FAILURE = 3
WARN_BUFFER_TOO_SMALL = 4

NAMES = {v: k for k, v in dict(globals()).items()
         if isinstance(v, int) and k.isupper() and k not in ("ERROR_BIT",)}


def name(status: int) -> str:
    return NAMES.get(status, f"{status:#x}")


class EfiError(Exception):
    """Raised by a service (or anything it calls) to return a failing EFI_STATUS."""

    def __init__(self, status: int, why: str = ""):
        super().__init__(f"{name(status)}{': ' + why if why else ''}")
        self.status = status
        self.why = why
