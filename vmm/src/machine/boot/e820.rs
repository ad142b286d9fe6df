//! The guest's physical memory map (E820 / PVH memmap).

use crate::machine::layout::{EBDA_END, HIMEM_START, MPTABLE_AREA_START};
use crate::machine::memory::RamRange;

/// E820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// E820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// One memory map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// E820 type.
    pub kind: u32,
}

/// Builds the memory map for the given RAM ranges: base memory up to the MP
/// table area, the MP table area reserved, then RAM from 1 MiB.
pub fn memory_map(ranges: &[RamRange]) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: MPTABLE_AREA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: MPTABLE_AREA_START,
            size: EBDA_END - MPTABLE_AREA_START,
            kind: E820_RESERVED,
        },
    ];
    for r in ranges {
        let start = r.start.max(HIMEM_START);
        let end = r.start + r.size;
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::memory::ram_ranges;

    #[test]
    fn map_for_small_and_large_guests() {
        let m = memory_map(&ram_ranges(256 << 20));
        assert_eq!(m.len(), 3);
        assert_eq!(m[2].addr, 1 << 20);
        assert_eq!(m[2].size, (256 << 20) - (1 << 20));
        let m = memory_map(&ram_ranges(5 << 30));
        assert_eq!(m.len(), 4);
        assert_eq!(m[3].addr, 4 << 30);
        assert_eq!(m[3].size, 2 << 30);
        let ram: u64 = m
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert!(ram < 5 << 30 && ram > (5 << 30) - (1 << 20));
    }
}
