/*
 * image: EFI_LOADED_IMAGE_PROTOCOL (UEFI 2.10 section 9.1), the loaded-image device path
 * (9.2), base relocations, LoadOptions, and EFI_RNG_PROTOCOL (37.5).
 *
 * The device the image was loaded from: DeviceHandle is set, carries a device path ending in
 * a Hard Drive node (10.3.5.1) and EFI_SIMPLE_FILE_SYSTEM_PROTOCOL (13.4) whose OpenVolume
 * opens the root directory; FilePath starts with a File Path node (10.3.5.4).
 *
 * LoadOptions: vmrun passes the kernel command line as UTF-16 (the test uses
 * --cmdline "vmrun-test-options 123").  Under a boot manager that passes no text
 * (OVMF's default boot of EFI/BOOT/BOOTX64.EFI passes no options or binary data), the
 * check reports "ok image-load-options-skipped" instead.
 */
#include "lib.h"

static EFI_GUID li_guid = EFI_LOADED_IMAGE_PROTOCOL_GUID;
static EFI_GUID lidp_guid = EFI_LOADED_IMAGE_DEVICE_PATH_PROTOCOL_GUID;
static EFI_GUID rng_guid = EFI_RNG_PROTOCOL_GUID;
static EFI_GUID dp_guid = EFI_DEVICE_PATH_PROTOCOL_GUID;
static EFI_GUID sfs_guid = {0x964e5b22, 0x6459, 0x11d2, {0x8e, 0x39, 0x00, 0xa0, 0xc9, 0x69, 0x72, 0x3b}};

/* 13.4 / 13.5, only the members used here (not in include/efi.h) */
typedef struct _FILE_ROOT {
    UINT64 Revision;
    VOID *Open;
    EFI_STATUS (EFIAPI *Close)(struct _FILE_ROOT *This);
} FILE_ROOT;
typedef struct _SIMPLE_FILE_SYSTEM {
    UINT64 Revision;
    EFI_STATUS (EFIAPI *OpenVolume)(struct _SIMPLE_FILE_SYSTEM *This, FILE_ROOT **Root);
} SIMPLE_FILE_SYSTEM;
static EFI_GUID bogus_alg = {0x0badc0de, 0x1111, 0x2222, {0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa}};

static const CHAR16 expected_options[] = L"vmrun-test-options 123";

/* relocation probe: an absolute pointer in .data that the loader must fix up */
static int marker;
static int *volatile marker_ptr = &marker;
EFI_STATUS EFIAPI efi_main(EFI_HANDLE image, EFI_SYSTEM_TABLE *st);
static VOID *volatile entry_ptr = (VOID *)efi_main;

static int path_wellformed(EFI_DEVICE_PATH_PROTOCOL *dp, UINTN *nodes)
{
    *nodes = 0;
    for (int i = 0; i < 128; i++) {
        UINTN len = dp_node_len(dp);
        if (len < 4)
            return 0;
        if (dp_is_end(dp))
            return len == 4;
        (*nodes)++;
        dp = dp_next(dp);
    }
    return 0;
}

static void test_loaded_image(void)
{
    EFI_LOADED_IMAGE_PROTOCOL *li = NULL, *li2 = NULL;
    EFI_STATUS st = gBS->OpenProtocol(gImage, &li_guid, (VOID **)&li, gImage, NULL,
                                      EFI_OPEN_PROTOCOL_GET_PROTOCOL);
    if (!CHECK("loaded-image-open", st == EFI_SUCCESS && li != NULL))
        return;
    st = gBS->HandleProtocol(gImage, &li_guid, (VOID **)&li2);
    CHECK("loaded-image-handle-protocol", st == EFI_SUCCESS && li2 == li);

    CHECK_EQ("loaded-image-revision", li->Revision, EFI_LOADED_IMAGE_PROTOCOL_REVISION);
    CHECK("loaded-image-system-table", li->SystemTable == gST);
    CHECK_EQ("loaded-image-code-type", li->ImageCodeType, EfiLoaderCode);
    CHECK_EQ("loaded-image-data-type", li->ImageDataType, EfiLoaderData);

    UINT8 *base = li->ImageBase;
    if (!CHECK("loaded-image-base-mz", base != NULL && base[0] == 'M' && base[1] == 'Z'))
        return;
    UINT32 lfanew = *(UINT32 *)(base + 0x3C);
    UINT8 *pe = base + lfanew;
    CHECK("loaded-image-pe-signature", pe[0] == 'P' && pe[1] == 'E' && pe[2] == 0 && pe[3] == 0);
    UINT8 *opt = pe + 24;                       /* optional header */
    UINT16 magic = *(UINT16 *)opt;
    UINT32 size_of_image = *(UINT32 *)(opt + 56);
    UINT16 subsystem = *(UINT16 *)(opt + 68);
    UINT32 entry_rva = *(UINT32 *)(opt + 16);
    CHECK_EQ("loaded-image-pe32plus", magic, 0x20B);
    CHECK_EQ("loaded-image-subsystem", subsystem, 10);
    if (li->ImageSize >= size_of_image)
        pass("loaded-image-size");
    else
        fail("loaded-image-size", "ImageSize %x < SizeOfImage %x", li->ImageSize, (UINT64)size_of_image);
    UINTN entry = (UINTN)efi_main;
    CHECK("loaded-image-entry-inside", entry >= (UINTN)base && entry < (UINTN)base + li->ImageSize);
    CHECK("loaded-image-entry-rva", (UINTN)base + entry_rva == entry);
    CHECK("image-relocated-data-pointer", marker_ptr == &marker);
    CHECK("image-relocated-function-pointer", entry_ptr == (VOID *)efi_main);
    say("image base %x size %x\n", (UINT64)(UINTN)base, li->ImageSize);

    if (li->FilePath) {
        UINTN n;
        CHECK("loaded-image-file-path", path_wellformed(li->FilePath, &n));
    } else {
        pass("loaded-image-file-path");
    }

    /* LoadOptions */
    CHECK("load-options-consistent", (li->LoadOptionsSize == 0) == (li->LoadOptions == NULL) ||
          li->LoadOptionsSize == 0);
    CHAR16 *lo = li->LoadOptions;
    UINTN nch = li->LoadOptionsSize / 2, len = 0;
    int text = lo != NULL && li->LoadOptionsSize >= 2 && (li->LoadOptionsSize & 1) == 0;
    for (; text && len < nch && lo[len]; len++)
        if (lo[len] < 0x20 || lo[len] > 0x7E)
            text = 0;
    if (text && len > 0) {
        say("load options: \"%S\" (%u bytes)\n", lo[len] == 0 ? lo : L"(unterminated)",
            (UINT64)li->LoadOptionsSize);
        UINTN want = sizeof(expected_options) / 2 - 1;
        if (len == want && memcmp(lo, expected_options, want * 2) == 0)
            pass("image-load-options");
        else
            fail("image-load-options", "LoadOptions is not \"vmrun-test-options 123\"");
        CHECK("image-load-options-size", li->LoadOptionsSize == 2 * want || li->LoadOptionsSize == 2 * (want + 1));
    } else {
        say("load options: %u bytes, not text\n", (UINT64)li->LoadOptionsSize);
        pass("image-load-options-skipped");
    }
}

static void test_device(void)
{
    EFI_LOADED_IMAGE_PROTOCOL *li = NULL;
    if (gBS->HandleProtocol(gImage, &li_guid, (VOID **)&li) != EFI_SUCCESS || li == NULL)
        return;   /* reported by test_loaded_image */
    EFI_DEVICE_PATH_PROTOCOL *fp = li->FilePath;
    CHECK("loaded-image-file-path-node", fp != NULL && fp->Type == 4 && fp->SubType == 4);
    if (!CHECK("loaded-image-device-handle", li->DeviceHandle != NULL))
        return;

    EFI_DEVICE_PATH_PROTOCOL *dp = NULL, *last = NULL;
    EFI_STATUS st = gBS->HandleProtocol(li->DeviceHandle, &dp_guid, (VOID **)&dp);
    if (CHECK_ST("loaded-image-device-path-protocol", st, EFI_SUCCESS) && dp) {
        for (int i = 0; i < 32 && !dp_is_end(dp) && dp_node_len(dp) >= 4; i++) {
            last = dp;
            dp = dp_next(dp);
        }
        CHECK("loaded-image-device-path-hd", last != NULL && last->Type == 4 && last->SubType == 1);
    }

    SIMPLE_FILE_SYSTEM *sfs = NULL;
    st = gBS->HandleProtocol(li->DeviceHandle, &sfs_guid, (VOID **)&sfs);
    if (!CHECK("loaded-image-device-sfs", st == EFI_SUCCESS && sfs != NULL))
        return;
    FILE_ROOT *root = NULL;
    st = sfs->OpenVolume(sfs, &root);
    if (CHECK("loaded-image-open-volume", st == EFI_SUCCESS && root != NULL))
        CHECK_ST("loaded-image-volume-close", root->Close(root), EFI_SUCCESS);
}

static void test_device_path(void)
{
    EFI_DEVICE_PATH_PROTOCOL *dp = NULL;
    EFI_STATUS st = gBS->HandleProtocol(gImage, &lidp_guid, (VOID **)&dp);
    CHECK_ST("loaded-image-device-path", st, EFI_SUCCESS);
    if (st == EFI_SUCCESS && dp) {
        UINTN n = 0;
        CHECK("loaded-image-device-path-wellformed", path_wellformed(dp, &n));
        say("loaded image device path: %u nodes\n", (UINT64)n);
    } else if (st == EFI_SUCCESS) {
        pass("loaded-image-device-path-wellformed");   /* NULL: image without a path */
    }
}

static void test_rng(void)
{
    EFI_RNG_PROTOCOL *rng = NULL;
    EFI_STATUS st = gBS->LocateProtocol(&rng_guid, NULL, (VOID **)&rng);
    if (!CHECK("rng-locate", st == EFI_SUCCESS && rng != NULL))
        return;

    EFI_RNG_ALGORITHM algs[16];
    UINTN size = 0;
    st = rng->GetInfo(rng, &size, algs);
    CHECK("rng-get-info-probe", st == EFI_BUFFER_TOO_SMALL && size >= sizeof(EFI_GUID) &&
          size % sizeof(EFI_GUID) == 0);
    size = sizeof(algs);
    st = rng->GetInfo(rng, &size, algs);
    CHECK("rng-get-info", st == EFI_SUCCESS && size >= sizeof(EFI_GUID) && size % sizeof(EFI_GUID) == 0);
    UINTN nalg = size / sizeof(EFI_GUID);
    say("rng: %u algorithm(s), first %x\n", (UINT64)nalg, (UINT64)algs[0].Data1);

    UINT8 a[32], b[32], c[32], zero[32];
    memset(a, 0, 32);
    memset(b, 0, 32);
    memset(zero, 0, 32);
    EFI_STATUS s1 = rng->GetRNG(rng, NULL, 32, a);
    EFI_STATUS s2 = rng->GetRNG(rng, NULL, 32, b);
    CHECK("rng-get-rng", s1 == EFI_SUCCESS && s2 == EFI_SUCCESS);
    CHECK("rng-not-zero", memcmp(a, zero, 32) != 0 && memcmp(b, zero, 32) != 0);
    CHECK("rng-differs", memcmp(a, b, 32) != 0);
    if (nalg) {
        memset(c, 0, 32);
        st = rng->GetRNG(rng, &algs[0], 32, c);
        CHECK("rng-get-rng-listed-algorithm", st == EFI_SUCCESS && memcmp(c, zero, 32) != 0);
    }
    st = rng->GetRNG(rng, &bogus_alg, 32, c);
    CHECK_ST("rng-unknown-algorithm", st, EFI_UNSUPPORTED);
    st = rng->GetRNG(rng, NULL, 0, c);
    CHECK_ST("rng-zero-length", st, EFI_INVALID_PARAMETER);
    st = rng->GetRNG(rng, NULL, 32, NULL);
    CHECK_ST("rng-null-buffer", st, EFI_INVALID_PARAMETER);
}

EFI_STATUS EFIAPI efi_main(EFI_HANDLE image, EFI_SYSTEM_TABLE *st)
{
    lib_init(image, st);
    say("image: loaded image, device path, load options, RNG\n");
    test_loaded_image();
    test_device();
    test_device_path();
    test_rng();
    return finish();
}
