/*
 * varlist: print every UEFI variable the firmware offers (UEFI 2.10 section 8.2
 * GetNextVariableName, GetVariable), one line each:
 *   "VAR <guid bytes, hex, as stored> <name> attrs=<hex> size=<dec> data=<hex of the first 64 bytes>"
 * then "DONE <n> passed, 0 failed" with n = the number of variables. Not a service test:
 * the end-to-end tests compare its list with a machine's efivarfs.
 */
#include "lib.h"

static const char HEX[] = "0123456789abcdef";

static void hexstr(char *out, const UINT8 *data, UINTN n)
{
    for (UINTN i = 0; i < n; i++) {
        out[2 * i] = HEX[data[i] >> 4];
        out[2 * i + 1] = HEX[data[i] & 15];
    }
    out[2 * n] = 0;
}

EFI_STATUS EFIAPI efi_main(EFI_HANDLE image, EFI_SYSTEM_TABLE *st)
{
    static CHAR16 name[512];
    static UINT8 data[4096];
    static char hex[2 * 64 + 1], ghex[2 * 16 + 1];
    EFI_GUID g;
    UINTN size, n = 0;
    UINT32 attrs;
    EFI_STATUS s;

    lib_init(image, st);
    name[0] = 0;
    memset(&g, 0, sizeof(g));
    for (;;) {
        size = sizeof(name);
        s = gRT->GetNextVariableName(&size, name, &g);
        if (s != EFI_SUCCESS)
            break;
        size = sizeof(data);
        attrs = 0;
        s = gRT->GetVariable(name, &g, &attrs, &size, data);
        if (s != EFI_SUCCESS) {
            say("VARERR %S %r\r\n", name, s);
            continue;
        }
        hexstr(hex, data, size < 64 ? size : 64);
        hexstr(ghex, (const UINT8 *)&g, 16);
        say("VAR %s %S attrs=%x size=%u data=%s\r\n", ghex, name, (UINT64)attrs, (UINT64)size, hex);
        if (++n > 10000)
            break;
    }
    gPassed = n;
    return finish();
}
