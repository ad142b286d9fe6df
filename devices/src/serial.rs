//! The 16550A UART (vm-superio's model) on the port bus, with its input fed
//! from a host file descriptor through the VMM's event loop.

use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vm_superio::serial::NoEvents;
use vm_superio::Serial;
use vmm_sys_util::epoll::EventSet;

use crate::bus::BusDevice;
use crate::irq::IrqLine;

/// Base port of COM1.
pub const COM1_PORT: u16 = 0x3f8;
/// Ports covered by a UART.
pub const SERIAL_PORT_LEN: u16 = 8;
/// The legacy IRQ of COM1.
pub const COM1_IRQ: u32 = 4;

/// Where guest console output goes.
pub type SerialOutput = Box<dyn Write + Send>;

/// A UART raising its interrupt through an [`IrqLine`].
pub struct SerialDevice {
    uart: Serial<IrqLine, NoEvents, SerialOutput>,
}

impl SerialDevice {
    /// Creates a UART that writes guest output to `out`.
    pub fn new(irq: IrqLine, out: SerialOutput) -> Self {
        Self {
            uart: Serial::new(irq, out),
        }
    }

    /// The interrupt line (to register with KVM).
    pub fn irq(&self) -> &IrqLine {
        self.uart.interrupt_evt()
    }

    /// Queues host input for the guest; returns how many bytes fitted.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity();
        let take = bytes.len().min(room);
        match self.uart.enqueue_raw_bytes(&bytes[..take]) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("serial input dropped: {e:?}");
                0
            }
        }
    }

    /// Flushes buffered guest output.
    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = self.uart.read(offset as u8);
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&v) = data.first() {
            if let Err(e) = self.uart.write(offset as u8, v) {
                tracing::warn!("serial write failed: {e:?}");
            }
        }
    }
}

/// Event-loop subscriber that forwards bytes from a host fd (usually stdin)
/// into the UART's receive FIFO.
pub struct SerialInput {
    serial: Arc<Mutex<SerialDevice>>,
    input: RawFd,
}

impl SerialInput {
    /// Forwards input read from `input` (which must stay open) to `serial`.
    pub fn new(serial: Arc<Mutex<SerialDevice>>, input: &impl AsRawFd) -> Self {
        Self {
            serial,
            input: input.as_raw_fd(),
        }
    }
}

impl MutEventSubscriber for SerialInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        // SAFETY: `buf` is a valid writable buffer of the given length and
        // `self.input` is an open descriptor owned by the caller.
        let n = unsafe { libc::read(self.input, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 || events.event_set().contains(EventSet::HANG_UP) {
            // EOF, error or hang-up: stop watching this input.
            let _ = ops.remove(Events::empty_raw(self.input));
            return;
        }
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        serial.enqueue_input(&buf[..n as usize]);
    }

    fn init(&mut self, ops: &mut EventOps) {
        // Files such as /dev/null cannot be polled; input is simply off then.
        if let Err(e) = ops.add(Events::new_raw(self.input, EventSet::IN)) {
            tracing::debug!("serial input not watched: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);
    impl Write for SharedBuf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_and_input_round_trip() {
        let out = SharedBuf::default();
        let mut s = SerialDevice::new(IrqLine::new().unwrap(), Box::new(out.clone()));
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
        assert_eq!(s.enqueue_input(b"x"), 1);
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready after input");
        let mut d = [0u8];
        s.read(0, &mut d);
        assert_eq!(d[0], b'x');
    }
}
