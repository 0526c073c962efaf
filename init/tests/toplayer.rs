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
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn xattrs(p: &Path) -> Vec<String> {
    let out = Command::new("getfattr")
        .args(["-h", "-d", "-m", "-", "--absolute-names"])
        .arg(p)
        .output()
        .expect("getfattr (package attr)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(str::to_string)
        .collect()
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
        let first = if md.nlink() > 1 && !md.is_dir() {
            inodes.entry(md.ino()).or_insert(rel.clone()).clone()
        } else {
            String::new()
        };
        let mtime = if md.is_dir() {
            0
        } else {
            md.mtime() * 1_000_000_000 + md.mtime_nsec()
        };
        let size = if md.is_dir() { 0 } else { md.size() };
        out.insert(
            rel,
            format!(
                "mode {:o} owner {}:{} size {size} mtime {mtime} rdev {} link '{link}' hardlink '{first}' xattrs {:?}",
                md.mode(),
                md.uid(),
                md.gid(),
                md.rdev(),
                xattrs(&p)
            ),
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
    for (name, value) in [
        ("user.note", "u"),
        ("trusted.overlay.x", "t"),
        ("security.selinux", "system_u:object_r:etc_t:s0"),
    ] {
        sh(Command::new("setfattr")
            .args(["-n", name, "-v", value])
            .arg(src.join("etc/shadow")));
    }
    sh(Command::new("setfattr")
        .args(["-n", "trusted.dir", "-v", "d"])
        .arg(src.join("etc/ssh")));
    sh(Command::new("touch")
        .args(["-h", "-d", "2001-02-03 04:05:06.123456789"])
        .arg(src.join("abs-link")));
    sh(Command::new("touch")
        .args(["-d", "2002-02-03 04:05:06.5"])
        .arg(src.join("etc/ssh/ssh_host_key")));
}

#[test]
fn copy_matches_cp_a_file_by_file() {
    let t = tempfile::tempdir().unwrap();
    let (src, ours, theirs) = (t.path().join("top"), t.path().join("ours"), t.path().join("theirs"));
    make_top_layer(&src);
    fs::create_dir(&ours).unwrap();
    fs::create_dir(&theirs).unwrap();
    copy_tree(&src, &ours).unwrap();
    sh(Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", src.display()))
        .arg(&theirs));
    let (a, b) = (describe(&ours), describe(&theirs));
    assert_eq!(a.len(), b.len(), "{:?}", a.keys().collect::<Vec<_>>());
    for (path, want) in &b {
        assert_eq!(a.get(path), Some(want), "{path}");
    }
    assert!(
        a["etc/shadow"].contains("security.selinux") && a["etc/shadow"].contains("trusted.overlay.x"),
        "{}",
        a["etc/shadow"]
    );
}

#[test]
fn a_sparse_file_keeps_its_holes_as_with_cp_a() {
    use std::io::{Seek, SeekFrom, Write};
    let t = tempfile::tempdir().unwrap();
    let (src, ours, theirs) = (t.path().join("top"), t.path().join("ours"), t.path().join("theirs"));
    for d in [&src, &ours, &theirs] {
        fs::create_dir_all(d.join("var/log")).unwrap();
    }
    // 256 MiB, data at the start and in the middle, a hole at the end (as lastlog is).
    let mut f = fs::File::create(src.join("var/log/lastlog")).unwrap();
    f.write_all(b"head").unwrap();
    f.seek(SeekFrom::Start(100 << 20)).unwrap();
    f.write_all(b"middle").unwrap();
    f.set_len(256 << 20).unwrap();
    drop(f);
    copy_tree(&src, &ours).unwrap();
    sh(Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", src.display()))
        .arg(&theirs));
    let (a, b) = (ours.join("var/log/lastlog"), theirs.join("var/log/lastlog"));
    let (ma, mb) = (fs::metadata(&a).unwrap(), fs::metadata(&b).unwrap());
    assert_eq!(ma.len(), 256 << 20);
    assert!(
        ma.blocks() <= mb.blocks().max(64),
        "{} KiB allocated, cp -a: {} KiB",
        ma.blocks() / 2,
        mb.blocks() / 2
    );
    assert!(fs::read(&a).unwrap() == fs::read(&b).unwrap(), "the contents differ");
}

#[test]
fn a_top_layer_never_carries_a_layers_marks() {
    let t = tempfile::tempdir().unwrap();
    let (src, root) = (t.path().join("top"), t.path().join("root"));
    fs::create_dir_all(src.join("etc")).unwrap();
    fs::create_dir_all(&root).unwrap();
    fs::write(src.join("etc/hostname"), "pc1").unwrap();
    for (name, value) in [("trusted.layerboot.state", "complete 9"), ("user.note", "kept")] {
        sh(Command::new("setfattr")
            .args(["-n", name, "-v", value])
            .arg(src.join("etc/hostname")));
    }
    let stats = copy_tree(&src, &root).unwrap();
    let got = xattrs(&root.join("etc/hostname"));
    assert!(
        got.iter().any(|x| x.starts_with("user.note")) && !got.iter().any(|x| x.contains("layerboot")),
        "{got:?}"
    );
    assert!(
        stats.warnings.iter().any(|w| w.contains("trusted.layerboot.state")),
        "{:?}",
        stats.warnings
    );
}

#[test]
fn whiteouts_in_the_top_layer_delete_from_the_new_root() {
    let t = tempfile::tempdir().unwrap();
    let (src, root) = (t.path().join("top"), t.path().join("root"));
    for f in [
        "etc/motd",
        "etc/cron.d/job",
        "etc/keep",
        "opt/vendor/a",
        "opt/vendor/sub/b",
    ] {
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
    let vendor: Vec<_> = fs::read_dir(root.join("opt/vendor"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(vendor, vec!["mine"], "opaque: only the top layer's files remain");
    assert!(
        !root.join("etc/.wh.motd").exists() && !root.join("opt/vendor/.wh..wh..opq").exists(),
        "markers are not copied"
    );
}

/// One entry of a generated top layer: a path of 1–3 names, and what is there.
#[derive(Debug, Clone)]
enum Kind {
    File(Vec<u8>, u32),
    Dir(u32),
    Symlink(String),
    /// A hard link to the n-th file made so far.
    HardLink(usize),
}

/// Names a hostile or careless user might give files: spaces, newlines, backslashes,
/// leading dashes and dots, non-ASCII, up to the 255-byte limit. Never `.`/`..` (not
/// names), never `.wh.*` (whiteouts, which cp -a would copy as files).
fn name() -> impl proptest::strategy::Strategy<Value = String> {
    use proptest::prelude::*;
    prop_oneof![
        "[a-zA-Z0-9 ._\\-\n\\\\:,=@$ü*?\\[\\]]{1,12}",
        Just("-rf".to_string()),
        Just("...".to_string()),
        Just(" ".to_string()),
        "[a-z]{255}",
    ]
    .prop_filter("not . or .. or a whiteout", |n| {
        n != "." && n != ".." && !n.starts_with(".wh.") && n.len() <= 255
    })
}

fn kind() -> impl proptest::strategy::Strategy<Value = Kind> {
    use proptest::prelude::*;
    prop_oneof![
        (
            proptest::collection::vec(any::<u8>(), 0..64),
            prop_oneof![Just(0o644u32), Just(0o600), Just(0o4755), Just(0o000)]
        )
            .prop_map(|(d, m)| Kind::File(d, m)),
        prop_oneof![Just(0o755u32), Just(0o1777), Just(0o700)].prop_map(Kind::Dir),
        prop_oneof![
            Just("..".to_string()),
            Just("/".to_string()),
            Just("../../../etc/shadow".to_string()),
            Just("/etc".to_string()),
            "[a-z./]{1,20}"
        ]
        .prop_map(Kind::Symlink),
        (0usize..8).prop_map(Kind::HardLink),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 48, ..Default::default() })]

    /// Generated trees with hostile names and links: the copy is `cp -a`'s, file by file,
    /// and writes nothing outside the new root.
    #[test]
    fn generated_trees_with_hostile_names_copy_like_cp_a(entries in proptest::collection::vec((proptest::collection::vec(name(), 1..4), kind(), 0u32..3), 1..24)) {
        let t = tempfile::tempdir().unwrap();
        let (src, ours, theirs, outside) = (t.path().join("top"), t.path().join("a/ours"), t.path().join("theirs"), t.path().join("a/outside"));
        for d in [&src, &ours, &theirs, &outside] {
            fs::create_dir_all(d).unwrap();
        }
        fs::write(outside.join("canary"), "keep").unwrap();
        let mut files = Vec::new();
        for (names, kind, owner) in entries {
            let path = names.iter().fold(src.clone(), |p, n| p.join(n));
            let parent = path.parent().unwrap();
            if fs::symlink_metadata(&path).is_ok() || (parent != src && fs::create_dir_all(parent).is_err()) {
                continue;
            }
            let made = match &kind {
                Kind::File(data, mode) => fs::write(&path, data).and_then(|_| fs::set_permissions(&path, fs::Permissions::from_mode(*mode))),
                Kind::Dir(mode) => fs::create_dir(&path).and_then(|_| fs::set_permissions(&path, fs::Permissions::from_mode(*mode))),
                Kind::Symlink(target) => symlink(target, &path),
                Kind::HardLink(n) => match files.get(*n % files.len().max(1)) {
                    Some(first) => fs::hard_link(first, &path),
                    None => continue,
                },
            };
            if made.is_err() {
                continue;
            }
            if matches!(kind, Kind::File(..)) {
                files.push(path.clone());
            }
            let _ = std::os::unix::fs::lchown(&path, Some(1000 * owner), Some(100 * owner));
        }
        copy_tree(&src, &ours).unwrap();
        sh(Command::new("cp").arg("-a").arg(format!("{}/.", src.display())).arg(&theirs));
        let (a, b) = (describe(&ours), describe(&theirs));
        proptest::prop_assert_eq!(a, b);
        let left: Vec<_> = fs::read_dir(&outside).unwrap().map(|e| e.unwrap().file_name()).collect();
        proptest::prop_assert_eq!(left, vec!["canary"]);
    }
}

/// More than 4 KiB of xattr names on one file (btrfs keeps them; ext4 could not): the
/// list is read whole and every attribute is copied.
#[test]
fn a_file_with_over_4_kib_of_xattr_names_is_copied_whole() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("fs.img");
    fs::File::create(&img).unwrap().set_len(128 << 20).unwrap();
    sh(Command::new("mkfs.btrfs").arg("-q").arg(&img));
    let mnt = t.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    sh(Command::new("mount").arg("-o").arg("loop").arg(&img).arg(&mnt));
    let result = std::panic::catch_unwind(|| {
        let (src, dest) = (mnt.join("top"), mnt.join("root"));
        fs::create_dir_all(&src).unwrap();
        fs::create_dir_all(&dest).unwrap();
        fs::write(src.join("tagged"), "x").unwrap();
        let names: Vec<String> = (0..60).map(|i| format!("user.{i:03}-{}", "n".repeat(96))).collect();
        for n in &names {
            sh(Command::new("setfattr")
                .args(["-n", n, "-v", "v"])
                .arg(src.join("tagged")));
        }
        assert!(names.iter().map(|n| n.len() + 1).sum::<usize>() > 4096);
        let stats = copy_tree(&src, &dest).unwrap();
        assert!(stats.warnings.is_empty(), "{:?}", stats.warnings);
        let copied = xattrs(&dest.join("tagged"));
        assert_eq!(copied.len(), 60, "{copied:?}");
    });
    let _ = Command::new("umount").arg(&mnt).status();
    result.unwrap();
}

/// The top layer is copied on one filesystem: something mounted inside it (here a
/// tmpfs) is skipped with a warning, never copied into the new root.
#[test]
fn a_mount_inside_the_top_layer_is_not_copied() {
    let t = tempfile::tempdir().unwrap();
    let (src, dest) = (t.path().join("top"), t.path().join("root"));
    fs::create_dir_all(src.join("etc")).unwrap();
    fs::create_dir_all(src.join("media/stick")).unwrap();
    fs::create_dir_all(&dest).unwrap();
    fs::write(src.join("etc/hostname"), "pc1").unwrap();
    sh(Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(src.join("media/stick")));
    let result = std::panic::catch_unwind(|| {
        fs::write(src.join("media/stick/elsewhere"), "not the top layer's").unwrap();
        let stats = copy_tree(&src, &dest).unwrap();
        assert_eq!(fs::read_to_string(dest.join("etc/hostname")).unwrap(), "pc1");
        assert!(!dest.join("media/stick").exists(), "the mount's contents were copied");
        assert!(
            stats
                .warnings
                .iter()
                .any(|w| w.contains("media/stick") && w.contains("another filesystem")),
            "{:?}",
            stats.warnings
        );
    });
    let _ = Command::new("umount").arg(src.join("media/stick")).status();
    result.unwrap();
}
