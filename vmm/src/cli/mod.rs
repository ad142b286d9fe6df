//! The `snapvm` command line: its arguments ([`args`]), the commands on
//! VMs ([`lifecycle`], [`snapshot_cmd`], [`console`], [`run`]), what they
//! print ([`render`]), and the client of the VMM's control API
//! ([`api_client`]).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use self::args::{
    BenchCommand, Cli, CloneCommand, Command, DiskCommand, NetCommand, RunArgs, SnapshotCommand,
};
use crate::api::{TargetState, VmState};
use crate::config::{parse_size, DiskConfig, VmConfig};
use crate::hooks::Hooks;
use crate::machine::outcome::Outcome;

pub mod api_client;
pub mod args;
pub mod clone_cmd;
pub mod console;
pub mod hardware_cmd;
pub mod lifecycle;
pub mod progress;
pub mod render;
pub mod run;
pub mod snapshot_cmd;

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SNAPVM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("snapvm: error: {msg}");
    ExitCode::from(1)
}

fn run(args: RunArgs, hooks: &Hooks) -> ExitCode {
    let memory = match parse_size(&args.memory) {
        Ok(m) => m,
        Err(e) => return fail(e),
    };
    let Ok(vcpus) = u8::try_from(args.vcpus) else {
        return fail(format!("--vcpus {} is above the limit of 254", args.vcpus));
    };
    let mut disks = Vec::new();
    for d in &args.disks {
        match d.parse::<DiskConfig>() {
            Ok(d) => disks.push(d),
            Err(e) => return fail(e),
        }
    }
    let mut nets = Vec::new();
    for n in &args.nets {
        match n.parse::<crate::config::NetArg>() {
            Ok(n) => nets.push(crate::config::NetConfig {
                tap: n.tap,
                mac: n.mac.unwrap_or_else(crate::config::random_mac),
            }),
            Err(e) => return fail(e),
        }
    }
    let config = VmConfig {
        kernel: args.kernel,
        cmdline: args.cmdline,
        initrd: args.initrd,
        memory,
        vcpus,
        disks,
        nets,
        pin_vcpus: args.pin_vcpus,
        huge_pages: args.huge_pages,
    };
    match run::run_foreground(&config, hooks) {
        Ok(outcome) => {
            match &outcome {
                Outcome::Failure(f) => eprintln!("snapvm: error: {f}"),
                Outcome::Stopped(sig) => eprintln!("snapvm: stopped by signal {sig}"),
                Outcome::Guest(devices::exit::GuestExit::Status(s)) if *s != 0 => {
                    eprintln!("snapvm: guest exited with status {s}")
                }
                Outcome::Guest(_) => {}
            }
            ExitCode::from(outcome.exit_code().clamp(0, 255) as u8)
        }
        Err(e) => fail(e),
    }
}

fn disk(cmd: DiskCommand) -> ExitCode {
    use snapshot::disk;
    let refuse_existing = |p: &std::path::Path| {
        if p.exists() {
            Err(format!(
                "{} already exists; snapvm never overwrites an image",
                p.display()
            ))
        } else {
            Ok(())
        }
    };
    let result = match cmd {
        DiskCommand::Create { path, size } => refuse_existing(&path).and_then(|_| {
            let size = parse_size(&size).map_err(|e| e.to_string())?;
            disk::create_qcow2(&path, size).map_err(|e| e.to_string())
        }),
        DiskCommand::Overlay { backing, path } => refuse_existing(&path)
            .and_then(|_| disk::create_overlay(&backing, &path).map_err(|e| e.to_string())),
        DiskCommand::Info { path } => disk::Disk::open(&path, true)
            .map(|d| {
                println!("{}: virtual size {} bytes", path.display(), d.size());
                for (i, l) in d.chain().iter().enumerate() {
                    println!("  layer {i}: {} ({})", l.path.display(), l.format.name());
                }
            })
            .map_err(|e| e.to_string()),
        DiskCommand::Attach {
            vmdir,
            path,
            name,
            readonly,
            independent,
            link,
        } => hardware_cmd::attach(
            &vmdir,
            crate::daemon::hardware::Attach {
                path,
                name,
                readonly,
                independent,
                link,
            },
        )
        .map_err(|e| e.to_string()),
        DiskCommand::Detach { vmdir, name } => {
            hardware_cmd::detach(&vmdir, &name).map_err(|e| e.to_string())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn lifecycle(cmd: Command, hooks: &Hooks) -> ExitCode {
    let r: Result<(), String> = match cmd {
        Command::Create(a) => {
            let mut disks = Vec::new();
            for d in &a.disks {
                match d.parse::<DiskConfig>() {
                    Ok(d) => disks.push(d),
                    Err(e) => return fail(e),
                }
            }
            let mut nets = Vec::new();
            for n in &a.nets {
                match n.parse::<crate::config::NetArg>() {
                    Ok(n) => nets.push(n),
                    Err(e) => return fail(e),
                }
            }
            let req = crate::vmdir::CreateRequest {
                kernel: a.kernel,
                initrd: a.initrd,
                cmdline: a.cmdline,
                memory: a.memory,
                vcpus: a.vcpus,
                pin_vcpus: a.pin_vcpus,
                huge_pages: a.huge_pages,
                disks,
                nets,
                link: a.link,
            };
            crate::vmdir::create(&a.vmdir, &req)
                .map(|d| println!("created VM directory {}", d.root().display()))
                .map_err(|e| e.to_string())
        }
        Command::Start {
            vmdir,
            paused,
            from,
        } => lifecycle::start_from(&vmdir, paused, from.as_deref())
            .map(|v| {
                if v.state == VmState::Stopped {
                    println!(
                        "{} now continues from snapshot {} taken powered off: the VM is stopped",
                        v.name,
                        from.as_deref().unwrap_or("?")
                    );
                } else {
                    println!(
                        "started {} ({}, pid {})",
                        v.name,
                        v.state.as_str(),
                        v.pid.map(|p| p.to_string()).unwrap_or_default()
                    )
                }
            })
            .map_err(|e| e.to_string()),
        Command::Snapshot(SnapshotCommand::Create {
            vmdir,
            name,
            description,
            no_wait,
        }) => snapshot_cmd::create(&vmdir, name, description, no_wait).map_err(|e| e.to_string()),
        Command::Snapshot(SnapshotCommand::List { vmdir, json, tree }) => {
            snapshot_cmd::list(&vmdir, json, tree).map_err(|e| e.to_string())
        }
        Command::Snapshot(SnapshotCommand::Apply {
            vmdir,
            snapshot,
            save_current,
        }) => snapshot_cmd::apply(&vmdir, &snapshot, save_current).map_err(|e| e.to_string()),
        Command::Snapshot(SnapshotCommand::Delete {
            vmdir,
            snapshot,
            subtree,
            no_wait,
        }) => snapshot_cmd::delete(&vmdir, &snapshot, subtree, no_wait, hooks)
            .map_err(|e| e.to_string()),
        Command::Snapshot(SnapshotCommand::Export {
            vmdir,
            snapshot,
            newvmdir,
        }) => snapshot_cmd::export(&vmdir, &snapshot, &newvmdir)
            .map_err(|e| e.to_string())
            .map(|m| {
                println!(
                    "exported snapshot {} \"{}\" to {}; continue it with: snapvm start {} --from {}",
                    m.id,
                    m.name,
                    newvmdir.display(),
                    newvmdir.display(),
                    &m.id[..8]
                )
            }),
        Command::Snapshot(SnapshotCommand::Clone {
            vmdir,
            snapshot,
            newvmdir,
            count,
            start,
            tap,
        }) => clone_cmd::clone(&vmdir, &snapshot, &newvmdir, count, start, &tap)
            .map_err(|e| e.to_string()),
        Command::Clone(CloneCommand::Detach { vmdir }) => clone_cmd::detach(&vmdir)
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Command::Snapshot(SnapshotCommand::Show { vmdir, snapshot }) => {
            snapshot_cmd::show(&vmdir, &snapshot)
                .map_err(|e| e.to_string())
                .map(|v| print_json(&v))
        }
        Command::Snapshot(SnapshotCommand::Rename {
            vmdir,
            snapshot,
            name,
        }) => snapshot_cmd::rename(&vmdir, &snapshot, &name)
            .map_err(|e| e.to_string())
            .map(|m| println!("renamed {} to \"{}\"", m.id, m.name)),
        Command::Snapshot(SnapshotCommand::Describe {
            vmdir,
            snapshot,
            text,
        }) => snapshot_cmd::describe(&vmdir, &snapshot, &text)
            .map_err(|e| e.to_string())
            .map(|m| println!("described {}", m.id)),
        Command::Stop { vmdir, force } => lifecycle::stop(&vmdir, force)
            .map(|()| println!("stopped {}", vmdir.display()))
            .map_err(|e| e.to_string()),
        Command::Pause { vmdir } => lifecycle::set_state(&vmdir, TargetState::Paused)
            .map(|_| println!("paused {}", vmdir.display()))
            .map_err(|e| e.to_string()),
        Command::Resume { vmdir } => lifecycle::set_state(&vmdir, TargetState::Running)
            .map(|_| println!("resumed {}", vmdir.display()))
            .map_err(|e| e.to_string()),
        Command::Status { vmdir, json } => lifecycle::status(&vmdir)
            .map(|v| {
                if json {
                    print_json(&v)
                } else {
                    print!("{}", render::format_status(&v))
                }
            })
            .map_err(|e| e.to_string()),
        Command::Console { vmdir } => console::console(&vmdir).map_err(|e| e.to_string()),
        Command::Config(a) => hardware_cmd::config(a).map_err(|e| e.to_string()),
        Command::Net(NetCommand::Attach { vmdir, tap, mac }) => {
            hardware_cmd::attach_net(&vmdir, &tap, mac.as_deref()).map_err(|e| e.to_string())
        }
        Command::Net(NetCommand::Detach { vmdir, name }) => {
            hardware_cmd::detach_net(&vmdir, &name).map_err(|e| e.to_string())
        }
        Command::List { dir, json } => {
            let dir = dir.unwrap_or_else(|| PathBuf::from("."));
            lifecycle::list(&dir)
                .map(|vms| {
                    if json {
                        print_json(&vms);
                    } else {
                        println!("{:<20} {:<9} {:>8}  DIRECTORY", "NAME", "STATE", "PID");
                        for v in vms {
                            println!(
                                "{:<20} {:<9} {:>8}  {}",
                                v.name,
                                v.state.as_str(),
                                v.pid.as_deref().unwrap_or("-"),
                                v.vmdir.display()
                            );
                        }
                    }
                })
                .map_err(|e| e.to_string())
        }
        Command::Vmm {
            vmdir,
            paused,
            from,
        } => match crate::daemon::run(&vmdir, paused, from.as_deref(), hooks) {
            Ok(outcome) => {
                return ExitCode::from(outcome.exit_code().clamp(0, 255) as u8);
            }
            Err(e) => Err(e.to_string()),
        },
        _ => Ok(()),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

/// Runs the `snapvm` command: parses the arguments, reads the debug and
/// test hooks from the environment once, and dispatches.
pub fn main() -> ExitCode {
    // One policy for every file snapvm creates, by the CLI or the VMM
    // (daemon::run sets the same): private to their owner.
    // SAFETY: umask only changes this process's file creation mask.
    unsafe { libc::umask(0o077) };
    init_logging();
    let cli = Cli::parse();
    let hooks = Hooks::from_env();
    match cli.command {
        Command::Run(args) => run(args, &hooks),
        Command::Disk(cmd) => disk(cmd),
        Command::Bench(BenchCommand::Boot {
            runs,
            vcpus,
            memory_mib,
            kernel,
        }) => {
            let b = crate::bench::BootBench {
                kernel: kernel.unwrap_or_else(|| guest_images::testguest_path().to_path_buf()),
                runs: runs.max(1),
                vcpus: vcpus.max(1),
                memory_mib,
            };
            match crate::bench::boot(&b) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Command::Bench(BenchCommand::Clone {
            count,
            size,
            baseline,
            dir,
            kernel,
        }) => {
            let b = crate::bench::CloneBench {
                kernel: kernel.unwrap_or_else(|| guest_images::testguest_path().to_path_buf()),
                dir: dir.unwrap_or_else(std::env::temp_dir),
                count: count.max(1),
                size_mib: size.max(64),
                baseline: baseline.max(1),
            };
            match crate::bench::clone_bench(&b) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Command::Bench(BenchCommand::Net {
            count,
            snapshots,
            dir,
            kernel,
        }) => {
            let b = crate::bench::NetBench {
                kernel: kernel.unwrap_or_else(|| guest_images::testguest_path().to_path_buf()),
                dir: dir.unwrap_or_else(std::env::temp_dir),
                count: count.max(10),
                snapshots: snapshots.max(1),
            };
            match crate::bench::net(&b) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Command::Bench(BenchCommand::Snapshot {
            sizes,
            count,
            dir,
            kernel,
            delete_files,
        }) => {
            let b = crate::bench::SnapshotBench {
                kernel: kernel.unwrap_or_else(|| guest_images::testguest_path().to_path_buf()),
                dir: dir.unwrap_or_else(std::env::temp_dir),
                sizes_mib: sizes,
                count: count.max(1),
                keep_files: !delete_files,
            };
            match crate::bench::snapshot(&b) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Command::Bench(BenchCommand::Apply {
            sizes,
            count,
            dir,
            kernel,
            huge_pages,
        }) => {
            let b = crate::bench::ApplyBench {
                kernel: kernel.unwrap_or_else(|| guest_images::testguest_path().to_path_buf()),
                dir: dir.unwrap_or_else(std::env::temp_dir),
                sizes_mib: sizes,
                count: count.max(1),
                huge_pages,
            };
            match crate::bench::apply(&b) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Command::Bench(BenchCommand::Merge { sizes, dir, kernel }) => {
            let b = crate::bench::MergeBench {
                kernel: kernel.unwrap_or_else(|| guest_images::testguest_path().to_path_buf()),
                dir: dir.unwrap_or_else(std::env::temp_dir),
                sizes_mib: sizes,
            };
            match crate::bench::merge(&b) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Command::Bench(BenchCommand::Disk {
            requests,
            blocks,
            dir,
            kernel,
        }) => {
            let b = crate::bench::DiskBench {
                kernel: kernel.unwrap_or_else(|| guest_images::testguest_path().to_path_buf()),
                dir: dir.unwrap_or_else(std::env::temp_dir),
                blocks: blocks.max(1),
                requests: requests.max(1),
            };
            match crate::bench::disk(&b) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Command::Ui {
            dir,
            listen,
            allow_remote,
        } => {
            let opts = crate::ui::UiOptions {
                dir: dir.unwrap_or_else(|| PathBuf::from(".")),
                listen,
                allow_remote,
            };
            match crate::ui::run(opts, hooks.clone()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        other => lifecycle(other, &hooks),
    }
}
