//! Device models for snapvm.
//!
//! Every device sits on a [`bus::Bus`] (port I/O or MMIO) and is driven from
//! vCPU threads or the VMM's event loop. Devices know nothing about snapshots
//! beyond saving and restoring their own state ([`persist::Persist`], the
//! one state interface every component implements) and quiescing.

pub mod bus;
pub mod debug_exit;
pub mod exit;
pub mod generation;
pub mod i8042;
pub mod irq;
pub mod persist;
pub mod serial;
pub mod virtio;
pub mod worker;
