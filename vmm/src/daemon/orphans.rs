//! Disk layers an interrupted operation left behind (kill -9, power loss).
//!
//! An operation creates a layer before it names it (a live snapshot forks a
//! disk, then writes vm.toml, and names the frozen layer in tree.json only
//! when the snapshot is published). Killed in between, it leaves either a
//! layer nothing names and nothing stands on, or a layer in the middle of
//! the VM's chain that no snapshot names. Under the VM's lock, before any
//! disk opens (and after an interrupted merge was finished), this module
//! removes the first kind and retires the second (the merge run then merges
//! it with the layer above). It only considers layers snapvm names
//! (`disks/<disk>.<8 hex>.qcow2`) of disks vm.toml or a snapshot has: a
//! detached disk's files stay, as `disk detach` promises, and a file that
//! anything names, or that a named layer stands on, is never touched.

use std::collections::HashSet;
use std::path::PathBuf;

use snapshot::disk::resolve_chain;
use snapshot::merge::normalize;
use snapshot::tree::Tree;

use crate::vmdir::VmDir;

/// What [`collect`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Collected {
    /// Layers removed: named by nothing, under nothing named.
    pub removed: Vec<PathBuf>,
    /// Layers retired: in a named chain, but named by nothing.
    pub retired: Vec<PathBuf>,
}

/// Whether `name` is a layer file snapvm makes for disk `disk`.
fn is_layer_of(name: &str, disk: &str) -> bool {
    name.strip_prefix(disk)
        .and_then(|r| r.strip_prefix('.'))
        .and_then(|r| r.strip_suffix(".qcow2"))
        .is_some_and(|tag| tag.len() == 8 && tag.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Removes or retires the layers interrupted operations left in `dir`
/// (see the module documentation). Call it with the VM's lock held and no
/// merge in progress. Errors reading the metadata leave everything as it is.
pub fn collect(dir: &VmDir) -> Collected {
    let mut done = Collected::default();
    let (Ok(toml), Ok(tree)) = (dir.load(), Tree::load(&dir.tree_path())) else {
        tracing::warn!("disk layers left by interrupted operations are not cleaned up: vm.toml or tree.json does not read");
        return done;
    };
    if tree.merge.is_some() {
        return done;
    }
    let own = normalize(&dir.disks_dir());
    let mut disks: HashSet<String> = toml.disks.iter().map(|d| d.name.clone()).collect();
    for s in &tree.snapshots {
        disks.extend(s.disks.iter().map(|d| d.name.clone()));
    }
    // What is named, and everything a named layer stands on.
    let mut named: HashSet<PathBuf> = HashSet::new();
    for d in &toml.disks {
        named.insert(normalize(&dir.resolve(&d.base)));
        named.insert(normalize(&dir.resolve(&d.current)));
    }
    for s in &tree.snapshots {
        named.extend(s.disks.iter().map(|d| normalize(&dir.resolve(&d.layer))));
    }
    let retired: HashSet<PathBuf> = tree
        .retired
        .iter()
        .map(|r| normalize(&dir.resolve(r)))
        .collect();
    let mut reachable: HashSet<PathBuf> = HashSet::new();
    let mut unnamed_middle: Vec<PathBuf> = Vec::new();
    for top in named.iter().chain(retired.iter()) {
        let Ok(chain) = resolve_chain(top) else {
            // A chain that does not open is not ours to judge: nothing
            // under it is removed.
            tracing::warn!(
                "cannot follow the backing chain of {}: nothing is cleaned up",
                top.display()
            );
            return done;
        };
        for l in chain {
            let p = normalize(&l.path);
            if p.starts_with(&own)
                && !named.contains(&p)
                && !retired.contains(&p)
                && !unnamed_middle.contains(&p)
            {
                unnamed_middle.push(p.clone());
            }
            reachable.insert(p);
        }
    }
    let Ok(entries) = std::fs::read_dir(dir.disks_dir()) else {
        return done;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let p = normalize(&e.path());
        if reachable.contains(&p) || !disks.iter().any(|d| is_layer_of(&name, d)) {
            continue;
        }
        match std::fs::remove_file(&p) {
            Ok(()) => {
                tracing::warn!("removed disk layer {name}, left by an interrupted operation");
                done.removed.push(p);
            }
            Err(err) => tracing::warn!("cannot remove the leftover layer {name}: {err}"),
        }
    }
    if !unnamed_middle.is_empty() {
        let rel: Vec<PathBuf> = unnamed_middle.iter().map(|p| dir.relative(p)).collect();
        let updated = Tree::update(&dir.tree_path(), |t| {
            for r in &rel {
                if !t.retired.contains(r) {
                    t.retired.push(r.clone());
                }
            }
            Ok(())
        });
        match updated {
            Ok(()) => {
                for p in &unnamed_middle {
                    tracing::warn!(
                        "retired disk layer {}, left in the chain by an interrupted operation (it is merged away)",
                        dir.relative(p).display()
                    );
                }
                done.retired = unnamed_middle;
            }
            Err(e) => tracing::warn!("cannot retire leftover layers: {e}"),
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_snapvm_layer_names_of_known_disks() {
        assert!(is_layer_of("disk0.2835302b.qcow2", "disk0"));
        assert!(!is_layer_of("disk0.raw", "disk0"));
        assert!(!is_layer_of("disk0.detached.raw", "disk0"));
        assert!(!is_layer_of("disk10.2835302b.qcow2", "disk1"));
        assert!(!is_layer_of("disk0.xyz.qcow2", "disk0"));
    }
}
