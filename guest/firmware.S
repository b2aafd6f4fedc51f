/*
 * vmrun guest firmware blob: the ring-0 monitor and the CPL-3 service thunks.
 *
 * Assembled position-independent at offset 0; the host copies the flat binary to a page of
 * EfiBootServicesCode and adds the load address to the exported symbol offsets
 * (guest/firmware.sym.json). Port numbers must match vmrun/vm/layout.py (checked by a test).
 *
 * Service thunk i (the payload calls it at CPL 3):
 *     mov    $i, %eax           ; service id (RAX is volatile in the MS x64 ABI)
 *     movabs %eax, HCALL_SVC    ; write to an unbacked guest-physical page: an MMIO exit to the
 *     ret                       ;   host, which reads rcx/rdx/r8/r9/stack and sets rax
 * Each thunk is 16 bytes, so thunk i is at svc_thunks + 16*i. (Port I/O is no hypercall from
 * CPL 3 here: this host's nested KVM (PVM) runs CPL-3 code with IOPL 0, so `out` raises #GP
 * even with RFLAGS.IOPL=3, as the UART tests in tests/kvm/test_machine.py show.)
 * The ring-0 monitor uses `out`, which works at CPL 0.
 */
        .set HCALL_SVC, 0xFFE00000
        .set HCALL_RET, 0xFFE00008
        .set PORT_EXC, 0xE2
        .set NR_SVC_THUNKS, 512

        .code64
        .text
        .globl  _start
_start:

/* --- exception entry (CPL 0, emulated by the hypervisor: keep it short) --------------------
 * Each vector pushes an error code (0 when the CPU pushes none) and its number, then tells the
 * host. The host reads vector, error code and the CPU's frame (RIP, CS, RFLAGS, RSP, SS) at
 * the stack pointer, emulates or refuses, and may rewrite the frame before we iretq. */
        .p2align 4
        .globl  exc_stubs
exc_stubs:
        .set    vec, 0
        .rept   32
        .p2align 4
        .if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
        pushq   $vec
        .else
        pushq   $0
        pushq   $vec
        .endif
        jmp     exc_common
        .set    vec, vec + 1
        .endr

        .p2align 4
        .globl  exc_spurious
exc_spurious:
        pushq   $0
        pushq   $0xff
        jmp     exc_common

        .p2align 4
        .globl  exc_common
exc_common:
        outb    %al, $PORT_EXC
        addq    $16, %rsp
        iretq

/* --- return trampoline: a host-initiated call into the guest returns here ---------------- */
        .p2align 4
        .globl  ret_thunk
ret_thunk:
        movabsl %eax, HCALL_RET
        ud2

/* --- runtime services after ExitBootServices: no host any more -------------------------- */
        .p2align 4
        .globl  rt_unsupported
rt_unsupported:
        movabsq $0x8000000000000003, %rax      /* EFI_UNSUPPORTED */
        ret

/* --- boot/runtime service and protocol thunks --------------------------------------------- */
        .p2align 4
        .globl  svc_thunks
svc_thunks:
        .set    i, 0
        .rept   NR_SVC_THUNKS
        .p2align 4
        movl    $i, %eax
        movabsl %eax, HCALL_SVC
        ret
        .set    i, i + 1
        .endr
        .p2align 4
        .globl  svc_thunks_end
svc_thunks_end:
