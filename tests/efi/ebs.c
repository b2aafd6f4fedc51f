/*
 * ebs: ExitBootServices (UEFI 2.10 §7.4): a stale map key is refused with
 * EFI_INVALID_PARAMETER and runs no notify function; the current key succeeds and
 * signals EVT_SIGNAL_EXIT_BOOT_SERVICES events first. After a successful exit there are no
 * boot services, so the last lines go straight to the 16550 UART at 0x3f8, then the app
 * halts forever.
 */
#include "lib.h"

static volatile UINTN notified;

static void EFIAPI on_exit_boot_services(EFI_EVENT event, void *context)
{
    notified++;
}

static inline UINT8 inb(UINT16 port)
{
    UINT8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline void outb(UINT16 port, UINT8 v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static void uart_puts(const char *s)
{
    for (; *s; s++) {
        for (int spin = 0; spin < 100000 && !(inb(0x3fd) & 0x20); spin++)
            ;
        outb(0x3f8, (UINT8)*s);
    }
}

EFI_STATUS EFIAPI efi_main(EFI_HANDLE image, EFI_SYSTEM_TABLE *st)
{
    EFI_EVENT ev;
    EFI_STATUS s;
    UINTN size = 0, key = 0, desc_size = 0, buf_size;
    UINT32 version = 0;
    EFI_MEMORY_DESCRIPTOR *map = NULL;

    lib_init(image, st);
    say("ebs: ExitBootServices map key and notify semantics\n");
    s = gBS->CreateEvent(EVT_SIGNAL_EXIT_BOOT_SERVICES, TPL_NOTIFY, on_exit_boot_services, NULL, &ev);
    CHECK_ST("ebs-create-event", s, EFI_SUCCESS);

    s = gBS->GetMemoryMap(&size, NULL, &key, &desc_size, &version);
    CHECK_ST("ebs-map-probe", s, EFI_BUFFER_TOO_SMALL);
    buf_size = size + 8 * desc_size;
    s = gBS->AllocatePool(EfiLoaderData, buf_size, (void **)&map);
    CHECK_ST("ebs-map-buffer", s, EFI_SUCCESS);
    size = buf_size;
    s = gBS->GetMemoryMap(&size, map, &key, &desc_size, &version);
    CHECK_ST("ebs-map", s, EFI_SUCCESS);

    s = gBS->ExitBootServices(image, key + 1);
    CHECK_ST("ebs-stale-key", s, EFI_INVALID_PARAMETER);
    CHECK_EQ("ebs-no-notify-on-stale-key", notified, 0);
    say("exiting boot services (%u checks so far, %u failed)\n", (UINT64)gPassed, (UINT64)gFailed);

    size = buf_size;
    s = gBS->GetMemoryMap(&size, map, &key, &desc_size, &version);
    if (s == EFI_SUCCESS)
        s = gBS->ExitBootServices(image, key);
    if (s == EFI_INVALID_PARAMETER) {   /* the map may change once; the spec allows a retry */
        size = buf_size;
        s = gBS->GetMemoryMap(&size, map, &key, &desc_size, &version);
        if (s == EFI_SUCCESS)
            s = gBS->ExitBootServices(image, key);
    }
    uart_puts(s == EFI_SUCCESS ? "ok ebs-success\r\n" : "FAIL ebs-success: not EFI_SUCCESS\r\n");
    uart_puts(notified == 1 ? "ok ebs-notify-ran-once\r\n" : "FAIL ebs-notify-ran-once\r\n");
    uart_puts("DONE-EBS\r\n");
    for (;;)
        __asm__ volatile("hlt");
}
