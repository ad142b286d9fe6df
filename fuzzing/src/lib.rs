//! A bounded fuzz driver for unit tests: runs a harness on seeded random
//! bytes through `arbitrary::Unstructured`, so the suite's fuzz tests are
//! quick, repeatable and can run for as long as one wants:
//!
//! - `SNAPVM_FUZZ_ITERS=N` sets the executions per target (the default is
//!   each test's own, a few hundred to a few thousand);
//! - `SNAPVM_FUZZ_SEED=S` sets the seed (default fixed, so CI runs the same
//!   inputs every time; a long run should set a new one).
//!
//! A harness that panics fails the test with the seed and the execution
//! number printed, which replay it. Written as a small driver rather than
//! with cargo-fuzz because it must run on stable Rust inside `cargo test`.

pub use arbitrary::{Arbitrary, Result, Unstructured};

/// The default seed.
pub const SEED: u64 = 0x5eed_5eed;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

fn env_u64(key: &str) -> Option<u64> {
    std::env::var(key).ok()?.parse().ok()
}

/// Runs `harness` `iters` times (or `$SNAPVM_FUZZ_ITERS`) on `bytes` random
/// bytes each; returns the number of executions.
pub fn run(
    name: &str,
    iters: u64,
    bytes: usize,
    mut harness: impl FnMut(&mut Unstructured<'_>) -> Result<()>,
) -> u64 {
    let iters = env_u64("SNAPVM_FUZZ_ITERS").unwrap_or(iters);
    let seed = env_u64("SNAPVM_FUZZ_SEED").unwrap_or(SEED) | 1;
    let mut rng = Rng(seed);
    let mut buf = vec![0u8; bytes];
    let mut slowest = std::time::Duration::ZERO;
    for i in 0..iters {
        rng.fill(&mut buf);
        let started = std::time::Instant::now();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut u = Unstructured::new(&buf);
            // Running out of bytes ends an input early; that is fine.
            let _ = harness(&mut u);
        }));
        if let Err(p) = outcome {
            eprintln!("fuzz {name}: execution {i} of seed {seed} panicked (SNAPVM_FUZZ_SEED={seed} replays it)");
            std::panic::resume_unwind(p);
        }
        slowest = slowest.max(started.elapsed());
    }
    // The slowest execution is printed, not asserted (shared, noisy
    // machines); a hang shows as a test that does not end.
    eprintln!("fuzz {name}: {iters} executions, seed {seed}, slowest {slowest:?}");
    iters
}

/// `valid` with a few bytes changed, cut or extended as `u` says: inputs
/// close to what a parser accepts reach further into it than noise.
pub fn mutate(valid: &[u8], u: &mut Unstructured<'_>) -> Result<Vec<u8>> {
    let mut v = valid.to_vec();
    let edits = u.int_in_range(1..=8)?;
    for _ in 0..edits {
        match u.int_in_range(0..=4)? {
            0 if !v.is_empty() => {
                let i = u.choose_index(v.len())?;
                v[i] = u.arbitrary()?;
            }
            1 if !v.is_empty() => {
                let i = u.choose_index(v.len())?;
                v[i] ^= 1 << u.int_in_range(0..=7)?;
            }
            2 => {
                let n = u.choose_index(v.len() + 1)?;
                v.truncate(n);
            }
            3 => {
                let extra: Vec<u8> = u.arbitrary()?;
                v.extend(extra);
            }
            _ if v.len() >= 8 => {
                // An interesting integer at a random aligned place.
                let i = u.choose_index(v.len() / 8)? * 8;
                let x: u64 = *u.choose(&[0, 1, u64::MAX, u32::MAX as u64, 1 << 63, 4096])?;
                v[i..i + 8].copy_from_slice(&x.to_le_bytes());
            }
            _ => {}
        }
    }
    Ok(v)
}

/// A guest-physical address for device fuzzing in a guest memory of
/// `mem` bytes at 0: inside it, at its end (the last bytes and just past
/// them), or anywhere in the 64-bit space.
pub fn guest_addr(u: &mut Unstructured<'_>, mem: u64) -> Result<u64> {
    Ok(match u.int_in_range(0..=2)? {
        0 => u.int_in_range(0..=mem - 1)?,
        1 => mem - u.int_in_range(0..=64)?,
        _ => u.arbitrary()?,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_same_seed_gives_the_same_inputs() {
        let mut a = Vec::new();
        super::run("a", 3, 16, |u| {
            a.push(u.arbitrary::<u64>()?);
            Ok(())
        });
        let mut b = Vec::new();
        super::run("b", 3, 16, |u| {
            b.push(u.arbitrary::<u64>()?);
            Ok(())
        });
        assert_eq!(a, b);
        assert_ne!(a[0], a[1]);
    }
}
