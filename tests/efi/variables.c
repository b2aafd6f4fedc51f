/*
 * variables: UEFI 2.10 section 8.2 Variable Services and 8.3 Time Services, plus
 * GetNextHighMonotonicCount (8.5).  ResetSystem is deliberately never called.
 */
#include "lib.h"

static EFI_GUID vendor = {0x6c2b1f7e, 0x3a4d, 0x4f58, {0x9b, 0x0c, 0x1d, 0x2e, 0x3f, 0x40, 0x51, 0x62}};
static EFI_GUID other_vendor = {0x6c2b1f7e, 0x3a4d, 0x4f58, {0x9b, 0x0c, 0x1d, 0x2e, 0x3f, 0x40, 0x51, 0x63}};
static CHAR16 name[] = L"VmrunTestVar";
static CHAR16 vname[] = L"VmrunTestVolatile";
static CHAR16 missing[] = L"VmrunNoSuchVariable";
static CHAR16 empty[] = L"";

#define ATTRS (EFI_VARIABLE_NON_VOLATILE | EFI_VARIABLE_BOOTSERVICE_ACCESS | EFI_VARIABLE_RUNTIME_ACCESS)
#define VATTRS (EFI_VARIABLE_BOOTSERVICE_ACCESS | EFI_VARIABLE_RUNTIME_ACCESS)

/* enumerate all variables; return 1 if (n, g) is among them */
static int enumerate_finds(const CHAR16 *n, const EFI_GUID *g, const char *check)
{
    static CHAR16 buf[512];
    EFI_GUID guid;
    UINTN size;
    int found = 0, steps = 0;
    EFI_STATUS st;

    buf[0] = 0;
    memset(&guid, 0, sizeof(guid));
    for (;;) {
        size = sizeof(buf);
        st = gRT->GetNextVariableName(&size, buf, &guid);
        if (st != EFI_SUCCESS)
            break;
        if (guid_eq(&guid, g) && streq16(buf, n))
            found = 1;
        if (++steps > 10000) {
            fail(check, "enumeration does not terminate");
            return -1;
        }
    }
    if (st != EFI_NOT_FOUND) {
        fail(check, "GetNextVariableName returned %r after %u names", st, (UINT64)steps);
        return -1;
    }
    return found;
}

static void test_set_get(void)
{
    static char value[] = "hello, vmrun";
    static char value2[] = "second value!";
    char data[64];
    UINT32 attrs = 0;
    UINTN size;
    EFI_STATUS st;

    st = gRT->SetVariable(name, &vendor, ATTRS, sizeof(value), value);
    CHECK_ST("set-variable", st, EFI_SUCCESS);

    size = 0;
    st = gRT->GetVariable(name, &vendor, NULL, &size, NULL);
    CHECK_ST("get-variable-probe", st, EFI_BUFFER_TOO_SMALL);
    CHECK_EQ("get-variable-probe-size", size, sizeof(value));
    size = 4;
    st = gRT->GetVariable(name, &vendor, &attrs, &size, data);
    CHECK("get-variable-too-small", st == EFI_BUFFER_TOO_SMALL && size == sizeof(value));

    memset(data, 0, sizeof(data));
    size = sizeof(data);
    st = gRT->GetVariable(name, &vendor, &attrs, &size, data);
    CHECK_ST("get-variable", st, EFI_SUCCESS);
    CHECK_EQ("get-variable-size", size, sizeof(value));
    CHECK("get-variable-data", memcmp(data, value, sizeof(value)) == 0);
    CHECK_EQ("get-variable-attributes", attrs, ATTRS);
    size = sizeof(data);
    st = gRT->GetVariable(name, &other_vendor, NULL, &size, data);
    CHECK_ST("get-variable-other-vendor", st, EFI_NOT_FOUND);

    /* overwrite, then append */
    st = gRT->SetVariable(name, &vendor, ATTRS, sizeof(value2), value2);
    size = sizeof(data);
    memset(data, 0, sizeof(data));
    EFI_STATUS st2 = gRT->GetVariable(name, &vendor, NULL, &size, data);
    CHECK("set-variable-overwrite", st == EFI_SUCCESS && st2 == EFI_SUCCESS && size == sizeof(value2) &&
          memcmp(data, value2, sizeof(value2)) == 0);
    st = gRT->SetVariable(name, &vendor, ATTRS | EFI_VARIABLE_APPEND_WRITE, 3, "xyz");
    size = sizeof(data);
    memset(data, 0, sizeof(data));
    st2 = gRT->GetVariable(name, &vendor, NULL, &size, data);
    CHECK("set-variable-append", st == EFI_SUCCESS && st2 == EFI_SUCCESS && size == sizeof(value2) + 3 &&
          memcmp(data, value2, sizeof(value2)) == 0 && memcmp(data + sizeof(value2), "xyz", 3) == 0);

    int f = enumerate_finds(name, &vendor, "get-next-variable-name");
    if (f >= 0)
        CHECK("get-next-variable-name", f == 1);

    /* GetNextVariableName with a too-small buffer reports the size it needs */
    CHAR16 tiny[1] = {0};
    EFI_GUID guid;
    memset(&guid, 0, sizeof(guid));
    size = sizeof(tiny);
    st = gRT->GetNextVariableName(&size, tiny, &guid);
    CHECK("get-next-variable-name-too-small", st == EFI_BUFFER_TOO_SMALL && size > sizeof(tiny));

    /* volatile variable */
    UINT32 v = 0xC0FFEE;
    st = gRT->SetVariable(vname, &vendor, VATTRS, sizeof(v), &v);
    CHECK_ST("set-volatile-variable", st, EFI_SUCCESS);
    UINT32 got = 0;
    size = sizeof(got);
    st = gRT->GetVariable(vname, &vendor, &attrs, &size, &got);
    CHECK("get-volatile-variable", st == EFI_SUCCESS && got == 0xC0FFEE && attrs == VATTRS);
    CHECK_ST("delete-volatile-variable", gRT->SetVariable(vname, &vendor, VATTRS, 0, NULL), EFI_SUCCESS);

    /* delete with DataSize 0 */
    st = gRT->SetVariable(name, &vendor, ATTRS, 0, NULL);
    CHECK_ST("delete-variable", st, EFI_SUCCESS);
    size = sizeof(data);
    st = gRT->GetVariable(name, &vendor, NULL, &size, data);
    CHECK_ST("deleted-variable-not-found", st, EFI_NOT_FOUND);
    f = enumerate_finds(name, &vendor, "deleted-variable-not-enumerated");
    if (f >= 0)
        CHECK("deleted-variable-not-enumerated", f == 0);
    st = gRT->SetVariable(name, &vendor, ATTRS, 0, NULL);
    CHECK_ST("delete-missing-variable", st, EFI_NOT_FOUND);
}

static void test_invalid(void)
{
    char data[8];
    UINTN size = sizeof(data);
    EFI_STATUS st;

    st = gRT->GetVariable(missing, &vendor, NULL, &size, data);
    CHECK_ST("get-variable-missing", st, EFI_NOT_FOUND);
    size = sizeof(data);
    st = gRT->GetVariable(NULL, &vendor, NULL, &size, data);
    CHECK_ST("get-variable-null-name", st, EFI_INVALID_PARAMETER);
    size = sizeof(data);
    st = gRT->GetVariable(name, NULL, NULL, &size, data);
    CHECK_ST("get-variable-null-guid", st, EFI_INVALID_PARAMETER);
    st = gRT->GetVariable(name, &vendor, NULL, NULL, data);
    CHECK_ST("get-variable-null-size", st, EFI_INVALID_PARAMETER);
    st = gRT->SetVariable(empty, &vendor, ATTRS, 1, "x");
    CHECK_ST("set-variable-empty-name", st, EFI_INVALID_PARAMETER);
    st = gRT->SetVariable(name, &vendor, EFI_VARIABLE_NON_VOLATILE | EFI_VARIABLE_RUNTIME_ACCESS, 1, "x");
    CHECK_ST("set-variable-rt-without-bs", st, EFI_INVALID_PARAMETER);
    size = 0;
    st = gRT->GetNextVariableName(&size, NULL, &other_vendor);
    CHECK_ST("get-next-variable-name-null", st, EFI_INVALID_PARAMETER);

    UINT64 max_storage = 0, remaining = 0, max_var = 0;
    st = gRT->QueryVariableInfo(ATTRS, &max_storage, &remaining, &max_var);
    CHECK_ST("query-variable-info", st, EFI_SUCCESS);
    CHECK("query-variable-info-values", max_storage > 0 && remaining <= max_storage && max_var > 0);
}

static void test_time(void)
{
    EFI_TIME t;
    EFI_TIME_CAPABILITIES cap;
    memset(&t, 0, sizeof(t));
    EFI_STATUS st = gRT->GetTime(&t, &cap);
    CHECK_ST("get-time", st, EFI_SUCCESS);
    say("time: %u-%u-%u %u:%u:%u\n", (UINT64)t.Year, (UINT64)t.Month, (UINT64)t.Day,
        (UINT64)t.Hour, (UINT64)t.Minute, (UINT64)t.Second);
    CHECK("get-time-year", t.Year >= 2024 && t.Year <= 9999);
    CHECK("get-time-fields", t.Month >= 1 && t.Month <= 12 && t.Day >= 1 && t.Day <= 31 &&
          t.Hour <= 23 && t.Minute <= 59 && t.Second <= 59 && t.Nanosecond <= 999999999);
    CHECK("get-time-zone", t.TimeZone == 0x7FF || (t.TimeZone >= -1440 && t.TimeZone <= 1440));
    CHECK_ST("get-time-no-capabilities", gRT->GetTime(&t, NULL), EFI_SUCCESS);
    CHECK_ST("get-time-null", gRT->GetTime(NULL, NULL), EFI_INVALID_PARAMETER);

    UINT32 h1 = 0, h2 = 0;
    EFI_STATUS s1 = gRT->GetNextHighMonotonicCount(&h1);
    EFI_STATUS s2 = gRT->GetNextHighMonotonicCount(&h2);
    CHECK("high-monotonic-status", s1 == EFI_SUCCESS && s2 == EFI_SUCCESS);
    if (h2 > h1)
        pass("high-monotonic-increases");
    else
        fail("high-monotonic-increases", "%x then %x", (UINT64)h1, (UINT64)h2);
    UINT64 c = 0;
    gBS->GetNextMonotonicCount(&c);
    CHECK("high-monotonic-in-count", (UINT32)(c >> 32) >= h2);
    CHECK_ST("high-monotonic-null", gRT->GetNextHighMonotonicCount(NULL), EFI_INVALID_PARAMETER);
}

EFI_STATUS EFIAPI efi_main(EFI_HANDLE image, EFI_SYSTEM_TABLE *st)
{
    lib_init(image, st);
    say("variables: variable, time and monotonic-count runtime services\n");
    test_set_get();
    test_invalid();
    test_time();
    return finish();
}
