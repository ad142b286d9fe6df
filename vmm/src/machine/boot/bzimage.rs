//! The Linux 64-bit boot protocol for bzImage kernels: `boot_params` in the
//! zero page, identity page tables for the first GiB, a flat GDT, and entry
//! at `startup_64` in long mode.

use std::path::Path;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::{BzImage, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::e820::E820Entry;
use super::pvh::{write_cmdline, InitrdPlacement};
use super::{BootError, BootState, SregsSetup};
use crate::machine::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, CMDLINE_START, HIMEM_START, PDE_START,
    PDPTE_START, PML4_START, ZERO_PAGE_START,
};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// Offset of the 64-bit entry point from the protected-mode kernel start.
const STARTUP_64_OFFSET: u64 = 0x200;

/// Flat GDT: null, code64, data, TSS (as the boot protocol expects).
const BOOT_GDT: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x0080_8b00_0000_ffff,
];

fn werr(what: &'static str) -> impl Fn(vm_memory::GuestMemoryError) -> BootError {
    move |e| BootError::GuestWrite {
        what,
        message: e.to_string(),
    }
}

/// Loads a bzImage and writes the zero page, GDT and page tables.
pub fn load(
    mem: &GuestMemoryMmap,
    path: &Path,
    cmdline: &str,
    initrd: Option<InitrdPlacement>,
    map: &[E820Entry],
) -> Result<BootState, BootError> {
    let mut f = super::open_kernel(path)?;
    let loaded =
        BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))).map_err(|e| {
            BootError::Load {
                path: path.to_path_buf(),
                message: e.to_string(),
            }
        })?;
    let hdr = loaded.setup_header.ok_or_else(|| BootError::Load {
        path: path.to_path_buf(),
        message: "no setup header".into(),
    })?;
    let cmdline_len = write_cmdline(mem, cmdline)?;

    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32 + 1;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    if let Some(rd) = initrd {
        params.hdr.ramdisk_image = rd.addr as u32;
        params.hdr.ramdisk_size = rd.size as u32;
    }
    for (i, e) in map.iter().take(params.e820_table.len()).enumerate() {
        params.e820_table[i].addr = e.addr;
        params.e820_table[i].size = e.size;
        params.e820_table[i].r#type = e.kind;
        params.e820_entries = i as u8 + 1;
    }
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(|e| BootError::GuestWrite {
        what: "boot_params",
        message: e.to_string(),
    })?;

    // GDT and an empty IDT.
    for (i, d) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(werr("boot GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(werr("boot IDT"))?;
    // Identity map of the first GiB with 2 MiB pages.
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))
        .map_err(werr("page tables"))?;
    mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))
        .map_err(werr("page tables"))?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))
            .map_err(werr("page tables"))?;
    }

    let regs = kvm_regs {
        rflags: 0x2,
        rip: loaded.kernel_load.raw_value() + STARTUP_64_OFFSET,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    };
    Ok(BootState {
        regs,
        sregs: SregsSetup::Long64,
    })
}

fn segment(index: u16, desc: u64) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xf_ffff,
        selector: index * 8,
        type_: ((desc >> 40) & 0xf) as u8,
        present: ((desc >> 47) & 1) as u8,
        dpl: ((desc >> 45) & 3) as u8,
        db: ((desc >> 54) & 1) as u8,
        s: ((desc >> 44) & 1) as u8,
        l: ((desc >> 53) & 1) as u8,
        g: ((desc >> 55) & 1) as u8,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Long mode with the boot GDT and identity page tables.
pub fn long_mode_sregs(sregs: &mut kvm_sregs) {
    let code = segment(1, BOOT_GDT[1]);
    let data = segment(2, BOOT_GDT[2]);
    let tss = segment(3, BOOT_GDT[3]);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = PML4_START;
    sregs.cr4 = 0x20; // PAE
    sregs.cr0 = 0x8000_0011; // PG | ET | PE
    sregs.efer = 0x500; // LME | LMA
}
