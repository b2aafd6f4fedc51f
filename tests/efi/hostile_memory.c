/*
 * hostile_memory: payloads that make the host's memory grow ("The memory cap does not
 * bound the host"). The first word of LoadOptions picks the attack; an optional number follows.
 *
 *   touch            write one byte to every 4 KiB page of conventional (never allocated) RAM
 *                    from 1 MiB upward, 8 GiB of pages in all
 *   setmem           SetMem over 8 GiB of conventional RAM the app never allocated
 *   loadimage-huge   LoadImage of the app's own PE from a buffer, with SourceSize 2^40
 *   setvar-64m       SetVariable (NV|BS|RT) with 64 MiB of data
 *   setvar-many      up to 5000 SetVariable (NV|BS|RT) of 60 KiB each, until one fails
 *   alloc-cap N      one 4 KiB AllocatePages(AllocateAddress) at every 2 MiB boundary of
 *                    conventional RAM, touching each, until N bytes (the cap) or a failure
 * Every mode that can finish prints what the firmware answered, then calls ExitBootServices.
 */

#include "hostile.h"

static EFI_GUID var_guid = {0x484f5354, 0x494c, 0x4556, {0x76, 0x61, 0x72, 0x73, 0x74, 0x6f, 0x72, 0x65}};
#define NV_BS_RT (EFI_VARIABLE_NON_VOLATILE | EFI_VARIABLE_BOOTSERVICE_ACCESS | EFI_VARIABLE_RUNTIME_ACCESS)

static void touch_unallocated(void)
{
    UINTN n = 0, dsize = 0;
    EFI_MEMORY_DESCRIPTOR *map = memory_map(&n, &dsize);
    UINT64 pages = 0, want = (8ULL << 30) / 4096;
    if (!map) {
        say("FAIL touch: no memory map\n");
        return;
    }
    say("touch: one byte in each of %u never-allocated pages\n", want);
    for (UINTN i = 0; i < n && pages < want; i++) {
        EFI_MEMORY_DESCRIPTOR *d = DESC(map, dsize, i);
        if (d->Type != EfiConventionalMemory)
            continue;
        for (UINT64 p = 0; p < d->NumberOfPages && pages < want; p++) {
            UINT64 a = d->PhysicalStart + p * 4096;
            if (a < 0x100000)
                continue;
            *(volatile UINT8 *)a = 0xA5;
            pages++;
            if (pages % 65536 == 0)
                say("touch: %u MiB\n", pages / 256);
        }
    }
    say("touch: wrote %u pages\n", pages);
}

static EFI_MEMORY_DESCRIPTOR *largest_conventional(void)
{
    UINTN n = 0, dsize = 0;
    EFI_MEMORY_DESCRIPTOR *map = memory_map(&n, &dsize), *best = NULL;
    for (UINTN i = 0; map && i < n; i++) {
        EFI_MEMORY_DESCRIPTOR *d = DESC(map, dsize, i);
        if (d->Type == EfiConventionalMemory && (!best || d->NumberOfPages > best->NumberOfPages))
            best = d;
    }
    return best;
}

static void setmem_unallocated(void)
{
    EFI_MEMORY_DESCRIPTOR *d = largest_conventional();
    if (!d) {
        say("FAIL setmem: no memory map\n");
        return;
    }
    UINT64 len = d->NumberOfPages * 4096;
    if (len > (8ULL << 30))
        len = 8ULL << 30;
    say("setmem: SetMem over %x bytes of never-allocated RAM at %x\n", len, d->PhysicalStart);
    gBS->SetMem((VOID *)d->PhysicalStart, len, 0x55);
    say("setmem returned\n");
}

static void loadimage_huge(void)
{
    UINTN size = 0;
    UINT8 *file = own_file(&size);
    EFI_HANDLE h = NULL;
    if (!file) {
        say("FAIL loadimage-huge: own image\n");
        return;
    }
    say("LoadImage of a %u-byte buffer with SourceSize 2^40\n", (UINT64)size);
    EFI_STATUS s = gBS->LoadImage(FALSE, gImage, NULL, file, 1ULL << 40, &h);
    say("loadimage-huge: status %r\n", s);
}

static void query_vars(const char *when)
{
    UINT64 max_storage = 0, remaining = 0, max_var = 0;
    EFI_STATUS s = gRT->QueryVariableInfo(NV_BS_RT, &max_storage, &remaining, &max_var);
    say("QueryVariableInfo %s: %r max_storage %u remaining %u max_variable %u\n", when, s, max_storage,
        remaining, max_var);
}

static void setvar_big(void)
{
    UINT64 len = 64ULL << 20;
    EFI_PHYSICAL_ADDRESS a = 0;
    EFI_STATUS s = gBS->AllocatePages(AllocateAnyPages, EfiLoaderData, len / 4096, &a);
    if (s != EFI_SUCCESS) {
        say("FAIL setvar-64m: AllocatePages %r\n", s);
        return;
    }
    for (UINT64 i = 0; i < len; i += 4096)
        *(volatile UINT64 *)(a + i) = i;
    query_vars("before");
    s = gRT->SetVariable(L"HostileBig", &var_guid, NV_BS_RT, len, (VOID *)a);
    say("setvar-64m: status %r\n", s);
    query_vars("after");
}

static void setvar_many(void)
{
    UINTN len = 60 * 1024, ok = 0;
    UINT8 *data = NULL;
    CHAR16 name[] = L"Hostile0000";
    EFI_STATUS s = gBS->AllocatePool(EfiLoaderData, len, (VOID **)&data);
    if (s != EFI_SUCCESS) {
        say("FAIL setvar-many: AllocatePool %r\n", s);
        return;
    }
    for (UINTN i = 0; i < len; i++)
        data[i] = (UINT8)(i * 13);
    query_vars("before");
    for (UINTN i = 0; i < 5000; i++) {
        name[7] = (CHAR16)('0' + i / 1000 % 10);
        name[8] = (CHAR16)('0' + i / 100 % 10);
        name[9] = (CHAR16)('0' + i / 10 % 10);
        name[10] = (CHAR16)('0' + i % 10);
        data[0] = (UINT8)i;
        s = gRT->SetVariable(name, &var_guid, NV_BS_RT, len, data);
        if (s != EFI_SUCCESS)
            break;
        ok++;
    }
    say("setvar-many: %u variables of %u bytes stored, last status %r\n", (UINT64)ok, (UINT64)len, s);
    query_vars("after");
}

static void alloc_to_cap(UINT64 cap)
{
    UINTN n = 0, dsize = 0;
    EFI_MEMORY_DESCRIPTOR *map = memory_map(&n, &dsize);
    UINT64 got = 0, bytes = 0;
    EFI_STATUS s = EFI_SUCCESS;
    if (!cap)
        cap = 256ULL << 20;
    if (!map) {
        say("FAIL alloc-cap: no memory map\n");
        return;
    }
    say("alloc-cap: 4 KiB pages at 2 MiB steps up to %u bytes\n", cap);
    for (UINTN i = 0; i < n && bytes < cap && s == EFI_SUCCESS; i++) {
        EFI_MEMORY_DESCRIPTOR *d = DESC(map, dsize, i);
        if (d->Type != EfiConventionalMemory)
            continue;
        UINT64 end = d->PhysicalStart + d->NumberOfPages * 4096;
        UINT64 a = (d->PhysicalStart + 0x1FFFFF) & ~0x1FFFFFULL;
        if (a < 0x200000)
            a = 0x200000;
        for (; a + 4096 <= end && bytes < cap; a += 0x200000) {
            EFI_PHYSICAL_ADDRESS p = a;
            s = gBS->AllocatePages(AllocateAddress, EfiLoaderData, 1, &p);
            if (s == EFI_NOT_FOUND) {   /* taken since the map was read: skip it */
                s = EFI_SUCCESS;
                continue;
            }
            if (s != EFI_SUCCESS)
                break;
            *(volatile UINT64 *)p = p;
            got++;
            bytes += 4096;
        }
    }
    say("alloc-cap: %u pages (%u bytes) allocated and touched, last status %r\n", got, bytes, s);
}

EFI_STATUS EFIAPI efi_main(EFI_HANDLE image, EFI_SYSTEM_TABLE *st)
{
    lib_init(image, st);
    read_mode();
    say("hostile_memory: mode %s\n", gMode);
    if (mode_is("touch"))
        touch_unallocated();
    else if (mode_is("setmem"))
        setmem_unallocated();
    else if (mode_is("loadimage-huge"))
        loadimage_huge();
    else if (mode_is("setvar-64m"))
        setvar_big();
    else if (mode_is("setvar-many"))
        setvar_many();
    else if (mode_is("alloc-cap"))
        alloc_to_cap(gArg);
    else {
        say("FAIL unknown mode\n");
        return EFI_INVALID_PARAMETER;
    }
    return exit_boot_services();
}
