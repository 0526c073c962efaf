//! Where /init's time goes. Loading modules, mounting and snapshotting are the kernel's
//! work, which /init only asks for; the CPU time they take is counted here, so that the
//! boot's timing line can tell /init's own work (its CPU time less the kernel's work,
//! with no I/O or device waits in it) from the rest.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::time::{clock_gettime, ClockId};

static KERNEL_CPU_MICROS: AtomicU64 = AtomicU64::new(0);
/// The user-mode part of that: /init's own code run for the kernel's work (decompressing
/// a module before it is loaded).
static KERNEL_USER_MICROS: AtomicU64 = AtomicU64::new(0);

/// CPU time this process has used, user and system.
pub fn process_cpu() -> Duration {
    clock_gettime(ClockId::CLOCK_PROCESS_CPUTIME_ID)
        .map(Duration::from)
        .unwrap_or_default()
}

/// User-mode CPU time this process has used: its own code, none of the kernel's.
pub fn process_user_cpu() -> Duration {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .map(|u| Duration::from_micros((u.user_time().tv_sec() * 1_000_000 + u.user_time().tv_usec()) as u64))
        .unwrap_or_default()
}

/// Runs `f`, a request for the kernel's work, and counts the CPU time it takes as the kernel's.
/// Module loading counts here with the decompression /init does for it.
pub fn kernel_work<T>(f: impl FnOnce() -> T) -> T {
    let (start, start_user) = (process_cpu(), process_user_cpu());
    let r = f();
    KERNEL_CPU_MICROS.fetch_add(
        process_cpu().saturating_sub(start).as_micros() as u64,
        Ordering::Relaxed,
    );
    KERNEL_USER_MICROS.fetch_add(
        process_user_cpu().saturating_sub(start_user).as_micros() as u64,
        Ordering::Relaxed,
    );
    r
}

/// The part of [`own_cpu`] in /init's own code since `start_user` (a
/// [`process_user_cpu`] reading): its user time less that spent for the kernel's work.
pub fn own_user_cpu(start_user: Duration) -> Duration {
    process_user_cpu()
        .saturating_sub(start_user)
        .saturating_sub(Duration::from_micros(KERNEL_USER_MICROS.load(Ordering::Relaxed)))
}

/// /init's own CPU time since `start` (a [`process_cpu`] reading): all of it but the
/// kernel's work it asked for. PID 1 needs the start: its clock also holds the kernel's
/// own boot, done in the same task before it ran /init.
pub fn own_cpu(start: Duration) -> Duration {
    process_cpu()
        .saturating_sub(start)
        .saturating_sub(Duration::from_micros(KERNEL_CPU_MICROS.load(Ordering::Relaxed)))
}
