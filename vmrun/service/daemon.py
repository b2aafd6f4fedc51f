"""``vmrun daemon``: serve io.vmrun.Manager on a Unix socket (asyncvarlink).

Socket: the one systemd passes (LISTEN_FDS, ``FileDescriptorName=io.vmrun.Manager`` or a
single unnamed one), else ``--socket PATH`` bound here (folder 0755, socket 0666: access is
decided per call from the peer's credentials, not by file modes).

Connections: our own accept loop builds each asyncvarlink ``VarlinkTransport`` so that the
connection's SO_PEERCRED/SO_PEERGROUPS are read once, at accept time, and every connection
gets its own ``Manager`` bound to that caller. At most ``max_connections`` at once; a message
larger than ``max_message_size`` or that is not JSON closes that connection (nothing else is
affected); unknown methods and ill-typed parameters get asyncvarlink's
org.varlink.service errors.

Work: three lanes, ``run`` (Run), ``normal`` and ``crash`` (Load/Unload/Exec by slot), one
request running in each; up to ``max_queue`` requests wait (all lanes together), beyond that
the caller gets Busy at once. Each request runs in a worker process (vmrun/service/worker.py,
its own session) which the daemon kills at timeout + WORKER_MARGIN_S seconds, when its
resident memory exceeds memory_cap + RSS_MARGIN, or when a Run's client goes away (checked
every POLL_S). A worker that dies or is killed is an InternalError for that caller only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import signal
import socket
import stat
import sys
import time

import structlog
from asyncvarlink import VarlinkInterfaceRegistry, VarlinkInterfaceServerProtocol, VarlinkTransport, get_listen_fd
from asyncvarlink.serviceinterface import VarlinkServiceInterface

from vmrun.errors import OUTCOME_EXIT_CODES
from vmrun.service import creds
from vmrun.service import interface as I
from vmrun.service.config import Config

log = structlog.get_logger("vmrun.service")

DEFAULT_SOCKET = "/run/vmrun/io.vmrun.Manager"
FD_NAME = "io.vmrun.Manager"
WORKER_MARGIN_S = 60.0          # staging, kexec_load and reading the files, beyond the run's timeout
RSS_MARGIN = 1 << 30            # the worker's own memory beyond the guest's memory_cap
POLL_S = 0.2
LANES = ("run", "normal", "crash")


class Connection:
    """One client connection: its socket and the caller's credentials."""

    def __init__(self, sock: socket.socket, peer: creds.Peer):
        self.sock = sock
        self.peer = peer
        self.closed = False

    def gone(self) -> bool:
        """The client closed its end (it may not read our reply any more)."""
        if self.closed:
            return True
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True


class _Transport(VarlinkTransport):
    MAX_RECV_FDS = 16  # Run/Load take three descriptors at most


class _Protocol(VarlinkInterfaceServerProtocol):
    """asyncvarlink's server protocol with a message size limit and no tolerance for non-JSON."""

    def __init__(self, registry: VarlinkInterfaceRegistry, conn: Connection, max_message: int):
        super().__init__(registry)
        self._conn = conn
        self._max = max_message
        self._pending = 0  # bytes of the message not yet terminated by NUL

    def message_received(self, data, fds) -> None:
        parts = data.split(b"\0")
        sizes = [self._pending + len(parts[0])] + [len(p) for p in parts[1:]]
        self._pending = sizes[-1]
        if max(sizes) > self._max:
            log.warning("request.too_large", limit=self._max, **self._conn.peer.describe())
            if fds:
                fds.close()
            self.close()
            return
        super().message_received(data, fds)

    def error_received(self, err, data, fds) -> None:
        log.warning("request.malformed", error=str(err), **self._conn.peer.describe())
        self.close()

    def connection_lost(self, exc) -> None:
        self._conn.closed = True
        super().connection_lost(exc)


class ServiceError(Exception):
    pass


def _error(cls, exit_code: int, message: str, **extra):
    return cls(message=message, exit_code=exit_code, **extra)


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class Service:
    """Daemon-wide state: configuration, lanes, queue, worker processes."""

    def __init__(self, config: Config, *, worker_argv: list[str] | None = None, json_logs: bool = False):
        self.config = config
        self.worker_argv = worker_argv or [sys.executable, "-m", "vmrun.service.worker"]
        self.json_logs = json_logs
        self.lanes = {name: asyncio.Lock() for name in LANES}
        self.waiting = 0
        self.active = 0
        self.procs: set[asyncio.subprocess.Process] = set()
        self.last_activity = time.monotonic()
        self.stopping = False

    # ---- the calls -------------------------------------------------------------------------
    async def call(self, conn: Connection, method: str, params: dict):
        peer = conn.peer
        shown = {k: v for k, v in params.items() if v is not None and not k.endswith("_fd")}
        shown.update({k: "fd" for k, v in params.items() if k.endswith("_fd") and v is not None})
        blog = log.bind(method=method, **peer.describe())
        if not creds.may_call(peer, method, self.config.allow_gid):
            why = creds.why_denied(peer, method, self.config.allow_group)
            blog.warning("request.denied", why=why, **shown)
            raise I.permission_denied(why)
        blog.info("request", **shown)
        t0 = time.monotonic()
        self.active += 1
        try:
            if method == "Status":
                from vmrun import loader
                st = await asyncio.to_thread(loader.status)
                blog.info("reply", outcome="ok", seconds=round(time.monotonic() - t0, 3))
                return {"normal": st["normal"], "crash": st["crash"]}
            req = self._request(method, params, peer)
            lane = "run" if method == "Run" else ("crash" if params.get("crash") else "normal")
            reply = await self._in_lane(lane, conn, req, blog)
            return await self._answer(method, req, reply, blog, t0)
        finally:
            self.active -= 1
            self.last_activity = time.monotonic()

    def _request(self, method: str, p: dict, peer: creds.Peer) -> dict:
        cfg = self.config
        req = {"command": method.lower(), "json_logs": self.json_logs,
               "max_payload_size": cfg.max_payload_size,
               "caller": None if peer.is_root else {"uid": peer.uid, "gid": peer.gid,
                                                    "groups": sorted({peer.gid, *peer.groups})}}
        if method in ("Unload", "Exec"):
            req["crash"] = bool(p.get("crash"))
            return req
        timeout = p.get("timeout")
        if timeout is None:
            timeout = cfg.default_timeout
        elif not timeout > 0:
            raise _error(I.BadInput, 15, f"timeout {timeout!r}: must be positive")
        elif timeout > cfg.max_timeout:
            raise _error(I.BadInput, 15, f"timeout {timeout:g} s is more than the service's max_timeout "
                                         f"({cfg.max_timeout:g} s)")
        cap = p.get("memory_cap")
        if cap is None:
            cap = cfg.default_memory_cap
        elif cap <= 0:
            raise _error(I.BadInput, 15, f"memory_cap {cap}: must be positive")
        elif cap > cfg.max_memory_cap:
            raise _error(I.BadInput, 15, f"memory_cap {cap} bytes is more than the service's max_memory_cap "
                                         f"({cfg.max_memory_cap} bytes)")
        if p.get("payload") is None and p.get("payload_fd") is None and p.get("staged") is None:
            raise _error(I.BadInput, 10, "no payload: give payload (a path), payload_fd or staged")
        if method == "Load" and p.get("staged") is not None and (p.get("payload") or p.get("payload_fd")):
            raise _error(I.BadInput, 15, "give either payload or staged, not both")
        for key in ("payload", "staged", "initrd"):
            fd = p.get(f"{key}_fd")
            if fd is not None:
                st = os.fstat(fd.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise _error(I.BadInput, 10, f"{key}_fd: not a regular file")
                if st.st_size > cfg.max_payload_size:
                    raise _error(I.TooLarge, 15, f"{key}_fd: {st.st_size} bytes, more than the service's "
                                                 f"max_payload_size ({cfg.max_payload_size} bytes)")
        if p.get("esp_fd") is not None and not stat.S_ISDIR(os.fstat(p["esp_fd"].fileno()).st_mode):
            raise _error(I.BadInput, 15, "esp_fd: not a folder")
        for key in ("payload", "staged", "initrd", "esp", "esp_partuuid", "cmdline", "kdump_append",
                    "host_vars", "crash"):
            if p.get(key) is not None:
                req[key] = p[key]
        for key in ("payload_fd", "initrd_fd", "esp_fd"):
            if p.get(key) is not None:
                req[key] = p[key].fileno()
        req["timeout"], req["memory_cap"] = float(timeout), int(cap)
        return req

    async def _in_lane(self, lane: str, conn: Connection, req: dict, blog) -> dict | None:
        lock = self.lanes[lane]
        if lock.locked():
            if self.waiting >= self.config.max_queue:
                blog.warning("reply", outcome="busy", lane=lane, waiting=self.waiting)
                raise _error(I.Busy, I.EXIT_BUSY, f"busy: the {lane} lane is taken and {self.waiting} "
                                                  f"request(s) wait (max_queue {self.config.max_queue})")
            self.waiting += 1
            try:
                await lock.acquire()
            finally:
                self.waiting -= 1
        else:
            await lock.acquire()
        try:
            if self.stopping:
                raise _error(I.InternalError, 1, "the service is stopping")
            if conn.gone() and req["command"] == "run":
                blog.info("reply", outcome="cancelled", why="the client went away while queued")
                return None
            return await self._work(conn, req, blog)
        finally:
            lock.release()

    async def _work(self, conn: Connection, req: dict, blog) -> dict | None:
        fds = [req[k] for k in ("payload_fd", "initrd_fd", "esp_fd") if req.get(k) is not None]
        env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
        proc = await asyncio.create_subprocess_exec(
            *self.worker_argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            pass_fds=fds, start_new_session=True, env=env)
        self.procs.add(proc)
        comm = asyncio.ensure_future(proc.communicate(json.dumps(req).encode()))
        deadline = time.monotonic() + req.get("timeout", 60.0) + WORKER_MARGIN_S
        rss_limit = req.get("memory_cap", 0) + RSS_MARGIN
        killed = None
        try:
            while True:
                done, _ = await asyncio.wait({comm}, timeout=POLL_S)
                if done:
                    break
                if req["command"] == "run" and conn.gone():
                    killed = "cancelled"
                elif time.monotonic() > deadline:
                    killed = f"ran past its time limit ({req.get('timeout', 60.0):g} s + {WORKER_MARGIN_S:g} s)"
                elif req["command"] in ("run", "load") and _rss(proc.pid) > rss_limit:
                    killed = f"used more than {rss_limit} bytes of memory (memory_cap + {RSS_MARGIN})"
                if killed:
                    _kill(proc)
                    await comm
                    break
        except asyncio.CancelledError:
            _kill(proc)
            raise
        finally:
            if proc.returncode is None:
                _kill(proc)
                with contextlib.suppress(Exception):
                    await proc.wait()
            self.procs.discard(proc)
        if self.stopping:
            raise _error(I.InternalError, 1, "the service stopped before the request finished")
        if killed == "cancelled":
            blog.info("reply", outcome="cancelled", why="the client went away", worker=proc.pid)
            return None
        if killed:
            raise _error(I.InternalError, 1, f"the worker process {killed}; it was killed")
        out, _ = comm.result()
        if proc.returncode != 0 or not out:
            how = (f"was killed by signal {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
                   else f"exited with status {proc.returncode}")
            raise _error(I.InternalError, 1, f"the worker process {how} without a reply")
        try:
            return json.loads(out)
        except ValueError:
            raise _error(I.InternalError, 1, "the worker process sent an unreadable reply") from None

    async def _answer(self, method: str, req: dict, reply: dict | None, blog, t0: float):
        seconds = round(time.monotonic() - t0, 3)
        if reply is None:  # cancelled: nobody is listening
            raise _error(I.InternalError, 1, "cancelled: the client went away")
        code, out, err = reply["exit_code"], reply.get("output"), reply.get("error") or {}
        run = out.get("run", out) if isinstance(out, dict) else None
        payload = (run or {}).get("payload") or {}
        fields = dict(payload=req.get("payload") or req.get("staged"), sha256=payload.get("sha256"),
                      outcome=(run or {}).get("outcome"), exit_code=code, seconds=seconds)
        outcome_codes = set(OUTCOME_EXIT_CODES.values())
        if method == "Run" and isinstance(run, dict) and (code == 0 or (code in outcome_codes and not err)):
            blog.info("reply", **fields)
            return run
        if code == 0:
            if method == "Load":
                from vmrun import loader
                slot = "crash" if req.get("crash") else "normal"
                st = (await asyncio.to_thread(loader.status))[slot]
                rec = st.get("record") or {}
                fields["sha256"] = fields["sha256"] or (rec.get("payload") or {}).get("sha256")
                blog.info("reply", slot=slot, **fields)
                return {"slot": slot, "status": st}
            blog.info("reply", **fields)
            return None
        message = err.get("message") or ((run or {}).get("error") or {}).get("message") or f"exit status {code}"
        blog.warning("reply", error=message, kind=err.get("kind"), **fields)
        if code in outcome_codes and run:
            raise _error(I.RunFailed, code, f"{run.get('outcome')}: {message}", outcome=run.get("outcome"),
                         result=run)
        if err.get("kind") == "too_large":
            raise _error(I.TooLarge, code, message)
        if 10 <= code <= 15 or code == 2:
            raise _error(I.BadInput, code, message)
        if 40 <= code <= 52:
            raise _error(I.KexecFailed, code, message)
        raise _error(I.InternalError, code, message)

    def kill_all(self) -> None:
        for proc in list(self.procs):
            _kill(proc)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("vmrun")
    except PackageNotFoundError:
        return "0"


def _kill(proc) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()


class Server:
    """The accept loop and the connections."""

    def __init__(self, service: Service, sock: socket.socket, *, exit_idle: float | None = None):
        self.service = service
        self.sock = sock
        self.exit_idle = exit_idle
        self.conns: set[Connection] = set()
        self.stopped: asyncio.Future | None = None

    def _registry(self, conn: Connection) -> VarlinkInterfaceRegistry:
        reg = VarlinkInterfaceRegistry()
        reg.register_interface(VarlinkServiceInterface("vmrun", "vmrun", _version(), "https://github.com/vmrun/vmrun", reg))
        reg.register_interface(I.Manager(self.service, conn))
        return reg

    def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.error("accept.failed", error=str(e))
                return
            if len(self.conns) >= self.service.config.max_connections:
                log.warning("connection.refused", why="max_connections",
                            limit=self.service.config.max_connections)
                sock.close()
                continue
            sock.setblocking(False)
            try:
                peer = creds.peer_of(sock)
            except OSError as e:
                log.warning("connection.refused", why=f"no peer credentials: {e}")
                sock.close()
                continue
            conn = Connection(sock, peer)
            proto = _Protocol(self._registry(conn), conn, self.service.config.max_message_size)
            transport = _Transport(loop, sock, sock, proto, {"peercred": peer})
            self.conns.add(conn)
            self.service.last_activity = time.monotonic()

            def lost(_fut, conn=conn):
                conn.closed = True
                self.conns.discard(conn)
                self.service.last_activity = time.monotonic()
            transport.closed_future.add_done_callback(lost)
            log.debug("connection", **peer.describe())

    async def serve(self, *, signals: bool = True) -> None:
        loop = asyncio.get_running_loop()
        self.stopped = loop.create_future()
        self.sock.setblocking(False)
        loop.add_reader(self.sock.fileno(), self._accept)
        if signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop, sig.name)
        idle = asyncio.ensure_future(self._idle_watch()) if self.exit_idle else None
        try:
            await self.stopped
        finally:
            loop.remove_reader(self.sock.fileno())
            if idle:
                idle.cancel()
            # end the work in flight so that every call completes (with an error) before the loop
            # goes away: asyncvarlink expects its call futures to finish, not to be cancelled
            self.service.stopping = True
            self.service.kill_all()
            end = loop.time() + 10
            while self.service.active and loop.time() < end:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.1)  # let the error replies go out

    def stop(self, why: str = "stop") -> None:
        if self.stopped is not None and not self.stopped.done():
            log.info("daemon.stop", why=why)
            self.stopped.set_result(None)

    async def _idle_watch(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.exit_idle))
            s = self.service
            if not self.conns and not s.active and time.monotonic() - s.last_activity >= self.exit_idle:
                self.stop(f"idle for {self.exit_idle:g} s")
                return


def listen_socket(path: str | None) -> tuple[socket.socket, str | None]:
    """(listening socket, path to unlink at exit or None): systemd's, else bound at ``path``."""
    fd = get_listen_fd(FD_NAME)
    if fd is None and os.environ.get("LISTEN_FDS") == "1" and os.environ.get("LISTEN_PID") == str(os.getpid()):
        fd = 3  # one socket, named otherwise (systemd-socket-activate without --fdname)
    if fd is not None:
        for k in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            os.environ.pop(k, None)
        if not isinstance(fd, int):
            fd.should_close = False  # the socket object below owns it
            fd = fd.fileno()
        sock = socket.socket(fileno=fd)
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise OSError("the socket systemd passed is not a Unix stream socket")
        return sock, None
    p = pathlib.Path(path or DEFAULT_SOCKET)
    p.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    if p.is_socket():
        p.unlink()  # a previous instance's; a live one would be refused by systemd, not by us
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.bind(str(p))
    os.chmod(p, 0o666)
    sock.listen(64)
    return sock, str(p)


def under_systemd() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))


def configure_logging(json_logs: bool | None, verbose: int = 0) -> bool:
    """structlog for the daemon: JSON lines on stderr under systemd (journald stores them; with
    python3-systemd importable, records go to the journal with their fields instead), the
    console format otherwise. Returns whether JSON is used (the workers log the same way)."""
    import logging

    from vmrun import logs
    use_json = under_systemd() if json_logs is None else json_logs
    logs.configure(json_logs=use_json, verbose=verbose)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)  # asyncvarlink's own warnings
    if use_json and under_systemd():
        try:
            from systemd import journal  # type: ignore[import-not-found]  # optional
        except ImportError:
            return use_json
        level_map = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}

        def to_journal(_logger, _name, ev: dict):
            fields = {f"VMRUN_{k.upper()}": json.dumps(v) if not isinstance(v, str) else v
                      for k, v in ev.items() if k not in ("event", "level", "timestamp")}
            msg = ev.get("event", "") + " " + " ".join(f"{k}={v}" for k, v in ev.items()
                                                         if k not in ("event", "level", "timestamp"))
            journal.send(msg, PRIORITY=level_map.get(ev.get("level", "info"), 6),
                         SYSLOG_IDENTIFIER="vmrun", **fields)
            raise structlog.DropEvent
        cfg = structlog.get_config()
        structlog.configure(processors=[*cfg["processors"][:-2], to_journal])
    return use_json


def run_daemon(config: Config, socket_path: str | None, *, exit_idle: float | None = None,
               json_logs: bool | None = None, verbose: int = 0) -> None:
    use_json = configure_logging(json_logs, verbose)
    sock, unlink = listen_socket(socket_path)

    async def main():
        service = Service(config, json_logs=use_json)
        server = Server(service, sock, exit_idle=exit_idle)
        log.info("daemon.start", socket=unlink or "socket-activated", config=config.source,
                 allow_group=config.allow_group, max_queue=config.max_queue, max_timeout=config.max_timeout,
                 max_memory_cap=config.max_memory_cap, max_payload_size=config.max_payload_size)
        await server.serve()

    try:
        asyncio.run(main())
    finally:
        sock.close()
        if unlink:
            with contextlib.suppress(OSError):
                os.unlink(unlink)
