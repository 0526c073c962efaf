//! The fresh writable root made at every boot, at the store partition's top level:
//!
//! - btrfs driver: `NAME` is a btrfs snapshot of the image's top subvolume;
//! - overlay drivers: `NAME/{upper,work}` are the upper and work dirs of an overlayfs
//!   whose lower dirs are the image's layers.
//!
//! A new layer is made as `NAME.new` and marked "making", filled (the top layer), synced
//! if the fill wrote file contents, marked "complete, generation N", then swapped in with
//! `renameat2(RENAME_EXCHANGE)` and synced: at any instant `NAME` is either the old
//! complete layer or the new complete one. The old one becomes `NAME.prev` (`layerboot.keep` of them are kept).
//! Only marked directories are ever exchanged, renamed or deleted, and a boot cut at any
//! step is finished by the next ([`plan`] is the model; `docs/rotation.md` the argument).
//! The image's own layers are only ever read.

mod fsops;
mod kind;
mod marks;
mod overlay;
pub mod plan;

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;

use crate::btrfs;
use crate::error::{Error, Result};
use crate::settings::Upper;
use crate::store::Image;

use crate::xattr::set as set_xattr;
use fsops::{exchange, remove_layer, rename_noreplace};
pub use kind::{Kind, MountSource};
pub use marks::{layer_image, write_mark, STATE_XATTR};
use marks::{read_mark, unmarked_leftover, IMAGE_XATTR};
pub use overlay::overlay_data;
use plan::{MakeStep, Mark, Slot, State, Step};

/// What filling a new layer wrote: whether it must be flushed before it is marked complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filled {
    /// Nothing, or metadata only (directories, links, empty files, xattrs). ext4's journal
    /// and btrfs's transactions keep metadata in order, so the "complete" mark written
    /// after it never reaches the disk before it: no flush is needed.
    Metadata,
    /// File contents, which delayed allocation may write after metadata that came later:
    /// flushed before the mark that vouches for them.
    Contents,
}

/// Where an unmarked `NAME` from mkinitcpio-docker-hooks is moved aside, once.
pub const ADOPTED_SUFFIX: &str = ".pre-layerboot";

/// Refuses a layer name whose generations (`NAME`, `NAME.*`) would be, contain or lie
/// inside `what` at `rel` (a path from the partition's top level; "" is the top itself),
/// since rotating them would move or delete it.
pub fn check_clear_of(name: &str, what: &str, rel: &str) -> Result<()> {
    let first = rel.trim_matches('/').split('/').next().unwrap_or("");
    let clash = first.is_empty() || first == name || first.starts_with(&format!("{name}."));
    if clash {
        let shown = if first.is_empty() {
            "the partition's top level".to_string()
        } else {
            format!("/{}", rel.trim_matches('/'))
        };
        return Err(Error::new(format!(
            "the writable layer {name} (layerboot.rw= or rootflags=subvol=) and its generations {name}.new, {name}.prev… would \
             be or hold {what} at {shown}: rotating them would move or delete it. Nothing was changed \
             (fix: choose a writable layer name of its own, e.g. layerboot.rw=layerboot-rw, and keep {what} in a directory of its own)"
        )));
    }
    Ok(())
}

/// The generations of one writable layer name at the partition's top level.
pub struct Layers {
    root: PathBuf,
    root_fd: OwnedFd,
    name: String,
    keep: usize,
    state: State,
    /// What went wrong but did not stop the boot, one sentence each.
    pub warnings: Vec<String>,
}

impl Layers {
    /// Reads the marks of `NAME` and its generations under `root`. An unmarked directory
    /// at one of those names stops the boot, except `NAME` itself when `adopt` (the name
    /// came as `rootflags=subvol=`, mkinitcpio-docker-hooks' spelling): it is moved aside
    /// to `NAME.pre-layerboot`, once, and never deleted.
    ///
    /// `origin` is the image's top subvolume on the btrfs driver: a `NAME.new` snapshotted
    /// from it by a boot cut before it was marked is recognised by that and discarded.
    pub fn open(root: &Path, name: &str, keep: usize, adopt: bool, origin: Option<&Path>) -> Result<Layers> {
        let root_fd = OwnedFd::from(fs::File::open(root).map_err(|e| Error::io("cannot open", root, e))?);
        let mut layers = Layers {
            root: root.to_path_buf(),
            root_fd,
            name: name.to_string(),
            keep,
            state: State::new(),
            warnings: Vec::new(),
        };
        let entries = fs::read_dir(root).map_err(|e| Error::io("cannot list", root, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("cannot list", root, e))?;
            let Some(slot) = entry.file_name().to_str().and_then(|f| Slot::parse(name, f)) else {
                continue;
            };
            let path = layers.path(slot);
            match read_mark(&path, slot) {
                Some(mark) => {
                    layers.state.insert(slot, mark);
                }
                None if slot == Slot::Current && adopt => layers.adopt()?,
                // Made by a boot cut before it could mark it: nothing in it but the image.
                // (marked now, so every later step's check of the mark holds).
                None if slot == Slot::New && unmarked_leftover(&path, origin) => {
                    write_mark(&path, Mark::Making)?;
                    layers.state.insert(slot, Mark::Making);
                }
                None => {
                    return Err(Error::new(format!(
                        "{} exists but layerboot did not make it (it has no {STATE_XATTR} mark as layerboot writes them), so layerboot will not \
                         replace, rename or delete it. Nothing was changed (fix: move it elsewhere, or choose another \
                         writable layer name with layerboot.rw=)",
                        path.display()
                    )))
                }
            }
        }
        Ok(layers)
    }

    /// mkinitcpio-docker-hooks' writable subvolume: kept, renamed out of the rotation.
    fn adopt(&mut self) -> Result<()> {
        let (from, to) = (
            self.path(Slot::Current),
            self.root.join(format!("{}{ADOPTED_SUFFIX}", self.name)),
        );
        rename_noreplace(&from, &to).map_err(|e| {
            Error::io(
                &format!("{} has no layerboot mark and cannot be moved aside to", from.display()),
                &to,
                e,
            )
            .context("(fix: move one of them elsewhere)")
        })?;
        self.warn(format!(
            "{} was not made by layerboot (mkinitcpio-docker-hooks' writable layer?): moved aside to {}, kept, never deleted; \
             a fresh layer replaces it",
            from.display(),
            to.display()
        ));
        Ok(())
    }

    pub fn path(&self, slot: Slot) -> PathBuf {
        self.root.join(slot.file_name(&self.name))
    }

    pub fn current(&self) -> PathBuf {
        self.path(Slot::Current)
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    fn warn(&mut self, msg: String) {
        log::warn!("layerboot: {msg}");
        self.warnings.push(msg);
    }

    /// Flushes the store's filesystem: what is written before is on the disk after.
    pub fn sync(&self) -> Result<()> {
        crate::mounts::timed_flush(|| nix::unistd::syncfs(self.root_fd.as_raw_fd()))
            .map_err(|e| Error::io("cannot flush", &self.root, e))
    }

    /// First thing each boot: finishes or discards what a cut boot left.
    pub fn recover(&mut self) -> Result<()> {
        let steps = plan::recover(&self.state, self.keep);
        if self.state.contains_key(&Slot::New) {
            let what = if plan::displaced(&self.state) {
                "finished the rotation of writable layers that a power cut interrupted"
            } else {
                "discarded an unfinished writable layer left by an interrupted boot"
            };
            self.warn(format!("{what} ({})", self.path(Slot::New).display()));
        }
        for step in steps {
            self.run(step)?;
        }
        Ok(())
    }

    /// Makes a fresh `NAME.new` from `image`, fills it with `fill`, and swaps it in.
    pub fn make_fresh(&mut self, image: &Image, fill: &mut dyn FnMut(&Path) -> Result<Filled>) -> Result<()> {
        let new = self.path(Slot::New);
        let generation = plan::next_generation(&self.state);
        let kind = Kind::of(Upper::Disk, image.driver);
        // In the model's order: a cut between any two steps leaves what the next boot's
        // `open` discards.
        for step in plan::make_steps(kind == Kind::Snapshot) {
            if step != MakeStep::Mark {
                kind.make(image, &new, step)?;
                continue;
            }
            self.state.insert(Slot::New, Mark::Making);
            set_xattr(&new, STATE_XATTR, Mark::Making.encode().as_bytes())?;
            set_xattr(&new, IMAGE_XATTR, image.id.as_bytes())?;
        }
        log::debug!("fresh layer made: {}", new.display());
        // With no top layer, this flush would only commit the two marks: on btrfs that is
        // the snapshot's first change, a commit costing 9 ms of CPU under emulation.
        if fill(&new)? == Filled::Contents {
            self.sync()?;
        }
        set_xattr(&new, STATE_XATTR, Mark::Complete(generation).encode().as_bytes())?;
        self.state.insert(Slot::New, Mark::Complete(generation));
        let mut steps = plan::install(&self.state, self.keep).into_iter();
        if let Some(swap) = steps.next() {
            self.run(swap)?;
            self.sync()?;
            log::debug!(
                "writable layer swapped in: {} (generation {generation})",
                self.current().display()
            );
        }
        // Settling the old generations is clean-up: the new layer is in and durable.
        for step in steps {
            if let Err(e) = self.run(step) {
                self.warn(format!("{e} (the next boot tries again)"));
                break;
            }
        }
        Ok(())
    }

    /// [`make_fresh`](Self::make_fresh); when the disk is full, discards the new layer,
    /// deletes this name's kept generations (never `NAME`), waits for btrfs to free their
    /// space, and tries again; still full, the same with other names' kept generations
    /// ([`Layers::others_kept`]; never their own layer, which with `layerboot.mode=keep` is
    /// a deployment's state). Still full: the error, with ENOSPC, for the caller to fall
    /// back on a layer in memory.
    pub fn make_fresh_or_prune(&mut self, image: &Image, fill: &mut dyn FnMut(&Path) -> Result<Filled>) -> Result<()> {
        let Err(mut e) = self.make_fresh(image, fill) else {
            return Ok(());
        };
        self.discard_new();
        for own in [true, false] {
            if e.errno() != Some(Errno::ENOSPC) {
                return Err(e);
            }
            let pruned = if own {
                self.prune_own(&e)
            } else {
                self.prune_others(&e)?
            };
            if !pruned {
                continue;
            }
            match self.make_fresh(image, fill) {
                Ok(()) => return Ok(()),
                Err(next) => {
                    self.discard_new();
                    e = next;
                }
            }
        }
        Err(e)
    }

    /// Deletes this name's kept generations for room: whether there were any.
    fn prune_own(&mut self, e: &Error) -> bool {
        let old: Vec<Slot> = self
            .state
            .keys()
            .copied()
            .filter(|s| matches!(s, Slot::Prev(_) | Slot::Trash(_)))
            .collect();
        if old.is_empty() {
            return false;
        }
        self.warn(format!(
            "the store's partition is full ({e}): deleted the new layer and {} kept generation(s) of {} to make room, and tried again",
            old.len(),
            self.name
        ));
        let mut freed = Vec::new();
        for slot in old {
            let path = self.path(slot);
            freed.extend(btrfs::subvolume_id(&path).ok());
            if let Err(e) = self.remove(slot) {
                self.warn(e.to_string());
            }
        }
        self.settle_freed(&freed);
        true
    }

    /// Deletes other names' kept generations for room: whether there were any.
    fn prune_others(&mut self, e: &Error) -> Result<bool> {
        let old = self.others_kept()?;
        if old.is_empty() {
            return Ok(false);
        }
        let shown: Vec<String> = old.iter().map(|p| p.display().to_string()).collect();
        self.warn(format!(
            "the store's partition is full ({e}): deleted the kept generations of other writable layers to make room, \
             and tried again: {} (their own layers, each a deployment's state, are never deleted)",
            shown.join(", ")
        ));
        let mut freed = Vec::new();
        for path in old {
            freed.extend(btrfs::subvolume_id(&path).ok());
            if let Err(e) = remove_layer(&path) {
                self.warn(
                    e.context("could not delete another writable layer's kept generation")
                        .to_string(),
                );
            }
        }
        self.settle_freed(&freed);
        Ok(true)
    }

    /// After deletes for room: flushes, and waits for btrfs's cleaner to free `freed`.
    fn settle_freed(&mut self, freed: &[u64]) {
        if let Err(e) = self.sync() {
            self.warn(format!("{e}; trying anyway"));
        }
        if !freed.is_empty() {
            if let Err(e) = btrfs::wait_until_cleaned(&self.root, freed, Duration::from_secs(30)) {
                self.warn(format!("{e}; trying anyway"));
            }
        }
    }

    /// Other layer names' kept generations at the partition's top level (`X.prev`,
    /// `X.prev.K`, `X.trash.K`, X not this name), each only if layerboot marked it, if a
    /// complete layer `X` is on the disk (it is one of X's generations, not a layer named
    /// so), and if it has no generations of its own. Never a layer `X` itself.
    pub fn others_kept(&self) -> Result<Vec<PathBuf>> {
        let mut files = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(|e| Error::io("cannot list", &self.root, e))? {
            let entry = entry.map_err(|e| Error::io("cannot list", &self.root, e))?;
            files.extend(entry.file_name().into_string().ok());
        }
        let mut kept = Vec::new();
        for file in &files {
            let Some((base, slot)) = plan::kept_generation(file) else {
                continue;
            };
            let named = |name: &str| {
                files
                    .iter()
                    .any(|f| Slot::parse(name, f).is_some_and(|s| s != Slot::Current))
            };
            let layer_on_disk = files.iter().any(|f| f == base)
                && read_mark(&self.root.join(base), Slot::Current).is_some_and(|m| m.generation().is_some());
            if base == self.name || !layer_on_disk || named(file) {
                continue;
            }
            let path = self.root.join(file);
            if read_mark(&path, slot).is_some() {
                kept.push(path);
            }
        }
        kept.sort();
        Ok(kept)
    }

    /// Removes a failed `NAME.new` now, to give its space back (the next boot would anyway).
    fn discard_new(&mut self) {
        if self.state.contains_key(&Slot::New) && !plan::displaced(&self.state) {
            if let Err(e) = self.remove(Slot::New) {
                self.warn(e.to_string());
            }
        }
    }

    /// Whether `NAME` was being refreshed (`layerboot.mode=keep`) when a boot was cut.
    pub fn current_interrupted(&self) -> bool {
        matches!(self.state.get(&Slot::Current), Some(Mark::Refreshing(_)))
    }

    /// `layerboot.mode=keep`: copies the top layer into `NAME` itself. Marked
    /// "refreshing" first: a cut copy is done again by the next boot that keeps the layer,
    /// so `NAME` never boots with a half-copied top layer.
    pub fn refresh_current(&mut self, fill: &mut dyn FnMut(&Path) -> Result<Filled>) -> Result<()> {
        let current = self.current();
        let Some(generation) = self.state.get(&Slot::Current).and_then(|m| m.generation()) else {
            return Err(Error::new(format!(
                "{} is not a complete writable layer",
                current.display()
            )));
        };
        if self.current_interrupted() {
            self.warn(format!(
                "copying the top layer into {} again: a power cut interrupted the last copy",
                current.display()
            ));
        }
        set_xattr(&current, STATE_XATTR, Mark::Refreshing(generation).encode().as_bytes())?;
        self.state.insert(Slot::Current, Mark::Refreshing(generation));
        // On the disk before the first file changes: a cut copy is then always seen.
        self.sync()?;
        fill(&current)?;
        self.sync()?;
        set_xattr(&current, STATE_XATTR, Mark::Complete(generation).encode().as_bytes())?;
        self.state.insert(Slot::Current, Mark::Complete(generation));
        Ok(())
    }

    /// Runs one step of a plan on the disk, each path checked to be marked first.
    fn run(&mut self, step: Step) -> Result<()> {
        for slot in match step {
            Step::Remove(a) => vec![a],
            Step::Rename(a, _) => vec![a],
            Step::Exchange(a, b) => vec![a, b],
        } {
            if read_mark(&self.path(slot), slot).is_none() {
                return Err(Error::new(format!(
                    "{} lost its layerboot mark: not touching it",
                    self.path(slot).display()
                )));
            }
        }
        match step {
            // `remove` keeps the state true to the disk, whatever happens.
            Step::Remove(slot) => {
                if let Err(e) = self.remove(slot) {
                    self.warn(e.to_string());
                }
                Ok(())
            }
            Step::Rename(a, b) => {
                // A kept generation that could not be deleted may still hold a `.prev`
                // slot: then the next free one. Generations, not names, give the order.
                let b = match b {
                    Slot::Prev(_) if self.state.contains_key(&b) => Slot::Prev(
                        self.state
                            .keys()
                            .filter_map(|s| if let Slot::Prev(k) = s { Some(*k) } else { None })
                            .max()
                            .unwrap_or(0)
                            + 1,
                    ),
                    b => b,
                };
                let (pa, pb) = (self.path(a), self.path(b));
                rename_noreplace(&pa, &pb)
                    .map_err(|e| Error::os(format!("cannot rename {} to {}", pa.display(), pb.display()), e))?;
                plan::apply(&mut self.state, Step::Rename(a, b));
                Ok(())
            }
            Step::Exchange(a, b) => {
                let (pa, pb) = (self.path(a), self.path(b));
                exchange(&pa, &pb)
                    .map_err(|e| Error::os(format!("cannot swap in the new writable layer {}", pb.display()), e))?;
                plan::apply(&mut self.state, step);
                Ok(())
            }
        }
    }

    /// Deletes the layer in `slot`. If that fails (an immutable file, an I/O error), the
    /// boot goes on: the layer is renamed to `NAME.trash.K`, which each boot tries again.
    fn remove(&mut self, slot: Slot) -> Result<()> {
        let path = self.path(slot);
        let Err(e) = remove_layer(&path) else {
            self.state.remove(&slot);
            return Ok(());
        };
        if matches!(slot, Slot::Trash(_)) {
            return Err(e.context("an old writable layer could not be deleted again; it stays until you delete it"));
        }
        let k = self
            .state
            .keys()
            .filter_map(|s| if let Slot::Trash(k) = s { Some(*k) } else { None })
            .max()
            .unwrap_or(0)
            + 1;
        let trash = self.path(Slot::Trash(k));
        let moved = rename_noreplace(&path, &trash);
        if moved.is_ok() {
            let mark = self.state.remove(&slot).unwrap_or(Mark::Making);
            self.state.insert(Slot::Trash(k), mark);
        }
        Err(e.context(format!(
            "could not delete old writable layer {}{}",
            path.display(),
            if moved.is_ok() {
                format!(" (moved to {}; each boot tries again)", trash.display())
            } else {
                String::new()
            }
        )))
    }
}
