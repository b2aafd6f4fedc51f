"""vmrun daemon's pieces without KVM: the interface description, the credential policy, the
configuration, malformed messages, the queue (Busy), a dying worker and a client that goes away.

The server runs in a thread on a real Unix socket, with asyncvarlink; "workers" are real
processes (small Python scripts standing in for vmrun.service.worker where a test needs a
worker that sleeps or dies)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import sys
import threading
import time

import pytest

from vmrun.errors import BadOptionError
from vmrun.service import client, creds
from vmrun.service.config import Config, load_config, parse_config
from vmrun.service.daemon import Server, Service


# ---- a server in a thread ----------------------------------------------------------------------
class Running:
    def __init__(self, tmp_path, config=Config(), worker_argv=None):
        self.path = str(tmp_path / "s")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(16)
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.config, self.worker_argv = config, worker_argv
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self):
        asyncio.set_event_loop(self.loop)

        async def main():
            self.service = Service(self.config, worker_argv=self.worker_argv)
            self.server = Server(self.service, self.sock)
            self.loop.call_soon(self.ready.set)
            await self.server.serve(signals=False)
        self.loop.run_until_complete(main())

    def call(self, method, params=None, **kw):
        return client.call(method, params or {}, socket=self.path, timeout=kw.pop("timeout", 30), **kw)

    def stop(self):
        self.loop.call_soon_threadsafe(self.server.stop)
        self.thread.join(10)
        self.sock.close()


@pytest.fixture
def server(tmp_path):
    s = Running(tmp_path)
    yield s
    s.stop()


def fake_worker(tmp_path, body: str) -> list[str]:
    """A worker stand-in: reads the request, then runs ``body`` (with ``req`` and ``pidfile``)."""
    script = tmp_path / "worker.py"
    script.write_text("import json, os, sys, time\nreq = json.loads(sys.stdin.read())\n"
                      f"pidfile = {str(tmp_path / 'pids')!r}\n"
                      "open(pidfile, 'a').write(f'{os.getpid()}\\n')\n" + body)
    return [sys.executable, str(script)]


OK_RUN = "print(json.dumps({'exit_code': 0, 'output': {'outcome': 'exit_boot_services', 'payload': {}}, 'error': None}))\n"


# ---- interface --------------------------------------------------------------------------------
def test_interface_description_lists_methods_and_errors(server):
    info = server.call("org.varlink.service.GetInfo")
    assert info["interfaces"] == ["io.vmrun.Manager", "org.varlink.service"]
    desc = server.call("org.varlink.service.GetInterfaceDescription", {"interface": "io.vmrun.Manager"})["description"]
    assert "interface io.vmrun.Manager" in desc
    for m in ("Run", "Load", "Unload", "Exec", "Status"):
        assert f"\nmethod {m}(" in desc
    for e in ("BadInput", "RunFailed", "KexecFailed", "Busy", "TooLarge", "InternalError"):
        assert f"\nerror {e} (message: string, exit_code: int" in desc
    assert "method Run(payload: string, payload_fd: ?int," in desc and "-> (result: object)" in desc
    assert "method Load(payload: ?string, payload_fd: ?int, staged: ?string, crash: ?bool," in desc
    assert "-> (slot: string, status: object)" in desc
    assert "method Status() -> (normal: object, crash: object)" in desc
    assert "kdump_append: ?string" in desc and "memory_cap: ?int" in desc and "timeout: ?float" in desc


def test_unknown_method_and_wrong_types_get_varlink_errors(server):
    with pytest.raises(client.ServiceError) as e:
        server.call("io.vmrun.Manager.Reboot")
    assert e.value.name == "org.varlink.service.MethodNotFound"
    with pytest.raises(client.ServiceError) as e:
        server.call("Run", {"payload": 42})
    assert e.value.name == "org.varlink.service.InvalidParameter" and e.value.parameters["parameter"] == "payload"
    with pytest.raises(client.ServiceError) as e:
        server.call("Run", {"payload": "/x", "timeout": "soon"})
    assert e.value.name == "org.varlink.service.InvalidParameter"
    with pytest.raises(client.ServiceError) as e:
        server.call("com.example.Nope.Do")
    assert e.value.name == "org.varlink.service.InterfaceNotFound"


def _raw(path, data: bytes, wait=2.0) -> bytes:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.settimeout(wait)
    try:
        s.sendall(data)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out + b"<closed>"
            out += chunk
            if out.endswith(b"\0"):
                return out
    except TimeoutError:
        return out + b"<timeout>"
    except (BrokenPipeError, ConnectionResetError):
        return b"<closed>"
    finally:
        s.close()


def test_malformed_and_oversized_messages_close_only_that_connection(server):
    assert _raw(server.path, b"this is not json\0") == b"<closed>"
    assert b"ProtocolViolation" in _raw(server.path, b'{"hello": 1}\0')
    assert _raw(server.path, b'[1, 2]\0') == b"<closed>"  # JSON, but not an object
    big = b'{"method": "io.vmrun.Manager.Status", "parameters": {"x": "' + b"a" * (2 << 20) + b'"}}\0'
    assert _raw(server.path, big).endswith(b"<closed>")
    # a message without its NUL that keeps growing is cut off too
    assert _raw(server.path, b"{" + b" " * ((1 << 20) + 10)).endswith(b"<closed>")
    # and everyone else is still served
    assert server.call("org.varlink.service.GetInfo")["product"] == "vmrun"
    assert set(server.call("Status")) == {"normal", "crash"}


def test_timeout_and_memory_cap_above_the_maxima_are_refused(tmp_path):
    s = Running(tmp_path, Config(max_timeout=10, max_memory_cap=1 << 30))
    try:
        with pytest.raises(client.ServiceError) as e:
            s.call("Run", {"payload": "/x", "timeout": 11.0})
        assert e.value.name == "io.vmrun.Manager.BadInput" and e.value.exit_code == 15
        assert "max_timeout" in e.value.parameters["message"]
        with pytest.raises(client.ServiceError) as e:
            s.call("Run", {"payload": "/x", "memory_cap": (1 << 30) + 1})
        assert e.value.name == "io.vmrun.Manager.BadInput" and "max_memory_cap" in e.value.parameters["message"]
        with pytest.raises(client.ServiceError) as e:
            s.call("Run", {"payload": "/x", "timeout": -1.0})
        assert e.value.exit_code == 15
    finally:
        s.stop()


def test_an_oversized_payload_fd_is_too_large(tmp_path):
    s = Running(tmp_path, Config(max_payload_size=1 << 20))
    big = tmp_path / "big.efi"
    with open(big, "wb") as f:
        f.truncate((1 << 20) + 1)
    try:
        fd = os.open(big, os.O_RDONLY)
        with pytest.raises(client.ServiceError) as e:
            s.call("Run", {"payload": "big.efi", "payload_fd": 0}, fds=[fd])
        os.close(fd)
        assert e.value.name == "io.vmrun.Manager.TooLarge", e.value
    finally:
        s.stop()


# ---- credentials ------------------------------------------------------------------------------
def test_policy_root_everything_group_status_and_run_others_nothing():
    root, member, other = creds.Peer(0, 0, 1), creds.Peer(1000, 100, 2, (100, 27)), creds.Peer(1001, 1001, 3, (1001,))
    supp = creds.Peer(1002, 1002, 4, (1002, 27))
    for m in ("Run", "Load", "Unload", "Exec", "Status"):
        assert creds.may_call(root, m, None) and creds.may_call(root, m, 27)
        assert not creds.may_call(other, m, 27)
        assert not creds.may_call(member, m, None)  # no allow_group: root only
    assert creds.may_call(member, "Status", 100) and creds.may_call(member, "Run", 100)   # primary group
    assert creds.may_call(supp, "Run", 27) and creds.may_call(member, "Status", 27)       # supplementary
    for m in ("Load", "Unload", "Exec"):
        assert not creds.may_call(member, m, 100) and not creds.may_call(supp, m, 27)
    assert not creds.may_call(root, "GetInfo", None)  # only Manager methods go through the policy
    assert "root only" in creds.why_denied(member, "Load", "kvm")
    assert "'kvm'" in creds.why_denied(other, "Run", "kvm")


def test_peer_credentials_of_a_real_socket():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        p = creds.peer_of(a)
        assert (p.uid, p.gid, p.pid) == (os.getuid(), os.getgid(), os.getpid())
        assert set(p.groups) == set(os.getgroups())
    finally:
        a.close()
        b.close()


def test_supplementary_groups_from_proc_when_so_peergroups_is_missing(tmp_path):
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "status").write_text("Name:\tx\nGroups:\t4 24 27 \nNSpgid:\t1\n")
    assert creds._proc_groups(42, str(tmp_path)) == (4, 24, 27)
    assert creds._proc_groups(43, str(tmp_path)) is None


def test_denied_callers_get_permission_denied_before_any_work(tmp_path):
    """A real other uid (setpriv) against the real server: refused, and no worker ever starts."""
    import shutil
    import subprocess
    if os.getuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to call as another user")
    import pathlib
    import tempfile
    d = pathlib.Path(tempfile.mkdtemp(prefix="vmrun-svc-"))  # reachable by uid 65534, unlike tmp_path
    d.chmod(0o755)
    s = Running(d, Config(allow_group="54321", allow_gid=54321), worker_argv=fake_worker(tmp_path, OK_RUN))
    os.chmod(s.path, 0o666)
    code = ("import sys; from vmrun.service import client as c\n"
            "for m in ('Run', 'Load', 'Status', 'Unload', 'Exec'):\n"
            "    try: c.call(m, {'payload': '/p'} if m in ('Run', 'Load') else {}, socket=sys.argv[1]); print(m, 'ok')\n"
            "    except c.ServiceError as e: print(m, e.name, e.exit_code)\n")
    try:
        def as_(gid):
            r = subprocess.run(["setpriv", "--reuid=65534", f"--regid={gid}", "--clear-groups", sys.executable, "-c",
                                code, s.path], capture_output=True, text=True, timeout=60,
                               env={**os.environ, "PYTHONPATH": str(pytest.importorskip("vmrun").__path__[0] + "/..")})
            assert r.returncode == 0, r.stderr
            return dict(line.split(" ", 1) for line in r.stdout.splitlines())
        out = as_(65534)
        assert out == {m: "org.varlink.service.PermissionDenied 77" for m in ("Run", "Load", "Status", "Unload", "Exec")}
        assert not (tmp_path / "pids").exists()  # no worker started
        out = as_(54321)
        assert out["Run"] == "ok" and out["Status"] == "ok"
        assert out["Load"] == out["Unload"] == out["Exec"] == "org.varlink.service.PermissionDenied 77"
        assert (tmp_path / "pids").read_text().count("\n") == 1
    finally:
        s.stop()
        shutil.rmtree(d, ignore_errors=True)


# ---- configuration ----------------------------------------------------------------------------
def test_config_defaults_and_values(tmp_path):
    c = Config()
    assert (c.max_queue, c.max_payload_size, c.allow_gid) == (4, 512 << 20, None)
    assert c.default_timeout == 60 and c.default_memory_cap == 2 << 30
    c = parse_config('allow_group = "0"\nmax_queue = 0\nmax_timeout = 30\nmax_memory_cap = "1G"\n'
                     'max_payload_size = 1048576\nmax_connections = 3\nmax_message_size = "64K"\n')
    assert (c.allow_gid, c.max_queue, c.max_timeout, c.max_memory_cap, c.max_payload_size, c.max_connections,
            c.max_message_size) == (0, 0, 30.0, 1 << 30, 1 << 20, 3, 64 << 10)
    assert c.default_timeout == 30 and c.default_memory_cap == 1 << 30
    assert parse_config('allow_group = "root"').allow_gid == 0
    assert parse_config("allow_group = 54321").allow_gid == 54321  # a gid without a name


@pytest.mark.parametrize("text, words", [
    ("max_queue = ", "not valid TOML"),
    ("max_qeueu = 3", "unknown key 'max_qeueu'"),
    ("max_queue = -1", "max_queue"),
    ("max_queue = true", "max_queue"),
    ("max_timeout = 0", "max_timeout"),
    ('max_memory_cap = "lots"', "max_memory_cap"),
    ("max_payload_size = -5", "max_payload_size"),
    ('allow_group = "no-such-group-here"', "no group named"),
    ("allow_group = [1]", "allow_group"),
])
def test_bad_config_is_a_clear_error(tmp_path, text, words):
    p = tmp_path / "vmrun.conf"
    p.write_text(text)
    with pytest.raises(BadOptionError) as e:
        load_config(p)
    assert words in str(e.value) and str(p) in str(e.value)
    assert e.value.exit_code == 15


def test_missing_config_means_defaults_unless_named(tmp_path, monkeypatch):
    from vmrun.service import config as C
    monkeypatch.setattr(C, "DEFAULT_PATH", tmp_path / "absent.conf")
    assert load_config() == Config()
    with pytest.raises(BadOptionError, match="no such file"):
        load_config(tmp_path / "absent.conf")


def test_daemon_command_refuses_a_bad_config(tmp_path):
    import subprocess
    p = tmp_path / "bad.conf"
    p.write_text("max_queue = 'x'\n")
    r = subprocess.run([sys.executable, "-m", "vmrun.cli", "daemon", "--config", str(p), "--socket",
                        str(tmp_path / "s")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 15 and "max_queue" in r.stderr and "Traceback" not in r.stderr


# ---- queue, busy, workers ---------------------------------------------------------------------
def test_queue_full_is_busy_at_once_and_the_queue_drains(tmp_path):
    s = Running(tmp_path, Config(max_queue=1), worker_argv=fake_worker(tmp_path, "time.sleep(1.5)\n" + OK_RUN))
    results = {}

    def go(i):
        try:
            results[i] = s.call("Run", {"payload": f"/p{i}"})["result"]["outcome"]
        except client.ServiceError as e:
            results[i] = e.name
    try:
        a = threading.Thread(target=go, args=(0,))
        a.start()
        time.sleep(0.4)
        b = threading.Thread(target=go, args=(1,))
        b.start()
        time.sleep(0.4)
        t0 = time.monotonic()
        go(2)  # lane taken, one waiting: Busy, at once
        assert results[2] == "io.vmrun.Manager.Busy" and time.monotonic() - t0 < 1.0
        # other lanes and Status are not held up by the run lane
        assert set(s.call("Status")) == {"normal", "crash"}
        a.join(10)
        b.join(10)
        assert results[0] == results[1] == "exit_boot_services"
    finally:
        s.stop()


def test_a_dying_worker_is_an_internal_error_and_the_service_carries_on(tmp_path):
    s = Running(tmp_path, worker_argv=fake_worker(tmp_path, "os.kill(os.getpid(), 9)\n"))
    try:
        for _ in range(2):
            with pytest.raises(client.ServiceError) as e:
                s.call("Run", {"payload": "/p"})
            assert e.value.name == "io.vmrun.Manager.InternalError" and "SIGKILL" in e.value.parameters["message"]
        assert set(s.call("Status")) == {"normal", "crash"}
    finally:
        s.stop()


def test_garbage_from_a_worker_is_an_internal_error(tmp_path):
    s = Running(tmp_path, worker_argv=fake_worker(tmp_path, "print('{not json')\n"))
    try:
        with pytest.raises(client.ServiceError) as e:
            s.call("Run", {"payload": "/p"})
        assert e.value.name == "io.vmrun.Manager.InternalError"
    finally:
        s.stop()


def test_a_client_that_goes_away_cancels_its_run(tmp_path):
    s = Running(tmp_path, worker_argv=fake_worker(tmp_path, "time.sleep(60)\n" + OK_RUN))
    try:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(s.path)
        c.sendall(json.dumps({"method": "io.vmrun.Manager.Run", "parameters": {"payload": "/p"}}).encode() + b"\0")
        pidfile = tmp_path / "pids"
        for _ in range(100):
            if pidfile.exists() and pidfile.read_text().strip():
                break
            time.sleep(0.05)
        pid = int(pidfile.read_text().split()[0])
        c.close()
        for _ in range(50):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the worker outlived its client")
        assert set(s.call("Status")) == {"normal", "crash"}
        assert s.service.active == 0 and not s.service.procs
    finally:
        s.stop()


def test_connections_beyond_max_connections_are_closed(tmp_path):
    s = Running(tmp_path, Config(max_connections=2))
    held = []
    try:
        for _ in range(2):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(s.path)
            held.append(c)
        time.sleep(0.2)
        assert _raw(s.path, b'{"method": "org.varlink.service.GetInfo"}\0') == b"<closed>"
        for c in held:
            c.close()
        time.sleep(0.2)
        assert s.call("org.varlink.service.GetInfo")["product"] == "vmrun"
    finally:
        s.stop()


# ---- worker argv and kdump.conf ---------------------------------------------------------------
def test_worker_builds_the_cli_command_lines(tmp_path):
    from vmrun.service.worker import Files, build_argv
    pay = tmp_path / "k.efi"
    pay.write_bytes(b"MZ" + b"\0" * 100)
    req = {"command": "load", "payload": str(pay), "crash": True, "cmdline": "quiet", "kdump_append": "",
           "timeout": 30.0, "memory_cap": 1 << 30, "host_vars": True, "caller": None}
    argv, js = build_argv(req, Files(req))
    assert js and argv == ["-q", "load", str(pay), "--json", "--crash", "--timeout", "30.0", "--memory-cap",
                           str(1 << 30), "--cmdline", "quiet", "--host-vars", "--kdump-append", ""]
    req = {"command": "run", "payload": str(pay), "timeout": 5.0, "memory_cap": 1 << 20, "json_logs": True}
    assert build_argv(req, Files(req))[0][:4] == ["-q", "--json-logs", "run", str(pay)]
    assert build_argv({"command": "unload", "crash": True}, None)[0] == ["-q", "unload", "--crash"]
    assert build_argv({"command": "exec"}, None)[0] == ["-q", "exec"]
    esp = tmp_path / "esp"
    esp.mkdir()
    req = {"command": "run", "payload": str(pay), "timeout": 5.0, "memory_cap": 1 << 20, "esp": str(esp),
           "esp_partuuid": "0fc63daf-8483-4772-8e79-3d69d8477de4"}
    argv = build_argv(req, Files(req))[0]
    assert argv[argv.index("--esp") + 1] == str(esp)
    assert argv[argv.index("--esp-partuuid") + 1] == "0fc63daf-8483-4772-8e79-3d69d8477de4"


def test_kdump_conf(tmp_path):
    from vmrun.service import kdumpconf as K
    pay = tmp_path / "k.efi"
    pay.write_bytes(b"MZ" + b"\0" * 100)
    conf = K.parse(f'payload = "{pay}"\ncmdline = "console=ttyS0"\nkdump_append = ""\nmemory_cap = "1G"\n'
                   'host_vars = true\n', "kdump.conf")
    assert K.argv(conf) == ["load", "--crash", str(pay), "--cmdline", "console=ttyS0", "--kdump-append", "",
                            "--memory-cap", str(1 << 30), "--host-vars"]
    for bad, words in (("cmdline = 'x'", "no payload"), (f'payload = "{pay}"\nfoo = 1', "unknown key"),
                       (f'payload = "{pay}"\ntimeout = true', "timeout"), ("payload = ", "not valid TOML")):
        with pytest.raises(BadOptionError, match=words):
            K.parse(bad, "kdump.conf")
