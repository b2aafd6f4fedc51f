/*
 * protocols: UEFI 2.10 section 7.3 Protocol Handler Services.
 */
#include "lib.h"

static EFI_GUID g1 = {0x5f0e8a10, 0x1c2d, 0x4b3a, {0x8e, 0x01, 0x6d, 0x7c, 0x9b, 0xaa, 0x10, 0x01}};
static EFI_GUID g2 = {0x5f0e8a10, 0x1c2d, 0x4b3a, {0x8e, 0x01, 0x6d, 0x7c, 0x9b, 0xaa, 0x10, 0x02}};
static EFI_GUID g3 = {0x5f0e8a10, 0x1c2d, 0x4b3a, {0x8e, 0x01, 0x6d, 0x7c, 0x9b, 0xaa, 0x10, 0x03}};
static EFI_GUID unknown = {0x5f0e8a10, 0x1c2d, 0x4b3a, {0x8e, 0x01, 0x6d, 0x7c, 0x9b, 0xaa, 0x10, 0xff}};
static EFI_GUID dp_guid = EFI_DEVICE_PATH_PROTOCOL_GUID;

static UINT64 iface1 = 1, iface1b = 2, iface1c = 3, iface2 = 4, iface3a = 5, iface3b = 6,
              iface3c = 7, wrong = 8;

static EFI_HANDLE h1, h2, h3, h4;
static EFI_EVENT nev;
static VOID *reg;

static VOID EFIAPI noop_notify(EFI_EVENT e, VOID *c) { }

static int has_handle(EFI_HANDLE *buf, UINTN n, EFI_HANDLE h)
{
    for (UINTN i = 0; i < n; i++)
        if (buf[i] == h)
            return 1;
    return 0;
}

/* does `h` carry `g`, and with which interface */
static VOID *iface_of(EFI_HANDLE h, EFI_GUID *g, EFI_STATUS *st)
{
    VOID *p = NULL;
    *st = gBS->HandleProtocol(h, g, &p);
    return p;
}

static void test_install(void)
{
    EFI_STATUS st;
    VOID *p;
    UINTN size;
    EFI_HANDLE buf[4];

    st = gBS->CreateEvent(EVT_NOTIFY_WAIT, TPL_CALLBACK, noop_notify, NULL, &nev);
    CHECK_ST("notify-create-event", st, EFI_SUCCESS);
    st = gBS->RegisterProtocolNotify(&g1, nev, &reg);
    CHECK_ST("register-protocol-notify", st, EFI_SUCCESS);
    CHECK_ST("notify-not-signalled-yet", gBS->CheckEvent(nev), EFI_NOT_READY);

    st = gBS->InstallProtocolInterface(&h1, &g1, EFI_NATIVE_INTERFACE, &iface1);
    CHECK_ST("install-protocol", st, EFI_SUCCESS);
    CHECK("install-new-handle", h1 != NULL);
    CHECK_ST("notify-signalled-on-install", gBS->CheckEvent(nev), EFI_SUCCESS);
    CHECK_ST("notify-cleared", gBS->CheckEvent(nev), EFI_NOT_READY);

    size = sizeof(buf);
    st = gBS->LocateHandle(ByRegisterNotify, NULL, reg, &size, buf);
    CHECK("locate-by-register-notify", st == EFI_SUCCESS && size == sizeof(EFI_HANDLE) && buf[0] == h1);
    size = sizeof(buf);
    st = gBS->LocateHandle(ByRegisterNotify, NULL, reg, &size, buf);
    CHECK_ST("locate-by-register-notify-drained", st, EFI_NOT_FOUND);

    EFI_HANDLE same = h1;
    st = gBS->InstallProtocolInterface(&same, &g2, EFI_NATIVE_INTERFACE, &iface2);
    CHECK("install-second-protocol-same-handle", st == EFI_SUCCESS && same == h1);
    st = gBS->InstallProtocolInterface(&same, &g1, EFI_NATIVE_INTERFACE, &iface1b);
    CHECK_ST("install-duplicate-protocol", st, EFI_INVALID_PARAMETER);
    st = gBS->InstallProtocolInterface(&h2, &g1, EFI_NATIVE_INTERFACE, &iface1b);
    CHECK("install-on-second-handle", st == EFI_SUCCESS && h2 != NULL && h2 != h1);
    gBS->CheckEvent(nev);  /* clear the signal from the second install */

    p = iface_of(h1, &g1, &st);
    CHECK("handle-protocol", st == EFI_SUCCESS && p == &iface1);
    p = iface_of(h2, &g1, &st);
    CHECK("handle-protocol-second-handle", st == EFI_SUCCESS && p == &iface1b);
    iface_of(h1, &unknown, &st);
    CHECK_ST("handle-protocol-unknown", st, EFI_UNSUPPORTED);
}

static void test_open_close(void)
{
    EFI_STATUS st;
    VOID *p = NULL;
    EFI_OPEN_PROTOCOL_INFORMATION_ENTRY *info = NULL;
    UINTN count = 0;

    st = gBS->OpenProtocol(h1, &g1, &p, gImage, NULL, EFI_OPEN_PROTOCOL_GET_PROTOCOL);
    CHECK("open-get-protocol", st == EFI_SUCCESS && p == &iface1);
    st = gBS->OpenProtocol(h1, &g1, NULL, gImage, NULL, EFI_OPEN_PROTOCOL_TEST_PROTOCOL);
    CHECK_ST("open-test-protocol", st, EFI_SUCCESS);
    st = gBS->OpenProtocol(h1, &unknown, NULL, gImage, NULL, EFI_OPEN_PROTOCOL_TEST_PROTOCOL);
    CHECK_ST("open-test-protocol-unknown", st, EFI_UNSUPPORTED);
    p = NULL;
    st = gBS->OpenProtocol(h1, &g1, &p, gImage, NULL, EFI_OPEN_PROTOCOL_BY_HANDLE_PROTOCOL);
    CHECK("open-by-handle-protocol", st == EFI_SUCCESS && p == &iface1);
    st = gBS->OpenProtocol(h1, &g1, NULL, gImage, NULL, EFI_OPEN_PROTOCOL_GET_PROTOCOL);
    CHECK_ST("open-get-null-interface", st, EFI_INVALID_PARAMETER);

    st = gBS->OpenProtocolInformation(h1, &g1, &info, &count);
    if (CHECK_ST("open-protocol-information", st, EFI_SUCCESS)) {
        int found = 0;
        for (UINTN i = 0; i < count; i++)
            if (info[i].AgentHandle == gImage && info[i].ControllerHandle == NULL &&
                info[i].Attributes == EFI_OPEN_PROTOCOL_GET_PROTOCOL && info[i].OpenCount >= 1)
                found = 1;
        CHECK("open-protocol-information-count", count >= 1);
        CHECK("open-protocol-information-entry", found);
        CHECK_ST("open-protocol-information-free", gBS->FreePool(info), EFI_SUCCESS);
    }

    st = gBS->CloseProtocol(h1, &g1, gImage, NULL);
    CHECK_ST("close-protocol", st, EFI_SUCCESS);
    info = NULL;
    count = 0;
    st = gBS->OpenProtocolInformation(h1, &g1, &info, &count);
    if (st == EFI_SUCCESS) {
        int found = 0;
        for (UINTN i = 0; i < count; i++)
            if (info[i].AgentHandle == gImage)
                found = 1;
        CHECK("close-protocol-removes-entries", !found);
        if (info)
            gBS->FreePool(info);
    } else {
        fail("close-protocol-removes-entries", "OpenProtocolInformation returned %r", st);
    }
    st = gBS->CloseProtocol(h1, &g1, gImage, NULL);
    CHECK_ST("close-protocol-not-open", st, EFI_NOT_FOUND);
}

static void test_locate(void)
{
    EFI_STATUS st;
    EFI_GUID **guids = NULL;
    UINTN n = 0, size;
    EFI_HANDLE buf[8], *hb = NULL;
    VOID *p;

    st = gBS->ProtocolsPerHandle(h1, &guids, &n);
    if (CHECK_ST("protocols-per-handle", st, EFI_SUCCESS)) {
        int f1 = 0, f2 = 0;
        for (UINTN i = 0; i < n; i++) {
            f1 |= guid_eq(guids[i], &g1);
            f2 |= guid_eq(guids[i], &g2);
        }
        CHECK("protocols-per-handle-list", n == 2 && f1 && f2);
        CHECK_ST("protocols-per-handle-free", gBS->FreePool(guids), EFI_SUCCESS);
    }

    size = 0;
    st = gBS->LocateHandle(ByProtocol, &g1, NULL, &size, NULL);
    CHECK_ST("locate-handle-probe", st, EFI_BUFFER_TOO_SMALL);
    CHECK_EQ("locate-handle-probe-size", size, 2 * sizeof(EFI_HANDLE));
    size = sizeof(EFI_HANDLE);
    st = gBS->LocateHandle(ByProtocol, &g1, NULL, &size, buf);
    CHECK("locate-handle-too-small", st == EFI_BUFFER_TOO_SMALL && size == 2 * sizeof(EFI_HANDLE));
    size = sizeof(buf);
    st = gBS->LocateHandle(ByProtocol, &g1, NULL, &size, buf);
    CHECK("locate-handle-by-protocol", st == EFI_SUCCESS && size == 2 * sizeof(EFI_HANDLE) &&
          has_handle(buf, 2, h1) && has_handle(buf, 2, h2));
    size = sizeof(buf);
    st = gBS->LocateHandle(ByProtocol, &unknown, NULL, &size, buf);
    CHECK_ST("locate-handle-unknown", st, EFI_NOT_FOUND);
    size = sizeof(buf);
    st = gBS->LocateHandle(ByProtocol, NULL, NULL, &size, buf);
    CHECK_ST("locate-handle-null-protocol", st, EFI_INVALID_PARAMETER);

    size = 0;
    st = gBS->LocateHandle(AllHandles, NULL, NULL, &size, NULL);
    if (CHECK_ST("locate-all-handles-probe", st, EFI_BUFFER_TOO_SMALL)) {
        EFI_HANDLE *all = NULL;
        if (gBS->AllocatePool(EfiLoaderData, size, (VOID **)&all) == EFI_SUCCESS) {
            st = gBS->LocateHandle(AllHandles, NULL, NULL, &size, all);
            CHECK("locate-all-handles", st == EFI_SUCCESS && has_handle(all, size / sizeof(EFI_HANDLE), h1) &&
                  has_handle(all, size / sizeof(EFI_HANDLE), h2) &&
                  has_handle(all, size / sizeof(EFI_HANDLE), gImage));
            gBS->FreePool(all);
        }
    }

    st = gBS->LocateHandleBuffer(ByProtocol, &g1, NULL, &n, &hb);
    if (CHECK_ST("locate-handle-buffer", st, EFI_SUCCESS)) {
        CHECK("locate-handle-buffer-list", n == 2 && has_handle(hb, n, h1) && has_handle(hb, n, h2));
        CHECK_ST("locate-handle-buffer-free", gBS->FreePool(hb), EFI_SUCCESS);
    }
    st = gBS->LocateHandleBuffer(ByProtocol, &unknown, NULL, &n, &hb);
    CHECK_ST("locate-handle-buffer-unknown", st, EFI_NOT_FOUND);
    st = gBS->LocateHandleBuffer(AllHandles, NULL, NULL, &n, &hb);
    if (CHECK_ST("locate-handle-buffer-all", st, EFI_SUCCESS)) {
        CHECK("locate-handle-buffer-all-list", n >= 3 && has_handle(hb, n, h1) && has_handle(hb, n, gImage));
        gBS->FreePool(hb);
    }

    p = NULL;
    st = gBS->LocateProtocol(&g1, NULL, &p);
    CHECK("locate-protocol", st == EFI_SUCCESS && (p == &iface1 || p == &iface1b));
    p = NULL;
    st = gBS->LocateProtocol(&g2, NULL, &p);
    CHECK("locate-protocol-single", st == EFI_SUCCESS && p == &iface2);
    st = gBS->LocateProtocol(&unknown, NULL, &p);
    CHECK_ST("locate-protocol-unknown", st, EFI_NOT_FOUND);
    st = gBS->LocateProtocol(&g1, NULL, NULL);
    CHECK_ST("locate-protocol-null-out", st, EFI_INVALID_PARAMETER);
}

static void test_reinstall_uninstall(void)
{
    EFI_STATUS st;
    VOID *p;

    st = gBS->ReinstallProtocolInterface(h1, &g1, &iface1, &iface1c);
    CHECK_ST("reinstall-protocol", st, EFI_SUCCESS);
    p = iface_of(h1, &g1, &st);
    CHECK("reinstall-new-interface", st == EFI_SUCCESS && p == &iface1c);
    CHECK_ST("notify-signalled-on-reinstall", gBS->CheckEvent(nev), EFI_SUCCESS);
    st = gBS->ReinstallProtocolInterface(h1, &g1, &wrong, &iface1);
    CHECK_ST("reinstall-wrong-old", st, EFI_NOT_FOUND);

    st = gBS->UninstallProtocolInterface(h1, &g1, &wrong);
    CHECK_ST("uninstall-wrong-interface", st, EFI_NOT_FOUND);
    st = gBS->UninstallProtocolInterface(h1, &g1, &iface1c);
    CHECK_ST("uninstall-protocol", st, EFI_SUCCESS);
    iface_of(h1, &g1, &st);
    CHECK_ST("uninstall-gone", st, EFI_UNSUPPORTED);
    p = iface_of(h1, &g2, &st);
    CHECK("uninstall-other-protocol-kept", st == EFI_SUCCESS && p == &iface2);
    st = gBS->UninstallProtocolInterface(h1, &g1, &iface1c);
    CHECK_ST("uninstall-again", st, EFI_NOT_FOUND);
}

static void test_multiple(void)
{
    EFI_STATUS st;
    VOID *p;

    st = gBS->InstallMultipleProtocolInterfaces(&h3, &g1, &iface3a, &g2, &iface3b, NULL);
    CHECK("install-multiple", st == EFI_SUCCESS && h3 != NULL);
    p = iface_of(h3, &g1, &st);
    CHECK("install-multiple-first", st == EFI_SUCCESS && p == &iface3a);
    p = iface_of(h3, &g2, &st);
    CHECK("install-multiple-second", st == EFI_SUCCESS && p == &iface3b);

    /* g1 is already on h3: the whole call fails and g3 is rolled back */
    EFI_HANDLE same = h3;
    st = gBS->InstallMultipleProtocolInterfaces(&same, &g3, &iface3c, &g1, &iface3a, NULL);
    CHECK_ST("install-multiple-duplicate", st, EFI_INVALID_PARAMETER);
    iface_of(h3, &g3, &st);
    CHECK_ST("install-multiple-rollback", st, EFI_UNSUPPORTED);

    st = gBS->UninstallMultipleProtocolInterfaces(h3, &g1, &wrong, NULL);
    CHECK_ST("uninstall-multiple-wrong", st, EFI_INVALID_PARAMETER);
    st = gBS->UninstallMultipleProtocolInterfaces(h3, &g1, &iface3a, &g2, &wrong, NULL);
    CHECK_ST("uninstall-multiple-partial", st, EFI_INVALID_PARAMETER);
    p = iface_of(h3, &g1, &st);
    CHECK("uninstall-multiple-rollback", st == EFI_SUCCESS && p == &iface3a);
    st = gBS->UninstallMultipleProtocolInterfaces(h3, &g1, &iface3a, &g2, &iface3b, NULL);
    CHECK_ST("uninstall-multiple", st, EFI_SUCCESS);
    st = gBS->LocateProtocol(&g2, NULL, &p);
    CHECK("uninstall-multiple-gone", st == EFI_SUCCESS && p == &iface2);  /* only h1's g2 left */
}

typedef struct {
    VENDOR_DEVICE_PATH a;
    VENDOR_DEVICE_PATH b;
    EFI_DEVICE_PATH_PROTOCOL end;
} __attribute__((packed)) TWO_NODE_PATH;

typedef struct {
    VENDOR_DEVICE_PATH a;
    EFI_DEVICE_PATH_PROTOCOL end;
} __attribute__((packed)) ONE_NODE_PATH;

#define VENDOR_NODE(d4last) \
    {{HARDWARE_DEVICE_PATH, HW_VENDOR_DP, {sizeof(VENDOR_DEVICE_PATH), 0}}, \
     {0x9a1b2c3d, 0x4e5f, 0x4a6b, {0x8c, 0x7d, 0x6e, 0x5f, 0x40, 0x31, 0x22, d4last}}}
#define END_NODE {END_DEVICE_PATH_TYPE, END_ENTIRE_DEVICE_PATH_SUBTYPE, {4, 0}}

static ONE_NODE_PATH dp_installed = {VENDOR_NODE(0x01), END_NODE};
static ONE_NODE_PATH dp_same = {VENDOR_NODE(0x01), END_NODE};
static TWO_NODE_PATH dp_child = {VENDOR_NODE(0x01), VENDOR_NODE(0x02), END_NODE};
static ONE_NODE_PATH dp_unknown = {VENDOR_NODE(0x77), END_NODE};

static void test_device_path(void)
{
    EFI_STATUS st;
    EFI_DEVICE_PATH_PROTOCOL *dp;
    EFI_HANDLE found;

    st = gBS->InstallMultipleProtocolInterfaces(&h4, &dp_guid, &dp_installed, &g3, &iface3c, NULL);
    if (!CHECK_ST("install-device-path", st, EFI_SUCCESS))
        return;

    dp = (EFI_DEVICE_PATH_PROTOCOL *)&dp_child;
    found = NULL;
    st = gBS->LocateDevicePath(&dp_guid, &dp, &found);
    CHECK("locate-device-path-prefix", st == EFI_SUCCESS && found == h4);
    CHECK("locate-device-path-remaining", dp == (EFI_DEVICE_PATH_PROTOCOL *)&dp_child.b);

    dp = (EFI_DEVICE_PATH_PROTOCOL *)&dp_same;
    found = NULL;
    st = gBS->LocateDevicePath(&dp_guid, &dp, &found);
    CHECK("locate-device-path-exact", st == EFI_SUCCESS && found == h4 && dp == &dp_same.end);

    dp = (EFI_DEVICE_PATH_PROTOCOL *)&dp_child;
    found = NULL;
    st = gBS->LocateDevicePath(&g3, &dp, &found);
    CHECK("locate-device-path-other-protocol", st == EFI_SUCCESS && found == h4 &&
          dp == (EFI_DEVICE_PATH_PROTOCOL *)&dp_child.b);

    dp = (EFI_DEVICE_PATH_PROTOCOL *)&dp_child;
    st = gBS->LocateDevicePath(&g2, &dp, &found);
    CHECK_ST("locate-device-path-protocol-missing", st, EFI_NOT_FOUND);

    dp = (EFI_DEVICE_PATH_PROTOCOL *)&dp_unknown;
    st = gBS->LocateDevicePath(&dp_guid, &dp, &found);
    CHECK_ST("locate-device-path-unknown", st, EFI_NOT_FOUND);
    CHECK("locate-device-path-unknown-unchanged", dp == (EFI_DEVICE_PATH_PROTOCOL *)&dp_unknown);

    EFI_HANDLE h5 = NULL;
    st = gBS->InstallMultipleProtocolInterfaces(&h5, &dp_guid, &dp_same, NULL);
    CHECK_ST("install-multiple-duplicate-device-path", st, EFI_ALREADY_STARTED);

    st = gBS->UninstallMultipleProtocolInterfaces(h4, &dp_guid, &dp_installed, &g3, &iface3c, NULL);
    CHECK_ST("uninstall-device-path", st, EFI_SUCCESS);
    dp = (EFI_DEVICE_PATH_PROTOCOL *)&dp_child;
    st = gBS->LocateDevicePath(&dp_guid, &dp, &found);
    CHECK_ST("locate-device-path-after-uninstall", st, EFI_NOT_FOUND);
}

static void cleanup(void)
{
    EFI_STATUS a = gBS->UninstallProtocolInterface(h1, &g2, &iface2);
    EFI_STATUS b = gBS->UninstallProtocolInterface(h2, &g1, &iface1b);
    CHECK("cleanup-uninstall", a == EFI_SUCCESS && b == EFI_SUCCESS);
    VOID *p;
    CHECK_ST("cleanup-nothing-left", gBS->LocateProtocol(&g1, NULL, &p), EFI_NOT_FOUND);
    CHECK_ST("cleanup-close-notify-event", gBS->CloseEvent(nev), EFI_SUCCESS);
}

EFI_STATUS EFIAPI efi_main(EFI_HANDLE image, EFI_SYSTEM_TABLE *st)
{
    lib_init(image, st);
    say("protocols: protocol handler services\n");
    test_install();
    test_open_close();
    test_locate();
    test_reinstall_uninstall();
    test_multiple();
    test_device_path();
    cleanup();
    return finish();
}
