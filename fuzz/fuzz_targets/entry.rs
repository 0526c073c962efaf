//! A boot entry's contents as the builder reads them (`deploy::systemd_boot`): whether
//! layerboot wrote it for a deployment (`written_for`: its marker line, or the sort key
//! and `docker_image=` of entries from before the marker), its `version`, and the
//! rewrite a rollback does (`with_version`). Anyone with the disk can write an entry
//! named as layerboot names them.
//! - `with_version` changes the `version` lines alone (a line's last `\r` aside), reads
//!   back the new serial exactly when there was a version line, is idempotent (`\r` aside
//!   again), and never
//!   makes an entry layerboot's or takes that away, for any image ID;
//! - `render` with any title (an image's reference) and any kernel arguments a record
//!   may hold gives seven lines, one `title`, one `options` with those arguments, its
//!   version, and is written for its image ID and no other;
//! - `deploy::list` on an ESP with one deployment whose entry holds the input: the entry
//!   is the deployment's exactly when `written_for` says so (with the version it says),
//!   else the deployment is unfinished; a file that is not UTF-8 is skipped, nothing fails.
//!
//! Input: one control byte, then the entry's text. Control bit 0: run `list` on a
//! temporary ESP too; bit 1: the serial is the largest there is.
#![no_main]

use std::fs;
use std::path::Path;

use layerboot::deploy::systemd_boot::{read_version, render, with_version, written_for};
use layerboot::deploy::{list, next_serial, Record, DEPLOYMENTS_DIR, RECORD};
use layerboot_init::bootcount::Assessment;
use libfuzzer_sys::fuzz_target;

const ID: &str = "sha256:abcdefabcdef0123456789012345678901234567890123456789012345678901";
const OTHER: &str = "sha256:abcdefabcdef0123456789012345678901234567890123456789012345678902";
const NAME: &str = "abcdefabcdef";

/// Image IDs the text names (up to 3), for ownership checks beside the fixed ones.
fn ids_in(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("sha256:") {
        let id = rest[i..].get(..71).unwrap_or("");
        if layerboot_init::digest::sha256_hex(id).is_some() && out.len() < 3 {
            out.push(id.to_string());
        }
        rest = &rest[i + 7..];
    }
    out
}

/// What Record::check lets into the options: plain printable characters, no quote,
/// brace, `;`, `$`, backquote or backslash.
fn record_safe(c: char) -> bool {
    (c == ' ' || c.is_ascii_graphic()) && !"{}'\";$`\\".contains(c)
}

fn record(tries: u32) -> Record {
    Record {
        reference: "demo".into(),
        image_id: ID.into(),
        kernel: "6.1.0".into(),
        serial: 1,
        created: 0,
        store: "/s".into(),
        namespace: None,
        options: format!("root=LABEL=s rw docker_image={ID}"),
        initramfs_args: vec![],
        tries,
        loader: "systemd-boot".into(),
        files: None,
    }
}

fn tempdir() -> tempfile::TempDir {
    match std::env::var_os("TMPDIR") {
        None if Path::new("/dev/shm").is_dir() => tempfile::tempdir_in("/dev/shm").unwrap(),
        _ => tempfile::tempdir().unwrap(),
    }
}

fn through_list(raw: &[u8]) {
    let dir = tempdir();
    let esp = dir.path();
    let d = esp.join(DEPLOYMENTS_DIR).join(NAME);
    fs::create_dir_all(&d).unwrap();
    fs::write(d.join(RECORD), serde_json::to_vec(&record(3)).unwrap()).unwrap();
    let entries = esp.join("loader/entries");
    fs::create_dir_all(&entries).unwrap();
    fs::write(entries.join(format!("layerboot-000001-{NAME}+3.conf")), raw).unwrap();

    let all = list(esp).unwrap_or_else(|e| panic!("one entry stops list: {e}"));
    assert_eq!(all.len(), 1);
    let found = &all[0];
    let text = std::str::from_utf8(raw).ok();
    match text.filter(|t| written_for(t, ID)) {
        Some(t) => {
            assert!(found.entry.is_some(), "an entry written for it is not its");
            assert_eq!(found.assessment, Some(Assessment::Trying { left: 3, done: 0 }));
            assert_eq!(found.version, read_version(t).unwrap_or(0));
        }
        None => {
            assert!(
                found.entry.is_none() && found.is_unfinished(),
                "{:?} is taken as its entry",
                found.entry
            );
            assert_eq!(found.version, 1, "the record's serial");
        }
    }
    assert!(found.stale_entries.is_empty());
    match next_serial(&all) {
        Ok(n) => assert!(n > found.version && n > 1),
        Err(e) => assert_eq!(found.version, u64::MAX, "{e}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, raw)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(raw);
    let serial = if control & 2 != 0 {
        u64::MAX
    } else {
        u64::from(control) * 1000 + 7
    };
    let mut ids = vec![ID.to_string(), OTHER.to_string()];
    ids.extend(ids_in(&text));

    // Rollback's rewrite.
    let _ = read_version(&text);
    let rolled = with_version(&text, serial);
    let had_version = text.lines().any(|l| l.starts_with("version "));
    assert_eq!(read_version(&rolled), had_version.then_some(serial), "{rolled:?}");
    if !text.is_empty() {
        let (before, after): (Vec<&str>, Vec<&str>) = (text.lines().collect(), rolled.lines().collect());
        assert_eq!(before.len(), after.len(), "lines added or lost");
        for (b, a) in before.iter().zip(&after) {
            if b.starts_with("version ") {
                assert_eq!(*a, format!("version {serial:06}"));
            } else {
                assert_eq!(
                    b.trim_end_matches('\r'),
                    a.trim_end_matches('\r'),
                    "a line other than version changed"
                );
            }
        }
    }
    let twice = with_version(&rolled, serial);
    assert!(
        twice
            .lines()
            .map(|l| l.trim_end_matches('\r'))
            .eq(rolled.lines().map(|l| l.trim_end_matches('\r'))),
        "not idempotent: {rolled:?} → {twice:?}"
    );
    for id in &ids {
        assert_eq!(
            written_for(&rolled, id),
            written_for(&text, id),
            "a rollback changes whether the entry is layerboot's for {id}"
        );
    }

    // A new entry: the input as its title, and as its options once a record allows them.
    let options: String = text.chars().filter(|&c| record_safe(c)).collect();
    let title = format!("layerboot: {text} ({NAME}, kernel 6.1.0)");
    let k = format!("/{DEPLOYMENTS_DIR}/{NAME}/vmlinuz");
    let i = format!("/{DEPLOYMENTS_DIR}/{NAME}/initramfs.img");
    let entry = render(ID, &title, serial, &k, &i, &options);
    let lines: Vec<&str> = entry.lines().collect();
    assert_eq!(lines.len(), 7, "{entry:?}");
    assert_eq!(lines.iter().filter(|l| l.starts_with("title ")).count(), 1, "{entry:?}");
    let opts: Vec<&&str> = lines.iter().filter(|l| l.starts_with("options ")).collect();
    assert_eq!(opts, [&format!("options {options}").as_str()], "{entry:?}");
    assert_eq!(read_version(&entry), Some(serial));
    for id in &ids {
        assert_eq!(written_for(&entry, id), id == ID, "{id}: {entry:?}");
    }

    if control & 1 != 0 {
        through_list(raw);
    }
});
