//! The KVM machine: the VM and its vCPUs, guest memory, boot, CPUID, the
//! devices wired to it, and the state of its components. Capture (the
//! pause window of a live snapshot) and apply (the one restore path) are
//! two symmetrical methods on [`vm::Vm`].

pub mod apply;
pub mod backend_quirks;
pub mod boot;
pub mod capture;
pub mod cpuid;
pub mod disk_backend;
pub mod irqchip;
pub mod kvmclock;
pub mod layout;
pub mod memory;
pub mod outcome;
pub mod pit;
pub mod state;
pub mod tap_pool;
pub mod vcpu;
pub mod vm;
mod vm_devices;
