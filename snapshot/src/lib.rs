//! The snapvm snapshot engine, independent of KVM where possible.
//!
//! So far: guest-memory write tracking with userfaultfd write-protect
//! ([`write_protect`]), registered when a VM is created so that live
//! snapshots can protect memory without re-registering it.

pub mod atomic_file;
pub mod disk;
pub mod live;
pub mod memory_file;
pub mod state_file;
pub mod tree;
pub mod write_protect;
