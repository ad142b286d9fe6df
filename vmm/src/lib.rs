//! snapvm's virtual machine monitor, in three layers (docs/architecture.md):
//!
//! - [`cli`]: the `snapvm` command line: commands, rendering, the API client;
//! - [`daemon`]: the VMM process of a VM directory: API server, jobs, the
//!   session that owns the VM, snapshot orchestration, merges;
//! - [`machine`]: the KVM machine: VM and vCPUs, guest memory, boot, CPUID,
//!   and the state of its components.
//!
//! Data flows one way, from the command line to the files. Shared by all
//! layers: the VM directory ([`vmdir`]) and its configuration ([`config`]).
//! Benchmarks are in [`bench`]; [`ui`] is `snapvm ui`, a web view of the
//! VMs of a directory over the command line's functions.

pub mod api;
pub mod bench;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod hooks;
pub mod machine;
pub mod ui;
pub mod vmdir;
