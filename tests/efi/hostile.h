/*
 * hostile.h: what the hostile_*.c apps share (tests/e2e/test_hostile.py). Header-only static
 * helpers: the mode from LoadOptions, a proper ExitBootServices, the app's own PE file rebuilt
 * from its loaded image, the memory map. build.py hashes this file with lib.c, lib.h and efi.h.
 */
#ifndef HOSTILE_H
#define HOSTILE_H
#include "lib.h"

#pragma GCC diagnostic ignored "-Wunused-function"   /* not every app uses every helper */
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

/* The app's own PE file, rebuilt from its loaded image (lib.c pe_file_of_image). */
static UINT8 *own_file(UINTN *size_out)
{
    return pe_file_of_image(gLI ? (UINT8 *)gLI->ImageBase : NULL, 0, size_out);
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

#endif
