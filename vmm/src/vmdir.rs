//! The VM directory: `vm.toml`, disks and their layers, snapshots, logs
//! and runtime files, and the paths of each. A VM directory is self-contained and movable:
//! every path inside it is stored relative to it.
//!
//! ```text
//! VMDIR/vm.toml                 configuration (human-editable, validated)
//! VMDIR/kernel/                 kernel and initrd copies (unless --link)
//! VMDIR/disks/<disk>.raw|qcow2  base images; later differencing layers
//! VMDIR/logs/serial.log         guest console output
//! VMDIR/logs/vmm.log            the VMM's own log
//! VMDIR/logs/last-exit.json     how the VMM last ended
//! VMDIR/run/                    api.sock, console.sock, pid, lock
//! VMDIR/snapshots/tree.json     the snapshot tree and "Now"
//! VMDIR/snapshots/<id>/         vm.toml, state.bin, memory.bin of a snapshot
//! ```
//!
//! docs/formats.md describes each file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{
    mac_text, parse_mac, parse_size, random_mac, ConfigError, DiskConfig, NetArg, NetConfig,
    VmConfig, MAX_DISKS, MAX_VCPUS,
};
use crate::machine::backend_quirks::{HugePages, PinVcpus};
use devices::virtio::tap::valid_name as valid_tap_name;

/// Longest path a Unix socket accepts (sun_path is 108 bytes with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Errors of VM directories.
#[derive(Debug, thiserror::Error)]
pub enum VmDirError {
    /// Not a directory with a vm.toml.
    #[error("{0} is not a VM directory (no vm.toml); create one with `snapvm create`")]
    NotAVmDir(PathBuf),
    /// The directory already holds a VM.
    #[error("{0} already holds a VM (vm.toml exists)")]
    Exists(PathBuf),
    /// vm.toml does not parse.
    #[error("invalid {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What toml said (names the key and line).
        message: String,
    },
    /// A key has an invalid value.
    #[error("invalid {path}: key '{key}': {message}")]
    Key {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// An I/O error on a file of the VM directory.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The socket path does not fit a Unix socket address.
    #[error("socket path {path} is {len} bytes, longer than the {MAX_SOCKET_PATH} a Unix socket allows; use a VM directory with a shorter path")]
    SocketPathTooLong {
        /// The path.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
}

/// One disk in vm.toml.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskEntry {
    /// Short name (also the file stem under disks/).
    pub name: String,
    /// The base image, relative to the VM directory (or absolute with --link).
    pub base: PathBuf,
    /// The current working layer the VM writes (the base, or the newest
    /// differencing layer).
    pub current: PathBuf,
    /// Refuse guest writes.
    #[serde(default)]
    pub readonly: bool,
    /// Never forked by a snapshot nor rewound by an apply (Hyper-V's
    /// pass-through disks): `current` is always `base`, and snapshots
    /// capture only whether it is attached.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub independent: bool,
}

/// One network adapter in vm.toml.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetEntry {
    /// Short name ("net0").
    pub name: String,
    /// The host's TAP device (created by the VMM if missing, used as it is
    /// if it exists, e.g. on a bridge).
    pub tap: String,
    /// The adapter's MAC address (`52:54:00:12:34:56`).
    pub mac: String,
}

/// The contents of vm.toml.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmToml {
    /// The VM's name.
    pub name: String,
    /// Kernel image, relative to the VM directory or absolute.
    pub kernel: PathBuf,
    /// Optional initrd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
    /// Guest memory, e.g. "256M".
    pub memory: String,
    /// vCPUs.
    pub vcpus: u8,
    /// Whether vCPU threads are pinned to host CPUs: "auto" (on the
    /// kvm_pvm backend, which needs it), "on" or "off".
    #[serde(default)]
    pub pin_vcpus: PinVcpus,
    /// Whether guest RAM may use transparent huge pages: "auto" (not on
    /// the kvm_pvm backend), "on" or "off".
    #[serde(default)]
    pub huge_pages: HugePages,
    /// Disks in guest order.
    #[serde(default, rename = "disk", skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskEntry>,
    /// Network adapters in guest order (after the disks).
    #[serde(default, rename = "net", skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<NetEntry>,
    /// Where this VM was cloned from (`snapvm snapshot clone`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone: Option<CloneOf>,
}

/// A clone's origin in vm.toml (`[clone]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloneOf {
    /// The VM directory it was cloned from (absolute).
    pub source: PathBuf,
    /// The snapshot it was cloned from (id).
    pub snapshot: String,
    /// Not started yet: its next start continues from the snapshot (with
    /// memory shared with the other clones) instead of booting.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pending: bool,
}

/// Paths of a VM directory.
#[derive(Debug, Clone)]
pub struct VmDir {
    root: PathBuf,
}

impl VmDir {
    /// A VM directory at `root` (not checked).
    pub fn new(root: &Path) -> Self {
        let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
        Self { root }
    }

    /// Opens an existing VM directory.
    pub fn open(root: &Path) -> Result<Self, VmDirError> {
        let d = Self::new(root);
        if !d.config_path().is_file() {
            return Err(VmDirError::NotAVmDir(root.to_path_buf()));
        }
        Ok(d)
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// vm.toml.
    pub fn config_path(&self) -> PathBuf {
        self.root.join("vm.toml")
    }
    /// disks/.
    pub fn disks_dir(&self) -> PathBuf {
        self.root.join("disks")
    }
    /// kernel/.
    pub fn kernel_dir(&self) -> PathBuf {
        self.root.join("kernel")
    }
    /// logs/.
    pub fn logs_dir(&self) -> PathBuf {
        self.root.join("logs")
    }
    /// logs/serial.log.
    pub fn serial_log(&self) -> PathBuf {
        self.logs_dir().join("serial.log")
    }
    /// logs/vmm.log.
    pub fn vmm_log(&self) -> PathBuf {
        self.logs_dir().join("vmm.log")
    }
    /// run/.
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }
    /// run/api.sock.
    pub fn api_socket(&self) -> PathBuf {
        self.run_dir().join("api.sock")
    }
    /// run/console.sock.
    pub fn console_socket(&self) -> PathBuf {
        self.run_dir().join("console.sock")
    }
    /// run/pid.
    pub fn pid_file(&self) -> PathBuf {
        self.run_dir().join("pid")
    }
    /// run/lock.
    pub fn lock_file(&self) -> PathBuf {
        self.run_dir().join("lock")
    }
    /// logs/last-exit.json: how the VMM last ended.
    pub fn last_exit_file(&self) -> PathBuf {
        self.logs_dir().join("last-exit.json")
    }
    /// snapshots/.
    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }
    /// snapshots/tree.json.
    pub fn tree_path(&self) -> PathBuf {
        self.snapshots_dir().join("tree.json")
    }
    /// snapshots/<id>/: a published snapshot's files.
    pub fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.snapshots_dir().join(id)
    }
    /// snapshots/<id>.partial/: a snapshot being assembled.
    pub fn partial_snapshot_dir(&self, id: &str) -> PathBuf {
        self.snapshots_dir().join(format!("{id}.partial"))
    }
    /// disks/<disk>.<tag>.qcow2: a differencing layer of disk `disk`
    /// (`tag`: the first 8 characters of the snapshot id that made it, or
    /// of a random id for an apply's working layer).
    pub fn layer_path(&self, disk: &str, tag: &str) -> PathBuf {
        self.disks_dir().join(format!("{disk}.{tag}.qcow2"))
    }

    /// `p` relative to the directory (as vm.toml and tree.json store
    /// paths), or `p` itself if it lies outside.
    pub fn relative(&self, p: &Path) -> PathBuf {
        p.strip_prefix(&self.root)
            .map(Path::to_path_buf)
            .unwrap_or_else(|_| p.to_path_buf())
    }

    /// Checks that both sockets' paths fit a Unix socket address.
    pub fn check_socket_paths(&self) -> Result<(), VmDirError> {
        for p in [self.api_socket(), self.console_socket()] {
            let len = p.as_os_str().len();
            if len > MAX_SOCKET_PATH {
                return Err(VmDirError::SocketPathTooLong { path: p, len });
            }
        }
        Ok(())
    }

    /// Resolves a path from vm.toml against the directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.root.join(p)
        }
    }

    /// Reads and validates vm.toml.
    pub fn load(&self) -> Result<VmToml, VmDirError> {
        let path = self.config_path();
        let text = std::fs::read_to_string(&path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                VmDirError::NotAVmDir(self.root.clone())
            } else {
                VmDirError::Io {
                    what: "cannot read",
                    path: path.clone(),
                    source,
                }
            }
        })?;
        let t: VmToml = toml::from_str(&text).map_err(|e| VmDirError::Parse {
            path: path.clone(),
            message: e.to_string().replace('\n', " ").trim().to_string(),
        })?;
        self.validate(&t)?;
        Ok(t)
    }

    fn key_err(&self, key: &str, message: impl Into<String>) -> VmDirError {
        VmDirError::Key {
            path: self.config_path(),
            key: key.into(),
            message: message.into(),
        }
    }

    /// Checks every key's value.
    pub fn validate(&self, t: &VmToml) -> Result<(), VmDirError> {
        if t.name.trim().is_empty() {
            return Err(self.key_err("name", "must not be empty"));
        }
        let memory = parse_size(&t.memory).map_err(|e| self.key_err("memory", e.to_string()))?;
        if t.vcpus == 0 {
            return Err(self.key_err("vcpus", "must be at least 1"));
        }
        if t.vcpus > MAX_VCPUS {
            return Err(self.key_err(
                "vcpus",
                format!("{} is above the limit of {MAX_VCPUS}", t.vcpus),
            ));
        }
        match self.vm_config(t)?.validate() {
            Ok(()) => {}
            Err(e @ (ConfigError::MemoryTooSmall(_) | ConfigError::MemoryUnaligned(_))) => {
                return Err(self.key_err("memory", e.to_string()))
            }
            Err(e) => return Err(self.key_err("disk", e.to_string())),
        }
        if !self.resolve(&t.kernel).is_file() {
            return Err(self.key_err(
                "kernel",
                format!("{} does not exist", self.resolve(&t.kernel).display()),
            ));
        }
        if let Some(i) = &t.initrd {
            if !self.resolve(i).is_file() {
                return Err(self.key_err(
                    "initrd",
                    format!("{} does not exist", self.resolve(i).display()),
                ));
            }
        }
        self.check_fits(t, memory)?;
        let mut taps = std::collections::HashSet::new();
        let mut macs = std::collections::HashSet::new();
        let mut net_names = std::collections::HashSet::new();
        for (i, n) in t.nets.iter().enumerate() {
            let key = format!("net[{i}]");
            if !valid_tap_name(&n.tap) {
                return Err(self.key_err(
                    &format!("{key}.tap"),
                    format!(
                        "'{}' is not an interface name (1-15 bytes, no '/', ':' or space)",
                        n.tap
                    ),
                ));
            }
            if !taps.insert(n.tap.clone()) {
                return Err(
                    self.key_err(&format!("{key}.tap"), format!("'{}' is used twice", n.tap))
                );
            }
            let mac = parse_mac(&n.mac)
                .map_err(|e| self.key_err(&format!("{key}.mac"), e.to_string()))?;
            if !macs.insert(mac) {
                return Err(self.key_err(&format!("{key}.mac"), format!("{} is used twice", n.mac)));
            }
            if n.name.is_empty() || !net_names.insert(n.name.clone()) {
                return Err(self.key_err(
                    &format!("{key}.name"),
                    format!("'{}' is empty or used twice", n.name),
                ));
            }
        }
        if t.disks.len() > MAX_DISKS {
            return Err(self.key_err("disk", format!("at most {MAX_DISKS} disks")));
        }
        let mut names = std::collections::HashSet::new();
        for (i, d) in t.disks.iter().enumerate() {
            let key = format!("disk[{i}]");
            if d.name.is_empty()
                || !d
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(self.key_err(&format!("{key}.name"), "use letters, digits, - and _"));
            }
            if !names.insert(d.name.clone()) {
                return Err(self.key_err(
                    &format!("{key}.name"),
                    format!("'{}' is used twice", d.name),
                ));
            }
            if d.independent && d.current != d.base {
                return Err(self.key_err(
                    &format!("{key}.current"),
                    "an independent disk has no layers: current must be its base",
                ));
            }
            for (k, p) in [("base", &d.base), ("current", &d.current)] {
                if !self.resolve(p).is_file() {
                    // A clone's base lies in the VM it was cloned from.
                    let why = match &t.clone {
                        Some(c) if !self.resolve(p).starts_with(&self.root) => format!(
                            ": this clone reads it from {}, which moved or was deleted (or its snapshot was)",
                            c.source.display()
                        ),
                        _ => String::new(),
                    };
                    return Err(self.key_err(
                        &format!("{key}.{k}"),
                        format!("{} no longer exists{why}", self.resolve(p).display()),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks that the kernel and initrd fit in `memory` bytes.
    fn check_fits(&self, t: &VmToml, memory: u64) -> Result<(), VmDirError> {
        let kernel = crate::machine::boot::memory_needed(&self.resolve(&t.kernel))
            .map_err(|e| self.key_err("kernel", e.to_string()))?;
        let initrd = match &t.initrd {
            Some(i) => std::fs::metadata(self.resolve(i))
                .map(|m| m.len())
                .unwrap_or(0),
            None => 0,
        };
        let needed = kernel.saturating_add(initrd);
        if needed > memory {
            return Err(self.key_err(
                "memory",
                ConfigError::MemoryTooSmallForKernel { memory, needed }.to_string(),
            ));
        }
        Ok(())
    }

    /// Writes vm.toml atomically.
    pub fn save(&self, t: &VmToml) -> Result<(), VmDirError> {
        let text = toml::to_string_pretty(t).map_err(|e| VmDirError::Parse {
            path: self.config_path(),
            message: e.to_string(),
        })?;
        let body = format!(
            "# snapvm VM configuration. Paths are relative to this directory.\n\
             # Edit while the VM is stopped; `snapvm status` validates it.\n\n{text}"
        );
        snapshot::atomic_file::write_atomic(&self.config_path(), body.as_bytes()).map_err(
            |source| VmDirError::Io {
                what: "cannot write",
                path: self.config_path(),
                source,
            },
        )
    }

    /// Reads a configuration copy (a snapshot's vm.toml) without checking
    /// the files it names.
    pub fn read_config_copy(path: &Path) -> Result<VmToml, VmDirError> {
        let text = std::fs::read_to_string(path).map_err(|source| VmDirError::Io {
            what: "cannot read",
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| VmDirError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().replace('\n', " ").trim().to_string(),
        })
    }

    /// Writes a configuration copy (a snapshot's vm.toml) atomically.
    pub fn write_config_copy(path: &Path, t: &VmToml) -> Result<(), VmDirError> {
        let text = toml::to_string_pretty(t).map_err(|e| VmDirError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        snapshot::atomic_file::write_atomic(path, text.as_bytes()).map_err(|source| {
            VmDirError::Io {
                what: "cannot write",
                path: path.to_path_buf(),
                source,
            }
        })
    }

    /// The runnable configuration of `t`.
    pub fn vm_config(&self, t: &VmToml) -> Result<VmConfig, VmDirError> {
        Ok(VmConfig {
            kernel: self.resolve(&t.kernel),
            cmdline: t.cmdline.clone(),
            initrd: t.initrd.as_ref().map(|p| self.resolve(p)),
            memory: parse_size(&t.memory).map_err(|e| self.key_err("memory", e.to_string()))?,
            vcpus: t.vcpus,
            pin_vcpus: t.pin_vcpus,
            huge_pages: t.huge_pages,
            disks: t
                .disks
                .iter()
                .map(|d| DiskConfig {
                    path: self.resolve(&d.current),
                    readonly: d.readonly,
                })
                .collect(),
            nets: t
                .nets
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    Ok(NetConfig {
                        tap: n.tap.clone(),
                        mac: parse_mac(&n.mac)
                            .map_err(|e| self.key_err(&format!("net[{i}].mac"), e.to_string()))?,
                    })
                })
                .collect::<Result<_, VmDirError>>()?,
        })
    }
}

/// What `snapvm create` is given.
pub struct CreateRequest {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initrd.
    pub initrd: Option<PathBuf>,
    /// Command line.
    pub cmdline: String,
    /// Memory, e.g. "256M".
    pub memory: String,
    /// vCPUs.
    pub vcpus: u8,
    /// vCPU thread pinning.
    pub pin_vcpus: PinVcpus,
    /// Huge pages for guest RAM.
    pub huge_pages: HugePages,
    /// Disks (path, readonly).
    pub disks: Vec<DiskConfig>,
    /// Network adapters.
    pub nets: Vec<NetArg>,
    /// Reference the kernel, initrd and disks in place instead of copying.
    pub link: bool,
}

fn copy_into(src: &Path, dir: &Path, name: &str) -> Result<PathBuf, VmDirError> {
    let dst = dir.join(name);
    std::fs::copy(src, &dst).map_err(|source| VmDirError::Io {
        what: "cannot copy",
        path: src.to_path_buf(),
        source,
    })?;
    Ok(dst)
}

fn absolute(p: &Path) -> Result<PathBuf, VmDirError> {
    std::fs::canonicalize(p).map_err(|source| VmDirError::Io {
        what: "cannot find",
        path: p.to_path_buf(),
        source,
    })
}

/// Creates a VM directory at `root`.
pub fn create(root: &Path, req: &CreateRequest) -> Result<VmDir, VmDirError> {
    let io = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| VmDirError::Io { what, path, source }
    };
    if root.join("vm.toml").exists() {
        return Err(VmDirError::Exists(root.to_path_buf()));
    }
    // Every value is checked before anything is created or copied: the
    // same checks `load` runs, on the files where they are now.
    let draft = VmToml {
        name: "vm".into(),
        kernel: absolute(&req.kernel).map_err(|_| VmDirError::Key {
            path: root.join("vm.toml"),
            key: "kernel".into(),
            message: format!("{} does not exist", req.kernel.display()),
        })?,
        initrd: match &req.initrd {
            Some(i) => Some(absolute(i).map_err(|_| VmDirError::Key {
                path: root.join("vm.toml"),
                key: "initrd".into(),
                message: format!("{} does not exist", i.display()),
            })?),
            None => None,
        },
        cmdline: req.cmdline.clone(),
        memory: req.memory.clone(),
        vcpus: req.vcpus,
        pin_vcpus: req.pin_vcpus,
        huge_pages: req.huge_pages,
        disks: vec![],
        nets: net_entries(&req.nets),
        clone: None,
    };
    let at_root = VmDir {
        root: root.to_path_buf(),
    };
    at_root.validate(&draft)?;
    let mut disk_formats = Vec::new();
    for d in &req.disks {
        let chain = snapshot::disk::resolve_chain(&d.path).map_err(|e| VmDirError::Key {
            path: root.join("vm.toml"),
            key: "disk".into(),
            message: e.to_string(),
        })?;
        if chain.len() > 1 && !req.link {
            return Err(VmDirError::Key {
                path: root.join("vm.toml"),
                key: "disk".into(),
                message: format!(
                    "{} has a backing chain; flatten it (qemu-img convert) or use --link",
                    d.path.display()
                ),
            });
        }
        disk_formats.push(chain[0].format);
    }
    std::fs::create_dir_all(root).map_err(io("cannot create", root))?;
    let dir = VmDir::new(root);
    dir.check_socket_paths()?;
    for d in [
        dir.disks_dir(),
        dir.kernel_dir(),
        dir.logs_dir(),
        dir.run_dir(),
    ] {
        std::fs::create_dir_all(&d).map_err(io("cannot create", &d))?;
    }
    let rel = |p: &Path| {
        p.strip_prefix(dir.root())
            .map(Path::to_path_buf)
            .unwrap_or(p.to_path_buf())
    };
    let place = |src: &Path, into: &Path, name: &str| -> Result<PathBuf, VmDirError> {
        if req.link {
            absolute(src)
        } else {
            copy_into(src, into, name).map(|p| rel(&p))
        }
    };
    let file_name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into())
    };
    let kernel = place(&req.kernel, &dir.kernel_dir(), &file_name(&req.kernel))?;
    let initrd = match &req.initrd {
        Some(i) => Some(place(i, &dir.kernel_dir(), &file_name(i))?),
        None => None,
    };
    let mut disks = Vec::new();
    for (i, (d, format)) in req.disks.iter().zip(disk_formats).enumerate() {
        let name = format!("disk{i}");
        let base = place(
            &d.path,
            &dir.disks_dir(),
            &format!("{name}.{}", format.name()),
        )?;
        disks.push(DiskEntry {
            name,
            current: base.clone(),
            base,
            readonly: d.readonly,
            independent: false,
        });
    }
    let name = root
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "vm".into());
    let t = VmToml {
        name,
        kernel,
        initrd,
        cmdline: req.cmdline.clone(),
        memory: req.memory.clone(),
        vcpus: req.vcpus,
        pin_vcpus: req.pin_vcpus,
        huge_pages: req.huge_pages,
        disks,
        nets: net_entries(&req.nets),
        clone: None,
    };
    dir.validate(&t)?;
    dir.save(&t)?;
    Ok(dir)
}

/// vm.toml entries for `--net` arguments: named net0, net1, ..., with a
/// generated MAC where none was given.
pub fn net_entries(nets: &[NetArg]) -> Vec<NetEntry> {
    nets.iter()
        .enumerate()
        .map(|(i, n)| NetEntry {
            name: format!("net{i}"),
            tap: n.tap.clone(),
            mac: mac_text(&n.mac.unwrap_or_else(random_mac)),
        })
        .collect()
}

#[cfg(test)]
#[path = "vmdir_tests.rs"]
mod tests;
