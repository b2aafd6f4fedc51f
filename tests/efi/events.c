/*
 * events: UEFI 2.10 section 7.1 Event, Timer, and Task Priority Services, plus Stall and
 * SetWatchdogTimer (7.5).
 */
#include "lib.h"

#define MS (10000ULL)   /* SetTimer counts in 100 ns units */

typedef struct {
    volatile UINTN count;
    volatile EFI_TPL tpl;       /* TPL the notify function ran at */
    VOID *volatile ctx;         /* Context argument it received */
    EFI_EVENT volatile event;   /* Event argument it received */
    int signal_self;            /* notify function signals its own event */
} NOTIFY_CTX;

static EFI_TPL current_tpl(void)
{
    EFI_TPL old = gBS->RaiseTPL(TPL_HIGH_LEVEL);
    gBS->RestoreTPL(old);
    return old;
}

static VOID EFIAPI notify(EFI_EVENT event, VOID *context)
{
    NOTIFY_CTX *c = context;
    c->count++;
    c->tpl = current_tpl();
    c->ctx = context;
    c->event = event;
    if (c->signal_self)
        gBS->SignalEvent(event);
}

static EFI_GUID group_guid =
    {0x3e1f7a2b, 0x8c4d, 0x4e5f, {0xa6, 0xb7, 0xc8, 0xd9, 0xea, 0xfb, 0x0c, 0x1d}};
static EFI_GUID exit_bs_group_guid =   /* EFI_EVENT_GROUP_EXIT_BOOT_SERVICES */
    {0x27abf055, 0xb1b8, 0x4c26, {0x80, 0x48, 0x74, 0x8f, 0x37, 0xba, 0xa2, 0xdf}};

/* wait `ms` milliseconds with a one-shot timer (at TPL_APPLICATION) */
static EFI_STATUS sleep_ms(UINT64 ms)
{
    EFI_EVENT t;
    UINTN idx;
    EFI_STATUS st = gBS->CreateEvent(EVT_TIMER, 0, NULL, NULL, &t);
    if (st != EFI_SUCCESS)
        return st;
    st = gBS->SetTimer(t, TimerRelative, ms * MS);
    if (st == EFI_SUCCESS)
        st = gBS->WaitForEvent(1, &t, &idx);
    gBS->CloseEvent(t);
    return st;
}

static void test_signal(void)
{
    static NOTIFY_CTX c;
    EFI_EVENT ev = NULL;
    EFI_STATUS st;
    UINTN idx;

    CHECK_EQ("tpl-application", current_tpl(), TPL_APPLICATION);
    st = gBS->CreateEvent(EVT_NOTIFY_SIGNAL, TPL_CALLBACK, notify, &c, &ev);
    if (!CHECK_ST("create-event-signal", st, EFI_SUCCESS))
        return;
    CHECK_EQ("notify-not-called-on-create", c.count, 0);
    st = gBS->SignalEvent(ev);
    CHECK_ST("signal-event", st, EFI_SUCCESS);
    CHECK_EQ("signal-notify-called", c.count, 1);
    CHECK_EQ("signal-notify-tpl", c.tpl, TPL_CALLBACK);
    CHECK("signal-notify-context", c.ctx == &c);
    CHECK("signal-notify-event", c.event == ev);
    gBS->SignalEvent(ev);
    CHECK_EQ("signal-again", c.count, 2);
    CHECK_ST("check-event-notify-signal", gBS->CheckEvent(ev), EFI_INVALID_PARAMETER);
    CHECK_ST("wait-event-notify-signal", gBS->WaitForEvent(1, &ev, &idx), EFI_INVALID_PARAMETER);
    CHECK_ST("set-timer-non-timer", gBS->SetTimer(ev, TimerRelative, MS), EFI_INVALID_PARAMETER);

    /* signalling at a raised TPL defers the notification until the TPL drops */
    EFI_TPL old = gBS->RaiseTPL(TPL_NOTIFY);
    EFI_TPL nested = gBS->RaiseTPL(TPL_HIGH_LEVEL);
    gBS->RestoreTPL(nested);
    gBS->SignalEvent(ev);
    UINTN during = c.count;
    EFI_TPL inside = current_tpl();
    gBS->RestoreTPL(old);
    UINTN after = c.count;
    CHECK_EQ("raise-tpl-returns-old", old, TPL_APPLICATION);
    CHECK_EQ("raise-tpl-nested-returns-old", nested, TPL_NOTIFY);
    CHECK_EQ("raise-tpl-current", inside, TPL_NOTIFY);
    CHECK_EQ("restore-tpl", current_tpl(), TPL_APPLICATION);
    CHECK_EQ("tpl-notify-deferred", during, 2);
    CHECK_EQ("tpl-notify-on-restore", after, 3);

    CHECK_ST("close-event", gBS->CloseEvent(ev), EFI_SUCCESS);

    st = gBS->CreateEvent(EVT_NOTIFY_SIGNAL, TPL_CALLBACK, NULL, NULL, &ev);
    CHECK_ST("create-event-no-notify-fn", st, EFI_INVALID_PARAMETER);
    st = gBS->CreateEvent(EVT_NOTIFY_SIGNAL, TPL_CALLBACK, notify, &c, NULL);
    CHECK_ST("create-event-null-out", st, EFI_INVALID_PARAMETER);
}

static void test_wait_events(void)
{
    static NOTIFY_CTX w, s;
    EFI_EVENT we, se, plain;
    EFI_STATUS st;

    st = gBS->CreateEvent(EVT_NOTIFY_WAIT, TPL_CALLBACK, notify, &w, &we);
    if (!CHECK_ST("create-event-wait", st, EFI_SUCCESS))
        return;
    CHECK_ST("check-event-not-ready", gBS->CheckEvent(we), EFI_NOT_READY);
    CHECK("check-event-runs-wait-notify", w.count >= 1 && w.ctx == &w);
    gBS->SignalEvent(we);
    CHECK_ST("check-event-signalled", gBS->CheckEvent(we), EFI_SUCCESS);
    CHECK_ST("check-event-cleared", gBS->CheckEvent(we), EFI_NOT_READY);
    gBS->CloseEvent(we);

    s.signal_self = 1;
    st = gBS->CreateEvent(EVT_NOTIFY_WAIT, TPL_CALLBACK, notify, &s, &se);
    if (CHECK_ST("create-event-wait-self", st, EFI_SUCCESS)) {
        CHECK_ST("check-event-notify-signals", gBS->CheckEvent(se), EFI_SUCCESS);
        gBS->CloseEvent(se);
    }

    st = gBS->CreateEvent(0, 0, NULL, NULL, &plain);
    if (CHECK_ST("create-event-plain", st, EFI_SUCCESS)) {
        CHECK_ST("check-event-plain-not-ready", gBS->CheckEvent(plain), EFI_NOT_READY);
        gBS->SignalEvent(plain);
        CHECK_ST("check-event-plain-signalled", gBS->CheckEvent(plain), EFI_SUCCESS);
        gBS->CloseEvent(plain);
    }
}

static void test_timers(void)
{
    static NOTIFY_CTX p;
    EFI_EVENT t, never, evs[2], pe;
    UINTN idx = 99;
    EFI_STATUS st;

    st = gBS->CreateEvent(EVT_TIMER, 0, NULL, NULL, &t);
    if (!CHECK_ST("create-timer", st, EFI_SUCCESS))
        return;
    CHECK_ST("set-timer-relative", gBS->SetTimer(t, TimerRelative, 1 * MS), EFI_SUCCESS);
    st = gBS->WaitForEvent(1, &t, &idx);
    CHECK_ST("wait-timer", st, EFI_SUCCESS);
    CHECK_EQ("wait-timer-index", idx, 0);
    CHECK_ST("wait-clears-signal", gBS->CheckEvent(t), EFI_NOT_READY);

    /* two events, only the second (a timer) is signalled */
    gBS->CreateEvent(0, 0, NULL, NULL, &never);
    evs[0] = never;
    evs[1] = t;
    gBS->SetTimer(t, TimerRelative, 2 * MS);
    idx = 99;
    st = gBS->WaitForEvent(2, evs, &idx);
    CHECK("wait-two-events-index", st == EFI_SUCCESS && idx == 1);

    /* a relative timer that is cancelled never fires */
    gBS->SetTimer(t, TimerRelative, 5 * MS);
    CHECK_ST("set-timer-cancel", gBS->SetTimer(t, TimerCancel, 0), EFI_SUCCESS);
    sleep_ms(30);
    CHECK_ST("timer-cancelled-not-signalled", gBS->CheckEvent(t), EFI_NOT_READY);

    /* WaitForEvent is only allowed at TPL_APPLICATION */
    gBS->SetTimer(t, TimerRelative, 1 * MS);
    EFI_TPL old = gBS->RaiseTPL(TPL_CALLBACK);
    st = gBS->WaitForEvent(1, &t, &idx);
    gBS->RestoreTPL(old);
    CHECK_ST("wait-event-raised-tpl", st, EFI_UNSUPPORTED);
    gBS->CloseEvent(never);
    CHECK_ST("close-timer", gBS->CloseEvent(t), EFI_SUCCESS);

    /* periodic timer with a notify function */
    st = gBS->CreateEvent(EVT_TIMER | EVT_NOTIFY_SIGNAL, TPL_CALLBACK, notify, &p, &pe);
    if (!CHECK_ST("create-periodic", st, EFI_SUCCESS))
        return;
    CHECK_ST("set-timer-periodic", gBS->SetTimer(pe, TimerPeriodic, 1 * MS), EFI_SUCCESS);
    for (int i = 0; i < 50 && p.count < 3; i++)
        sleep_ms(20);
    if (p.count >= 3)
        pass("periodic-fires-repeatedly");
    else
        fail("periodic-fires-repeatedly", "fired %u times in 1 s", (UINT64)p.count);
    CHECK_EQ("periodic-notify-tpl", p.tpl, TPL_CALLBACK);
    CHECK("periodic-notify-event", p.event == pe);
    gBS->SetTimer(pe, TimerCancel, 0);
    UINTN stopped = p.count;
    sleep_ms(30);
    CHECK_EQ("periodic-cancel", p.count, stopped);

    /* closing an armed periodic timer stops it */
    gBS->SetTimer(pe, TimerPeriodic, 1 * MS);
    sleep_ms(20);
    CHECK_ST("close-armed-periodic", gBS->CloseEvent(pe), EFI_SUCCESS);
    stopped = p.count;
    sleep_ms(30);
    CHECK_EQ("closed-periodic-silent", p.count, stopped);
}

static void test_groups(void)
{
    static NOTIFY_CTX a, b, c;
    EFI_EVENT ea, eb, ec, ex;
    EFI_STATUS st;

    st = gBS->CreateEventEx(EVT_NOTIFY_SIGNAL, TPL_CALLBACK, notify, &a, &group_guid, &ea);
    CHECK_ST("create-event-ex-group", st, EFI_SUCCESS);
    st |= gBS->CreateEventEx(EVT_NOTIFY_SIGNAL, TPL_CALLBACK, notify, &b, &group_guid, &eb);
    st |= gBS->CreateEventEx(EVT_NOTIFY_SIGNAL, TPL_CALLBACK, notify, &c, NULL, &ec);
    if (!CHECK_ST("create-event-ex-more", st, EFI_SUCCESS))
        return;
    gBS->SignalEvent(ea);
    CHECK("group-signal-self", a.count == 1 && a.ctx == &a);
    CHECK("group-signal-member", b.count == 1 && b.ctx == &b && b.event == eb);
    CHECK_EQ("group-non-member-untouched", c.count, 0);
    gBS->SignalEvent(ec);
    CHECK("no-group-signal-alone", c.count == 1 && a.count == 1 && b.count == 1);
    CHECK_ST("group-close-member", gBS->CloseEvent(ea), EFI_SUCCESS);
    gBS->SignalEvent(eb);
    CHECK("group-after-close", a.count == 1 && b.count == 2);
    gBS->CloseEvent(eb);
    gBS->CloseEvent(ec);

    st = gBS->CreateEventEx(EVT_NOTIFY_SIGNAL, TPL_CALLBACK, notify, &c, &exit_bs_group_guid, &ex);
    CHECK_ST("create-event-ex-exit-bs-group", st, EFI_SUCCESS);
    CHECK_EQ("exit-bs-group-not-signalled", c.count, 1);
    if (st == EFI_SUCCESS)
        gBS->CloseEvent(ex);
    st = gBS->CreateEvent(EVT_SIGNAL_EXIT_BOOT_SERVICES, TPL_CALLBACK, notify, &c, &ex);
    CHECK_ST("create-event-exit-bs", st, EFI_SUCCESS);
    if (st == EFI_SUCCESS)
        CHECK_ST("close-event-exit-bs", gBS->CloseEvent(ex), EFI_SUCCESS);
}

static void test_misc(void)
{
    CHECK_ST("stall-1ms", gBS->Stall(1000), EFI_SUCCESS);
    CHECK_ST("stall-0", gBS->Stall(0), EFI_SUCCESS);
    CHECK_ST("watchdog-set", gBS->SetWatchdogTimer(300, 0x10000, 0, NULL), EFI_SUCCESS);
    CHECK_ST("watchdog-disable", gBS->SetWatchdogTimer(0, 0, 0, NULL), EFI_SUCCESS);
}

EFI_STATUS EFIAPI efi_main(EFI_HANDLE image, EFI_SYSTEM_TABLE *st)
{
    lib_init(image, st);
    say("events: events, timers, TPL\n");
    test_signal();
    test_wait_events();
    test_timers();
    test_groups();
    test_misc();
    return finish();
}
