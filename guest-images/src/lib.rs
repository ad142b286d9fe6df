//! The guests used by snapvm's tests, demos and benchmarks.
//!
//! The test guest is built by this crate's build script; see
//! `guest-images/README.md` for its command line and serial protocol.

/// Absolute path of the built test guest (an x86-64 ELF with a PVH note).
pub const TESTGUEST_ELF: &str = env!("SNAPVM_TESTGUEST_ELF");

/// Returns the path of the built test guest.
pub fn testguest_path() -> &'static std::path::Path {
    std::path::Path::new(TESTGUEST_ELF)
}
