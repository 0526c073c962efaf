//! /init's cost accounting (init/src/cost.rs). Its clocks are the whole process's, as
//! they must be for PID 1, so these checks run here, in a test binary of their own, one
//! after the other: beside the unit tests' threads, their CPU time counted too (a clean
//! clone's run read half of a system-call loop as user time).

use std::time::Duration;

use layerboot_init::cost::{kernel_work, own_cpu, own_user_cpu, process_cpu, process_user_cpu};

#[test]
fn cpu_time_is_split_into_own_code_kernel_service_and_kernel_work() {
    user_time_is_own_code_and_not_the_kernels_service();
    the_kernels_share_is_not_own_work();
}

fn spin(d: Duration) {
    let end = process_cpu() + d;
    while process_cpu() < end {}
}

fn user_time_is_own_code_and_not_the_kernels_service() {
    let (user0, cpu0) = (process_user_cpu(), process_cpu());
    // Arithmetic, with the clock (itself a system call) read only now and then.
    let mut x = 1u64;
    while process_cpu() < cpu0 + Duration::from_millis(100) {
        for _ in 0..1_000_000 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
    let (user1, cpu1) = (process_user_cpu(), process_cpu());
    // The same CPU time spent in system calls instead: reads of a file the kernel
    // writes out on each read, with next to no work of ours around them.
    let stat = std::fs::File::open("/proc/self/stat").unwrap();
    let mut page = [0u8; 4096];
    while process_cpu() < cpu1 + Duration::from_millis(100) {
        for _ in 0..100 {
            let _ = nix::sys::uio::pread(&stat, &mut page, 0);
        }
    }
    let (user2, cpu2) = (process_user_cpu(), process_cpu());
    assert!(
        user1 - user0 > (cpu1 - cpu0) / 2,
        "spinning is user time: {:?} of {:?}",
        user1 - user0,
        cpu1 - cpu0
    );
    assert!(
        user2 - user1 < (cpu2 - cpu1) / 2,
        "system calls are not: {:?} of {:?}",
        user2 - user1,
        cpu2 - cpu1
    );
}

fn the_kernels_share_is_not_own_work() {
    let (start, start_user) = (process_cpu(), process_user_cpu());
    spin(Duration::from_millis(20));
    // Spinning on the clock is partly user time: in the kernel's work, none of it is own code.
    kernel_work(|| spin(Duration::from_millis(60)));
    let (own, own_user) = (own_cpu(start), own_user_cpu(start_user));
    assert!(
        own >= Duration::from_millis(20) && own < Duration::from_millis(50),
        "own {own:?}"
    );
    assert!(
        own_user <= own + Duration::from_millis(5),
        "own code {own_user:?} of own {own:?}"
    );
}
