//! The Intel MultiProcessor Specification 1.4 table, so guests without ACPI
//! (Linux configured for a microVM, the test guest) find their vCPUs, the
//! IOAPIC and the ISA interrupt routing.
//!
//! Written by hand: no maintained crate builds MP tables (the VMMs that have
//! one keep it inside their own tree), and the format is a few fixed-size
//! little-endian records.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::BootError;
use crate::machine::layout::{APIC_START, IOAPIC_START, MPTABLE_AREA_START, MPTABLE_FP_START};

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// Number of IOAPIC pins (KVM's in-kernel IOAPIC).
pub const IOAPIC_PINS: u8 = 24;
const CPU_FLAG_ENABLED: u8 = 1;
const CPU_FLAG_BSP: u8 = 2;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IOINT: u8 = 3;
const ENTRY_LINT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the configuration table (header and entries) for `cpus` vCPUs,
/// addressed at `table_addr`.
pub fn config_table(cpus: u8) -> Vec<u8> {
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let mut e = [0u8; 20];
        e[0] = ENTRY_PROCESSOR;
        e[1] = id;
        e[2] = APIC_VERSION;
        e[3] = CPU_FLAG_ENABLED | if id == 0 { CPU_FLAG_BSP } else { 0 };
        e[4..8].copy_from_slice(&0x600u32.to_le_bytes()); // family 6
        e[8..12].copy_from_slice(&0x201u32.to_le_bytes()); // FPU | APIC
        entries.extend_from_slice(&e);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    count += 1;
    let ioapic_id = cpus; // first id after the local APICs
    let mut e = [ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1, 0, 0, 0, 0];
    e[4..8].copy_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    entries.extend_from_slice(&e);
    count += 1;
    for pin in 0..IOAPIC_PINS {
        // ISA IRQ n is wired to IOAPIC pin n (IRQ0 too: KVM's PIT feeds pin 2
        // through the override Linux applies itself for MP tables).
        entries.extend_from_slice(&[ENTRY_IOINT, INT_TYPE_INT, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    // LINT0 = ExtINT, LINT1 = NMI on every local APIC (0xff).
    entries.extend_from_slice(&[ENTRY_LINT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LINT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let len = 44 + entries.len();
    let mut t = vec![0u8; 44];
    t[0..4].copy_from_slice(b"PCMP");
    t[4..6].copy_from_slice(&(len as u16).to_le_bytes());
    t[6] = 4; // spec revision 1.4
    t[8..16].copy_from_slice(b"SNAPVM  ");
    t[16..28].copy_from_slice(b"000000000000");
    t[34..36].copy_from_slice(&count.to_le_bytes());
    t[36..40].copy_from_slice(&(APIC_START as u32).to_le_bytes());
    t.extend_from_slice(&entries);
    t[7] = checksum(&t);
    t
}

/// The 16-byte floating pointer structure pointing at `table_addr`.
pub fn floating_pointer(table_addr: u32) -> [u8; 16] {
    let mut fp = [0u8; 16];
    fp[0..4].copy_from_slice(b"_MP_");
    fp[4..8].copy_from_slice(&table_addr.to_le_bytes());
    fp[8] = 1; // length in 16-byte units
    fp[9] = 4; // spec revision 1.4
    fp[10] = checksum(&fp);
    fp
}

/// Writes the MP table for `cpus` vCPUs into guest memory.
pub fn setup_mptable(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), BootError> {
    let table = config_table(cpus);
    if MPTABLE_AREA_START + table.len() as u64 > MPTABLE_FP_START {
        return Err(BootError::MpTableTooLarge(cpus));
    }
    let werr = |e: vm_memory::GuestMemoryError| BootError::GuestWrite {
        what: "MP table",
        message: e.to_string(),
    };
    mem.write_slice(&table, GuestAddress(MPTABLE_AREA_START))
        .map_err(werr)?;
    mem.write_slice(
        &floating_pointer(MPTABLE_AREA_START as u32),
        GuestAddress(MPTABLE_FP_START),
    )
    .map_err(werr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts() {
        for cpus in [1u8, 2, 64, 254] {
            let t = config_table(cpus);
            assert_eq!(sum(&t), 0);
            assert_eq!(u16::from_le_bytes([t[4], t[5]]) as usize, t.len());
            let n = u16::from_le_bytes([t[34], t[35]]) as usize;
            assert_eq!(n, cpus as usize + 2 + IOAPIC_PINS as usize + 2);
            // Processor entries come first, enabled, BSP flag only on 0.
            for id in 0..cpus as usize {
                let e = &t[44 + id * 20..44 + id * 20 + 20];
                assert_eq!(e[0], 0);
                assert_eq!(e[1] as usize, id);
                assert_eq!(e[3] & 2 != 0, id == 0);
            }
        }
        assert_eq!(sum(&floating_pointer(0x9c000)), 0);
    }

    #[test]
    fn fits_its_area_for_the_largest_vm() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        setup_mptable(&mem, 254).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(MPTABLE_FP_START))
            .unwrap();
        assert_eq!(&sig, b"_MP_");
    }
}
