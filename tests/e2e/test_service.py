"""vmrun daemon for real: socket-activated by systemd-socket-activate, real workers running real
payloads in KVM, callers as root and as an unprivileged user (setpriv), concurrent callers, a
caller that goes away in the middle of a run, a full queue, SIGTERM; the systemd units as
installed by scripts/install-units; and W^X (MemoryDenyWriteExecute) under PR_SET_MDWE.

Nothing here kexec-loads on this host: Load is only called where it is refused (no kexec in
this kernel, no crash kernel reservation, a bad file); those tests skip where kexec works."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from tests.e2e.efiapps import build_apps
from vmrun.service import client

REPO = pathlib.Path(__file__).resolve().parents[2]
VMRUN = REPO / ".venv" / "bin" / "vmrun"
ACTIVATE = "/usr/bin/systemd-socket-activate"
ALLOW_GID = 54321   # a gid no account has: the unprivileged caller takes it with setpriv --regid

pytestmark = [pytest.mark.kvm, pytest.mark.efiapps]


@pytest.fixture(scope="module")
def apps():
    return build_apps()


@pytest.fixture(scope="module")
def world():
    """A folder every user can reach, for the socket and for payloads the unprivileged caller may read."""
    d = pathlib.Path(tempfile.mkdtemp(prefix="vmrun-service-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Daemon:
    def __init__(self, d: pathlib.Path, conf: str):
        if not os.path.exists(ACTIVATE):
            pytest.fail(f"{ACTIVATE} is missing (Debian package systemd)")
        self.dir = d
        self.sock = str(d / "io.vmrun.Manager")
        (d / "vmrun.conf").write_text(conf)
        self.log = open(d / "daemon.log", "w+")
        env = {**os.environ, "VMRUN_STATE_DIR": str(d / "state")}
        # systemd-socket-activate passes only LISTEN_* and what -E names, as systemd would
        self.proc = subprocess.Popen([ACTIVATE, "-l", self.sock, "-E", f"VMRUN_STATE_DIR={d}/state",
                                      str(VMRUN), "daemon", "--config",
                                      str(d / "vmrun.conf")], stdout=self.log, stderr=subprocess.STDOUT, env=env)
        for _ in range(100):
            if os.path.exists(self.sock):
                break
            time.sleep(0.05)
        os.chmod(self.sock, 0o666)

    def call(self, method, params=None, **kw):
        return client.call(method, params or {}, socket=self.sock, timeout=kw.pop("timeout", 120), **kw)

    def logs(self) -> str:
        self.log.flush()
        return (self.dir / "daemon.log").read_text()

    def workers(self) -> list[int]:
        """Live worker processes (any parent: they run in sessions of their own)."""
        out = []
        for p in pathlib.Path("/proc").iterdir():
            if p.name.isdigit():
                try:
                    cmd = (p / "cmdline").read_bytes().split(b"\0")
                    if b"vmrun.service.worker" in cmd and (p / "environ").read_bytes().find(
                            f"VMRUN_STATE_DIR={self.dir}/state".encode()) >= 0:
                        out.append(int(p.name))
                except OSError:
                    pass
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        finally:
            self.log.close()


@pytest.fixture(scope="module")
def daemon(world):
    d = Daemon(world, f'allow_group = {ALLOW_GID}\nmax_queue = 1\nmax_payload_size = "64M"\nmax_timeout = 120\n')
    yield d
    assert d.stop() == 0, d.logs()
    assert not d.workers()


def as_user(daemon, gid: int, method: str, params: dict) -> tuple[str, dict]:
    """Call as uid 65534 with primary group ``gid`` and no others; (outcome or error name, reply)."""
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) missing")
    code = ("import json, sys\nfrom vmrun.service import client as c\n"
            "try:\n    r = c.call(sys.argv[2], json.loads(sys.argv[3]), socket=sys.argv[1], timeout=120)\n"
            "    print(json.dumps(['ok', r]))\n"
            "except c.ServiceError as e:\n    print(json.dumps([e.name, e.parameters]))\n")
    r = subprocess.run(["setpriv", "--reuid=65534", f"--regid={gid}", "--clear-groups", sys.executable, "-c", code,
                        daemon.sock, method, json.dumps(params)], capture_output=True, text=True, timeout=180,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, cwd="/")
    assert r.returncode == 0, r.stderr
    name, reply = json.loads(r.stdout)
    return name, reply


def test_socket_activated_root_runs_an_efi_app(daemon, apps):
    r = daemon.call("Run", {"payload": str(apps / "ebs.efi"), "timeout": 30.0})["result"]
    assert r["outcome"] == "exit_boot_services" and r["error"] is None
    import hashlib
    assert r["payload"]["sha256"] == hashlib.sha256((apps / "ebs.efi").read_bytes()).hexdigest()
    assert r["payload"]["path"] == str(apps / "ebs.efi")
    assert "Listening on" in daemon.logs() and "socket=socket-activated" in daemon.logs()
    # the request is logged with the caller, the payload and its digest
    line = [ln for ln in daemon.logs().splitlines() if "reply" in ln and "ebs.efi" in ln][-1]
    assert "caller_uid=0" in line and r["payload"]["sha256"] in line and "exit_boot_services" in line


def test_a_failing_payload_is_a_normal_run_reply(daemon, apps):
    r = daemon.call("Run", {"payload": str(apps / "spin.efi"), "timeout": 1.0})["result"]
    assert r["outcome"] == "timeout" and "spinning" in r["error"]["message"]


def test_root_runs_a_debian_kernel_with_initrd_and_cmdline(daemon, bookworm_kernel, test_initrd):
    r = daemon.call("Run", {"payload": str(bookworm_kernel), "initrd": str(test_initrd),
                            "cmdline": "console=ttyS0 via-service", "timeout": 60.0})["result"]
    assert r["outcome"] == "exit_boot_services", r["error"]
    assert "via-service" in r["linux"]["cmdline"] and r["linux"]["ramdisk_size"] == test_initrd.stat().st_size


def test_payload_passed_as_a_file_descriptor(daemon, apps):
    fd = os.open(apps / "ebs.efi", os.O_RDONLY)
    try:
        r = daemon.call("Run", {"payload": "ebs-by-fd.efi", "payload_fd": 0}, fds=[fd])["result"]
    finally:
        os.close(fd)
    assert r["outcome"] == "exit_boot_services" and r["payload"]["name"] == "ebs-by-fd.efi"


def test_bad_inputs_get_bad_input_with_vmruns_exit_codes(daemon, world, apps):
    junk = world / "junk.efi"
    junk.write_bytes(b"not a kernel\n" * 100)
    for params, code in (({"payload": str(world / "absent.efi")}, 10), ({"payload": str(junk)}, 11),
                         ({"payload": str(apps / "ebs.efi"), "timeout": 121.0}, 15)):
        with pytest.raises(client.ServiceError) as e:
            daemon.call("Run", params)
        assert e.value.name == "io.vmrun.Manager.BadInput" and e.value.exit_code == code, e.value
    big = world / "big.efi"
    with open(big, "wb") as f:
        f.truncate(65 << 20)
    with pytest.raises(client.ServiceError) as e:
        daemon.call("Run", {"payload": str(big)})
    assert e.value.name == "io.vmrun.Manager.TooLarge", e.value
    big.unlink()


def test_load_where_kexec_cannot_work_is_kexec_failed(daemon, bookworm_kernel, world):
    if os.path.exists("/sys/kernel/kexec_loaded"):
        pytest.skip("kexec works on this host: the QEMU target tests load for real")
    with pytest.raises(client.ServiceError) as e:
        daemon.call("Load", {"payload": str(bookworm_kernel)})
    assert e.value.name == "io.vmrun.Manager.KexecFailed" and e.value.exit_code == 50
    assert "without kexec support" in e.value.parameters["message"]
    with pytest.raises(client.ServiceError) as e:
        daemon.call("Load", {"payload": str(bookworm_kernel), "crash": True})
    assert e.value.name == "io.vmrun.Manager.KexecFailed" and e.value.exit_code == 50
    junk = world / "junk2.efi"
    junk.write_bytes(b"\0" * 4096)
    with pytest.raises(client.ServiceError) as e:
        daemon.call("Load", {"payload": str(junk)})
    assert e.value.name == "io.vmrun.Manager.BadInput" and e.value.exit_code == 11
    st = daemon.call("Status")
    assert st["normal"]["loaded"] is False and st["crash"]["record"] is None


def test_unprivileged_caller_outside_the_group_is_denied_everything(daemon, world, apps):
    shutil.copy(apps / "ebs.efi", world / "ebs.efi")
    (world / "ebs.efi").chmod(0o644)
    for m, p in (("Status", {}), ("Run", {"payload": str(world / "ebs.efi")}), ("Load", {"payload": "/x"}),
                 ("Unload", {}), ("Exec", {})):
        name, reply = as_user(daemon, 65534, m, p)
        assert name == "org.varlink.service.PermissionDenied", (m, name, reply)
        assert reply["exit_code"] == 77 and "uid 65534" in reply["message"]
    assert "request.denied" in daemon.logs()


def test_unprivileged_group_member_may_run_and_ask_status_only(daemon, world, apps):
    shutil.copy(apps / "ebs.efi", world / "ebs.efi")
    (world / "ebs.efi").chmod(0o644)
    name, reply = as_user(daemon, ALLOW_GID, "Run", {"payload": str(world / "ebs.efi")})
    assert name == "ok" and reply["result"]["outcome"] == "exit_boot_services"
    name, reply = as_user(daemon, ALLOW_GID, "Status", {})
    assert name == "ok" and set(reply) == {"normal", "crash"}
    for m in ("Load", "Unload", "Exec"):
        name, _ = as_user(daemon, ALLOW_GID, m, {"payload": str(world / "ebs.efi")} if m == "Load" else {})
        assert name == "org.varlink.service.PermissionDenied"
    # a file the caller cannot read itself is not read for it by the root service
    secret = world / "secret.efi"
    shutil.copy(apps / "ebs.efi", secret)
    secret.chmod(0o600)
    name, reply = as_user(daemon, ALLOW_GID, "Run", {"payload": str(secret)})
    assert name == "io.vmrun.Manager.BadInput" and reply["exit_code"] == 10 and "not readable by uid 65534" in \
        reply["message"]
    # nor an ESP folder with something it cannot read
    esp = world / "esp"
    (esp / "EFI").mkdir(parents=True, exist_ok=True)
    esp.chmod(0o755)
    (esp / "EFI").chmod(0o755)
    (esp / "EFI" / "hidden.txt").write_text("root only")
    (esp / "EFI" / "hidden.txt").chmod(0o600)
    name, reply = as_user(daemon, ALLOW_GID, "Run", {"payload": str(world / "ebs.efi"), "esp": str(esp)})
    assert name == "io.vmrun.Manager.BadInput" and "hidden.txt" in reply["message"], reply
    (esp / "EFI" / "hidden.txt").chmod(0o644)
    name, reply = as_user(daemon, ALLOW_GID, "Run", {"payload": str(world / "ebs.efi"), "esp": str(esp)})
    assert name == "ok" and reply["result"]["outcome"] == "exit_boot_services", reply


def test_concurrent_clients(daemon, apps):
    out, errs = [], []

    def run():
        try:
            out.append(daemon.call("Run", {"payload": str(apps / "ebs.efi")})["result"]["outcome"])
        except client.ServiceError as e:
            errs.append(e.name)

    def status():
        for _ in range(5):
            out.append(sorted(daemon.call("Status")))
    threads = [threading.Thread(target=run) for _ in range(2)] + [threading.Thread(target=status) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    # max_queue = 1: two runs fit (one running, one waiting); Status never queues
    assert not errs and out.count("exit_boot_services") == 2 and out.count(["crash", "normal"]) == 15


def _start_run(daemon, params) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(daemon.sock)
    s.sendall(json.dumps({"method": "io.vmrun.Manager.Run", "parameters": params}).encode() + b"\0")
    return s


def _wait_workers(daemon, n, seconds=15.0) -> list[int]:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        w = daemon.workers()
        if len(w) == n:
            return w
        time.sleep(0.1)
    pytest.fail(f"expected {n} workers, have {daemon.workers()}")


def test_a_client_leaving_mid_run_cancels_it_and_the_service_answers(daemon, apps):
    s = _start_run(daemon, {"payload": str(apps / "spin.efi"), "timeout": 100.0})
    (pid,) = _wait_workers(daemon, 1)
    time.sleep(1.0)  # spinning in the VM now
    s.close()
    _wait_workers(daemon, 0)
    t0 = time.monotonic()
    assert set(daemon.call("Status")) == {"normal", "crash"} and time.monotonic() - t0 < 5
    assert daemon.call("Run", {"payload": str(apps / "ebs.efi")})["result"]["outcome"] == "exit_boot_services"
    assert "cancelled" in daemon.logs()


def test_a_full_queue_is_busy(daemon, apps):
    a = _start_run(daemon, {"payload": str(apps / "spin.efi"), "timeout": 100.0})
    _wait_workers(daemon, 1)
    b = _start_run(daemon, {"payload": str(apps / "spin.efi"), "timeout": 100.0})
    time.sleep(0.5)  # b waits for the run lane
    try:
        t0 = time.monotonic()
        with pytest.raises(client.ServiceError) as e:
            daemon.call("Run", {"payload": str(apps / "ebs.efi")})
        assert e.value.name == "io.vmrun.Manager.Busy" and time.monotonic() - t0 < 3
        assert "max_queue 1" in e.value.parameters["message"]
        assert set(daemon.call("Status")) == {"normal", "crash"}  # not queued behind runs
    finally:
        a.close()
        b.close()
    _wait_workers(daemon, 0)


def test_standalone_socket_idle_exit_and_sigterm(tmp_path, apps):
    d = pathlib.Path(tempfile.mkdtemp(prefix="vmrun-standalone-"))
    try:
        sock = d / "run" / "io.vmrun.Manager"
        p = subprocess.Popen([str(VMRUN), "daemon", "--socket", str(sock), "--config", "/dev/null", "--exit-idle", "2"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.05)
        assert oct(sock.stat().st_mode & 0o777) == "0o666" and oct((d / "run").stat().st_mode & 0o777) == "0o755"
        assert client.socket_available(str(sock))
        assert client.call("Status", socket=str(sock), timeout=30)
        assert p.wait(20) == 0  # idle exit
        assert not sock.exists() and not client.socket_available(str(sock))
        p = subprocess.Popen([str(VMRUN), "daemon", "--socket", str(sock), "--config", "/dev/null"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.05)
        run = _start_run(type("D", (), {"sock": str(sock)}), {"payload": str(apps / "spin.efi"), "timeout": 100.0})
        time.sleep(1.5)
        p.send_signal(signal.SIGTERM)
        assert p.wait(20) == 0, p.stdout.read()
        run.close()
        out = p.stdout.read()
        assert "daemon.stop" in out and "SIGTERM" in out and "Traceback" not in out
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_memory_deny_write_execute_holds_for_a_whole_run(apps, bookworm_kernel):
    """vmrun.service sets MemoryDenyWriteExecute=yes: under PR_SET_MDWE (the same W^X rule, in
    the kernel) a run of an EFI app and of a Debian kernel still works."""
    code = ("import ctypes, sys\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "assert libc.prctl(65, 1, 0, 0, 0) == 0, 'PR_SET_MDWE'\n"
            "from vmrun.cli import main\nsys.argv = ['vmrun', '-q', 'run', '--json'] + sys.argv[1:]\nmain()\n")
    for payload in (apps / "ebs.efi", bookworm_kernel):
        r = subprocess.run([sys.executable, "-c", code, str(payload)], capture_output=True, text=True, timeout=120)
        if "PR_SET_MDWE" in r.stderr:
            pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3)")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["outcome"] == "exit_boot_services"


def test_install_units_renders_verifiable_units(tmp_path):
    r = subprocess.run([str(REPO / "scripts" / "install-units"), "--prefix", str(tmp_path), "--vmrun", str(VMRUN)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    units = tmp_path / "etc" / "systemd" / "system"
    svc = (units / "vmrun.service").read_text()
    assert f"ExecStart={VMRUN} daemon" in svc and "@VMRUN@" not in svc
    for want in ("DevicePolicy=closed", "DeviceAllow=/dev/kvm rw", "ProtectSystem=strict", "ReadWritePaths=/run/vmrun",
                 "NoNewPrivileges=yes", "RestrictAddressFamilies=AF_UNIX", "MemoryDenyWriteExecute=yes"):
        assert want in svc
    sock = (units / "vmrun.socket").read_text()
    assert "ListenStream=/run/vmrun/io.vmrun.Manager" in sock and "SocketMode=0666" in sock
    kd = (units / "vmrun-kdump.service").read_text()
    assert f"ExecStart={VMRUN} kdump-arm" in kd and f"ExecStop={VMRUN} unload --crash" in kd
    assert (tmp_path / "etc" / "vmrun" / "vmrun.conf.example").exists()
    # the system-shutdown hook that finalizes a measured kexec, executable where systemd-shutdown looks
    hook = tmp_path / "usr" / "lib" / "systemd" / "system-shutdown" / "vmrun.shutdown"
    assert hook.is_file() and hook.stat().st_mode & 0o777 == 0o755, oct(hook.stat().st_mode)
    text = hook.read_text()
    assert text.startswith("#!/bin/sh\n") and "@VMRUN@" not in text, text
    assert f"{VMRUN} finalize --if-kexec" in text, text
    # the example configuration is valid as it is
    from vmrun.service.config import load_config
    load_config(tmp_path / "etc" / "vmrun" / "vmrun.conf.example")
    if shutil.which("systemd-analyze"):
        v = subprocess.run(["systemd-analyze", "verify", *(str(units / u) for u in
                            ("vmrun.socket", "vmrun.service", "vmrun-kdump.service"))],
                           capture_output=True, text=True, timeout=60)
        assert v.returncode == 0 and "vmrun" not in v.stderr, v.stderr


def test_kdump_arm_on_a_host_without_a_reservation(tmp_path, bookworm_kernel):
    from vmrun.kexec import crash_regions
    if crash_regions():
        pytest.skip("this machine has a crashkernel= reservation")
    conf = tmp_path / "kdump.conf"
    conf.write_text(f'payload = "{bookworm_kernel}"\ncmdline = "console=ttyS0"\n')
    r = subprocess.run([str(VMRUN), "kdump-arm", "--config", str(conf)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "VMRUN_STATE_DIR": str(tmp_path / "state")})
    assert r.returncode == 50 and "failed (exit 50)" in r.stderr and "armed:" not in r.stdout, r.stderr
