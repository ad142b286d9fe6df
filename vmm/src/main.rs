//! The `snapvm` command (its code is the vmm crate's `cli` module).

fn main() -> std::process::ExitCode {
    vmm::cli::main()
}
