//! Deployments: one image pinned by its full ID, with its own kernel, an initramfs whose
//! default is that ID, and one boot entry, in its own directory on the ESP:
//!
//! ```text
//! ESP/layerboot/<name>/vmlinuz          the image's kernel
//! ESP/layerboot/<name>/initramfs.img    built from the image's own modules
//! ESP/layerboot/<name>/deployment.json  what was deployed and how, to redo it (upgrade)
//! ESP/loader/entries/layerboot-<serial>-<name>[+LEFT[-DONE]].conf
//! ```
//!
//! A deployment's name is its image ID's first 12 hex digits (as `docker images` shows
//! it), or more of them when another image with the same 12 holds that directory.
//!
//! A deployment's state (good, trying, bad) is the boot loader's: the counter in its
//! entry's file name (`systemd_boot.rs`). Files are written kernel, initramfs, record,
//! entry last, each to a temporary name, fsynced and renamed, so a cut at any instant
//! leaves the previous default bootable; an entry is the only thing the loader reads.
//! A record without an entry is a deploy that was cut (unfinished): the next deploy of
//! its image finishes it, after checking its files against the sizes and digests the
//! record holds, and `gc` removes it before any other.

pub mod commands;
pub mod grub;
pub mod systemd_boot;

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use layerboot_init::error::{Error, Result};
use serde::{Deserialize, Serialize};

use systemd_boot::{Assessment, EntryName};

/// The directory on the ESP that holds one directory per deployment.
pub const DEPLOYMENTS_DIR: &str = "layerboot";
pub const RECORD: &str = "deployment.json";
pub const KERNEL: &str = "vmlinuz";
pub const INITRAMFS: &str = "initramfs.img";
/// The most tries a deployment may have (GRUB's snippet holds one line per try).
pub const MAX_TRIES: u32 = 16;

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
    /// The initial number of tries of a new entry (0: no counting; at most [`MAX_TRIES`]).
    pub tries: u32,
    /// `systemd-boot` or `grub`: whose entry and counter this deployment has.
    #[serde(default = "default_loader")]
    pub loader: String,
    /// The kernel and initramfs as written before the record, for the deploy that
    /// finishes a cut one to check them. Records written before it have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<Files>,
}

/// The sizes and digests of a deployment's files.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Files {
    pub vmlinuz: FileSum,
    pub initramfs: FileSum,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileSum {
    pub size: u64,
    /// Lowercase hex.
    pub sha256: String,
}

impl FileSum {
    pub fn of(data: &[u8]) -> FileSum {
        FileSum {
            size: data.len() as u64,
            sha256: layerboot_init::digest::sha256_of(data),
        }
    }
}

impl Files {
    /// Whether `dir` holds the files as recorded; `Err`: what differs.
    pub fn check(&self, dir: &Path) -> std::result::Result<(), String> {
        for (name, sum) in [(KERNEL, &self.vmlinuz), (INITRAMFS, &self.initramfs)] {
            let path = dir.join(name);
            let data = fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            if data.len() as u64 != sum.size {
                return Err(format!(
                    "{} has {} bytes, the record says {}",
                    path.display(),
                    data.len(),
                    sum.size
                ));
            }
            if FileSum::of(&data).sha256 != sum.sha256 {
                return Err(format!("{}'s sha256 is not the recorded one", path.display()));
            }
        }
        Ok(())
    }
}

fn default_loader() -> String {
    "systemd-boot".into()
}

impl Record {
    pub fn short_id(&self) -> &str {
        short_id(&self.image_id)
    }

    /// What a record read back from the ESP must be before its ID names files and its
    /// options go into a boot loader's script: a full image ID that its directory's name
    /// starts (12 hex digits or more), kernel arguments of plain printable characters (no
    /// newline, brace, quote, `;`, `$` or backslash, which GRUB's `linux` passes on
    /// escaped, and which could end a line or a menu entry), and tries within bounds.
    pub fn check(&self, dir_name: &str) -> std::result::Result<(), String> {
        let Some(hex) = layerboot_init::digest::sha256_hex(&self.image_id) else {
            return Err(format!(
                "image_id '{}' is not sha256:<64 hex>",
                self.image_id.escape_debug()
            ));
        };
        if dir_name.len() < 12 || !hex.starts_with(dir_name) {
            return Err(format!(
                "it is for {}, not {}",
                self.short_id(),
                dir_name.escape_debug()
            ));
        }
        let unsafe_char = |c: char| !(c == ' ' || c.is_ascii_graphic()) || "{}'\";$`\\".contains(c);
        if let Some(c) = self.options.chars().find(|&c| unsafe_char(c)) {
            return Err(format!("its kernel arguments hold {:?}, which no entry may carry", c));
        }
        check_tries(self.tries).map_err(|why| format!("its tries: {why}"))?;
        Ok(())
    }
}

/// Tries are counted from 1 to [`MAX_TRIES`], or not at all (0).
pub fn check_tries(tries: u32) -> std::result::Result<(), String> {
    if tries > MAX_TRIES {
        return Err(format!(
            "{tries} is more than {MAX_TRIES}, the most tries a deployment may have (0: no counting)"
        ));
    }
    Ok(())
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
    /// `ESP/layerboot/<name>`.
    pub dir: PathBuf,
    /// systemd-boot: the entry file, and what its name says.
    pub entry: Option<(PathBuf, EntryName)>,
    /// Older entries of the same deployment a cut left behind (removed by its next change).
    pub stale_entries: Vec<PathBuf>,
    /// What the loader's counter says; `None`: the loader has no entry for it (a deploy
    /// was cut before it wrote one: unfinished).
    pub assessment: Option<Assessment>,
    /// The entry's version: the serial it sorts by (a rollback raises it).
    pub version: u64,
}

impl Deployment {
    /// The name of its directory, entry and GRUB variable: its ID's first 12 hex digits, or more.
    pub fn name(&self) -> String {
        self.dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    pub fn is_grub(&self) -> bool {
        self.record.loader == "grub"
    }

    pub fn is_bad(&self) -> bool {
        matches!(self.assessment, Some(Assessment::Bad { .. }))
    }

    pub fn is_good(&self) -> bool {
        matches!(self.assessment, Some(Assessment::Good))
    }

    /// A record without an entry: a deploy cut before it wrote the entry.
    pub fn is_unfinished(&self) -> bool {
        self.assessment.is_none()
    }

    pub fn state(&self) -> String {
        match self.assessment {
            None => "unfinished (a deploy was cut): the next deploy finishes it, or gc removes it".into(),
            Some(Assessment::Good) => "good".into(),
            Some(Assessment::Trying { left, .. }) => format!("trying, {left} tries left"),
            Some(Assessment::Bad { .. }) => "bad".into(),
        }
    }
}

/// An entry file layerboot could have written: `layerboot-<serial>-<name>` (the serial
/// of 6 digits or more, the name of 12 to 64 hex digits). Its serial and name.
pub fn entry_name_parts(id: &str) -> Option<(u64, &str)> {
    let (serial, name) = id.strip_prefix("layerboot-")?.split_once('-')?;
    let digits = serial.len() >= 6 && serial.bytes().all(|b| b.is_ascii_digit());
    let hex = (12..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
    if !(digits && hex) {
        return None;
    }
    Some((serial.parse().ok()?, name))
}

/// One `layerboot-*.conf` of layerboot's shape in the entries directory.
struct FoundEntry {
    path: PathBuf,
    name: EntryName,
    /// The deployment name its file name ends with.
    deployment: String,
    version: u64,
    text: String,
}

/// The entries directory's files named as layerboot names entries, readable ones only
/// (a file that is not, or a directory of that name, is skipped with a note: it must
/// not stop every command).
fn layerboot_entries(esp: &Path) -> Result<Vec<FoundEntry>> {
    let dir = systemd_boot::entries_dir(esp);
    let mut out = Vec::new();
    if !dir.is_dir() {
        return Ok(out);
    }
    for e in fs::read_dir(&dir).map_err(|e| Error::io("cannot list", &dir, e))? {
        let e = e.map_err(|e| Error::io("cannot list", &dir, e))?;
        let file_name = e.file_name();
        if !file_name.as_bytes().starts_with(b"layerboot-") {
            continue;
        }
        let Some(name) = file_name.to_str() else {
            eprintln!(
                "note: {}: a file name that is not UTF-8 is not layerboot's: ignored",
                e.path().display()
            );
            continue;
        };
        let Some(parsed) = EntryName::parse(name) else {
            continue;
        };
        let Some((_, deployment)) = entry_name_parts(&parsed.id) else {
            continue; // layerboot-debug-<id>.conf and the like: someone else's
        };
        let deployment = deployment.to_string();
        let text = match fs::read_to_string(e.path()) {
            Ok(text) => text,
            Err(err) => {
                eprintln!(
                    "note: {} is not a readable boot entry ({err}): ignored (fix: remove it, or deploy that image again)",
                    e.path().display()
                );
                continue;
            }
        };
        out.push(FoundEntry {
            path: e.path(),
            version: systemd_boot::read_version(&text).unwrap_or(0),
            name: parsed,
            deployment,
            text,
        });
    }
    Ok(out)
}

/// Every deployment layerboot recorded on the ESP, in the loader's order: the default
/// first (not bad, highest version), bad and unfinished ones last.
pub fn list(esp: &Path) -> Result<Vec<Deployment>> {
    let root = esp.join(DEPLOYMENTS_DIR);
    let entries = layerboot_entries(esp)?;
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
                Err(err) => {
                    eprintln!(
                        "note: cannot read {} ({err}): ignored (fix: check the ESP with fsck.fat)",
                        record_path.display()
                    );
                    continue;
                }
            };
            let Some(name) = e.file_name().to_str().map(str::to_string) else {
                eprintln!("note: {}: a name that is not UTF-8: ignored", e.path().display());
                continue;
            };
            if let Err(why) = record.check(&name) {
                eprintln!("note: {}: {why}: ignored", record_path.display());
                continue;
            }
            if record.loader == "grub" {
                let assessment = grub::assessment(&grubenv, &name, record.tries);
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
            let mut mine: Vec<&FoundEntry> = Vec::new();
            for f in entries.iter().filter(|f| f.deployment == name) {
                if systemd_boot::written_for(&f.text, &record.image_id) {
                    mine.push(f);
                } else {
                    eprintln!(
                        "note: {} is named as layerboot names its entries, but layerboot did not write it for {}: left alone",
                        f.path.display(),
                        record.image_id
                    );
                }
            }
            mine.sort_by_key(|f| std::cmp::Reverse(f.version));
            let stale_entries = mine.iter().skip(1).map(|f| f.path.clone()).collect();
            let entry = mine.first();
            let version = entry.map_or(record.serial, |f| f.version);
            out.push(Deployment {
                dir: e.path(),
                stale_entries,
                assessment: entry.map(|f| f.name.assessment),
                entry: entry.map(|f| (f.path.clone(), f.name.clone())),
                version,
                record,
            });
        }
    }
    out.sort_by_key(|d| (d.assessment.is_none() || d.is_bad(), std::cmp::Reverse(d.version)));
    Ok(out)
}

/// The next serial: above every record's and every entry's. Never past the largest
/// number: a serial that wrapped would sort last for good.
pub fn next_serial(deployments: &[Deployment]) -> Result<u64> {
    let top = deployments.iter().max_by_key(|d| d.version.max(d.record.serial));
    let Some(top) = top else { return Ok(1) };
    top.version.max(top.record.serial).checked_add(1).ok_or_else(|| {
        format!(
            "deployment {} ({}) has serial {}, the largest there is: no newer serial exists \
             (fix: remove it with its entry, or lower the serial in its deployment.json and its entry's version line)",
            top.name(),
            top.record.reference,
            top.version.max(top.record.serial)
        )
        .into()
    })
}

/// The deployment the loader boots by default: the first in [`list`]'s order with an entry.
pub fn default_of(deployments: &[Deployment]) -> Option<&Deployment> {
    deployments.iter().find(|d| d.assessment.is_some() && !d.is_bad())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    const ID: &str = "sha256:abcdefabcdef0123456789012345678901234567890123456789012345678901";

    fn record(image_id: &str, serial: u64, tries: u32) -> Record {
        Record {
            reference: "demo".into(),
            image_id: image_id.into(),
            kernel: "6.1.0".into(),
            serial,
            created: 0,
            store: "/s".into(),
            namespace: None,
            options: format!("root=LABEL=s rw docker_image={image_id}"),
            initramfs_args: vec![],
            tries,
            loader: "systemd-boot".into(),
            files: None,
        }
    }

    /// An ESP with one deployment of `ID` and its entry, as `deploy` writes them.
    fn esp_with_one() -> (tempfile::TempDir, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let esp = t.path().to_path_buf();
        let r = record(ID, 1, 3);
        let dir = esp.join(DEPLOYMENTS_DIR).join(r.short_id());
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(RECORD), serde_json::to_vec(&r).unwrap()).unwrap();
        let entries = systemd_boot::entries_dir(&esp);
        fs::create_dir_all(&entries).unwrap();
        let text = systemd_boot::render(ID, "demo", 1, "/k", "/i", &r.options);
        fs::write(entries.join(format!("layerboot-000001-{}+3.conf", r.short_id())), text).unwrap();
        (t, esp)
    }

    #[test]
    fn an_unreadable_entry_or_a_directory_named_like_one_is_skipped() {
        let (_t, esp) = esp_with_one();
        let entries = systemd_boot::entries_dir(&esp);
        fs::create_dir(entries.join("layerboot-000005-abcdefabcdef.conf")).unwrap();
        fs::write(
            entries.join("layerboot-000007-abcdefabcdef+2.conf"),
            b"title \xff\xfe\n",
        )
        .unwrap();
        fs::write(
            entries.join(std::ffi::OsStr::from_bytes(b"layerboot-\xff-abcdefabcdef.conf")),
            "version 000009\n",
        )
        .unwrap();
        let all = list(&esp).unwrap();
        assert_eq!(all.len(), 1);
        let (path, _) = all[0].entry.as_ref().expect("its own entry still counts");
        assert!(
            path.ends_with("layerboot-000001-abcdefabcdef+3.conf"),
            "{}",
            path.display()
        );
        assert!(all[0].stale_entries.is_empty(), "{:?}", all[0].stale_entries);
    }

    #[test]
    fn an_entry_is_the_deployments_only_by_its_exact_name_and_marker() {
        let (_t, esp) = esp_with_one();
        let entries = systemd_boot::entries_dir(&esp);
        let r = record(ID, 1, 3);
        // Hand-written, from a copy of the deployment's entry: never layerboot's to move or remove.
        let copy = systemd_boot::render(ID, "debug", 8, "/k", "/i", &format!("{} init=/bin/sh", r.options));
        fs::write(entries.join("layerboot-debug-abcdefabcdef.conf"), &copy).unwrap();
        fs::write(entries.join("layerboot-000008-abcdefabcdef0.conf"), &copy).unwrap();
        // Layerboot's name, but not its text.
        fs::write(
            entries.join("layerboot-000009-abcdefabcdef.conf"),
            "title mine\nversion 000009\n",
        )
        .unwrap();
        let all = list(&esp).unwrap();
        let (path, _) = all[0].entry.as_ref().unwrap();
        assert!(
            path.ends_with("layerboot-000001-abcdefabcdef+3.conf"),
            "{}",
            path.display()
        );
        assert!(all[0].stale_entries.is_empty(), "{:?}", all[0].stale_entries);
        assert_eq!(all[0].version, 1);
    }

    #[test]
    fn a_record_whose_tries_are_out_of_bounds_is_refused() {
        let r = record(ID, 1, 200_000);
        let why = r.check("abcdefabcdef").unwrap_err();
        assert!(why.contains("tries") && why.contains("16"), "{why}");
        for tries in [0, 1, 16] {
            assert_eq!(record(ID, 1, tries).check("abcdefabcdef"), Ok(()), "{tries}");
        }
        assert!(record(ID, 1, 17).check("abcdefabcdef").is_err());
    }

    #[test]
    fn the_serial_never_wraps() {
        let (_t, esp) = esp_with_one();
        let mut all = list(&esp).unwrap();
        assert_eq!(next_serial(&all).unwrap(), 2);
        all[0].version = u64::MAX;
        let why = next_serial(&all).unwrap_err().to_string();
        assert!(
            why.contains("abcdefabcdef") && why.contains("largest") && why.contains("fix:"),
            "{why}"
        );
    }

    #[test]
    fn a_deployment_may_be_named_by_more_than_12_digits_of_its_id() {
        let r = record(ID, 1, 3);
        assert_eq!(r.check("abcdefabcdef0123"), Ok(()));
        assert!(r.check("abcdefabcde").is_err(), "fewer than 12");
        assert!(r.check("abcdefabcdef0124").is_err(), "another ID's");
        assert_eq!(
            entry_name_parts("layerboot-000012-abcdefabcdef0123"),
            Some((12, "abcdefabcdef0123"))
        );
        for not in [
            "layerboot-debug-abcdefabcdef",
            "layerboot-12-abcdefabcdef",
            "layerboot-000012-abcdefabcde",
            "layerboot-000012-ABCDEFABCDEF",
            "layerboot-000012-abcdefabcdef-x",
        ] {
            assert_eq!(entry_name_parts(not), None, "{not}");
        }
    }
}
