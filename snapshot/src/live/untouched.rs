//! The untouched extents a live snapshot leaves unprotected
//! (snapshot/src/populated.rs says why and how they are found): protected
//! around them at arm time, settled in the pause.

use super::{GuestRegion, Shared};
use crate::memory_file::PAGE_SIZE;
use crate::populated::{self, PageScanner};
use crate::write_protect::{WriteProtectError, WriteProtector};

/// The unprotected runs of each region, between arm and freeze.
pub(super) struct Untouched {
    /// None when the kernel cannot scan: then nothing is left unprotected.
    scanner: Option<PageScanner>,
    /// For each region, its untouched runs (address, length), sorted.
    runs: Vec<populated::Runs>,
}

impl Untouched {
    /// Arm time, guest running: write-protects every region but its
    /// untouched runs.
    pub(super) fn protect_rest(
        wp: &WriteProtector,
        regions: &[GuestRegion],
    ) -> Result<Self, WriteProtectError> {
        let scanner = PageScanner::open();
        let mut runs = Vec::with_capacity(regions.len());
        for r in regions {
            let untouched = scanner
                .as_ref()
                .map(|s| s.untouched(r.host, r.len))
                .unwrap_or_default();
            for (start, len) in populated::complement(r.host, r.len, &untouched) {
                wp.protect(start, len)?;
            }
            runs.push(untouched);
        }
        Ok(Self { scanner, runs })
    }

    /// In the pause: protects the extents the guest populated since arm
    /// time and claims the still empty ones as zeroes. Returns how many
    /// pages that was.
    pub(super) fn settle(&mut self, shared: &Shared) -> Result<u64, WriteProtectError> {
        let mut empty_pages = 0;
        for runs in std::mem::take(&mut self.runs) {
            let (touched, empty) = match &self.scanner {
                Some(s) => s.recheck(&runs),
                None => (runs, Vec::new()),
            };
            for (a, l) in touched {
                shared.wp.protect(a, l)?;
            }
            for (a, l) in empty {
                match shared.lookup(a) {
                    Some((_, idx)) => {
                        shared.claim_empty(idx, l as u64 / PAGE_SIZE);
                        empty_pages += l as u64 / PAGE_SIZE;
                    }
                    None => shared.wp.protect(a, l)?,
                }
            }
        }
        Ok(empty_pages)
    }
}
