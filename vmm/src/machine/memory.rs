//! Guest RAM: anonymous host mappings, 2 MiB aligned and advised for
//! transparent huge pages, laid out around the MMIO gap below 4 GiB.

use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::machine::layout::{HUGE_PAGE_SIZE, MMIO_GAP_END, MMIO_GAP_START};

/// Errors creating guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// mmap refused the size.
    #[error("cannot map {size} bytes of guest memory: {source}")]
    Mmap {
        /// Requested size.
        size: u64,
        /// The OS error.
        source: std::io::Error,
    },
    /// Guest memory would not fit the guest-physical address space.
    #[error(
        "memory size {size} bytes does not fit the {phys_bits}-bit guest-physical address space"
    )]
    TooLarge {
        /// Requested size.
        size: u64,
        /// Physical address bits the host supports.
        phys_bits: u32,
    },
    /// vm-memory rejected the regions.
    #[error("cannot set up guest memory regions: {0}")]
    Regions(String),
}

/// One host mapping that backs a guest RAM region; unmapped on drop.
struct HostMapping {
    base: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is plain process memory; the pointer is only used to
// unmap it when the owning GuestRam is dropped.
unsafe impl Send for HostMapping {}
// SAFETY: as above, no interior state is shared.
unsafe impl Sync for HostMapping {}

impl Drop for HostMapping {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` describe a mapping this struct created and
        // nothing else unmaps.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// A guest RAM range: guest-physical start and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    /// Guest-physical start.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
}

/// The guest RAM ranges for `size` bytes: below the MMIO gap, then above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<RamRange> {
    let low = size.min(MMIO_GAP_START);
    let mut v = vec![RamRange {
        start: 0,
        size: low,
    }];
    if size > low {
        v.push(RamRange {
            start: MMIO_GAP_END,
            size: size - low,
        });
    }
    v
}

/// Guest RAM and the host mappings behind it.
pub struct GuestRam {
    // Field order matters: the regions (raw pointers into the mappings) are
    // dropped before the mappings themselves.
    memory: GuestMemoryMmap,
    ranges: Vec<RamRange>,
    _mappings: Vec<HostMapping>,
}

impl GuestRam {
    /// Maps `size` bytes of guest RAM, on transparent huge pages if `huge`
    /// (else on 4 KiB pages only). `phys_bits` bounds the guest-physical
    /// address space.
    pub fn new(size: u64, phys_bits: u32, huge: bool) -> Result<Self, MemoryError> {
        let ranges = ram_ranges(size);
        let top = ranges.last().map(|r| r.start + r.size).unwrap_or(0);
        if phys_bits < 64 && top > (1u64 << phys_bits) {
            return Err(MemoryError::TooLarge { size, phys_bits });
        }
        let mut mappings = Vec::new();
        let mut regions = Vec::new();
        for r in &ranges {
            let len =
                usize::try_from(r.size).map_err(|_| MemoryError::TooLarge { size, phys_bits })?;
            let (mapping, aligned) =
                map_aligned(len, huge).map_err(|source| MemoryError::Mmap { size, source })?;
            mappings.push(mapping);
            let prot = libc::PROT_READ | libc::PROT_WRITE;
            let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
            // SAFETY: `aligned..aligned+len` lies inside the mapping just
            // created, which lives as long as this GuestRam.
            let region = unsafe { MmapRegion::build_raw(aligned, len, prot, flags) }
                .map_err(|e| MemoryError::Regions(e.to_string()))?;
            let region = GuestRegionMmap::new(region, GuestAddress(r.start))
                .ok_or_else(|| MemoryError::Regions("region wraps the address space".into()))?;
            regions.push(region);
        }
        let memory = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| MemoryError::Regions(e.to_string()))?;
        Ok(Self {
            memory,
            ranges,
            _mappings: mappings,
        })
    }

    /// The guest memory object for loaders and devices.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The guest-physical RAM ranges.
    pub fn ranges(&self) -> &[RamRange] {
        &self.ranges
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.ranges.iter().map(|r| r.size).sum()
    }
}

/// Maps `len` bytes at a 2 MiB-aligned address (so THP can back all of it)
/// and asks for huge pages, or with `huge` false, for none.
fn map_aligned(len: usize, huge: bool) -> std::io::Result<(HostMapping, *mut u8)> {
    let align = HUGE_PAGE_SIZE as usize;
    let total = len
        .checked_add(align)
        .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
    // SAFETY: a fresh anonymous mapping with no address hint; checked below.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let mapping = HostMapping { base, len: total };
    let aligned = (base as usize).next_multiple_of(align) as *mut u8;
    if !huge {
        // SAFETY: the range lies inside the mapping; the advice only keeps
        // THP away from it.
        unsafe { libc::madvise(aligned.cast(), len, libc::MADV_NOHUGEPAGE) };
        return Ok((mapping, aligned));
    }
    // SAFETY: the range lies inside the mapping; MADV_HUGEPAGE is advisory.
    let rc = unsafe { libc::madvise(aligned.cast(), len, libc::MADV_HUGEPAGE) };
    if rc != 0 {
        tracing::warn!(
            "MADV_HUGEPAGE refused ({}); guest memory uses 4 KiB pages",
            std::io::Error::last_os_error()
        );
    }
    Ok((mapping, aligned))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn layout_splits_around_the_mmio_gap() {
        assert_eq!(
            ram_ranges(1 << 30),
            vec![RamRange {
                start: 0,
                size: 1 << 30
            }]
        );
        assert_eq!(
            ram_ranges(4 << 30),
            vec![
                RamRange {
                    start: 0,
                    size: 3 << 30
                },
                RamRange {
                    start: 4 << 30,
                    size: 1 << 30
                }
            ]
        );
    }

    #[test]
    fn ram_is_aligned_and_usable() {
        let ram = GuestRam::new(64 << 20, 40, true).unwrap();
        assert_eq!(ram.size(), 64 << 20);
        let r = ram.memory().iter().next().unwrap();
        assert_eq!(r.as_ptr() as usize % (2 << 20), 0);
        ram.memory()
            .write_obj(0xdead_beefu32, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            ram.memory().read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
    }

    #[test]
    fn too_large_for_phys_bits() {
        assert!(matches!(
            GuestRam::new(1 << 40, 36, true),
            Err(MemoryError::TooLarge { .. })
        ));
    }
}
