/*
 * privileged: executes an instruction that only ring 0 may execute and that a firmware
 * emulator has no business emulating -- LIDT.  Under vmrun (CPL 3) it must raise #GP and
 * vmrun must report the fault; the app never returns normally there.
 *
 * The IDTR loaded is the one SIDT just stored, so under real firmware (CPL 0, where LIDT
 * succeeds) nothing changes and the app prints "FAIL privileged: returned".  (SIDT itself
 * faults at CPL 3 only if CR4.UMIP is set; either way the fault comes after "about to fault".)
 */
#include "lib.h"

struct __attribute__((packed)) dtr {
    UINT16 limit;
    UINT64 base;
};

EFI_STATUS EFIAPI efi_main(EFI_HANDLE image, EFI_SYSTEM_TABLE *st)
{
    struct dtr idtr;
    UINT16 cs;

    lib_init(image, st);
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    say("privileged: running at CPL %u\n", (UINT64)(cs & 3));
    say("about to fault\n");
    __asm__ volatile("sidt %0" : "=m"(idtr));
    __asm__ volatile("lidt %0" : : "m"(idtr) : "memory");
    fail("privileged", "returned");
    return finish();
}
