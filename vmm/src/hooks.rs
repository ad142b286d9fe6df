//! Debug aids and test hooks, read from the environment once when the
//! `snapvm` process starts and handed down to what uses them; nothing below
//! reads the environment itself. The README lists the debug aids; the test
//! hooks exist for the end-to-end tests in tests/ and for benchmarks.

use std::path::PathBuf;
use std::time::Duration;

/// Default KVM device node.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// Every hook, with its environment variable.
#[derive(Debug, Clone)]
pub struct Hooks {
    /// `SNAPVM_KVM_DEVICE`: the KVM device node (tests point it at a
    /// missing or inaccessible file).
    pub kvm_device: PathBuf,
    /// `SNAPVM_TEST_STREAM_DELAY_MS`: sleep per 2 MiB chunk while a live
    /// snapshot streams memory (a window for crash tests).
    pub stream_delay: Option<Duration>,
    /// `SNAPVM_TEST_MERGE_DELAY_MS`: sleep per merged MiB (crash tests,
    /// and `snapvm bench merge`'s rate-limited runs).
    pub merge_delay: Option<Duration>,
    /// `SNAPVM_TEST_MERGE_CRASH`: abort the process at this merge step
    /// (`copying:N`, `switching`, `torn`, `renaming`, `renamed`), as
    /// kill -9 would.
    pub merge_crash: Option<String>,
    /// `SNAPVM_DEBUG_CHECK_SNAPSHOT=FILE`: compare each live snapshot's
    /// memory.bin with memory copied at its instant; report to FILE.
    pub check_snapshot: Option<PathBuf>,
    /// `SNAPVM_DEBUG_CHECK_OLD_MEMORY=FILE`: poison the memory an apply
    /// replaces and report to FILE any page written after it left guest RAM.
    pub check_old_memory: Option<PathBuf>,
    /// `SNAPVM_DEBUG_DUMP_ON_FAIL=1`: write guest RAM as the VMM sees it to
    /// logs/guest-ram.dump when the guest fails.
    pub dump_on_fail: bool,
}

impl Default for Hooks {
    fn default() -> Self {
        Self {
            kvm_device: PathBuf::from(KVM_DEVICE),
            stream_delay: None,
            merge_delay: None,
            merge_crash: None,
            check_snapshot: None,
            check_old_memory: None,
            dump_on_fail: false,
        }
    }
}

impl Hooks {
    /// Reads every hook from the environment (unset or unparsable: off).
    pub fn from_env() -> Self {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads every hook through `get` (the environment, or a test's map).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Self {
        let millis = |k: &str| {
            get(k)
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_millis)
        };
        let path = |k: &str| get(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        Self {
            kvm_device: path("SNAPVM_KVM_DEVICE").unwrap_or_else(|| PathBuf::from(KVM_DEVICE)),
            stream_delay: millis("SNAPVM_TEST_STREAM_DELAY_MS"),
            merge_delay: millis("SNAPVM_TEST_MERGE_DELAY_MS"),
            merge_crash: get("SNAPVM_TEST_MERGE_CRASH").filter(|v| !v.is_empty()),
            check_snapshot: path("SNAPVM_DEBUG_CHECK_SNAPSHOT"),
            check_old_memory: path("SNAPVM_DEBUG_CHECK_OLD_MEMORY"),
            dump_on_fail: get("SNAPVM_DEBUG_DUMP_ON_FAIL").is_some(),
        }
    }

    /// Aborts the process if [`Hooks::merge_crash`] names `step`.
    pub fn crash_at(&self, step: &str) {
        if self.merge_crash.as_deref() == Some(step) {
            tracing::warn!("test hook: aborting at merge step {step}");
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hooks_are_read_from_their_variables() {
        let env = [
            ("SNAPVM_TEST_STREAM_DELAY_MS", "20"),
            ("SNAPVM_TEST_MERGE_DELAY_MS", "x"),
            ("SNAPVM_TEST_MERGE_CRASH", "torn"),
            ("SNAPVM_DEBUG_CHECK_OLD_MEMORY", "/tmp/r"),
            ("SNAPVM_DEBUG_DUMP_ON_FAIL", "1"),
        ];
        let h = Hooks::from_lookup(|k| {
            env.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        });
        assert_eq!(h.stream_delay, Some(Duration::from_millis(20)));
        assert_eq!(h.merge_delay, None, "unparsable: off");
        assert_eq!(h.merge_crash.as_deref(), Some("torn"));
        assert_eq!(h.check_old_memory, Some(PathBuf::from("/tmp/r")));
        assert_eq!(h.check_snapshot, None);
        assert!(h.dump_on_fail);
        assert_eq!(h.kvm_device, PathBuf::from("/dev/kvm"));
    }
}
