//! A paused machine's saved state, everything but guest memory: what a
//! snapshot's state.bin holds. It is the list of the machine's component
//! states ([`devices::persist`]) plus the guest RAM layout.
//!
//! state.bin versions (docs/formats.md): 1 had a fixed record (vCPUs, VM
//! state, serial port, disks); 2 has the component list. Version 1 files
//! are converted on reading, so snapshots of every release keep loading.

use std::path::Path;

use devices::i8042::I8042;
use devices::persist::{encode_all, ComponentState, Persist, SavedState, StateError};
use devices::serial::SerialDevice;
use devices::virtio::mmio::MmioTransport;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use snapshot::state_file::{self, StateFileError};

use super::irqchip::Irqchip;
use super::kvmclock::KvmClock;
use super::pit::Pit;
use super::vcpu::state::Vcpus;

/// The state.bin format this build writes (and the newest it reads).
pub const STATE_VERSION: u32 = 2;

/// Component ids of the machine, in the order it saves and restores them
/// (disks follow as "disk0", "disk1", ..., then network adapters as
/// "net0", ...).
pub mod ids {
    /// All vCPUs.
    pub const VCPUS: &str = "vcpus";
    /// The in-kernel PIT.
    pub const PIT: &str = "pit";
    /// The in-kernel PICs and IOAPIC.
    pub const IRQCHIP: &str = "irqchip";
    /// kvmclock.
    pub const KVMCLOCK: &str = "kvmclock";
    /// COM1.
    pub const SERIAL: &str = "serial0";
    /// The i8042 (reset line).
    pub const I8042: &str = "i8042";

    /// The virtio-blk transport of disk `i`.
    pub fn disk(i: usize) -> String {
        format!("disk{i}")
    }

    /// The virtio-net transport of network adapter `i`.
    pub fn net(i: usize) -> String {
        format!("net{i}")
    }
}

/// Everything of a paused machine except guest memory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineState {
    /// Guest RAM layout: (guest-physical start, size) of each region.
    pub memory: Vec<(u64, u64)>,
    /// Each component's state, in the order the machine saved them.
    pub components: Vec<ComponentState>,
}

/// A machine's state as saved in the pause, its components' states not
/// encoded yet.
pub struct SavedMachine {
    /// Guest RAM layout.
    pub memory: Vec<(u64, u64)>,
    /// Each component's state, in save order.
    pub components: Vec<SavedState>,
}

impl SavedMachine {
    /// Encodes every component's state: what state.bin holds.
    pub fn encode(&self) -> Result<MachineState, StateError> {
        Ok(MachineState {
            memory: self.memory.clone(),
            components: encode_all(&self.components)?,
        })
    }
}

/// The fixed record of state.bin format 1, field by field as JSON (each
/// part is handed on to its component unchanged).
#[derive(Deserialize)]
struct MachineStateV1 {
    vcpus: Value,
    vm: VmStateV1,
    serial: Value,
    disks: Vec<Value>,
    memory: Vec<(u64, u64)>,
}

/// Format 1's in-kernel device record, now three components.
#[derive(Deserialize)]
struct VmStateV1 {
    pic_master: Value,
    pic_slave: Value,
    ioapic: Value,
    pit: Value,
    clock: Value,
}

fn component<T: Persist>(id: &str, state: Value) -> ComponentState {
    ComponentState {
        id: id.to_string(),
        kind: T::KIND.to_string(),
        version: 1,
        state,
    }
}

impl From<MachineStateV1> for MachineState {
    fn from(v1: MachineStateV1) -> Self {
        let mut components = vec![
            component::<Vcpus>(ids::VCPUS, v1.vcpus),
            component::<Pit>(ids::PIT, serde_json::json!({ "pit": v1.vm.pit })),
            component::<Irqchip>(
                ids::IRQCHIP,
                serde_json::json!({
                    "pic_master": v1.vm.pic_master,
                    "pic_slave": v1.vm.pic_slave,
                    "ioapic": v1.vm.ioapic,
                }),
            ),
            component::<KvmClock>(ids::KVMCLOCK, serde_json::json!({ "clock": v1.vm.clock })),
            component::<SerialDevice>(ids::SERIAL, v1.serial),
            // Format 1 did not save the i8042, which has no state.
            component::<I8042>(ids::I8042, serde_json::json!({})),
        ];
        for (i, d) in v1.disks.into_iter().enumerate() {
            components.push(component::<MmioTransport>(&ids::disk(i), d));
        }
        Self {
            memory: v1.memory,
            components,
        }
    }
}

impl MachineState {
    /// Writes state.bin (format [`STATE_VERSION`]) atomically.
    pub fn write(&self, path: &Path) -> Result<(), StateFileError> {
        state_file::write(path, STATE_VERSION, self)
    }

    /// Reads state.bin of any format this build knows.
    pub fn read(path: &Path) -> Result<Self, StateFileError> {
        let (version, payload) = state_file::read(path, STATE_VERSION)?;
        match version {
            1 => Ok(state_file::decode::<MachineStateV1>(path, &payload)?.into()),
            _ => state_file::decode(path, &payload),
        }
    }

    /// The saved state of component `id`.
    pub fn component(&self, id: &str) -> Option<&ComponentState> {
        self.components.iter().find(|c| c.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// state.bin damaged anywhere (container header, checksum, JSON, either
    /// format): refused naming the file, or read, never a panic.
    #[test]
    fn fuzz_state_bin() {
        let dir = std::env::temp_dir().join(format!("snapvm-fuzz-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.bin");
        let v2 = MachineState {
            memory: vec![(0, 1 << 25)],
            components: vec![ComponentState {
                id: "serial0".into(),
                kind: "uart-16550a".into(),
                version: 1,
                state: serde_json::json!({"scratch": 7, "in_buffer": [1, 2]}),
            }],
        };
        v2.write(&path).unwrap();
        let valid_v2 = std::fs::read(&path).unwrap();
        let v1 = serde_json::json!({
            "vcpus": [{"regs": 1}], "vm": {"pic_master": 1, "pic_slave": 2, "ioapic": 3, "pit": 4, "clock": 5},
            "serial": {}, "disks": [{}], "memory": [[0, 1024]]
        });
        state_file::write(&path, 1, &v1).unwrap();
        let valid_v1 = std::fs::read(&path).unwrap();
        let json_v2 = serde_json::to_vec(&v2).unwrap();
        let json_v1 = serde_json::to_vec(&v1).unwrap();
        fuzzing::run("state.bin", 3000, 256, |u| {
            let (sample, json, version) = if u.arbitrary()? {
                (&valid_v1, &json_v1, 1)
            } else {
                (&valid_v2, &json_v2, 2)
            };
            if u.arbitrary()? {
                // Damaged bytes: mostly stopped by the container's checks.
                std::fs::write(&path, fuzzing::mutate(sample, u)?).unwrap();
            } else {
                // A sound container around damaged content: reaches the
                // decoders.
                let text = fuzzing::mutate(json, u)?;
                let Ok(value) = serde_json::from_slice::<serde_json::Value>(&text) else {
                    return Ok(());
                };
                state_file::write(&path, version, &value).unwrap();
            }
            if let Err(e) = MachineState::read(&path) {
                assert!(e.to_string().contains("state.bin"), "{e}");
            }
            Ok(())
        });
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A format-1 state.bin (its shape as snapvm ff8343b wrote it, with
    /// small stand-in values) reads as the component list.
    #[test]
    fn format_1_is_read_as_components() {
        let v1 = serde_json::json!({
            "vcpus": [{"regs": 1}, {"regs": 2}],
            "vm": {"pic_master": "m", "pic_slave": "s", "ioapic": "io", "pit": "p", "clock": "c"},
            "serial": {"scratch": 7},
            "disks": [{"status": 15}, {"status": 0}],
            "memory": [[0, 33554432]],
        });
        let path = std::env::temp_dir().join(format!("snapvm-state-v1-{}", std::process::id()));
        state_file::write(&path, 1, &v1).unwrap();
        let m = MachineState::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let ids: Vec<&str> = m.components.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(
            ids,
            ["vcpus", "pit", "irqchip", "kvmclock", "serial0", "i8042", "disk0", "disk1"]
        );
        assert_eq!(m.memory, [(0, 32 << 20)]);
        let c = |id| m.component(id).unwrap();
        assert_eq!(c("vcpus").state[1]["regs"], 2);
        assert_eq!(c("irqchip").state["ioapic"], "io");
        assert_eq!(c("kvmclock").state["clock"], "c");
        assert_eq!(c("serial0").kind, "uart-16550a");
        assert_eq!(c("disk1").state["status"], 0);
        assert_eq!(c("disk1").kind, "virtio-mmio");
        assert!(m.components.iter().all(|c| c.version == 1));
    }

    #[test]
    fn format_2_round_trips_and_newer_formats_are_refused() {
        let m = MachineState {
            memory: vec![(0, 1 << 20)],
            components: vec![component::<I8042>(ids::I8042, serde_json::json!({}))],
        };
        let path = std::env::temp_dir().join(format!("snapvm-state-v2-{}", std::process::id()));
        m.write(&path).unwrap();
        let r = MachineState::read(&path).unwrap();
        assert_eq!(r.components, m.components);
        state_file::write(&path, STATE_VERSION + 1, &m).unwrap();
        let e = MachineState::read(&path).unwrap_err().to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(e.contains("a newer snapvm wrote it"), "{e}");
    }
}
