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

#include "hostile.h"

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
