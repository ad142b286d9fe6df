//! What the CLI prints: the status of a VM, the snapshot tree as text,
//! merges waiting and done.

use std::time::Duration;

use snapshot::tree::{SnapshotMeta, Tree};

use crate::api::{MergeOutcome, VmStatus};

/// Human-readable status.
pub fn format_status(v: &VmStatus) -> String {
    let mut s = format!(
        "{}: {}\n  directory: {}\n",
        v.name,
        v.state.as_str(),
        v.vmdir.display()
    );
    if let Some(pid) = v.pid {
        s += &format!(
            "  pid: {pid}\n  uptime: {:.1} s\n",
            v.uptime_s.unwrap_or(0.0)
        );
    }
    s += &format!(
        "  memory: {} MiB\n  vcpus: {}\n",
        v.memory_bytes >> 20,
        v.vcpus
    );
    for d in &v.disks {
        s += &format!(
            "  disk {}{}{}:\n",
            d.name,
            if d.readonly { " (read-only)" } else { "" },
            if d.independent { " (independent)" } else { "" }
        );
        for (i, l) in d.layers.iter().enumerate() {
            let role = if i == 0 { "working layer" } else { "backing" };
            s += &format!("    {l}  ({role})\n");
        }
    }
    for n in &v.nets {
        s += &format!("  net {}: tap {}, MAC {}\n", n.name, n.tap, n.mac);
    }
    if let Some(l) = &v.memory_load {
        s += &format!(
            "  memory still loading after an apply: {} of {} MiB\n",
            l.chunks_loaded * 2,
            l.chunks * 2
        );
    }
    let m = &v.merges;
    if let Some(j) = &m.job {
        s += &format!(
            "  merge in progress: job {}, {} of {} MiB\n",
            j.id,
            j.done >> 20,
            j.total >> 20
        );
    }
    if let Some(p) = &m.in_progress {
        s += &format!(
            "  merging: {} with {}\n",
            p.parent.display(),
            p.child.display()
        );
    }
    for w in &m.waiting {
        s += &format!("  waiting for a merge: {}\n", w.display());
    }
    if let Some(e) = &v.last_exit {
        s += &format!("  last exit: {}\n", e.outcome);
    }
    s
}

fn when(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .trim_end_matches('Z')
        .replace('T', " ")
}

fn tree_label(s: &SnapshotMeta) -> String {
    let pause = s
        .pause_us
        .map(|p| format!(", paused {:.2} ms", p as f64 / 1000.0))
        .unwrap_or_default();
    format!(
        "{} ({}) {} {}{pause}",
        s.name,
        &s.id[..8.min(s.id.len())],
        format!("{:?}", s.power_state).to_lowercase(),
        when(s.created_ms)
    )
}

fn tree_walk(tree: &Tree, parent: Option<&str>, prefix: &str, out: &mut String) {
    let orphan = |s: &SnapshotMeta| {
        s.parent
            .as_deref()
            .is_some_and(|p| !tree.snapshots.iter().any(|x| x.id == p))
    };
    let mut items: Vec<Option<&SnapshotMeta>> = tree
        .snapshots
        .iter()
        .filter(|s| s.parent.as_deref() == parent || (parent.is_none() && orphan(s)))
        .map(Some)
        .collect();
    if tree.now.as_deref() == parent {
        items.push(None); // "Now"
    }
    let n = items.len();
    for (i, item) in items.into_iter().enumerate() {
        let (branch, cont) = if i + 1 == n {
            ("└── ", "    ")
        } else {
            ("├── ", "│   ")
        };
        match item {
            Some(s) => {
                out.push_str(&format!("{prefix}{branch}{}\n", tree_label(s)));
                tree_walk(tree, Some(&s.id), &format!("{prefix}{cont}"), out);
            }
            None => out.push_str(&format!("{prefix}{branch}Now\n")),
        }
    }
}

/// The snapshot tree as text: each snapshot under its parent, and "Now"
/// under the snapshot the current state hangs from.
pub fn render_tree(tree: &Tree) -> String {
    let mut out = String::new();
    tree_walk(tree, None, "", &mut out);
    out
}

/// Lines about disk layers waiting for a merge and the merge in progress.
pub fn render_merges(tree: &Tree) -> String {
    let mut s = String::new();
    if let Some(m) = &tree.merge {
        s += &format!(
            "merging disk layer {} with {} ({:?})\n",
            m.parent.display(),
            m.child.display(),
            m.direction
        );
    }
    for r in &tree.retired {
        s += &format!("disk layer {} waits for a merge\n", r.display());
    }
    s
}

/// One line about a merge job's result.
pub fn merge_summary(r: &MergeOutcome) -> String {
    let rep = r.report();
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let mut s = format!(
        "merged {} disk layer(s), removed {}; copied {:.1} MiB; disk files {:.1} MiB -> {:.1} MiB",
        rep.merged,
        rep.removed,
        mib(rep.copied_bytes),
        mib(rep.disk_bytes_before),
        mib(rep.disk_bytes_after),
    );
    if !rep.waiting.is_empty() {
        s += &format!(
            "; {} layer(s) wait until only one layer stands on them",
            rep.waiting.len()
        );
    }
    if r.interrupted() {
        s += " (interrupted by another job; it continues after it)";
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapshot::tree::{PowerState, SnapshotMeta, Tree};

    fn meta(id: &str, name: &str, parent: Option<&str>) -> SnapshotMeta {
        SnapshotMeta {
            id: id.into(),
            name: name.into(),
            description: String::new(),
            created_ms: 0,
            parent: parent.map(str::to_string),
            power_state: PowerState::Running,
            pause_us: None,
            memory_bytes: 0,
            duration_ms: 0,
            disks: vec![],
            clones: vec![],
        }
    }

    #[test]
    fn tree_shows_branches_and_now() {
        let mut t = Tree::default();
        t.add(meta("aaaaaaaa-1", "A", None));
        t.add(meta("bbbbbbbb-1", "B", Some("aaaaaaaa-1")));
        t.add(meta("cccccccc-1", "C", Some("aaaaaaaa-1")));
        t.now = Some("aaaaaaaa-1".into());
        let text = render_tree(&t);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].starts_with("└── A (aaaaaaaa) running"), "{text}");
        assert!(lines[1].starts_with("    ├── B (bbbbbbbb)"), "{text}");
        assert!(lines[2].starts_with("    ├── C (cccccccc)"), "{text}");
        assert_eq!(lines[3], "    └── Now");
        t.now = None;
        assert!(render_tree(&t).ends_with("└── Now\n"));
    }
}
