//! VM configuration and its validation.

use std::path::PathBuf;

/// The smallest guest RAM accepted: the boot structures below 1 MiB plus a
/// little room for a kernel.
pub const MIN_MEMORY: u64 = 2 << 20;

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
}

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
}

impl VmConfig {
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
    fn validation() {
        let mut c = VmConfig {
            kernel: "k".into(),
            cmdline: String::new(),
            initrd: None,
            memory: 256 << 20,
            vcpus: 1,
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
