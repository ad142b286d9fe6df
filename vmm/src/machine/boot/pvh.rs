//! PVH boot: an ELF kernel entered in 32-bit protected mode with paging off
//! and `%ebx` pointing at an `hvm_start_info`.

use std::path::Path;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{Address, GuestAddress, GuestMemoryMmap};

use super::e820::E820Entry;
use super::{BootError, BootState, SregsSetup};
use crate::machine::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START,
};

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// A loaded initrd: where it is and how big.
#[derive(Debug, Clone, Copy)]
pub struct InitrdPlacement {
    /// Guest-physical address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Writes `cmdline` at CMDLINE_START.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<u64, BootError> {
    let cl = Cmdline::try_from(cmdline, CMDLINE_MAX_SIZE)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cl)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    Ok(cmdline.len() as u64)
}

/// Loads an ELF kernel and writes the PVH boot structures. Returns the
/// initial state of the boot vCPU.
pub fn load(
    mem: &GuestMemoryMmap,
    path: &Path,
    cmdline: &str,
    initrd: Option<InitrdPlacement>,
    map: &[E820Entry],
) -> Result<BootState, BootError> {
    let mut f = super::open_kernel(path)?;
    let loaded = Elf::load(mem, None, &mut f, None).map_err(|e| BootError::Load {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => addr,
        _ => return Err(BootError::NoPvhEntry(path.to_path_buf())),
    };
    write_cmdline(mem, cmdline)?;

    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    let memmap: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    if let Some(rd) = initrd {
        start_info.nr_modules = 1;
        start_info.modlist_paddr = PVH_MODLIST_START;
        params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
        let module = hvm_modlist_entry {
            paddr: rd.addr,
            size: rd.size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(PVH_MODLIST_START));
    }
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem).map_err(|e| {
        BootError::GuestWrite {
            what: "PVH start info",
            message: e.to_string(),
        }
    })?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry.raw_value(),
        rbx: PVH_INFO_START,
        ..Default::default()
    };
    Ok(BootState {
        regs,
        sregs: SregsSetup::Protected32,
    })
}

/// Flat 32-bit protected mode, paging off, as PVH requires.
pub fn protected_mode_sregs(sregs: &mut kvm_sregs) {
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x08,
        type_: 0xb, // execute/read, accessed
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment {
        selector: 0x10,
        type_: 0x3, // read/write, accessed
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.cr0 = 0x11; // PE | ET
    sregs.cr4 = 0;
    sregs.efer = 0;
}
