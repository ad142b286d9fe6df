//! Changing a VM's virtual hardware: memory, vCPUs, kernel, initrd, command
//! line, disks. Like Hyper-V, only while the VM is off (the change is made
//! under the VM's lock, so a start waits for it); a snapshot keeps a copy of
//! the hardware and an apply brings it back (daemon/snapshots/restore.rs).

use std::path::{Path, PathBuf};

use serde::Serialize;
use snapshot::disk::DiskError;

use super::lock::lock_stopped;
use super::DaemonError;
use crate::config::{mac_text, parse_size, random_mac, MAX_DEVICES, MAX_DISKS};
use crate::vmdir::{DiskEntry, NetEntry, VmDir, VmDirError, VmToml};

/// Errors changing hardware; each names the value or file.
#[derive(Debug, thiserror::Error)]
pub enum HardwareError {
    /// The VM runs.
    #[error("VM {dir} is running: its hardware can only be changed while it is off (`snapvm stop {dir}` first)")]
    Running {
        /// The VM directory.
        dir: String,
    },
    /// The VM's lock could not be taken for another reason.
    #[error(transparent)]
    Lock(DaemonError),
    /// vm.toml is unusable, or the change makes it invalid.
    #[error(transparent)]
    VmDir(#[from] VmDirError),
    /// No disk of that name.
    #[error("VM {dir} has no disk '{name}' (its disks: {})", if known.is_empty() { "none".to_string() } else { known.join(", ") })]
    NoSuchDisk {
        /// The VM directory.
        dir: String,
        /// The name given.
        name: String,
        /// The names it has.
        known: Vec<String>,
    },
    /// The file is attached already.
    #[error("{path} is already attached as disk {disk}")]
    AlreadyAttached {
        /// The file.
        path: PathBuf,
        /// Its disk.
        disk: String,
    },
    /// The name is taken or malformed.
    #[error("disk name '{0}' is taken or invalid: use letters, digits, - and _, unique in the VM")]
    BadName(String),
    /// No room for another disk.
    #[error("VM {0} already has {MAX_DISKS} disks, the most it can have")]
    TooManyDisks(String),
    /// No room for another device.
    #[error("VM {0} already has {MAX_DEVICES} devices (disks and network adapters), the most it can have")]
    TooManyDevices(String),
    /// No network adapter of that name.
    #[error("VM {dir} has no network adapter '{name}' (its adapters: {})", if known.is_empty() { "none".to_string() } else { known.join(", ") })]
    NoSuchNet {
        /// The VM directory.
        dir: String,
        /// The name given.
        name: String,
        /// The names it has.
        known: Vec<String>,
    },
    /// Another adapter of the VM uses the tap.
    #[error("tap {tap} is already used by network adapter {net}")]
    TapInUse {
        /// The tap.
        tap: String,
        /// The adapter.
        net: String,
    },
    /// The image is unusable.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// An image with a backing chain outside the VM directory, not linked.
    #[error("{0} has a backing chain; flatten it (qemu-img convert) or attach it with --link")]
    Chain(PathBuf),
    /// An independent disk must be one image.
    #[error("{0} has a backing chain; an independent disk must be a single image (flatten it with qemu-img convert)")]
    IndependentChain(PathBuf),
    /// A file could not be copied into the VM directory.
    #[error("cannot copy {path} into the VM directory: {source}")]
    Copy {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A VM's hardware, as `snapvm config` and `snapshot show` present it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hardware {
    /// Guest memory as written in vm.toml (e.g. "512M").
    pub memory: String,
    /// Guest memory in bytes.
    pub memory_bytes: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initrd.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Disks in guest order.
    pub disks: Vec<HardwareDisk>,
    /// Network adapters in guest order.
    pub nets: Vec<HardwareNet>,
}

/// One network adapter of [`Hardware`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HardwareNet {
    /// Name.
    pub name: String,
    /// The host's TAP device.
    pub tap: String,
    /// MAC address.
    pub mac: String,
}

/// One disk of [`Hardware`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HardwareDisk {
    /// Name.
    pub name: String,
    /// The file the VM writes (its working layer, or an independent disk's
    /// own file), relative to the VM directory unless linked.
    pub file: PathBuf,
    /// Read-only for the guest.
    pub readonly: bool,
    /// Never forked nor rewound by snapshots.
    pub independent: bool,
}

impl From<&VmToml> for Hardware {
    fn from(t: &VmToml) -> Self {
        Self {
            memory: t.memory.clone(),
            memory_bytes: parse_size(&t.memory).unwrap_or(0),
            vcpus: t.vcpus,
            kernel: t.kernel.clone(),
            initrd: t.initrd.clone(),
            cmdline: t.cmdline.clone(),
            disks: t
                .disks
                .iter()
                .map(|d| HardwareDisk {
                    name: d.name.clone(),
                    file: d.current.clone(),
                    readonly: d.readonly,
                    independent: d.independent,
                })
                .collect(),
            nets: t
                .nets
                .iter()
                .map(|n| HardwareNet {
                    name: n.name.clone(),
                    tap: n.tap.clone(),
                    mac: n.mac.clone(),
                })
                .collect(),
        }
    }
}

impl Hardware {
    /// What differs in `now` from `self`, a line each ("memory: 512M, now
    /// 1G"); empty when nothing does. Working layers differ by design and
    /// are not compared.
    pub fn differences(&self, now: &Hardware) -> Vec<String> {
        let mut d = Vec::new();
        if self.memory_bytes != now.memory_bytes {
            d.push(format!("memory: {}, now {}", self.memory, now.memory));
        }
        if self.vcpus != now.vcpus {
            d.push(format!("vCPUs: {}, now {}", self.vcpus, now.vcpus));
        }
        if self.kernel != now.kernel {
            d.push(format!(
                "kernel: {}, now {}",
                self.kernel.display(),
                now.kernel.display()
            ));
        }
        if self.initrd != now.initrd {
            let show = |i: &Option<PathBuf>| {
                i.as_ref()
                    .map_or("none".to_string(), |p| p.display().to_string())
            };
            d.push(format!(
                "initrd: {}, now {}",
                show(&self.initrd),
                show(&now.initrd)
            ));
        }
        if self.cmdline != now.cmdline {
            d.push(format!(
                "command line: \"{}\", now \"{}\"",
                self.cmdline, now.cmdline
            ));
        }
        for disk in &self.disks {
            match now.disks.iter().find(|n| n.name == disk.name) {
                None => d.push(format!("disk {}: attached here, detached now", disk.name)),
                Some(n) if n.readonly != disk.readonly || n.independent != disk.independent => d
                    .push(format!(
                        "disk {}: {}, now {}",
                        disk.name,
                        disk.kind(),
                        n.kind()
                    )),
                Some(_) => {}
            }
        }
        for n in &now.disks {
            if self.disks.iter().all(|disk| disk.name != n.name) {
                d.push(format!("disk {}: not attached here, attached now", n.name));
            }
        }
        for net in &self.nets {
            match now.nets.iter().find(|n| n.name == net.name) {
                None => d.push(format!(
                    "network adapter {}: attached here, detached now",
                    net.name
                )),
                Some(n) if n.tap != net.tap || !n.mac.eq_ignore_ascii_case(&net.mac) => {
                    d.push(format!(
                        "network adapter {}: tap {} MAC {}, now tap {} MAC {}",
                        net.name, net.tap, net.mac, n.tap, n.mac
                    ))
                }
                Some(_) => {}
            }
        }
        for n in &now.nets {
            if self.nets.iter().all(|net| net.name != n.name) {
                d.push(format!(
                    "network adapter {}: not attached here, attached now",
                    n.name
                ));
            }
        }
        d
    }
}

impl HardwareDisk {
    fn kind(&self) -> &'static str {
        match (self.independent, self.readonly) {
            (true, true) => "independent, read-only",
            (true, false) => "independent",
            (false, true) => "read-only",
            (false, false) => "read-write",
        }
    }
}

/// What `snapvm config` changes (None: unchanged).
#[derive(Debug, Clone, Default)]
pub struct ConfigChange {
    /// Guest memory, e.g. "1G".
    pub memory: Option<String>,
    /// vCPUs.
    pub vcpus: Option<u8>,
    /// Kernel command line.
    pub cmdline: Option<String>,
    /// Kernel image (copied into kernel/ unless `link`).
    pub kernel: Option<PathBuf>,
    /// Initrd (copied into kernel/ unless `link`).
    pub initrd: Option<PathBuf>,
    /// Boot without an initrd.
    pub no_initrd: bool,
    /// Reference kernel and initrd in place instead of copying them.
    pub link: bool,
}

impl ConfigChange {
    /// Whether it changes anything.
    pub fn is_empty(&self) -> bool {
        self.memory.is_none()
            && self.vcpus.is_none()
            && self.cmdline.is_none()
            && self.kernel.is_none()
            && self.initrd.is_none()
            && !self.no_initrd
    }
}

/// Takes the lock of a VM that must be off.
fn lock_off(dir: &VmDir) -> Result<std::fs::File, HardwareError> {
    lock_stopped(dir).map_err(|e| match e {
        DaemonError::AlreadyRunning { dir, .. } => HardwareError::Running { dir },
        e => HardwareError::Lock(e),
    })
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into())
}

/// Places `src` in the VM directory's `into` folder as `name` (or, with
/// `link` or when it lies inside the VM directory already, references it
/// where it is); returns the path vm.toml stores.
fn place(
    dir: &VmDir,
    src: &Path,
    into: &Path,
    name: &str,
    link: bool,
) -> Result<PathBuf, HardwareError> {
    let abs = std::fs::canonicalize(src).map_err(|source| HardwareError::Copy {
        path: src.to_path_buf(),
        source,
    })?;
    if abs.starts_with(dir.root()) {
        return Ok(dir.relative(&abs));
    }
    if link {
        return Ok(abs);
    }
    std::fs::create_dir_all(into).map_err(|source| HardwareError::Copy {
        path: src.to_path_buf(),
        source,
    })?;
    let dst = into.join(name);
    std::fs::copy(&abs, &dst).map_err(|source| HardwareError::Copy {
        path: src.to_path_buf(),
        source,
    })?;
    Ok(dir.relative(&dst))
}

/// Changes the configuration of the VM in `dir`, which must be off; every
/// value is checked (as `create` checks them) before anything is written.
pub fn change_config(dir: &VmDir, change: &ConfigChange) -> Result<VmToml, HardwareError> {
    let _lock = lock_off(dir)?;
    let mut t = dir.load()?;
    if let Some(m) = &change.memory {
        t.memory = m.clone();
    }
    if let Some(v) = change.vcpus {
        t.vcpus = v;
    }
    if let Some(c) = &change.cmdline {
        t.cmdline = c.clone();
    }
    // Checked where they are first, copied in only once all is well.
    if let Some(k) = &change.kernel {
        t.kernel = std::fs::canonicalize(k).unwrap_or_else(|_| k.clone());
    }
    if change.no_initrd {
        t.initrd = None;
    }
    if let Some(i) = &change.initrd {
        t.initrd = Some(std::fs::canonicalize(i).unwrap_or_else(|_| i.clone()));
    }
    dir.validate(&t)?;
    if let Some(k) = &change.kernel {
        t.kernel = place(dir, k, &dir.kernel_dir(), &file_name(k), change.link)?;
    }
    if let Some(i) = &change.initrd {
        t.initrd = Some(place(
            dir,
            i,
            &dir.kernel_dir(),
            &file_name(i),
            change.link,
        )?);
    }
    dir.save(&t)?;
    Ok(t)
}

/// What `snapvm disk attach` attaches.
#[derive(Debug, Clone)]
pub struct Attach {
    /// The image (raw or qcow2).
    pub path: PathBuf,
    /// Its name in the VM (default: the first free `diskN`).
    pub name: Option<String>,
    /// Read-only for the guest.
    pub readonly: bool,
    /// Never forked nor rewound by snapshots.
    pub independent: bool,
    /// Reference the image in place instead of copying it into disks/.
    pub link: bool,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Attaches a disk to the VM in `dir`, which must be off.
pub fn attach_disk(dir: &VmDir, a: &Attach) -> Result<DiskEntry, HardwareError> {
    let _lock = lock_off(dir)?;
    let mut t = dir.load()?;
    let root = dir.root().display().to_string();
    if t.disks.len() >= MAX_DISKS {
        return Err(HardwareError::TooManyDisks(root));
    }
    if t.disks.len() + t.nets.len() >= MAX_DEVICES {
        return Err(HardwareError::TooManyDevices(root));
    }
    let abs = std::fs::canonicalize(&a.path).map_err(|source| {
        HardwareError::Disk(DiskError::Open {
            path: a.path.clone(),
            source,
        })
    })?;
    for d in &t.disks {
        for p in [&d.base, &d.current] {
            let attached = std::fs::canonicalize(dir.resolve(p)).ok();
            if attached.as_deref() == Some(abs.as_path()) {
                return Err(HardwareError::AlreadyAttached {
                    path: a.path.clone(),
                    disk: d.name.clone(),
                });
            }
        }
    }
    let name = match &a.name {
        Some(n) => n.clone(),
        None => (0..)
            .map(|i| format!("disk{i}"))
            .find(|n| t.disks.iter().all(|d| d.name != *n))
            .unwrap_or_else(|| "disk".into()),
    };
    if !valid_name(&name) || t.disks.iter().any(|d| d.name == name) {
        return Err(HardwareError::BadName(name));
    }
    let chain = snapshot::disk::resolve_chain(&abs)?;
    let inside = abs.starts_with(dir.root());
    if chain.len() > 1 && !a.link && !inside {
        return Err(HardwareError::Chain(a.path.clone()));
    }
    if a.independent && chain.len() > 1 {
        return Err(HardwareError::IndependentChain(a.path.clone()));
    }
    let file = place(
        dir,
        &abs,
        &dir.disks_dir(),
        &format!("{name}.{}", chain[0].format.name()),
        a.link,
    )?;
    let entry = DiskEntry {
        name,
        base: file.clone(),
        current: file,
        readonly: a.readonly,
        independent: a.independent,
    };
    t.disks.push(entry.clone());
    dir.validate(&t)?;
    dir.save(&t)?;
    Ok(entry)
}

/// Detaches disk `name` from the VM in `dir`, which must be off. Its files
/// stay where they are, and snapshots that have it keep it: applying one
/// attaches it again.
pub fn detach_disk(dir: &VmDir, name: &str) -> Result<DiskEntry, HardwareError> {
    let _lock = lock_off(dir)?;
    let mut t = dir.load()?;
    let Some(i) = t.disks.iter().position(|d| d.name == name) else {
        return Err(HardwareError::NoSuchDisk {
            dir: dir.root().display().to_string(),
            name: name.into(),
            known: t.disks.iter().map(|d| d.name.clone()).collect(),
        });
    };
    let removed = t.disks.remove(i);
    dir.save(&t)?;
    Ok(removed)
}

/// Attaches a network adapter on tap `tap` (created by the VMM at start if
/// missing) to the VM in `dir`, which must be off; `mac` is generated
/// (locally administered) when not given.
pub fn attach_net(dir: &VmDir, tap: &str, mac: Option<[u8; 6]>) -> Result<NetEntry, HardwareError> {
    let _lock = lock_off(dir)?;
    let mut t = dir.load()?;
    if t.disks.len() + t.nets.len() >= MAX_DEVICES {
        return Err(HardwareError::TooManyDevices(
            dir.root().display().to_string(),
        ));
    }
    if let Some(n) = t.nets.iter().find(|n| n.tap == tap) {
        return Err(HardwareError::TapInUse {
            tap: tap.into(),
            net: n.name.clone(),
        });
    }
    let name = (0..)
        .map(|i| format!("net{i}"))
        .find(|n| t.nets.iter().all(|x| x.name != *n))
        .unwrap_or_else(|| "net".into());
    let entry = NetEntry {
        name,
        tap: tap.into(),
        mac: mac_text(&mac.unwrap_or_else(random_mac)),
    };
    t.nets.push(entry.clone());
    dir.validate(&t)?;
    dir.save(&t)?;
    Ok(entry)
}

/// Detaches network adapter `name` from the VM in `dir`, which must be off.
pub fn detach_net(dir: &VmDir, name: &str) -> Result<NetEntry, HardwareError> {
    let _lock = lock_off(dir)?;
    let mut t = dir.load()?;
    let Some(i) = t.nets.iter().position(|n| n.name == name) else {
        return Err(HardwareError::NoSuchNet {
            dir: dir.root().display().to_string(),
            name: name.into(),
            known: t.nets.iter().map(|n| n.name.clone()).collect(),
        });
    };
    let removed = t.nets.remove(i);
    dir.save(&t)?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hw(memory: &str, vcpus: u8, disks: &[(&str, bool)]) -> Hardware {
        Hardware {
            memory: memory.into(),
            memory_bytes: parse_size(memory).unwrap(),
            vcpus,
            kernel: "kernel/k".into(),
            initrd: None,
            cmdline: String::new(),
            disks: disks
                .iter()
                .map(|(n, independent)| HardwareDisk {
                    name: n.to_string(),
                    file: format!("disks/{n}.raw").into(),
                    readonly: false,
                    independent: *independent,
                })
                .collect(),
            nets: vec![],
        }
    }

    #[test]
    fn differences_name_each_change() {
        let then = hw("512M", 2, &[("disk0", false)]);
        assert!(then.differences(&then).is_empty());
        let now = hw("1G", 1, &[("disk0", false), ("disk1", true)]);
        let d = then.differences(&now);
        assert_eq!(
            d,
            [
                "memory: 512M, now 1G",
                "vCPUs: 2, now 1",
                "disk disk1: not attached here, attached now"
            ]
        );
        let d = now.differences(&then);
        assert!(d.contains(&"disk disk1: attached here, detached now".to_string()));
        assert!(!hw("512M", 2, &[])
            .differences(&hw("0512M", 2, &[]))
            .iter()
            .any(|l| l.starts_with("memory")));
    }
}
