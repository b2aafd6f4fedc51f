/*
 * hostile_cpu: privileged and special instructions with values real hardware refuses (payload
 * actions once reported as vmrun's own failures), and int3, single-step and AVX.
 * The first word of LoadOptions picks one; the app prints "about to <what>" first. If the
 * instruction completes, it prints "survived <what>" and calls ExitBootServices.
 *
 *   cr4-bit63     mov %cr4 with bit 63 (reserved) set          real CPU: #GP
 *   cr0-bit28     mov %cr0 with bit 28 (reserved) set          real CPU: ignored (SDM Vol. 3
 *                                                              §2.5); prints CR0 read back
 *   cr0-bit63     mov %cr0 with bit 63 (reserved) set          real CPU: #GP
 *   cr3-other     mov %cr3 of a zeroed page (no mappings)      real CPU: #PF on the next fetch,
 *                                                              then a triple fault
 *   fsbase        wrmsr IA32_FS_BASE 0x8000000000000000 (non-canonical)   real CPU: #GP
 *   efer          wrmsr IA32_EFER with bit 63 (reserved) set   real CPU: #GP
 *   int3          int3; prints "int3 at <address>" first
 *   single-step   pushf/popf with TF set, then two nops; prints their addresses first
 *   avx           vpxor %ymm0,%ymm0,%ymm0; prints CPUID.1:ECX AVX/OSXSAVE first
 *   xgetbv        xgetbv (ECX=0); prints CPUID.1:ECX OSXSAVE first
 */

#include "hostile.h"

extern char int3_at[], ss_popf[], ss_nop1[], ss_nop2[];

static void cpuid1(UINT32 *ecx)
{
    UINT32 a = 1, b, c = 0, d;
    __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
    *ecx = c;
}

static void __attribute__((noinline)) do_int3(void)
{
    say("int3 at %x\n", (UINT64)int3_at);
    __asm__ volatile(".globl int3_at\nint3_at: int3" ::: "memory");
}

static void __attribute__((noinline)) do_single_step(void)
{
    say("single-step popf at %x nop1 at %x nop2 at %x\n", (UINT64)ss_popf, (UINT64)ss_nop1, (UINT64)ss_nop2);
    __asm__ volatile("pushfq\n\torq $0x100, (%%rsp)\n\t"
                     ".globl ss_popf\nss_popf: popfq\n\t"
                     ".globl ss_nop1\nss_nop1: nop\n\t"
                     ".globl ss_nop2\nss_nop2: nop\n\t"
                     "pushfq\n\tandq $~0x100, (%%rsp)\n\tpopfq" ::: "memory", "cc");
}

EFI_STATUS EFIAPI efi_main(EFI_HANDLE image, EFI_SYSTEM_TABLE *st)
{
    lib_init(image, st);
    read_mode();
    say("hostile_cpu: mode %s\n", gMode);
    say("about to %s\n", gMode);
    if (mode_is("cr4-bit63")) {
        UINT64 v;
        __asm__ volatile("mov %%cr4, %0" : "=r"(v));
        v |= 1ULL << 63;
        __asm__ volatile("mov %0, %%cr4" :: "r"(v) : "memory");
    } else if (mode_is("cr0-bit28") || mode_is("cr0-bit63")) {
        UINT64 v;
        __asm__ volatile("mov %%cr0, %0" : "=r"(v));
        v |= 1ULL << (mode_is("cr0-bit28") ? 28 : 63);
        __asm__ volatile("mov %0, %%cr0" :: "r"(v) : "memory");
        __asm__ volatile("mov %%cr0, %0" : "=r"(v));
        say("cr0 read back %x\n", v);
    } else if (mode_is("cr3-other")) {
        EFI_PHYSICAL_ADDRESS a = 0;
        if (gBS->AllocatePages(AllocateAnyPages, EfiLoaderData, 1, &a) != EFI_SUCCESS) {
            say("FAIL cr3-other: AllocatePages\n");
            return EFI_ABORTED;
        }
        memset((void *)a, 0, 4096);
        say("cr3-other: new cr3 %x\n", (UINT64)a);
        __asm__ volatile("mov %0, %%cr3" :: "r"(a) : "memory");
    } else if (mode_is("fsbase")) {
        __asm__ volatile("wrmsr" :: "c"(0xC0000100), "a"(0), "d"(0x80000000) : "memory");
    } else if (mode_is("efer")) {
        UINT32 lo, hi;
        __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(0xC0000080));
        say("efer %x\n", ((UINT64)hi << 32) | lo);
        hi |= 0x80000000u;
        __asm__ volatile("wrmsr" :: "c"(0xC0000080), "a"(lo), "d"(hi) : "memory");
    } else if (mode_is("int3")) {
        do_int3();
    } else if (mode_is("single-step")) {
        do_single_step();
    } else if (mode_is("avx")) {
        UINT32 ecx;
        cpuid1(&ecx);
        say("cpuid avx %u osxsave %u\n", (UINT64)((ecx >> 28) & 1), (UINT64)((ecx >> 27) & 1));
        __asm__ volatile("vpxor %%ymm0, %%ymm0, %%ymm0" ::: "memory");
    } else if (mode_is("xgetbv")) {
        UINT32 ecx, lo, hi;
        cpuid1(&ecx);
        say("cpuid avx %u osxsave %u\n", (UINT64)((ecx >> 28) & 1), (UINT64)((ecx >> 27) & 1));
        __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        say("xcr0 %x\n", ((UINT64)hi << 32) | lo);
    } else {
        say("FAIL unknown mode\n");
        return EFI_INVALID_PARAMETER;
    }
    say("survived %s\n", gMode);
    return exit_boot_services();
}
