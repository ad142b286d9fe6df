/*
 * snapvm test guest: ring-0 start-up code.
 *
 * Everything here runs at CPL 0, which the KVM backend on the development
 * machines interprets at ~1.5 million instructions per second, so this file is
 * kept as short as possible: page tables and the GDT are built by the
 * assembler at link time, and the only loops are the 32-entry IDT setup.
 *
 * Boot paths:
 *  - BSP: PVH entry (32-bit protected mode, paging off, %ebx = hvm_start_info).
 *  - APs: INIT/SIPI to the real-mode trampoline at 0x8000.
 * Both meet in common32, switch to long mode, load a per-CPU TSS and drop to
 * ring 3 (IOPL=3) in guest_main() / ap_main() (main.c).
 */

#define MAX_CPUS        64
#define KSTACK_SIZE     16384
#define USTACK_SIZE     65536
#define TSS_STRIDE      0x2080          /* 104-byte TSS + 8 KiB I/O bitmap (all ports allowed) */
#define TSS_LIMIT       (104 + 8192 - 1)
#define GDT_TSS_BASE    0x30
#define GDT_LIMIT       (GDT_TSS_BASE + MAX_CPUS * 16 - 1)
#define LAPIC_BASE      0xFEE00000

/* ------------------------------------------------------------------ */
/* PVH ELF note: XEN_ELFNOTE_PHYS32_ENTRY (18) with the 32-bit entry.  */
/* ------------------------------------------------------------------ */
        .section .note.Xen, "a"
        .p2align 2
        .long 4                 /* name size ("Xen\0") */
        .long 4                 /* desc size */
        .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz "Xen"
        .long pvh_start

/* ------------------------------------------------------------------ */
/* AP trampoline, linked and loaded at 0x8000 (SIPI vector 0x08).      */
/* ------------------------------------------------------------------ */
        .section .tramp, "ax"
        .code16
        .globl ap_trampoline
ap_trampoline:
        cli
        xorw    %ax, %ax
        movw    %ax, %ds
        lgdtl   tramp_gdtr
        movl    %cr0, %eax
        orl     $1, %eax
        movl    %eax, %cr0
        ljmpl   $0x08, $ap_entry32
        .p2align 3
tramp_gdtr:
        .word   GDT_LIMIT
        .long   gdt

/* ------------------------------------------------------------------ */
/* 32-bit entry points                                                 */
/* ------------------------------------------------------------------ */
        .section .text.boot32, "ax"
        .code32
        .globl pvh_start
pvh_start:
        cli
        movl    %ebx, pvh_start_info
        lgdtl   gdt_ptr
        ljmpl   $0x08, $1f
1:      movl    $1, %ebp                /* BSP */
        jmp     common32

ap_entry32:
        xorl    %ebp, %ebp              /* AP */

common32:
        movw    $0x18, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        movl    %cr4, %eax
        orl     $(1 << 5), %eax         /* PAE */
        movl    %eax, %cr4
        movl    $pml4, %eax
        movl    %eax, %cr3
        movl    $0xC0000080, %ecx       /* EFER */
        rdmsr
        orl     $(1 << 8), %eax         /* LME */
        wrmsr
        movl    %cr0, %eax
        orl     $0x80000001, %eax       /* PG | PE */
        movl    %eax, %cr0
        ljmpl   $0x10, $long_entry

/* ------------------------------------------------------------------ */
/* 64-bit ring-0 set-up, per CPU                                       */
/* ------------------------------------------------------------------ */
        .code64
        .text
long_entry:
        movw    $0x18, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        xorw    %ax, %ax
        movw    %ax, %fs
        movw    %ax, %gs

        /* CPU index = local APIC id. */
        movl    $(LAPIC_BASE + 0x20), %esi
        movl    (%rsi), %ebx
        shrl    $24, %ebx
        cmpl    $MAX_CPUS, %ebx
        jae     halt_forever

        /* Kernel stack: kstacks[cpu + 1]. */
        movq    %rbx, %rax
        incq    %rax
        shlq    $14, %rax
        leaq    kstacks(%rax), %rsp
        movq    %rsp, %r12              /* kernel stack top */

        testl   %ebp, %ebp
        jz      1f
        call    build_idt
1:
        /* TSS for this CPU: rsp0 = kernel stack top. */
        imulq   $TSS_STRIDE, %rbx, %rax
        leaq    tss(%rax), %rdi
        movq    %r12, 4(%rdi)
        movw    $104, 102(%rdi)         /* I/O bitmap right after the TSS */
        /* TSS descriptor at gdt + GDT_TSS_BASE + 16 * cpu. */
        movq    %rbx, %rax
        shlq    $4, %rax
        leaq    gdt + GDT_TSS_BASE(%rax), %rsi
        movq    %rdi, %rax              /* base */
        movq    %rax, %rdx
        andq    $0xFFFF, %rdx
        shlq    $16, %rdx
        orq     $(TSS_LIMIT & 0xFFFF), %rdx /* limit */
        movq    %rax, %rcx
        shrq    $16, %rcx
        andq    $0xFF, %rcx
        shlq    $32, %rcx
        orq     %rcx, %rdx
        movq    $0x89, %rcx             /* present, 64-bit TSS (available) */
        shlq    $40, %rcx
        orq     %rcx, %rdx
        movq    %rax, %rcx
        shrq    $24, %rcx
        andq    $0xFF, %rcx
        shlq    $56, %rcx
        orq     %rcx, %rdx
        movq    %rdx, (%rsi)
        shrq    $32, %rax
        movq    %rax, 8(%rsi)
        movq    %rbx, %rax
        shlq    $4, %rax
        addq    $GDT_TSS_BASE, %rax
        ltr     %ax
        lidt    idt_ptr

        /* SSE on (ring-3 code is plain x86-64; this keeps fxsave-free state sane). */
        movq    %cr0, %rax
        andq    $~(1 << 2), %rax        /* EM */
        orq     $(1 << 1), %rax         /* MP */
        movq    %rax, %cr0
        movq    %cr4, %rax
        orq     $((1 << 9) | (1 << 10)), %rax
        movq    %rax, %cr4

        /* Per-CPU data for ring 3: FS base -> cpu_local[cpu] (its index). */
        leaq    cpu_local(, %rbx, 8), %rax
        movq    %rbx, (%rax)
        movq    %rax, %rdx
        shrq    $32, %rdx
        movl    $0xC0000100, %ecx       /* IA32_FS_BASE */
        wrmsr

        testl   %ebp, %ebp
        jnz     bsp_only
        /* APs: their own kvmclock page slot, if the BSP found kvmclock. */
        cmpl    $0, kvmclock_ok
        je      enter_user
        movq    %rbx, %rax
        shlq    $6, %rax                /* 64-byte slot per CPU */
        leaq    pvclock_area(%rax), %rax
        orq     $1, %rax
        movq    %rax, %rdx
        shrq    $32, %rdx
        movl    $0x4b564d01, %ecx       /* MSR_KVM_SYSTEM_TIME_NEW */
        wrmsr
        jmp     enter_user

bsp_only:
        /* BSP only: kvmclock (for timing in ring 3), then wake the APs. */
        xorl    %eax, %eax
        movl    $0x40000000, %eax
        cpuid
        cmpl    $0x4b4d564b, %ebx       /* "KVMK" */
        jne     2f
        movl    $0x40000001, %eax
        cpuid
        testl   $(1 << 3), %eax         /* KVM_FEATURE_CLOCKSOURCE2 */
        jz      2f
        movl    $0x4b564d01, %ecx       /* MSR_KVM_SYSTEM_TIME_NEW */
        leaq    pvclock_area, %rax
        orq     $1, %rax
        movq    %rax, %rdx
        shrq    $32, %rdx
        wrmsr
        movl    $1, kvmclock_ok
2:
        movl    $LAPIC_BASE, %esi
        movl    $0x1FF, 0xF0(%rsi)      /* spurious vector register: APIC on */
        movl    $0x000C4500, 0x300(%rsi)        /* INIT, all but self */
        movl    $0x000C4608, 0x300(%rsi)        /* SIPI vector 0x08 */
        movl    $0x000C4608, 0x300(%rsi)        /* second SIPI */

enter_user:
        /* iretq to ring 3 with IOPL=3, IF=0. */
        movq    %rbx, %rax
        incq    %rax
        shlq    $16, %rax               /* * USTACK_SIZE */
        leaq    ustacks(%rax), %rcx
        movq    %rbx, %rdi              /* arg0: cpu index */
        movl    %ebp, %esi              /* arg1: is BSP */
        pushq   $0x23                   /* SS */
        pushq   %rcx                    /* RSP */
        pushq   $0x3002                 /* RFLAGS: IOPL=3 */
        pushq   $0x2B                   /* CS */
        pushq   $user_entry             /* RIP */
        iretq

        .globl halt_forever
halt_forever:
        cli
1:      hlt
        jmp     1b

/* Build the 32 exception gates (interrupt gates, DPL 0, selector 0x10). */
build_idt:
        leaq    isr_table, %rsi
        leaq    idt, %rdi
        movl    $32, %ecx
1:      movq    (%rsi), %rax
        movq    %rax, %rdx
        andq    $0xFFFF, %rdx
        orq     $(0x10 << 16), %rdx
        movq    $0x8E00, %r8
        shlq    $32, %r8
        orq     %r8, %rdx
        movq    %rax, %r8
        shrq    $16, %r8
        andq    $0xFFFF, %r8
        shlq    $48, %r8
        orq     %r8, %rdx
        movq    %rdx, (%rdi)
        shrq    $32, %rax
        movq    %rax, 8(%rdi)
        addq    $8, %rsi
        addq    $16, %rdi
        decl    %ecx
        jnz     1b
        ret

/* Ring-3 entry trampoline: call the C entry with a clean frame. */
user_entry:
        xorl    %ebp, %ebp
        call    guest_entry
        ud2

/* The "halt" system call: ring 3 executes this ud2; the #UD handler
 * recognises the address and halts the CPU in ring 0. */
        .globl sys_halt, sys_halt_ud
sys_halt:
sys_halt_ud:
        ud2
        jmp     sys_halt

/* The "probe" system call: ring 3 executes this ud2 with %rdi = argument;
 * the #UD handler runs ring0_probe and resumes after it. */
        .globl sys_probe, sys_probe_ud
sys_probe:
sys_probe_ud:
        ud2
        ret

/* Exception stubs. */
        .macro ISR_NOERR n
isr\n:  pushq   $0
        pushq   $\n
        jmp     isr_common
        .endm
        .macro ISR_ERR n
isr\n:  pushq   $\n
        jmp     isr_common
        .endm

        ISR_NOERR 0
        ISR_NOERR 1
        ISR_NOERR 2
        ISR_NOERR 3
        ISR_NOERR 4
        ISR_NOERR 5
        ISR_NOERR 6
        ISR_NOERR 7
        ISR_ERR   8
        ISR_NOERR 9
        ISR_ERR   10
        ISR_ERR   11
        ISR_ERR   12
        ISR_ERR   13
        ISR_ERR   14
        ISR_NOERR 15
        ISR_NOERR 16
        ISR_ERR   17
        ISR_NOERR 18
        ISR_NOERR 19
        ISR_NOERR 20
        ISR_ERR   21
        ISR_NOERR 22
        ISR_NOERR 23
        ISR_NOERR 24
        ISR_NOERR 25
        ISR_NOERR 26
        ISR_NOERR 27
        ISR_NOERR 28
        ISR_ERR   29
        ISR_ERR   30
        ISR_NOERR 31

isr_common:
        pushq   %rax
        pushq   %rbx
        pushq   %rcx
        pushq   %rdx
        pushq   %rsi
        pushq   %rdi
        pushq   %rbp
        pushq   %r8
        pushq   %r9
        pushq   %r10
        pushq   %r11
        pushq   %r12
        pushq   %r13
        pushq   %r14
        pushq   %r15
        movq    %rsp, %rdi
        call    exception_handler
        testl   %eax, %eax
        jz      halt_forever
        /* The handler dealt with it: resume the interrupted code. */
        popq    %r15
        popq    %r14
        popq    %r13
        popq    %r12
        popq    %r11
        popq    %r10
        popq    %r9
        popq    %r8
        popq    %rbp
        popq    %rdi
        popq    %rsi
        popq    %rdx
        popq    %rcx
        popq    %rbx
        popq    %rax
        addq    $16, %rsp               /* vector, error code */
        iretq

/* Ring-0 probe of the instructions the emulating KVM backend cannot run
 * (reached from ring 3 through sys_probe): int3 and fwait, which the VMM
 * recovers from, and with %rdi != 0 cmpxchg16b, which it must report. */
        .globl ring0_probe, probe_after_int3
ring0_probe:
        int3
probe_after_int3:
        fwait
        testq   %rdi, %rdi
        jz      1f
        pushq   %rbx
        leaq    probe_buf, %rsi
        xorl    %eax, %eax
        xorl    %edx, %edx
        xorl    %ebx, %ebx
        xorl    %ecx, %ecx
        lock cmpxchg16b (%rsi)
        popq    %rbx
1:      ret

/* ------------------------------------------------------------------ */
/* Data: GDT, IDT, TSSs, identity page tables (0..16 GiB, 2 MiB pages, */
/* user-accessible so ring-3 workloads can reach all of RAM and MMIO). */
/* ------------------------------------------------------------------ */
        .data
        .p2align 3
isr_table:
        .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .quad isr\n
        .endr

        .p2align 4
gdt:
        .quad 0
        .quad 0x00CF9A000000FFFF        /* 0x08: code32 */
        .quad 0x00AF9A000000FFFF        /* 0x10: code64, DPL 0 */
        .quad 0x00CF92000000FFFF        /* 0x18: data, DPL 0 */
        .quad 0x00CFF2000000FFFF        /* 0x20: data, DPL 3 */
        .quad 0x00AFFA000000FFFF        /* 0x28: code64, DPL 3 */
        .fill MAX_CPUS * 2, 8, 0        /* 0x30: one TSS descriptor per CPU */

        .p2align 3
gdt_ptr:
        .word   GDT_LIMIT
        .quad   gdt

        .p2align 3
idt_ptr:
        .word   32 * 16 - 1
        .quad   idt

        .p2align 4
probe_buf:
        .quad 0, 0

        .globl cpu_local
        .p2align 3
cpu_local:
        .fill MAX_CPUS, 8, 0

        .globl pvh_start_info, kvmclock_ok
        .p2align 3
pvh_start_info:
        .quad 0
kvmclock_ok:
        .long 0

        .p2align 12
pml4:
        .quad pdpt + 0x7
        .fill 511, 8, 0
pdpt:
        .set i, 0
        .rept 16
        .quad pd + i * 4096 + 0x7
        .set i, i + 1
        .endr
        .fill 512 - 16, 8, 0
pd:
        .set i, 0
        .rept 16 * 512
        .quad (i << 21) | 0x87          /* present, writable, user, 2 MiB */
        .set i, i + 1
        .endr

        .bss
        .p2align 12
        .globl pvclock_area
pvclock_area:
        .skip 4096
idt:
        .skip 32 * 16
        .p2align 7
tss:
        .skip MAX_CPUS * TSS_STRIDE
        .p2align 12
kstacks:
        .skip (MAX_CPUS + 1) * KSTACK_SIZE
ustacks:
        .skip (MAX_CPUS + 1) * USTACK_SIZE

        .section .note.GNU-stack, "", @progbits
