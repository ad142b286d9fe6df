//! The VMM's main loop: it serves event subscribers (console input) until
//! the VM or the API asks to stop, or SIGINT/SIGTERM arrives. The
//! background VMM and `snapvm run` both run it.

use std::io::Read;
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;

/// Watches eventfds that ask the VMM to stop, and the signal pipe.
struct StopWatcher {
    fds: Vec<RawFd>,
    signals: UnixStream,
    stop: Arc<AtomicBool>,
    signal: Arc<AtomicI32>,
}

impl MutEventSubscriber for StopWatcher {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if self.fds.contains(&events.fd()) {
            let mut b = [0u8; 8];
            // SAFETY: reading 8 bytes from an eventfd into a valid buffer.
            unsafe { libc::read(events.fd(), b.as_mut_ptr().cast(), 8) };
        } else {
            let mut b = [0u8; 16];
            let n = self.signals.read(&mut b).unwrap_or(0);
            if n > 0 {
                self.signal.store(b[n - 1] as i32, Ordering::SeqCst);
            }
        }
        self.stop.store(true, Ordering::SeqCst);
    }

    fn init(&mut self, ops: &mut EventOps) {
        for fd in &self.fds {
            if let Err(e) = ops.add(Events::new_raw(*fd, EventSet::IN)) {
                tracing::error!("cannot watch a stop event: {e:?}");
            }
        }
        if let Err(e) = ops.add(Events::new(&self.signals, EventSet::IN)) {
            tracing::error!("cannot watch signals: {e:?}");
        }
    }
}

/// The VMM's main loop: serves `subscribers` until one of `stop_fds` is
/// signalled or SIGINT/SIGTERM arrives. Returns the signal, if any.
pub fn event_loop(
    stop_fds: Vec<RawFd>,
    subscribers: Vec<Box<dyn MutEventSubscriber>>,
) -> Result<Option<i32>, RunError> {
    let (sig_read, sig_write) = UnixStream::pair().map_err(RunError::Signals)?;
    sig_read.set_nonblocking(true).map_err(RunError::Signals)?;
    for (sig, byte) in [
        (signal_hook::consts::SIGINT, 2u8),
        (signal_hook::consts::SIGTERM, 15u8),
    ] {
        let w = sig_write.try_clone().map_err(RunError::Signals)?;
        register_signal_byte(sig, w, byte).map_err(RunError::Signals)?;
    }
    let mut em = EventManager::<Box<dyn MutEventSubscriber>>::new().map_err(RunError::EventLoop)?;
    for s in subscribers {
        em.add_subscriber(s);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let signal = Arc::new(AtomicI32::new(0));
    em.add_subscriber(Box::new(StopWatcher {
        fds: stop_fds,
        signals: sig_read,
        stop: stop.clone(),
        signal: signal.clone(),
    }));
    while !stop.load(Ordering::SeqCst) {
        if let Err(e) = em.run() {
            return Err(RunError::EventLoop(e));
        }
    }
    let sig = signal.load(Ordering::SeqCst);
    Ok((sig != 0).then_some(sig))
}

/// Errors of the event loop.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The event manager failed.
    #[error("event loop: {0}")]
    EventLoop(event_manager::Error),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

/// On `sig`, writes `byte` to `w` (async-signal-safe).
fn register_signal_byte(sig: i32, w: UnixStream, byte: u8) -> std::io::Result<()> {
    use std::os::fd::IntoRawFd;
    let fd = w.into_raw_fd();
    // SAFETY: the handler only calls write(2) on a descriptor that stays open
    // for the life of the process (leaked below), which is async-signal-safe.
    unsafe {
        signal_hook::low_level::register(sig, move || {
            libc::write(fd, (&byte as *const u8).cast(), 1);
        })
    }
    .map(|_| ())
}
