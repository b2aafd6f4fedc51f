/*
 * kexec_hello.S: the smallest kexec payload that proves the handoff path.
 *
 * Linked (tests/e2e/qemu.py: build_kexec_hello) into an ELF64 ET_EXEC with a single PT_LOAD
 * whose p_paddr = p_vaddr = e_entry = KEXEC_HELLO_BASE (16 MiB). `kexec -l hello.elf
 * -t elf-x86_64 --args-none` copies that segment to its physical address and `kexec -e` jumps
 * to e_entry in 64-bit mode, identity-mapped, IF=0, with no usable stack, GDT or IDT.
 *
 * So: no stack, no memory writes, registers only. Print the marker on COM1 (polling the line
 * status register's THRE bit), then stop the CPU for good. The first kernel left the UART
 * programmed (it was its console), so no set-up is needed.
 */

        .set    COM1,           0x3f8
        .set    COM1_LSR,       COM1 + 5
        .set    LSR_THRE,       0x20

        .code64
        .text
        .globl  _start
_start:
        cli
        leaq    message(%rip), %rsi
        movl    $message_len, %ecx
next_char:
        movb    (%rsi), %bl
        movw    $COM1_LSR, %dx
wait_thre:
        inb     %dx, %al
        testb   $LSR_THRE, %al
        jz      wait_thre
        movw    $COM1, %dx
        movb    %bl, %al
        outb    %al, %dx
        incq    %rsi
        decl    %ecx
        jnz     next_char
halt:
        cli
        hlt
        jmp     halt

message:
        .ascii  "\r\nHELLO-FROM-KEXEC\r\n"
        .set    message_len, . - message

        .section .note.GNU-stack, "", @progbits
