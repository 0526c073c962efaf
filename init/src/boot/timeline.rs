//! When each step of a boot happened and what it cost: wall time, /init's own CPU time
//! (less the module loads, mounts and snapshots it asks the kernel for) and the part of
//! that in /init's own code. Kept in memory and logged as one line at the end: a console
//! line costs ~10 ms on a serial console, more than most steps.

use std::cell::RefCell;
use std::time::{Duration, Instant};

pub struct Timeline {
    started: Instant,
    /// This process's CPU time when /init started (see [`crate::cost::own_cpu`]).
    cpu_at_start: Duration,
    /// The same in user mode only: /init's own code.
    user_cpu_at_start: Duration,
    /// (stage, ms since start): the stages of the timing line.
    stages: RefCell<Vec<(&'static str, u128)>>,
    /// (point, ms since start, own CPU ms, of it in /init's code ms): the debug timeline.
    marks: RefCell<Vec<(&'static str, u128, u128, u128)>>,
}

impl Timeline {
    pub fn start() -> Timeline {
        Timeline {
            started: Instant::now(),
            cpu_at_start: crate::cost::process_cpu(),
            user_cpu_at_start: crate::cost::process_user_cpu(),
            stages: RefCell::default(),
            marks: RefCell::default(),
        }
    }

    /// A finer point for `layerboot.debug`'s timeline.
    pub fn mark(&self, what: &'static str) {
        let (cpu, user) = self.own_work_ms();
        self.marks
            .borrow_mut()
            .push((what, self.started.elapsed().as_millis(), cpu, user));
    }

    /// The end of a stage of the timing line; `detail` goes to the debug log.
    pub fn stage(&self, name: &'static str, detail: &str) {
        let ms = self.started.elapsed().as_millis();
        self.stages.borrow_mut().push((name, ms));
        log::debug!("{name}: {detail} ({ms} ms)");
    }

    /// /init's own CPU time so far and the part of it in /init's own code, in ms.
    fn own_work_ms(&self) -> (u128, u128) {
        let user = crate::cost::own_user_cpu(self.user_cpu_at_start);
        (crate::cost::own_cpu(self.cpu_at_start).as_millis(), user.as_millis())
    }

    /// Logs the debug timeline and the boot's one timing line: `what` booted (image and
    /// ID), `next` (switching to, or root ready for) `init`; `kernel_time` is the time
    /// spent loading modules and waiting for devices.
    pub fn report(&self, what: &str, next: &str, init: &str, kernel_time: Duration) {
        let marks: Vec<String> = self
            .marks
            .borrow()
            .iter()
            .map(|(w, ms, cpu, user)| format!("{w} {ms}/{cpu}/{user}"))
            .collect();
        log::debug!(
            "timeline (ms since start / own CPU ms / of it in /init's code): {}",
            marks.join(", ")
        );
        let total = self.started.elapsed();
        let fs_time = crate::mounts::fs_time();
        let stages: Vec<String> = self.stages.borrow().iter().map(|(n, ms)| format!("{n} {ms}")).collect();
        // To 0.1 ms, the figures the benchmark reads its goals from: whole milliseconds
        // cut 10.9 down to 10.
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let own_cpu = ms(crate::cost::own_cpu(self.cpu_at_start));
        let own_code = ms(crate::cost::own_user_cpu(self.user_cpu_at_start));
        log::info!(
            "layerboot: {what}: {next} {init} at {} ms (init's own work {own_cpu:.1} ms CPU, {own_code:.1} ms of it in its own \
             code and the rest in the kernel serving its reads and writes; {} ms with its reads of the store; mounts and \
             snapshots {} ms, flushes {:.1} ms of it (waits for the disk to commit: syncfs, snapshots); modules (their decompression included) and device waits {} ms; \
             stages: {})",
            total.as_millis(),
            total.saturating_sub(kernel_time).saturating_sub(fs_time).as_millis(),
            fs_time.as_millis(),
            ms(crate::mounts::flush_time()),
            kernel_time.as_millis(),
            stages.join(", ")
        );
    }
}
