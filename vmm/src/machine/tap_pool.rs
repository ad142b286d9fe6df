//! The TAP devices a VMM has open, by name. A VM's network devices take
//! their tap from here, so a VM rebuilt for an apply across hardware finds
//! the same open tap (a tap this VMM created lives as long as its file
//! descriptor: reopening it would lose what the host configured on it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use devices::virtio::tap::{Tap, TapError};

/// Open taps, by name.
#[derive(Default)]
pub struct TapPool {
    taps: Mutex<HashMap<String, Arc<Tap>>>,
}

impl TapPool {
    /// An empty pool.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Tap `name`, opened (or created) on first use.
    pub fn get(&self, name: &str) -> Result<Arc<Tap>, TapError> {
        let mut taps = self.taps.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = taps.get(name) {
            return Ok(t.clone());
        }
        let tap = Arc::new(Tap::open(name)?);
        if tap.created() {
            tracing::info!("created tap {name} (it goes away when this VMM ends)");
        }
        taps.insert(name.to_string(), tap.clone());
        Ok(tap)
    }
}
