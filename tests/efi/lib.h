/*
 * Shared helpers for the vmrun EFI test applications.
 *
 * Reporting protocol (parsed by the pytest side, keep it exact):
 *   one line per check:   "ok <name>"  or  "FAIL <name>: <detail>"
 *   final line:           "DONE <passed> passed, <failed> failed"
 * Lines are written with ConOut->OutputString, one call per line, ending "\r\n".
 * efi_main returns EFI_SUCCESS if nothing failed, else EFI_ABORTED (see finish()).
 */
#ifndef VMRUN_TEST_LIB_H
#define VMRUN_TEST_LIB_H

#include <stdarg.h>
#include "efi.h"

extern EFI_HANDLE            gImage;
extern EFI_SYSTEM_TABLE     *gST;
extern EFI_BOOT_SERVICES    *gBS;
extern EFI_RUNTIME_SERVICES *gRT;
extern UINTN                 gPassed, gFailed;

void lib_init(EFI_HANDLE image, EFI_SYSTEM_TABLE *st);

/* Formatted output, ASCII format string.  Conversions (all numbers are taken
 * as 64-bit: cast arguments to UINT64 / INT64):
 *   %s char*   %S CHAR16*   %x UINT64 hex   %u UINT64 dec   %d INT64 dec
 *   %c char    %r EFI_STATUS (symbolic name)   %% */
void say(const char *fmt, ...);
void vsay(const char *fmt, va_list ap);

/* Reporting */
void pass(const char *name);
void fail(const char *name, const char *fmt, ...);
int  check_(const char *name, int cond, const char *expr);
int  check_status_(const char *name, EFI_STATUS got, EFI_STATUS want);
int  check_eq_(const char *name, UINT64 got, UINT64 want);
EFI_STATUS finish(void);
const char *status_name(EFI_STATUS s);

#define CHECK(name, cond)         check_((name), (cond) ? 1 : 0, #cond)
#define CHECK_ST(name, got, want) check_status_((name), (got), (want))
#define CHECK_EQ(name, got, want) check_eq_((name), (UINT64)(got), (UINT64)(want))

/* freestanding replacements (also satisfy compiler-generated calls) */
void *memset(void *d, int c, unsigned long long n);
void *memcpy(void *d, const void *s, unsigned long long n);
void *memmove(void *d, const void *s, unsigned long long n);
int   memcmp(const void *a, const void *b, unsigned long long n);
UINTN strlen16(const CHAR16 *s);
int   streq16(const CHAR16 *a, const CHAR16 *b);
int   guid_eq(const EFI_GUID *a, const EFI_GUID *b);
UINT32 crc32_calc(const void *data, UINTN len);   /* IEEE 802.3, as CalculateCrc32 */

/* Device path helpers */
UINTN dp_node_len(const EFI_DEVICE_PATH_PROTOCOL *n);
int   dp_is_end(const EFI_DEVICE_PATH_PROTOCOL *n);
EFI_DEVICE_PATH_PROTOCOL *dp_next(const EFI_DEVICE_PATH_PROTOCOL *n);

/* The PE file of an image loaded at base, rebuilt for LoadImage (NULL beyond max_size, 0: any) */
UINT8 *pe_file_of_image(UINT8 *base, UINTN max_size, UINTN *size_out);

#endif
