/*
 * hostile_fw: the payload against the firmware's own memory ("Firmware memory is
 * writable at CPL 3"). The first word of LoadOptions picks one. Each write stores the byte that
 * is already there (so an unprotected run is not wrecked and can report it): if the write
 * completes the app prints "FAIL <what>-writable" and calls ExitBootServices.
 *
 *   idt         sidt (legal at CPL 3 without UMIP), then write the first byte of the IDT
 *   gdt         sgdt, then write the first byte of the GDT
 *   monitor     the #GP gate's handler address from the IDT, then write its first byte
 *   thunk       write the first byte of gBS->AllocatePool's code (the service thunk)
 *   pml4        mov %cr3 (emulated), then write the first byte of the PML4
 *   freepool    FreePool(gBS), FreePool(ImageHandle), FreePool(gST): prints each status; then
 *               64 AllocatePool of the boot services table's size must not return those blocks
 *   hook        replace gBS->AllocatePool with the app's own function that counts and calls the
 *               original (legal UEFI: shim and systemd-stub do it), call it, restore it
 */
#include "lib.h"

#pragma GCC diagnostic ignored "-Wunused-function"   /* not every app uses every helper */
/* ---- shared by the hostile_*.c apps (each file is self-contained: the build hashes only
 * <app>.c, lib.c, lib.h and efi.h) --------------------------------------------------------- */
static EFI_GUID li_guid = EFI_LOADED_IMAGE_PROTOCOL_GUID;
static EFI_LOADED_IMAGE_PROTOCOL *gLI;
static char gMode[128];      /* first word of LoadOptions, ASCII */
static UINT64 gArg;         /* the number after it, if any */

static void read_mode(void)
{
    UINTN i = 0, n = 0;
    const CHAR16 *opt = NULL;
    gMode[0] = 0;
    if (gBS->HandleProtocol(gImage, &li_guid, (VOID **)&gLI) != EFI_SUCCESS || !gLI)
        return;
    if (gLI->LoadOptions) {
        opt = gLI->LoadOptions;
        n = gLI->LoadOptionsSize / 2;
    }
    while (i < n && opt[i] == ' ')
        i++;
    UINTN k = 0;
    for (; i < n && opt[i] && opt[i] != ' ' && k < sizeof(gMode) - 1; i++)
        gMode[k++] = (char)opt[i];
    gMode[k] = 0;
    while (i < n && opt[i] == ' ')
        i++;
    gArg = 0;
    for (; i < n && opt[i] >= '0' && opt[i] <= '9'; i++)
        gArg = gArg * 10 + (UINT64)(opt[i] - '0');
}

static int mode_is(const char *m)
{
    UINTN i = 0;
    for (; m[i]; i++)
        if (gMode[i] != m[i])
            return 0;
    return gMode[i] == 0;
}

/* A proper ExitBootServices from efi_main: the run then ends with outcome exit_boot_services,
 * so "the app finished and printed its statuses" is exit code 0. */
static EFI_STATUS exit_boot_services(void)
{
    UINTN size = 0, key = 0, dsize = 0, bufsize;
    UINT32 ver = 0;
    EFI_MEMORY_DESCRIPTOR *map = NULL;
    EFI_STATUS s = gBS->GetMemoryMap(&size, NULL, &key, &dsize, &ver);
    bufsize = size + 16 * (dsize ? dsize : 48);
    if (gBS->AllocatePool(EfiLoaderData, bufsize, (VOID **)&map) != EFI_SUCCESS) {
        say("FAIL ebs: no pool for the memory map\n");
        return EFI_OUT_OF_RESOURCES;
    }
    say("calling ExitBootServices\n");
    for (int tries = 0; tries < 2; tries++) {
        size = bufsize;
        s = gBS->GetMemoryMap(&size, map, &key, &dsize, &ver);
        if (s == EFI_SUCCESS)
            s = gBS->ExitBootServices(gImage, key);
        if (s == EFI_SUCCESS)
            for (;;)
                __asm__ volatile("hlt");
    }
    say("FAIL ebs: ExitBootServices gave %r\n", s);
    return s;
}

/* The app's own PE file, rebuilt from its loaded image: headers and each section's raw data
 * at its file offset, ImageBase set to where it is loaded (its data are relocated for that
 * base), so LoadImage of the buffer relocates it correctly again. */
static UINT8 *own_file(UINTN *size_out)
{
    UINT8 *base = gLI ? (UINT8 *)gLI->ImageBase : NULL;
    if (!base)
        return NULL;
    UINT32 lfanew = *(UINT32 *)(base + 0x3c);
    UINT8 *pe = base + lfanew;
    UINT16 nsec = *(UINT16 *)(pe + 6), optsz = *(UINT16 *)(pe + 20);
    UINT8 *opt = pe + 24, *sec = opt + optsz;
    UINT32 hdrs = *(UINT32 *)(opt + 60);
    UINTN fsize = hdrs;
    for (UINTN i = 0; i < nsec; i++) {
        UINT32 raw_size = *(UINT32 *)(sec + 40 * i + 16), raw_ptr = *(UINT32 *)(sec + 40 * i + 20);
        if (raw_size && raw_ptr + raw_size > fsize)
            fsize = raw_ptr + raw_size;
    }
    UINT8 *f = NULL;
    if (gBS->AllocatePool(EfiLoaderData, fsize, (VOID **)&f) != EFI_SUCCESS)
        return NULL;
    memset(f, 0, fsize);
    memcpy(f, base, hdrs);
    for (UINTN i = 0; i < nsec; i++) {
        UINT32 va = *(UINT32 *)(sec + 40 * i + 12);
        UINT32 raw_size = *(UINT32 *)(sec + 40 * i + 16), raw_ptr = *(UINT32 *)(sec + 40 * i + 20);
        if (raw_size)
            memcpy(f + raw_ptr, base + va, raw_size);
    }
    *(UINT64 *)(f + lfanew + 24 + 24) = (UINT64)base;   /* OptionalHeader.ImageBase (PE32+) */
    *size_out = fsize;
    return f;
}

static EFI_MEMORY_DESCRIPTOR *memory_map(UINTN *count, UINTN *dsize_out)
{
    UINTN size = 0, key = 0, dsize = 0;
    UINT32 ver = 0;
    EFI_MEMORY_DESCRIPTOR *map = NULL;
    gBS->GetMemoryMap(&size, NULL, &key, &dsize, &ver);
    size += 16 * dsize;
    if (gBS->AllocatePool(EfiLoaderData, size, (VOID **)&map) != EFI_SUCCESS)
        return NULL;
    if (gBS->GetMemoryMap(&size, map, &key, &dsize, &ver) != EFI_SUCCESS)
        return NULL;
    *count = size / dsize;
    *dsize_out = dsize;
    return map;
}
#define DESC(map, dsize, i) ((EFI_MEMORY_DESCRIPTOR *)((UINT8 *)(map) + (i) * (dsize)))
/* ---- end of the shared part --------------------------------------------------------------- */

#pragma pack(push, 1)
typedef struct { UINT16 limit; UINT64 base; } DTR;
#pragma pack(pop)

static void write_same(const char *what, volatile UINT8 *p)
{
    say("%s: writing the byte at %x\n", what, (UINT64)p);
    UINT8 v = *p;
    say("%s: read %x\n", what, (UINT64)v);
    *p = v;
    say("FAIL %s-writable: the payload wrote firmware memory at %x\n", what, (UINT64)p);
}

static EFI_STATUS (EFIAPI *orig_allocate_pool)(EFI_MEMORY_TYPE, UINTN, VOID **);
static volatile UINTN hook_calls;

static EFI_STATUS EFIAPI hooked_allocate_pool(EFI_MEMORY_TYPE t, UINTN size, VOID **buf)
{
    hook_calls++;
    return orig_allocate_pool(t, size, buf);
}

static void free_firmware_blocks(void)
{
    EFI_STATUS s1 = gBS->FreePool(gBS);
    say("freepool-bs: %r\n", s1);
    EFI_STATUS s2 = gBS->FreePool(gImage);
    say("freepool-image-handle: %r\n", s2);
    EFI_STATUS s3 = gBS->FreePool(gST);
    say("freepool-system-table: %r\n", s3);
    UINTN reused = 0;
    for (int i = 0; i < 64; i++) {
        VOID *p = NULL;
        if (gBS->AllocatePool(EfiBootServicesData, gBS->Hdr.HeaderSize, &p) == EFI_SUCCESS &&
            (p == (VOID *)gBS || p == (VOID *)gImage || p == (VOID *)gST))
            reused++;
    }
    say("freepool-reused: %u\n", (UINT64)reused);
}

static void hook(void)
{
    VOID *p = NULL;
    orig_allocate_pool = gBS->AllocatePool;
    gBS->AllocatePool = hooked_allocate_pool;
    EFI_STATUS s = gBS->AllocatePool(EfiLoaderData, 64, &p);
    gBS->AllocatePool = orig_allocate_pool;
    say("hook: calls %u status %r buffer %x\n", (UINT64)hook_calls, s, (UINT64)p);
    if (hook_calls == 1 && s == EFI_SUCCESS && p)
        say("ok hook-works\n");
    else
        say("FAIL hook-works\n");
}

EFI_STATUS EFIAPI efi_main(EFI_HANDLE image, EFI_SYSTEM_TABLE *st)
{
    lib_init(image, st);
    read_mode();
    say("hostile_fw: mode %s\n", gMode);
    DTR d = {0, 0};
    if (mode_is("idt") || mode_is("monitor")) {
        __asm__ volatile("sidt %0" : "=m"(d));
        say("idtr base %x limit %x\n", d.base, (UINT64)d.limit);
        if (mode_is("idt"))
            write_same("idt", (volatile UINT8 *)d.base);
        else {
            volatile UINT8 *g = (volatile UINT8 *)(d.base + 13 * 16);   /* #GP gate */
            UINT64 off = *(volatile UINT16 *)g | ((UINT64)*(volatile UINT16 *)(g + 6) << 16) |
                         ((UINT64)*(volatile UINT32 *)(g + 8) << 32);
            say("#GP handler at %x\n", off);
            write_same("monitor", (volatile UINT8 *)off);
        }
    } else if (mode_is("gdt")) {
        __asm__ volatile("sgdt %0" : "=m"(d));
        say("gdtr base %x limit %x\n", d.base, (UINT64)d.limit);
        write_same("gdt", (volatile UINT8 *)d.base);
    } else if (mode_is("thunk")) {
        write_same("thunk", (volatile UINT8 *)gBS->AllocatePool);
    } else if (mode_is("pml4")) {
        UINT64 cr3;
        __asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
        say("cr3 %x\n", cr3);
        write_same("pml4", (volatile UINT8 *)(cr3 & ~0xFFFULL));
    } else if (mode_is("freepool")) {
        free_firmware_blocks();
    } else if (mode_is("hook")) {
        hook();
    } else {
        say("FAIL unknown mode\n");
        return EFI_INVALID_PARAMETER;
    }
    return exit_boot_services();
}
