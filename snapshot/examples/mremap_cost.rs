// Scratch experiment: cost of retiring 4 KiB-populated guest memory.
use std::time::Instant;
use userfaultfd::{FeatureFlags, RegisterMode, UffdBuilder};

const LEN: usize = 1 << 30;

fn map(huge: bool) -> usize {
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            LEN + (2 << 20),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    } as usize;
    let a = (p + (2 << 20) - 1) & !((2 << 20) - 1);
    unsafe {
        libc::madvise(
            a as *mut _,
            LEN,
            if huge {
                libc::MADV_HUGEPAGE
            } else {
                libc::MADV_NOHUGEPAGE
            },
        )
    };
    for off in (0..LEN).step_by(4096) {
        unsafe { *((a + off) as *mut u8) = 1 };
    }
    a
}

fn mremap_away(a: usize) -> f64 {
    let scratch = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            LEN,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    let t = Instant::now();
    let r = unsafe {
        libc::mremap(
            a as *mut _,
            LEN,
            LEN,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            scratch,
        )
    };
    let el = t.elapsed().as_secs_f64() * 1000.0;
    assert_ne!(r, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
    el
}

fn main() {
    for huge in [false, true] {
        let a = map(huge);
        println!("huge={huge} plain mremap: {:.2} ms", mremap_away(a));

        let a = map(huge);
        let u = UffdBuilder::new()
            .user_mode_only(false)
            .non_blocking(true)
            .require_features(
                FeatureFlags::PAGEFAULT_FLAG_WP | FeatureFlags::from_bits_retain(1 << 13),
            )
            .create()
            .unwrap();
        u.register_with_mode(a as *mut _, LEN, RegisterMode::WRITE_PROTECT)
            .unwrap();
        println!(
            "huge={huge} registered, not protected, mremap: {:.2} ms",
            mremap_away(a)
        );

        let a = map(huge);
        u.register_with_mode(a as *mut _, LEN, RegisterMode::WRITE_PROTECT)
            .unwrap();
        let t = Instant::now();
        u.write_protect(a as *mut _, LEN).unwrap();
        println!(
            "huge={huge} protect: {:.2} ms",
            t.elapsed().as_secs_f64() * 1000.0
        );
        println!(
            "huge={huge} registered+protected mremap: {:.2} ms",
            mremap_away(a)
        );

        let a = map(huge);
        u.register_with_mode(a as *mut _, LEN, RegisterMode::WRITE_PROTECT)
            .unwrap();
        u.write_protect(a as *mut _, LEN).unwrap();
        let t = Instant::now();
        u.unregister(a as *mut _, LEN).unwrap();
        println!(
            "huge={huge} unregister of protected: {:.2} ms",
            t.elapsed().as_secs_f64() * 1000.0
        );
        println!("huge={huge} then mremap: {:.2} ms", mremap_away(a));

        // EVENT_REMAP context
        let a = map(huge);
        let u2 = UffdBuilder::new()
            .user_mode_only(false)
            .non_blocking(true)
            .require_features(
                FeatureFlags::PAGEFAULT_FLAG_WP
                    | FeatureFlags::from_bits_retain(1 << 13)
                    | FeatureFlags::EVENT_REMAP,
            )
            .create()
            .unwrap();
        u2.register_with_mode(a as *mut _, LEN, RegisterMode::WRITE_PROTECT)
            .unwrap();
        u2.write_protect(a as *mut _, LEN).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&u2);
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 32];
            loop {
                let mut p = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                unsafe { libc::poll(&mut p, 1, 5000) };
                let n = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut _, 32) };
                if n == 32 {
                    println!("  event {:#x}", buf[0]);
                    return;
                }
            }
        });
        println!(
            "huge={huge} EVENT_REMAP registered+protected mremap: {:.2} ms",
            mremap_away(a)
        );
        reader.join().unwrap();
    }
}
