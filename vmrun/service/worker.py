"""One request of the service, in its own process: ``python -m vmrun.service.worker``.

The daemon writes the request as one JSON object on standard input and reads the reply, one
JSON object, on standard output; the worker's standard error is the daemon's (the journal).
The work itself is the CLI's own code (``vmrun run --json``, ``vmrun load [--crash] …``,
``vmrun unload``, ``vmrun exec``) called in-process, so a service request and the command line
behave the same, and whatever a payload does to this process (a crash, a leak, a hang the
daemon kills) ends here.

Request: ``command`` (run, load, unload, exec); ``payload``/``staged``/``initrd``/``esp`` (paths
as the caller gave them) and ``payload_fd``/``initrd_fd``/``esp_fd`` (descriptors the daemon
passed on, same numbers here); ``crash``, ``cmdline``, ``kdump_append``, ``timeout``,
``memory_cap``, ``host_vars``; ``max_payload_size``; ``caller`` (``{uid, gid, groups}``, or null
for root): for another caller, files named by path are opened with the caller's rights (effective
uid, gid and groups switched for the ``open`` only), and an ESP folder is walked as the caller:
every entry must be readable by it, so a group member cannot have a payload read a file it could
not read itself. Files are handed to the CLI as ``/proc/self/fd/N`` behind a symlink with the
file's own name (the payload's name and ESP path stay what they were).

Reply: ``{"exit_code": N, "output": <the command's JSON or text>, "error": {kind, message} | null}``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import resource
import shutil
import stat
import sys
import tempfile

from vmrun.errors import BadOptionError, InputFileError, VmrunError

MAX_ESP_ENTRIES = 100_000


class TooLargeError(VmrunError):
    exit_code = 15
    kind = "too_large"


@contextlib.contextmanager
def as_caller(caller: dict | None):
    """Effective uid/gid/groups of ``caller`` for the duration (no-op for root / None)."""
    if not caller:
        yield
        return
    groups = os.getgroups()
    os.setgroups(list(caller.get("groups") or [caller["gid"]]))
    os.setegid(caller["gid"])
    os.seteuid(caller["uid"])
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(groups)


def _open(path: str, what: str, caller: dict | None, directory: bool = False) -> int:
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if directory else 0)
    try:
        with as_caller(caller):
            return os.open(path, flags)
    except FileNotFoundError:
        raise InputFileError(f"{what} {path}: no such file or directory") from None
    except NotADirectoryError:
        raise BadOptionError(f"{what} {path}: not a folder") from None
    except PermissionError:
        who = f" by uid {caller['uid']}" if caller else ""
        raise InputFileError(f"{what} {path}: not readable{who}") from None
    except OSError as e:
        raise InputFileError(f"{what} {path}: {e.strerror}") from None


def _check_tree_readable(fd: int, label: str, caller: dict) -> None:
    """Every file and folder under the ESP folder ``fd`` can be opened by ``caller``."""
    count = 0
    with as_caller(caller):
        stack = [(os.dup(fd), label)]
        while stack:
            dfd, where = stack.pop()
            try:
                for entry in os.scandir(dfd):
                    count += 1
                    if count > MAX_ESP_ENTRIES:
                        raise BadOptionError(f"esp {label}: more than {MAX_ESP_ENTRIES} entries")
                    name = f"{where}/{entry.name}"
                    if entry.is_symlink():
                        continue  # the ESP jail refuses symlinks that leave it; inside ones are checked as targets
                    try:
                        child = os.open(entry.name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=dfd)
                    except PermissionError:
                        raise InputFileError(f"esp: {name} is not readable by uid {caller['uid']}") from None
                    except OSError:
                        continue  # device files, FIFOs … are refused by the jail anyway
                    if stat.S_ISDIR(os.fstat(child).st_mode):
                        stack.append((child, name))
                    else:
                        os.close(child)
            finally:
                os.close(dfd)


def _check_size(fd_or_path, what: str, limit: int, directory: bool = False) -> None:
    st = os.stat(fd_or_path)
    if directory:
        if not stat.S_ISDIR(st.st_mode):
            raise BadOptionError(f"{what}: not a folder")
        return
    if not stat.S_ISREG(st.st_mode):
        raise InputFileError(f"{what}: not a regular file")
    if st.st_size > limit:
        raise TooLargeError(f"{what}: {st.st_size} bytes, more than the service's max_payload_size "
                            f"({limit} bytes)")


class Files:
    """The request's files as paths the CLI can open."""

    def __init__(self, req: dict):
        self.req = req
        self.tmp: str | None = None
        self.caller = req.get("caller")

    def _via_fd(self, fd: int, name: str) -> str:
        if self.tmp is None:
            self.tmp = tempfile.mkdtemp(prefix="vmrun-worker-")
        d = pathlib.Path(self.tmp) / str(len(os.listdir(self.tmp)))
        d.mkdir()
        link = d / (pathlib.PurePath(name).name or "file")
        link.symlink_to(f"/proc/self/fd/{fd}")
        return str(link)

    def get(self, key: str, directory: bool = False) -> str | None:
        path, fd = self.req.get(key), self.req.get(f"{key}_fd")
        limit = int(self.req.get("max_payload_size") or (512 << 20))
        what = f"{key} {path}" if path else key
        if fd is None and path is None:
            return None
        if fd is None and not self.caller:
            try:
                _check_size(path, what, limit, directory)
            except FileNotFoundError:
                raise InputFileError(f"{what}: no such file or directory") from None
            except OSError as e:
                raise InputFileError(f"{what}: {e.strerror}") from None
            return path
        if fd is None:
            fd = _open(path, key, self.caller, directory)
        _check_size(fd, what, limit, directory)
        if directory and self.caller:
            _check_tree_readable(fd, path or "esp", self.caller)
        default = {"esp": "esp", "initrd": "initrd"}.get(key, "payload.efi")
        return self._via_fd(fd, path or default)

    def close(self) -> None:
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


def build_argv(req: dict, files: Files) -> tuple[list[str], bool]:
    """The CLI arguments for ``req`` and whether the command prints JSON."""
    from vmrun import loader

    cmd = req["command"]
    head = ["-q"] + (["--json-logs"] if req.get("json_logs") else [])
    crash = ["--crash"] if req.get("crash") else []
    if cmd == "unload":
        return head + ["unload", *crash], False
    if cmd == "exec":
        return head + ["exec"], False
    if cmd not in ("run", "load"):
        raise BadOptionError(f"unknown command {cmd!r}")
    staged = files.get("staged") if cmd == "load" else None
    payload = None if staged else files.get("payload")
    if cmd == "load" and payload and loader.is_staged_file(pathlib.Path(payload)):
        staged, payload = payload, None
    explicit = []
    if req.get("cmdline") is not None:
        explicit += ["--cmdline", req["cmdline"]]
    initrd = files.get("initrd")
    if initrd is not None:
        explicit += ["--initrd", initrd]
    esp = files.get("esp", directory=True)
    if esp is not None:
        explicit += ["--esp", esp]
        if req.get("esp_partuuid") is not None:
            explicit += ["--esp-partuuid", req["esp_partuuid"]]
    if req.get("host_vars"):
        explicit += ["--host-vars"]
    if cmd == "load" and req.get("kdump_append") is not None:
        explicit += ["--kdump-append", req["kdump_append"]]
    if staged is not None:
        # a staged handoff takes no run options: the CLI refuses the ones the caller gave
        return head + ["load", staged, *crash, *explicit], False
    if payload is None:
        raise BadOptionError("no payload: give payload (a path) or payload_fd")
    limits = ["--timeout", repr(float(req["timeout"])), "--memory-cap", str(int(req["memory_cap"]))]
    if cmd == "run":
        return head + ["run", payload, "--json", *limits, *explicit], True
    return head + ["load", payload, "--json", *crash, *limits, *explicit], True


def execute(req: dict) -> dict:
    """Run one request; never raises."""
    files = Files(req)
    out = io.StringIO()
    reply: dict = {"exit_code": 0, "output": None, "error": None}
    try:
        argv, as_json = build_argv(req, files)
        from vmrun.cli import cli
        saved = sys.stdout
        sys.stdout = out
        try:
            cli.main(args=argv, prog_name="vmrun", standalone_mode=False)
        except SystemExit as e:
            reply["exit_code"] = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            sys.stdout = saved
        text = out.getvalue()
        if as_json and text.strip():
            try:
                reply["output"] = json.loads(text)
            except ValueError:
                reply["output"] = text
        else:
            reply["output"] = text
        if as_json and isinstance(reply["output"], dict) and req.get("payload"):
            run = reply["output"].get("run", reply["output"])
            if isinstance(run.get("payload"), dict):
                run["payload"]["path"] = req["payload"]  # not the worker's /proc/self/fd link
    except VmrunError as e:
        reply.update(exit_code=e.exit_code, error={"kind": e.kind, "message": str(e)})
        text = out.getvalue().strip()
        if text:
            try:
                reply["output"] = json.loads(text)
            except ValueError:
                reply["output"] = text
    except Exception as e:  # noqa: BLE001 - the reply says what broke; the daemon lives on
        import click
        if isinstance(e, click.ClickException):
            reply.update(exit_code=2, error={"kind": "usage", "message": e.format_message()})
        else:
            reply.update(exit_code=1, error={"kind": "internal", "message": f"{type(e).__name__}: {e}"})
    finally:
        files.close()
    return reply


def main() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    reply_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # stray writes to fd 1 must not corrupt the reply
    os.close(devnull)
    req = json.loads(sys.stdin.read())
    reply = execute(req)
    data = json.dumps(reply, default=str).encode()
    with os.fdopen(reply_fd, "wb") as f:
        f.write(data)


if __name__ == "__main__":
    main()
