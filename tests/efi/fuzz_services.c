/*
 * fuzz_services: every boot service, runtime service and protocol function vmrun implements,
 * called with garbage arguments (seeded, reproducible).
 *
 * LoadOptions: "[seed=N] [calls=N] [fwptrs=0]" (defaults: seed 1, calls 100000; fwptrs=0 leaves
 * out the pointers into firmware memory, to look past that class of defect). Each round picks one
 * function at random and builds its arguments from: random integers, NULL, pointers into the
 * app's own arena at random offsets (sizes that fit the arena), pointers into RAM nobody
 * allocated, canonical addresses with no RAM, non-canonical addresses, tiny integers, pointers
 * into firmware memory (IDT, GDT, PML4, a service thunk: a service must never write there on
 * the payload's behalf), huge sizes (>= 2^40, beyond any RAM), real handles, events, GUIDs,
 * device paths, file handles (also closed ones), TPM commands and event records, mutated copies
 * of its own PE image.
 *
 * What it never does, because the run could then end legitimately or the app would break
 * itself: ExitBootServices, Exit, ResetSystem; StartImage of an image it loaded (only of
 * garbage handles, its own started image and other handles); a notify function other than its
 * own counter; a WaitForEvent that could block (entry 0 is always a signalled event or not an
 * event); Stall beyond 100 us; an armed watchdog; SetMem/CopyMem outside the arena; an output
 * size that overruns the arena when the pointer is into the arena (the 1 MiB arena is only
 * pointed at in its first 256 KiB and "valid" sizes are below 64 KiB); FreePool/FreePages of
 * the arena or its own image; calls through a protocol's function table after it may have
 * been freed (the file protocol's functions are called through a copy of the table, so a
 * closed file is passed as This, not dereferenced).
 *
 * At the end it prints
 *   DONE fuzz seed <s> calls <n> success <k> errors <e> notifies <m>
 * and calls ExitBootServices, so a clean run is outcome exit_boot_services (exit code 0).
 */
#include "lib.h"

#pragma GCC diagnostic ignored "-Wunused-function"

static EFI_GUID li_guid = EFI_LOADED_IMAGE_PROTOCOL_GUID;
static EFI_GUID dp_guid = EFI_DEVICE_PATH_PROTOCOL_GUID;
static EFI_GUID rng_guid = EFI_RNG_PROTOCOL_GUID;
static EFI_GUID tcg2_guid = EFI_TCG2_PROTOCOL_GUID;
static EFI_GUID sfs_guid = EFI_SIMPLE_FILE_SYSTEM_PROTOCOL_GUID;
static EFI_GUID lf2_guid = EFI_LOAD_FILE2_PROTOCOL_GUID;
static EFI_GUID dptt_guid = EFI_DEVICE_PATH_TO_TEXT_PROTOCOL_GUID;
static EFI_GUID dpft_guid = EFI_DEVICE_PATH_FROM_TEXT_PROTOCOL_GUID;

static EFI_GUID KG[] = {
    EFI_LOADED_IMAGE_PROTOCOL_GUID, EFI_LOADED_IMAGE_DEVICE_PATH_PROTOCOL_GUID,
    EFI_DEVICE_PATH_PROTOCOL_GUID, EFI_SIMPLE_TEXT_INPUT_PROTOCOL_GUID,
    EFI_SIMPLE_TEXT_OUTPUT_PROTOCOL_GUID, EFI_RNG_PROTOCOL_GUID, EFI_RNG_ALGORITHM_RAW,
    EFI_LOAD_FILE2_PROTOCOL_GUID, EFI_SIMPLE_FILE_SYSTEM_PROTOCOL_GUID, EFI_TCG2_PROTOCOL_GUID,
    EFI_DEVICE_PATH_TO_TEXT_PROTOCOL_GUID, EFI_DEVICE_PATH_FROM_TEXT_PROTOCOL_GUID,
    EFI_FILE_INFO_ID, EFI_FILE_SYSTEM_INFO_ID, EFI_FILE_SYSTEM_VOLUME_LABEL_ID, EFI_GLOBAL_VARIABLE,
    EFI_ACPI_20_TABLE_GUID, EFI_TCG2_FINAL_EVENTS_TABLE_GUID, EFI_RT_PROPERTIES_TABLE_GUID,
    EFI_IMAGE_SECURITY_DATABASE_GUID, LINUX_EFI_INITRD_MEDIA_GUID,
    {0x12345678, 0x9abc, 0xdef0, {1, 2, 3, 4, 5, 6, 7, 8}},
};
#define NKG (sizeof(KG) / sizeof(KG[0]))

static const CHAR16 *TEXTS[] = {
    L"PciRoot(0x0)/Pci(0x1,0x1)/HD(1,GPT,5c4ba054-59fe-5e78-9c81-4139c4e32cc2,0x800,0x1000)",
    L"VenMedia(5568e427-68fc-4f3d-ac74-ca555231cc68)", L"\\EFI\\BOOT\\BOOTX64.EFI", L"",
    L"File(hello.txt)", L"MemoryMapped(0xb,0x0,0xffffffffffffffff)", L"Pci(", L"/////",
    L"VenHw(00000000-0000-0000-0000-000000000000,0102030405060708090a)", L"Acpi(PNP0A03,0)",
    L"HD(99999999999999999999,MBR,0xffffffff,0x1,0x1)", L"hello.txt", L"\\dir\\a.bin", L"..",
    L"\\..\\..\\..\\etc\\passwd", L"dir", L"\\", L"NEWFILE.TXT", L"hello.txt\\..\\..",
};
#define NTEXTS (sizeof(TEXTS) / sizeof(TEXTS[0]))

/* ---- random numbers ------------------------------------------------------------------------ */
static UINT64 rs = 1;
static UINT64 rnd(void)
{
    rs ^= rs >> 12;
    rs ^= rs << 25;
    rs ^= rs >> 27;
    return rs * 0x2545F4914F6CDD1DULL;
}
static UINT64 below(UINT64 n) { return n ? rnd() % n : 0; }

/* ---- state ------------------------------------------------------------------------------- */
#define ARENA_SIZE  (1u << 20)
#define ARENA_USE   (256u << 10)   /* pointers go only here */
#define BUF_MAX     (64u << 10)    /* "valid" sizes stay below this */
#define MUTANT_AT   (640u << 10)   /* a mutated copy of the app's PE */
#define DP_AT       (900u << 10)   /* a mutated copy of a real device path */
static UINT8 *A;
static UINT64 unalloc_base, unalloc_pages;
static UINT64 fw_ptrs[4];
static UINTN n_fw;
static EFI_LOADED_IMAGE_PROTOCOL *gLI;
static EFI_DEVICE_PATH_PROTOCOL *dev_dp;
static UINT8 *own_pe;
static UINTN own_pe_size;

static EFI_HANDLE H[64];
static UINTN nH;
static EFI_EVENT E[64];
static UINTN nE;
static VOID *P[256];
static UINTN nP;
static EFI_PHYSICAL_ADDRESS PGa[64];
static UINTN PGn[64], nPG;
static EFI_HANDLE LIH[16];
static UINTN nLIH;
static EFI_FILE_PROTOCOL *F[32];
static UINTN nF;
static EFI_FILE_PROTOCOL *STALE[16];
static UINTN nSTALE;
static EFI_FILE_PROTOCOL FT;            /* a copy of the file protocol's function table */
static int have_ft;

static EFI_RNG_PROTOCOL *rng;
static EFI_TCG2_PROTOCOL *tcg2;
static EFI_SIMPLE_FILE_SYSTEM_PROTOCOL *sfs;
static EFI_LOAD_FILE2_PROTOCOL *lf2;
static EFI_DEVICE_PATH_TO_TEXT_PROTOCOL *dptt;
static EFI_DEVICE_PATH_FROM_TEXT_PROTOCOL *dpft;
static EFI_DEVICE_PATH_PROTOCOL *initrd_dp;

static UINT64 calls, successes, errors;
static volatile UINT64 notifies;
static UINT64 per_service[64];

static void EFIAPI fz_notify(EFI_EVENT ev, VOID *ctx) { notifies++; }

static void count(EFI_STATUS s)
{
    calls++;
    if (EFI_ERROR(s))
        errors++;
    else
        successes++;
}
#define CALL(expr) do { EFI_STATUS _s = (expr); count(_s); st_ = _s; } while (0)
#define VCALL(expr) do { expr; calls++; } while (0)

static int in_arena(const void *p) { return (const UINT8 *)p >= A && (const UINT8 *)p < A + ARENA_SIZE; }

/* ---- argument generators ------------------------------------------------------------------ */
static void *gptr(void)
{
    switch (below(14)) {
    case 0: case 1: return NULL;
    case 2: case 3: case 4: case 5: return A + below(ARENA_USE);
    case 6: case 7: return A + below(ARENA_USE / 8) * 8;
    case 8: return (void *)(unalloc_base + below(unalloc_pages) * 4096 + below(4096));
    case 9: return (void *)(0x0000700000000000ULL + below(1ULL << 40));   /* canonical, no RAM */
    case 10: return (void *)(0x8000000000000000ULL | rnd());              /* non-canonical */
    case 11: return (void *)below(0x1000);
    case 12: return (void *)rnd();
    default: return n_fw ? (void *)(fw_ptrs[below(n_fw)] + below(64)) : NULL;
    }
}

/* a pointer into the arena with room for BUF_MAX bytes: where the app wants real output */
static void *abuf(void) { return A + below(ARENA_USE / 8) * 8; }

static UINTN gsize(void)
{
    switch (below(9)) {
    case 0: return 0;
    case 1: return 1 + below(16);
    case 2: case 3: case 4: return below(BUF_MAX);
    case 5: return 1ULL << (40 + below(24));
    case 6: return ~0ULL - below(16);
    case 7: return rnd() | (1ULL << 40);
    default: return below(4096);
    }
}

/* a pointer and a size the host may read or write: own buffer with a fitting size, or garbage
 * that must be refused (a huge size, or a bad pointer) */
static void *gbuf(UINTN *size)
{
    if (below(3)) {
        *size = below(BUF_MAX);
        return abuf();
    }
    void *p = gptr();
    *size = in_arena(p) ? (below(2) ? below(BUF_MAX) : (1ULL << (40 + below(20)))) : gsize();
    return p;
}

/* a pointer to a UINTN size the host reads and may overwrite: the value is random */
static UINTN *gsizep(void)
{
    UINTN *p = (UINTN *)gptr();
    if (in_arena(p) && ((UINT64)p & 7) == 0) {
        UINTN v;
        switch (below(4)) {
        case 0: v = 0; break;
        case 1: v = below(BUF_MAX); break;
        case 2: v = rnd(); break;
        default: v = below(256); break;
        }
        *p = v;
    }
    return p;
}

static EFI_HANDLE ghandle(void)
{
    switch (below(7)) {
    case 0: return NULL;
    case 1: return (EFI_HANDLE)gptr();
    case 2: return (EFI_HANDLE)rnd();
    case 3: return gImage;
    default: return nH ? H[below(nH)] : gImage;
    }
}

static EFI_GUID *gguid(void)
{
    if (below(4) == 0)
        return (EFI_GUID *)gptr();
    return &KG[below(NKG)];
}

static EFI_EVENT gevent(void)
{
    switch (below(6)) {
    case 0: return NULL;
    case 1: return (EFI_EVENT)gptr();
    case 2: return gST->ConIn->WaitForKey;
    case 3: return (EFI_EVENT)rnd();
    default: return nE ? E[below(nE)] : NULL;
    }
}

static EFI_DEVICE_PATH_PROTOCOL *gdp(void)
{
    switch (below(7)) {
    case 0: return NULL;
    case 1: case 2: return (EFI_DEVICE_PATH_PROTOCOL *)gptr();
    case 3: return gLI ? gLI->FilePath : NULL;
    case 4: return dev_dp;
    case 5: return initrd_dp;
    default: {
        /* a mutated copy of a real path */
        EFI_DEVICE_PATH_PROTOCOL *src = below(2) ? dev_dp : (gLI ? gLI->FilePath : NULL);
        if (!src)
            return NULL;
        UINTN len = 0;
        for (EFI_DEVICE_PATH_PROTOCOL *n = src; !dp_is_end(n) && len < 4096; n = dp_next(n))
            len += dp_node_len(n);
        len += 4;
        if (len > 8192)
            len = 8192;
        memcpy(A + DP_AT, src, len);
        for (UINTN k = below(4); k; k--)
            A[DP_AT + below(len)] = (UINT8)rnd();
        return (EFI_DEVICE_PATH_PROTOCOL *)(A + DP_AT);
    }
    }
}

static CHAR16 *gtext(void)
{
    if (below(3) == 0)
        return (CHAR16 *)gptr();
    /* a known text, maybe mutated, copied into the arena */
    const CHAR16 *t = TEXTS[below(NTEXTS)];
    CHAR16 *d = (CHAR16 *)(A + below(ARENA_USE / 2 - 512) * 2);
    UINTN n = strlen16(t);
    memcpy(d, t, (n + 1) * 2);
    if (n && below(2))
        d[below(n)] = below(2) ? (CHAR16)rnd() : (CHAR16)"()\\/,:x0 "[below(9)];
    return d;
}

static EFI_FILE_PROTOCOL *gfile(void)
{
    switch (below(6)) {
    case 0: return (EFI_FILE_PROTOCOL *)gptr();
    case 1: return nSTALE ? STALE[below(nSTALE)] : NULL;
    default: return nF ? F[below(nF)] : NULL;
    }
}

static void keep_file(EFI_FILE_PROTOCOL *f)
{
    if (!f)
        return;
    if (!have_ft) {
        FT = *f;
        have_ft = 1;
    }
    if (nF < 32)
        F[nF++] = f;
}

static void drop_file(EFI_FILE_PROTOCOL *f)
{
    for (UINTN i = 0; i < nF; i++)
        if (F[i] == f) {
            F[i] = F[--nF];
            if (nSTALE < 16)
                STALE[nSTALE++] = f;
            else
                STALE[below(16)] = f;
            return;
        }
}

static void keep_pool(VOID *p)
{
    if (!p)
        return;
    if (nP < 256)
        P[nP++] = p;
    else {
        gBS->FreePool(p);
        calls++;
    }
}

static void randomize_arena(void)
{
    UINT64 *q = (UINT64 *)A;
    for (UINTN i = 0; i < ARENA_USE / 8; i++) {
        UINT64 v = rnd();
        if (i % 8 == 7)
            v &= 0xFFFFFFFF0000FFFFULL;   /* a UTF-16 NUL now and then: strings end */
        q[i] = v;
    }
}

/* ---- one call ----------------------------------------------------------------------------- */
enum {
    S_TPL, S_RESTORETPL, S_ALLOCPAGES, S_FREEPAGES, S_MEMMAP, S_ALLOCPOOL, S_FREEPOOL, S_CREATEEVENT,
    S_SETTIMER, S_WAITFOREVENT, S_SIGNALEVENT, S_CLOSEEVENT, S_CHECKEVENT, S_INSTALLPI, S_REINSTALLPI,
    S_UNINSTALLPI, S_HANDLEPROTOCOL, S_REGNOTIFY, S_LOCATEHANDLE, S_LOCATEDP, S_CONFIGTABLE, S_LOADIMAGE,
    S_STARTIMAGE, S_UNLOADIMAGE, S_MONOTONIC, S_STALL, S_WATCHDOG, S_CONNECT, S_DISCONNECT,
    S_OPENPROTOCOL, S_CLOSEPROTOCOL, S_OPENINFO, S_PROTOCOLSPERHANDLE, S_LOCATEHANDLEBUFFER,
    S_LOCATEPROTOCOL, S_INSTALLMULTI, S_UNINSTALLMULTI, S_CRC, S_COPYMEM, S_SETMEM, S_CREATEEVENTEX,
    /* runtime */
    S_GETTIME, S_SETTIME, S_GETWAKEUP, S_SETWAKEUP, S_GETVAR, S_NEXTVAR, S_SETVAR, S_HIGHMONO,
    S_CAPSULE, S_QUERYCAPSULE, S_QUERYVAR,
    /* protocols */
    S_CONOUT, S_CONIN, S_DPTT, S_DPFT, S_RNG, S_TCG2, S_SFS, S_FILE, S_LF2,
    S_COUNT
};

static const UINT32 EVT_TYPES[] = {
    0, EVT_TIMER, EVT_NOTIFY_WAIT, EVT_NOTIFY_SIGNAL, EVT_TIMER | EVT_NOTIFY_SIGNAL,
    EVT_TIMER | EVT_NOTIFY_WAIT, EVT_SIGNAL_EXIT_BOOT_SERVICES, EVT_SIGNAL_VIRTUAL_ADDRESS_CHANGE,
    EVT_RUNTIME | EVT_NOTIFY_SIGNAL, EVT_NOTIFY_WAIT | EVT_NOTIFY_SIGNAL, 0xFFFFFFFF,
};

static EFI_TPL gtpl(void)
{
    static const EFI_TPL t[] = {TPL_APPLICATION, TPL_CALLBACK, TPL_NOTIFY, TPL_HIGH_LEVEL, 0, 5, 32};
    return below(5) ? t[below(7)] : rnd();
}

static UINT32 gmemtype(void)
{
    static const UINT32 t[] = {EfiLoaderData, EfiLoaderCode, EfiBootServicesData, EfiRuntimeServicesData,
                               EfiACPIReclaimMemory, EfiConventionalMemory, EfiMaxMemoryType, 0x80000001,
                               0x70000000, EfiReservedMemoryType, EfiPersistentMemory, EfiUnacceptedMemoryType};
    return below(6) ? t[below(12)] : (UINT32)rnd();
}

static void fuzz_one(UINTN which)
{
    EFI_STATUS st_ = 0;
    per_service[which]++;
    switch (which) {
    case S_TPL: {
        EFI_TPL old = gBS->RaiseTPL(gtpl());
        calls++;
        VCALL(gBS->RestoreTPL(old));
        break;
    }
    case S_RESTORETPL:
        VCALL(gBS->RestoreTPL(gtpl()));
        VCALL(gBS->RestoreTPL(TPL_APPLICATION));
        break;
    case S_ALLOCPAGES: {
        EFI_PHYSICAL_ADDRESS a = below(2) ? unalloc_base + below(unalloc_pages) * 4096 : rnd();
        UINTN pages = below(3) ? 1 + below(16) : (below(2) ? (1ULL << (28 + below(30))) : rnd() | (1ULL << 28));
        int local = below(4) != 0;
        EFI_PHYSICAL_ADDRESS *mp = local ? &a : (EFI_PHYSICAL_ADDRESS *)gptr();
        UINT32 type = below(6) ? (UINT32)below(3) : (UINT32)rnd();
        CALL(gBS->AllocatePages(type, gmemtype(), pages, mp));
        if (st_ == EFI_SUCCESS && local) {
            if (nPG < 64) {
                PGa[nPG] = a;
                PGn[nPG++] = pages;
            } else {
                CALL(gBS->FreePages(a, pages));
            }
        }
        break;
    }
    case S_FREEPAGES: {
        if (nPG && below(2)) {
            UINTN i = below(nPG);
            UINTN pages = below(4) ? PGn[i] : PGn[i] + 1 + below(4);
            CALL(gBS->FreePages(PGa[i], pages));
            if (st_ == EFI_SUCCESS) {
                PGa[i] = PGa[--nPG];
                PGn[i] = PGn[nPG];
            }
        } else {
            EFI_PHYSICAL_ADDRESS a = below(2) ? (EFI_PHYSICAL_ADDRESS)gptr() : unalloc_base + below(unalloc_pages) * 4096;
            if (in_arena((void *)a) || (a >= (UINT64)gLI->ImageBase && a < (UINT64)gLI->ImageBase + gLI->ImageSize))
                a = 0x1001;
            CALL(gBS->FreePages(a, below(2) ? 1 + below(8) : rnd()));
        }
        break;
    }
    case S_MEMMAP:
        CALL(gBS->GetMemoryMap(gsizep(), (EFI_MEMORY_DESCRIPTOR *)gptr(), (UINTN *)gptr(), (UINTN *)gptr(),
                               (UINT32 *)gptr()));
        break;
    case S_ALLOCPOOL: {
        VOID *p = NULL;
        int local = below(3) != 0;
        UINTN size = below(3) ? below(BUF_MAX) : (below(2) ? (1ULL << (40 + below(24))) : ~0ULL - below(64));
        CALL(gBS->AllocatePool(gmemtype(), size, local ? &p : (VOID **)gptr()));
        if (st_ == EFI_SUCCESS && local)
            keep_pool(p);
        break;
    }
    case S_FREEPOOL:
        if (nP && below(2)) {
            UINTN i = below(nP);
            CALL(gBS->FreePool(P[i]));
            P[i] = P[--nP];
        } else {
            void *p = gptr();
            if (in_arena(p))
                p = (UINT8 *)p + 1 + below(4000);   /* never the arena itself */
            CALL(gBS->FreePool(below(8) ? p : (void *)gST));
        }
        break;
    case S_CREATEEVENT: case S_CREATEEVENTEX: {
        EFI_EVENT ev = NULL;
        int local = below(4) != 0;
        UINT32 type = EVT_TYPES[below(sizeof(EVT_TYPES) / sizeof(EVT_TYPES[0]))];
        if (below(8) == 0)
            type = (UINT32)rnd();
        EFI_EVENT_NOTIFY fn = below(4) ? fz_notify : NULL;
        if (which == S_CREATEEVENT)
            CALL(gBS->CreateEvent(type, gtpl(), fn, gptr(), local ? &ev : (EFI_EVENT *)gptr()));
        else
            CALL(gBS->CreateEventEx(type, gtpl(), fn, gptr(), below(2) ? gguid() : NULL,
                                    local ? &ev : (EFI_EVENT *)gptr()));
        if (st_ == EFI_SUCCESS && local && ev) {
            if (nE < 64)
                E[nE++] = ev;
            else {
                UINTN i = below(64);
                CALL(gBS->CloseEvent(E[i]));
                E[i] = ev;
            }
        }
        break;
    }
    case S_SETTIMER: {
        UINT64 t = below(3) ? below(100000) : rnd();
        CALL(gBS->SetTimer(gevent(), below(5) ? (UINT32)below(3) : (UINT32)rnd(), t));
        break;
    }
    case S_WAITFOREVENT: {
        /* entry 0 is a signalled plain event or not an event at all: the wait cannot block */
        EFI_EVENT ready = NULL, *arr = (EFI_EVENT *)abuf();
        UINTN idx = 0;
        CALL(gBS->CreateEvent(0, TPL_APPLICATION, NULL, NULL, &ready));
        if (st_ == EFI_SUCCESS)
            CALL(gBS->SignalEvent(ready));
        arr[0] = below(4) ? ready : (EFI_EVENT)(below(2) ? (UINT64)A : rnd());
        for (UINTN i = 1; i < 8; i++)
            arr[i] = gevent();
        UINTN n = below(3) ? 1 + below(8) : (below(2) ? (1ULL << 31) : rnd());
        CALL(gBS->WaitForEvent(n, below(8) ? arr : (EFI_EVENT *)gptr(), below(4) ? &idx : (UINTN *)gptr()));
        if (ready)
            CALL(gBS->CloseEvent(ready));
        break;
    }
    case S_SIGNALEVENT:
        CALL(gBS->SignalEvent(gevent()));
        break;
    case S_CLOSEEVENT: {
        EFI_EVENT ev = gevent();
        CALL(gBS->CloseEvent(ev));
        if (st_ == EFI_SUCCESS)
            for (UINTN i = 0; i < nE; i++)
                if (E[i] == ev) {
                    E[i] = E[--nE];
                    break;
                }
        break;
    }
    case S_CHECKEVENT:
        CALL(gBS->CheckEvent(gevent()));
        break;
    case S_INSTALLPI: {
        EFI_HANDLE h = below(2) ? NULL : ghandle();
        CALL(gBS->InstallProtocolInterface(below(4) ? &h : (EFI_HANDLE *)gptr(), gguid(),
                                           below(4) ? EFI_NATIVE_INTERFACE : (UINT32)rnd(), gptr()));
        if (st_ == EFI_SUCCESS && h && nH < 64)
            H[nH++] = h;
        break;
    }
    case S_REINSTALLPI:
        CALL(gBS->ReinstallProtocolInterface(ghandle(), gguid(), gptr(), gptr()));
        break;
    case S_UNINSTALLPI:
        CALL(gBS->UninstallProtocolInterface(ghandle(), gguid(), gptr()));
        break;
    case S_HANDLEPROTOCOL:
        CALL(gBS->HandleProtocol(ghandle(), gguid(), (VOID **)gptr()));
        break;
    case S_REGNOTIFY:
        CALL(gBS->RegisterProtocolNotify(gguid(), gevent(), (VOID **)gptr()));
        break;
    case S_LOCATEHANDLE:
        CALL(gBS->LocateHandle(below(5) ? (UINT32)below(4) : (UINT32)rnd(), gguid(), gptr(), gsizep(),
                               (EFI_HANDLE *)gptr()));
        break;
    case S_LOCATEDP: {
        EFI_DEVICE_PATH_PROTOCOL **pp = (EFI_DEVICE_PATH_PROTOCOL **)abuf();
        *pp = gdp();
        CALL(gBS->LocateDevicePath(gguid(), below(5) ? pp : (EFI_DEVICE_PATH_PROTOCOL **)gptr(),
                                   (EFI_HANDLE *)gptr()));
        break;
    }
    case S_CONFIGTABLE:
        CALL(gBS->InstallConfigurationTable(below(3) ? (EFI_GUID *)abuf() : gguid(), gptr()));
        break;
    case S_LOADIMAGE: {
        EFI_HANDLE h = NULL;
        void *src;
        UINTN size;
        if (own_pe && below(2)) {
            UINT8 *m = A + MUTANT_AT;
            memcpy(m, own_pe, own_pe_size);
            for (UINTN k = below(9); k; k--) {
                UINTN at = below(4) ? below(1024) : below(own_pe_size);
                m[at] = below(3) ? (UINT8)rnd() : (below(2) ? 0xFF : 0);
            }
            src = m;
            size = below(4) ? own_pe_size : (below(2) ? below(own_pe_size) : gsize());
        } else {
            src = gbuf(&size);
        }
        CALL(gBS->LoadImage((BOOLEAN)below(2), below(6) ? gImage : ghandle(), below(3) ? NULL : gdp(),
                            below(8) ? src : NULL, size, below(8) ? &h : (EFI_HANDLE *)gptr()));
        if (st_ == EFI_SUCCESS && h) {   /* never started: unloaded again */
            CALL(gBS->UnloadImage(h));
            if (EFI_ERROR(st_) && nLIH < 16)
                LIH[nLIH++] = h;
        }
        break;
    }
    case S_STARTIMAGE: {
        UINTN sz = 0;
        CHAR16 *data = NULL;
        EFI_HANDLE h = ghandle();
        CALL(gBS->StartImage(h, below(2) ? &sz : (UINTN *)gptr(), below(2) ? &data : (CHAR16 **)gptr()));
        break;
    }
    case S_UNLOADIMAGE:
        CALL(gBS->UnloadImage(ghandle()));
        break;
    case S_MONOTONIC:
        CALL(gBS->GetNextMonotonicCount((UINT64 *)gptr()));
        break;
    case S_STALL:
        CALL(gBS->Stall(below(100)));
        break;
    case S_WATCHDOG: {
        UINTN size;
        void *data = gbuf(&size);
        CALL(gBS->SetWatchdogTimer(0, rnd(), size, data));
        break;
    }
    case S_CONNECT:
        CALL(gBS->ConnectController(ghandle(), below(2) ? NULL : (EFI_HANDLE *)gptr(), gdp(), (BOOLEAN)rnd()));
        break;
    case S_DISCONNECT:
        CALL(gBS->DisconnectController(ghandle(), ghandle(), ghandle()));
        break;
    case S_OPENPROTOCOL:
        CALL(gBS->OpenProtocol(ghandle(), gguid(), (VOID **)gptr(), ghandle(), ghandle(),
                               below(3) ? (UINT32)(1u << below(6)) : (UINT32)rnd()));
        break;
    case S_CLOSEPROTOCOL:
        CALL(gBS->CloseProtocol(ghandle(), gguid(), ghandle(), ghandle()));
        break;
    case S_OPENINFO: {
        EFI_OPEN_PROTOCOL_INFORMATION_ENTRY *buf = NULL;
        UINTN n = 0;
        int local = below(3) != 0;
        CALL(gBS->OpenProtocolInformation(ghandle(), gguid(),
                                          local ? &buf : (EFI_OPEN_PROTOCOL_INFORMATION_ENTRY **)gptr(),
                                          below(3) ? &n : (UINTN *)gptr()));
        if (st_ == EFI_SUCCESS && local && buf)
            CALL(gBS->FreePool(buf));
        break;
    }
    case S_PROTOCOLSPERHANDLE: {
        EFI_GUID **buf = NULL;
        UINTN n = 0;
        int local = below(3) != 0;
        CALL(gBS->ProtocolsPerHandle(ghandle(), local ? &buf : (EFI_GUID ***)gptr(), below(3) ? &n : (UINTN *)gptr()));
        if (st_ == EFI_SUCCESS && local && buf)
            CALL(gBS->FreePool(buf));
        break;
    }
    case S_LOCATEHANDLEBUFFER: {
        EFI_HANDLE *buf = NULL;
        UINTN n = 0;
        int local = below(3) != 0;
        CALL(gBS->LocateHandleBuffer(below(5) ? (UINT32)below(4) : (UINT32)rnd(), gguid(), gptr(),
                                     below(3) ? &n : (UINTN *)gptr(), local ? &buf : (EFI_HANDLE **)gptr()));
        if (st_ == EFI_SUCCESS && local && buf)
            CALL(gBS->FreePool(buf));
        break;
    }
    case S_LOCATEPROTOCOL:
        CALL(gBS->LocateProtocol(gguid(), gptr(), (VOID **)gptr()));
        break;
    case S_INSTALLMULTI: case S_UNINSTALLMULTI: {
        EFI_HANDLE h = below(2) ? NULL : ghandle();
        void *a[6];
        for (int i = 0; i < 6; i++)
            a[i] = (i % 2 == 0) ? (void *)gguid() : gptr();
        UINTN nulls = below(6);
        for (UINTN i = 0; i < 6; i++)
            if (i >= nulls && below(3) == 0)
                a[i] = NULL;
        if (which == S_INSTALLMULTI) {
            CALL(gBS->InstallMultipleProtocolInterfaces(below(4) ? &h : (EFI_HANDLE *)gptr(), a[0], a[1], a[2], a[3],
                                                        a[4], a[5], NULL));
            if (st_ == EFI_SUCCESS && h && nH < 64)
                H[nH++] = h;
        } else {
            CALL(gBS->UninstallMultipleProtocolInterfaces(ghandle(), a[0], a[1], a[2], a[3], a[4], a[5], NULL));
        }
        break;
    }
    case S_CRC: {
        UINTN size;
        void *p = gbuf(&size);
        CALL(gBS->CalculateCrc32(p, size, below(4) ? (UINT32 *)abuf() : (UINT32 *)gptr()));
        break;
    }
    case S_COPYMEM: {   /* only inside the arena: a bad CopyMem could legitimately fault */
        UINTN len = below(BUF_MAX);
        VCALL(gBS->CopyMem(abuf(), abuf(), len));
        break;
    }
    case S_SETMEM:
        VCALL(gBS->SetMem(abuf(), below(BUF_MAX), (UINT8)rnd()));
        break;
    /* ---- runtime services ---- */
    case S_GETTIME:
        CALL(gRT->GetTime((EFI_TIME *)gptr(), (EFI_TIME_CAPABILITIES *)gptr()));
        break;
    case S_SETTIME:
        CALL(gRT->SetTime((EFI_TIME *)gptr()));
        break;
    case S_GETWAKEUP:
        CALL(gRT->GetWakeupTime((BOOLEAN *)gptr(), (BOOLEAN *)gptr(), (EFI_TIME *)gptr()));
        break;
    case S_SETWAKEUP:
        CALL(gRT->SetWakeupTime((BOOLEAN)rnd(), (EFI_TIME *)gptr()));
        break;
    case S_GETVAR: {
        UINT32 attr = 0;
        CALL(gRT->GetVariable(gtext(), gguid(), below(2) ? &attr : (UINT32 *)gptr(), gsizep(), gptr()));
        break;
    }
    case S_NEXTVAR: {
        CHAR16 *name = (CHAR16 *)abuf();
        if (below(2))
            name[0] = 0;
        CALL(gRT->GetNextVariableName(gsizep(), below(4) ? name : (CHAR16 *)gptr(),
                                      below(4) ? (EFI_GUID *)abuf() : gguid()));
        break;
    }
    case S_SETVAR: {
        UINTN size;
        void *data = gbuf(&size);
        if (size > BUF_MAX && below(2))
            size = below(BUF_MAX);
        static const UINT32 at[] = {7, 6, 3, 2, 0x47, 0x27, 0x17, 4, 1, 0};
        CALL(gRT->SetVariable(gtext(), gguid(), below(6) ? at[below(10)] : (UINT32)rnd(), size, data));
        break;
    }
    case S_HIGHMONO:
        CALL(gRT->GetNextHighMonotonicCount((UINT32 *)gptr()));
        break;
    case S_CAPSULE:
        CALL(gRT->UpdateCapsule((EFI_CAPSULE_HEADER **)gptr(), gsize(), (EFI_PHYSICAL_ADDRESS)gptr()));
        break;
    case S_QUERYCAPSULE:
        CALL(gRT->QueryCapsuleCapabilities((EFI_CAPSULE_HEADER **)gptr(), gsize(), (UINT64 *)gptr(),
                                           (EFI_RESET_TYPE *)gptr()));
        break;
    case S_QUERYVAR:
        CALL(gRT->QueryVariableInfo((UINT32)(below(2) ? below(8) : rnd()), (UINT64 *)gptr(), (UINT64 *)gptr(),
                                    (UINT64 *)gptr()));
        break;
    /* ---- protocols ---- */
    case S_CONOUT: {
        EFI_SIMPLE_TEXT_OUTPUT_PROTOCOL *o = below(2) ? gST->ConOut : gST->StdErr;
        EFI_SIMPLE_TEXT_OUTPUT_PROTOCOL *th = below(6) ? o : (EFI_SIMPLE_TEXT_OUTPUT_PROTOCOL *)gptr();
        switch (below(9)) {
        case 0: CALL(o->Reset(th, (BOOLEAN)rnd())); break;
        case 1: CALL(o->OutputString(th, gtext())); break;
        case 2: CALL(o->TestString(th, gtext())); break;
        case 3: CALL(o->QueryMode(th, below(2) ? below(3) : rnd(), (UINTN *)gptr(), (UINTN *)gptr())); break;
        case 4: CALL(o->SetMode(th, below(2) ? 0 : rnd())); break;
        case 5: CALL(o->SetAttribute(th, below(2) ? below(0x80) : rnd())); break;
        case 6: CALL(o->ClearScreen(th)); break;
        case 7: CALL(o->SetCursorPosition(th, below(2) ? below(100) : rnd(), below(2) ? below(30) : rnd())); break;
        default: CALL(o->EnableCursor(th, (BOOLEAN)rnd())); break;
        }
        break;
    }
    case S_CONIN: {
        EFI_SIMPLE_TEXT_INPUT_PROTOCOL *i = gST->ConIn;
        EFI_SIMPLE_TEXT_INPUT_PROTOCOL *th = below(6) ? i : (EFI_SIMPLE_TEXT_INPUT_PROTOCOL *)gptr();
        if (below(2))
            CALL(i->Reset(th, (BOOLEAN)rnd()));
        else
            CALL(i->ReadKeyStroke(th, (EFI_INPUT_KEY *)gptr()));
        break;
    }
    case S_DPTT: {
        if (!dptt)
            break;
        CHAR16 *t = below(2) ? dptt->ConvertDeviceNodeToText(gdp(), (BOOLEAN)rnd(), (BOOLEAN)rnd())
                             : dptt->ConvertDevicePathToText(gdp(), (BOOLEAN)rnd(), (BOOLEAN)rnd());
        count(t ? EFI_SUCCESS : EFI_INVALID_PARAMETER);
        if (t)
            CALL(gBS->FreePool(t));
        break;
    }
    case S_DPFT: {
        if (!dpft)
            break;
        EFI_DEVICE_PATH_PROTOCOL *d = below(2) ? dpft->ConvertTextToDeviceNode(gtext())
                                               : dpft->ConvertTextToDevicePath(gtext());
        count(d ? EFI_SUCCESS : EFI_INVALID_PARAMETER);
        if (d)
            CALL(gBS->FreePool(d));
        break;
    }
    case S_RNG: {
        if (!rng)
            break;
        EFI_RNG_PROTOCOL *th = below(6) ? rng : (EFI_RNG_PROTOCOL *)gptr();
        if (below(3) == 0) {
            CALL(rng->GetInfo(th, gsizep(), (EFI_RNG_ALGORITHM *)gptr()));
        } else {
            UINTN size;
            void *p = gbuf(&size);
            CALL(rng->GetRNG(th, below(2) ? NULL : gguid(), size, p));
        }
        break;
    }
    case S_TCG2: {
        if (!tcg2)
            break;
        EFI_TCG2_PROTOCOL *th = below(6) ? tcg2 : (EFI_TCG2_PROTOCOL *)gptr();
        switch (below(7)) {
        case 0: {
            EFI_TCG2_BOOT_SERVICE_CAPABILITY *c = (EFI_TCG2_BOOT_SERVICE_CAPABILITY *)abuf();
            c->Size = (UINT8)(below(2) ? sizeof(*c) : rnd());
            CALL(tcg2->GetCapability(th, below(4) ? c : (EFI_TCG2_BOOT_SERVICE_CAPABILITY *)gptr()));
            break;
        }
        case 1:
            CALL(tcg2->GetEventLog(th, (UINT32)(below(2) ? 1 + below(2) : rnd()), (EFI_PHYSICAL_ADDRESS *)gptr(),
                                   (EFI_PHYSICAL_ADDRESS *)gptr(), (BOOLEAN *)gptr()));
            break;
        case 2: {
            UINTN size;
            void *data = gbuf(&size);
            EFI_TCG2_EVENT *ev = (EFI_TCG2_EVENT *)abuf();
            if (below(3)) {
                UINT32 n = (UINT32)below(64);
                ev->Size = (UINT32)(below(4) ? sizeof(EFI_TCG2_EVENT) + n : rnd());
                ev->Header.HeaderSize = (UINT32)(below(4) ? sizeof(EFI_TCG2_EVENT_HEADER) : rnd());
                ev->Header.HeaderVersion = (UINT16)(below(4) ? 1 : rnd());
                ev->Header.PCRIndex = (UINT32)(below(4) ? 8 + below(8) : rnd());
                ev->Header.EventType = (UINT32)(below(2) ? 13 : rnd());
            }
            CALL(tcg2->HashLogExtendEvent(th, below(2) ? 0 : rnd(), (EFI_PHYSICAL_ADDRESS)data, size,
                                          below(6) ? ev : (EFI_TCG2_EVENT *)gptr()));
            break;
        }
        case 3: {
            UINTN in_size, out_size;
            void *in = gbuf(&in_size), *out = gbuf(&out_size);
            UINT8 *cmd = (UINT8 *)in;
            if (in_arena(cmd) && below(2) && in_size >= 10) {   /* a TPM2 header with a random code */
                cmd[0] = 0x80; cmd[1] = 0x01;
                cmd[2] = 0; cmd[3] = 0; cmd[4] = (UINT8)(in_size >> 8); cmd[5] = (UINT8)in_size;
                cmd[6] = 0; cmd[7] = 0; cmd[8] = 1; cmd[9] = (UINT8)(0x20 + below(0x80));
            }
            CALL(tcg2->SubmitCommand(th, (UINT32)in_size, in, (UINT32)out_size, out));
            break;
        }
        case 4: CALL(tcg2->GetActivePcrBanks(th, (UINT32 *)gptr())); break;
        case 5: CALL(tcg2->SetActivePcrBanks(th, (UINT32)rnd())); break;
        default: CALL(tcg2->GetResultOfSetActivePcrBanks(th, (UINT32 *)gptr(), (UINT32 *)gptr())); break;
        }
        break;
    }
    case S_SFS: {
        if (!sfs)
            break;
        EFI_FILE_PROTOCOL *root = NULL;
        int local = below(4) != 0;
        CALL(sfs->OpenVolume(below(6) ? sfs : (EFI_SIMPLE_FILE_SYSTEM_PROTOCOL *)gptr(),
                             local ? &root : (EFI_FILE_PROTOCOL **)gptr()));
        if (st_ == EFI_SUCCESS && local)
            keep_file(root);
        break;
    }
    case S_FILE: {
        if (!have_ft)
            break;
        EFI_FILE_PROTOCOL *f = gfile();
        switch (below(14)) {
        case 0: case 1: {
            EFI_FILE_PROTOCOL *nf = NULL;
            static const UINT64 modes[] = {1, 3, 0x8000000000000003ULL, 2, 0, 0x8000000000000001ULL};
            int local = below(4) != 0;
            CALL(FT.Open(f, local ? &nf : (EFI_FILE_PROTOCOL **)gptr(), gtext(),
                         below(5) ? modes[below(6)] : rnd(), below(2) ? 0 : rnd()));
            if (st_ == EFI_SUCCESS && local)
                keep_file(nf);
            break;
        }
        case 2:
            CALL(FT.Close(f));
            if (st_ == EFI_SUCCESS)
                drop_file(f);
            break;
        case 3:
            CALL(FT.Delete(f));
            drop_file(f);   /* Delete closes the handle whatever it answers */
            break;
        case 4: case 5: CALL(FT.Read(f, gsizep(), gptr())); break;
        case 6: {
            UINTN *sz = (UINTN *)abuf();
            *sz = below(BUF_MAX);
            CALL(FT.Write(f, below(3) ? sz : gsizep(), gptr()));
            break;
        }
        case 7: CALL(FT.GetPosition(f, (UINT64 *)gptr())); break;
        case 8: CALL(FT.SetPosition(f, below(2) ? below(100000) : rnd())); break;
        case 9: CALL(FT.GetInfo(f, below(4) ? &KG[12 + below(3)] : gguid(), gsizep(), gptr())); break;
        case 10: {
            UINTN size;
            void *b = gbuf(&size);
            CALL(FT.SetInfo(f, below(4) ? &KG[12 + below(3)] : gguid(), size, b));
            break;
        }
        case 11: CALL(FT.Flush(f)); break;
        case 12: CALL(FT.ReadEx(f, (EFI_FILE_IO_TOKEN *)gptr())); break;
        default: CALL(FT.FlushEx(f, (EFI_FILE_IO_TOKEN *)gptr())); break;
        }
        break;
    }
    case S_LF2: {
        if (!lf2)
            break;
        EFI_LOAD_FILE2_PROTOCOL *th = below(6) ? lf2 : (EFI_LOAD_FILE2_PROTOCOL *)gptr();
        UINTN *sz = (UINTN *)abuf();
        *sz = below(3) ? below(BUF_MAX) : rnd();
        CALL(lf2->LoadFile(th, below(3) ? initrd_dp : gdp(), (BOOLEAN)rnd(), below(4) ? sz : gsizep(), gptr()));
        break;
    }
    default:
        break;
    }
}

/* ---- setup and cleanup ---------------------------------------------------------------------- */
static void setup(void)
{
    EFI_PHYSICAL_ADDRESS a = 0;
    if (gBS->AllocatePages(AllocateAnyPages, EfiLoaderData, ARENA_SIZE / 4096, &a) == EFI_SUCCESS)
        A = (UINT8 *)a;
    gBS->HandleProtocol(gImage, &li_guid, (VOID **)&gLI);
    if (gLI)
        gBS->HandleProtocol(gLI->DeviceHandle, &dp_guid, (VOID **)&dev_dp);
    if (gLI)
        gBS->HandleProtocol(gLI->DeviceHandle, &sfs_guid, (VOID **)&sfs);
    gBS->LocateProtocol(&rng_guid, NULL, (VOID **)&rng);
    gBS->LocateProtocol(&tcg2_guid, NULL, (VOID **)&tcg2);
    gBS->LocateProtocol(&dptt_guid, NULL, (VOID **)&dptt);
    gBS->LocateProtocol(&dpft_guid, NULL, (VOID **)&dpft);
    /* the initrd's LoadFile2, when vmrun was given --initrd */
    static struct {
        VENDOR_DEVICE_PATH v;
        EFI_DEVICE_PATH_PROTOCOL end;
    } __attribute__((packed)) initrd_path = {
        {{MEDIA_DEVICE_PATH, 3, {sizeof(VENDOR_DEVICE_PATH), 0}}, LINUX_EFI_INITRD_MEDIA_GUID},
        {END_DEVICE_PATH_TYPE, END_ENTIRE_DEVICE_PATH_SUBTYPE, {4, 0}},
    };
    initrd_dp = (EFI_DEVICE_PATH_PROTOCOL *)&initrd_path;
    EFI_DEVICE_PATH_PROTOCOL *rem = initrd_dp;
    EFI_HANDLE ih = NULL;
    if (gBS->LocateDevicePath(&lf2_guid, &rem, &ih) == EFI_SUCCESS)
        gBS->HandleProtocol(ih, &lf2_guid, (VOID **)&lf2);
    /* real handles */
    EFI_HANDLE *all = NULL;
    UINTN n = 0;
    if (gBS->LocateHandleBuffer(AllHandles, NULL, NULL, &n, &all) == EFI_SUCCESS) {
        for (UINTN i = 0; i < n && nH < 48; i++)
            H[nH++] = all[i];
        gBS->FreePool(all);
    }
    /* a range of RAM nobody allocated: the middle of the largest conventional range */
    UINTN size = 0, key = 0, dsize = 0;
    UINT32 ver = 0;
    EFI_MEMORY_DESCRIPTOR *map = NULL;
    gBS->GetMemoryMap(&size, NULL, &key, &dsize, &ver);
    size += 16 * dsize;
    if (gBS->AllocatePool(EfiLoaderData, size, (VOID **)&map) == EFI_SUCCESS &&
        gBS->GetMemoryMap(&size, map, &key, &dsize, &ver) == EFI_SUCCESS) {
        for (UINTN i = 0; i < size / dsize; i++) {
            EFI_MEMORY_DESCRIPTOR *d = (EFI_MEMORY_DESCRIPTOR *)((UINT8 *)map + i * dsize);
            if (d->Type == EfiConventionalMemory && d->NumberOfPages / 2 > unalloc_pages) {
                unalloc_pages = d->NumberOfPages / 2 - 32;
                unalloc_base = d->PhysicalStart + (d->NumberOfPages / 4) * 4096;
            }
        }
        gBS->FreePool(map);
    }
    if (unalloc_pages > 65536)
        unalloc_pages = 65536;
    /* firmware memory: IDT, GDT, PML4, a service thunk */
    struct { UINT16 limit; UINT64 base; } __attribute__((packed)) d;
    __asm__ volatile("sidt %0" : "=m"(d));
    fw_ptrs[n_fw++] = d.base;
    __asm__ volatile("sgdt %0" : "=m"(d));
    fw_ptrs[n_fw++] = d.base;
    UINT64 cr3;
    __asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
    fw_ptrs[n_fw++] = cr3 & ~0xFFFULL;
    fw_ptrs[n_fw++] = (UINT64)gBS->AllocatePool;
    UINTN pe_size = 0;
    own_pe = gLI ? pe_file_of_image((UINT8 *)gLI->ImageBase, MUTANT_AT / 2, &pe_size) : NULL;
    own_pe_size = pe_size;
}

static void cleanup(void)
{
    while (nP) {
        gBS->FreePool(P[--nP]);
        calls++;
    }
    while (nPG) {
        nPG--;
        gBS->FreePages(PGa[nPG], PGn[nPG]);
        calls++;
    }
    while (nLIH) {
        gBS->UnloadImage(LIH[--nLIH]);
        calls++;
    }
    while (nE > 16) {
        gBS->CloseEvent(E[--nE]);
        calls++;
    }
    gBS->RestoreTPL(TPL_APPLICATION);
    calls++;
}

static UINT64 option_number(const CHAR16 *opt, UINTN n, const char *key, UINT64 dflt)
{
    for (UINTN i = 0; i < n; i++) {
        UINTN k = 0;
        while (key[k] && i + k < n && opt[i + k] == (CHAR16)key[k])
            k++;
        if (key[k] == 0 && (i == 0 || opt[i - 1] == ' ')) {
            UINT64 v = 0;
            int digits = 0;
            for (UINTN j = i + k; j < n && opt[j] >= '0' && opt[j] <= '9'; j++, digits++)
                v = v * 10 + (UINT64)(opt[j] - '0');
            return digits ? v : dflt;
        }
    }
    return dflt;
}

static EFI_STATUS exit_boot_services(void)
{
    UINTN size = 0, key = 0, dsize = 0, bufsize;
    UINT32 ver = 0;
    EFI_MEMORY_DESCRIPTOR *map = NULL;
    EFI_STATUS s = gBS->GetMemoryMap(&size, NULL, &key, &dsize, &ver);
    bufsize = size + 64 * (dsize ? dsize : 48);
    if (gBS->AllocatePool(EfiLoaderData, bufsize, (VOID **)&map) != EFI_SUCCESS)
        return EFI_OUT_OF_RESOURCES;
    for (int tries = 0; tries < 3; tries++) {
        size = bufsize;
        s = gBS->GetMemoryMap(&size, map, &key, &dsize, &ver);
        if (s == EFI_SUCCESS)
            s = gBS->ExitBootServices(gImage, key);
        if (s == EFI_SUCCESS)
            for (;;)
                __asm__ volatile("hlt");
    }
    say("FAIL ebs: ExitBootServices gave %r\n", s);
    return s;
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
    UINT64 seed = option_number(opt, n, "seed=", 1);
    UINT64 target = option_number(opt, n, "calls=", 100000);
    UINT64 use_fw = option_number(opt, n, "fwptrs=", 1);
    rs = seed * 0x9E3779B97F4A7C15ULL + 0x1234567;
    if (!rs)
        rs = 1;
    setup();
    if (!use_fw)
        n_fw = 0;
    if (!A || !gLI) {
        say("FAIL fuzz-setup: no arena or no LoadedImage\n");
        return EFI_ABORTED;
    }
    say("fuzz: seed %u calls %u rng %x tcg2 %x sfs %x lf2 %x dptt %x dpft %x handles %u unalloc %x\n", seed, target,
        (UINT64)rng, (UINT64)tcg2, (UINT64)sfs, (UINT64)lf2, (UINT64)dptt, (UINT64)dpft, (UINT64)nH, unalloc_base);
    UINT64 next_report = 10000, rounds = 0;
    while (calls < target) {
        if (rounds % 512 == 0)
            randomize_arena();
        if (rounds % 2048 == 2047)
            cleanup();
        UINTN which = below(S_COUNT);
        fuzz_one(which);
        rounds++;
        if (calls >= next_report) {
            say("fuzz: %u calls, %u success, %u errors\n", calls, successes, errors);
            next_report += 10000;
        }
    }
    cleanup();
    say("fuzz: per function:");
    for (UINTN i = 0; i < S_COUNT; i++)
        say(" %u", per_service[i]);
    say("\n");
    say("DONE fuzz seed %u calls %u success %u errors %u notifies %u\n", seed, calls, successes, errors,
        (UINT64)notifies);
    return exit_boot_services();
}
