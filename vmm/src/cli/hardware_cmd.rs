//! `snapvm config` and `snapvm disk attach|detach`: showing and changing a
//! VM's hardware (daemon/hardware.rs does the work, under the VM's lock).

use std::path::Path;

use super::args::ConfigArgs;
use crate::daemon::hardware::{self, Attach, ConfigChange, Hardware, HardwareError};
use crate::vmdir::{VmDir, VmDirError};

/// Errors of the hardware commands.
#[derive(Debug, thiserror::Error)]
pub enum HardwareCmdError {
    /// The VM directory is unusable.
    #[error(transparent)]
    VmDir(#[from] VmDirError),
    /// The change was refused.
    #[error(transparent)]
    Hardware(#[from] HardwareError),
    /// A value does not parse.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// The hardware as text, a line each.
pub fn render(h: &Hardware) -> String {
    let mut s = format!(
        "memory: {} ({} MiB)\nvcpus: {}\nkernel: {}\ninitrd: {}\ncmdline: {}\n",
        h.memory,
        h.memory_bytes >> 20,
        h.vcpus,
        h.kernel.display(),
        h.initrd
            .as_ref()
            .map_or("none".to_string(), |p| p.display().to_string()),
        h.cmdline
    );
    if h.disks.is_empty() {
        s += "disks: none\n";
    }
    for n in &h.nets {
        s += &format!("net {}: tap {}, MAC {}\n", n.name, n.tap, n.mac);
    }
    for d in &h.disks {
        let mut flags = Vec::new();
        if d.readonly {
            flags.push("read-only");
        }
        if d.independent {
            flags.push("independent: not captured by snapshots");
        }
        let flags = if flags.is_empty() {
            String::new()
        } else {
            format!(" ({})", flags.join(", "))
        };
        s += &format!("disk {}: {}{flags}\n", d.name, d.file.display());
    }
    s
}

/// `snapvm config`: shows the hardware, or changes it.
pub fn config(a: ConfigArgs) -> Result<(), HardwareCmdError> {
    let dir = VmDir::open(&a.vmdir)?;
    let change = ConfigChange {
        memory: a.memory,
        vcpus: a.vcpus,
        cmdline: a.cmdline,
        kernel: a.kernel,
        initrd: a.initrd,
        no_initrd: a.no_initrd,
        link: a.link,
    };
    let t = if change.is_empty() {
        dir.load()?
    } else {
        let t = hardware::change_config(&dir, &change)?;
        if !a.json {
            println!("changed the configuration of {}", dir.root().display());
        }
        t
    };
    let h = Hardware::from(&t);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&h).unwrap_or_default());
    } else {
        print!("{}", render(&h));
    }
    Ok(())
}

/// `snapvm disk attach`.
pub fn attach(vmdir: &Path, a: Attach) -> Result<(), HardwareCmdError> {
    let dir = VmDir::open(vmdir)?;
    let d = hardware::attach_disk(&dir, &a)?;
    println!(
        "attached {} as disk {}{}{}",
        d.current.display(),
        d.name,
        if d.readonly { ", read-only" } else { "" },
        if d.independent {
            ", independent (never captured nor rewound by snapshots)"
        } else {
            ""
        }
    );
    Ok(())
}

/// `snapvm net attach`.
pub fn attach_net(vmdir: &Path, tap: &str, mac: Option<&str>) -> Result<(), HardwareCmdError> {
    let dir = VmDir::open(vmdir)?;
    let mac = mac.map(crate::config::parse_mac).transpose()?;
    let n = hardware::attach_net(&dir, tap, mac)?;
    println!(
        "attached network adapter {} on tap {} with MAC {}",
        n.name, n.tap, n.mac
    );
    Ok(())
}

/// `snapvm net detach`.
pub fn detach_net(vmdir: &Path, name: &str) -> Result<(), HardwareCmdError> {
    let dir = VmDir::open(vmdir)?;
    let n = hardware::detach_net(&dir, name)?;
    println!("detached network adapter {} (tap {})", n.name, n.tap);
    Ok(())
}

/// `snapvm disk detach`.
pub fn detach(vmdir: &Path, name: &str) -> Result<(), HardwareCmdError> {
    let dir = VmDir::open(vmdir)?;
    let d = hardware::detach_disk(&dir, name)?;
    println!(
        "detached disk {}; its file {} stays (attach it again with `snapvm disk attach {} {}`)",
        d.name,
        d.current.display(),
        dir.root().display(),
        dir.resolve(&d.current).display()
    );
    Ok(())
}
