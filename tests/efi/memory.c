/*
 * memory: UEFI 2.10 section 7.2 Memory Allocation Services.
 * AllocatePages (AnyPages / MaxAddress / Address), FreePages, AllocatePool, FreePool,
 * GetMemoryMap.  Every expectation is from the spec text; see README.md.
 */
#include "lib.h"

#define MAP_BUF_PAGES 32   /* 128 KiB: ~3000 descriptors */

static EFI_MEMORY_DESCRIPTOR *map;
static UINTN map_cap, map_size, map_key, desc_size;
static UINT32 desc_ver;

static EFI_MEMORY_DESCRIPTOR *desc(UINTN i)
{
    return (EFI_MEMORY_DESCRIPTOR *)((UINT8 *)map + i * desc_size);
}

static UINTN ndesc(void) { return desc_size ? map_size / desc_size : 0; }

static EFI_STATUS refresh_map(void)
{
    map_size = map_cap;
    return gBS->GetMemoryMap(&map_size, map, &map_key, &desc_size, &desc_ver);
}

/* the descriptor containing [addr, addr+len), or NULL */
static EFI_MEMORY_DESCRIPTOR *find_desc(UINT64 addr, UINT64 len)
{
    for (UINTN i = 0; i < ndesc(); i++) {
        EFI_MEMORY_DESCRIPTOR *d = desc(i);
        UINT64 end = d->PhysicalStart + d->NumberOfPages * EFI_PAGE_SIZE;
        if (d->PhysicalStart <= addr && addr + len <= end)
            return d;
    }
    return NULL;
}

static void check_range_type(const char *name, UINT64 addr, UINT64 len, UINT32 type)
{
    EFI_STATUS st = refresh_map();
    if (st != EFI_SUCCESS) {
        fail(name, "GetMemoryMap returned %r", st);
        return;
    }
    EFI_MEMORY_DESCRIPTOR *d = find_desc(addr, len);
    if (!d)
        fail(name, "no descriptor covers %x..+%x", addr, len);
    else if (d->Type != type)
        fail(name, "descriptor type %x, expected %x", (UINT64)d->Type, (UINT64)type);
    else
        pass(name);
}

static int pattern_ok(UINT64 addr, UINTN bytes)
{
    volatile UINT64 *p = (volatile UINT64 *)(UINTN)addr;
    for (UINTN i = 0; i < bytes / 8; i++)
        p[i] = addr ^ (i * 0x9E3779B97F4A7C15ULL);
    for (UINTN i = 0; i < bytes / 8; i++)
        if (p[i] != (addr ^ (i * 0x9E3779B97F4A7C15ULL)))
            return 0;
    return 1;
}

static void test_memory_map(void)
{
    UINTN size = 0, key = 0, dsz = 0;
    UINT32 ver = 0;
    EFI_STATUS st = gBS->GetMemoryMap(&size, NULL, &key, &dsz, &ver);
    CHECK_ST("memmap-probe-status", st, EFI_BUFFER_TOO_SMALL);
    CHECK("memmap-probe-size", size >= sizeof(EFI_MEMORY_DESCRIPTOR));

    UINT64 buf = 0;
    st = gBS->AllocatePages(AllocateAnyPages, EfiLoaderData, MAP_BUF_PAGES, &buf);
    if (st != EFI_SUCCESS) {
        fail("memmap-buffer", "AllocatePages returned %r", st);
        return;
    }
    map = (EFI_MEMORY_DESCRIPTOR *)(UINTN)buf;
    map_cap = MAP_BUF_PAGES * EFI_PAGE_SIZE;

    /* MemoryMap NULL with a big enough size is an invalid parameter */
    size = map_cap;
    st = gBS->GetMemoryMap(&size, NULL, &key, &dsz, &ver);
    CHECK_ST("memmap-null-buffer", st, EFI_INVALID_PARAMETER);

    st = refresh_map();
    if (!CHECK_ST("memmap-get", st, EFI_SUCCESS))
        return;
    CHECK("memmap-desc-size", desc_size >= sizeof(EFI_MEMORY_DESCRIPTOR));
    CHECK_EQ("memmap-version", desc_ver, EFI_MEMORY_DESCRIPTOR_VERSION);
    CHECK("memmap-size-multiple", desc_size && map_size % desc_size == 0 && map_size > 0);

    /* a buffer one descriptor short: BUFFER_TOO_SMALL and the needed size written back */
    UINTN needed = map_size;
    size = needed - desc_size;
    st = gBS->GetMemoryMap(&size, map, &key, &dsz, &ver);
    if (st == EFI_BUFFER_TOO_SMALL && size >= needed)
        pass("memmap-too-small");
    else
        fail("memmap-too-small", "got %r size %x, expected EFI_BUFFER_TOO_SMALL size >= %x",
             st, (UINT64)size, (UINT64)needed);
    refresh_map();

    int sorted = 1, overlap = 0, aligned = 1, conventional = 0;
    for (UINTN i = 0; i < ndesc(); i++) {
        EFI_MEMORY_DESCRIPTOR *d = desc(i);
        UINT64 s = d->PhysicalStart, e = s + d->NumberOfPages * EFI_PAGE_SIZE;
        if ((s & EFI_PAGE_MASK) || d->NumberOfPages == 0)
            aligned = 0;
        if (d->Type == EfiConventionalMemory)
            conventional++;
        if (i && desc(i - 1)->PhysicalStart >= s)
            sorted = 0;
        for (UINTN j = i + 1; j < ndesc(); j++) {
            EFI_MEMORY_DESCRIPTOR *o = desc(j);
            UINT64 os = o->PhysicalStart, oe = os + o->NumberOfPages * EFI_PAGE_SIZE;
            if (os < e && s < oe)
                overlap++;
        }
    }
    CHECK("memmap-page-aligned", aligned);
    CHECK("memmap-sorted", sorted);
    if (overlap)
        fail("memmap-no-overlap", "%u overlapping descriptor pairs", (UINT64)overlap);
    else
        pass("memmap-no-overlap");
    CHECK("memmap-has-conventional", conventional > 0);
    check_range_type("memmap-map-buffer-type", buf, map_cap, EfiLoaderData);
}

static void test_any_pages(void)
{
    UINTN key_before;
    UINT64 a = 0;

    refresh_map();
    key_before = map_key;
    EFI_STATUS st = gBS->AllocatePages(AllocateAnyPages, EfiLoaderData, 3, &a);
    if (!CHECK_ST("alloc-any-pages", st, EFI_SUCCESS))
        return;
    CHECK("alloc-any-pages-aligned", a != 0 && (a & EFI_PAGE_MASK) == 0);
    CHECK("alloc-any-pages-writable", pattern_ok(a, 3 * EFI_PAGE_SIZE));
    check_range_type("alloc-any-pages-in-map", a, 3 * EFI_PAGE_SIZE, EfiLoaderData);
    CHECK("memmap-key-changes", map_key != key_before);

    /* FreePages with an address that is not page aligned */
    st = gBS->FreePages(a + 0x10, 1);
    CHECK_ST("free-pages-unaligned", st, EFI_INVALID_PARAMETER);
    st = gBS->FreePages(a, 3);
    CHECK_ST("free-pages", st, EFI_SUCCESS);
    check_range_type("free-pages-conventional", a, 3 * EFI_PAGE_SIZE, EfiConventionalMemory);
    st = gBS->FreePages(a, 3);
    CHECK_ST("free-pages-double", st, EFI_NOT_FOUND);

    /* other memory types show up in the map as allocated */
    UINT64 b = 0;
    st = gBS->AllocatePages(AllocateAnyPages, EfiACPIReclaimMemory, 2, &b);
    if (CHECK_ST("alloc-pages-acpi-reclaim", st, EFI_SUCCESS)) {
        check_range_type("alloc-pages-acpi-reclaim-in-map", b, 2 * EFI_PAGE_SIZE, EfiACPIReclaimMemory);
        CHECK_ST("free-pages-acpi-reclaim", gBS->FreePages(b, 2), EFI_SUCCESS);
    }
    /* 0x80000000..0xFFFFFFFF are reserved for use by UEFI OS loaders */
    b = 0;
    st = gBS->AllocatePages(AllocateAnyPages, 0x80000001u, 1, &b);
    if (CHECK_ST("alloc-pages-os-type", st, EFI_SUCCESS)) {
        check_range_type("alloc-pages-os-type-in-map", b, EFI_PAGE_SIZE, 0x80000001u);
        CHECK_ST("free-pages-os-type", gBS->FreePages(b, 1), EFI_SUCCESS);
    }
}

/* lowest / largest conventional ranges of at least `pages` pages, above 1 MiB */
static EFI_MEMORY_DESCRIPTOR *pick_conventional(UINT64 pages, int largest)
{
    EFI_MEMORY_DESCRIPTOR *best = NULL;
    refresh_map();
    for (UINTN i = 0; i < ndesc(); i++) {
        EFI_MEMORY_DESCRIPTOR *d = desc(i);
        if (d->Type != EfiConventionalMemory || d->NumberOfPages < pages || d->PhysicalStart < 0x100000)
            continue;
        if (!best)
            best = d;
        else if (largest ? d->NumberOfPages > best->NumberOfPages : d->PhysicalStart < best->PhysicalStart)
            best = d;
    }
    return best;
}

static void test_max_address(void)
{
    EFI_MEMORY_DESCRIPTOR *d = pick_conventional(4, 0);
    if (!d) {
        fail("alloc-max-address", "no conventional range of 4 pages above 1 MiB");
        return;
    }
    UINT64 max = d->PhysicalStart + 4 * EFI_PAGE_SIZE - 1;
    UINT64 a = max;
    EFI_STATUS st = gBS->AllocatePages(AllocateMaxAddress, EfiLoaderData, 2, &a);
    if (!CHECK_ST("alloc-max-address", st, EFI_SUCCESS))
        return;
    if ((a & EFI_PAGE_MASK) == 0 && a + 2 * EFI_PAGE_SIZE - 1 <= max)
        pass("alloc-max-address-respected");
    else
        fail("alloc-max-address-respected", "got %x for MaxAddress %x", a, max);
    CHECK("alloc-max-address-writable", pattern_ok(a, 2 * EFI_PAGE_SIZE));
    CHECK_ST("free-max-address", gBS->FreePages(a, 2), EFI_SUCCESS);

    /* a MaxAddress below every free page cannot be satisfied */
    a = 0xFFF;
    st = gBS->AllocatePages(AllocateMaxAddress, EfiLoaderData, 1, &a);
    if (st == EFI_NOT_FOUND || st == EFI_OUT_OF_RESOURCES)
        pass("alloc-max-address-too-low");
    else
        fail("alloc-max-address-too-low", "got %r (address %x), expected EFI_NOT_FOUND", st, a);
    if (st == EFI_SUCCESS)
        gBS->FreePages(a, 1);
}

static void test_address(void)
{
    EFI_MEMORY_DESCRIPTOR *d = pick_conventional(8, 1);
    if (!d) {
        fail("alloc-address", "no conventional range of 8 pages above 1 MiB");
        return;
    }
    UINT64 want = d->PhysicalStart + d->NumberOfPages / 2 * EFI_PAGE_SIZE;
    UINT64 a = want;
    EFI_STATUS st = gBS->AllocatePages(AllocateAddress, EfiLoaderData, 2, &a);
    if (!CHECK_ST("alloc-address", st, EFI_SUCCESS))
        return;
    CHECK_EQ("alloc-address-exact", a, want);
    CHECK("alloc-address-writable", pattern_ok(a, 2 * EFI_PAGE_SIZE));
    check_range_type("alloc-address-in-map", want, 2 * EFI_PAGE_SIZE, EfiLoaderData);

    UINT64 b = want;
    st = gBS->AllocatePages(AllocateAddress, EfiLoaderData, 2, &b);
    CHECK_ST("alloc-address-in-use", st, EFI_NOT_FOUND);
    b = want + EFI_PAGE_SIZE;   /* overlaps the second page */
    st = gBS->AllocatePages(AllocateAddress, EfiLoaderData, 2, &b);
    CHECK_ST("alloc-address-overlap", st, EFI_NOT_FOUND);
    b = want - EFI_PAGE_SIZE;   /* overlaps the first page */
    st = gBS->AllocatePages(AllocateAddress, EfiLoaderData, 2, &b);
    CHECK_ST("alloc-address-overlap-below", st, EFI_NOT_FOUND);

    CHECK_ST("free-address", gBS->FreePages(want, 2), EFI_SUCCESS);
    /* after freeing, the same address can be allocated again */
    a = want;
    st = gBS->AllocatePages(AllocateAddress, EfiLoaderData, 2, &a);
    CHECK_ST("alloc-address-again", st, EFI_SUCCESS);
    if (st == EFI_SUCCESS)
        gBS->FreePages(want, 2);
}

static void test_invalid(void)
{
    UINT64 a = 0;
    VOID *p = NULL;
    EFI_STATUS st;

    st = gBS->AllocatePages(AllocateAnyPages, 0x1000, 1, &a);      /* EfiMaxMemoryType..0x6FFFFFFF */
    CHECK_ST("alloc-pages-invalid-type", st, EFI_INVALID_PARAMETER);
    st = gBS->AllocatePages(AllocateAnyPages, 0x6FFFFFFF, 1, &a);
    CHECK_ST("alloc-pages-invalid-type-high", st, EFI_INVALID_PARAMETER);
    st = gBS->AllocatePages(AllocateAnyPages, EfiPersistentMemory, 1, &a);
    CHECK_ST("alloc-pages-persistent", st, EFI_INVALID_PARAMETER);
    st = gBS->AllocatePages(MaxAllocateType, EfiLoaderData, 1, &a);
    CHECK_ST("alloc-pages-invalid-alloc-type", st, EFI_INVALID_PARAMETER);
    st = gBS->AllocatePages(AllocateAnyPages, EfiLoaderData, 1, NULL);
    CHECK_ST("alloc-pages-null", st, EFI_INVALID_PARAMETER);
    st = gBS->AllocatePool(0x1000, 16, &p);
    CHECK_ST("alloc-pool-invalid-type", st, EFI_INVALID_PARAMETER);
    st = gBS->AllocatePool(EfiPersistentMemory, 16, &p);
    CHECK_ST("alloc-pool-persistent", st, EFI_INVALID_PARAMETER);
    st = gBS->AllocatePool(EfiLoaderData, 16, NULL);
    CHECK_ST("alloc-pool-null", st, EFI_INVALID_PARAMETER);

    /* far more than the machine has */
    a = 0;
    st = gBS->AllocatePages(AllocateAnyPages, EfiLoaderData, 1ULL << 32, &a);   /* 16 TiB */
    if (st == EFI_OUT_OF_RESOURCES || st == EFI_NOT_FOUND)
        pass("alloc-pages-too-many");
    else
        fail("alloc-pages-too-many", "got %r, expected EFI_OUT_OF_RESOURCES", st);
    st = gBS->AllocatePool(EfiLoaderData, 1ULL << 44, &p);
    CHECK_ST("alloc-pool-too-big", st, EFI_OUT_OF_RESOURCES);
}

static void test_pool(void)
{
    static const UINTN sizes[] = {1, 7, 24, 100, 4000, 4096, 5000, 100000};
    int ok_status = 1, ok_align = 1, ok_write = 1, ok_free = 1;
    VOID *keep = NULL;
    for (UINTN i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        VOID *p = NULL;
        EFI_STATUS st = gBS->AllocatePool(EfiLoaderData, sizes[i], &p);
        if (st != EFI_SUCCESS || !p) {
            ok_status = 0;
            fail("alloc-pool", "size %u: %r", (UINT64)sizes[i], st);
            continue;
        }
        if ((UINTN)p & 7)
            ok_align = 0;
        volatile UINT8 *b = p;
        for (UINTN k = 0; k < sizes[i]; k++)
            b[k] = (UINT8)(k * 7 + i);
        for (UINTN k = 0; k < sizes[i]; k++)
            if (b[k] != (UINT8)(k * 7 + i))
                ok_write = 0;
        if (i == 3) {
            keep = p;
            continue;
        }
        if (gBS->FreePool(p) != EFI_SUCCESS)
            ok_free = 0;
    }
    if (ok_status)
        pass("alloc-pool");
    CHECK("alloc-pool-aligned", ok_align);
    CHECK("alloc-pool-writable", ok_write);
    CHECK("free-pool", ok_free);
    if (keep) {
        check_range_type("alloc-pool-in-map", (UINT64)(UINTN)keep, 100, EfiLoaderData);
        gBS->FreePool(keep);
    }

    VOID *r = NULL;
    EFI_STATUS st = gBS->AllocatePool(EfiRuntimeServicesData, 64, &r);
    if (CHECK_ST("alloc-pool-runtime-data", st, EFI_SUCCESS)) {
        CHECK("alloc-pool-runtime-data-aligned", ((UINTN)r & 7) == 0);
        check_range_type("alloc-pool-runtime-data-in-map", (UINT64)(UINTN)r, 64, EfiRuntimeServicesData);
        CHECK_ST("free-pool-runtime-data", gBS->FreePool(r), EFI_SUCCESS);
    }
}

EFI_STATUS EFIAPI efi_main(EFI_HANDLE image, EFI_SYSTEM_TABLE *st)
{
    lib_init(image, st);
    say("memory: UEFI memory allocation services\n");
    test_memory_map();
    if (map) {
        test_any_pages();
        test_max_address();
        test_address();
    }
    test_invalid();
    test_pool();
    if (map)
        gBS->FreePages((UINT64)(UINTN)map, MAP_BUF_PAGES);
    return finish();
}
