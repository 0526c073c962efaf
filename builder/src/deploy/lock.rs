//! One command at a time changes an ESP's deployments.
//!
//! `deploy`, `rollback`, `gc` and `bless` each read every entry, decide, then write: two
//! at once (a fleet agent's deploy while the boot's bless service runs, say) would each
//! decide from what the other is changing, and could give two entries one serial or drop
//! the other's GRUB variable. They take an exclusive `flock` on the ESP's root directory
//! first. flock is the kernel's (any filesystem, FAT included), and goes with the
//! process, so a command killed or cut by a power loss leaves no lock behind.

use std::fs::File;
use std::path::Path;

use layerboot_init::error::{Error, Result};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// Held while the command changes the ESP; dropping it releases the lock.
pub struct EspLock {
    _lock: Flock<File>,
}

/// Waits for any other layerboot command changing `esp`, saying so, then holds it.
pub fn lock(esp: &Path) -> Result<EspLock> {
    let dir = File::open(esp).map_err(|e| {
        Error::new(format!(
            "cannot open the ESP {}: {e} (fix: mount it there, or pass --esp with its mount point)",
            esp.display()
        ))
        .with_path(esp)
    })?;
    let dir = match Flock::lock(dir, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => return Ok(EspLock { _lock: lock }),
        Err((dir, Errno::EWOULDBLOCK)) => dir,
        Err((_, e)) => return Err(Error::io("cannot lock", esp, e)),
    };
    eprintln!(
        "waiting for another layerboot command that is changing the deployments on {} to finish",
        esp.display()
    );
    Flock::lock(dir, FlockArg::LockExclusive)
        .map(|lock| EspLock { _lock: lock })
        .map_err(|(_, e)| Error::io("cannot lock", esp, e))
}
