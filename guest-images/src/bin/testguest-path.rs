//! Prints the path of the built test guest, for scripts and the README demo.

fn main() {
    println!("{}", guest_images::TESTGUEST_ELF);
}
