/*
 * halt: what `hlt` does to a UEFI application, chosen by the first word of LoadOptions.
 *
 *   (none)  hlt with interrupts enabled waits for the next interrupt: a relative timer event
 *           (UEFI 2.10 section 7.1 SetTimer) fires while the app halts in a loop, and CheckEvent
 *           sees it; prints ok/FAIL lines and DONE, returns
 *   cli     prints "halting: cli; hlt", then cli; hlt forever (nothing can resume it)
 *   tpl     prints "halting at TPL_HIGH_LEVEL", raises the TPL to TPL_HIGH_LEVEL (interrupts
 *           disabled, section 7.1) and halts forever
 *   sti     prints "halting with interrupts enabled", then hlt forever with interrupts on
 *   stall   prints "stalling forever", then Stall(60 s) in an endless loop
 *
 * hlt needs CPL 0: vmrun emulates it, real firmware runs it.
 */
#include "lib.h"

static EFI_GUID li_guid = EFI_LOADED_IMAGE_PROTOCOL_GUID;

static int option_is(const CHAR16 *opt, UINTN n, const char *word)
{
    UINTN i = 0;
    for (; word[i]; i++)
        if (i >= n || opt[i] != (CHAR16)word[i])
            return 0;
    return i == n || opt[i] == 0 || opt[i] == ' ';
}

static void pause_until_timer(void)
{
    EFI_EVENT ev = NULL;
    EFI_STATUS st = gBS->CreateEvent(EVT_TIMER, 0, NULL, NULL, &ev);
    if (!CHECK_ST("halt-create-timer", st, EFI_SUCCESS))
        return;
    CHECK_ST("halt-set-timer", gBS->SetTimer(ev, TimerRelative, 1000000), EFI_SUCCESS);   /* 100 ms */
    CHECK_ST("halt-timer-pending", gBS->CheckEvent(ev), EFI_NOT_READY);
    UINTN halts = 0;
    st = EFI_NOT_READY;
    while (st == EFI_NOT_READY && halts < 100000) {
        __asm__ volatile("hlt");
        halts++;
        st = gBS->CheckEvent(ev);
    }
    say("halt: %u hlt until the timer fired\n", (UINT64)halts);
    CHECK_ST("halt-timer-fired", st, EFI_SUCCESS);
    CHECK("halt-resumed", halts >= 1);
    gBS->CloseEvent(ev);
}

EFI_STATUS EFIAPI efi_main(EFI_HANDLE image, EFI_SYSTEM_TABLE *st)
{
    lib_init(image, st);
    EFI_LOADED_IMAGE_PROTOCOL *li = NULL;
    const CHAR16 *opt = L"";
    UINTN n = 0;
    if (gBS->HandleProtocol(image, &li_guid, (VOID **)&li) == EFI_SUCCESS && li && li->LoadOptions) {
        opt = li->LoadOptions;
        n = li->LoadOptionsSize / 2;
    }
    if (option_is(opt, n, "cli")) {
        say("halting: cli; hlt\n");
        for (;;)
            __asm__ volatile("cli; hlt");
    }
    if (option_is(opt, n, "tpl")) {
        say("halting at TPL_HIGH_LEVEL\n");
        gBS->RaiseTPL(TPL_HIGH_LEVEL);
        for (;;)
            __asm__ volatile("hlt");
    }
    if (option_is(opt, n, "sti")) {
        say("halting with interrupts enabled\n");
        for (;;)
            __asm__ volatile("hlt");
    }
    if (option_is(opt, n, "stall")) {
        say("stalling forever\n");
        for (;;)
            gBS->Stall(60 * 1000 * 1000);
    }
    say("halt: hlt with interrupts enabled until a timer event\n");
    pause_until_timer();
    return finish();
}
