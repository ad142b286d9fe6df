//! Builds the test guest (guest-images/testguest) with the system's gcc and
//! ld. The guest is freestanding x86-64 code with a PVH ELF note; it needs no
//! downloads and no Rust target beyond the host's.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const CFLAGS: &[&str] = &[
    "-O2",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-fno-stack-protector",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-fno-asynchronous-unwind-tables",
    "-fno-tree-loop-distribute-patterns",
    "-Wall",
    "-Wextra",
    "-Werror",
];

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (is gcc installed?)"));
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn compile(src: &Path, obj: &Path) {
    run(Command::new("gcc")
        .args(CFLAGS)
        .arg("-c")
        .arg(src)
        .arg("-o")
        .arg(obj));
}

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let src = manifest.join("testguest");
    for f in ["start.S", "main.c", "hostile.c", "link.ld"] {
        println!("cargo:rerun-if-changed={}", src.join(f).display());
    }
    let start_o = out.join("start.o");
    let main_o = out.join("main.o");
    compile(&src.join("start.S"), &start_o);
    compile(&src.join("main.c"), &main_o);
    let elf = out.join("testguest.elf");
    run(Command::new("ld")
        .args([
            "-nostdlib",
            "-static",
            "-no-pie",
            "-z",
            "max-page-size=4096",
        ])
        .args(["--no-warn-rwx-segments", "-z", "noexecstack"])
        .arg("-T")
        .arg(src.join("link.ld"))
        .arg("-o")
        .arg(&elf)
        .arg(&start_o)
        .arg(&main_o));
    println!("cargo:rustc-env=SNAPVM_TESTGUEST_ELF={}", elf.display());
}
