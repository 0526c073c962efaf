//! What a build starts from: an image resolved in its store (its layers viewed merged),
//! or any unpacked root filesystem (`/` included); and the kernel chosen in it.

use std::path::{Path, PathBuf};

use layerboot_init::lookup::MergedView;
use layerboot_init::store::Store;

use crate::inspect::{kernels, Kernel};
use layerboot_init::error::{Error, OsCause, Result};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg, OFlag};

/// The largest file of an image the builder reads whole (kernels are ~10 MiB, the
/// largest modules and firmware files tens of MiB).
pub const MAX_IMAGE_FILE: u64 = 256 << 20;

pub struct SourceImage {
    pub view: MergedView,
    /// For messages: `image debian:12` or `root filesystem /`.
    pub name: String,
}

impl SourceImage {
    pub fn open(store: &Path, reference: &str, namespace: Option<&str>) -> Result<SourceImage> {
        let store = Store::open(store)?.with_namespace(namespace.map(str::to_string));
        let image = store.resolve(reference)?;
        let view = MergedView::new(&image);
        Ok(SourceImage {
            view,
            name: format!("image {reference}"),
        })
    }

    pub fn rootfs(dir: &Path) -> Result<SourceImage> {
        if !dir.is_dir() {
            return Err(format!("--rootfs {}: no such directory", dir.display()).into());
        }
        Ok(SourceImage {
            view: MergedView::from_dirs(vec![dir.to_path_buf()]),
            name: format!("root filesystem {}", dir.display()),
        })
    }

    /// The bytes of a file of the image (symlinks followed inside it), if it has one. A
    /// file over [`MAX_IMAGE_FILE`] (a sparse one costs its pusher nothing) is refused
    /// before it is read.
    pub fn read(&self, path: &str) -> Result<Option<Vec<u8>>> {
        match self.view.lookup_follow(path)? {
            Some(e) if e.metadata.is_file() && e.metadata.len() > MAX_IMAGE_FILE => Err(format!(
                "{path} of {} is {} bytes, more than any kernel, module or firmware file ({MAX_IMAGE_FILE}) \
                 (fix: check the image; remove the file)",
                self.name,
                e.metadata.len()
            )
            .into()),
            Some(e) if e.metadata.is_file() => std::fs::read(&e.host_path)
                .map(Some)
                .map_err(|err| Error::io("cannot read", &e.host_path, err)),
            _ => Ok(None),
        }
    }

    /// Like [`read`](Self::read), for a small config file: one over `max` bytes is refused
    /// (naming it) before it is read, whatever the image holds.
    pub fn read_config(&self, path: &str, max: u64) -> Result<Option<Vec<u8>>> {
        self.read_at_most(path, max, "a config file's", "remove it or write it anew")
    }

    /// Like [`read`](Self::read), for a file of at most `max` bytes (`kind` says whose
    /// limit it is, `fix` what to do): a larger one is refused before it is read.
    pub fn read_at_most(&self, path: &str, max: u64, kind: &str, fix: &str) -> Result<Option<Vec<u8>>> {
        match self.view.lookup_follow(path)? {
            Some(e) if e.metadata.is_file() && e.metadata.len() > max => Err(format!(
                "{path} of {} is {} bytes, more than {kind} {max} (fix: {fix})",
                self.name,
                e.metadata.len()
            )
            .into()),
            _ => self.read(path),
        }
    }

    /// The kernel to build for: `wanted`, or the only one, or the newest (with a note).
    pub fn kernel(&self, wanted: Option<&str>, need: impl Fn(&Kernel) -> bool) -> Result<Kernel> {
        let mut all: Vec<Kernel> = kernels(&self.view)?.into_iter().filter(|k| need(k)).collect();
        let reference = &self.name;
        if all.is_empty() {
            return Err(format!(
                "{reference} has no kernel (no /boot/vmlinuz-* with /lib/modules/*): \
                 install one in the image, e.g. RUN apt-get install linux-image-amd64 (Debian) or apk add linux-virt (Alpine)"
            ).into());
        }
        all.sort_by_key(|a| version_key(&a.version));
        if let Some(w) = wanted {
            let names: Vec<String> = all.iter().map(|k| k.version.clone()).collect();
            return all
                .into_iter()
                .find(|k| k.version == w)
                .ok_or_else(|| format!("{reference} has no kernel {w}; it has {}", names.join(", ")).into());
        }
        if all.len() > 1 {
            eprintln!(
                "note: {reference} has kernels {}; using the newest (choose with --kver)",
                all.iter().map(|k| k.version.as_str()).collect::<Vec<_>>().join(", ")
            );
        }
        Ok(all.pop().unwrap())
    }

    /// Where a file of the image really is on the host.
    pub fn host_path(&self, path: &str) -> Result<PathBuf> {
        match self.view.lookup_follow(path)? {
            Some(e) => Ok(e.host_path),
            None => Err(format!("the image has no {path}").into()),
        }
    }
}

/// "6.1.0-10-amd64" sorts after "6.1.0-9-amd64": compare digit runs as numbers.
fn version_key(v: &str) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut rest = v;
    while !rest.is_empty() {
        let digits = rest.chars().take_while(|c| c.is_ascii_digit()).count();
        let (num, tail) = rest.split_at(digits);
        let text_len = tail.chars().take_while(|c| !c.is_ascii_digit()).count();
        let (text, tail) = tail.split_at(text_len);
        out.push((num.parse().unwrap_or(0), text.to_string()));
        rest = tail;
    }
    out
}

/// Writes `data` to `path` atomically: a temporary file beside it, fsync, rename, fsync.
pub fn write_atomically(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| format!("{} is not a file name", path.display()))?;
    remove_stale_temporaries(dir, &name.to_string_lossy());
    // PID and time: a name no other write uses, even one cut by a power loss before a
    // reboot that hands this process the same PID, or one in another PID namespace.
    let temporary = || {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        dir.join(format!(".{}.tmp{}-{nanos}", name.to_string_lossy(), std::process::id()))
    };
    let mut tmp = temporary();
    let result = (|| {
        let mut attempts = 0;
        let mut f = loop {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&tmp)?;
            // Held until the file has its name: what tells a live write from a cut one.
            let f = Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| std::io::Error::from(e))?;
            // Another write's clean-up may have taken it before the lock: a new name.
            attempts += 1;
            if f.metadata()?.nlink() > 0 || attempts == 3 {
                break f;
            }
            tmp = temporary();
        };
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // On FAT (the ESP) a rename makes a new directory entry whose start and size are
        // written with the inode, later: flush the file again under its new name, or a
        // power cut leaves an empty file there.
        std::fs::File::open(path)?.sync_all()
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        let errno = OsCause::errno(&e);
        let fix = format!("fix: check that {} exists and is writable", dir.display());
        Error::new(format!("cannot write {}: {e} ({fix})", path.display()))
            .with_errno(errno)
            .with_path(path)
    })
}

/// Removes what earlier writes of `name` into `dir` left when they were cut short (by a
/// power loss during a deploy, say: megabytes of initramfs on a small ESP). Each write
/// holds an flock on its temporary file until the file is renamed, and the kernel drops
/// it with the process, so a file nobody holds is left over, whatever its PID says; one
/// that is held is another write under way, and is left alone. A write that has created
/// its file but not yet locked it can lose it here; it sees that (no links) and starts again.
fn remove_stale_temporaries(dir: &Path, name: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let prefix = format!(".{name}.tmp");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return; // the write itself will name the problem
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        // `.NAME.tmpPID-NANOS`, or `.NAME.tmpPID` as earlier versions named it.
        let ours = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .is_some_and(|rest| {
                let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
                match rest.split_once('-') {
                    Some((pid, nanos)) => digits(pid) && digits(nanos),
                    None => digits(rest),
                }
            });
        if !ours {
            continue;
        }
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY).bits())
            .open(entry.path());
        let unheld = match opened {
            // Shared: it fails just as well against a writer's exclusive lock, and works
            // on a read-only descriptor where flock is emulated (NFS).
            Ok(f) => Flock::lock(f, FlockArg::LockSharedNonblock).is_ok(),
            // A symlink under that name was never a write of ours.
            Err(e) => e.raw_os_error() == Some(Errno::ELOOP as i32),
        };
        if unheld {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_write_cut_by_a_power_loss_leaves_nothing_that_stops_or_fills_the_next() {
        use nix::fcntl::{Flock, FlockArg};
        let t = tempfile::tempdir().unwrap();
        let file = |n: &str| t.path().join(n);
        // Left by cut writes: one named as earlier versions did, under this process's PID
        // (PIDs repeat after a reboot), and one of a PID no process can have.
        let own = format!(".initramfs.img.tmp{}", std::process::id());
        for n in [own.as_str(), ".initramfs.img.tmp99999999-12"] {
            std::fs::write(file(n), "half a file").unwrap();
        }
        // A symlink under such a name, never a write: removed, its target kept.
        std::fs::write(file("target"), "kept").unwrap();
        std::os::unix::fs::symlink(file("target"), file(".initramfs.img.tmp7")).unwrap();
        // A FIFO under such a name: opening it must not wait for a writer.
        nix::unistd::mkfifo(&file(".initramfs.img.tmp8-8"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        // Not such leftovers: a write under way (it holds its file), another file's, and a
        // name that only starts like one.
        std::fs::write(file(".initramfs.img.tmp1-1"), "being written").unwrap();
        let _live = Flock::lock(
            std::fs::File::open(file(".initramfs.img.tmp1-1")).unwrap(),
            FlockArg::LockExclusive,
        )
        .unwrap();
        for n in [".vmlinuz.tmp99999999", ".initramfs.img.tmpx"] {
            std::fs::write(file(n), "").unwrap();
        }
        super::write_atomically(&file("initramfs.img"), b"whole", 0o644).unwrap();
        assert_eq!(std::fs::read(file("initramfs.img")).unwrap(), b"whole");
        assert_eq!(std::fs::read(file("target")).unwrap(), b"kept");
        let mut left: Vec<String> = std::fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                ".initramfs.img.tmp1-1",
                ".initramfs.img.tmpx",
                ".vmlinuz.tmp99999999",
                "initramfs.img",
                "target"
            ]
        );
    }

    #[test]
    fn kernel_versions_sort_numerically() {
        let mut v = vec!["6.1.0-10-amd64", "6.1.0-9-amd64", "5.10.0-30-amd64"];
        v.sort_by_key(|s| super::version_key(s));
        assert_eq!(v, ["5.10.0-30-amd64", "6.1.0-9-amd64", "6.1.0-10-amd64"]);
    }

    #[test]
    fn a_file_past_the_bound_is_refused_before_it_is_read() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("boot")).unwrap();
        // Sparse: it costs its pusher nothing, and would cost the builder 1 GiB.
        let big = std::fs::File::create(t.path().join("boot/vmlinuz-6.1.0")).unwrap();
        big.set_len(1 << 30).unwrap();
        let src = super::SourceImage::rootfs(t.path()).unwrap();
        let e = src.read("/boot/vmlinuz-6.1.0").unwrap_err().to_string();
        assert!(
            e.contains("more than any kernel, module or firmware file") && e.contains("fix:"),
            "{e}"
        );
    }
}
