/*
 * chain: helper for run_ovmf.py --cmdline (not a test of its own).  Booted as
 * EFI/BOOT/BOOTX64.EFI, it loads EFI/BOOT/PAYLOAD.EFI from the same device with
 * LoadImage, sets the child's LoadOptions to the UTF-16 string "vmrun-test-options 123"
 * (what vmrun's tests pass with --cmdline) and starts it.  This lets image.c check the
 * LoadOptions string under real firmware too.
 */
#include "lib.h"

static EFI_GUID li_guid = EFI_LOADED_IMAGE_PROTOCOL_GUID;
static EFI_GUID dp_guid = EFI_DEVICE_PATH_PROTOCOL_GUID;
static CHAR16 options[] = L"vmrun-test-options 123";
static const CHAR16 payload[] = L"\\EFI\\BOOT\\PAYLOAD.EFI";

EFI_STATUS EFIAPI efi_main(EFI_HANDLE image, EFI_SYSTEM_TABLE *st)
{
    EFI_LOADED_IMAGE_PROTOCOL *li = NULL, *child_li = NULL;
    EFI_DEVICE_PATH_PROTOCOL *dev = NULL, *full = NULL;
    EFI_HANDLE child = NULL;
    EFI_STATUS s;

    lib_init(image, st);
    s = gBS->HandleProtocol(image, &li_guid, (VOID **)&li);
    if (s == EFI_SUCCESS)
        s = gBS->HandleProtocol(li->DeviceHandle, &dp_guid, (VOID **)&dev);
    if (s != EFI_SUCCESS) {
        say("chain: no device path for the boot device: %r\n", s);
        return s;
    }
    /* device path of the boot device + a file path node for the payload */
    UINTN devlen = 0;
    for (EFI_DEVICE_PATH_PROTOCOL *n = dev; !dp_is_end(n); n = dp_next(n))
        devlen += dp_node_len(n);
    UINTN fnode = 4 + sizeof(payload);
    s = gBS->AllocatePool(EfiLoaderData, devlen + fnode + 4, (VOID **)&full);
    if (s != EFI_SUCCESS)
        return s;
    UINT8 *p = (UINT8 *)full;
    memcpy(p, dev, devlen);
    p += devlen;
    p[0] = MEDIA_DEVICE_PATH;
    p[1] = 4;   /* MEDIA_FILEPATH_DP */
    p[2] = (UINT8)fnode;
    p[3] = (UINT8)(fnode >> 8);
    memcpy(p + 4, payload, sizeof(payload));
    p += fnode;
    p[0] = END_DEVICE_PATH_TYPE;
    p[1] = END_ENTIRE_DEVICE_PATH_SUBTYPE;
    p[2] = 4;
    p[3] = 0;

    s = gBS->LoadImage(FALSE, image, full, NULL, 0, &child);
    if (s != EFI_SUCCESS) {
        say("chain: LoadImage failed: %r\n", s);
        return s;
    }
    s = gBS->HandleProtocol(child, &li_guid, (VOID **)&child_li);
    if (s != EFI_SUCCESS)
        return s;
    child_li->LoadOptions = options;
    child_li->LoadOptionsSize = sizeof(options);
    say("chain: starting payload with load options \"%S\"\n", options);
    s = gBS->StartImage(child, NULL, NULL);
    say("chain: payload returned %r\n", s);
    return s;
}
