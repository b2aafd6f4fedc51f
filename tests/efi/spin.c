/* spin: prints "spinning" and then loops forever (for vmrun's timeout test).
 * Uses only unprivileged instructions (pause), so it spins at CPL 3 and CPL 0 alike. */
#include "lib.h"

EFI_STATUS EFIAPI efi_main(EFI_HANDLE image, EFI_SYSTEM_TABLE *st)
{
    lib_init(image, st);
    say("spinning\n");
    for (;;)
        __asm__ volatile("pause" ::: "memory");
}
