//! The 16550A UART (vm-superio's model) on the port bus, with its input fed
//! from a host file descriptor through the VMM's event loop.

use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;
use vmm_sys_util::epoll::EventSet;

use crate::bus::BusDevice;
use crate::irq::IrqLine;
use crate::persist::Persist;

/// Base port of COM1.
pub const COM1_PORT: u16 = 0x3f8;
/// Ports covered by a UART.
pub const SERIAL_PORT_LEN: u16 = 8;
/// The legacy IRQ of COM1.
pub const COM1_IRQ: u32 = 4;

/// Where guest console output goes.
pub type SerialOutput = Box<dyn Write + Send>;

/// Errors restoring the UART.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// vm-superio refused the state (e.g. more input than its FIFO holds).
    #[error("invalid UART state: {0}")]
    State(#[from] vm_superio::serial::Error<std::io::Error>),
    /// The interrupt line could not be carried over.
    #[error("cannot carry the UART's interrupt line over: {0}")]
    Irq(std::io::Error),
}

/// The UART's registers and receive FIFO, as saved in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UartState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes waiting in the receive FIFO.
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for UartState {
    fn from(s: SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&UartState> for SerialState {
    fn from(s: &UartState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

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

impl Persist for SerialDevice {
    type State = UartState;
    type Error = SerialError;
    const KIND: &'static str = "uart-16550a";
    const VERSION: u32 = 1;

    fn save(&self) -> Result<UartState, SerialError> {
        Ok(self.uart.state().into())
    }

    /// Loads the registers and FIFO, keeping the interrupt line and output.
    /// A state vm-superio refuses changes nothing.
    fn restore(&mut self, state: UartState) -> Result<(), SerialError> {
        let irq = IrqLine::from_eventfd(
            self.uart
                .interrupt_evt()
                .eventfd()
                .try_clone()
                .map_err(SerialError::Irq)?,
        );
        let sink: SerialOutput = Box::new(std::io::sink());
        let mut uart = Serial::from_state(&SerialState::from(&state), irq, NoEvents, sink)?;
        std::mem::swap(uart.writer_mut(), self.uart.writer_mut());
        self.uart = uart;
        Ok(())
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

    /// Port writes and reads of any offset and width, console input, and
    /// saved states with damaged fields: never a panic.
    #[test]
    fn fuzz_ports_and_saved_states() {
        fuzzing::run("serial port", 2000, 512, |u| {
            let mut s = SerialDevice::new(IrqLine::new().unwrap(), Box::new(SharedBuf::default()));
            for _ in 0..u.int_in_range(1..=64)? {
                let off = u.int_in_range(0..=9u64)?;
                let mut b = vec![0u8; *u.choose(&[1usize, 2, 4])?];
                match u.int_in_range(0..=2)? {
                    0 => s.read(off, &mut b),
                    1 => {
                        u.fill_buffer(&mut b)?;
                        s.write(off, &b);
                    }
                    _ => {
                        let input: Vec<u8> = u.arbitrary()?;
                        s.enqueue_input(&input);
                    }
                }
            }
            let json = serde_json::to_vec(&s.save().unwrap()).unwrap();
            if let Ok(st) = serde_json::from_slice::<UartState>(&fuzzing::mutate(&json, u)?) {
                let _ = s.restore(st);
            }
            Ok(())
        });
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

    #[test]
    fn snapshot_round_trip() {
        let mut s = SerialDevice::new(IrqLine::new().unwrap(), Box::new(std::io::sink()));
        s.write(3, &[0x83]); // DLAB on
        s.write(0, &[0x0c]);
        s.write(3, &[0x03]);
        s.write(1, &[0x01]);
        s.enqueue_input(b"ab");
        let snap = s.save().unwrap();
        let mut r = SerialDevice::new(IrqLine::new().unwrap(), Box::new(std::io::sink()));
        r.restore(snap.clone()).unwrap();
        assert_eq!(r.save().unwrap(), snap);
        assert_eq!(snap.in_buffer, b"ab");
        assert_eq!(snap.baud_divisor_low, 0x0c);
        // More input than the FIFO holds is refused, and the UART keeps
        // working with its state unchanged.
        let mut too_much = snap.clone();
        too_much.in_buffer = vec![b'x'; 1000];
        assert!(r.restore(too_much).is_err());
        assert_eq!(r.save().unwrap(), snap);
    }
}
