/*
 * misc: CalculateCrc32, CopyMem, SetMem, GetNextMonotonicCount, InstallConfigurationTable,
 * and the system / boot services / runtime services table headers (UEFI 2.10 sections
 * 4.2-4.6 and 7.4-7.5).
 */
#include "lib.h"

static EFI_GUID test_table_guid =
    {0x7d1c2e4a, 0x5b6f, 0x4c3d, {0x9e, 0x8a, 0x1f, 0x2b, 0x3c, 0x4d, 0x5e, 0x6f}};
static EFI_GUID absent_table_guid =
    {0x7d1c2e4a, 0x5b6f, 0x4c3d, {0x9e, 0x8a, 0x1f, 0x2b, 0x3c, 0x4d, 0x5e, 0x70}};

static void test_crc(void)
{
    static char vec[] = "123456789";
    UINT32 crc = 0;
    EFI_STATUS st = gBS->CalculateCrc32(vec, 9, &crc);
    CHECK_ST("crc32-status", st, EFI_SUCCESS);
    CHECK_EQ("crc32-vector", crc, 0xCBF43926u);
    CHECK_EQ("crc32-local-vector", crc32_calc(vec, 9), 0xCBF43926u);
    st = gBS->CalculateCrc32(vec, 0, &crc);
    CHECK_ST("crc32-zero-size", st, EFI_INVALID_PARAMETER);
    st = gBS->CalculateCrc32(vec, 9, NULL);
    CHECK_ST("crc32-null-out", st, EFI_INVALID_PARAMETER);
}

static void test_mem(void)
{
    UINT8 buf[64];
    int ok = 1;

    for (int i = 0; i < 64; i++) buf[i] = (UINT8)i;
    gBS->CopyMem(buf + 8, buf, 32);          /* overlapping, destination above source */
    for (int i = 0; i < 32; i++) if (buf[8 + i] != i) ok = 0;
    for (int i = 0; i < 8; i++) if (buf[i] != i) ok = 0;
    for (int i = 40; i < 64; i++) if (buf[i] != i) ok = 0;
    CHECK("copymem-overlap-up", ok);

    ok = 1;
    for (int i = 0; i < 64; i++) buf[i] = (UINT8)i;
    gBS->CopyMem(buf, buf + 8, 32);          /* overlapping, destination below source */
    for (int i = 0; i < 32; i++) if (buf[i] != i + 8) ok = 0;
    for (int i = 32; i < 64; i++) if (buf[i] != i) ok = 0;
    CHECK("copymem-overlap-down", ok);

    ok = 1;
    UINT8 src[16], dst[16];
    for (int i = 0; i < 16; i++) { src[i] = (UINT8)(0xA0 + i); dst[i] = 0; }
    gBS->CopyMem(dst, src, 16);
    for (int i = 0; i < 16; i++) if (dst[i] != 0xA0 + i) ok = 0;
    CHECK("copymem-plain", ok);

    ok = 1;
    for (int i = 0; i < 64; i++) buf[i] = 0;
    gBS->SetMem(buf + 3, 50, 0x5A);
    for (int i = 0; i < 64; i++)
        if (buf[i] != ((i >= 3 && i < 53) ? 0x5A : 0)) ok = 0;
    CHECK("setmem", ok);
    gBS->SetMem(buf, 0, 0xFF);               /* zero length: no change */
    CHECK("setmem-zero-length", buf[0] == 0);
}

static void test_monotonic(void)
{
    UINT64 a = 0, b = 0, c = 0;
    EFI_STATUS s1 = gBS->GetNextMonotonicCount(&a);
    EFI_STATUS s2 = gBS->GetNextMonotonicCount(&b);
    EFI_STATUS s3 = gBS->GetNextMonotonicCount(&c);
    CHECK("monotonic-status", s1 == EFI_SUCCESS && s2 == EFI_SUCCESS && s3 == EFI_SUCCESS);
    if (b > a && c > b)
        pass("monotonic-increases");
    else
        fail("monotonic-increases", "%x, %x, %x", a, b, c);
    CHECK_ST("monotonic-null", gBS->GetNextMonotonicCount(NULL), EFI_INVALID_PARAMETER);
}

static VOID *find_table(const EFI_GUID *g, UINTN *count)
{
    VOID *found = NULL;
    *count = 0;
    for (UINTN i = 0; i < gST->NumberOfTableEntries; i++)
        if (guid_eq(&gST->ConfigurationTable[i].VendorGuid, g)) {
            found = gST->ConfigurationTable[i].VendorTable;
            (*count)++;
        }
    return found;
}

static int header_crc_ok(const char *name, EFI_TABLE_HEADER *h)
{
    UINT8 *copy = NULL;
    if (h->HeaderSize < sizeof(EFI_TABLE_HEADER) || h->HeaderSize > 0x10000) {
        fail(name, "implausible HeaderSize %x", (UINT64)h->HeaderSize);
        return 0;
    }
    if (gBS->AllocatePool(EfiLoaderData, h->HeaderSize, (VOID **)&copy) != EFI_SUCCESS) {
        fail(name, "AllocatePool failed");
        return 0;
    }
    memcpy(copy, h, h->HeaderSize);
    ((EFI_TABLE_HEADER *)copy)->CRC32 = 0;
    UINT32 want = crc32_calc(copy, h->HeaderSize);
    gBS->FreePool(copy);
    if (want == h->CRC32) {
        pass(name);
        return 1;
    }
    fail(name, "CRC32 field %x, computed %x over %x bytes", (UINT64)h->CRC32, (UINT64)want,
         (UINT64)h->HeaderSize);
    return 0;
}

static void test_tables(void)
{
    EFI_TABLE_HEADER *sh = &gST->Hdr, *bh = &gBS->Hdr, *rh = &gRT->Hdr;

    CHECK_EQ("systab-signature", sh->Signature, EFI_SYSTEM_TABLE_SIGNATURE);
    if (sh->Revision >= EFI_2_70_SYSTEM_TABLE_REVISION)
        pass("systab-revision");
    else
        fail("systab-revision", "%x < 2.70", (UINT64)sh->Revision);
    CHECK("systab-header-size", sh->HeaderSize >= sizeof(EFI_SYSTEM_TABLE));
    header_crc_ok("systab-crc32", sh);

    CHECK_EQ("bs-signature", bh->Signature, EFI_BOOT_SERVICES_SIGNATURE);
    CHECK("bs-revision", bh->Revision >= EFI_2_70_SYSTEM_TABLE_REVISION);
    CHECK("bs-header-size", bh->HeaderSize >= sizeof(EFI_BOOT_SERVICES));
    header_crc_ok("bs-crc32", bh);

    CHECK_EQ("rt-signature", rh->Signature, EFI_RUNTIME_SERVICES_SIGNATURE);
    CHECK("rt-revision", rh->Revision >= EFI_2_70_SYSTEM_TABLE_REVISION);
    CHECK("rt-header-size", rh->HeaderSize >= sizeof(EFI_RUNTIME_SERVICES));
    header_crc_ok("rt-crc32", rh);

    CHECK("firmware-vendor", gST->FirmwareVendor != NULL && gST->FirmwareVendor[0] != 0);
    if (gST->FirmwareVendor)
        say("firmware vendor: %S, revision %x\n", gST->FirmwareVendor, (UINT64)gST->FirmwareRevision);
    CHECK("conin-present", gST->ConIn != NULL);
    CHECK("conout-present", gST->ConOut != NULL);
    CHECK("stderr-present", gST->StdErr != NULL);
    CHECK("conin-handle", gST->ConsoleInHandle != NULL);
    CHECK("conout-handle", gST->ConsoleOutHandle != NULL);
    CHECK("config-table-present", gST->NumberOfTableEntries == 0 || gST->ConfigurationTable != NULL);

    /* every service pointer of both tables is filled in */
    int filled = 1;
    VOID **bsv = (VOID **)((UINT8 *)gBS + sizeof(EFI_TABLE_HEADER));
    for (UINTN i = 0; i < (sizeof(EFI_BOOT_SERVICES) - sizeof(EFI_TABLE_HEADER)) / sizeof(VOID *); i++)
        if (&bsv[i] != (VOID **)&gBS->Reserved && bsv[i] == NULL)
            filled = 0;
    CHECK("bs-all-services", filled);
    filled = 1;
    VOID **rtv = (VOID **)((UINT8 *)gRT + sizeof(EFI_TABLE_HEADER));
    for (UINTN i = 0; i < (sizeof(EFI_RUNTIME_SERVICES) - sizeof(EFI_TABLE_HEADER)) / sizeof(VOID *); i++)
        if (rtv[i] == NULL)
            filled = 0;
    CHECK("rt-all-services", filled);
}

static void test_config_table(void)
{
    static UINT64 table_a = 0xAAAA, table_b = 0xBBBB;
    UINTN n0 = gST->NumberOfTableEntries, count;

    find_table(&test_table_guid, &count);
    CHECK_EQ("cfgtable-initially-absent", count, 0);

    EFI_STATUS st = gBS->InstallConfigurationTable(&test_table_guid, &table_a);
    CHECK_ST("cfgtable-add", st, EFI_SUCCESS);
    CHECK_EQ("cfgtable-add-count", gST->NumberOfTableEntries, n0 + 1);
    VOID *t = find_table(&test_table_guid, &count);
    CHECK("cfgtable-add-entry", count == 1 && t == &table_a);
    header_crc_ok("cfgtable-add-systab-crc32", &gST->Hdr);

    st = gBS->InstallConfigurationTable(&test_table_guid, &table_b);
    CHECK_ST("cfgtable-replace", st, EFI_SUCCESS);
    CHECK_EQ("cfgtable-replace-count", gST->NumberOfTableEntries, n0 + 1);
    t = find_table(&test_table_guid, &count);
    CHECK("cfgtable-replace-entry", count == 1 && t == &table_b);

    st = gBS->InstallConfigurationTable(&test_table_guid, NULL);
    CHECK_ST("cfgtable-remove", st, EFI_SUCCESS);
    CHECK_EQ("cfgtable-remove-count", gST->NumberOfTableEntries, n0);
    find_table(&test_table_guid, &count);
    CHECK_EQ("cfgtable-remove-entry", count, 0);
    header_crc_ok("cfgtable-remove-systab-crc32", &gST->Hdr);

    st = gBS->InstallConfigurationTable(&absent_table_guid, NULL);
    CHECK_ST("cfgtable-remove-absent", st, EFI_NOT_FOUND);
    st = gBS->InstallConfigurationTable(NULL, &table_a);
    CHECK_ST("cfgtable-null-guid", st, EFI_INVALID_PARAMETER);
}

EFI_STATUS EFIAPI efi_main(EFI_HANDLE image, EFI_SYSTEM_TABLE *st)
{
    lib_init(image, st);
    say("misc: CRC32, CopyMem/SetMem, monotonic count, tables\n");
    test_crc();
    test_mem();
    test_monotonic();
    test_tables();
    test_config_table();
    return finish();
}
