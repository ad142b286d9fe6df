//! snapvm's virtual machine monitor: KVM VMs and vCPUs, guest memory, boot,
//! and the `snapvm` command line.

pub mod api_client;
pub mod api_server;
pub mod backend_quirks;
pub mod bench;
pub mod block;
pub mod boot;
pub mod config;
pub mod console;
pub mod cpuid;
pub mod daemon;
pub mod jobs;
pub mod layout;
pub mod lifecycle;
pub mod memory;
pub mod merges;
pub mod run;
pub mod snapshots;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
pub mod vm_state;
pub mod vmdir;
