//! `snapvm console`: the terminal attached to a VM's serial console
//! (the VMM's side is daemon/console_hub.rs).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use super::lifecycle::LifecycleError;
use crate::daemon::console_hub::DETACH_KEY;
use crate::vmdir::VmDir;

/// Restores the terminal mode when dropped.
struct RawMode {
    saved: libc::termios,
}

impl RawMode {
    fn enter() -> Option<Self> {
        // SAFETY: isatty has no memory effects.
        if unsafe { libc::isatty(0) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it for fd 0.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointer to a termios struct.
        if unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw edits the struct it is given; tcsetattr reads it.
        unsafe {
            libc::cfmakeraw(&mut raw);
            libc::tcsetattr(0, libc::TCSANOW, &raw);
        }
        Some(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the attributes saved in `enter`.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.saved) };
    }
}

/// Attaches stdin/stdout to the VM's serial console until Ctrl-] (or EOF on
/// stdin, or the VM stopping).
pub fn console(root: &Path) -> Result<(), LifecycleError> {
    let dir = VmDir::open(root)?;
    let sock = dir.console_socket();
    let stream = UnixStream::connect(&sock)
        .map_err(|_| LifecycleError::NotRunning(dir.root().to_path_buf()))?;
    eprintln!(
        "snapvm: attached to the console of {}; detach with Ctrl-]",
        dir.root().display()
    );
    let _raw = RawMode::enter();
    let mut from_vm = stream.try_clone().map_err(|source| LifecycleError::Io {
        what: "console socket".into(),
        source,
    })?;
    let output = std::thread::spawn(move || {
        let mut out = std::io::stdout();
        let mut buf = [0u8; 4096];
        while let Ok(n) = from_vm.read(&mut buf) {
            if n == 0 || out.write_all(&buf[..n]).is_err() {
                break;
            }
            let _ = out.flush();
        }
    });
    let mut to_vm = stream;
    let mut stdin = std::io::stdin();
    let mut buf = [0u8; 256];
    loop {
        if output.is_finished() {
            break;
        }
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => {
                // No more input: keep showing output until the VM stops.
                let _ = output.join();
                break;
            }
            Ok(n) => n,
        };
        if let Some(pos) = buf[..n].iter().position(|b| *b == DETACH_KEY) {
            let _ = to_vm.write_all(&buf[..pos]);
            break;
        }
        if to_vm.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to_vm.shutdown(std::net::Shutdown::Both);
    drop(_raw);
    eprintln!("\r\nsnapvm: detached");
    Ok(())
}
