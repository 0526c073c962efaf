//! The top-layer copy compared file by file with `cp -a` (needs root: owners, device
//! nodes, trusted.* xattrs), and whiteouts in the top layer.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use layerboot_init::copy::copy_tree;

fn sh(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn xattrs(p: &Path) -> Vec<String> {
    let out = Command::new("getfattr").args(["-h", "-d", "-m", "-", "--absolute-names"]).arg(p).output().expect("getfattr (package attr)");
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.starts_with('#') && !l.is_empty()).map(str::to_string).collect()
}

/// Everything `cp -a` preserves, per path; hard links as the first path of their inode.
fn describe(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, String> = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    let mut all = Vec::new();
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                todo.push(p.clone());
            }
            all.push(p);
        }
    }
    all.sort();
    for p in all {
        let md = fs::symlink_metadata(&p).unwrap();
        let rel = p.strip_prefix(root).unwrap().display().to_string();
        let link = fs::read_link(&p).map(|l| l.display().to_string()).unwrap_or_default();
        let first = if md.nlink() > 1 && !md.is_dir() { inodes.entry(md.ino()).or_insert(rel.clone()).clone() } else { String::new() };
        let mtime = if md.is_dir() { 0 } else { md.mtime() * 1_000_000_000 + md.mtime_nsec() };
        let size = if md.is_dir() { 0 } else { md.size() };
        out.insert(
            rel,
            format!("mode {:o} owner {}:{} size {size} mtime {mtime} rdev {} link '{link}' hardlink '{first}' xattrs {:?}", md.mode(), md.uid(), md.gid(), md.rdev(), xattrs(&p)),
        );
    }
    out
}

fn make_top_layer(src: &Path) {
    fs::create_dir_all(src.join("etc/ssh")).unwrap();
    fs::create_dir_all(src.join("home/user/.config")).unwrap();
    fs::create_dir_all(src.join("tmp")).unwrap();
    fs::set_permissions(src.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::write(src.join("etc/shadow"), "root:*:1::::::\n").unwrap();
    fs::set_permissions(src.join("etc/shadow"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(src.join("etc/shadow"), Some(0), Some(42)).unwrap();
    fs::write(src.join("etc/ssh/ssh_host_key"), "key").unwrap();
    fs::set_permissions(src.join("etc/ssh/ssh_host_key"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(src.join("home/user/.config/app"), "x").unwrap();
    std::os::unix::fs::chown(src.join("home/user"), Some(1000), Some(1000)).unwrap();
    std::os::unix::fs::chown(src.join("home/user/.config/app"), Some(1000), Some(100)).unwrap();
    fs::write(src.join(".hidden-top-level"), "dot").unwrap();
    fs::write(src.join("suid"), "#!/bin/sh\n").unwrap();
    fs::set_permissions(src.join("suid"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::hard_link(src.join("etc/shadow"), src.join("etc/shadow-hardlink")).unwrap();
    symlink("/etc/shadow", src.join("abs-link")).unwrap();
    symlink("../../nowhere", src.join("etc/dangling")).unwrap();
    sh(Command::new("mknod").arg(src.join("null")).args(["c", "1", "3"]));
    sh(Command::new("mknod").arg(src.join("loop9")).args(["b", "7", "9"]));
    sh(Command::new("mkfifo").arg(src.join("fifo")));
    for (name, value) in [("user.note", "u"), ("trusted.overlay.x", "t"), ("security.selinux", "system_u:object_r:etc_t:s0")] {
        sh(Command::new("setfattr").args(["-n", name, "-v", value]).arg(src.join("etc/shadow")));
    }
    sh(Command::new("setfattr").args(["-n", "trusted.dir", "-v", "d"]).arg(src.join("etc/ssh")));
    sh(Command::new("touch").args(["-h", "-d", "2001-02-03 04:05:06.123456789"]).arg(src.join("abs-link")));
    sh(Command::new("touch").args(["-d", "2002-02-03 04:05:06.5"]).arg(src.join("etc/ssh/ssh_host_key")));
}

#[test]
fn copy_matches_cp_a_file_by_file() {
    let t = tempfile::tempdir().unwrap();
    let (src, ours, theirs) = (t.path().join("top"), t.path().join("ours"), t.path().join("theirs"));
    make_top_layer(&src);
    fs::create_dir(&ours).unwrap();
    fs::create_dir(&theirs).unwrap();
    copy_tree(&src, &ours).unwrap();
    sh(Command::new("cp").arg("-a").arg(format!("{}/.", src.display())).arg(&theirs));
    let (a, b) = (describe(&ours), describe(&theirs));
    assert_eq!(a.len(), b.len(), "{:?}", a.keys().collect::<Vec<_>>());
    for (path, want) in &b {
        assert_eq!(a.get(path), Some(want), "{path}");
    }
    assert!(a["etc/shadow"].contains("security.selinux") && a["etc/shadow"].contains("trusted.overlay.x"), "{}", a["etc/shadow"]);
}

#[test]
fn whiteouts_in_the_top_layer_delete_from_the_new_root() {
    let t = tempfile::tempdir().unwrap();
    let (src, root) = (t.path().join("top"), t.path().join("root"));
    for f in ["etc/motd", "etc/cron.d/job", "etc/keep", "opt/vendor/a", "opt/vendor/sub/b"] {
        fs::create_dir_all(root.join(f).parent().unwrap()).unwrap();
        fs::write(root.join(f), "image").unwrap();
    }
    fs::create_dir_all(src.join("etc")).unwrap();
    fs::create_dir_all(src.join("opt/vendor")).unwrap();
    fs::write(src.join("etc/.wh.motd"), "").unwrap();
    fs::write(src.join("etc/.wh.cron.d"), "").unwrap();
    fs::write(src.join("etc/.wh.not-there"), "").unwrap();
    fs::write(src.join("opt/vendor/.wh..wh..opq"), "").unwrap();
    fs::write(src.join("opt/vendor/mine"), "host").unwrap();
    copy_tree(&src, &root).unwrap();
    assert!(!root.join("etc/motd").exists() && !root.join("etc/cron.d").exists());
    assert!(root.join("etc/keep").exists());
    let vendor: Vec<_> = fs::read_dir(root.join("opt/vendor")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(vendor, vec!["mine"], "opaque: only the top layer's files remain");
    assert!(!root.join("etc/.wh.motd").exists() && !root.join("opt/vendor/.wh..wh..opq").exists(), "markers are not copied");
}
