//! The VM generation: a 128-bit value the guest reads from I/O ports
//! 0x540-0x54f (four little-endian 32-bit words, least significant first)
//! and that changes whenever the guest's memory goes on in another
//! context: after a snapshot is applied (in place or by `start --from`) and
//! in every clone. Software in the guest that must not repeat itself (random
//! number state, unique ids, leases) polls it, the role ACPI's VM Generation
//! ID plays on other machines (snapvm's guests have no ACPI).
//!
//! The value is identity, not guest state: a snapshot does not save it, a
//! restore sets a new one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::bus::BusDevice;

/// First port of the generation device.
/// (0x510, where the guest might look first, is QEMU's fw_cfg.)
pub const GENERATION_PORT: u16 = 0x540;
/// Ports it occupies.
pub const GENERATION_PORT_LEN: u64 = 16;

/// The current generation, shared by the device and the VMM that changes it.
#[derive(Debug, Default)]
pub struct Generation {
    words: [AtomicU64; 2],
}

impl Generation {
    /// A new, random generation.
    pub fn new() -> Arc<Self> {
        let g = Arc::new(Self::default());
        g.renew();
        g
    }

    /// Sets a new random value.
    pub fn renew(&self) {
        let v = uuid::Uuid::new_v4().as_u128();
        self.set(v);
    }

    /// Sets `v`.
    pub fn set(&self, v: u128) {
        self.words[0].store(v as u64, Ordering::SeqCst);
        self.words[1].store((v >> 64) as u64, Ordering::SeqCst);
    }

    /// The current value.
    pub fn get(&self) -> u128 {
        u128::from(self.words[0].load(Ordering::SeqCst))
            | (u128::from(self.words[1].load(Ordering::SeqCst)) << 64)
    }
}

/// The port device reading [`Generation`].
pub struct GenerationDevice {
    generation: Arc<Generation>,
}

impl GenerationDevice {
    /// A device showing `generation`.
    pub fn new(generation: Arc<Generation>) -> Self {
        Self { generation }
    }
}

impl BusDevice for GenerationDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let bytes = self.generation.get().to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| bytes.get(o + i))
                .copied()
                .unwrap_or(0xff);
        }
    }

    /// Read-only: writes are ignored.
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_reads_the_value_in_words_and_bytes() {
        let g = Generation::new();
        g.set(0x0f0e0d0c_0b0a0908_07060504_03020100);
        let mut d = GenerationDevice::new(g.clone());
        let mut w = [0u8; 4];
        d.read(4, &mut w);
        assert_eq!(u32::from_le_bytes(w), 0x07060504);
        let mut b = [0u8; 1];
        d.read(15, &mut b);
        assert_eq!(b[0], 0x0f);
        // Past the end (a 4-byte read at 14): what is not there reads as 0xff.
        d.read(14, &mut w);
        assert_eq!(w, [0x0e, 0x0f, 0xff, 0xff]);
        d.write(0, &[1, 2, 3, 4]);
        let before = g.get();
        g.renew();
        assert_ne!(g.get(), before, "a renewal changes the value");
    }
}
