//! The `snapvm` command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vmm::config::{parse_size, DiskConfig, VmConfig};
use vmm::vm::Outcome;

/// snapvm: a KVM virtual machine monitor for test guests, built around live
/// snapshots.
#[derive(Parser)]
#[command(name = "snapvm", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a kernel in the foreground with the serial console on stdin/stdout.
    ///
    /// The exit status is the guest's: the byte it writes to I/O port 0x501
    /// (isa-debug-exit convention), 0 when it resets or powers off, 1 when a
    /// vCPU fails (the reason is printed), 130 on Ctrl-C.
    Run(RunArgs),
    /// Benchmarks that print a table next to a baseline measured in the same run.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Disk images: create qcow2 images and differencing layers, show chains.
    #[command(subcommand)]
    Disk(DiskCommand),
    /// Create a VM directory (VMDIR/vm.toml, disks/, kernel/, logs/, run/).
    ///
    /// The kernel, initrd and disks are copied into the directory so it is
    /// self-contained and movable; --link references them in place instead.
    Create(CreateArgs),
    /// Start the VM of VMDIR in a background VMM process; returns when the
    /// guest runs (or is paused, with --paused).
    Start {
        /// The VM directory.
        vmdir: PathBuf,
        /// Create the VM but leave its vCPUs paused.
        #[arg(long)]
        paused: bool,
        /// Continue from this snapshot (id, unique id prefix or unique name)
        /// instead of booting: its memory, vCPU and device state, its
        /// configuration, and new empty disk layers over its disk layers.
        #[arg(long, value_name = "SNAPSHOT")]
        from: Option<String>,
    },
    /// Snapshots: create, list, apply, delete, export, show, rename, describe.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Stop the VM (its running state is discarded; disks are flushed).
    Stop {
        /// The VM directory.
        vmdir: PathBuf,
        /// Kill the VMM process instead of asking it (disk writes in flight may be lost).
        #[arg(long)]
        force: bool,
    },
    /// Pause the VM's vCPUs.
    Pause {
        /// The VM directory.
        vmdir: PathBuf,
    },
    /// Resume a paused VM.
    Resume {
        /// The VM directory.
        vmdir: PathBuf,
    },
    /// Show power state, uptime, pid, memory, disks and their layers.
    Status {
        /// The VM directory.
        vmdir: PathBuf,
        /// Print JSON (the API's GET /vm document).
        #[arg(long)]
        json: bool,
    },
    /// Attach to the VM's serial console (output since start is replayed;
    /// detach with Ctrl-]).
    Console {
        /// The VM directory.
        vmdir: PathBuf,
    },
    /// List the VMs in DIR (default: the current directory).
    List {
        /// A VM directory or a directory holding VM directories.
        dir: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The background VMM process (started by `snapvm start`).
    #[command(name = "__vmm", hide = true)]
    Vmm {
        /// The VM directory.
        vmdir: PathBuf,
        /// Leave the vCPUs paused.
        #[arg(long)]
        paused: bool,
        /// Continue from a snapshot.
        #[arg(long)]
        from: Option<String>,
    },
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Take a snapshot. A running VM pauses only for a moment and keeps
    /// running while its memory is written out; a paused VM stays paused; a
    /// VM that is off gets a configuration-and-disks snapshot.
    Create {
        /// The VM directory.
        vmdir: PathBuf,
        /// Name (default: the VM's name and the time).
        #[arg(long)]
        name: Option<String>,
        /// Free text.
        #[arg(long, default_value = "")]
        description: String,
        /// Print the job id and return at once (running VMs).
        #[arg(long)]
        no_wait: bool,
    },
    /// List the snapshots: id, power state, pause, name, and where "Now" is.
    List {
        /// The VM directory.
        vmdir: PathBuf,
        /// Print JSON (the tree).
        #[arg(long)]
        json: bool,
        /// Draw the tree: each snapshot under its parent, "Now" under the
        /// snapshot the current state hangs from.
        #[arg(long)]
        tree: bool,
    },
    /// Apply (revert to) a snapshot: the VM continues from its instant in
    /// its power state (running, paused, or off), on new empty disk layers
    /// over its layers. A running VM is switched in place by its VMM.
    Apply {
        /// The VM directory.
        vmdir: PathBuf,
        /// Id, unique id prefix or unique name.
        snapshot: String,
        /// First take a snapshot of the current state (optionally named), so
        /// nothing is lost.
        #[arg(long, value_name = "NAME", num_args = 0..=1, default_missing_value = "")]
        save_current: Option<String>,
    },
    /// Delete a snapshot (with --subtree, also everything below it). Its
    /// saved state and memory go; its disk layers are merged with their
    /// neighbours in the background while the VM keeps running (or here,
    /// with progress, when the VM is off). The VM and the other snapshots
    /// read exactly what they read before; an interrupted merge is
    /// finished at the next start.
    Delete {
        /// The VM directory.
        vmdir: PathBuf,
        /// Id, unique id prefix or unique name.
        snapshot: String,
        /// Also delete all snapshots below it.
        #[arg(long)]
        subtree: bool,
        /// Return once the snapshot is gone, without waiting for merges.
        #[arg(long)]
        no_wait: bool,
    },
    /// Export a snapshot as a standalone VM directory (configuration,
    /// kernel, flattened disks, state and memory): a snapshot is not a
    /// backup, an export is. Continue it with `snapvm start NEWVMDIR --from ID`.
    Export {
        /// The VM directory.
        vmdir: PathBuf,
        /// Id, unique id prefix or unique name.
        snapshot: String,
        /// The new VM directory (must not exist).
        newvmdir: PathBuf,
    },
    /// Show one snapshot: metadata, parent, children, size on disk.
    Show {
        /// The VM directory.
        vmdir: PathBuf,
        /// Id, unique id prefix or unique name.
        snapshot: String,
    },
    /// Rename a snapshot (names need not be unique; ids are).
    Rename {
        /// The VM directory.
        vmdir: PathBuf,
        /// Id, unique id prefix or unique name.
        snapshot: String,
        /// The new name.
        name: String,
    },
    /// Set a snapshot's description.
    Describe {
        /// The VM directory.
        vmdir: PathBuf,
        /// Id, unique id prefix or unique name.
        snapshot: String,
        /// The description.
        text: String,
    },
}

#[derive(clap::Args)]
struct CreateArgs {
    /// The new VM directory (created if missing; must not hold a VM).
    vmdir: PathBuf,
    /// Kernel image: an ELF with a PVH entry note or a bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = "")]
    cmdline: String,
    /// Guest memory, e.g. 256M or 1G.
    #[arg(long, value_name = "SIZE", default_value = "256M")]
    memory: String,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u8,
    /// A disk (raw or qcow2), repeatable; ",readonly" refuses guest writes.
    #[arg(long = "disk", value_name = "PATH[,readonly]")]
    disks: Vec<String>,
    /// Reference kernel, initrd and disks in place instead of copying them.
    #[arg(long)]
    link: bool,
    /// Pin each vCPU thread to one host CPU (round robin over the CPUs
    /// snapvm may use). "auto" pins on the kvm_pvm software backend, where
    /// a vCPU thread moving between CPUs can see stale guest memory after
    /// an apply; hardware KVM does not need it.
    #[arg(long, value_enum, value_name = "WHEN", default_value = "auto")]
    pin_vcpus: vmm::backend_quirks::PinVcpus,
    /// Back guest RAM with transparent huge pages. "auto" does, except on
    /// the kvm_pvm software backend, where huge host pages let the guest
    /// see stale memory after an apply.
    #[arg(long, value_enum, value_name = "WHEN", default_value = "auto")]
    huge_pages: vmm::backend_quirks::HugePages,
}

#[derive(Subcommand)]
enum DiskCommand {
    /// Create an empty qcow2 image.
    Create {
        /// The new image.
        path: PathBuf,
        /// Virtual size, e.g. 1G.
        #[arg(long)]
        size: String,
    },
    /// Create a qcow2 differencing layer on top of BACKING (raw or qcow2).
    /// The backing path is stored relative to the new file, with its format.
    Overlay {
        /// The existing layer below.
        backing: PathBuf,
        /// The new layer.
        path: PathBuf,
    },
    /// Show an image's backing chain, top first.
    Info {
        /// The image.
        path: PathBuf,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Process start to the test guest's READY line (median of --runs boots)
    /// and memstamp throughput per vCPU, next to QEMU booting the same guest.
    Boot {
        /// Boots per engine.
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// vCPUs.
        #[arg(long, default_value_t = 2)]
        vcpus: u8,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 512)]
        memory_mib: u64,
        /// The test guest (default: the one built with snapvm).
        #[arg(long, value_name = "PATH")]
        kernel: Option<PathBuf>,
    },
    /// Live snapshot pauses (median and max), streaming rate next to dd,
    /// fault service times and guest throughput, next to the stop-and-copy
    /// baseline on the same VM, for each memory size.
    Snapshot {
        /// Guest memory sizes in MiB.
        #[arg(long, value_delimiter = ',', default_value = "256,1024,4096")]
        sizes: Vec<u64>,
        /// Live snapshots per size (stop-and-copy: up to 5).
        #[arg(long, default_value_t = 20)]
        count: usize,
        /// Directory for the VM and its snapshots (default: the system temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The test guest (default: the one built with snapvm).
        #[arg(long, value_name = "PATH")]
        kernel: Option<PathBuf>,
    },
    /// Snapshot apply: time to the guest running and to its next verified
    /// pass, lazy (instant revert) versus eager memory load, per size.
    Apply {
        /// Guest memory sizes in MiB.
        #[arg(long, value_delimiter = ',', default_value = "256,1024,4096")]
        sizes: Vec<u64>,
        /// Applies per mode and size.
        #[arg(long, default_value_t = 5)]
        count: usize,
        /// Directory for the VM (default: the system temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The test guest (default: the one built with snapvm).
        #[arg(long, value_name = "PATH")]
        kernel: Option<PathBuf>,
        /// Guest RAM on huge pages: auto (not on kvm_pvm), on or off; run
        /// it with on and off to see what the kvm_pvm workaround costs.
        #[arg(long, value_enum, value_name = "WHEN", default_value = "auto")]
        huge_pages: vmm::backend_quirks::HugePages,
    },
    /// Merge after a delete: a snapshot whose disk layer holds SIZE MiB is
    /// deleted while the guest runs; merge throughput next to dd, guest
    /// throughput during the merge versus before, and the final switch.
    Merge {
        /// Sizes of the layer to merge, MiB.
        #[arg(long, value_delimiter = ',', default_value = "256,1024")]
        sizes: Vec<u64>,
        /// Directory for the VM (default: the system temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The test guest (default: the one built with snapvm).
        #[arg(long, value_name = "PATH")]
        kernel: Option<PathBuf>,
    },
    /// Guest 4 KiB sequential and random read/write throughput on raw, qcow2
    /// and a 3-layer qcow2 chain, next to the host's own I/O on the same files.
    Disk {
        /// Requests per measurement.
        #[arg(long, default_value_t = 4096)]
        requests: u64,
        /// Image size in 4 KiB blocks.
        #[arg(long, default_value_t = 16384)]
        blocks: u64,
        /// Directory for scratch images (default: the system temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The test guest (default: the one built with snapvm).
        #[arg(long, value_name = "PATH")]
        kernel: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Kernel image: an ELF with a PVH entry note (vmlinux, the test guest) or a bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = "")]
    cmdline: String,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Guest memory, e.g. 256M or 1G (a plain number means MiB).
    #[arg(long, value_name = "SIZE", default_value = "256M")]
    memory: String,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u16,
    /// A disk (raw, or qcow2 with its backing chain) as a virtio-blk device;
    /// repeat for more, in the order the guest sees them. Add ",readonly"
    /// to refuse guest writes. The devices are announced on the kernel
    /// command line (virtio_mmio.device=...).
    #[arg(long = "disk", value_name = "PATH[,readonly]")]
    disks: Vec<String>,
    /// Pin each vCPU thread to one host CPU: auto (on the kvm_pvm backend,
    /// which needs it), on or off.
    #[arg(long, value_enum, value_name = "WHEN", default_value = "auto")]
    pin_vcpus: vmm::backend_quirks::PinVcpus,
    /// Back guest RAM with transparent huge pages. "auto" does, except on
    /// the kvm_pvm software backend, where huge host pages let the guest
    /// see stale memory after an apply.
    #[arg(long, value_enum, value_name = "WHEN", default_value = "auto")]
    huge_pages: vmm::backend_quirks::HugePages,
}

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

fn run(args: RunArgs) -> ExitCode {
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
    let config = VmConfig {
        kernel: args.kernel,
        cmdline: args.cmdline,
        initrd: args.initrd,
        memory,
        vcpus,
        disks,
        pin_vcpus: args.pin_vcpus,
        huge_pages: args.huge_pages,
    };
    match vmm::run::run_foreground(&config) {
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
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn lifecycle(cmd: Command) -> ExitCode {
    use vmm::lifecycle;
    let r: Result<(), String> = match cmd {
        Command::Create(a) => {
            let mut disks = Vec::new();
            for d in &a.disks {
                match d.parse::<DiskConfig>() {
                    Ok(d) => disks.push(d),
                    Err(e) => return fail(e),
                }
            }
            let req = vmm::vmdir::CreateRequest {
                kernel: a.kernel,
                initrd: a.initrd,
                cmdline: a.cmdline,
                memory: a.memory,
                vcpus: a.vcpus,
                pin_vcpus: a.pin_vcpus,
                huge_pages: a.huge_pages,
                disks,
                link: a.link,
            };
            vmm::vmdir::create(&a.vmdir, &req)
                .map(|d| println!("created VM directory {}", d.root().display()))
                .map_err(|e| e.to_string())
        }
        Command::Start {
            vmdir,
            paused,
            from,
        } => lifecycle::start_from(&vmdir, paused, from.as_deref())
            .map(|v| {
                if v["state"] == "stopped" {
                    println!(
                        "{} now continues from snapshot {} taken powered off: the VM is off",
                        v["name"].as_str().unwrap_or("?"),
                        from.as_deref().unwrap_or("?")
                    );
                } else {
                    println!(
                        "started {} ({}, pid {})",
                        v["name"].as_str().unwrap_or("?"),
                        v["state"].as_str().unwrap_or("?"),
                        v["pid"]
                    )
                }
            })
            .map_err(|e| e.to_string()),
        Command::Snapshot(SnapshotCommand::Create {
            vmdir,
            name,
            description,
            no_wait,
        }) => lifecycle::snapshot_create(&vmdir, name, description, no_wait)
            .map_err(|e| e.to_string()),
        Command::Snapshot(SnapshotCommand::List { vmdir, json, tree }) => {
            lifecycle::snapshot_list(&vmdir, json, tree).map_err(|e| e.to_string())
        }
        Command::Snapshot(SnapshotCommand::Apply {
            vmdir,
            snapshot,
            save_current,
        }) => lifecycle::snapshot_apply(&vmdir, &snapshot, save_current).map_err(|e| e.to_string()),
        Command::Snapshot(SnapshotCommand::Delete {
            vmdir,
            snapshot,
            subtree,
            no_wait,
        }) => lifecycle::snapshot_delete(&vmdir, &snapshot, subtree, no_wait)
            .map_err(|e| e.to_string()),
        Command::Snapshot(SnapshotCommand::Export {
            vmdir,
            snapshot,
            newvmdir,
        }) => vmm::vmdir::VmDir::open(&vmdir)
            .map_err(|e| e.to_string())
            .and_then(|d| vmm::snapshots::export(&d, &snapshot, &newvmdir).map_err(|e| e.to_string()))
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
        Command::Snapshot(SnapshotCommand::Show { vmdir, snapshot }) => {
            vmm::vmdir::VmDir::open(&vmdir)
                .map_err(|e| e.to_string())
                .and_then(|d| vmm::snapshots::show(&d, &snapshot).map_err(|e| e.to_string()))
                .map(|v| print_json(&v))
        }
        Command::Snapshot(SnapshotCommand::Rename {
            vmdir,
            snapshot,
            name,
        }) => vmm::vmdir::VmDir::open(&vmdir)
            .map_err(|e| e.to_string())
            .and_then(|d| vmm::snapshots::rename(&d, &snapshot, &name).map_err(|e| e.to_string()))
            .map(|m| println!("renamed {} to \"{}\"", m.id, m.name)),
        Command::Snapshot(SnapshotCommand::Describe {
            vmdir,
            snapshot,
            text,
        }) => vmm::vmdir::VmDir::open(&vmdir)
            .map_err(|e| e.to_string())
            .and_then(|d| vmm::snapshots::describe(&d, &snapshot, &text).map_err(|e| e.to_string()))
            .map(|m| println!("described {}", m.id)),
        Command::Stop { vmdir, force } => lifecycle::stop(&vmdir, force)
            .map(|()| println!("stopped {}", vmdir.display()))
            .map_err(|e| e.to_string()),
        Command::Pause { vmdir } => lifecycle::set_state(&vmdir, "paused")
            .map(|_| println!("paused {}", vmdir.display()))
            .map_err(|e| e.to_string()),
        Command::Resume { vmdir } => lifecycle::set_state(&vmdir, "running")
            .map(|_| println!("resumed {}", vmdir.display()))
            .map_err(|e| e.to_string()),
        Command::Status { vmdir, json } => lifecycle::status(&vmdir)
            .map(|v| {
                if json {
                    print_json(&v)
                } else {
                    print!("{}", lifecycle::format_status(&v))
                }
            })
            .map_err(|e| e.to_string()),
        Command::Console { vmdir } => lifecycle::console(&vmdir).map_err(|e| e.to_string()),
        Command::List { dir, json } => {
            let dir = dir.unwrap_or_else(|| PathBuf::from("."));
            lifecycle::list(&dir)
                .map(|vms| {
                    if json {
                        print_json(&serde_json::Value::Array(vms));
                    } else {
                        println!("{:<20} {:<9} {:>8}  DIRECTORY", "NAME", "STATE", "PID");
                        for v in vms {
                            println!(
                                "{:<20} {:<9} {:>8}  {}",
                                v["name"].as_str().unwrap_or("?"),
                                v["state"].as_str().unwrap_or("?"),
                                v["pid"].as_str().unwrap_or("-"),
                                v["vmdir"].as_str().unwrap_or("?")
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
        } => match vmm::daemon::run(&vmdir, paused, from.as_deref()) {
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

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(args),
        Command::Disk(cmd) => disk(cmd),
        Command::Bench(BenchCommand::Boot {
            runs,
            vcpus,
            memory_mib,
            kernel,
        }) => {
            let b = vmm::bench::BootBench {
                kernel: kernel.unwrap_or_else(|| guest_images::testguest_path().to_path_buf()),
                runs: runs.max(1),
                vcpus: vcpus.max(1),
                memory_mib,
            };
            match vmm::bench::boot(&b) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Command::Bench(BenchCommand::Snapshot {
            sizes,
            count,
            dir,
            kernel,
        }) => {
            let b = vmm::bench::SnapshotBench {
                kernel: kernel.unwrap_or_else(|| guest_images::testguest_path().to_path_buf()),
                dir: dir.unwrap_or_else(std::env::temp_dir),
                sizes_mib: sizes,
                count: count.max(1),
            };
            match vmm::bench::snapshot(&b) {
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
            let b = vmm::bench::ApplyBench {
                kernel: kernel.unwrap_or_else(|| guest_images::testguest_path().to_path_buf()),
                dir: dir.unwrap_or_else(std::env::temp_dir),
                sizes_mib: sizes,
                count: count.max(1),
                huge_pages,
            };
            match vmm::bench::apply(&b) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Command::Bench(BenchCommand::Merge { sizes, dir, kernel }) => {
            let b = vmm::bench::MergeBench {
                kernel: kernel.unwrap_or_else(|| guest_images::testguest_path().to_path_buf()),
                dir: dir.unwrap_or_else(std::env::temp_dir),
                sizes_mib: sizes,
            };
            match vmm::bench::merge(&b) {
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
            let b = vmm::bench::DiskBench {
                kernel: kernel.unwrap_or_else(|| guest_images::testguest_path().to_path_buf()),
                dir: dir.unwrap_or_else(std::env::temp_dir),
                blocks: blocks.max(1),
                requests: requests.max(1),
            };
            match vmm::bench::disk(&b) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        other => lifecycle(other),
    }
}
