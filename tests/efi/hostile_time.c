/*
 * hostile_time: payloads that make the host work on their behalf for longer than the run's time
 * limit ("The time limit does not hold when the host is busy on the payload's behalf").
 * The first word of LoadOptions (vmrun --cmdline) picks the attack; every mode that can finish
 * prints what the firmware answered and then calls ExitBootServices properly.
 *
 *   outsb80 / outsb3f8   rep outsb to port 0x80 / 0x3f8 with RCX = 2^40 (emulated string I/O)
 *   output-mb            OutputString of a 4 MiB string, forever
 *   loadimage            LoadImage of the app's own PE from a buffer 10,000 times, never unloading
 *   configtable          InstallConfigurationTable with 1,000,000 distinct GUIDs
 *   waitforevent         WaitForEvent with NumberOfEvents = 2^31 over a one-page array of events
 *   pool                 200,000 small AllocatePool, then FreePool every other one, then the rest
 *                        backwards (quadratic for a naive free-list search)
 *   setmem8g / setmemmax     SetMem(own 4 KiB buffer, 8 GiB / 2^64-1 bytes)
 *   copymem8g / copymemmax   CopyMem(own buffer, own buffer + 2 KiB, 8 GiB / 2^64-1 bytes)
 *   crc8g / crcmax           CalculateCrc32(own buffer, 8 GiB / 2^64-1 bytes)
 *   nonul                OutputString of a page of 'A' (no NUL) followed by a freed page
 *   nonul-end            the same with the page at the very end of a RAM range
 *   signal-self          a notify function that calls SignalEvent on its own event
 *   image-self           LoadImage of its own image from a buffer and StartImage of it, in every
 *                        copy (unbounded nesting)
 *   getrng               RNG GetRNG with length 2^62 into a 4 KiB buffer
 */

#include "hostile.h"

static EFI_GUID rng_guid = EFI_RNG_PROTOCOL_GUID;

static void rep_outsb(UINT16 port)
{
    static UINT8 bytes[64] = "hostile rep outsb\r\n";
    const UINT8 *p = bytes;
    UINT64 count = 1ULL << 40;
    say("rep outsb to port %x with count %x\n", (UINT64)port, count);
    __asm__ volatile("cld; rep outsb" : "+S"(p), "+c"(count) : "d"(port) : "memory");
    say("rep outsb returned, count left %x\n", count);
}

static void output_megabytes(void)
{
    UINTN chars = 2u << 20;   /* 4 MiB of UTF-16 */
    CHAR16 *s = NULL;
    if (gBS->AllocatePool(EfiLoaderData, (chars + 1) * 2, (VOID **)&s) != EFI_SUCCESS) {
        say("FAIL output-mb: no pool\n");
        return;
    }
    for (UINTN i = 0; i < chars; i++)
        s[i] = (i % 100 == 99) ? '\n' : (CHAR16)('A' + i % 26);
    s[chars] = 0;
    say("OutputString of %u bytes, forever\n", (UINT64)chars * 2);
    for (UINT64 n = 0;; n++)
        gST->ConOut->OutputString(gST->ConOut, s);
}

static void load_images(void)
{
    UINTN size = 0, ok = 0;
    UINT8 *file = own_file(&size);
    EFI_STATUS first_err = EFI_SUCCESS;
    UINTN first_err_at = 0;
    if (!file) {
        say("FAIL loadimage: own image not available\n");
        return;
    }
    say("LoadImage of a %u-byte image 10000 times\n", (UINT64)size);
    for (UINTN i = 0; i < 10000; i++) {
        EFI_HANDLE h = NULL;
        EFI_STATUS s = gBS->LoadImage(FALSE, gImage, NULL, file, size, &h);
        if (s == EFI_SUCCESS)
            ok++;
        else if (first_err == EFI_SUCCESS) {
            first_err = s;
            first_err_at = i;
        }
    }
    say("loadimage: %u loaded, first error %r at %u\n", (UINT64)ok, first_err, (UINT64)first_err_at);
}

static void config_tables(void)
{
    static UINT64 table = 0x5AFE;
    EFI_GUID g = {0x484f5354, 0x494c, 0x4500, {0x74, 0x61, 0x62, 0x6c, 0, 0, 0, 0}};
    UINTN ok = 0;
    EFI_STATUS s = EFI_SUCCESS;
    say("InstallConfigurationTable with 1000000 distinct GUIDs\n");
    for (UINT32 i = 0; i < 1000000; i++) {
        g.Data4[4] = (UINT8)i;
        g.Data4[5] = (UINT8)(i >> 8);
        g.Data4[6] = (UINT8)(i >> 16);
        s = gBS->InstallConfigurationTable(&g, &table);
        if (s != EFI_SUCCESS)
            break;
        ok++;
    }
    say("configtable: %u installed, last status %r\n", (UINT64)ok, s);
}

static void wait_for_events(void)
{
    EFI_EVENT *evs = NULL;
    EFI_EVENT ev = NULL;
    UINTN index = 0x1234;
    if (gBS->AllocatePool(EfiLoaderData, 4096, (VOID **)&evs) != EFI_SUCCESS ||
        gBS->CreateEvent(0, 0, NULL, NULL, &ev) != EFI_SUCCESS) {
        say("FAIL waitforevent: setup\n");
        return;
    }
    for (UINTN i = 0; i < 4096 / sizeof(EFI_EVENT); i++)
        evs[i] = ev;       /* one valid, never signalled event, 512 times */
    say("WaitForEvent with NumberOfEvents 2^31 over 512 entries\n");
    EFI_STATUS s = gBS->WaitForEvent(1ULL << 31, evs, &index);
    say("waitforevent: status %r index %x\n", s, (UINT64)index);
}

static void pool_pattern(void)
{
    enum { N = 200000 };
    void **ptrs = NULL;
    EFI_PHYSICAL_ADDRESS a = 0;
    if (gBS->AllocatePages(AllocateAnyPages, EfiLoaderData, EFI_SIZE_TO_PAGES(N * sizeof(void *)), &a)
        != EFI_SUCCESS) {
        say("FAIL pool: no pages for the pointer array\n");
        return;
    }
    ptrs = (void **)a;
    UINTN ok = 0, freed = 0;
    say("pool: %u small AllocatePool, then FreePool\n", (UINT64)N);
    for (UINTN i = 0; i < N; i++) {
        ptrs[i] = NULL;
        if (gBS->AllocatePool(EfiLoaderData, 16 + (i % 7) * 8, &ptrs[i]) == EFI_SUCCESS)
            ok++;
    }
    say("pool: %u allocated\n", (UINT64)ok);
    for (UINTN i = 0; i < N; i += 2)
        if (ptrs[i] && gBS->FreePool(ptrs[i]) == EFI_SUCCESS)
            freed++;
    for (UINTN i = N - 1; i < N; i -= 2)
        if (ptrs[i] && gBS->FreePool(ptrs[i]) == EFI_SUCCESS)
            freed++;
    say("pool: %u allocated, %u freed\n", (UINT64)ok, (UINT64)freed);
}

static UINT8 *small_buffer(void)
{
    UINT8 *b = NULL;
    if (gBS->AllocatePool(EfiLoaderData, 4096, (VOID **)&b) != EFI_SUCCESS)
        return NULL;
    return b;
}

static void big_mem(const char *what, UINT64 len)
{
    UINT8 *b = small_buffer();
    if (!b) {
        say("FAIL %s: no pool\n", what);
        return;
    }
    say("%s over %x bytes from a 4 KiB buffer at %x\n", what, len, (UINT64)b);
    if (what[0] == 's') {
        gBS->SetMem(b, len, 0x5a);
        say("setmem returned\n");
    } else if (what[0] == 'c' && what[1] == 'o') {
        gBS->CopyMem(b, b + 2048, len);
        say("copymem returned\n");
    } else {
        UINT32 crc = 0;
        EFI_STATUS s = gBS->CalculateCrc32(b, len, &crc);
        say("crc: status %r crc %x\n", s, (UINT64)crc);
    }
}

static void no_nul(int at_ram_end)
{
    EFI_PHYSICAL_ADDRESS a = 0;
    EFI_STATUS s;
    if (at_ram_end) {
        /* the last page of a conventional range that no descriptor follows: a hole in the
         * address space (no memory at all) comes right after it */
        UINTN n = 0, dsize = 0;
        EFI_MEMORY_DESCRIPTOR *map = memory_map(&n, &dsize);
        EFI_PHYSICAL_ADDRESS best = 0;
        for (UINTN i = 0; map && i < n && !best; i++) {
            EFI_MEMORY_DESCRIPTOR *d = DESC(map, dsize, i);
            UINT64 end = d->PhysicalStart + d->NumberOfPages * 4096;
            int followed = 0;
            for (UINTN j = 0; j < n; j++) {
                EFI_MEMORY_DESCRIPTOR *e = DESC(map, dsize, j);
                if (e->PhysicalStart <= end && end < e->PhysicalStart + e->NumberOfPages * 4096)
                    followed = 1;
            }
            if (d->Type == EfiConventionalMemory && !followed)
                best = end;
        }
        if (!best) {
            say("nonul: no conventional range ends at a hole\n");
            return;
        }
        say("nonul: a hole starts at %x\n", best);
        a = best - 4096;
        s = gBS->AllocatePages(AllocateAddress, EfiLoaderData, 1, &a);
    } else {
        s = gBS->AllocatePages(AllocateAnyPages, EfiLoaderData, 2, &a);
        if (s == EFI_SUCCESS)
            gBS->FreePages(a + 4096, 1);
    }
    if (s != EFI_SUCCESS) {
        say("FAIL nonul: AllocatePages %r\n", s);
        return;
    }
    CHAR16 *p = (CHAR16 *)a;
    for (UINTN i = 0; i < 2048; i++)
        p[i] = 'A';
    say("OutputString of a page of 'A' without NUL at %x\n", (UINT64)a);
    s = gST->ConOut->OutputString(gST->ConOut, p);
    say("\nnonul: status %r\n", s);
}

static EFI_EVENT self_event;
static volatile UINT64 notify_count;

static void EFIAPI signal_self(EFI_EVENT ev, VOID *ctx)
{
    notify_count++;
    gBS->SignalEvent(self_event);
}

static void signal_recursion(void)
{
    EFI_STATUS s = gBS->CreateEvent(EVT_NOTIFY_SIGNAL, TPL_CALLBACK, signal_self, NULL, &self_event);
    say("signal-self: CreateEvent %r; SignalEvent\n", s);
    s = gBS->SignalEvent(self_event);
    say("signal-self: SignalEvent returned %r after %u notifications\n", s, (UINT64)notify_count);
}

/* initialised, so it lives in .data and each copy starts from its parent's value */
static volatile UINT64 depth = 1;
static CHAR16 self_options[] = L"image-self";

static EFI_STATUS image_recursion(void)
{
    UINTN size = 0;
    depth++;
    if (depth % 50 == 0 || depth < 4)
        say("image-self: depth %u\n", depth);
    UINT8 *file = own_file(&size);
    if (!file)
        return EFI_OUT_OF_RESOURCES;
    EFI_HANDLE child = NULL;
    EFI_STATUS s = gBS->LoadImage(FALSE, gImage, NULL, file, size, &child);
    if (s != EFI_SUCCESS) {
        say("image-self: LoadImage at depth %u: %r\n", depth, s);
        return s;
    }
    EFI_LOADED_IMAGE_PROTOCOL *cli = NULL;
    if (gBS->HandleProtocol(child, &li_guid, (VOID **)&cli) == EFI_SUCCESS && cli) {
        cli->LoadOptions = self_options;
        cli->LoadOptionsSize = sizeof(self_options);
    }
    s = gBS->StartImage(child, NULL, NULL);
    if (depth % 50 == 0 || depth < 4)
        say("image-self: StartImage at depth %u returned %r\n", depth, s);
    return s;
}

static void get_rng(void)
{
    EFI_RNG_PROTOCOL *rng = NULL;
    UINT8 *b = small_buffer();
    EFI_STATUS s = gBS->LocateProtocol(&rng_guid, NULL, (VOID **)&rng);
    if (s != EFI_SUCCESS || !b) {
        say("FAIL getrng: LocateProtocol %r\n", s);
        return;
    }
    say("GetRNG of 2^62 bytes into a 4 KiB buffer\n");
    s = rng->GetRNG(rng, NULL, 1ULL << 62, b);
    say("getrng: status %r\n", s);
}

EFI_STATUS EFIAPI efi_main(EFI_HANDLE image, EFI_SYSTEM_TABLE *st)
{
    lib_init(image, st);
    read_mode();
    int root = depth == 1;
    say("hostile_time: mode %s\n", gMode);
    if (mode_is("outsb80"))
        rep_outsb(0x80);
    else if (mode_is("outsb3f8"))
        rep_outsb(0x3f8);
    else if (mode_is("output-mb"))
        output_megabytes();
    else if (mode_is("loadimage"))
        load_images();
    else if (mode_is("configtable"))
        config_tables();
    else if (mode_is("waitforevent"))
        wait_for_events();
    else if (mode_is("pool"))
        pool_pattern();
    else if (mode_is("setmem8g"))
        big_mem("setmem", 8ULL << 30);
    else if (mode_is("setmemmax"))
        big_mem("setmem", ~0ULL);
    else if (mode_is("copymem8g"))
        big_mem("copymem", 8ULL << 30);
    else if (mode_is("copymemmax"))
        big_mem("copymem", ~0ULL);
    else if (mode_is("crc8g"))
        big_mem("crc", 8ULL << 30);
    else if (mode_is("crcmax"))
        big_mem("crc", ~0ULL);
    else if (mode_is("nonul"))
        no_nul(0);
    else if (mode_is("nonul-end"))
        no_nul(1);
    else if (mode_is("getrng"))
        get_rng();
    else if (mode_is("signal-self"))
        signal_recursion();
    else if (mode_is("image-self")) {
        EFI_STATUS s = image_recursion();
        if (!root)
            return s;
        say("image-self: the outermost StartImage returned %r\n", s);
    } else {
        say("FAIL unknown mode\n");
        return EFI_INVALID_PARAMETER;
    }
    return exit_boot_services();
}
