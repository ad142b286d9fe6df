//! Guest-physical memory layout shared by the boot code and device setup.

/// Page size used for guest memory accounting.
pub const PAGE_SIZE: u64 = 4096;
/// 2 MiB: alignment of host mappings so transparent huge pages can back them.
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// Start of the MMIO gap below 4 GiB (LAPIC, IOAPIC, virtio-mmio devices).
pub const MMIO_GAP_START: u64 = 3 << 30;
/// End of the MMIO gap: RAM continues here.
pub const MMIO_GAP_END: u64 = 4 << 30;

/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd), right after the start info.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Linux boot protocol: `boot_params` ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Linux boot protocol: boot GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// Linux boot protocol: boot IDT (empty).
pub const BOOT_IDT_START: u64 = 0x520;
/// Linux boot protocol: initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Linux boot protocol: identity page tables (PML4, PDPT, PD).
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (first GiB, 2 MiB pages).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line accepted.
pub const CMDLINE_MAX_SIZE: usize = 4096;

/// Reserved area holding the MP configuration table.
pub const MPTABLE_AREA_START: u64 = 0x9c000;
/// The MP floating pointer: last KiB of base memory, where guests look.
pub const MPTABLE_FP_START: u64 = 0x9fc00;
/// End of base memory (start of the legacy VGA/BIOS hole).
pub const EBDA_END: u64 = 0xa0000;
/// Start of "high" memory where kernels load.
pub const HIMEM_START: u64 = 0x10_0000;

/// KVM's TSS (three pages) just below the BIOS area in the MMIO gap.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// The IOAPIC's MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APIC's MMIO base.
pub const APIC_START: u64 = 0xfee0_0000;

/// First virtio-mmio device window (in the MMIO gap).
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Distance between virtio-mmio device windows.
pub const VIRTIO_MMIO_STRIDE: u64 = 0x1000;
/// IOAPIC pin of the first virtio device (COM1 has 4).
pub const VIRTIO_IRQ_BASE: u32 = 5;
