//! Boot entries' file names, where the loader keeps its counter (`ID+LEFT-DONE.conf`),
//! and `LoaderBootCountPath`, the name the bless service renames: anyone with the disk
//! can name files on the ESP, and the firmware's variable holds what the loader read.
//! - `bootcount::EntryName::parse`: a parsed name renders to a name that parses to it
//!   again (no longer than the input); a name rendered from any id and counter parses
//!   back to them (an id holding `+` aside, for a name without counter, which the
//!   loader would read as a counter);
//! - the builder's `entry_name_parts` (which entries are layerboot's): a serial of 6
//!   digits or more and 12 to 64 lowercase hex digits, that `entry_id` writes again and
//!   that survive every counter the loader or a bless gives the name;
//! - `bless::entry_path` on the input as a path (as it is, with `\` for `/`, under
//!   `\loader\entries\`) and as the EFI variable's raw bytes (`efi_string`): only ever
//!   a plain relative path `loader/entries/<name>` whose name is an entry, and the name
//!   the bless renames it to lies in the same directory.
#![no_main]

use std::ffi::OsStr;
use std::path::{Component, Path};

use layerboot::deploy::entry_name_parts;
use layerboot::deploy::systemd_boot::entry_id;
use layerboot_init::bless::{efi_string, entry_path};
use layerboot_init::bootcount::{Assessment, EntryName};
use libfuzzer_sys::fuzz_target;

/// `p` is `loader/entries/<one plain name>`; that name.
fn in_entries(p: &Path) -> &str {
    let c: Vec<Component> = p.components().collect();
    match c[..] {
        [Component::Normal(a), Component::Normal(b), Component::Normal(n)]
            if a == OsStr::new("loader") && b == OsStr::new("entries") =>
        {
            let n = n.to_str().expect("UTF-8 in, UTF-8 out");
            assert!(!n.contains('/') && n != "." && n != "..", "{n:?}");
            assert_eq!(p.file_name(), Some(OsStr::new(n)));
            n
        }
        _ => panic!("{} is not a plain path in loader/entries", p.display()),
    }
}

fn check_loader_path(loader_path: &str) {
    let Some(p) = entry_path(loader_path) else { return };
    let name = in_entries(&p);
    let parsed = EntryName::parse(name).unwrap_or_else(|| panic!("{name:?} from {loader_path:?} is no entry"));
    // What `bless_at` renames it to.
    let blessed = EntryName {
        id: parsed.id,
        assessment: Assessment::Good,
    };
    in_entries(&p.with_file_name(blessed.file_name()));
}

fn assessments(left: u32, done: u32) -> [Assessment; 4] {
    [
        Assessment::Good,
        Assessment::Trying {
            left: left.max(1),
            done,
        },
        Assessment::Bad { done },
        Assessment::Bad { done: 0 },
    ]
}

fn round_trips(e: &EntryName) {
    let name = e.file_name();
    assert_eq!(
        EntryName::parse(&name).as_ref(),
        Some(e),
        "{e:?} is written {name:?}, which reads otherwise"
    );
}

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Some(e) = EntryName::parse(s) {
            assert!(s.ends_with(".conf") && s.starts_with(&e.id), "{s:?} → {e:?}");
            let again = e.file_name();
            assert!(again.len() <= s.len(), "{s:?} renders longer: {again:?}");
            assert_eq!(
                EntryName::parse(&again),
                Some(e.clone()),
                "{s:?} → {again:?} reads otherwise"
            );

            // The builder's own entries: layerboot-<serial>-<name>, under every counter.
            if let Some((serial, name)) = entry_name_parts(&e.id) {
                assert!((12..=64).contains(&name.len()), "{name:?}");
                assert!(
                    name.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                    "{name:?}"
                );
                let digits = e.id.strip_prefix("layerboot-").unwrap().strip_suffix(name).unwrap();
                assert_eq!(digits.strip_suffix('-').unwrap().parse::<u64>().ok(), Some(serial));
                let id = entry_id(serial, name);
                assert_eq!(entry_name_parts(&id), Some((serial, name)), "{id:?}");
                let (left, done) = match e.assessment {
                    Assessment::Trying { left, done } => (left, done),
                    Assessment::Bad { done } => (3, done),
                    Assessment::Good => (3, 0),
                };
                for a in assessments(left, done) {
                    let n = EntryName {
                        id: id.clone(),
                        assessment: a,
                    };
                    round_trips(&n);
                    let back = EntryName::parse(&n.file_name()).unwrap();
                    assert_eq!(entry_name_parts(&back.id), Some((serial, name)));
                }
            }
        }

        // Any id, any counter: written, then read back.
        let (left, done) = match data {
            [a, b, ..] => ((u32::from(*a) << 20) | 7, u32::from(*b) << 24),
            _ => (1, 0),
        };
        for a in assessments(left, done) {
            if a == Assessment::Good && s.contains('+') {
                continue; // `x+3.conf` is x with 3 tries left: such an id has no name without counter
            }
            round_trips(&EntryName {
                id: s.to_string(),
                assessment: a,
            });
        }

        check_loader_path(s);
        check_loader_path(&s.replace('/', "\\"));
        check_loader_path(&format!("\\loader\\entries\\{s}"));
        check_loader_path(&format!("/loader/entries/{s}"));
    }
    // As the loader left it in LoaderBootCountPath.
    if let Some(s) = efi_string(data) {
        check_loader_path(&s);
    }
});
