//! The top-layer copy and its whiteouts on trees deeper than /init's open-file limit or
//! than PATH_MAX (needs root: the copy sets owners). /init runs as PID 1 with the
//! kernel's default limit of 1,024 open files; these tests run under the same.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use layerboot_init::copy::{copy_tree, COPY_DEPTH_MAX, REMOVE_DEPTH_MAX};
use nix::fcntl::{openat, OFlag};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::stat::{mkdirat, Mode};

/// PID 1's limit of open files (the kernel's default soft limit).
fn pid1_limits() {
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, 1024.min(hard), hard).unwrap();
}

fn open_at(dir: Option<&OwnedFd>, path: &Path, flags: OFlag) -> nix::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    let fd = openat(
        dir.map(|d| d.as_raw_fd()),
        path,
        flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
        Mode::from_bits_truncate(0o644),
    )?;
    // SAFETY: a fresh descriptor from openat.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `levels` directories named `name`, each in the one before, under `dir`, made by
/// descriptor (deeper than PATH_MAX if need be), with `files` in the deepest.
fn nest(dir: &Path, name: &str, levels: usize, files: &[(&str, &str)]) {
    use std::os::fd::AsRawFd;
    fs::create_dir_all(dir).unwrap();
    let mut fd = open_at(None, dir, OFlag::O_DIRECTORY | OFlag::O_RDONLY).unwrap();
    for _ in 0..levels {
        match mkdirat(Some(fd.as_raw_fd()), name, Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => panic!("mkdir: {e}"),
        }
        fd = open_at(Some(&fd), Path::new(name), OFlag::O_DIRECTORY | OFlag::O_RDONLY).unwrap();
    }
    for (file, text) in files {
        let f = open_at(Some(&fd), Path::new(file), OFlag::O_WRONLY | OFlag::O_CREAT).unwrap();
        File::from(f).write_all(text.as_bytes()).unwrap();
    }
}

/// The file `file` at the bottom of `levels` directories `name` under `dir`, read by
/// descriptor; None if any is missing.
fn read_nested(dir: &Path, name: &str, levels: usize, file: &str) -> Option<String> {
    let mut fd = open_at(None, dir, OFlag::O_DIRECTORY | OFlag::O_RDONLY).ok()?;
    for _ in 0..levels {
        fd = open_at(Some(&fd), Path::new(name), OFlag::O_DIRECTORY | OFlag::O_RDONLY).ok()?;
    }
    let mut text = String::new();
    File::from(open_at(Some(&fd), Path::new(file), OFlag::O_RDONLY).ok()?)
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

#[test]
fn whiteouts_delete_trees_deeper_than_the_open_file_limit() {
    pid1_limits();
    let t = tempfile::tempdir().unwrap();
    let (src, root) = (t.path().join("top"), t.path().join("root"));
    // In the image (or a kept layer): two trees 1,500 levels deep.
    nest(&root.join("deep"), "d", 1500, &[("f", "image")]);
    nest(&root.join("opq"), "d", 1500, &[("f", "image")]);
    fs::write(root.join("keep"), "image").unwrap();
    fs::create_dir_all(src.join("opq")).unwrap();
    fs::write(src.join(".wh.deep"), "").unwrap();
    fs::write(src.join("opq/.wh..wh..opq"), "").unwrap();
    fs::write(src.join("opq/mine"), "host").unwrap();
    let stats = copy_tree(&src, &root).unwrap_or_else(|e| panic!("{e}"));
    assert!(!root.join("deep").exists(), "the whiteout deleted the whole tree");
    let left: Vec<_> = fs::read_dir(root.join("opq"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["mine"], "the opaque marker emptied its directory");
    assert_eq!(fs::read_to_string(root.join("keep")).unwrap(), "image");
    assert!(stats.warnings.is_empty(), "{:?}", stats.warnings);
}

#[test]
fn a_top_layer_deeper_than_path_max_is_copied_and_its_whiteouts_work() {
    pid1_limits();
    let t = tempfile::tempdir().unwrap();
    let (src, root) = (t.path().join("top"), t.path().join("root"));
    // 20 levels of 250 characters: 5,000 characters of path, more than PATH_MAX (4,096).
    // (GNU cp -a, 9.1, stops at it too: "cannot stat …: File name too long".)
    let name = "n".repeat(250);
    nest(&src, &name, 20, &[("bottom", "deep"), (".wh.gone", "")]);
    nest(&root, &name, 20, &[("gone", "image")]);
    let stats = copy_tree(&src, &root).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(read_nested(&root, &name, 20, "bottom").as_deref(), Some("deep"));
    assert_eq!(
        read_nested(&root, &name, 20, "gone"),
        None,
        "the deep whiteout deleted its file"
    );
    assert!(stats.warnings.is_empty(), "{:?}", stats.warnings);
}

#[test]
fn a_top_layer_deeper_than_the_bound_is_copied_down_to_it_and_the_rest_named_in_a_warning() {
    pid1_limits();
    let t = tempfile::tempdir().unwrap();
    let (src, root) = (t.path().join("top"), t.path().join("root"));
    nest(&src, "d", COPY_DEPTH_MAX + 10, &[("bottom", "deep")]);
    nest(&src, "d", COPY_DEPTH_MAX - 1, &[("last", "kept")]);
    fs::create_dir_all(src.join("etc")).unwrap();
    fs::write(src.join("etc/hostname"), "pc1").unwrap();
    fs::set_permissions(src.join("etc"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::create_dir_all(&root).unwrap();
    let stats = copy_tree(&src, &root).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(fs::read_to_string(root.join("etc/hostname")).unwrap(), "pc1");
    assert_eq!(
        read_nested(&root, "d", COPY_DEPTH_MAX - 1, "last").as_deref(),
        Some("kept")
    );
    assert_eq!(read_nested(&root, "d", COPY_DEPTH_MAX + 10, "bottom"), None);
    assert!(
        stats.warnings.len() == 1
            && stats.warnings[0].contains("did not copy")
            && stats.warnings[0].contains(&format!("deeper than {COPY_DEPTH_MAX} directories")),
        "{:?}",
        stats.warnings
    );
}

#[test]
fn a_whiteout_over_a_tree_deeper_than_the_bound_deletes_what_it_can_and_says_what_it_left() {
    pid1_limits();
    let t = tempfile::tempdir().unwrap();
    let (src, root) = (t.path().join("top"), t.path().join("root"));
    nest(&root.join("deep"), "d", REMOVE_DEPTH_MAX + 5, &[("f", "image")]);
    fs::create_dir_all(root.join("deep/other")).unwrap();
    fs::write(root.join("deep/other/f"), "image").unwrap();
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join(".wh.deep"), "").unwrap();
    fs::write(src.join("mine"), "host").unwrap();
    let stats = copy_tree(&src, &root).unwrap_or_else(|e| panic!("{e}"));
    assert!(!root.join("deep/other").exists(), "what is within the bound is deleted");
    assert_eq!(
        read_nested(&root.join("deep"), "d", REMOVE_DEPTH_MAX + 5, "f").as_deref(),
        Some("image"),
        "what lies beyond the bound is left whole"
    );
    assert_eq!(
        fs::read_to_string(root.join("mine")).unwrap(),
        "host",
        "the boot went on"
    );
    assert!(
        stats.warnings.len() == 1
            && stats.warnings[0].contains("did not delete /deep/d/d/")
            && stats.warnings[0].contains(&format!("deeper than {REMOVE_DEPTH_MAX} directories")),
        "{:?}",
        stats
            .warnings
            .iter()
            .map(|w| w.chars().take(200).collect::<String>())
            .collect::<Vec<_>>()
    );
}
