//! systemd-boot's side of a deployment: one Boot Loader Specification entry per
//! deployment in `ESP/loader/entries/`, with the loader's own boot counter in its file
//! name (`NAME+LEFT[-DONE].conf`, UAPI.1 "Boot counting").
//!
//! The default is chosen by sort order, never by a fixed `default`: every entry carries
//! `sort-key layerboot` and `version <serial>`, systemd-boot lists entries of one sort key
//! newest version first and every entry with no tries left after all the others. So the
//! newest deployment that is not bad boots by itself, and rollback is a new serial.

use std::path::{Path, PathBuf};

/// The sort key every layerboot entry carries.
pub const SORT_KEY: &str = "layerboot";

pub use layerboot_init::bootcount::{Assessment, EntryName};

/// The entry id of a deployment: serial first, so a listing by name reads in order.
pub fn entry_id(serial: u64, short_id: &str) -> String {
    format!("layerboot-{serial:06}-{short_id}")
}

/// The serial a version line carries (zero-padded so names and versions sort alike).
pub fn version(serial: u64) -> String {
    format!("{serial:06}")
}

/// The line that says layerboot wrote an entry for the deployment of `image_id` (a
/// comment to the loader): without it, an entry is not layerboot's to move or remove.
pub fn marker(image_id: &str) -> String {
    format!("# {MARKER} {image_id}")
}

const MARKER: &str = "written by layerboot deploy for";

/// Whether layerboot wrote the entry `text` for the deployment of `image_id`: its marker,
/// or, in entries written before there was one, layerboot's sort key with `docker_image=`
/// that ID.
pub fn written_for(text: &str, image_id: &str) -> bool {
    let marker = marker(image_id);
    if text.lines().any(|l| l.trim_end() == marker) {
        return true;
    }
    let pinned = format!("docker_image={image_id}");
    !text.lines().any(|l| l.starts_with(&format!("# {MARKER} ")))
        && text.lines().any(|l| l.trim() == format!("sort-key {SORT_KEY}"))
        && text
            .lines()
            .filter_map(|l| l.strip_prefix("options "))
            .any(|o| o.split_whitespace().any(|a| a == pinned))
}

/// The text of one entry; paths are as the loader sees them (from the ESP's root).
pub fn render(image_id: &str, title: &str, serial: u64, kernel: &str, initrd: &str, options: &str) -> String {
    // One line whatever the title holds (an image's reference, a kernel's version): a
    // newline in it would add lines, and lines are what the loader obeys.
    let title: String = title.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    format!(
        "{}\ntitle {title}\nsort-key {SORT_KEY}\nversion {}\nlinux {kernel}\ninitrd {initrd}\noptions {options}\n",
        marker(image_id),
        version(serial)
    )
}

/// The `version` line of an entry's text.
pub fn read_version(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("version "))
        .and_then(|v| v.trim().parse().ok())
}

/// Replaces the `version` line of an entry's text (rollback).
pub fn with_version(text: &str, serial: u64) -> String {
    text.lines()
        .map(|l| {
            if l.starts_with("version ") {
                format!("version {}", version(serial))
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// `ESP/loader/entries`.
pub fn entries_dir(esp: &Path) -> PathBuf {
    esp.join("loader/entries")
}

/// A `default` line in `loader.conf` that would pin one entry and defeat the sort order
/// (`@saved` and layerboot's own ids aside, which `deploy` removes), for the user.
pub fn pinned_default(loader_conf: &str) -> Option<String> {
    loader_conf
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("default"))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// `loader.conf` without its `default` line.
pub fn without_default(loader_conf: &str) -> String {
    loader_conf
        .lines()
        .filter(|l| !l.trim().starts_with("default"))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_title_is_one_line_whatever_it_holds() {
        let text = render("sha256:ab", "demo\noptions init=/bin/sh\r", 7, "/k", "/i", "quiet");
        assert_eq!(text.lines().filter(|l| l.starts_with("options")).count(), 1, "{text}");
        assert!(text.contains("\ntitle demo options init=/bin/sh \n"), "{text}");
        assert_eq!(read_version(&text), Some(7));
    }

    #[test]
    fn an_entry_sorts_by_key_and_version_and_rollback_rewrites_the_version() {
        let text = render(
            "sha256:ab",
            "layerboot: demo",
            7,
            "/layerboot/x/vmlinuz",
            "/layerboot/x/initramfs.img",
            "root=LABEL=s rw",
        );
        assert!(text.contains("\nsort-key layerboot\nversion 000007\n"), "{text}");
        assert_eq!(read_version(&text), Some(7));
        let again = with_version(&text, 12);
        assert_eq!(read_version(&again), Some(12));
        assert_eq!(again.replace("000012", "000007"), text);
    }

    #[test]
    fn an_entry_is_layerboots_by_its_marker_or_as_entries_were_written_before_it() {
        let id = "sha256:ab";
        let text = render(id, "t", 1, "/k", "/i", "root=x docker_image=sha256:ab");
        assert!(
            text.starts_with("# written by layerboot deploy for sha256:ab\n"),
            "{text}"
        );
        assert!(written_for(&text, id));
        assert!(!written_for(&text, "sha256:cd"));
        assert!(written_for(&with_version(&text, 3), id), "a rollback keeps the marker");
        let before = text.lines().skip(1).collect::<Vec<_>>().join("\n");
        assert!(written_for(&before, id), "{before}");
        assert!(!written_for(
            &before.replace("sort-key layerboot", "sort-key debian"),
            id
        ));
        assert!(!written_for(
            &before.replace("docker_image=sha256:ab", "docker_image=sha256:abc"),
            id
        ));
        assert!(!written_for("title hand-made\noptions docker_image=sha256:ab\n", id));
    }

    #[test]
    fn a_pinned_default_is_found_and_removed() {
        let conf = "timeout 0\ndefault layerboot-demo.conf\nconsole-mode keep\n";
        assert_eq!(pinned_default(conf).as_deref(), Some("layerboot-demo.conf"));
        assert_eq!(without_default(conf), "timeout 0\nconsole-mode keep\n");
        assert_eq!(pinned_default("timeout 3\n"), None);
    }
}
