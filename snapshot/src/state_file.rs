//! state.bin (and other small snapshot records): a fixed header — magic
//! "SNAPVMST", format version, CRC32, payload length — then a JSON payload.
//! The version numbers the payload's layout; the caller decodes the payload
//! according to the version it finds, so that every version ever written
//! stays readable (docs/formats.md).

use std::io;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

const MAGIC: &[u8; 8] = b"SNAPVMST";
const HEADER_LEN: usize = 24;

/// Errors of state files; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    /// I/O failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Not a snapvm state file.
    #[error("{0}: not a snapvm state file (bad magic)")]
    BadMagic(PathBuf),
    /// A version this snapvm cannot read (a newer snapvm wrote it, or the
    /// file is damaged).
    #[error(
        "{path}: unsupported state file version {version} (this snapvm reads versions 1 to {newest}{})",
        if *.version > *.newest { "; a newer snapvm wrote it" } else { "" }
    )]
    BadVersion {
        /// The file.
        path: PathBuf,
        /// The version found.
        version: u32,
        /// The newest version this build reads.
        newest: u32,
    },
    /// Shorter than its header says.
    #[error("{0}: truncated state file")]
    Truncated(PathBuf),
    /// Checksum mismatch.
    #[error("{0}: corrupt state file (checksum mismatch)")]
    BadChecksum(PathBuf),
    /// The payload does not decode.
    #[error("{path}: invalid state payload: {message}")]
    Payload {
        /// The file.
        path: PathBuf,
        /// The decoder's message.
        message: String,
    },
}

/// Encodes `value` as format `version`, with header and checksum.
pub fn encode<T: Serialize>(version: u32, value: &T) -> Result<Vec<u8>, serde_json::Error> {
    let payload = serde_json::to_vec(value)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Writes `value` as format `version` to `path` atomically (write, fsync,
/// rename, fsync dir).
pub fn write<T: Serialize>(path: &Path, version: u32, value: &T) -> Result<(), StateFileError> {
    let data = encode(version, value).map_err(|e| StateFileError::Payload {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    crate::atomic_file::write_atomic(path, &data).map_err(|source| StateFileError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads and checks `path`, a file of format 1 to `newest`; returns its
/// version and payload.
pub fn read(path: &Path, newest: u32) -> Result<(u32, Vec<u8>), StateFileError> {
    let p = path.to_path_buf();
    let data = std::fs::read(path).map_err(|source| StateFileError::Io {
        path: p.clone(),
        source,
    })?;
    if data.len() < 8 || &data[..8] != MAGIC {
        return Err(
            if data.len() < HEADER_LEN && MAGIC.starts_with(&data[..data.len().min(8)]) {
                StateFileError::Truncated(p)
            } else {
                StateFileError::BadMagic(p)
            },
        );
    }
    if data.len() < HEADER_LEN {
        return Err(StateFileError::Truncated(p));
    }
    let version = u32::from_le_bytes(data[8..12].try_into().unwrap_or_default());
    if version == 0 || version > newest {
        return Err(StateFileError::BadVersion {
            path: p,
            version,
            newest,
        });
    }
    let crc = u32::from_le_bytes(data[12..16].try_into().unwrap_or_default());
    let len = u64::from_le_bytes(data[16..24].try_into().unwrap_or_default());
    let payload = &data[HEADER_LEN..];
    if (payload.len() as u64) < len {
        return Err(StateFileError::Truncated(p));
    }
    let payload = &payload[..len as usize];
    if crc32fast::hash(payload) != crc {
        return Err(StateFileError::BadChecksum(p));
    }
    Ok((version, payload.to_vec()))
}

/// Decodes the payload of `path` (as read by [`read`]).
pub fn decode<T: DeserializeOwned>(path: &Path, payload: &[u8]) -> Result<T, StateFileError> {
    serde_json::from_slice(payload).map_err(|e| StateFileError::Payload {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct S {
        a: u64,
        b: Vec<u8>,
    }

    #[test]
    fn round_trip_and_rejections() {
        let p = std::env::temp_dir().join(format!("snapvm-state-{}", std::process::id()));
        let v = S {
            a: 7,
            b: vec![1, 2, 3],
        };
        write(&p, 2, &v).unwrap();
        let (version, payload) = read(&p, 2).unwrap();
        assert_eq!(version, 2);
        assert_eq!(decode::<S>(&p, &payload).unwrap(), v);
        assert!(decode::<Vec<u8>>(&p, &payload)
            .unwrap_err()
            .to_string()
            .contains("invalid state payload"));
        let good = std::fs::read(&p).unwrap();
        let check = |data: &[u8], want: &str| {
            std::fs::write(&p, data).unwrap();
            let e = read(&p, 2).unwrap_err().to_string();
            assert!(
                e.contains(want) && e.contains("snapvm-state"),
                "{want}: {e}"
            );
        };
        let mut flip = good.clone();
        let n = flip.len();
        flip[n - 3] ^= 0x20;
        check(&flip, "checksum mismatch");
        check(&good[..good.len() - 2], "truncated");
        check(&good[..12], "truncated");
        let mut ver = good.clone();
        ver[8] = 3;
        check(
            &ver,
            "unsupported state file version 3 (this snapvm reads versions 1 to 2",
        );
        ver[8] = 0;
        check(&ver, "unsupported state file version 0");
        check(b"hello world, this is not it", "bad magic");
        std::fs::remove_file(&p).unwrap();
    }
}
