//! Merging disk layers after snapshots are deleted (docs/formats.md, disk layers).
//!
//! A layer that no snapshot and no VM uses any more ("retired") is removed
//! when nothing is backed by it, merged with its child when exactly one
//! layer is, and kept while several are. A merge goes one of two ways:
//!
//! - **into the child** ([`Direction::IntoChild`]): every range the parent
//!   holds and the child does not is copied into the child, then the
//!   child's backing reference moves to the grandparent and the parent is
//!   removed. The only way when the child is a running VM's working layer
//!   (the VM keeps writing it; the copy of each range happens under the
//!   disk's lock, so a guest write is never overwritten by older data).
//! - **into the parent** ([`Direction::IntoParent`]): every range the child
//!   holds is copied into the parent, then the parent file is renamed over
//!   the child, so everything that names the child (snapshots, grandchild
//!   layers) reads the merged file and no header changes.
//!
//! The chain reads the same at every instant: copying into the child only
//! fills ranges the child would have read from the parent anyway, with
//! the same bytes; copying into the parent only changes ranges the child
//! hides. The switch (header rewrite or rename) happens only after the
//! copied data is durable, and is journaled in tree.json first so that a
//! crash at any point is finished on the next start.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::disk::{resolve_chain, Disk, DiskError, Held, Layer};
use crate::qcow2_header::HeaderError;

/// Errors of a merge; each names the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// A layer could not be opened.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// The child's header could not be rewritten.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// Reading, writing or syncing a layer failed.
    #[error("merging {path}: {source}")]
    Io {
        /// The layer.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The merge was stopped (a snapshot or apply needs the disks); it
    /// resumes later. The chain is intact.
    #[error("merge interrupted")]
    Cancelled,
}

/// Which way a merge copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// Parent's data into the child, child re-pointed at the grandparent.
    IntoChild,
    /// Child's data into the parent, parent renamed over the child.
    IntoParent,
}

/// Where a journaled merge is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Copying data. Interrupted here, the chain is untouched in meaning;
    /// the merge simply starts again.
    Copying,
    /// The data is durable; the child's cluster 0 is (being) replaced by
    /// these bytes, then the parent is removed. Redone after a crash.
    Switching {
        /// New cluster-0 bytes of the child.
        header: Vec<u8>,
    },
    /// The data is durable; the parent is (being) renamed over the child.
    /// Redone after a crash if the parent still exists.
    Renaming,
}

/// The journal entry of the merge in progress (kept in tree.json).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeRecord {
    /// The retired layer, relative to the VM directory.
    pub parent: PathBuf,
    /// Its only child, relative to the VM directory.
    pub child: PathBuf,
    /// Which way.
    pub direction: Direction,
    /// How far.
    pub phase: Phase,
}

/// A range a layer holds itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Byte offset on the virtual disk.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Explicit zeroes rather than data.
    pub zero: bool,
}

/// The ranges `path` holds itself (not through its backing file), in
/// order, adjacent ranges of the same kind joined.
pub fn own_extents(path: &Path) -> Result<Vec<Extent>, MergeError> {
    let d = Disk::open_alone(path)?;
    let size = d.size();
    let mut out: Vec<Extent> = Vec::new();
    let mut at = 0;
    while at < size {
        let (held, n) = d
            .top_extent(at, size - at)
            .map_err(|source| MergeError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        if held != Held::Below {
            let zero = held == Held::Zero;
            match out.last_mut() {
                Some(l) if l.zero == zero && l.offset + l.len == at => l.len += n,
                _ => out.push(Extent {
                    offset: at,
                    len: n,
                    zero,
                }),
            }
        }
        at += n;
    }
    Ok(out)
}

/// Bytes of data `path` holds itself (explicit zeroes cost nothing).
pub fn own_bytes(path: &Path) -> Result<u64, MergeError> {
    Ok(own_extents(path)?
        .iter()
        .filter(|e| !e.zero)
        .map(|e| e.len)
        .sum())
}

/// Splits `extents` into pieces of at most `chunk` bytes.
pub fn chunks(extents: &[Extent], chunk: u64) -> Vec<Extent> {
    let mut out = Vec::new();
    for e in extents {
        let mut at = e.offset;
        while at < e.offset + e.len {
            let len = chunk.min(e.offset + e.len - at);
            out.push(Extent {
                offset: at,
                len,
                zero: e.zero,
            });
            at += len;
        }
    }
    out
}

/// Copies what `child` holds itself into `parent` (see the module
/// documentation), calling `step` with the bytes done after each piece;
/// `step` returning false stops with [`MergeError::Cancelled`]. Makes the
/// parent durable before returning.
pub fn copy_into_parent(
    child: &Path,
    parent: &Path,
    chunk: u64,
    mut step: impl FnMut(u64) -> bool,
) -> Result<u64, MergeError> {
    let pieces = chunks(&own_extents(child)?, chunk);
    let src = Disk::open_alone(child)?;
    let dst = Disk::open(parent, false)?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| MergeError::Io { path, source }
    };
    let mut buf = Vec::new();
    let mut done = 0;
    for p in pieces {
        if p.zero {
            dst.write_zeroes(p.offset, p.len).map_err(io(parent))?;
        } else {
            buf.resize(p.len as usize, 0);
            src.read_at(&mut buf, p.offset).map_err(io(child))?;
            dst.write_at(&buf, p.offset).map_err(io(parent))?;
        }
        done += p.len;
        if !step(done) {
            dst.write_back().map_err(io(parent))?;
            return Err(MergeError::Cancelled);
        }
    }
    dst.flush().map_err(io(parent))?;
    Ok(done)
}

/// Copies what `parent` holds into its child `child` piece by piece: each
/// piece is read from the parent alone, then handed to `fill`, which
/// writes the parts the child does not hold itself (see
/// [`Disk::fill_below`]; the child may be open elsewhere, e.g. by a running
/// VM). `step` as in [`copy_into_parent`].
pub fn copy_down(
    parent: &Path,
    child: &Path,
    chunk: u64,
    mut fill: impl FnMut(&[u8], u64, bool) -> io::Result<u64>,
    mut step: impl FnMut(u64) -> bool,
) -> Result<u64, MergeError> {
    let pieces = chunks(&own_extents(parent)?, chunk);
    let src = Disk::open_alone(parent)?;
    let mut buf = Vec::new();
    let mut done = 0;
    for p in pieces {
        buf.resize(p.len as usize, 0);
        if !p.zero {
            src.read_at(&mut buf, p.offset)
                .map_err(|source| MergeError::Io {
                    path: parent.to_path_buf(),
                    source,
                })?;
        }
        fill(&buf, p.offset, p.zero).map_err(|source| MergeError::Io {
            path: child.to_path_buf(),
            source,
        })?;
        done += p.len;
        if !step(done) {
            return Err(MergeError::Cancelled);
        }
    }
    Ok(done)
}

/// [`copy_down`] into `child` opened here (nothing else may write it).
/// Makes the child durable before returning.
pub fn copy_into_child(
    parent: &Path,
    child: &Path,
    chunk: u64,
    step: impl FnMut(u64) -> bool,
) -> Result<u64, MergeError> {
    let dst = Disk::open(child, false)?;
    let io = |source| MergeError::Io {
        path: child.to_path_buf(),
        source,
    };
    let r = copy_down(
        parent,
        child,
        chunk,
        |b, o, z| dst.fill_below(b, o, z),
        step,
    );
    if r.is_ok() {
        dst.flush().map_err(io)?;
    } else {
        dst.write_back().map_err(io)?;
    }
    r
}

/// The layers in use and how they are stacked.
#[derive(Debug, Default)]
pub struct LayerGraph {
    /// Each layer's backing layer (None for a base image).
    pub parent: HashMap<PathBuf, Option<Layer>>,
    /// Layers directly backed by each layer.
    pub children: HashMap<PathBuf, Vec<PathBuf>>,
}

/// `p` made absolute and free of `.`/`..`/symlinks where it exists.
pub fn normalize(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

impl LayerGraph {
    /// The graph of every layer reachable from `tops` (the layers that
    /// snapshots and the VM use).
    pub fn build(tops: &[PathBuf]) -> Result<Self, MergeError> {
        let mut g = Self::default();
        for top in tops {
            let chain = resolve_chain(top)?;
            for (i, l) in chain.iter().enumerate() {
                let me = normalize(&l.path);
                if g.parent.contains_key(&me) {
                    break;
                }
                let below = chain.get(i + 1).map(|b| Layer {
                    path: normalize(&b.path),
                    format: b.format,
                });
                if let Some(b) = &below {
                    g.children
                        .entry(b.path.clone())
                        .or_default()
                        .push(me.clone());
                }
                g.parent.insert(me, below);
            }
        }
        Ok(g)
    }
}

/// What to do with one retired layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing uses it or stands on it: remove the file.
    Remove(PathBuf),
    /// It is in use again, or a base image (never merged): just forget it.
    Forget(PathBuf),
    /// Exactly one layer stands on it: merge the two.
    Merge {
        /// The retired layer.
        parent: PathBuf,
        /// Its only child.
        child: PathBuf,
        /// The parent's backing layer.
        grandparent: Layer,
    },
    /// Several layers stand on it: it waits until only one does.
    Wait {
        /// The retired layer.
        layer: PathBuf,
        /// How many layers stand on it.
        children: usize,
    },
}

/// Decides what to do with each retired layer (absolute paths). `used`
/// are the layers snapshots and the VM name directly.
pub fn plan(graph: &LayerGraph, used: &[PathBuf], retired: &[PathBuf]) -> Vec<Action> {
    let used: Vec<PathBuf> = used.iter().map(|p| normalize(p)).collect();
    retired
        .iter()
        .map(|r| {
            let r = normalize(r);
            if used.contains(&r) {
                return Action::Forget(r);
            }
            let Some(below) = graph.parent.get(&r) else {
                return if r.exists() {
                    Action::Remove(r)
                } else {
                    Action::Forget(r)
                };
            };
            let Some(grandparent) = below.clone() else {
                return Action::Forget(r);
            };
            match graph.children.get(&r).map(Vec::as_slice) {
                Some([only]) => Action::Merge {
                    parent: r.clone(),
                    child: only.clone(),
                    grandparent,
                },
                Some(many) => Action::Wait {
                    layer: r.clone(),
                    children: many.len(),
                },
                None => Action::Remove(r),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{create_overlay, Disk};

    use crate::test_util::Tmp;

    const MIB: u64 = 1 << 20;

    /// base (all 1) <- mid (writes 2 at 1 MiB, zeroes at 3 MiB) <- top
    /// (writes 3 at 1 MiB + 64 KiB and at 5 MiB).
    fn stack(t: &Tmp) -> (PathBuf, PathBuf, PathBuf) {
        let base = t.0.join("base.raw");
        std::fs::write(&base, vec![1u8; 8 * MIB as usize]).unwrap();
        let mid = t.0.join("mid.qcow2");
        create_overlay(&base, &mid).unwrap();
        let d = Disk::open(&mid, false).unwrap();
        d.write_at(&vec![2u8; 256 << 10], MIB).unwrap();
        d.write_zeroes(3 * MIB, MIB).unwrap();
        d.flush().unwrap();
        drop(d);
        let top = t.0.join("top.qcow2");
        create_overlay(&mid, &top).unwrap();
        let d = Disk::open(&top, false).unwrap();
        d.write_at(&vec![3u8; 64 << 10], MIB + (64 << 10)).unwrap();
        d.write_at(&vec![3u8; 4096], 5 * MIB).unwrap();
        d.flush().unwrap();
        (base, mid, top)
    }

    fn content(p: &Path) -> Vec<u8> {
        let d = Disk::open(p, true).unwrap();
        let mut b = vec![0u8; d.size() as usize];
        d.read_at(&mut b, 0).unwrap();
        b
    }

    #[test]
    fn own_extents_list_data_and_zeroes() {
        let t = Tmp::new("ext");
        let (_, mid, _) = stack(&t);
        let e = own_extents(&mid).unwrap();
        assert!(e
            .iter()
            .any(|e| !e.zero && e.offset <= MIB && e.offset + e.len >= MIB + (256 << 10)));
        assert!(e
            .iter()
            .any(|e| e.zero && e.offset <= 3 * MIB && e.offset + e.len >= 4 * MIB));
        assert!(own_bytes(&mid).unwrap() >= 256 << 10);
        assert!(own_bytes(&mid).unwrap() < MIB);
    }

    #[test]
    fn into_child_then_rebase_reads_the_same() {
        let t = Tmp::new("child");
        let (base, mid, top) = stack(&t);
        let before = content(&top);
        let mut steps = 0;
        copy_into_child(&mid, &top, 64 << 10, |_| {
            steps += 1;
            // Mid-copy, the chain already reads the same.
            steps != 3 || content(&top) == before
        })
        .unwrap();
        assert_eq!(content(&top), before);
        let h =
            crate::qcow2_header::rebacked_header(&top, "base.raw", crate::disk::DiskFormat::Raw)
                .unwrap();
        crate::qcow2_header::write_header(&top, &h).unwrap();
        std::fs::remove_file(&mid).unwrap();
        assert_eq!(content(&top), before);
        assert!(normalize(&resolve_chain(&top).unwrap()[1].path) == normalize(&base));
    }

    #[test]
    fn into_parent_then_rename_reads_the_same() {
        let t = Tmp::new("parent");
        let (_, mid, top) = stack(&t);
        let before = content(&top);
        copy_into_parent(&top, &mid, 64 << 10, |_| true).unwrap();
        assert_eq!(
            content(&top),
            before,
            "the chain reads the same before the rename"
        );
        std::fs::rename(&mid, &top).unwrap();
        assert_eq!(content(&top), before);
        assert_eq!(resolve_chain(&top).unwrap().len(), 2);
    }

    #[test]
    fn cancelled_copy_leaves_the_chain_intact() {
        let t = Tmp::new("cancel");
        let (_, mid, top) = stack(&t);
        let before = content(&top);
        let r = copy_into_parent(&top, &mid, 4096, |done| done < 8192);
        assert!(matches!(r, Err(MergeError::Cancelled)));
        assert_eq!(content(&top), before);
        let r = copy_into_child(&mid, &top, 4096, |done| done < 8192);
        assert!(matches!(r, Err(MergeError::Cancelled)));
        assert_eq!(content(&top), before);
    }

    #[test]
    fn plan_removes_merges_and_waits() {
        let t = Tmp::new("plan");
        let (base, mid, top) = stack(&t);
        let other = t.0.join("other.qcow2");
        create_overlay(&mid, &other).unwrap();
        let gone = t.0.join("gone.qcow2");
        create_overlay(&top, &gone).unwrap();
        let used = vec![top.clone(), other.clone()];
        let g = LayerGraph::build(&used).unwrap();
        let acts = plan(
            &g,
            &used,
            &[mid.clone(), gone.clone(), base.clone(), top.clone()],
        );
        assert_eq!(
            acts[0],
            Action::Wait {
                layer: normalize(&mid),
                children: 2
            }
        );
        assert_eq!(acts[1], Action::Remove(normalize(&gone)));
        assert_eq!(acts[2], Action::Forget(normalize(&base)));
        assert_eq!(acts[3], Action::Forget(normalize(&top)));
        let used = vec![top.clone()];
        let g = LayerGraph::build(&used).unwrap();
        match &plan(&g, &used, std::slice::from_ref(&mid))[0] {
            Action::Merge {
                parent,
                child,
                grandparent,
            } => {
                assert_eq!(parent, &normalize(&mid));
                assert_eq!(child, &normalize(&top));
                assert_eq!(grandparent.path, normalize(&base));
            }
            a => panic!("{a:?}"),
        }
    }
}
