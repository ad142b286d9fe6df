//! Loading a kernel and preparing the boot state: PVH for ELF kernels, the
//! Linux 64-bit boot protocol for bzImage, the E820 map and the MP table.

pub mod bzimage;
pub mod e820;
pub mod mptable;
pub mod pvh;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_regs, kvm_sregs};

use self::e820::memory_map;
use self::pvh::InitrdPlacement;
use crate::config::VmConfig;
use crate::machine::layout::{HIMEM_START, MMIO_GAP_START, PAGE_SIZE};
use crate::machine::memory::GuestRam;

/// Errors while loading a kernel.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be opened.
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        /// The path given.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The initrd file could not be read.
    #[error("cannot read initrd {path}: {source}")]
    ReadInitrd {
        /// The path given.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Neither ELF nor bzImage.
    #[error("kernel {0} is neither an ELF (vmlinux, PVH) nor a bzImage")]
    UnknownFormat(PathBuf),
    /// An ELF whose headers are cut short.
    #[error("ELF kernel {0} is malformed: its program headers are cut short")]
    MalformedElf(PathBuf),
    /// An ELF without a PVH entry note.
    #[error("ELF kernel {0} has no PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY); build it with CONFIG_PVH=y")]
    NoPvhEntry(PathBuf),
    /// The loader rejected the image.
    #[error("cannot load kernel {path}: {message}")]
    Load {
        /// The kernel path.
        path: PathBuf,
        /// What linux-loader said.
        message: String,
    },
    /// The command line is too long or malformed.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// The initrd does not fit in low memory.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory below {limit:#x}")]
    InitrdTooLarge {
        /// The initrd path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Highest address it could end at.
        limit: u64,
    },
    /// Writing boot structures into guest memory failed.
    #[error("cannot write {what} into guest memory: {message}")]
    GuestWrite {
        /// Which structure.
        what: &'static str,
        /// The error.
        message: String,
    },
    /// Too many vCPUs for the MP table area.
    #[error("MP table for {0} vCPUs does not fit its reserved area")]
    MpTableTooLarge(u8),
}

/// Kind of kernel image, detected from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// ELF (vmlinux or the test guest), booted through PVH.
    Elf,
    /// bzImage, booted through the Linux 64-bit boot protocol.
    BzImage,
}

/// Opens the kernel image; the error names the file.
pub fn open_kernel(path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::OpenKernel {
        path: path.to_path_buf(),
        source,
    })
}

/// Detects the kernel format; errors name the file.
pub fn detect_format(path: &Path) -> Result<KernelFormat, BootError> {
    let mut f = open_kernel(path)?;
    let mut head = vec![0u8; 0x210];
    let mut got = 0;
    while got < head.len() {
        match f.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(source) => {
                return Err(BootError::OpenKernel {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
    if got >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(KernelFormat::Elf);
    }
    if got >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Ok(KernelFormat::BzImage);
    }
    Err(BootError::UnknownFormat(path.to_path_buf()))
}

/// The boot vCPU's initial state produced by a boot protocol.
pub struct BootState {
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment and control registers (applied on top of the vCPU's own).
    pub sregs: SregsSetup,
}

/// How to set the boot vCPU's special registers.
pub enum SregsSetup {
    /// PVH: 32-bit protected mode, paging off.
    Protected32,
    /// Linux boot protocol: long mode with the page tables and GDT written
    /// into guest memory.
    Long64,
}

impl SregsSetup {
    /// Applies this mode to `sregs`.
    pub fn apply(&self, sregs: &mut kvm_sregs) {
        match self {
            SregsSetup::Protected32 => pvh::protected_mode_sregs(sregs),
            SregsSetup::Long64 => bzimage::long_mode_sregs(sregs),
        }
    }
}

/// Loads `config`'s kernel (and initrd) into `ram` with the command line
/// `cmdline`, and writes the MP table for `config.vcpus`: everything the
/// boot vCPU needs, whose registers are returned.
pub fn load(ram: &GuestRam, config: &VmConfig, cmdline: &str) -> Result<BootState, BootError> {
    let format = detect_format(&config.kernel)?;
    let map = memory_map(ram.ranges());
    let initrd = match &config.initrd {
        // The kernel's own footprint is checked by the loader; keep the
        // initrd at the top of low memory, away from it.
        Some(p) => Some(initrd_placement(ram, p, HIMEM_START)?),
        None => None,
    };
    let state = match format {
        KernelFormat::Elf => pvh::load(ram.memory(), &config.kernel, cmdline, initrd, &map)?,
        KernelFormat::BzImage => {
            bzimage::load(ram.memory(), &config.kernel, cmdline, initrd, &map)?
        }
    };
    mptable::setup_mptable(ram.memory(), config.vcpus)?;
    Ok(state)
}

fn initrd_placement(
    ram: &GuestRam,
    path: &Path,
    kernel_end: u64,
) -> Result<InitrdPlacement, BootError> {
    let data = std::fs::read(path).map_err(|source| BootError::ReadInitrd {
        path: path.to_path_buf(),
        source,
    })?;
    let size = data.len() as u64;
    let low_end = ram
        .ranges()
        .first()
        .map(|r| r.start + r.size)
        .unwrap_or(0)
        .min(MMIO_GAP_START);
    let too_large = || BootError::InitrdTooLarge {
        path: path.to_path_buf(),
        size,
        limit: low_end,
    };
    let addr = low_end.checked_sub(size).ok_or_else(too_large)? & !(PAGE_SIZE - 1);
    if addr < kernel_end.max(HIMEM_START) {
        return Err(too_large());
    }
    use vm_memory::{Bytes, GuestAddress};
    ram.memory()
        .write_slice(&data, GuestAddress(addr))
        .map_err(|e| BootError::GuestWrite {
            what: "initrd",
            message: e.to_string(),
        })?;
    Ok(InitrdPlacement { addr, size })
}

/// How much guest memory, from address 0, the kernel at `path` occupies
/// once loaded: the end of its highest ELF load segment, or for a bzImage
/// the 1 MiB load address plus the memory its setup header asks for
/// (`init_size`, boot protocol 2.10 and later; the file's size before).
/// Configuration checks use it to refuse a memory size the kernel cannot
/// fit in before a VM is started.
pub fn memory_needed(path: &Path) -> Result<u64, BootError> {
    let data = std::fs::read(path).map_err(|source| BootError::OpenKernel {
        path: path.to_path_buf(),
        source,
    })?;
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        data.get(o..o + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    };
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    match detect_format(path)? {
        KernelFormat::Elf => {
            let bad = || BootError::MalformedElf(path.to_path_buf());
            let phoff = u64_at(0x20).ok_or_else(bad)? as usize;
            let entsize = u16_at(0x36).ok_or_else(bad)? as usize;
            let count = u16_at(0x38).ok_or_else(bad)? as usize;
            let mut end = 0u64;
            for i in 0..count {
                let ph = phoff.saturating_add(i.saturating_mul(entsize));
                const PT_LOAD: u32 = 1;
                if u32_at(ph) != Some(PT_LOAD) {
                    continue;
                }
                let paddr = u64_at(ph + 0x18).ok_or_else(bad)?;
                let memsz = u64_at(ph + 0x28).ok_or_else(bad)?;
                end = end.max(paddr.saturating_add(memsz));
            }
            Ok(end)
        }
        KernelFormat::BzImage => {
            let version = u16_at(0x206).unwrap_or(0);
            let init_size = match u32_at(0x260) {
                Some(s) if version >= 0x20a => s as u64,
                _ => data.len() as u64,
            };
            Ok(HIMEM_START + init_size)
        }
    }
}
