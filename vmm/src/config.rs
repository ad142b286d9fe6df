//! VM configuration and its validation.

use std::path::PathBuf;

/// The smallest guest RAM accepted: the boot structures below 1 MiB plus a
/// little room for a kernel.
pub const MIN_MEMORY: u64 = 2 << 20;

/// The most vCPUs a VM can have (the MP table's limit); the host's KVM may
/// allow fewer, which `start` checks.
pub const MAX_VCPUS: u8 = 254;

/// Errors in a configuration value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A size string could not be parsed.
    #[error("invalid size '{0}': use a number with an optional unit K, M, G or T (e.g. 512M, 1G); a plain number means MiB")]
    BadSize(String),
    /// Guest memory below the minimum.
    #[error("memory size {0} bytes is too small: snapvm needs at least 2 MiB")]
    MemoryTooSmall(u64),
    /// Guest memory not a whole number of pages.
    #[error("memory size {0} bytes is not a multiple of 4 KiB")]
    MemoryUnaligned(u64),
    /// No vCPUs.
    #[error("--vcpus must be at least 1")]
    NoVcpus,
    /// More vCPUs than the MP table can describe.
    #[error("--vcpus {0} is above the limit of {MAX_VCPUS}")]
    TooManyVcpus(u8),
    /// Guest memory below what the kernel (and initrd) occupy.
    #[error("memory size {memory} bytes is too small for the kernel and initrd, which need {needed} bytes (use --memory {}M or more)", needed.div_ceil(1 << 20) + 1)]
    MemoryTooSmallForKernel {
        /// The memory size.
        memory: u64,
        /// What the kernel image and initrd occupy, from address 0.
        needed: u64,
    },
    /// Unknown option in a --disk argument.
    #[error("invalid disk option '{0}': use --disk PATH or --disk PATH,readonly")]
    BadDiskOption(String),
    /// More disks than interrupt lines.
    #[error("{0} disks given; snapvm supports at most 16")]
    TooManyDisks(usize),
    /// More devices (disks and network adapters) than interrupt lines.
    #[error("{disks} disks and {nets} network adapters: snapvm supports at most {MAX_DEVICES} devices in all")]
    TooManyDevices {
        /// Disks.
        disks: usize,
        /// Network adapters.
        nets: usize,
    },
    /// A --net argument that does not parse.
    #[error(
        "invalid network adapter '{0}': use --net tap=NAME or --net tap=NAME,mac=52:54:00:12:34:56"
    )]
    BadNet(String),
    /// A MAC address that does not parse or is not a unicast address.
    #[error("invalid MAC address '{0}': six hex bytes separated by ':', unicast (the first byte even), e.g. 52:54:00:12:34:56")]
    BadMac(String),
}

/// Most virtio devices (disks and network adapters) a VM can have.
pub const MAX_DEVICES: usize = 16;

/// Parses `52:54:00:12:34:56` (unicast only).
pub fn parse_mac(s: &str) -> Result<[u8; 6], ConfigError> {
    let bad = || ConfigError::BadMac(s.to_string());
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 != 0 {
        return Err(bad());
    }
    Ok(mac)
}

/// A random, locally administered unicast MAC address.
pub fn random_mac() -> [u8; 6] {
    let r = uuid::Uuid::new_v4();
    let b = r.as_bytes();
    [(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]]
}

/// `52:54:00:12:34:56`.
pub fn mac_text(m: &[u8; 6]) -> String {
    devices::virtio::net::mac_text(m)
}

/// One network adapter given to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The host's TAP device (created if missing).
    pub tap: String,
    /// The adapter's MAC address.
    pub mac: [u8; 6],
}

/// What `--net tap=NAME[,mac=MAC]` asks for (the MAC is generated when
/// none is given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetArg {
    /// The TAP device.
    pub tap: String,
    /// The MAC address, if given.
    pub mac: Option<[u8; 6]>,
}

impl std::str::FromStr for NetArg {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ConfigError::BadNet(s.to_string());
        let (mut tap, mut mac) = (None, None);
        for kv in s.split(',') {
            match kv.split_once('=') {
                Some(("tap", v)) if devices::virtio::tap::valid_name(v) => {
                    tap = Some(v.to_string())
                }
                Some(("mac", v)) => mac = Some(parse_mac(v)?),
                _ => return Err(bad()),
            }
        }
        Ok(Self {
            tap: tap.ok_or_else(bad)?,
            mac,
        })
    }
}

/// One disk given to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// Image file (raw, or qcow2 whose backing chain is followed).
    pub path: PathBuf,
    /// Whether the guest may write.
    pub readonly: bool,
}

impl std::str::FromStr for DiskConfig {
    type Err = ConfigError;

    /// Parses `PATH[,readonly]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (path, opts) = match s.rsplit_once(',') {
            Some((p, o)) if o == "readonly" || o == "ro" => (p, Some(o)),
            Some((_, o)) if !o.contains('/') => {
                return Err(ConfigError::BadDiskOption(o.to_string()))
            }
            _ => (s, None),
        };
        if path.is_empty() {
            return Err(ConfigError::BadDiskOption(s.to_string()));
        }
        Ok(Self {
            path: path.into(),
            readonly: opts.is_some(),
        })
    }
}

/// Most disks a VM can have (one IOAPIC pin each).
pub const MAX_DISKS: usize = 16;

/// What a VM is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Kernel image: an ELF with a PVH note, or a bzImage.
    pub kernel: PathBuf,
    /// Kernel command line.
    pub cmdline: String,
    /// Optional initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Disks, in the order the guest sees them.
    pub disks: Vec<DiskConfig>,
    /// Network adapters, after the disks.
    pub nets: Vec<NetConfig>,
    /// Whether vCPU threads are pinned to host CPUs.
    pub pin_vcpus: crate::machine::backend_quirks::PinVcpus,
    /// Whether guest RAM may use transparent huge pages.
    pub huge_pages: crate::machine::backend_quirks::HugePages,
}

impl VmConfig {
    /// Whether a VM of `self` can take a snapshot of `other`'s hardware
    /// without being rebuilt: the same memory, vCPUs, disks (count and
    /// read-only flags) and host-side settings.
    pub fn same_hardware(&self, other: &VmConfig) -> bool {
        self.memory == other.memory
            && self.vcpus == other.vcpus
            && self.pin_vcpus == other.pin_vcpus
            && self.huge_pages == other.huge_pages
            && self.disks.len() == other.disks.len()
            && self
                .disks
                .iter()
                .zip(&other.disks)
                .all(|(a, b)| a.readonly == b.readonly)
            && self.nets == other.nets
    }

    /// Checks the values that do not depend on the host.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.memory < MIN_MEMORY {
            return Err(ConfigError::MemoryTooSmall(self.memory));
        }
        if !self.memory.is_multiple_of(4096) {
            return Err(ConfigError::MemoryUnaligned(self.memory));
        }
        if self.vcpus == 0 {
            return Err(ConfigError::NoVcpus);
        }
        if self.vcpus > MAX_VCPUS {
            return Err(ConfigError::TooManyVcpus(self.vcpus));
        }
        if self.disks.len() > MAX_DISKS {
            return Err(ConfigError::TooManyDisks(self.disks.len()));
        }
        if self.disks.len() + self.nets.len() > MAX_DEVICES {
            return Err(ConfigError::TooManyDevices {
                disks: self.disks.len(),
                nets: self.nets.len(),
            });
        }
        Ok(())
    }
}

/// Parses a size such as `512M`, `1G`, `1GiB`, `2048` (MiB) or `4096B`.
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadSize(s.to_string());
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 20,
        "b" => 0,
        "k" | "kb" | "kib" => 10,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(bad()),
    };
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("64"), Ok(64 << 20));
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert_eq!(parse_size("2k"), Ok(2048));
        assert!(parse_size("").is_err());
        assert!(parse_size("1Q").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn disk_arguments() {
        let d: DiskConfig = "/a/b.qcow2".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("/a/b.qcow2"));
        assert!(!d.readonly);
        let d: DiskConfig = "/a/b.raw,readonly".parse().unwrap();
        assert!(d.readonly);
        assert_eq!(d.path, PathBuf::from("/a/b.raw"));
        assert_eq!(
            "/a/b.raw,rw".parse::<DiskConfig>(),
            Err(ConfigError::BadDiskOption("rw".into()))
        );
        assert!(",readonly".parse::<DiskConfig>().is_err());
    }

    #[test]
    fn validation() {
        let mut c = VmConfig {
            kernel: "k".into(),
            cmdline: String::new(),
            initrd: None,
            memory: 256 << 20,
            vcpus: 1,
            disks: vec![],
            nets: vec![],
            pin_vcpus: crate::machine::backend_quirks::PinVcpus::Auto,
            huge_pages: crate::machine::backend_quirks::HugePages::Auto,
        };
        assert_eq!(c.validate(), Ok(()));
        c.memory = 0;
        assert_eq!(c.validate(), Err(ConfigError::MemoryTooSmall(0)));
        c.memory = (4 << 20) + 1;
        assert!(matches!(c.validate(), Err(ConfigError::MemoryUnaligned(_))));
        c.memory = 4 << 20;
        c.vcpus = 0;
        assert_eq!(c.validate(), Err(ConfigError::NoVcpus));
    }
}
