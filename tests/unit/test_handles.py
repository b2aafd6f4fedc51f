"""hostsvc.handles: the §7.3 handle/protocol database."""

from __future__ import annotations

from uuid import UUID

import pytest

from hostsvc import devicepath as DP
from hostsvc import guids as G
from hostsvc import handles as H
from hostsvc.status import (ACCESS_DENIED, ALREADY_STARTED, INVALID_PARAMETER, NOT_FOUND, UNSUPPORTED,
                            EfiError)

PART = UUID("a1b2c3d4-e5f6-4718-9a0b-1c2d3e4f5a6b")
OTHER = UUID("11111111-2222-3333-4444-555555555555")


class Env:
    """Guest stand-in: handle allocator, device paths in 'memory', signalled events."""

    def __init__(self):
        self.next = 0x1000
        self.freed: list[int] = []
        self.mem: dict[int, bytes] = {}
        self.signals: list[int] = []
        self.next_ptr = 0x80000
        self.db = H.HandleDB(self._new, self.mem.__getitem__, self.signals.append,
                             free_handle=self.freed.append)

    def _new(self) -> int:
        self.next += 0x10
        return self.next

    def path(self, nodes) -> int:
        """Put an encoded device path in 'guest memory', return its pointer."""
        self.next_ptr += 0x100
        self.mem[self.next_ptr] = DP.encode(nodes)
        return self.next_ptr


@pytest.fixture
def env():
    return Env()


def status(fn, *a, **kw) -> int:
    with pytest.raises(EfiError) as ei:
        fn(*a, **kw)
    return ei.value.status


# ---------------------------------------------------------------- install / uninstall

def test_install_creates_handle_and_lookup(env):
    db = env.db
    h = db.install(None, G.RNG, 0x5000)
    assert h == 0x1010
    assert db.is_handle(h)
    assert db.handle_protocol(h, G.RNG) == 0x5000
    assert db.install(h, G.LOAD_FILE2, 0x6000) == h
    h2 = db.install(0, G.RNG, 0x7000)
    assert h2 == 0x1020
    assert db.protocols_per_handle(h) == [G.RNG, G.LOAD_FILE2]
    assert db.handles() == [h, h2]
    assert db.get_interface(h2, G.RNG) == 0x7000
    assert db.get_interface(h2, G.LOAD_FILE2) is None


def test_install_errors(env):
    db = env.db
    h = db.install(None, G.RNG, 0x5000)
    assert status(db.install, h, G.RNG, 0x5001) == INVALID_PARAMETER        # duplicate protocol
    assert status(db.install, 0xdead, G.RNG, 0x5001) == INVALID_PARAMETER   # not a handle
    assert status(db.install, None, None, 0x5001) == INVALID_PARAMETER      # NULL protocol
    assert db.handle_protocol(h, G.RNG) == 0x5000
    assert db.handles() == [h]


def test_null_interface_is_allowed(env):
    h = env.db.install(None, G.LINUX_EFI_LOADED_IMAGE_FIXED, 0)
    assert env.db.handle_protocol(h, G.LINUX_EFI_LOADED_IMAGE_FIXED) == 0
    env.db.uninstall(h, G.LINUX_EFI_LOADED_IMAGE_FIXED, 0)
    assert not env.db.is_handle(h)


def test_handle_protocol_errors(env):
    db = env.db
    h = db.install(None, G.RNG, 0x5000)
    assert status(db.handle_protocol, h, G.LOAD_FILE2) == UNSUPPORTED
    assert status(db.handle_protocol, 0x999, G.RNG) == INVALID_PARAMETER
    assert status(db.handle_protocol, h, None) == INVALID_PARAMETER
    assert status(db.protocols_per_handle, 0x999) == INVALID_PARAMETER


def test_uninstall_lifecycle_frees_handle(env):
    db = env.db
    h = db.install(None, G.RNG, 0x5000)
    db.install(h, G.LOAD_FILE2, 0x6000)
    assert status(db.uninstall, h, G.RNG, 0x5001) == NOT_FOUND        # wrong interface
    assert status(db.uninstall, h, G.TCG2, 0x5000) == NOT_FOUND       # protocol not there
    assert status(db.uninstall, 0x999, G.RNG, 0x5000) == INVALID_PARAMETER
    db.uninstall(h, G.RNG, 0x5000)
    assert db.protocols_per_handle(h) == [G.LOAD_FILE2]
    assert env.freed == []
    db.uninstall(h, G.LOAD_FILE2, 0x6000)
    assert not db.is_handle(h)
    assert env.freed == [h]
    assert db.handles() == []
    assert status(db.install, h, G.RNG, 1) == INVALID_PARAMETER       # handle is gone
    assert status(db.locate_protocol, G.RNG) == NOT_FOUND


def test_install_multiple_creates_one_handle(env):
    db = env.db
    dpp = env.path([DP.vendor_media(G.LINUX_EFI_INITRD_MEDIA)])
    h = db.install_multiple(None, [(G.DEVICE_PATH, dpp), (G.LOAD_FILE2, 0x6000)])
    assert db.protocols_per_handle(h) == [G.DEVICE_PATH, G.LOAD_FILE2]
    h2 = db.install_multiple(h, [(G.RNG, 0x7000)])
    assert h2 == h and db.handle_protocol(h, G.RNG) == 0x7000


def test_install_multiple_is_atomic(env):
    db = env.db
    h = db.install(None, G.RNG, 0x5000)
    # a protocol already on the handle: nothing of the batch is installed
    assert status(db.install_multiple, h, [(G.LOAD_FILE2, 1), (G.RNG, 2)]) == INVALID_PARAMETER
    assert db.protocols_per_handle(h) == [G.RNG]
    # the same GUID twice in one call
    assert status(db.install_multiple, None, [(G.TCG2, 1), (G.TCG2, 2)]) == INVALID_PARAMETER
    assert db.handles() == [h]
    assert env.next == 0x1010                 # no handle was even allocated
    assert status(db.locate_protocol, G.TCG2) == NOT_FOUND
    assert status(db.install_multiple, 0x999, [(G.TCG2, 1)]) == INVALID_PARAMETER


def test_install_multiple_rolls_back_if_a_callback_fails():
    calls = {"n": 0}

    class Boom(Exception):
        pass

    def new_handle():
        calls["n"] += 1
        return 0x2000

    freed = []
    db = H.HandleDB(new_handle, lambda p: (_ for _ in ()).throw(Boom()), lambda e: None, free_handle=freed.append)
    with pytest.raises(Boom):
        db.install_multiple(None, [(G.RNG, 1), (G.DEVICE_PATH, 0x1234)])
    assert db.handles() == [] and calls["n"] == 0


def test_install_multiple_duplicate_device_path_already_started(env):
    db = env.db
    initrd = [DP.vendor_media(G.LINUX_EFI_INITRD_MEDIA)]
    h = db.install_multiple(None, [(G.DEVICE_PATH, env.path(initrd)), (G.LOAD_FILE2, 0x6000)])
    # same path bytes at a different address → ALREADY_STARTED, nothing installed
    assert status(db.install_multiple, None, [(G.LOAD_FILE2, 0x6100), (G.DEVICE_PATH, env.path(initrd))]) \
        == ALREADY_STARTED
    assert db.handles() == [h]
    assert db.locate_handle(H.BY_PROTOCOL, G.LOAD_FILE2, None) == [h]
    # a longer path that merely starts with an existing one is fine
    longer = initrd + [DP.file_path("\\x")]
    h2 = db.install_multiple(None, [(G.DEVICE_PATH, env.path(longer))])
    assert h2 != h
    # a different path is fine
    h3 = db.install_multiple(None, [(G.DEVICE_PATH, env.path([DP.vendor_media(OTHER)]))])
    assert db.handles() == [h, h2, h3]
    # plain InstallProtocolInterface does not check (EDK2/spec: only the Multiple variant)
    assert db.install(None, G.DEVICE_PATH, env.path(initrd)) not in (h, h2, h3)


def test_uninstall_multiple_is_atomic(env):
    db = env.db
    h = db.install_multiple(None, [(G.RNG, 1), (G.LOAD_FILE2, 2), (G.TCG2, 3)])
    assert status(db.uninstall_multiple, h, [(G.RNG, 1), (G.LOAD_FILE2, 99)]) == INVALID_PARAMETER
    assert db.protocols_per_handle(h) == [G.RNG, G.LOAD_FILE2, G.TCG2]
    db.uninstall_multiple(h, [(G.RNG, 1), (G.TCG2, 3)])
    assert db.protocols_per_handle(h) == [G.LOAD_FILE2]
    db.uninstall_multiple(h, [(G.LOAD_FILE2, 2)])
    assert not db.is_handle(h) and env.freed == [h]


def test_reinstall(env):
    db = env.db
    a = db.install(None, G.RNG, 0x100)
    b = db.install(None, G.RNG, 0x200)
    assert status(db.reinstall, a, G.RNG, 0x999, 0x101) == NOT_FOUND
    assert status(db.reinstall, a, G.TCG2, 0x100, 0x101) == NOT_FOUND
    assert status(db.reinstall, 0x999, G.RNG, 0x100, 0x101) == INVALID_PARAMETER
    assert db.locate_handle(H.BY_PROTOCOL, G.RNG, None) == [a, b]
    db.reinstall(a, G.RNG, 0x100, 0x101)
    assert db.handle_protocol(a, G.RNG) == 0x101
    # EDK2 moves the reinstalled interface to the tail of the protocol's list
    assert db.locate_handle(H.BY_PROTOCOL, G.RNG, None) == [b, a]
    assert db.locate_protocol(G.RNG) == 0x200
    assert db.protocols_per_handle(a) == [G.RNG]


# ---------------------------------------------------------------- open / close

@pytest.fixture
def oenv(env):
    db = env.db
    env.h = db.install(None, G.BLOCK_IO, 0xB10)
    env.drv1 = db.install(None, G.LOADED_IMAGE, 0xA1)      # agents are image handles
    env.drv2 = db.install(None, G.LOADED_IMAGE, 0xA2)
    env.child = db.install(None, G.DISK_IO, 0xD10)
    return env


def infos(db, h, g):
    return [(i.agent, i.controller, i.attributes, i.open_count) for i in db.open_protocol_information(h, g)]


def test_get_protocol_counts_and_close(oenv):
    db, h, a = oenv.db, oenv.h, oenv.drv1
    assert db.open_protocol(h, G.BLOCK_IO, a, 0, H.GET_PROTOCOL) == 0xB10
    assert db.open_protocol(h, G.BLOCK_IO, a, 0, H.GET_PROTOCOL) == 0xB10
    assert infos(db, h, G.BLOCK_IO) == [(a, 0, H.GET_PROTOCOL, 2)]
    db.open_protocol(h, G.BLOCK_IO, a, 0, H.BY_HANDLE_PROTOCOL)
    assert infos(db, h, G.BLOCK_IO) == [(a, 0, H.GET_PROTOCOL, 2), (a, 0, H.BY_HANDLE_PROTOCOL, 1)]
    db.close_protocol(h, G.BLOCK_IO, a, 0)                 # removes every entry of (agent, controller)
    assert infos(db, h, G.BLOCK_IO) == []
    assert status(db.close_protocol, h, G.BLOCK_IO, a, 0) == NOT_FOUND


def test_test_protocol_returns_zero_and_agent_zero_not_recorded(oenv):
    db, h, a = oenv.db, oenv.h, oenv.drv1
    assert db.open_protocol(h, G.BLOCK_IO, a, 0, H.TEST_PROTOCOL) == 0
    assert infos(db, h, G.BLOCK_IO) == [(a, 0, H.TEST_PROTOCOL, 1)]
    assert status(db.open_protocol, h, G.DISK_IO, a, 0, H.TEST_PROTOCOL) == UNSUPPORTED
    assert db.open_protocol(h, G.BLOCK_IO, 0, 0, H.GET_PROTOCOL) == 0xB10
    assert infos(db, h, G.BLOCK_IO) == [(a, 0, H.TEST_PROTOCOL, 1)]


def test_open_protocol_parameter_checks(oenv):
    db, h, a = oenv.db, oenv.h, oenv.drv1
    for bad in (0, 0x03, 0x40, 0x18, 0x28):
        assert status(db.open_protocol, h, G.BLOCK_IO, a, h, bad) == INVALID_PARAMETER
    assert status(db.open_protocol, 0x999, G.BLOCK_IO, a, 0, H.GET_PROTOCOL) == INVALID_PARAMETER
    assert status(db.open_protocol, h, None, a, 0, H.GET_PROTOCOL) == INVALID_PARAMETER
    assert status(db.open_protocol, h, G.BLOCK_IO, 0x999, h, H.BY_DRIVER) == INVALID_PARAMETER
    assert status(db.open_protocol, h, G.BLOCK_IO, a, 0x999, H.BY_DRIVER) == INVALID_PARAMETER
    assert status(db.open_protocol, h, G.BLOCK_IO, 0x999, 0, H.EXCLUSIVE) == INVALID_PARAMETER
    assert status(db.open_protocol, h, G.BLOCK_IO, a, h, H.BY_CHILD_CONTROLLER) == INVALID_PARAMETER
    assert status(db.open_protocol, h, G.BLOCK_IO, a, 0x999, H.BY_CHILD_CONTROLLER) == INVALID_PARAMETER
    assert status(db.open_protocol, h, G.DISK_IO, a, h, H.BY_DRIVER) == UNSUPPORTED
    assert infos(db, h, G.BLOCK_IO) == []


def test_by_driver_conflicts(oenv):
    db, h, a, b = oenv.db, oenv.h, oenv.drv1, oenv.drv2
    assert db.open_protocol(h, G.BLOCK_IO, a, h, H.BY_DRIVER) == 0xB10
    with pytest.raises(H.AlreadyStartedError) as ei:
        db.open_protocol(h, G.BLOCK_IO, a, h, H.BY_DRIVER)
    assert ei.value.status == ALREADY_STARTED and ei.value.interface == 0xB10
    assert status(db.open_protocol, h, G.BLOCK_IO, b, h, H.BY_DRIVER) == ACCESS_DENIED
    assert status(db.open_protocol, h, G.BLOCK_IO, b, 0, H.EXCLUSIVE) == ACCESS_DENIED
    assert status(db.open_protocol, h, G.BLOCK_IO, b, h, H.BY_DRIVER | H.EXCLUSIVE) == ACCESS_DENIED
    # non-exclusive users are still allowed
    assert db.open_protocol(h, G.BLOCK_IO, b, 0, H.GET_PROTOCOL) == 0xB10
    assert db.open_protocol(h, G.BLOCK_IO, a, oenv.child, H.BY_CHILD_CONTROLLER) == 0xB10
    assert infos(db, h, G.BLOCK_IO) == [(a, h, H.BY_DRIVER, 1), (b, 0, H.GET_PROTOCOL, 1),
                                        (a, oenv.child, H.BY_CHILD_CONTROLLER, 1)]
    db.close_protocol(h, G.BLOCK_IO, a, h)
    assert db.open_protocol(h, G.BLOCK_IO, b, h, H.BY_DRIVER) == 0xB10     # free again


def test_exclusive_conflicts(oenv):
    db, h, a, b = oenv.db, oenv.h, oenv.drv1, oenv.drv2
    assert db.open_protocol(h, G.BLOCK_IO, a, 0, H.EXCLUSIVE) == 0xB10
    assert status(db.open_protocol, h, G.BLOCK_IO, a, 0, H.EXCLUSIVE) == ACCESS_DENIED   # even the same agent
    assert status(db.open_protocol, h, G.BLOCK_IO, b, h, H.BY_DRIVER) == ACCESS_DENIED
    assert db.open_protocol(h, G.BLOCK_IO, b, 0, H.GET_PROTOCOL) == 0xB10
    assert infos(db, h, G.BLOCK_IO) == [(a, 0, H.EXCLUSIVE, 1), (b, 0, H.GET_PROTOCOL, 1)]


def test_by_driver_exclusive_already_started(oenv):
    db, h, a = oenv.db, oenv.h, oenv.drv1
    db.open_protocol(h, G.BLOCK_IO, a, h, H.BY_DRIVER | H.EXCLUSIVE)
    assert status(db.open_protocol, h, G.BLOCK_IO, a, h, H.BY_DRIVER | H.EXCLUSIVE) == ALREADY_STARTED


def test_close_protocol_errors(oenv):
    db, h, a = oenv.db, oenv.h, oenv.drv1
    db.open_protocol(h, G.BLOCK_IO, a, h, H.BY_DRIVER)
    assert status(db.close_protocol, h, G.BLOCK_IO, 0x999, h) == INVALID_PARAMETER
    assert status(db.close_protocol, h, G.BLOCK_IO, a, 0x999) == INVALID_PARAMETER
    assert status(db.close_protocol, 0x999, G.BLOCK_IO, a, h) == INVALID_PARAMETER
    assert status(db.close_protocol, h, G.DISK_IO, a, h) == NOT_FOUND
    assert status(db.close_protocol, h, G.BLOCK_IO, a, 0) == NOT_FOUND       # controller differs
    assert status(db.open_protocol_information, h, G.DISK_IO) == NOT_FOUND
    assert status(db.open_protocol_information, 0x999, G.BLOCK_IO) == NOT_FOUND
    db.close_protocol(h, G.BLOCK_IO, a, h)


def test_uninstall_refused_while_opened_by_driver(oenv):
    db, h, a = oenv.db, oenv.h, oenv.drv1
    db.open_protocol(h, G.BLOCK_IO, a, h, H.BY_DRIVER)
    db.open_protocol(h, G.BLOCK_IO, oenv.drv2, 0, H.GET_PROTOCOL)
    assert status(db.uninstall, h, G.BLOCK_IO, 0xB10) == ACCESS_DENIED
    assert status(db.reinstall, h, G.BLOCK_IO, 0xB10, 0xB11) == ACCESS_DENIED
    assert len(infos(db, h, G.BLOCK_IO)) == 2                 # failing calls change nothing
    db.close_protocol(h, G.BLOCK_IO, a, h)
    db.reinstall(h, G.BLOCK_IO, 0xB10, 0xB11)                 # GET_PROTOCOL entry is dropped
    assert infos(db, h, G.BLOCK_IO) == []
    db.open_protocol(h, G.BLOCK_IO, oenv.drv2, 0, H.GET_PROTOCOL)
    db.uninstall(h, G.BLOCK_IO, 0xB11)                        # GET_PROTOCOL does not block
    assert not db.is_handle(h)


def test_uninstall_refused_while_exclusive(oenv):
    db, h = oenv.db, oenv.h
    db.open_protocol(h, G.BLOCK_IO, oenv.drv1, 0, H.EXCLUSIVE)
    assert status(db.uninstall, h, G.BLOCK_IO, 0xB10) == ACCESS_DENIED
    assert status(db.uninstall_multiple, h, [(G.BLOCK_IO, 0xB10)]) == INVALID_PARAMETER
    assert db.close_all_by_agent(oenv.drv1) == 1
    db.uninstall(h, G.BLOCK_IO, 0xB10)


# ---------------------------------------------------------------- locate

def test_locate_handle_all_and_by_protocol(env):
    db = env.db
    a = db.install(None, G.RNG, 1)
    b = db.install(None, G.TCG2, 2)
    c = db.install(None, G.RNG, 3)
    assert db.locate_handle(H.ALL_HANDLES, None, None) == [a, b, c]
    assert db.locate_handle(H.BY_PROTOCOL, G.RNG, None) == [a, c]
    assert status(db.locate_handle, H.BY_PROTOCOL, G.LOAD_FILE2, None) == NOT_FOUND
    assert status(db.locate_handle, H.BY_PROTOCOL, None, None) == INVALID_PARAMETER
    assert status(db.locate_handle, 7, G.RNG, None) == INVALID_PARAMETER
    assert status(db.locate_handle, H.BY_REGISTER_NOTIFY, None, None) == INVALID_PARAMETER
    assert status(db.locate_handle, H.BY_REGISTER_NOTIFY, None, 12345) == INVALID_PARAMETER
    db.uninstall(a, G.RNG, 1)
    assert db.locate_handle(H.BY_PROTOCOL, G.RNG, None) == [c]
    assert db.locate_handle(H.ALL_HANDLES, None, None) == [b, c]


def test_locate_handle_all_empty(env):
    assert status(env.db.locate_handle, H.ALL_HANDLES, None, None) == NOT_FOUND


def test_locate_protocol(env):
    db = env.db
    assert status(db.locate_protocol, G.RNG) == NOT_FOUND
    assert status(db.locate_protocol, None) == NOT_FOUND
    db.install(None, G.RNG, 0x11)
    db.install(None, G.RNG, 0x22)
    assert db.locate_protocol(G.RNG) == 0x11
    assert db.locate_protocol(G.RNG, None) == 0x11


# ---------------------------------------------------------------- notify

def test_notify_signals_and_by_register_notify_iteration(env):
    db = env.db
    key = db.register_protocol_notify(G.SIMPLE_FILE_SYSTEM, 0xE1)
    key2 = db.register_protocol_notify(G.SIMPLE_FILE_SYSTEM, 0xE2)
    assert key != key2 and db.registration(key) == (G.SIMPLE_FILE_SYSTEM, 0xE1)
    assert env.signals == []                                  # registering does not signal
    db.install(None, G.RNG, 1)
    assert env.signals == []                                  # other protocols do not signal
    assert status(db.locate_handle, H.BY_REGISTER_NOTIFY, None, key) == NOT_FOUND
    a = db.install(None, G.SIMPLE_FILE_SYSTEM, 0xF1)
    assert env.signals == [0xE1, 0xE2]
    b = db.install_multiple(None, [(G.SIMPLE_FILE_SYSTEM, 0xF2), (G.BLOCK_IO, 0xB2)])
    assert env.signals == [0xE1, 0xE2, 0xE1, 0xE2]
    # one handle per call, in install order, then NOT_FOUND
    assert db.locate_handle(H.BY_REGISTER_NOTIFY, None, key, consume=False) == [a]   # size probe
    assert db.locate_handle(H.BY_REGISTER_NOTIFY, G.SIMPLE_FILE_SYSTEM, key) == [a]
    assert db.locate_handle(H.BY_REGISTER_NOTIFY, None, key) == [b]
    assert status(db.locate_handle, H.BY_REGISTER_NOTIFY, None, key) == NOT_FOUND
    # the second registration has its own cursor; LocateProtocol(Registration) shares the semantics
    assert db.locate_protocol(G.SIMPLE_FILE_SYSTEM, key2) == 0xF1
    assert db.locate_protocol(G.SIMPLE_FILE_SYSTEM, key2) == 0xF2
    assert status(db.locate_protocol, G.SIMPLE_FILE_SYSTEM, key2) == NOT_FOUND
    c = db.install(None, G.SIMPLE_FILE_SYSTEM, 0xF3)
    assert db.locate_handle(H.BY_REGISTER_NOTIFY, None, key) == [c]
    # reinstall re-queues and re-signals
    env.signals.clear()
    db.reinstall(a, G.SIMPLE_FILE_SYSTEM, 0xF1, 0xF1)
    assert env.signals == [0xE1, 0xE2]
    assert db.locate_handle(H.BY_REGISTER_NOTIFY, None, key) == [a]
    assert db.locate_protocol(G.SIMPLE_FILE_SYSTEM, key2) == 0xF3
    assert db.locate_protocol(G.SIMPLE_FILE_SYSTEM, key2) == 0xF1
    assert status(db.locate_protocol, G.SIMPLE_FILE_SYSTEM, 0x4242) == INVALID_PARAMETER


def test_notify_sees_existing_interfaces_like_edk2(env):
    db = env.db
    a = db.install(None, G.BLOCK_IO, 0xB1)
    key = db.register_protocol_notify(G.BLOCK_IO, 0xE1)
    assert db.locate_handle(H.BY_REGISTER_NOTIFY, None, key) == [a]
    assert status(db.locate_handle, H.BY_REGISTER_NOTIFY, None, key) == NOT_FOUND


def test_notify_skips_uninstalled_and_unregister(env):
    db = env.db
    key = db.register_protocol_notify(G.BLOCK_IO, 0xE1)
    a = db.install(None, G.BLOCK_IO, 0xB1)
    b = db.install(None, G.BLOCK_IO, 0xB2)
    db.uninstall(a, G.BLOCK_IO, 0xB1)
    assert db.locate_handle(H.BY_REGISTER_NOTIFY, None, key) == [b]
    assert db.unregister_event(0xE1) == 1
    env.signals.clear()
    db.install(None, G.BLOCK_IO, 0xB3)
    assert env.signals == []
    assert status(db.locate_handle, H.BY_REGISTER_NOTIFY, None, key) == INVALID_PARAMETER
    assert status(db.register_protocol_notify, G.BLOCK_IO, 0) == INVALID_PARAMETER
    assert status(db.register_protocol_notify, None, 0xE1) == INVALID_PARAMETER


# ---------------------------------------------------------------- locate_device_path

ROOT = [DP.acpi("PNP0A03", 0), DP.pci(0, 1)]                  # 12 + 6 bytes
DISK1 = ROOT + [DP.hard_drive(1, 0x800, 0x100000, PART)]      # + 42 bytes
DISK2 = ROOT + [DP.hard_drive(2, 0x100800, 0x1000, OTHER)]


@pytest.fixture
def denv(env):
    db = env.db
    env.ctl = db.install_multiple(None, [(G.DEVICE_PATH, env.path(ROOT)), (G.BLOCK_IO, 0xB0)])
    env.p1 = db.install_multiple(None, [(G.DEVICE_PATH, env.path(DISK1)), (G.BLOCK_IO, 0xB1),
                                        (G.SIMPLE_FILE_SYSTEM, 0xF1)])
    env.initrd = db.install_multiple(None, [(G.DEVICE_PATH, env.path([DP.vendor_media(G.LINUX_EFI_INITRD_MEDIA)])),
                                            (G.LOAD_FILE2, 0x1F2)])
    env.lf2_nodp = db.install(None, G.LOAD_FILE2, 0x1F3)       # LOAD_FILE2 without a device path
    return env


def test_locate_device_path_longest_prefix(denv):
    db = denv.db
    query = DP.encode(DISK1 + [DP.file_path("\\EFI\\Linux\\x.efi")])
    assert db.locate_device_path(G.SIMPLE_FILE_SYSTEM, query) == (denv.p1, 60)
    assert db.locate_device_path(G.BLOCK_IO, query) == (denv.p1, 60)
    assert DP.parse(query[60:]) == [DP.file_path("\\EFI\\Linux\\x.efi")]
    # another partition of the same disk: only the controller matches
    q2 = DP.encode(DISK2 + [DP.file_path("\\k")])
    assert db.locate_device_path(G.BLOCK_IO, q2) == (denv.ctl, 18)
    assert status(db.locate_device_path, G.SIMPLE_FILE_SYSTEM, q2) == NOT_FOUND
    # exact match leaves the End node
    h, off = db.locate_device_path(G.BLOCK_IO, DP.encode(DISK1))
    assert (h, off) == (denv.p1, 60) and DP.encode(DISK1)[off:] == bytes.fromhex("7fff0400")


def test_locate_device_path_initrd(denv):
    db = denv.db
    q = DP.encode([DP.vendor_media(G.LINUX_EFI_INITRD_MEDIA)])
    h, off = db.locate_device_path(G.LOAD_FILE2, q)
    assert (h, off) == (denv.initrd, 20)
    assert db.handle_protocol(h, G.LOAD_FILE2) == 0x1F2
    assert status(db.locate_device_path, G.LOAD_FILE2, DP.encode([DP.vendor_media(OTHER)])) == NOT_FOUND
    assert status(db.locate_device_path, G.RNG, q) == NOT_FOUND
    assert status(db.locate_device_path, G.LOAD_FILE2, b"\x04\x03\x02\x00") == INVALID_PARAMETER
    assert status(db.locate_device_path, None, q) == INVALID_PARAMETER


def test_locate_device_path_uses_first_instance(denv):
    db = denv.db
    q = DP.encode([DP.vendor_media(OTHER), DP.end_instance(), DP.vendor_media(G.LINUX_EFI_INITRD_MEDIA)])
    assert status(db.locate_device_path, G.LOAD_FILE2, q) == NOT_FOUND
    q = DP.encode([DP.vendor_media(G.LINUX_EFI_INITRD_MEDIA), DP.end_instance(), DP.vendor_media(OTHER)])
    assert db.locate_device_path(G.LOAD_FILE2, q) == (denv.initrd, 20)


def test_locate_device_path_after_uninstall(denv):
    db = denv.db
    dpp = db.handle_protocol(denv.p1, G.DEVICE_PATH)
    db.uninstall(denv.p1, G.DEVICE_PATH, dpp)
    query = DP.encode(DISK1)
    assert db.locate_device_path(G.BLOCK_IO, query) == (denv.ctl, 18)
    assert status(db.locate_device_path, G.SIMPLE_FILE_SYSTEM, query) == NOT_FOUND


def test_dump_mentions_paths(denv):
    text = denv.db.dump()
    assert "LINUX_EFI_INITRD_MEDIA" not in text      # GUIDs inside paths are shown as text, names for protocols
    assert "VenMedia(5568e427-68fc-4f3d-ac74-ca555231cc68)" in text
    assert "LOAD_FILE2 = 0x1f2" in text


def test_locate_device_path_tie_first_in_protocol_order(env):
    db = env.db
    a = db.install(None, G.DEVICE_PATH, env.path(ROOT))       # plain install: duplicates possible
    db.install(a, G.BLOCK_IO, 0xB0)
    b = db.install(None, G.DEVICE_PATH, env.path(ROOT))
    db.install(b, G.BLOCK_IO, 0xB1)
    assert db.locate_device_path(G.BLOCK_IO, DP.encode(DISK1)) == (a, 18)
    db.reinstall(a, G.BLOCK_IO, 0xB0, 0xB0)                   # a moves behind b in BLOCK_IO's list
    assert db.locate_device_path(G.BLOCK_IO, DP.encode(DISK1)) == (b, 18)
