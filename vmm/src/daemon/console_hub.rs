//! The serial console of a background VM: guest output goes to
//! logs/serial.log, to a ring buffer of recent output, and to every client
//! attached to run/console.sock; client input goes to the UART.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

use devices::serial::SerialDevice;

/// Bytes of recent output replayed to a client when it attaches.
pub const BACKLOG: usize = 64 * 1024;

/// The byte that detaches `snapvm console` (Ctrl-]).
pub const DETACH_KEY: u8 = 0x1d;

#[derive(Default)]
struct Shared {
    backlog: VecDeque<u8>,
    clients: Vec<UnixStream>,
}

/// Fan-out of guest console output, and where console input goes.
#[derive(Clone)]
pub struct ConsoleHub {
    shared: Arc<Mutex<Shared>>,
    log: Arc<Mutex<Option<File>>>,
    /// The UART of the VM running now (a VMM that rebuilds its VM points
    /// it at the new one).
    input: Arc<Mutex<Option<Arc<Mutex<SerialDevice>>>>>,
}

impl ConsoleHub {
    /// Output is appended to `log` (if given).
    pub fn new(log: Option<File>) -> Self {
        Self {
            shared: Arc::new(Mutex::new(Shared::default())),
            log: Arc::new(Mutex::new(log)),
            input: Arc::new(Mutex::new(None)),
        }
    }

    /// Sends console input to `serial` from now on.
    pub fn set_input(&self, serial: Arc<Mutex<SerialDevice>>) {
        *self.input.lock().unwrap_or_else(|e| e.into_inner()) = Some(serial);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a client: it first receives the backlog.
    pub fn attach(&self, mut client: UnixStream) {
        let mut s = self.lock();
        let (a, b) = s.backlog.as_slices();
        let mut backlog = a.to_vec();
        backlog.extend_from_slice(b);
        if client.write_all(&backlog).is_err() {
            return;
        }
        // Never let a slow client stall a vCPU: drop its output instead.
        let _ = client.set_nonblocking(true);
        s.clients.push(client);
    }

    /// Serves console.sock: attaches clients and feeds their input to the
    /// UART set with [`ConsoleHub::set_input`].
    pub fn serve(&self, listener: UnixListener) {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let Ok(reader) = conn.try_clone() else {
                continue;
            };
            self.attach(conn);
            let input = self.input.clone();
            std::thread::spawn(move || forward_input(reader, input));
        }
    }
}

type Input = Arc<Mutex<Option<Arc<Mutex<SerialDevice>>>>>;

fn forward_input(mut from: UnixStream, input: Input) {
    let _ = from.set_nonblocking(false);
    let mut buf = [0u8; 256];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let mut rest = &buf[..n];
                // The UART FIFO is small: wait for the guest to drain it.
                while !rest.is_empty() {
                    let serial = input.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    let Some(serial) = serial else { return };
                    let taken = serial
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .enqueue_input(rest);
                    rest = &rest[taken..];
                    if !rest.is_empty() {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                }
            }
        }
    }
}

impl Write for ConsoleHub {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if let Some(f) = self.log.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            let _ = f.write_all(data);
        }
        let mut s = self.lock();
        s.backlog.extend(data);
        let excess = s.backlog.len().saturating_sub(BACKLOG);
        s.backlog.drain(..excess);
        s.clients.retain_mut(|c| match c.write(data) {
            Ok(_) => true,
            Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
        });
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if let Some(f) = self.log.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            f.flush()?;
        }
        Ok(())
    }
}

/// Binds console.sock (removing a stale one).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_get_backlog_then_live_output() {
        let mut hub = ConsoleHub::new(None);
        hub.write_all(b"early\n").unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        hub.attach(a);
        hub.write_all(b"late\n").unwrap();
        let mut buf = [0u8; 11];
        b.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"early\nlate\n");
        drop(b);
        // A gone client is dropped, output continues.
        hub.write_all(b"more\n").unwrap();
        hub.write_all(b"more\n").unwrap();
        assert!(hub.lock().clients.is_empty());
    }

    #[test]
    fn backlog_is_bounded() {
        let mut hub = ConsoleHub::new(None);
        hub.write_all(&vec![b'x'; BACKLOG + 100]).unwrap();
        assert_eq!(hub.lock().backlog.len(), BACKLOG);
    }
}
