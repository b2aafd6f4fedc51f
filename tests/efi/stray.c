/*
 * stray: writes one byte into conventional memory it no longer owns (pages it allocated and
 * freed again: still mapped, as freed RAM stays mapped for the rest of a run), then exits boot
 * services normally. A firmware cannot see such a write, but a handoff must not silently drop
 * it. (A write to RAM no allocation ever covered faults at once: tests/kvm/test_paging.py.)
 */
#include "lib.h"

EFI_STATUS EFIAPI efi_main(EFI_HANDLE image, EFI_SYSTEM_TABLE *st)
{
    UINTN size = 0, key = 0, desc_size = 0, buf_size;
    UINT32 version = 0;
    UINT8 *map = NULL;
    EFI_STATUS s;
    EFI_PHYSICAL_ADDRESS pages = 0, target = 0;

    lib_init(image, st);
    s = gBS->AllocatePages(AllocateAnyPages, EfiLoaderData, 16, &pages);
    if (s == EFI_SUCCESS && gBS->FreePages(pages, 16) == EFI_SUCCESS)
        target = pages + 8 * 4096;   /* the middle of what it gave back */
    s = gBS->GetMemoryMap(&size, NULL, &key, &desc_size, &version);
    buf_size = size + 8 * desc_size;
    gBS->AllocatePool(EfiLoaderData, buf_size, (void **)&map);
    say("stray: writing to unallocated %x\n", (UINT64)target);
    if (target)
        *(volatile UINT8 *)target = 0x5A;
    size = buf_size;
    s = gBS->GetMemoryMap(&size, (EFI_MEMORY_DESCRIPTOR *)map, &key, &desc_size, &version);
    s = gBS->ExitBootServices(image, key);
    for (;;)
        __asm__ volatile("hlt");
    return s;
}
