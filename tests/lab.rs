//! Randomized lab sessions: a seeded sequence of what a lab user does
//! (live and powered-off snapshots, applies, deletes of one snapshot or a
//! subtree, stop, start, and kill -9 of the VMM in the middle of a create,
//! an apply or a delete) against a model of the snapshot tree. After every
//! operation the tree snapvm reports equals the model (every snapshot's
//! parent, and "now"), the power state is the one expected, the guest
//! verifies its memory and disk after every apply that leaves it running,
//! and once merges are done the VM directory holds exactly the files its
//! metadata names, each accepted by `qemu-img check`.
//!
//! A short session runs in CI; SNAPVM_LAB_OPS=N runs a longer one and
//! SNAPVM_TEST_SEED=S replays one. A failure prints the seed and every
//! operation so far.

use std::collections::BTreeMap;
use std::time::Duration;

use snapvm_tests::vmfiles::{
    exactly_what_is_named, kill_vmm_during, merges_done, qemu_img_check, seed, Rng,
};
use snapvm_tests::TestVm;

const T: Duration = Duration::from_secs(120);
/// adopt=1: a fresh boot continues the disk an earlier boot stamped.
const GUEST: &str = "workload=memstamp disk=1 adopt=1 blocks=256 mem_mib=16 passes=0 rate=50";

/// What the test believes: each snapshot's parent and power state, where
/// "now" hangs, and whether the VM runs.
#[derive(Clone, Debug, PartialEq)]
struct Model {
    /// id -> (parent, power state)
    snaps: BTreeMap<String, (Option<String>, String)>,
    now: Option<String>,
    running: bool,
}

impl Model {
    fn children(&self, id: &str) -> Vec<String> {
        self.snaps
            .iter()
            .filter(|(_, (p, _))| p.as_deref() == Some(id))
            .map(|(c, _)| c.clone())
            .collect()
    }

    fn created(&mut self, id: &str, power: &str) {
        self.snaps
            .insert(id.to_string(), (self.now.clone(), power.to_string()));
        self.now = Some(id.to_string());
    }

    /// Deletes `id` (and, with `subtree`, everything below it): children of
    /// a single deleted snapshot move up to its parent, and so does "now".
    fn deleted(&mut self, id: &str, subtree: bool) {
        let parent = self.snaps[id].0.clone();
        let mut gone = vec![id.to_string()];
        if subtree {
            let mut i = 0;
            while i < gone.len() {
                gone.extend(self.children(&gone[i].clone()));
                i += 1;
            }
        }
        for g in &gone {
            self.snaps.remove(g);
        }
        for (p, _) in self.snaps.values_mut() {
            if p.as_deref() == Some(id) {
                *p = parent.clone();
            }
        }
        if self.now.as_ref().is_some_and(|n| gone.contains(n)) {
            self.now = parent;
        }
    }

    /// The model snapvm reports now.
    fn of(vm: &TestVm) -> Model {
        let t = vm.tree();
        let mut snaps = BTreeMap::new();
        for s in t["snapshots"].as_array().cloned().unwrap_or_default() {
            snaps.insert(
                s["id"].as_str().unwrap().to_string(),
                (
                    s["parent"].as_str().map(String::from),
                    s["power_state"].as_str().unwrap().to_string(),
                ),
            );
        }
        let running = match vm.status()["state"].as_str() {
            Some("running") => true,
            Some("stopped") => false,
            other => panic!("unexpected power state {other:?}"),
        };
        Model {
            snaps,
            now: t["now"].as_str().map(String::from),
            running,
        }
    }
}

/// The operations so far; printed with the seed if the session fails.
struct Journal {
    seed: u64,
    ops: Vec<String>,
}

impl Drop for Journal {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "lab session failed; SNAPVM_TEST_SEED={} replays it. Operations:",
                self.seed
            );
            for (i, op) in self.ops.iter().enumerate() {
                eprintln!("  {i:3}  {op}");
            }
        }
    }
}

/// Waits for a verified disk pass and memory pass after `mark`, without a
/// reboot unless `booted`.
fn verifies(vm: &TestVm, mark: usize, booted: bool) {
    let out = vm.wait_serial(mark, "workload=diskstamp gen=", 1, T);
    vm.wait_serial(mark, "vcpu=1 gen=", 1, T);
    assert_eq!(out.contains("READY"), booted, "{out}");
}

fn pick<'a>(rng: &mut Rng, from: &'a [String]) -> Option<&'a String> {
    (!from.is_empty()).then(|| &from[rng.below(from.len() as u64) as usize])
}

/// One session of `ops` operations from `seed`.
fn session(vm: &TestVm, seed: u64, ops: usize) -> (usize, usize) {
    let mut rng = Rng(seed);
    let mut journal = Journal {
        seed,
        ops: Vec::new(),
    };
    let d = vm.dir.to_str().unwrap().to_string();
    let mut model = Model {
        snaps: BTreeMap::new(),
        now: None,
        running: false,
    };
    let mut kills = 0;
    let mut applies = 0;
    for n in 0..ops {
        let ids: Vec<String> = model.snaps.keys().cloned().collect();
        let roll = rng.below(100);
        let name = format!("s{n}");
        let op = if model.running {
            match roll {
                0..=34 => "create",
                35..=59 => "apply",
                60..=71 => "delete",
                72..=79 => "stop",
                _ => "kill",
            }
        } else {
            match roll {
                0..=39 => "start",
                40..=69 => "apply",
                70..=84 => "create",
                _ => "delete",
            }
        };
        // Nothing to apply or delete yet: take a snapshot instead.
        let op = match op {
            "apply" | "delete" if ids.is_empty() => "create",
            op => op,
        };
        let mut line = op.to_string();
        // The entry of this operation, kept up to date as it proceeds so a
        // failure in the middle shows what was under way.
        journal.ops.push(line.clone());
        macro_rules! note {
            () => {
                *journal.ops.last_mut().unwrap() = line.clone()
            };
        }
        match op {
            "create" => {
                let r = vm.ok2(&["snapshot", "create"], &["--name", &name]);
                let id = r.stdout.split_whitespace().nth(1).unwrap().to_string();
                let power = if model.running { "running" } else { "off" };
                line += &format!(" {name} ({power}) -> {id}");
                note!();
                model.created(&id, power);
            }
            "apply" => {
                let id = pick(&mut rng, &ids).cloned().unwrap();
                let power = model.snaps[&id].1.clone();
                line += &format!(" {id} ({power})");
                note!();
                let mark = vm.serial().len();
                let r = vm.cli2(&["snapshot", "apply"], &[&id]);
                assert_eq!(r.code(), 0, "{r:?}\nvmm.log:\n{}", vm.vmm_log_tail(30));
                model.now = Some(id);
                model.running = power == "running";
                if model.running {
                    verifies(vm, mark, false);
                }
                applies += 1;
            }
            "delete" => {
                let id = pick(&mut rng, &ids).cloned().unwrap();
                let subtree = rng.below(5) == 0;
                line += &format!(" {id}{}", if subtree { " --subtree" } else { "" });
                let mut args = vec![id.as_str()];
                if subtree {
                    args.push("--subtree");
                }
                note!();
                vm.ok2(&["snapshot", "delete"], &args);
                model.deleted(&id, subtree);
            }
            "stop" => {
                vm.ok(&["stop"]);
                model.running = false;
            }
            "start" => {
                let mark = vm.serial().len();
                vm.ok(&["start"]);
                model.running = true;
                verifies(vm, mark, true);
            }
            _ => {
                // kill -9 of the VMM during a create, an apply or a delete;
                // either outcome is right, nothing in between.
                let delay = Duration::from_millis(rng.below(400));
                let before = model.clone();
                let (args, after) = match (rng.below(3), pick(&mut rng, &ids).cloned()) {
                    (1, Some(id)) => {
                        let mut m = model.clone();
                        m.now = Some(id.clone());
                        m.running = false;
                        (["snapshot", "apply", &d, &id].join(" "), Some(m))
                    }
                    (2, Some(id)) => {
                        let mut m = model.clone();
                        m.deleted(&id, false);
                        m.running = false;
                        (["snapshot", "delete", &d, &id].join(" "), Some(m))
                    }
                    _ => (format!("snapshot create {d} --name {name}"), None),
                };
                line += &format!(" after {delay:?} of: snapvm {args}");
                note!();
                let argv: Vec<&str> = args.split(' ').collect();
                kill_vmm_during(vm, &argv, delay);
                // Every layer as the dying VMM left it, the working one too.
                qemu_img_check(&vm.dir);
                let got = Model::of(vm);
                let mut unchanged = before.clone();
                unchanged.running = false;
                let ok = got == unchanged
                    || after.as_ref() == Some(&got)
                    || (after.is_none() && {
                        // A create that finished: one new snapshot under now.
                        let new: Vec<&String> = got
                            .snaps
                            .keys()
                            .filter(|k| !before.snaps.contains_key(*k))
                            .collect();
                        new.len() == 1 && {
                            let mut m = unchanged.clone();
                            m.created(new[0], "running");
                            m == got
                        }
                    });
                assert!(
                    ok,
                    "after the kill the tree is neither before nor after the operation:\nbefore {before:?}\nafter {after:?}\ngot {got:?}"
                );
                line += &format!(" -> {}", if got == unchanged { "not done" } else { "done" });
                note!();
                model = got;
                kills += 1;
                // The next start finishes what was interrupted.
                let mark = vm.serial().len();
                vm.ok(&["start"]);
                model.running = true;
                verifies(vm, mark, true);
            }
        }
        let got = Model::of(vm);
        assert_eq!(got, model, "the tree or power state differs from the model");
        if model.running {
            merges_done(vm);
        }
        exactly_what_is_named(vm, &format!("after operation {n}, seed {seed}"));
    }
    eprintln!(
        "lab session: seed {seed}, {} operations, {kills} kills, {applies} applies, {} snapshots at the end",
        journal.ops.len(),
        model.snaps.len()
    );
    (kills, applies)
}

#[test]
fn a_random_lab_session_matches_its_model() {
    let seed = seed();
    let ops = std::env::var("SNAPVM_LAB_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    eprintln!("seed {seed} (SNAPVM_TEST_SEED={seed} replays it), {ops} operations");
    let vm = TestVm::create("lab", GUEST, "128M", 2, 16);
    session(&vm, seed, ops);
    // Stopped, every layer is checked, the working ones too.
    if vm.status()["state"] != "stopped" {
        vm.ok(&["stop"]);
    }
    exactly_what_is_named(&vm, &format!("at the end, seed {seed}"));
}
