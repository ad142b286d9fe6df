//! The command line's arguments (clap): every command, its options and
//! its `--help` text.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// snapvm: a KVM virtual machine monitor for test guests, built around live
/// snapshots.
#[derive(Parser)]
#[command(name = "snapvm", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    /// The command.
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Boot a kernel in the foreground with the serial console on stdin/stdout.
    ///
    /// The exit status is the guest's: the byte it writes to I/O port 0x501
    /// (isa-debug-exit convention), 0 when it resets or powers off, 1 when a
    /// vCPU fails (the reason is printed), 130 on Ctrl-C.
    Run(RunArgs),
    /// Benchmarks that print a table next to a baseline measured in the same run.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Disk images: create qcow2 images and differencing layers, show chains;
    /// attach and detach a VM's disks.
    #[command(subcommand)]
    Disk(DiskCommand),
    /// Network adapters: attach one on a TAP device to a VM that is off, or
    /// detach one.
    #[command(subcommand)]
    Net(NetCommand),
    /// Clones of snapshots: make one standalone.
    #[command(subcommand)]
    Clone(CloneCommand),
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
    /// Show the VM's hardware, or change it (while the VM is off).
    ///
    /// Without options it shows memory, vCPUs, kernel, initrd, command line
    /// and disks. With options it changes them; like Hyper-V, only while the
    /// VM is off (a running VM is refused: stop it first). Snapshots keep
    /// the hardware they were taken with, and applying one brings it back.
    /// Disks are attached and detached with `snapvm disk attach|detach`.
    Config(ConfigArgs),
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
    /// Serve a web view of the VMs in DIR, like Hyper-V Manager: power
    /// state, uptime, memory, vCPUs, disks and adapters; each VM's snapshot
    /// tree drawn as a tree with "Now"; snapshot details, jobs and merges
    /// with live progress, and the tail of the serial console.
    ///
    /// Its buttons do what the CLI does: start, stop, pause, resume;
    /// snapshot, apply (optionally saving the current state first),
    /// rename, describe, delete (a snapshot or a subtree), export. Running
    /// VMs are reached through their VMM's API, VMs that are off through
    /// their directory.
    ///
    /// Safe by default: it listens on 127.0.0.1 only, and prints a URL with
    /// a random session token (`snapvm ui: open http://.../#token=...`,
    /// after '#': never sent to any server); every API request needs that
    /// token in a header, and changes are refused from other origins. Stop
    /// it with Ctrl-C (it waits for merges and exports it started); the VMs
    /// keep running.
    Ui {
        /// A VM directory, or a directory holding VM directories (default:
        /// the current directory).
        dir: Option<PathBuf>,
        /// Address and port to listen on; port 0 takes a free one (the URL
        /// printed names it).
        #[arg(long, value_name = "ADDR:PORT", default_value = crate::ui::DEFAULT_LISTEN)]
        listen: std::net::SocketAddr,
        /// Allow a --listen address other than loopback. Anyone who can
        /// reach it and has the token controls the VMs, over plain HTTP.
        #[arg(long)]
        allow_remote: bool,
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
pub enum SnapshotCommand {
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
    /// Clone a snapshot into new VMs that share its disks and memory: each
    /// clone is a VM directory with the snapshot's hardware, its own name
    /// and new MACs, disks that are qcow2 overlays on the snapshot's
    /// layers, and (for a running or paused snapshot) a first start that
    /// continues from the snapshot with memory shared copy-on-write. The
    /// snapshot cannot be deleted while clones read it (see `snapvm clone
    /// detach`).
    Clone {
        /// The VM directory.
        vmdir: PathBuf,
        /// Id, unique id prefix or unique name.
        snapshot: String,
        /// The new VM directory; with --count, NEWVMDIR-1 ... NEWVMDIR-N.
        newvmdir: PathBuf,
        /// How many clones.
        #[arg(long, value_name = "N")]
        count: Option<usize>,
        /// Start each clone once it is made.
        #[arg(long)]
        start: bool,
        /// The TAP device of each network adapter of clone N: a template
        /// where {tap} is the snapshot's tap and {n} the clone's number.
        #[arg(long, value_name = "TEMPLATE", default_value = "{tap}-{n}")]
        tap: String,
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
pub struct CreateArgs {
    /// The new VM directory (created if missing; must not hold a VM).
    pub vmdir: PathBuf,
    /// Kernel image: an ELF with a PVH entry note or a bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = "")]
    pub cmdline: String,
    /// Guest memory, e.g. 256M or 1G.
    #[arg(long, value_name = "SIZE", default_value = "256M")]
    pub memory: String,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub vcpus: u8,
    /// A disk (raw or qcow2), repeatable; ",readonly" refuses guest writes.
    #[arg(long = "disk", value_name = "PATH[,readonly]")]
    pub disks: Vec<String>,
    /// A network adapter (virtio-net) on TAP device NAME, repeatable. The
    /// VMM creates the tap if it does not exist (and it goes away with the
    /// VMM); an existing one, e.g. on a bridge, is used as it is. Without
    /// mac= a locally administered MAC is generated and kept in vm.toml.
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC]")]
    pub nets: Vec<String>,
    /// Reference kernel, initrd and disks in place instead of copying them.
    #[arg(long)]
    pub link: bool,
    /// Pin each vCPU thread to one host CPU (round robin over the CPUs
    /// snapvm may use). "auto" pins on the kvm_pvm software backend, where
    /// a vCPU thread moving between CPUs can see stale guest memory after
    /// an apply; hardware KVM does not need it.
    #[arg(long, value_enum, value_name = "WHEN", default_value = "auto")]
    pub pin_vcpus: crate::machine::backend_quirks::PinVcpus,
    /// Back guest RAM with transparent huge pages: "auto" and "on" do;
    /// "off" keeps it on 4 KiB pages (an old kvm_pvm workaround against
    /// stale memory after an apply, no longer needed there; applies then
    /// take longer the more memory the guest has).
    #[arg(long, value_enum, value_name = "WHEN", default_value = "auto")]
    pub huge_pages: crate::machine::backend_quirks::HugePages,
}

#[derive(Subcommand)]
pub enum DiskCommand {
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
    /// Attach a disk image (raw or qcow2) to a VM that is off, as its last
    /// disk. The image is copied into VMDIR/disks/ unless --link (or it is
    /// there already, e.g. a disk detached earlier).
    Attach {
        /// The VM directory.
        vmdir: PathBuf,
        /// The image.
        path: PathBuf,
        /// Its name in the VM (default: the first free diskN).
        #[arg(long)]
        name: Option<String>,
        /// Refuse guest writes.
        #[arg(long)]
        readonly: bool,
        /// Never forked by a snapshot nor rewound by an apply (for results
        /// that must survive reverts); snapshots record only whether it is
        /// attached. Must be a single image (no backing chain).
        #[arg(long)]
        independent: bool,
        /// Reference the image in place instead of copying it.
        #[arg(long)]
        link: bool,
    },
    /// Detach disk NAME from a VM that is off. Its files stay, and
    /// snapshots that have the disk attach it again when applied.
    Detach {
        /// The VM directory.
        vmdir: PathBuf,
        /// The disk's name (see `snapvm config VMDIR`).
        name: String,
    },
}

#[derive(Subcommand)]
pub enum NetCommand {
    /// Attach a network adapter on TAP device NAME to a VM that is off.
    Attach {
        /// The VM directory.
        vmdir: PathBuf,
        /// The host's TAP device (created by the VMM if missing).
        #[arg(long, value_name = "NAME")]
        tap: String,
        /// The adapter's MAC address (default: a generated, locally
        /// administered one).
        #[arg(long, value_name = "MAC")]
        mac: Option<String>,
    },
    /// Detach network adapter NAME (e.g. net0) from a VM that is off.
    Detach {
        /// The VM directory.
        vmdir: PathBuf,
        /// The adapter's name (see `snapvm config VMDIR`).
        name: String,
    },
}

#[derive(clap::Args)]
pub struct ConfigArgs {
    /// The VM directory.
    pub vmdir: PathBuf,
    /// Guest memory, e.g. 512M or 1G.
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// Number of vCPUs.
    #[arg(long, value_name = "N")]
    pub vcpus: Option<u8>,
    /// Kernel command line.
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// Kernel image (copied into VMDIR/kernel/ unless --link).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk (copied into VMDIR/kernel/ unless --link).
    #[arg(long, value_name = "PATH", conflicts_with = "no_initrd")]
    pub initrd: Option<PathBuf>,
    /// Boot without an initial ramdisk.
    #[arg(long)]
    pub no_initrd: bool,
    /// Reference --kernel and --initrd in place instead of copying them.
    #[arg(long)]
    pub link: bool,
    /// Print the configuration as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum CloneCommand {
    /// Make a clone standalone: copy the snapshot's disk layers it stands on
    /// (flattened) and, if it never started, the snapshot's state and
    /// memory into it, so the source snapshot can be deleted. The clone
    /// must be off.
    Detach {
        /// The clone's VM directory.
        vmdir: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum BenchCommand {
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
        /// Delete each memory.bin right after its snapshot instead of
        /// keeping it as a user would (the files are kept by default, as
        /// many as the file system has room for; this measures how much
        /// the kept files cost).
        #[arg(long)]
        delete_files: bool,
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
        /// Guest RAM on huge pages: auto (= on), on or off; run it with on
        /// and off to see what keeping guest RAM on 4 KiB pages costs.
        #[arg(long, value_enum, value_name = "WHEN", default_value = "auto")]
        huge_pages: crate::machine::backend_quirks::HugePages,
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
    /// Clones: N clones of a running snapshot, made and started; time to
    /// running and to the first verified pass (p50/p95) and host memory,
    /// next to export + start --from of the same snapshot.
    Clone {
        /// Clones.
        #[arg(long, default_value_t = 20)]
        count: usize,
        /// Guest memory in MiB (half of it read-only data the clones share).
        #[arg(long, default_value_t = 1024)]
        size: u64,
        /// Export + start --from runs (each copies the whole snapshot).
        #[arg(long, default_value_t = 3)]
        baseline: usize,
        /// Directory for the VMs (default: the system temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The test guest (default: the one built with snapvm).
        #[arg(long, value_name = "PATH")]
        kernel: Option<PathBuf>,
    },
    /// Network: ping and UDP echo round trips (p50/p99) and echo rate of
    /// the test guest next to QEMU's virtio-net, in a namespace of its own;
    /// echoes lost and the longest round trip while live snapshots are
    /// taken; time from an apply to the first echo reply.
    Net {
        /// Round trips per method.
        #[arg(long, default_value_t = 500)]
        count: usize,
        /// Live snapshots, and applies, measured.
        #[arg(long, default_value_t = 5)]
        snapshots: usize,
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
pub struct RunArgs {
    /// Kernel image: an ELF with a PVH entry note (vmlinux, the test guest) or a bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = "")]
    pub cmdline: String,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Guest memory, e.g. 256M or 1G (a plain number means MiB).
    #[arg(long, value_name = "SIZE", default_value = "256M")]
    pub memory: String,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub vcpus: u16,
    /// A disk (raw, or qcow2 with its backing chain) as a virtio-blk device;
    /// repeat for more, in the order the guest sees them. Add ",readonly"
    /// to refuse guest writes. The devices are announced on the kernel
    /// command line (virtio_mmio.device=...).
    #[arg(long = "disk", value_name = "PATH[,readonly]")]
    pub disks: Vec<String>,
    /// A network adapter (virtio-net) on TAP device NAME, repeatable; the
    /// tap is created if it does not exist. Without mac= a locally
    /// administered MAC is generated.
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC]")]
    pub nets: Vec<String>,
    /// Pin each vCPU thread to one host CPU: auto (on the kvm_pvm backend,
    /// which needs it), on or off.
    #[arg(long, value_enum, value_name = "WHEN", default_value = "auto")]
    pub pin_vcpus: crate::machine::backend_quirks::PinVcpus,
    /// Back guest RAM with transparent huge pages: "auto" and "on" do;
    /// "off" keeps it on 4 KiB pages (an old kvm_pvm workaround against
    /// stale memory after an apply, no longer needed there; applies then
    /// take longer the more memory the guest has).
    #[arg(long, value_enum, value_name = "WHEN", default_value = "auto")]
    pub huge_pages: crate::machine::backend_quirks::HugePages,
}
