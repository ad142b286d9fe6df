//! Unit tests of vmm/src/vmdir.rs: vm.toml reading and checks, paths,
//! creation.

/// vm.toml as a user might damage it: refused with the file and key
/// named, or read, never a panic.
#[test]
fn fuzz_vm_toml() {
    let root = std::env::temp_dir().join(format!("snapvm-fuzz-toml-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("disks")).unwrap();
    std::fs::copy(guest_images::testguest_path(), root.join("k")).unwrap();
    std::fs::write(root.join("disks/d.raw"), vec![0u8; 4096]).unwrap();
    let valid = "name = \"v\"\nkernel = \"k\"\ncmdline = \"x\"\nmemory = \"64M\"\nvcpus = 1\n\n[[disk]]\nname = \"disk0\"\nbase = \"disks/d.raw\"\ncurrent = \"disks/d.raw\"\n\n[[net]]\nname = \"net0\"\ntap = \"t0\"\nmac = \"52:54:00:12:34:56\"\n\n[clone]\nsource = \"/x\"\nsnapshot = \"s\"\n";
    let dir = VmDir::new(&root);
    std::fs::write(dir.config_path(), valid).unwrap();
    dir.load().expect("the sample is valid");
    fuzzing::run("vm.toml", 2000, 256, |u| {
        std::fs::write(dir.config_path(), fuzzing::mutate(valid.as_bytes(), u)?).unwrap();
        if let Err(e) = dir.load() {
            assert!(!e.to_string().is_empty());
        }
        Ok(())
    });
    let _ = std::fs::remove_dir_all(&root);
}

use super::*;

fn tmp(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("snapvm-vmdir-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

fn sample(root: &Path) -> VmDir {
    // An ELF header (64-bit, little-endian) with no program headers:
    // enough for the checks, which read the load segments.
    let k = root.join("k.elf");
    let mut elf = vec![0u8; 64];
    elf[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
    elf[0x20] = 64; // e_phoff
    elf[0x36] = 56; // e_phentsize
    std::fs::write(&k, elf).unwrap();
    let disk = root.join("d.raw");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    create(
        &root.join("vm"),
        &CreateRequest {
            kernel: k,
            initrd: None,
            cmdline: "workload=idle".into(),
            memory: "64M".into(),
            vcpus: 2,
            pin_vcpus: PinVcpus::Auto,
            huge_pages: HugePages::Auto,
            disks: vec![DiskConfig {
                path: disk,
                readonly: false,
            }],
            nets: vec![],
            link: false,
        },
    )
    .unwrap()
}

#[test]
fn create_then_load_round_trips() {
    let root = tmp("roundtrip");
    let d = sample(&root);
    let t = d.load().unwrap();
    assert_eq!(t.vcpus, 2);
    assert_eq!(t.kernel, PathBuf::from("kernel/k.elf"));
    assert_eq!(t.disks[0].base, PathBuf::from("disks/disk0.raw"));
    assert!(d.root().join("disks/disk0.raw").is_file());
    let c = d.vm_config(&t).unwrap();
    assert_eq!(c.memory, 64 << 20);
    assert!(c.disks[0].path.is_absolute());
    // Moving the directory keeps it valid (relative paths).
    let moved = root.join("moved");
    std::fs::rename(d.root(), &moved).unwrap();
    VmDir::open(&moved).unwrap().load().unwrap();
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn invalid_keys_are_named() {
    let root = tmp("invalid");
    let d = sample(&root);
    let text = std::fs::read_to_string(d.config_path()).unwrap();
    let cases = [
        (text.replace("vcpus = 2", "vcpus = 0"), "key 'vcpus'"),
        (
            text.replace("memory = \"64M\"", "memory = \"lots\""),
            "key 'memory'",
        ),
        (text.replace("vcpus = 2", "vcpus = \"two\""), "vcpus"),
        (
            text.replace("kernel = \"kernel/k.elf\"", "kernel = \"kernel/nope\""),
            "key 'kernel'",
        ),
        (format!("{text}\nbogus = 1\n"), "bogus"),
        (
            text.replace("base = \"disks/disk0.raw\"", "base = \"disks/x.raw\""),
            "key 'disk[0].base'",
        ),
    ];
    for (bad, want) in cases {
        std::fs::write(d.config_path(), &bad).unwrap();
        let e = d.load().unwrap_err().to_string();
        assert!(e.contains(want), "expected {want} in: {e}");
        assert!(e.contains("vm.toml"), "{e}");
    }
    std::fs::remove_dir_all(&root).unwrap();
}

/// `create` refuses values `start` would refuse, before it copies
/// anything: a memory size the kernel does not fit in, too few or too
/// many vCPUs, a memory size that is no size.
#[test]
fn create_checks_what_start_would_refuse() {
    let root = tmp("checks");
    // A kernel with one load segment ending at 8 MiB.
    let mut elf = vec![0u8; 64 + 56];
    elf[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
    elf[0x20] = 64;
    elf[0x36] = 56;
    elf[0x38] = 1;
    elf[64] = 1; // PT_LOAD
    elf[64 + 0x18..64 + 0x20].copy_from_slice(&(1u64 << 20).to_le_bytes());
    elf[64 + 0x28..64 + 0x30].copy_from_slice(&(7u64 << 20).to_le_bytes());
    let k = root.join("big.elf");
    std::fs::write(&k, elf).unwrap();
    let req = |memory: &str, vcpus: u8| CreateRequest {
        kernel: k.clone(),
        initrd: None,
        cmdline: String::new(),
        memory: memory.into(),
        vcpus,
        pin_vcpus: PinVcpus::Auto,
        huge_pages: HugePages::Auto,
        disks: vec![],
        nets: vec![],
        link: false,
    };
    for (memory, vcpus, want) in [
        ("4M", 1, "too small for the kernel"),
        ("1K", 1, "too small"),
        ("0", 1, "too small"),
        ("64M", 0, "key 'vcpus'"),
        ("64M", 255, "above the limit of 254"),
        ("lots", 1, "key 'memory'"),
    ] {
        let vm = root.join("vm");
        let e = create(&vm, &req(memory, vcpus)).unwrap_err().to_string();
        assert!(e.contains(want), "{memory} {vcpus}: {e}");
        assert!(!vm.exists(), "nothing created for {memory} {vcpus}");
    }
    create(&root.join("vm"), &req("9M", 1)).unwrap();
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn long_socket_paths_are_refused() {
    let long = PathBuf::from("/tmp").join("x".repeat(120));
    let d = VmDir::new(&long);
    assert!(matches!(
        d.check_socket_paths(),
        Err(VmDirError::SocketPathTooLong { .. })
    ));
}

#[test]
fn not_a_vm_dir() {
    assert!(matches!(
        VmDir::open(Path::new("/")),
        Err(VmDirError::NotAVmDir(_))
    ));
}
