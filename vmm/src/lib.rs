//! snapvm's virtual machine monitor: KVM VMs and vCPUs, guest memory, boot,
//! and the `snapvm` command line.

pub mod bench;
pub mod block;
pub mod boot;
pub mod config;
pub mod cpuid;
pub mod layout;
pub mod memory;
pub mod run;
pub mod vcpu;
pub mod vm;
