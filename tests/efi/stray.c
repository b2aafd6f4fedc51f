/*
 * stray: writes one byte into conventional memory it never allocated (a bug a firmware cannot
 * see, but a handoff must not silently drop), then exits boot services normally.
 */
#include "lib.h"

EFI_STATUS EFIAPI efi_main(EFI_HANDLE image, EFI_SYSTEM_TABLE *st)
{
    UINTN size = 0, key = 0, desc_size = 0, buf_size;
    UINT32 version = 0;
    UINT8 *map = NULL;
    EFI_STATUS s;
    EFI_PHYSICAL_ADDRESS target = 0;

    lib_init(image, st);
    s = gBS->GetMemoryMap(&size, NULL, &key, &desc_size, &version);
    buf_size = size + 8 * desc_size;
    gBS->AllocatePool(EfiLoaderData, buf_size, (void **)&map);
    size = buf_size;
    s = gBS->GetMemoryMap(&size, (EFI_MEMORY_DESCRIPTOR *)map, &key, &desc_size, &version);
    for (UINTN off = 0; off < size; off += desc_size) {
        EFI_MEMORY_DESCRIPTOR *d = (EFI_MEMORY_DESCRIPTOR *)(map + off);
        if (d->Type == EfiConventionalMemory && d->NumberOfPages > 16 && d->PhysicalStart >= 0x100000
            && d->PhysicalStart < 0x80000000ULL)
            target = d->PhysicalStart + 8 * 4096;   /* the middle of free memory */
    }
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
