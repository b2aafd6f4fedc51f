"""The service's configuration: ``/etc/vmrun/vmrun.conf`` (TOML), every key optional.

    allow_group       = "vmrun"     # group (name or gid) whose members may call Status and Run
    max_queue         = 4           # requests waiting for a lane beyond the running ones; more: Busy
    max_timeout       = 300         # seconds: a request asking for more is refused (BadInput)
    max_memory_cap    = "4G"        # bytes or a size: a request asking for more is refused
    max_payload_size  = "512M"      # payload and initrd files larger than this: TooLarge
    max_connections   = 64          # simultaneous client connections (more are closed at once)
    max_message_size  = "1M"        # one Varlink message from a client; larger: connection closed

A missing file means the defaults; a file that does not parse, an unknown key or a value of the
wrong type is a ``BadOptionError`` (exit 15) naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import grp
import pathlib
import tomllib

from vmrun.errors import BadOptionError

DEFAULT_PATH = pathlib.Path("/etc/vmrun/vmrun.conf")
DEFAULT_TIMEOUT = 60.0            # a request without timeout gets min(this, max_timeout)
DEFAULT_MEMORY_CAP = 2 << 30      # … without memory_cap: min(this, max_memory_cap)

_SUFFIX = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(value, what: str) -> int:
    """An int (bytes) or a string such as ``512M``, ``4G``, ``1MiB``."""
    if isinstance(value, bool):
        raise BadOptionError(f"{what}: expected a size, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        t = value.strip().lower().removesuffix("ib").removesuffix("b")
        mult = 1
        if t and t[-1] in _SUFFIX:
            mult, t = _SUFFIX[t[-1]], t[:-1]
        try:
            n = int(float(t) * mult)
        except ValueError:
            raise BadOptionError(f"{what}: {value!r} is not a size like 512M or 4G") from None
    else:
        raise BadOptionError(f"{what}: expected a size, got {type(value).__name__}")
    if n <= 0:
        raise BadOptionError(f"{what}: {value!r} must be positive")
    return n


@dataclasses.dataclass(frozen=True)
class Config:
    allow_group: str | None = None
    allow_gid: int | None = None
    max_queue: int = 4
    max_timeout: float = 300.0
    max_memory_cap: int = 4 << 30
    max_payload_size: int = 512 << 20
    max_connections: int = 64
    max_message_size: int = 1 << 20
    source: str = "defaults"

    @property
    def default_timeout(self) -> float:
        return min(DEFAULT_TIMEOUT, self.max_timeout)

    @property
    def default_memory_cap(self) -> int:
        return min(DEFAULT_MEMORY_CAP, self.max_memory_cap)


def _resolve_group(value, where: str) -> tuple[str, int]:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise BadOptionError(f"{where}: allow_group: expected a group name or gid")
    try:
        g = grp.getgrgid(value) if isinstance(value, int) else (
            grp.getgrgid(int(value)) if value.isdigit() else grp.getgrnam(value))
        return g.gr_name, g.gr_gid
    except KeyError:
        if isinstance(value, int) or value.isdigit():
            return str(value), int(value)  # a gid without a name still works
        raise BadOptionError(f"{where}: allow_group: no group named {value!r} on this machine") from None


def parse_config(text: str, where: str = "vmrun.conf") -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise BadOptionError(f"{where}: not valid TOML: {e}") from None
    known = {f.name for f in dataclasses.fields(Config)} - {"allow_gid", "source"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise BadOptionError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    kw: dict = {"source": where}
    if "allow_group" in raw:
        kw["allow_group"], kw["allow_gid"] = _resolve_group(raw["allow_group"], where)
    for key in ("max_queue", "max_connections"):
        if key in raw:
            v = raw[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "max_queue" else 1):
                raise BadOptionError(f"{where}: {key}: expected a whole number "
                                     f"{'>= 0' if key == 'max_queue' else '>= 1'}, got {v!r}")
            kw[key] = v
    if "max_timeout" in raw:
        v = raw["max_timeout"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise BadOptionError(f"{where}: max_timeout: expected seconds > 0, got {v!r}")
        kw["max_timeout"] = float(v)
    for key in ("max_memory_cap", "max_payload_size", "max_message_size"):
        if key in raw:
            kw[key] = parse_size(raw[key], f"{where}: {key}")
    return Config(**kw)


def load_config(path: str | pathlib.Path | None = None) -> Config:
    """``path`` (default /etc/vmrun/vmrun.conf); missing = defaults, unless a path was given."""
    p = pathlib.Path(path) if path is not None else DEFAULT_PATH
    try:
        text = p.read_text()
    except FileNotFoundError:
        if path is not None:
            raise BadOptionError(f"--config {p}: no such file") from None
        return Config()
    except (OSError, UnicodeDecodeError) as e:
        raise BadOptionError(f"{p}: cannot read: {e}") from None
    return parse_config(text, str(p))
