/*
 * images: image services (UEFI 2.10 §7.4). The app loads a second copy of itself from the
 * device it was loaded from (LoadImage with a device path, SourceBuffer NULL), checks the
 * child's LoadedImage, starts it with LoadOptions "child", and the child calls Exit() with a
 * status and ExitData (a pool-allocated CHAR16 string) that StartImage must hand back. Also:
 * UnloadImage of an image that was never started, LoadImage of garbage, and bad handles.
 * Needs a file system: run under vmrun with --esp, or from a disk under OVMF.
 */
#include "lib.h"

static EFI_GUID li_guid = EFI_LOADED_IMAGE_PROTOCOL_GUID;
static EFI_GUID dp_guid = EFI_DEVICE_PATH_PROTOCOL_GUID;
static CHAR16 child_options[] = L"child";
static const CHAR16 exit_text[] = L"child-exit-data";
#define CHILD_STATUS ((EFI_STATUS)0x8000000000000015ULL)   /* EFI_ABORTED */

static EFI_STATUS run_child(EFI_HANDLE image)
{
    CHAR16 *data = NULL;
    gBS->AllocatePool(EfiBootServicesData, sizeof(exit_text), (VOID **)&data);
    memcpy(data, exit_text, sizeof(exit_text));
    say("images: child running, calling Exit\n");
    gBS->Exit(image, CHILD_STATUS, sizeof(exit_text), data);
    say("FAIL child-exit-returned: Exit returned to its caller\n");
    return EFI_SUCCESS;
}

static EFI_DEVICE_PATH_PROTOCOL *own_path(EFI_LOADED_IMAGE_PROTOCOL *li)
{
    EFI_DEVICE_PATH_PROTOCOL *dev = NULL, *full = NULL;
    if (gBS->HandleProtocol(li->DeviceHandle, &dp_guid, (VOID **)&dev) != EFI_SUCCESS)
        return NULL;
    UINTN devlen = 0, filelen = 0;
    for (EFI_DEVICE_PATH_PROTOCOL *n = dev; !dp_is_end(n); n = dp_next(n))
        devlen += dp_node_len(n);
    for (EFI_DEVICE_PATH_PROTOCOL *n = li->FilePath; !dp_is_end(n); n = dp_next(n))
        filelen += dp_node_len(n);
    if (gBS->AllocatePool(EfiLoaderData, devlen + filelen + 4, (VOID **)&full) != EFI_SUCCESS)
        return NULL;
    memcpy(full, dev, devlen);
    memcpy((UINT8 *)full + devlen, li->FilePath, filelen + 4);  /* the file path and its end node */
    return full;
}

EFI_STATUS EFIAPI efi_main(EFI_HANDLE image, EFI_SYSTEM_TABLE *st)
{
    EFI_LOADED_IMAGE_PROTOCOL *li = NULL, *cli = NULL;
    EFI_HANDLE child = NULL, spare = NULL, junk = NULL;
    EFI_STATUS s;
    UINTN exit_size = 0;
    CHAR16 *exit_data = NULL;
    static UINT8 garbage[4096];

    lib_init(image, st);
    s = gBS->HandleProtocol(image, &li_guid, (VOID **)&li);
    if (s == EFI_SUCCESS && li->LoadOptionsSize >= sizeof(child_options) && li->LoadOptions &&
        streq16((CHAR16 *)li->LoadOptions, child_options))
        return run_child(image);

    say("images: image services\n");
    CHECK_ST("own-loaded-image", s, EFI_SUCCESS);
    EFI_DEVICE_PATH_PROTOCOL *path = own_path(li);
    CHECK("own-device-path", path != NULL);

    s = gBS->LoadImage(FALSE, image, path, NULL, 0, &child);
    CHECK_ST("load-from-device-path", s, EFI_SUCCESS);
    s = gBS->HandleProtocol(child, &li_guid, (VOID **)&cli);
    CHECK_ST("child-loaded-image", s, EFI_SUCCESS);
    if (s == EFI_SUCCESS) {
        CHECK("child-parent-handle", cli->ParentHandle == image);
        CHECK("child-system-table", cli->SystemTable == st);
        CHECK("child-device-handle", cli->DeviceHandle == li->DeviceHandle);
        CHECK("child-image-base-mz", cli->ImageBase && ((UINT8 *)cli->ImageBase)[0] == 'M' &&
              ((UINT8 *)cli->ImageBase)[1] == 'Z');
        CHECK("child-separate-copy", cli->ImageBase != li->ImageBase);
        CHECK_EQ("child-image-size", cli->ImageSize, li->ImageSize);
        CHECK_EQ("child-code-type", cli->ImageCodeType, EfiLoaderCode);
        cli->LoadOptions = child_options;
        cli->LoadOptionsSize = sizeof(child_options);
    }
    s = gBS->StartImage(child, &exit_size, &exit_data);
    CHECK_ST("start-returns-exit-status", s, CHILD_STATUS);
    CHECK_EQ("exit-data-size", exit_size, sizeof(exit_text));
    CHECK("exit-data", exit_data != NULL && streq16(exit_data, exit_text));
    if (exit_data)
        gBS->FreePool(exit_data);

    s = gBS->LoadImage(FALSE, image, path, NULL, 0, &spare);
    CHECK_ST("load-second-copy", s, EFI_SUCCESS);
    s = gBS->UnloadImage(spare);
    CHECK_ST("unload-unstarted", s, EFI_SUCCESS);
    s = gBS->HandleProtocol(spare, &li_guid, (VOID **)&cli);
    CHECK("unloaded-handle-gone", s != EFI_SUCCESS);

    for (UINTN i = 0; i < sizeof(garbage); i++)
        garbage[i] = (UINT8)(i * 7 + 3);
    s = gBS->LoadImage(FALSE, image, NULL, garbage, sizeof(garbage), &junk);
    CHECK("load-garbage-refused", s == EFI_LOAD_ERROR || s == EFI_UNSUPPORTED);
    s = gBS->StartImage((EFI_HANDLE)garbage, NULL, NULL);
    CHECK_ST("start-bad-handle", s, EFI_INVALID_PARAMETER);
    s = gBS->LoadImage(FALSE, (EFI_HANDLE)garbage, path, NULL, 0, &junk);
    CHECK_ST("load-bad-parent", s, EFI_INVALID_PARAMETER);
    return finish();
}
