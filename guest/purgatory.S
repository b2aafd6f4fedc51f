/*
 * vmrun purgatory: continue a payload frozen at ExitBootServices, on the real machine.
 *
 * Entered the way kexec enters an ELF image on x86_64: 64-bit mode, identity-mapped,
 * IF = 0, general registers zero, GDTR/IDTR not usable, CR4 = PAE, plus LA57 when the
 * previous kernel ran with 5-level paging (Linux's relocate_kernel keeps LA57: it cannot be
 * cleared in long mode). The code is position-independent; the host places it in a page of
 * the target's RAM below 4 GiB and writes the state block at STATE (offsets below, mirrored in
 * vmrun/handoff/state.py):
 *
 *   0x000 magic "VMRUNST1"      0x008 version (u32), size (u32)
 *   0x010 GDTR (limit u16, base u64)   0x020 IDTR (limit u16, base u64)
 *   0x030 CR0  0x038 CR3  0x040 CR4  0x048 EFER  0x050 RFLAGS  0x058 RSP
 *   0x060 FS base  0x068 GS base
 *   0x070 RAX RBX RCX RDX RSI RDI RBP R8 R9 R10 R11 R12 R13 R14 R15  (15 x u64)
 *   0x0e8 PAT (u64)
 *   0x100 FXSAVE image (512 bytes, x87 + MXCSR + XMM0-15)
 *   0x300 GDT: null, ring-0 code64 (0x08), ring-0 data (0x10), ring-0 code32 (0x18)
 *
 * Order of work:
 *  1. Load its own GDT and IDTR, reload CS and the data segments at CPL 0.
 *  2. Reduce CR4 to PAE (+ LA57 if set): whatever else the previous kernel left (SMEP, SMAP,
 *     PCIDE, CET, PKE, PGE, FSGSBASE …) is cleared before anything depends on it; DR7 = 0.
 *  3. 5-level entry (CR4.LA57 = 1). The frozen state is 4-level: the payload built or kept
 *     4-level page tables under vmrun. Running it under a PML5 that points at the frozen PML4
 *     would translate the same addresses, but the payload would then see a paging mode it did
 *     not choose (Linux's stub reads CR4.LA57 after ExitBootServices to decide whether to
 *     switch modes), so the purgatory switches to 4-level paging instead, as Linux's own
 *     trampoline does: far-return to a 32-bit code segment (compatibility mode), clear CR0.PG
 *     (long mode becomes inactive), clear CR4.LA57, load the frozen CR3 (the host checks it
 *     lies below 4 GiB), set EFER (LME, NXE as frozen), set CR0.PG (long mode active again)
 *     and far-return to the 64-bit code segment. Everything executed in between is in this
 *     identity-mapped page, which the frozen page tables map too (it is RAM the payload saw).
 *  4. Restore CR4, EFER, CR0 and CR3 as frozen, PAT as vmrun programmed it (the previous
 *     kernel reprograms PAT; the frozen page tables' cache types assume vmrun's value), the
 *     x87/SSE state (XMM6-15 are callee-saved in the MS x64 ABI), FS/GS bases, RFLAGS
 *     (IF clear), RSP and every general register — with RAX = EFI_SUCCESS — and execute
 *     `ret`: the return from the payload's ExitBootServices call.
 * MTRRs are left as the platform firmware set them (the previous kernel does not change them).
 */
        .set STATE,         0x400
        .set ST_GDTR,       0x010
        .set ST_IDTR,       0x020
        .set ST_CR0,        0x030
        .set ST_CR3,        0x038
        .set ST_CR4,        0x040
        .set ST_EFER,       0x048
        .set ST_RFLAGS,     0x050
        .set ST_RSP,        0x058
        .set ST_FS_BASE,    0x060
        .set ST_GS_BASE,    0x068
        .set ST_GPRS,       0x070
        .set ST_PAT,        0x0e8
        .set ST_FXSAVE,     0x100
        .set STACK_TOP,     0x2000
        .set SEL_CODE,      0x08
        .set SEL_DATA,      0x10
        .set SEL_CODE32,    0x18
        .set CR0_PG,        0x80000000
        .set CR4_PAE,       0x20
        .set CR4_LA57,      0x1000
        .set EFER_LMA,      0x400
        .set MSR_EFER,      0xC0000080
        .set MSR_PAT,       0x277

        .code64
        .text
        .globl  _start
_start:
        .globl  purgatory_entry
purgatory_entry:
        cli
        cld
        leaq    _start(%rip), %rbx              /* page base */
        leaq    STACK_TOP(%rbx), %rsp
        leaq    STATE(%rbx), %rsi

        lgdt    ST_GDTR(%rsi)
        lidt    ST_IDTR(%rsi)
        pushq   $SEL_CODE                       /* reload CS with a far return */
        leaq    1f(%rip), %rax
        pushq   %rax
        lretq
1:      movl    $SEL_DATA, %eax
        movl    %eax, %ds
        movl    %eax, %es
        movl    %eax, %ss
        movl    %eax, %fs
        movl    %eax, %gs

        movq    %cr4, %rax                      /* 2: keep PAE and LA57 only */
        andl    $(CR4_PAE | CR4_LA57), %eax
        movq    %rax, %cr4
        xorl    %eax, %eax
        movq    %rax, %dr7

        movq    %cr4, %rax
        testl   $CR4_LA57, %eax
        jz      4f

        pushq   $SEL_CODE32                     /* 3: to compatibility mode */
        leaq    2f(%rip), %rax
        pushq   %rax
        lretq
        .code32
        .globl  purgatory_compat32
purgatory_compat32:
2:      movl    %cr0, %eax
        andl    $~CR0_PG, %eax
        movl    %eax, %cr0                      /* long mode inactive, paging off */
        movl    %cr4, %eax
        andl    $~CR4_LA57, %eax
        movl    %eax, %cr4
        movl    ST_CR3(%esi), %eax              /* below 4 GiB: checked when staging */
        movl    %eax, %cr3
        movl    $MSR_EFER, %ecx
        movl    ST_EFER(%esi), %eax
        andl    $~EFER_LMA, %eax
        movl    ST_EFER+4(%esi), %edx
        wrmsr
        movl    %cr0, %eax
        orl     $CR0_PG, %eax
        movl    %eax, %cr0                      /* long mode active (compatibility) */
        leal    (3f - _start)(%ebx), %eax
        pushl   $SEL_CODE
        pushl   %eax
        lret
        .code64
        .globl  purgatory_long64
purgatory_long64:
3:
4:      movq    ST_CR4(%rsi), %rax              /* 4: the frozen state */
        movq    %rax, %cr4
        movl    $MSR_EFER, %ecx                 /* EFER: LME stays, NXE/SCE as frozen */
        movq    ST_EFER(%rsi), %rax
        movq    %rax, %rdx
        shrq    $32, %rdx
        wrmsr
        movq    ST_CR0(%rsi), %rax
        movq    %rax, %cr0
        movq    ST_CR3(%rsi), %rax
        movq    %rax, %cr3
        movl    $MSR_PAT, %ecx
        movq    ST_PAT(%rsi), %rax
        movq    %rax, %rdx
        shrq    $32, %rdx
        wrmsr

        fninit
        fxrstor ST_FXSAVE(%rsi)

        movl    $0xC0000100, %ecx               /* FS base */
        movq    ST_FS_BASE(%rsi), %rax
        movq    %rax, %rdx
        shrq    $32, %rdx
        wrmsr
        movl    $0xC0000101, %ecx               /* GS base */
        movq    ST_GS_BASE(%rsi), %rax
        movq    %rax, %rdx
        shrq    $32, %rdx
        wrmsr

        pushq   ST_RFLAGS(%rsi)
        popfq
        movq    ST_RSP(%rsi), %rsp              /* [RSP] = return address of the EBS call */

        movq    ST_GPRS+0x00(%rsi), %rax
        movq    ST_GPRS+0x08(%rsi), %rbx
        movq    ST_GPRS+0x10(%rsi), %rcx
        movq    ST_GPRS+0x18(%rsi), %rdx
        movq    ST_GPRS+0x28(%rsi), %rdi
        movq    ST_GPRS+0x30(%rsi), %rbp
        movq    ST_GPRS+0x38(%rsi), %r8
        movq    ST_GPRS+0x40(%rsi), %r9
        movq    ST_GPRS+0x48(%rsi), %r10
        movq    ST_GPRS+0x50(%rsi), %r11
        movq    ST_GPRS+0x58(%rsi), %r12
        movq    ST_GPRS+0x60(%rsi), %r13
        movq    ST_GPRS+0x68(%rsi), %r14
        movq    ST_GPRS+0x70(%rsi), %r15
        movq    ST_GPRS+0x20(%rsi), %rsi        /* last: it was the base register */
        ret
        .globl  purgatory_end
purgatory_end:
