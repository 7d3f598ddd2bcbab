/*
 * A guest in one boot sector: writes an ever-increasing 16-bit counter k,
 * filling LBA 0 of the IDE primary slave and then of the secondary master,
 * forever (k, then k on the second disk, then k+1 on the first, ...).
 *
 * These are real guest writes, issued by a vCPU, so `stop` holds them.
 * A point-in-time view of both disks taken in one instant shows counters
 * (a, b) with a == b or a == b + 1; anything else means the two views
 * are from different instants.
 *
 * Built with binutils: as --32 + ld --oformat binary -Ttext 0x7c00.
 */
.code16
.globl _start
_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0x7c00, %sp
    cld
    xor %bx, %bx
next:
    inc %bx
    mov $0x8000, %di
    mov $256, %cx
    mov %bx, %ax
    rep stosw
    mov $0x1f0, %dx
    mov $0xf0, %al
    call write_sector
    mov $0x170, %dx
    mov $0xe0, %al
    call write_sector
    jmp next

/* dx: base port, al: drive select (LBA mode). Writes 0x8000..0x81ff to LBA 0. */
write_sector:
    mov %dx, %bp
    add $6, %dx
    out %al, %dx
    call wait_ready
    mov %bp, %dx
    add $2, %dx
    mov $1, %al
    out %al, %dx
    inc %dx
    xor %al, %al
    out %al, %dx
    inc %dx
    out %al, %dx
    inc %dx
    out %al, %dx
    mov %bp, %dx
    add $7, %dx
    mov $0x30, %al
    out %al, %dx
1:  in %dx, %al
    test $0x80, %al
    jnz 1b
    test $0x08, %al
    jz 1b
    mov %bp, %dx
    mov $0x8000, %si
    mov $256, %cx
    rep outsw
    mov %bp, %dx
    add $7, %dx
    call wait_ready
    ret

wait_ready:
    push %dx
    mov %bp, %dx
    add $7, %dx
2:  in %dx, %al
    test $0x80, %al
    jnz 2b
    pop %dx
    ret

.org 510
.byte 0x55, 0xaa
