//! `layerboot initramfs`: packs `/init`, its config and the image's own kernel modules
//! into a zstd-compressed newc cpio, so kernel, initramfs modules and the booted
//! /lib/modules always match.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use argh::FromArgs;
use layerboot_init::kmod::{ModuleIndex, INDEX_FILES};
use layerboot_init::settings::{Config, DEFAULT_DOCKER_PATH};

use crate::image::{write_atomically, SourceImage};

/// Drivers that find the disk on common PCs and VMs; /init loads those its devices' modaliases ask for.
pub const STORAGE_DRIVERS: [&str; 6] = ["virtio_pci", "virtio_blk", "virtio_scsi", "ahci", "nvme", "sd_mod"];
/// Filesystems the store and the new root may need; loaded on demand.
pub const FILESYSTEMS: [&str; 3] = ["btrfs", "overlay", "ext4"];

const ZSTD_LEVEL: i32 = 12;

#[derive(FromArgs)]
#[argh(subcommand, name = "initramfs")]
/// build the initramfs that boots IMAGE from its store
pub struct Args {
    /// the engine's data root, e.g. /var/lib/docker
    #[argh(option)]
    store: PathBuf,
    /// image reference: whose kernel modules to pack, and the default image to boot
    #[argh(option)]
    image: String,
    /// kernel version, if the image has several (default: the newest)
    #[argh(option)]
    kver: Option<String>,
    /// the /init to pack (default: layerboot-init beside this program)
    #[argh(option)]
    init: Option<PathBuf>,
    /// the data root's path on the booted machine's root partition (default var/lib/docker)
    #[argh(option, default = "DEFAULT_DOCKER_PATH.to_string()")]
    docker_path: String,
    /// output file, written atomically
    #[argh(option, short = 'o')]
    output: PathBuf,
}

/// One file of the archive.
enum Node {
    Dir,
    File { data: Vec<u8>, mode: u32 },
    CharDev { major: u32, minor: u32, mode: u32 },
}

pub fn run(args: Args) -> Result<(), String> {
    let src = SourceImage::open(&args.store, &args.image)?;
    let kernel = src.kernel(&args.image, args.kver.as_deref(), |k| k.modules)?;
    let kver = kernel.version.clone();
    let init = match &args.init {
        Some(p) => p.clone(),
        None => std::env::current_exe().map_err(|e| e.to_string())?.with_file_name("layerboot-init"),
    };
    let init_bytes = std::fs::read(&init)
        .map_err(|e| format!("cannot read the /init program {}: {e} (fix: `cargo build --release` builds it beside layerboot, or pass --init PATH)", init.display()))?;
    check_static(&init, &init_bytes)?;

    let modules_dir = format!("/lib/modules/{kver}");
    let mut read_index = BTreeMap::new();
    for f in INDEX_FILES {
        let text = match src.view.lookup_follow(&format!("{modules_dir}/{f}")).map_err(|e| e.to_string())? {
            Some(e) => std::fs::read_to_string(&e.host_path).map_err(|err| format!("cannot read {}: {err}", e.host_path.display()))?,
            None if f == "modules.dep" => return Err(format!("image {} has no {modules_dir}/modules.dep (run depmod in the image)", args.image)),
            None => String::new(),
        };
        read_index.insert(f, text);
    }
    let index = ModuleIndex::parse(&read_index["modules.dep"], &read_index["modules.softdep"], &read_index["modules.alias"], &read_index["modules.builtin"]);

    let mut wanted: Vec<String> = Vec::new();
    for m in STORAGE_DRIVERS.iter().chain(FILESYSTEMS.iter()) {
        if index.resolve(m).is_empty() && !index.is_builtin(m) {
            eprintln!("note: kernel {kver} has no module {m}; leaving it out");
            continue;
        }
        wanted.push(m.to_string());
    }
    let order = index.load_order(&wanted).map_err(|e| e.to_string())?;

    let mut tree: BTreeMap<String, Node> = BTreeMap::new();
    for d in ["dev", "etc", "proc", "run", "sys", "sysroot"] {
        tree.insert(d.to_string(), Node::Dir);
    }
    tree.insert("dev/console".into(), Node::CharDev { major: 5, minor: 1, mode: 0o600 });
    tree.insert("init".into(), Node::File { data: init_bytes, mode: 0o755 });
    tree.insert("etc/initrd-release".into(), Node::File { data: initrd_release().into_bytes(), mode: 0o644 });
    let config = Config {
        kernel: Some(kver.clone()),
        modules: Vec::new(),
        defaults: BTreeMap::from([
            ("docker_image".to_string(), args.image.clone()),
            ("docker_path".to_string(), args.docker_path.trim_matches('/').to_string()),
        ]),
    };
    let config_json = serde_json::to_string_pretty(&config).unwrap() + "\n";
    tree.insert("etc/layerboot.json".into(), Node::File { data: config_json.into_bytes(), mode: 0o644 });

    let packed_dir = format!("lib/modules/{kver}");
    let mut names = BTreeSet::new();
    for step in &order {
        let data = std::fs::read(src.host_path(&format!("{modules_dir}/{}", step.path))?).map_err(|e| e.to_string())?;
        if step.path.ends_with(".xz") || step.path.ends_with(".zst") || step.path.ends_with(".gz") {
            return Err(format!("module {} is compressed ({}); compressed modules are not supported yet", step.name, step.path));
        }
        tree.insert(format!("{packed_dir}/{}", step.path), Node::File { data, mode: 0o644 });
        names.insert(step.name.clone());
    }
    for (file, text) in index.render(&names) {
        tree.insert(format!("{packed_dir}/{file}"), Node::File { data: text.into_bytes(), mode: 0o644 });
    }
    add_parent_dirs(&mut tree);

    let mtime = std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let archive = write_cpio(&tree, mtime).map_err(|e| format!("cannot build the archive: {e}"))?;
    let compressed = zstd::bulk::compress(&archive, ZSTD_LEVEL).map_err(|e| format!("zstd: {e}"))?;
    write_atomically(&args.output, &compressed, 0o644)?;
    eprintln!(
        "{}: kernel {kver}, {} modules, {} KiB ({} KiB unpacked), default image {}",
        args.output.display(),
        names.len(),
        compressed.len() / 1024,
        archive.len() / 1024,
        args.image
    );
    Ok(())
}

/// The kernel cannot run a dynamically linked /init: there is no loader in the initramfs.
fn check_static(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let elf = goblin::elf::Elf::parse(bytes).map_err(|e| format!("{} is not an ELF program: {e}", path.display()))?;
    if elf.interpreter.is_some() {
        return Err(format!(
            "{} is dynamically linked (it asks for {}); the /init must be static (fix: cargo build --release, which targets musl)",
            path.display(),
            elf.interpreter.unwrap_or_default()
        ));
    }
    Ok(())
}

/// systemd's convention: /etc/initrd-release marks an initrd.
fn initrd_release() -> String {
    format!("NAME=\"layerboot\"\nID=layerboot\nVERSION_ID={}\nPRETTY_NAME=\"layerboot initramfs\"\n", env!("CARGO_PKG_VERSION"))
}

fn add_parent_dirs(tree: &mut BTreeMap<String, Node>) {
    let parents: BTreeSet<String> = tree
        .keys()
        .flat_map(|p| {
            let parts: Vec<&str> = p.split('/').collect();
            (1..parts.len()).map(move |i| parts[..i].join("/"))
        })
        .collect();
    for p in parents {
        tree.entry(p).or_insert(Node::Dir);
    }
}

/// A newc archive, entries in path order (parents first), owner 0, one mtime: the same
/// inputs give the same bytes.
fn write_cpio(tree: &BTreeMap<String, Node>, mtime: u32) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    for (ino, (path, node)) in tree.iter().enumerate() {
        let b = cpio::newc::Builder::new(path).ino(ino as u32 + 1).uid(0).gid(0).mtime(mtime);
        out = match node {
            Node::Dir => b.mode(0o040755).nlink(2).write(out, 0).finish()?,
            Node::File { data, mode } => {
                let mut w = b.mode(0o100000 | mode).nlink(1).write(out, data.len() as u32);
                w.write_all(data)?;
                w.finish()?
            }
            Node::CharDev { major, minor, mode } => {
                b.mode(0o020000 | mode).nlink(1).rdev_major(*major).rdev_minor(*minor).write(out, 0).finish()?
            }
        };
    }
    cpio::newc::trailer(out)
}
