//! Deployments: one image pinned by its full ID, with its own kernel, an initramfs whose
//! default is that ID, and one boot entry, in its own directory on the ESP:
//!
//! ```text
//! ESP/layerboot/<id12>/vmlinuz          the image's kernel
//! ESP/layerboot/<id12>/initramfs.img    built from the image's own modules
//! ESP/layerboot/<id12>/deployment.json  what was deployed and how, to redo it (upgrade)
//! ESP/loader/entries/layerboot-<serial>-<id12>[+LEFT[-DONE]].conf
//! ```
//!
//! A deployment's state (good, trying, bad) is the boot loader's: the counter in its
//! entry's file name (`systemd_boot.rs`). Files are written kernel, initramfs, record,
//! entry last, each to a temporary name, fsynced and renamed, so a cut at any instant
//! leaves the previous default bootable; an entry is the only thing the loader reads.

pub mod commands;
pub mod grub;
pub mod systemd_boot;

use std::fs;
use std::path::{Path, PathBuf};

use layerboot_init::error::{Error, Result};
use serde::{Deserialize, Serialize};

use systemd_boot::{Assessment, EntryName};

/// The directory on the ESP that holds one directory per deployment.
pub const DEPLOYMENTS_DIR: &str = "layerboot";
pub const RECORD: &str = "deployment.json";
pub const KERNEL: &str = "vmlinuz";
pub const INITRAMFS: &str = "initramfs.img";

/// What `deploy` wrote, as `deployment.json` records it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    /// The reference it was deployed from (`upgrade` resolves it again).
    pub reference: String,
    /// The full image ID the entry boots (`docker_image=`), never a tag.
    pub image_id: String,
    /// The image's kernel version: kernel, initramfs modules and /lib/modules match.
    pub kernel: String,
    /// Always increasing across deployments on this ESP: the entry's `version`.
    pub serial: u64,
    /// Seconds since the epoch, when it was deployed.
    pub created: u64,
    /// The engine's data root, as the deploying machine saw it.
    pub store: PathBuf,
    #[serde(default)]
    pub namespace: Option<String>,
    /// The entry's kernel command line, `docker_image=` included.
    pub options: String,
    /// `layerboot initramfs` options besides store, image and output (`--module`, …).
    pub initramfs_args: Vec<String>,
    /// The initial number of tries of a new entry (0: no counting).
    pub tries: u32,
    /// `systemd-boot` or `grub`: whose entry and counter this deployment has.
    #[serde(default = "default_loader")]
    pub loader: String,
}

fn default_loader() -> String {
    "systemd-boot".into()
}

impl Record {
    pub fn short_id(&self) -> &str {
        short_id(&self.image_id)
    }

    /// What a record read back from the ESP must be before its ID names files and its
    /// options go into a boot loader's script: a full image ID that is its directory's
    /// name, and kernel arguments of plain printable characters (no newline, brace,
    /// quote, `;`, `$` or backslash that could end GRUB's `linux` line or a menu entry).
    pub fn check(&self, dir_name: &str) -> std::result::Result<(), String> {
        if layerboot_init::digest::sha256_hex(&self.image_id).is_none() {
            return Err(format!(
                "image_id '{}' is not sha256:<64 hex>",
                self.image_id.escape_debug()
            ));
        }
        if self.short_id() != dir_name {
            return Err(format!("it is for {}, not {dir_name}", self.short_id()));
        }
        let unsafe_char = |c: char| !(c == ' ' || c.is_ascii_graphic()) || "{}'\";$`\\".contains(c);
        if let Some(c) = self.options.chars().find(|&c| unsafe_char(c)) {
            return Err(format!("its kernel arguments hold {:?}, which no entry may carry", c));
        }
        Ok(())
    }
}

/// The 12 hex digits that name a deployment (as `docker images` shows an ID).
pub fn short_id(image_id: &str) -> &str {
    let hex = image_id.strip_prefix("sha256:").unwrap_or(image_id);
    hex.get(..12).unwrap_or(hex)
}

/// One deployment found on the ESP: its record and its entry, if it still has one.
#[derive(Clone, Debug)]
pub struct Deployment {
    pub record: Record,
    pub dir: PathBuf,
    /// systemd-boot: the entry file, and what its name says.
    pub entry: Option<(PathBuf, EntryName)>,
    /// Older entries of the same deployment a cut left behind (removed by its next change).
    pub stale_entries: Vec<PathBuf>,
    /// What the loader's counter says; `None`: the loader has no entry for it.
    pub assessment: Option<Assessment>,
    /// The entry's version: the serial it sorts by (a rollback raises it).
    pub version: u64,
}

impl Deployment {
    pub fn is_grub(&self) -> bool {
        self.record.loader == "grub"
    }

    pub fn is_bad(&self) -> bool {
        matches!(self.assessment, Some(Assessment::Bad { .. }))
    }

    pub fn is_good(&self) -> bool {
        matches!(self.assessment, Some(Assessment::Good))
    }

    pub fn state(&self) -> String {
        match self.assessment {
            None => "no entry".into(),
            Some(Assessment::Good) => "good".into(),
            Some(Assessment::Trying { left, .. }) => format!("trying, {left} tries left"),
            Some(Assessment::Bad { .. }) => "bad".into(),
        }
    }
}

/// Every deployment layerboot recorded on the ESP, in the loader's order: the default
/// first (not bad, highest version), bad ones last.
pub fn list(esp: &Path) -> Result<Vec<Deployment>> {
    let root = esp.join(DEPLOYMENTS_DIR);
    let mut entries: Vec<(PathBuf, EntryName, u64)> = Vec::new();
    let dir = systemd_boot::entries_dir(esp);
    if dir.is_dir() {
        for e in fs::read_dir(&dir).map_err(|e| Error::io("cannot list", &dir, e))? {
            let e = e.map_err(|e| Error::io("cannot list", &dir, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(parsed) = EntryName::parse(&name).filter(|n| n.id.starts_with("layerboot-")) else {
                continue;
            };
            let text = fs::read_to_string(e.path()).map_err(|err| Error::io("cannot read", e.path(), err))?;
            let version = systemd_boot::read_version(&text).unwrap_or(0);
            entries.push((e.path(), parsed, version));
        }
    }
    let grubenv = grub::read_env(esp)?;
    let mut out = Vec::new();
    if root.is_dir() {
        for e in fs::read_dir(&root).map_err(|e| Error::io("cannot list", &root, e))? {
            let e = e.map_err(|e| Error::io("cannot list", &root, e))?;
            let record_path = e.path().join(RECORD);
            if !record_path.is_file() {
                continue; // not layerboot's, or a deploy cut before its record: never ours to touch
            }
            // A record a power cut left unreadable must not stop every command: it is
            // named and left alone (its entry, if any, still boots).
            let record: Record = match fs::read(&record_path).map(|b| serde_json::from_slice(&b)) {
                Ok(Ok(r)) => r,
                Ok(Err(err)) => {
                    eprintln!(
                        "note: {} is not a readable deployment record ({err}): ignored \
                         (fix: deploy that image again, or remove the directory)",
                        record_path.display()
                    );
                    continue;
                }
                Err(err) => return Err(Error::io("cannot read", &record_path, err)),
            };
            if let Err(why) = record.check(&e.file_name().to_string_lossy()) {
                eprintln!("note: {}: {why}: ignored", record_path.display());
                continue;
            }
            if record.loader == "grub" {
                let assessment = grub::assessment(&grubenv, &record);
                out.push(Deployment {
                    dir: e.path(),
                    entry: None,
                    stale_entries: Vec::new(),
                    assessment,
                    version: record.serial,
                    record,
                });
                continue;
            }
            let mut mine: Vec<&(PathBuf, EntryName, u64)> = entries
                .iter()
                .filter(|(_, n, _)| n.id.ends_with(&format!("-{}", record.short_id())))
                .collect();
            mine.sort_by_key(|(_, _, v)| std::cmp::Reverse(*v));
            let stale_entries = mine.iter().skip(1).map(|(p, _, _)| p.clone()).collect();
            let entry = mine.first().map(|e| (*e).clone());
            let version = entry.as_ref().map_or(record.serial, |(_, _, v)| *v);
            out.push(Deployment {
                dir: e.path(),
                stale_entries,
                assessment: entry.as_ref().map(|(_, n, _)| n.assessment),
                entry: entry.map(|(p, n, _)| (p, n)),
                version,
                record,
            });
        }
    }
    out.sort_by_key(|d| (d.assessment.is_none() || d.is_bad(), std::cmp::Reverse(d.version)));
    Ok(out)
}

/// The next serial: above every record's and every entry's.
pub fn next_serial(deployments: &[Deployment]) -> u64 {
    deployments
        .iter()
        .map(|d| d.version.max(d.record.serial))
        .max()
        .unwrap_or(0)
        + 1
}

/// The deployment the loader boots by default: the first in [`list`]'s order with an entry.
pub fn default_of(deployments: &[Deployment]) -> Option<&Deployment> {
    deployments.iter().find(|d| d.assessment.is_some() && !d.is_bad())
}
