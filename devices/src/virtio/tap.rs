//! A TAP device as the host side of a virtio-net device: frames go to and
//! come from the host's network stack (a bridge, a namespace) with a
//! virtio-net header in front (IFF_VNET_HDR), so checksum and segmentation
//! offloads pass through unchanged.
//!
//! Written here because the TUN/TAP crates on crates.io are built around
//! async runtimes or point-to-point TUN use; what a VMM needs is five
//! ioctls on one descriptor (linux/if_tun.h).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

/// `TUNSETIFF`: `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `TUNSETOFFLOAD`: `_IOW('T', 208, unsigned int)`.
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// `TUNSETVNETHDRSZ`: `_IOW('T', 216, int)`.
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// Offloads the guest can take (`TUNSETOFFLOAD` flags).
pub const TUN_F_CSUM: u32 = 0x01;
/// TCP segmentation over IPv4.
pub const TUN_F_TSO4: u32 = 0x02;
/// TCP segmentation over IPv6.
pub const TUN_F_TSO6: u32 = 0x04;

/// Size of the virtio-net header in front of every frame (virtio 1.x:
/// `struct virtio_net_hdr_v1`, with `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;

/// Longest interface name (IFNAMSIZ without the NUL).
pub const MAX_NAME: usize = 15;

/// Errors opening or configuring a TAP.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name does not fit.
    #[error("tap name '{0}' is empty, longer than {MAX_NAME} bytes or has a '/', ':' or space")]
    BadName(String),
    /// /dev/net/tun could not be opened.
    #[error("cannot open /dev/net/tun for tap {name}: {source} (load the tun module; root or CAP_NET_ADMIN is needed)")]
    Open {
        /// The tap.
        name: String,
        /// The OS error.
        source: io::Error,
    },
    /// The name belongs to an interface that is not a free tap.
    #[error("interface {name} exists but is not a TAP device this VMM can take ({source}): another kind of interface, or a tap another process holds")]
    NotATap {
        /// The interface.
        name: String,
        /// The OS error of TUNSETIFF.
        source: io::Error,
    },
    /// An ioctl failed.
    #[error("tap {name}: {what} failed: {source}")]
    Ioctl {
        /// The tap.
        name: String,
        /// Which ioctl.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open TAP device (non-blocking).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    created: bool,
}

/// Whether `name` is a valid interface name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.contains(['/', ':', ' ', '\0'])
        && name != "."
        && name != ".."
}

impl Tap {
    /// Opens tap `name`, creating it (and bringing it up) if it does not
    /// exist; an existing one (e.g. on a user's bridge) is used as it is.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if !valid_name(name) {
            return Err(TapError::BadName(name.into()));
        }
        // Asked of the kernel (in this process's network namespace), not
        // of /sys, which shows the namespace that mounted it.
        let cname = std::ffi::CString::new(name).map_err(|_| TapError::BadName(name.into()))?;
        // SAFETY: if_nametoindex reads the NUL-terminated string passed.
        let existed = unsafe { libc::if_nametoindex(cname.as_ptr()) } != 0;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| TapError::Open {
                name: name.into(),
                source,
            })?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        let tap = Self {
            file,
            name: name.into(),
            created: !existed,
        };
        // SAFETY: TUNSETIFF reads and writes the ifreq passed, which lives
        // for the call.
        tap.ioctl("TUNSETIFF", TUNSETIFF, &mut req as *mut IfReq as usize)
            .map_err(|e| match e {
                TapError::Ioctl { name, source, .. } if existed => {
                    TapError::NotATap { name, source }
                }
                e => e,
            })?;
        let mut hdr = VNET_HDR_LEN as libc::c_int;
        tap.ioctl(
            "TUNSETVNETHDRSZ",
            TUNSETVNETHDRSZ,
            &mut hdr as *mut libc::c_int as usize,
        )?;
        if tap.created {
            tap.set_up()?;
        }
        Ok(tap)
    }

    fn ioctl(&self, what: &'static str, req: libc::c_ulong, arg: usize) -> Result<(), TapError> {
        // SAFETY: every caller passes an argument of the size and kind the
        // request expects (an ifreq, an int, or a flag word by value).
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), req, arg) };
        if rc < 0 {
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                what,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Brings the interface up (a tap this VMM created).
    fn set_up(&self) -> Result<(), TapError> {
        // SAFETY: a datagram socket only used for the two ioctls below.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if sock < 0 {
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                what: "socket",
                source: io::Error::last_os_error(),
            });
        }
        let mut req = IfReq {
            name: [0; 16],
            flags: 0,
            _pad: [0; 22],
        };
        req.name[..self.name.len()].copy_from_slice(self.name.as_bytes());
        // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq, which
        // lives for the calls; `sock` is closed afterwards.
        let rc = unsafe {
            let mut rc = libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req as *mut IfReq);
            if rc == 0 {
                req.flags |= libc::IFF_UP as libc::c_short;
                rc = libc::ioctl(sock, libc::SIOCSIFFLAGS, &mut req as *mut IfReq);
            }
            rc
        };
        let err = io::Error::last_os_error();
        // SAFETY: closing the socket opened above.
        unsafe { libc::close(sock) };
        if rc < 0 {
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                what: "SIOCSIFFLAGS (up)",
                source: err,
            });
        }
        Ok(())
    }

    /// Tells the tap which offloads the guest takes (TUN_F_* flags): frames
    /// to the guest may then carry partial checksums and be segmentation
    /// offloaded. Fails if the tap cannot do them.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        self.ioctl("TUNSETOFFLOAD", TUNSETOFFLOAD, flags as usize)
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this VMM created the interface (it goes away with the VMM).
    pub fn created(&self) -> bool {
        self.created
    }

    /// Reads one frame (with its virtio-net header) into `buf`; WouldBlock
    /// when none is waiting.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: reads into `buf`, valid for its length.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Writes one frame (with its virtio-net header).
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        // SAFETY: writes from `frame`, valid for its length.
        let n = unsafe { libc::write(self.file.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

use std::os::unix::fs::OpenOptionsExt;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_name("tap0"));
        assert!(valid_name("snapvm-tap-1234"));
        assert!(!valid_name(""));
        assert!(!valid_name("a-name-that-is-too-long"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name("a b"));
        assert!(matches!(Tap::open("x/y"), Err(TapError::BadName(_))));
    }
}
