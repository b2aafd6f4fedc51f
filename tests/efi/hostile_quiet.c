/*
 * hostile_quiet: quieter defects. The first word of LoadOptions picks one.
 *
 *   stack        unbounded recursion (each frame 512 bytes): must end as a fault that names the
 *                stack, without first overwriting firmware memory
 *   ebs-notify   ExitBootServices called from an EVT_NOTIFY_SIGNAL notify function (at
 *                TPL_CALLBACK; UEFI 2.10 §7.1 table 7-3 allows it only at TPL_APPLICATION):
 *                the notify prints what it got; then efi_main prints
 *                "main: proper ExitBootServices" and calls it itself
 *   ebs-timer    the same from a timer event's notify function (1 ms relative timer) while
 *                efi_main waits for it
 *   ebs-child    a copy of the app, loaded from a buffer and started, calls ExitBootServices
 *                (allowed, as for the Linux stub that systemd-stub starts: the handoff goes on
 *                in the child's code); were it refused, the parent would print what
 *                StartImage returned, then "main: proper ExitBootServices"
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

#pragma GCC diagnostic ignored "-Winfinite-recursion"   /* the point of "stack" */
static volatile UINT64 sink;

static UINT64 __attribute__((noinline)) recurse(UINT64 n)
{
    volatile UINT8 frame[512];
    frame[n % 512] = (UINT8)n;
    if (n % 4096 == 0)
        say("stack: depth %u rsp near %x\n", n, (UINT64)frame);
    UINT64 r = recurse(n + 1) + frame[(n * 7) % 512];
    sink = r;
    return r;
}

static EFI_MEMORY_DESCRIPTOR *ebs_map;
static UINTN ebs_map_size;
static volatile int notify_done;

static EFI_STATUS ebs_attempt(const char *where)
{
    UINTN size = ebs_map_size, key = 0, dsize = 0;
    UINT32 ver = 0;
    EFI_STATUS s = gBS->GetMemoryMap(&size, ebs_map, &key, &dsize, &ver);
    if (s == EFI_SUCCESS)
        s = gBS->ExitBootServices(gImage, key);
    if (s == EFI_SUCCESS) {
        /* should not happen: nothing is left to print with; hang where the handoff resumes */
        for (;;)
            __asm__ volatile("pause");
    }
    say("%s ExitBootServices: %r\n", where, s);
    return s;
}

static void EFIAPI ebs_notify(EFI_EVENT ev, VOID *ctx)
{
    ebs_attempt("in-notify");
    notify_done = 1;
}

static int prepare_map(void)
{
    UINTN key = 0, dsize = 0;
    UINT32 ver = 0;
    ebs_map_size = 0;
    gBS->GetMemoryMap(&ebs_map_size, NULL, &key, &dsize, &ver);
    ebs_map_size += 32 * dsize;
    return gBS->AllocatePool(EfiLoaderData, ebs_map_size, (VOID **)&ebs_map) == EFI_SUCCESS;
}

static CHAR16 child_options[] = L"ebs-child-run";

EFI_STATUS EFIAPI efi_main(EFI_HANDLE image, EFI_SYSTEM_TABLE *st)
{
    lib_init(image, st);
    read_mode();
    say("hostile_quiet: mode %s\n", gMode);
    if (mode_is("stack")) {
        say("stack: recursing\n");
        recurse(1);
        say("FAIL stack: recursion returned\n");
    } else if (mode_is("ebs-notify") || mode_is("ebs-timer")) {
        EFI_EVENT ev = NULL;
        int timer = mode_is("ebs-timer");
        if (!prepare_map())
            return EFI_OUT_OF_RESOURCES;
        EFI_STATUS s = gBS->CreateEvent(timer ? EVT_TIMER | EVT_NOTIFY_SIGNAL : EVT_NOTIFY_SIGNAL, TPL_CALLBACK,
                                        ebs_notify, NULL, &ev);
        say("%s: CreateEvent %r\n", gMode, s);
        if (timer) {
            s = gBS->SetTimer(ev, TimerRelative, 10000);
            /* hlt with interrupts enabled: the 10 ms tick resumes it and the timer fires */
            for (UINT64 i = 0; !notify_done && i < 300; i++)
                __asm__ volatile("hlt");
        } else {
            s = gBS->SignalEvent(ev);
        }
        say("%s: notify done %u, status %r\n", gMode, (UINT64)notify_done, s);
    } else if (mode_is("ebs-child-run")) {
        if (!prepare_map())
            return EFI_OUT_OF_RESOURCES;
        return ebs_attempt("in-child");
    } else if (mode_is("ebs-child")) {
        UINTN size = 0;
        UINT8 *file = own_file(&size);
        EFI_HANDLE child = NULL;
        EFI_STATUS s = file ? gBS->LoadImage(FALSE, image, NULL, file, size, &child) : EFI_OUT_OF_RESOURCES;
        say("ebs-child: LoadImage %r\n", s);
        EFI_LOADED_IMAGE_PROTOCOL *cli = NULL;
        if (s == EFI_SUCCESS && gBS->HandleProtocol(child, &li_guid, (VOID **)&cli) == EFI_SUCCESS) {
            cli->LoadOptions = child_options;
            cli->LoadOptionsSize = sizeof(child_options);
            s = gBS->StartImage(child, NULL, NULL);
            say("ebs-child: StartImage returned %r\n", s);
        }
    } else {
        say("FAIL unknown mode\n");
        return EFI_INVALID_PARAMETER;
    }
    say("main: proper ExitBootServices\n");
    return exit_boot_services();
}
