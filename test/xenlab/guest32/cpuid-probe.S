/*
 * cpuid-probe.S: a minimal 32-bit PVH guest (issue #9, run by hand only) that finds in which
 * processor mode a CPUID exit kills a 32-bit guest under Xen on QEMU TCG. It prints each
 * stage on Xen's debug port 0xe9 (Xen shows the lines as "(dN) ..."); OUT needs no
 * instruction decode on SVM (the I/O exit reports the next RIP), CPUID does.
 *
 * Stages: 1 CPUID with Xen's start-of-day segments, paging off; 2 after loading a GDT of
 * our own (as Linux's pvh_start_xen does); 3 PAE paging on, identity-mapped code; 4 the
 * same code through a mapping at 0xc0000000 (where Linux's xen_prepare_pvh runs);
 * then HLT with interrupts off, which Xen turns into a power-off.
 * Assembled with -DSKIP_FLAT (stages 1-2 skipped) or -DLEGACY_PAGING (2-level paging
 * instead of PAE) to tell the modes apart when an early stage dies.
 */
#define PHYS32_ENTRY 18
#define OFFSET 0xc0000000

	.code32
	.section .note.Xen, "a"
	.p2align 2
	.long 4, 4, PHYS32_ENTRY
	.asciz "Xen"
	.long _start

	.text
	.globl _start
_start:
	cli
	mov $stack_top, %esp
	mov $m_start, %esi
	call puts
#ifndef SKIP_FLAT
	xor %eax, %eax
	cpuid
	mov $m_flat, %esi
	call puts
#endif
	lgdt gdt_desc
	ljmp $8, $1f
1:	mov $16, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %ss
#ifndef SKIP_FLAT
	mov $0x40000000, %eax
	cpuid
	mov $m_gdt, %esi
	call puts
#endif
	/* Page tables: 4 KiB pages identity-mapping the first 4 MiB, and the same at OFFSET. */
	mov $pt, %edi
	mov $0x003, %eax		/* present, writable */
	mov $1024, %ecx
2:
#ifdef LEGACY_PAGING
	mov %eax, (%edi)
	add $4, %edi
#else
	mov %eax, (%edi)
	movl $0, 4(%edi)
	add $8, %edi
#endif
	add $0x1000, %eax
	loop 2b
#ifdef LEGACY_PAGING
	movl $(pt + 0x063), pd			/* one page table covers 4 MiB */
	movl $(pt + 0x063), pd + (OFFSET >> 22) * 4
	mov $pd, %eax
#else
	movl $(pt + 0x063), pd			/* two page tables of 512 entries */
	movl $0, pd + 4
	movl $(pt + 0x1000 + 0x063), pd + 8
	movl $0, pd + 12
	movl $(pd + 0x001), pdpt		/* PDPTEs: present only */
	movl $0, pdpt + 4
	movl $(pd + 0x001), pdpt + 24
	movl $0, pdpt + 28
	mov %cr4, %eax
	or $0x20, %eax			/* CR4.PAE */
	mov %eax, %cr4
	mov $pdpt, %eax
#endif
	mov %eax, %cr3
	mov %cr0, %eax
	or $0x80000001, %eax		/* CR0.PG | CR0.PE */
	mov %eax, %cr0
	ljmp $8, $3f
3:	mov $0x40000000, %eax
	cpuid
	mov $m_paged, %esi
	call puts
	mov $(4f + OFFSET), %eax
	jmp *%eax
4:	mov $0x40000000, %eax
	cpuid
	mov $m_high, %esi
	call puts
	cli
	hlt
	mov $m_after_hlt, %esi
	call puts
5:	jmp 5b

puts:	mov $0xe9, %dx
6:	lodsb
	test %al, %al
	jz 7f
	outb %al, %dx
	jmp 6b
7:	ret

	.data
	.p2align 3
gdt:	.quad 0
	.quad 0x00cf9a000000ffff	/* 0x08: 32-bit code, flat */
	.quad 0x00cf92000000ffff	/* 0x10: data, flat */
gdt_end:
gdt_desc:
	.word gdt_end - gdt - 1
	.long gdt
m_start:	.asciz "XEN32-PROBE start\n"
m_flat:		.asciz "XEN32-PROBE 1 cpuid ok: Xen's start-of-day segments, paging off\n"
m_gdt:		.asciz "XEN32-PROBE 2 cpuid ok: own GDT, paging off\n"
#ifdef LEGACY_PAGING
m_paged:	.asciz "XEN32-PROBE 3 cpuid ok: 2-level paging on, identity-mapped\n"
m_high:		.asciz "XEN32-PROBE 4 cpuid ok: 2-level paging, code at 0xc0000000\n"
#else
m_paged:	.asciz "XEN32-PROBE 3 cpuid ok: PAE paging on, identity-mapped\n"
m_high:		.asciz "XEN32-PROBE 4 cpuid ok: PAE paging, code at 0xc0000000\n"
#endif
m_after_hlt:	.asciz "XEN32-PROBE hlt returned\n"

	.bss
	.p2align 12
pdpt:	.skip 4096
pd:	.skip 4096
pt:	.skip 8192
	.skip 4096
stack_top:
