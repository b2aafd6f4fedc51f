/* Shared helpers for the vmrun EFI test applications; see lib.h. */
#include "lib.h"

EFI_HANDLE            gImage;
EFI_SYSTEM_TABLE     *gST;
EFI_BOOT_SERVICES    *gBS;
EFI_RUNTIME_SERVICES *gRT;
UINTN                 gPassed, gFailed;

void lib_init(EFI_HANDLE image, EFI_SYSTEM_TABLE *st)
{
    gImage = image;
    gST = st;
    gBS = st ? st->BootServices : NULL;
    gRT = st ? st->RuntimeServices : NULL;
    gPassed = gFailed = 0;
}

/* ---- line-buffered output -------------------------------------------- */
#define LINE_MAX 240
static CHAR16 line[LINE_MAX + 3];
static UINTN  line_len;

static void flush_line(int newline)
{
    if (newline) {
        line[line_len++] = '\r';
        line[line_len++] = '\n';
    }
    line[line_len] = 0;
    if (line_len && gST && gST->ConOut)
        gST->ConOut->OutputString(gST->ConOut, line);
    line_len = 0;
}

static void putc16(CHAR16 c)
{
    if (c == '\n') {
        flush_line(1);
        return;
    }
    if (c == '\r')
        return;
    if (line_len >= LINE_MAX)
        flush_line(0);
    line[line_len++] = c;
}

static void put_str(const char *s)
{
    if (!s)
        s = "(null)";
    while (*s)
        putc16((UINT8)*s++);
}

static void put_hex(UINT64 v)
{
    static const char digits[] = "0123456789abcdef";
    char buf[17];
    int i = 16;
    buf[i] = 0;
    do {
        buf[--i] = digits[v & 15];
        v >>= 4;
    } while (v);
    put_str("0x");
    put_str(&buf[i]);
}

static void put_dec(UINT64 v)
{
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    put_str(&buf[i]);
}

const char *status_name(EFI_STATUS s)
{
    static const char *const errs[] = {
        "EFI_SUCCESS", "EFI_LOAD_ERROR", "EFI_INVALID_PARAMETER", "EFI_UNSUPPORTED",
        "EFI_BAD_BUFFER_SIZE", "EFI_BUFFER_TOO_SMALL", "EFI_NOT_READY", "EFI_DEVICE_ERROR",
        "EFI_WRITE_PROTECTED", "EFI_OUT_OF_RESOURCES", "EFI_VOLUME_CORRUPTED",
        "EFI_VOLUME_FULL", "EFI_NO_MEDIA", "EFI_MEDIA_CHANGED", "EFI_NOT_FOUND",
        "EFI_ACCESS_DENIED", "EFI_NO_RESPONSE", "EFI_NO_MAPPING", "EFI_TIMEOUT",
        "EFI_NOT_STARTED", "EFI_ALREADY_STARTED", "EFI_ABORTED",
    };
    if (s == 0)
        return errs[0];
    if ((s & EFI_ERROR_BIT) && (s & ~EFI_ERROR_BIT) < sizeof(errs) / sizeof(errs[0]))
        return errs[s & ~EFI_ERROR_BIT];
    return NULL;
}

void vsay(const char *fmt, va_list ap)
{
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            putc16((UINT8)*fmt);
            continue;
        }
        switch (*++fmt) {
        case 's': put_str(va_arg(ap, const char *)); break;
        case 'S': {
            const CHAR16 *w = va_arg(ap, const CHAR16 *);
            if (!w) { put_str("(null)"); break; }
            while (*w) putc16(*w++);
            break;
        }
        case 'x': put_hex(va_arg(ap, UINT64)); break;
        case 'u': put_dec(va_arg(ap, UINT64)); break;
        case 'd': {
            INT64 v = va_arg(ap, INT64);
            if (v < 0) { putc16('-'); put_dec((UINT64)0 - (UINT64)v); }
            else put_dec((UINT64)v);
            break;
        }
        case 'c': putc16((UINT8)va_arg(ap, int)); break;
        case 'r': {
            EFI_STATUS s = va_arg(ap, EFI_STATUS);
            const char *n = status_name(s);
            if (n) put_str(n); else put_hex(s);
            break;
        }
        case '%': putc16('%'); break;
        case 0: return;
        default: putc16('%'); putc16((UINT8)*fmt); break;
        }
    }
}

void say(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsay(fmt, ap);
    va_end(ap);
}

/* ---- reporting ---------------------------------------------------------- */
void pass(const char *name)
{
    gPassed++;
    say("ok %s\n", name);
}

void fail(const char *name, const char *fmt, ...)
{
    va_list ap;
    gFailed++;
    say("FAIL %s: ", name);
    va_start(ap, fmt);
    vsay(fmt, ap);
    va_end(ap);
    say("\n");
}

int check_(const char *name, int cond, const char *expr)
{
    if (cond)
        pass(name);
    else
        fail(name, "expected %s", expr);
    return cond;
}

int check_status_(const char *name, EFI_STATUS got, EFI_STATUS want)
{
    if (got == want) {
        pass(name);
        return 1;
    }
    fail(name, "got %r, expected %r", got, want);
    return 0;
}

int check_eq_(const char *name, UINT64 got, UINT64 want)
{
    if (got == want) {
        pass(name);
        return 1;
    }
    fail(name, "got %x, expected %x", got, want);
    return 0;
}

EFI_STATUS finish(void)
{
    say("DONE %u passed, %u failed\n", (UINT64)gPassed, (UINT64)gFailed);
    return gFailed ? EFI_ABORTED : EFI_SUCCESS;
}

/* ---- memory / string helpers --------------------------------------------- */
void *memset(void *d, int c, unsigned long long n)
{
    volatile UINT8 *p = d;
    while (n--)
        *p++ = (UINT8)c;
    return d;
}

void *memcpy(void *d, const void *s, unsigned long long n)
{
    volatile UINT8 *dp = d;
    const UINT8 *sp = s;
    while (n--)
        *dp++ = *sp++;
    return d;
}

void *memmove(void *d, const void *s, unsigned long long n)
{
    volatile UINT8 *dp = d;
    const UINT8 *sp = s;
    if (dp < sp) {
        while (n--)
            *dp++ = *sp++;
    } else if (dp > sp) {
        dp += n;
        sp += n;
        while (n--)
            *--dp = *--sp;
    }
    return d;
}

int memcmp(const void *a, const void *b, unsigned long long n)
{
    const UINT8 *x = a, *y = b;
    for (; n; n--, x++, y++)
        if (*x != *y)
            return *x < *y ? -1 : 1;
    return 0;
}

UINTN strlen16(const CHAR16 *s)
{
    UINTN n = 0;
    while (s[n])
        n++;
    return n;
}

int streq16(const CHAR16 *a, const CHAR16 *b)
{
    while (*a && *a == *b)
        a++, b++;
    return *a == *b;
}

int guid_eq(const EFI_GUID *a, const EFI_GUID *b)
{
    return memcmp(a, b, sizeof(EFI_GUID)) == 0;
}

UINT32 crc32_calc(const void *data, UINTN len)
{
    /* reflected CRC-32, polynomial 0x04C11DB7 (0xEDB88320 reversed),
     * init 0xFFFFFFFF, final xor 0xFFFFFFFF -- the spec's CRC32 */
    const UINT8 *p = data;
    UINT32 crc = 0xFFFFFFFFu;
    while (len--) {
        crc ^= *p++;
        for (int k = 0; k < 8; k++)
            crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
    }
    return crc ^ 0xFFFFFFFFu;
}

UINTN dp_node_len(const EFI_DEVICE_PATH_PROTOCOL *n)
{
    return (UINTN)n->Length[0] | ((UINTN)n->Length[1] << 8);
}

int dp_is_end(const EFI_DEVICE_PATH_PROTOCOL *n)
{
    return n->Type == END_DEVICE_PATH_TYPE && n->SubType == END_ENTIRE_DEVICE_PATH_SUBTYPE;
}

EFI_DEVICE_PATH_PROTOCOL *dp_next(const EFI_DEVICE_PATH_PROTOCOL *n)
{
    return (EFI_DEVICE_PATH_PROTOCOL *)((const UINT8 *)n + dp_node_len(n));
}

/* The PE file of an image loaded at ``base``, rebuilt: headers and each section's raw data at
 * its file offset, ImageBase set to ``base`` (the loaded data are relocated for it), so that
 * LoadImage of the buffer relocates it correctly again. NULL when the file would be larger than
 * ``max_size`` (0: no bound) or no pool is left. */
UINT8 *pe_file_of_image(UINT8 *base, UINTN max_size, UINTN *size_out)
{
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
    if (max_size && fsize > max_size)
        return NULL;
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
