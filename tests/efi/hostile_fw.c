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

#include "hostile.h"

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
