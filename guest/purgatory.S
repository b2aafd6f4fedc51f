/*
 * vmrun purgatory: continue a payload frozen at ExitBootServices, on the real machine.
 *
 * Entered the way kexec enters an ELF image on x86_64: 64-bit mode, identity-mapped,
 * IF = 0, general registers zero, GDTR/IDTR not usable, CR4 = PAE only (no SSE yet).
 * The code is position-independent; the host places it in a page of the target's RAM and
 * writes the state block at STATE (offsets below, mirrored in vmrun/handoff/state.py):
 *
 *   0x000 magic "VMRUNST1"      0x008 version (u32), size (u32)
 *   0x010 GDTR (limit u16, base u64)   0x020 IDTR (limit u16, base u64)
 *   0x030 CR0  0x038 CR3  0x040 CR4  0x048 EFER  0x050 RFLAGS  0x058 RSP
 *   0x060 FS base  0x068 GS base
 *   0x070 RAX RBX RCX RDX RSI RDI RBP R8 R9 R10 R11 R12 R13 R14 R15  (15 x u64)
 *   0x100 FXSAVE image (512 bytes, x87 + MXCSR + XMM0-15)
 *   0x300 GDT: null, ring-0 code64 (0x08), ring-0 data (0x10)
 *
 * It loads its GDT and reloads every segment at CPL 0, restores CR4 (OSFXSR/OSXMMEXCPT …),
 * EFER (NXE), CR0 and the payload's CR3, the x87/SSE state (XMM6-15 are callee-saved in the
 * MS x64 ABI), FS/GS bases, RFLAGS (IF clear), RSP and every general register — with RAX =
 * EFI_SUCCESS — and executes `ret`: the return from the payload's ExitBootServices call.
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
        .set ST_FXSAVE,     0x100
        .set STACK_TOP,     0x2000
        .set SEL_CODE,      0x08
        .set SEL_DATA,      0x10

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

        movq    ST_CR4(%rsi), %rax
        movq    %rax, %cr4
        movl    $0xC0000080, %ecx               /* EFER: LME stays, NXE/SCE as frozen */
        movq    ST_EFER(%rsi), %rax
        movq    %rax, %rdx
        shrq    $32, %rdx
        wrmsr
        movq    ST_CR0(%rsi), %rax
        movq    %rax, %cr0
        movq    ST_CR3(%rsi), %rax
        movq    %rax, %cr3

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
