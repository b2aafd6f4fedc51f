/*
 * emulated: privileged instructions a boot loader / EFI stub may execute.  Under vmrun the
 * app runs at CPL 3, these trap, and vmrun emulates them; under real firmware (OVMF, CPL 0)
 * they execute natively.  The results must be the same in both cases.
 *
 *   mov %cr0      PE (bit 0) and PG (bit 31) set: long mode requires both
 *   mov %cr4      PAE (bit 5) set: long mode requires it
 *   mov %cr3      read, write the same value back (TLB flush), read again: unchanged
 *   cli / sti     executed in sequence (IF is not inspected in between: at CPL 3 PUSHF
 *                 shows the real IF, not the emulated one)
 *   pushf / popf  CF survives a PUSHF / CLC / POPF round trip; IF is set at TPL_APPLICATION
 *   rdmsr 0xC0000080 (IA32_EFER): LME (bit 8) and LMA (bit 10) set
 *   rdmsr 0x1B    (IA32_APIC_BASE): BSP (bit 8) and global enable (bit 11) set, base
 *                 0xFEE00000 (the architectural default, which OVMF keeps)
 *   wbinvd, invlpg (of a page of our own stack)
 *   port I/O      CMOS: out 0x70 / in 0x71 of registers 0x0A (status A, wait for no update
 *                 in progress), 0x0B (status B: BCD or binary) and 0x00 (seconds: valid);
 *                 COM1: in 0x3FD (line status, wait for THR empty), out 0x3F8 of a line
 *                 "emulated: com1 hello" -- it appears on the serial console, not ConOut.
 */
#include "lib.h"

static inline UINT64 rdmsr(UINT32 msr)
{
    UINT32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((UINT64)hi << 32) | lo;
}

static inline void outb(UINT16 port, UINT8 v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port) : "memory");
}

static inline UINT8 inb(UINT16 port)
{
    UINT8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port) : "memory");
    return v;
}

static UINT8 cmos_read(UINT8 reg)
{
    outb(0x70, reg);
    return inb(0x71);
}

static void test_control_registers(void)
{
    UINT64 cr0, cr4, cr3a, cr3b;
    __asm__ volatile("mov %%cr0, %0" : "=r"(cr0));
    say("cr0 %x\n", cr0);
    CHECK("cr0-pe-pg", (cr0 & 1) && (cr0 & (1ULL << 31)));
    __asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
    say("cr4 %x\n", cr4);
    CHECK("cr4-pae", (cr4 & (1ULL << 5)) != 0);
    __asm__ volatile("mov %%cr3, %0" : "=r"(cr3a));
    __asm__ volatile("mov %0, %%cr3" : : "r"(cr3a) : "memory");
    __asm__ volatile("mov %%cr3, %0" : "=r"(cr3b));
    CHECK("cr3-read", cr3a != 0);
    CHECK("cr3-write-same", cr3a == cr3b);
}

static void test_flags(void)
{
    UINT64 flags, before;
    UINT8 cf;
    __asm__ volatile("pushfq; popq %0" : "=r"(before));
    __asm__ volatile("cli; sti" ::: "memory");
    pass("cli-sti");
    __asm__ volatile("stc; pushfq; clc; popfq; setc %0" : "=r"(cf) : : "cc", "memory");
    CHECK("pushf-popf-cf", cf == 1);
    __asm__ volatile("pushfq; popq %0" : "=r"(flags));
    CHECK("pushf-if-set", (before & (1 << 9)) != 0 && (flags & (1 << 9)) != 0);
    CHECK("pushf-reserved-bit1", (flags & 2) != 0);
}

static void test_msrs(void)
{
    UINT64 efer = rdmsr(0xC0000080);
    say("efer %x\n", efer);
    CHECK("rdmsr-efer-lme-lma", (efer & (1 << 8)) && (efer & (1 << 10)));
    UINT64 apic = rdmsr(0x1B);
    say("apic base %x\n", apic);
    CHECK("rdmsr-apic-base-bsp-enabled", (apic & (1 << 8)) && (apic & (1 << 11)));
    CHECK_EQ("rdmsr-apic-base-address", apic & 0xFFFFFF000ULL, 0xFEE00000ULL);
}

static void test_cache_tlb(void)
{
    volatile UINT64 local = 42;
    __asm__ volatile("wbinvd" ::: "memory");
    pass("wbinvd");
    __asm__ volatile("invlpg (%0)" : : "r"(&local) : "memory");
    CHECK("invlpg", local == 42);
}

static void test_ports(void)
{
    int tries = 0;
    while ((cmos_read(0x0A) & 0x80) && tries < 100000)   /* update in progress */
        tries++;
    UINT8 b = cmos_read(0x0B);
    UINT8 sec = cmos_read(0x00);
    int bcd = !(b & 0x04);
    say("cmos status B %x seconds %x\n", (UINT64)b, (UINT64)sec);
    CHECK("port-cmos-update-settles", tries < 100000);
    if (bcd)
        CHECK("port-cmos-seconds", (sec & 0x0F) <= 9 && sec <= 0x59);
    else
        CHECK("port-cmos-seconds", sec <= 59);

    static const char msg[] = "emulated: com1 hello\r\n";
    int ok = 1;
    for (const char *p = msg; *p; p++) {
        int n = 0;
        while (!(inb(0x3FD) & 0x20) && n < 1000000)   /* LSR: transmitter holding register empty */
            n++;
        if (n >= 1000000)
            ok = 0;
        outb(0x3F8, (UINT8)*p);
    }
    CHECK("port-com1-write", ok);
}

EFI_STATUS EFIAPI efi_main(EFI_HANDLE image, EFI_SYSTEM_TABLE *st)
{
    UINT16 cs;
    lib_init(image, st);
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    say("emulated: privileged instructions, running at CPL %u\n", (UINT64)(cs & 3));
    test_control_registers();
    test_flags();
    test_msrs();
    test_cache_tlb();
    test_ports();
    return finish();
}
