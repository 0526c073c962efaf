//! `ESP/layerboot/<name>/deployment.json` as the builder reads it (`deploy::Record`),
//! which anyone with the disk can edit and every deployment command reads. Parsed, then
//! `Record::check` against its directory's name, as `list` does before the record names
//! files or goes into a loader's script. Of a record that passes:
//! - what `check` promises: `sha256:<64 lowercase hex>` that the name starts (12 digits
//!   or more), tries 0–16, kernel arguments of plain printable characters without quote,
//!   brace, `;`, `$`, backquote or backslash; and it is written back as it was read
//!   (`make_default` rewrites it);
//! - its systemd-boot entry (as `deploy` renders it) has seven lines, its arguments on the
//!   one `options` line, its serial as version, and is layerboot's for its image; the
//!   entry's file name, under every counter, reads back as that serial and name;
//! - its GRUB snippet has a step down per try, as many lines as with a plain reference,
//!   kernel and arguments, a one-line title in single quotes, and a `linux` line whose
//!   words, read as GRUB's lexer reads quoted words, are the record's arguments; its
//!   grubenv variable takes any state and reads back as set;
//! - `deploy::list` on a temporary ESP holding it (with the entry or grubenv `deploy`
//!   writes) lists it with that state when it passes, and lists nothing when it does not;
//!   `next_serial`, `default_of` and `doomed` (gc) take the list without failing, and gc
//!   never picks the running deployment.
//!
//! Input: the JSON, then parts separated by 0xFF bytes (never in UTF-8 text): the
//! directory's name (default: the ID's first 12 digits), the value of its grubenv variable.
#![no_main]

use std::fs;
use std::path::{Path, PathBuf};

use layerboot::deploy::commands::doomed;
use layerboot::deploy::systemd_boot::{entry_id, read_version, render, written_for};
use layerboot::deploy::{
    default_of, entry_name_parts, grub, list, next_serial, Deployment, Record, DEPLOYMENTS_DIR, INITRAMFS, KERNEL,
    MAX_TRIES, RECORD,
};
use layerboot_init::bootcount::{Assessment, EntryName};
use layerboot_init::grubenv;
use libfuzzer_sys::fuzz_target;

/// The words of `s` as GRUB's lexer reads the forms `grub::quote` writes: bare words of
/// characters never special to it, single-quoted text, `\'`. `None`: anything else.
fn grub_words(s: &str) -> Option<Vec<String>> {
    let (mut words, mut cur, mut in_word) = (Vec::new(), String::new(), false);
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' if in_word => {
                words.push(std::mem::take(&mut cur));
                in_word = false;
            }
            ' ' => {}
            '\'' => {
                in_word = true;
                loop {
                    match chars.next()? {
                        '\'' => break,
                        x => cur.push(x),
                    }
                }
            }
            '\\' => {
                in_word = true;
                cur.push(chars.next().filter(|&x| x == '\'')?);
            }
            c if c.is_ascii_alphanumeric() || "-_./=:,@+%".contains(c) => {
                in_word = true;
                cur.push(c);
            }
            _ => return None,
        }
    }
    if in_word {
        words.push(cur);
    }
    Some(words)
}

/// The entry `deploy` writes (commands.rs `entry_text`).
fn entry_text(r: &Record, name: &str) -> String {
    let loader_path = |f: &str| format!("/{DEPLOYMENTS_DIR}/{name}/{f}");
    render(
        &r.image_id,
        &format!("layerboot: {} ({}, kernel {})", r.reference, r.short_id(), r.kernel),
        r.serial,
        &loader_path(KERNEL),
        &loader_path(INITRAMFS),
        &r.options,
    )
}

/// The counter a new entry gets.
fn first_count(tries: u32) -> Assessment {
    if tries > 0 {
        Assessment::Trying { left: tries, done: 0 }
    } else {
        Assessment::Good
    }
}

fn check_passed(r: &Record, name: &str, env_value: Option<&str>) {
    let hex = layerboot_init::digest::sha256_hex(&r.image_id).expect("checked: sha256:<64 hex>");
    assert!(name.len() >= 12 && hex.starts_with(name), "{name:?} for {}", r.image_id);
    assert!(r.tries <= MAX_TRIES);
    assert!(
        r.options
            .chars()
            .all(|c| (c == ' ' || c.is_ascii_graphic()) && !"{}'\";$`\\".contains(c)),
        "{:?}",
        r.options
    );
    let json = serde_json::to_string_pretty(r).unwrap();
    assert_eq!(
        &serde_json::from_str::<Record>(&json).unwrap(),
        r,
        "written back otherwise: {json}"
    );

    // systemd-boot: its entry and the entry's names.
    let text = entry_text(r, name);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 7, "{text:?}");
    let opts: Vec<&&str> = lines.iter().filter(|l| l.starts_with("options ")).collect();
    assert_eq!(opts, [&format!("options {}", r.options).as_str()], "{text:?}");
    assert_eq!(read_version(&text), Some(r.serial));
    assert!(written_for(&text, &r.image_id));
    let id = entry_id(r.serial, name);
    for a in [
        first_count(r.tries),
        Assessment::Good,
        Assessment::Trying { left: 1, done: r.tries },
        Assessment::Bad { done: r.tries },
    ] {
        let e = EntryName {
            id: id.clone(),
            assessment: a,
        };
        let back = EntryName::parse(&e.file_name()).unwrap_or_else(|| panic!("{} is no entry", e.file_name()));
        assert_eq!(back, e);
        assert_eq!(entry_name_parts(&back.id), Some((r.serial, name)), "{id}");
    }

    // GRUB: its state in the grubenv, and its snippet.
    let var = grubenv::tries_variable(name).expect("a checked name is plain");
    let mut env = Vec::new();
    if let Some(v) = env_value {
        grubenv::set(&mut env, &var, v);
    }
    let assessment = grub::assessment(&env, name, r.tries);
    assert_eq!(assessment.is_none(), env_value.is_none());
    let state = grub::value(assessment.unwrap_or(Assessment::Good));
    grubenv::set(&mut env, &var, &state);
    let block = grubenv::render(&env).expect("one variable fits");
    assert_eq!(
        grubenv::get(&grubenv::parse(&block).unwrap(), &var),
        Some(state.as_str())
    );

    let mut g = r.clone();
    g.loader = "grub".into();
    let d = Deployment {
        record: g,
        dir: PathBuf::from(format!("/esp/{DEPLOYMENTS_DIR}/{name}")),
        entry: None,
        stale_entries: Vec::new(),
        assessment,
        version: r.serial,
    };
    let s = grub::snippet(&[&d]);
    let lines: Vec<&str> = s.lines().collect();
    // The same deployment with a plain reference, kernel and arguments: what the record's
    // text adds to the snippet is never a line.
    let mut plain = d.clone();
    plain.record.reference = "demo".into();
    plain.record.kernel = "6.1.0".into();
    plain.record.options = "quiet".into();
    let ps = grub::snippet(&[&plain]);
    assert_eq!(lines.len(), ps.lines().count(), "{s}");
    // One step down per try, each in the entry that boots.
    let steps = lines
        .iter()
        .filter(|l| (l.starts_with("\tif [") || l.starts_with("\telif [")) && l.contains("save_env"));
    assert_eq!(steps.count(), r.tries as usize, "{s}");
    let menu: Vec<&&str> = lines.iter().filter(|l| l.starts_with("menuentry ")).collect();
    assert_eq!(menu.len(), 1, "{s}");
    let title = menu[0]
        .strip_prefix("menuentry '")
        .and_then(|t| t.strip_suffix(&format!("' --id layerboot-{name} {{")))
        .unwrap_or_else(|| panic!("{}", menu[0]));
    assert!(
        !title.contains('\'') && !title.chars().any(char::is_control),
        "{title:?}"
    );
    // The record's arguments between what the snippet puts before and after them.
    let linux = format!("\tlinux /{DEPLOYMENTS_DIR}/{name}/{KERNEL} ");
    let linux_line = |s: &str| s.lines().find(|l| l.starts_with(linux.as_str())).map(str::to_string);
    let plain_line = linux_line(&ps).unwrap_or_else(|| panic!("no linux line: {ps}"));
    let after = plain_line.strip_prefix(&format!("{linux}quiet")).unwrap().to_string();
    let line = linux_line(&s).unwrap_or_else(|| panic!("no linux line: {s}"));
    let args = line
        .strip_prefix(linux.as_str())
        .and_then(|a| a.strip_suffix(after.as_str()))
        .unwrap_or_else(|| panic!("{line:?} does not end {after:?}"));
    let words = grub_words(args).unwrap_or_else(|| panic!("GRUB reads {args:?} otherwise"));
    let want: Vec<&str> = r.options.split(' ').filter(|a| !a.is_empty()).collect();
    assert_eq!(words, want, "{args:?}");
}

fn tempdir() -> tempfile::TempDir {
    match std::env::var_os("TMPDIR") {
        None if Path::new("/dev/shm").is_dir() => tempfile::tempdir_in("/dev/shm").unwrap(),
        _ => tempfile::tempdir().unwrap(),
    }
}

/// The record's bytes as `deploy` leaves them on an ESP, read back by `list`.
fn through_list(json: &[u8], r: &Record, name: &str, env_value: Option<&str>) {
    let dir = tempdir();
    let esp = dir.path();
    let d = esp.join(DEPLOYMENTS_DIR).join(name);
    fs::create_dir_all(&d).unwrap();
    fs::write(d.join(RECORD), json).unwrap();
    let passes = r.check(name).is_ok();
    let grub = r.loader == "grub";
    let mut env = Vec::new();
    if let (Some(var), Some(v)) = (grubenv::tries_variable(name), env_value) {
        grubenv::set(&mut env, &var, v);
    }
    let block = grubenv::render(&env).ok();
    if let Some(b) = &block {
        fs::write(esp.join(DEPLOYMENTS_DIR).join("grubenv"), b).unwrap();
    }
    let count = EntryName {
        id: entry_id(r.serial, name),
        assessment: first_count(r.tries),
    };
    if passes && !grub {
        let entries = esp.join("loader/entries");
        fs::create_dir_all(&entries).unwrap();
        fs::write(entries.join(count.file_name()), entry_text(r, name)).unwrap();
    }

    let all = list(esp).unwrap_or_else(|e| panic!("one record stops list: {e}"));
    if !passes {
        assert!(all.is_empty(), "a record check refuses is listed");
        return;
    }
    assert_eq!(all.len(), 1);
    let found = &all[0];
    assert_eq!(&found.record, r);
    assert_eq!(found.name(), name);
    if grub {
        let env = if block.is_some() { env } else { Vec::new() };
        assert_eq!(found.assessment, grub::assessment(&env, name, r.tries));
    } else {
        let (path, e) = found.entry.as_ref().expect("its entry is found");
        assert_eq!(e, &count);
        assert!(path.ends_with(count.file_name()));
        assert_eq!(found.assessment, Some(count.assessment));
        assert_eq!(found.version, r.serial);
    }
    match next_serial(&all) {
        Ok(n) => assert!(n > found.version.max(r.serial)),
        Err(_) => assert_eq!(found.version.max(r.serial), u64::MAX),
    }
    let _ = default_of(&all);
    for keep in [0, 1] {
        assert!(!doomed(&all, keep, Some(r.image_id.as_str()))
            .iter()
            .any(|d| d.record.image_id == r.image_id));
        let _ = doomed(&all, keep, None);
    }
}

/// A name `list` could find as a directory: one plain path component.
fn component(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && name != "." && name != ".." && !name.contains(['/', '\0'])
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|&b| b == 0xff);
    let json = parts.next().unwrap_or_default();
    let Ok(r) = serde_json::from_slice::<Record>(json) else {
        return;
    };
    let given = parts.next().map(|n| String::from_utf8_lossy(n).into_owned());
    let env_value = parts.next().map(|v| String::from_utf8_lossy(v).into_owned());
    let name = given.unwrap_or_else(|| r.short_id().to_string());

    let mut names = vec![name.clone(), r.short_id().to_string()];
    if let Some(hex) = layerboot_init::digest::sha256_hex(&r.image_id) {
        names.push(hex[..20].to_string());
    }
    for n in &names {
        if r.check(n).is_ok() {
            check_passed(&r, n, env_value.as_deref());
        }
    }
    if component(&name) {
        through_list(json, &r, &name, env_value.as_deref());
    }
});
