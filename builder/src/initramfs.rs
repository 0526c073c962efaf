//! `layerboot initramfs`: packs `/init`, its config and the image's own kernel modules
//! into a compressed newc cpio, so kernel, initramfs modules and the booted /lib/modules
//! always match.

use std::path::{Path, PathBuf};

use argh::FromArgs;
use layerboot_init::settings::{
    arg, legacy_image, Config, CONFIG_PATH, DEFAULT_DOCKER_PATH, DEFAULT_INIT, LEGACY_CONFIG_PATH,
};

use crate::archive::{compress, Compression, Tree};
use crate::image::{write_atomically, SourceImage};
use crate::modules::{self, read_index};
use layerboot_init::error::{Error, Result};
use layerboot_init::kmod::{compile_aliases, COMPILED_ALIAS};

#[derive(FromArgs)]
#[argh(subcommand, name = "initramfs")]
/// build the initramfs that boots images from their store
pub struct Args {
    /// the engine's data root holding --image, e.g. /var/lib/docker
    #[argh(option)]
    store: Option<PathBuf>,
    /// containerd stores: the namespace to look in (default: moby, then default, then the rest)
    #[argh(option)]
    namespace: Option<String>,
    /// image whose kernel modules are packed (with --store), and the default image to boot
    #[argh(option)]
    image: Option<String>,
    /// take the kernel modules from this unpacked root filesystem instead (`/` works)
    #[argh(option)]
    rootfs: Option<PathBuf>,
    /// kernel version, if the source has several (default: the newest)
    #[argh(option)]
    kver: Option<String>,
    /// also pack this module and its dependencies (repeatable)
    #[argh(option)]
    module: Vec<String>,
    /// pack only the drivers this machine's devices and mounted filesystems need
    #[argh(switch)]
    host_only: bool,
    /// pack this static shell as /bin/sh, for layerboot.rescue=shell
    #[argh(option)]
    rescue_shell: Option<PathBuf>,
    /// zstd (default: each module its own zstd frame, decompressed only if loaded), gzip
    /// (the whole archive) or none
    #[argh(option, default = "Compression::Zstd")]
    compress: Compression,
    /// print what went in
    #[argh(switch)]
    list: bool,
    /// the /init program to pack (default: layerboot-init beside this program, or in ../lib/layerboot/)
    #[argh(option)]
    init: Option<PathBuf>,
    /// the image's init, checked to exist (default /sbin/init; baked as init=)
    #[argh(option)]
    image_init: Option<String>,
    /// default docker_path= (the data root on the booted machine's root partition)
    #[argh(option)]
    docker_path: Option<String>,
    /// default layerboot.rw= (the writable layer's name)
    #[argh(option)]
    rw_name: Option<String>,
    /// default root=
    #[argh(option)]
    root: Option<String>,
    /// default toplayer=
    #[argh(option)]
    toplayer: Option<String>,
    /// default toplayer_path=
    #[argh(option)]
    toplayer_path: Option<String>,
    /// output file, written atomically
    #[argh(option, short = 'o')]
    output: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let src = match (&args.store, &args.rootfs, &args.image) {
        (Some(store), None, Some(image)) => SourceImage::open(store, image, args.namespace.as_deref())?,
        (None, Some(dir), _) => SourceImage::rootfs(dir)?,
        (Some(_), None, None) => return Err("--store needs --image: which image's kernel modules to pack".into()),
        (Some(_), Some(_), _) => return Err("give either --store with --image, or --rootfs, not both".into()),
        (None, None, _) => {
            return Err("where are the kernel modules? give --store DATA_ROOT --image REF, or --rootfs DIR".into())
        }
    };
    let kernel = src.kernel(args.kver.as_deref(), |k| k.modules)?;
    let kver = kernel.version.clone();
    let image_init = args.image_init.clone().unwrap_or_else(|| DEFAULT_INIT.to_string());
    if args.store.is_some() && src.view.lookup_follow(&image_init)?.is_none() {
        return Err(format!(
            "{} has no {image_init}, so it cannot boot: install an init system in it (systemd-sysv on Debian and Ubuntu, openrc on Alpine), or name its init with --image-init",
            src.name
        ).into());
    }
    let init_path = match &args.init {
        Some(p) => p.clone(),
        None => default_init()?,
    };
    let init = read_static(
        &init_path,
        "the /init program",
        "install the layerboot package, or `cargo build --release` builds it beside layerboot, or pass --init PATH",
    )?;

    // The modules directory as the image names it (/lib/modules may be a link to /usr/lib/modules).
    let modules_dir = ["/lib/modules", "/usr/lib/modules"]
        .iter()
        .map(|d| format!("{d}/{kver}"))
        .find(|d| matches!(src.view.lookup_follow(&format!("{d}/modules.dep")), Ok(Some(_))))
        .ok_or_else(|| format!("{} has no modules.dep for kernel {kver}", src.name))?;
    let mut notes = Vec::new();
    let own = source_config(&src, &mut notes)?;
    let wanted: Vec<String> = args.module.iter().chain(&own.modules).cloned().collect();
    let index = read_index(&src, &modules_dir)?;
    let (steps, select_notes) = modules::select(&index, &kver, &wanted, args.host_only)?;
    notes.extend(select_notes);
    let mut packed = modules::pack(&src, &index, &modules_dir, &kver, &steps)?;
    let unpacked_modules: usize = packed.modules.iter().map(|m| m.data.len()).sum();
    if args.compress == Compression::Zstd {
        packed = packed.compress_each_module()?;
    }
    notes.extend(packed.notes.iter().cloned());

    let mut tree = Tree::default();
    for d in ["dev", "etc", "proc", "run", "sys", "sysroot"] {
        tree.dir(d);
    }
    tree.char_dev("dev/console", 5, 1, 0o600);
    tree.file("init", init, 0o755);
    tree.file("etc/initrd-release", initrd_release().into_bytes(), 0o644);
    let mut config = config_for(&args, own, &kver, &image_init, &mut notes);
    config.walk_acpi_bus = Some(packed.drives_acpi_objects);
    tree.file(
        "etc/layerboot.json",
        (serde_json::to_string_pretty(&config).unwrap() + "\n").into_bytes(),
        0o644,
    );
    if let Some(shell) = &args.rescue_shell {
        let sh = read_static(
            shell,
            "the rescue shell",
            "use a static shell, e.g. /bin/busybox from busybox-static",
        )?;
        tree.file("bin/sh", sh, 0o755);
    }
    let packed_dir = format!("lib/modules/{kver}");
    for m in &packed.modules {
        tree.file(&format!("{packed_dir}/{}", m.path), m.data.clone(), 0o644);
    }
    for (file, text) in &packed.index_files {
        // modules.alias goes in compiled: /init then reads it without scanning its text.
        let (file, bytes) = match *file {
            "modules.alias" => (COMPILED_ALIAS, compile_aliases(text)),
            _ => (*file, text.clone().into_bytes()),
        };
        tree.file(&format!("{packed_dir}/{file}"), bytes, 0o644);
    }
    for (path, bytes) in &packed.firmware {
        tree.file(path, bytes.clone(), 0o644);
    }

    if args.list {
        for (path, size) in tree.listing() {
            println!("{size:>10}  {path}");
        }
    }
    let mtime = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => v
            .parse()
            .map_err(|_| format!("SOURCE_DATE_EPOCH={v} is not a number of seconds"))?,
        Err(_) => 0,
    };
    let archive = tree.cpio(mtime).map_err(|e| format!("cannot build the archive: {e}"))?;
    let unpacked_len = archive.len();
    let compressed = compress(archive, args.compress).map_err(|e| format!("cannot compress the archive: {e}"))?;
    write_atomically(&args.output, &compressed, 0o644)?;
    for n in notes {
        eprintln!("note: {n}");
    }
    eprintln!(
        "{}: kernel {kver}, {} modules ({} KiB), {} firmware files, {} KiB ({} KiB unpacked){}",
        args.output.display(),
        packed.modules.len(),
        unpacked_modules / 1024,
        packed.firmware.len(),
        compressed.len() / 1024,
        unpacked_len / 1024,
        config
            .defaults
            .get(arg::DOCKER_IMAGE)
            .map(|i| format!(", default image {i}"))
            .unwrap_or_default()
    );
    Ok(())
}

/// The largest `/etc/layerboot.json` or `/etc/docker-btrfs.json` read from a source.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The defaults a source carries for its own boot: its `/etc/layerboot.json` (what the
/// distro hooks pack too), and for mkinitcpio-docker-hooks' users the image their
/// `/etc/docker-btrfs.json` names. Each one taken is said in a note.
fn source_config(src: &SourceImage, notes: &mut Vec<String>) -> Result<Config> {
    let mut config = match src.read_config(CONFIG_PATH, MAX_CONFIG_BYTES)? {
        Some(bytes) => {
            let config: Config = serde_json::from_slice(&bytes).map_err(|e| {
                format!(
                    "{CONFIG_PATH} of {} is invalid: {e} (fix: it holds {{\"defaults\": {{\"docker_image\": \"NAME:TAG\", …}}, \"modules\": […]}})",
                    src.name
                )
            })?;
            let taken: Vec<String> = config.defaults.iter().map(|(k, v)| format!("{k}={v}")).collect();
            notes.push(format!(
                "defaults from {CONFIG_PATH} of {}: {}{}",
                src.name,
                taken.join(" "),
                if config.modules.is_empty() {
                    String::new()
                } else {
                    format!(", modules {}", config.modules.join(","))
                }
            ));
            config
        }
        None => Config::default(),
    };
    if let Some(bytes) = src.read_config(LEGACY_CONFIG_PATH, MAX_CONFIG_BYTES)? {
        let image = legacy_image(&String::from_utf8_lossy(&bytes)).map_err(|e| format!("{}: {e}", src.name))?;
        match (config.adopt_legacy_image(image.clone()), image) {
            (Some(taken), _) => notes.push(format!(
                "default image {taken}, from {LEGACY_CONFIG_PATH} of {} (mkinitcpio-docker-hooks' config)",
                src.name
            )),
            (None, Some(ignored)) => notes.push(format!(
                "{LEGACY_CONFIG_PATH} of {} names {ignored}; {CONFIG_PATH} names the image, so it wins",
                src.name
            )),
            (None, None) => {}
        }
    }
    Ok(config)
}

/// The builder's options become the defaults of the kernel arguments they name, over
/// those the source carries (`own`).
fn config_for(args: &Args, own: Config, kver: &str, image_init: &str, notes: &mut Vec<String>) -> Config {
    let mut defaults = own.defaults;
    if let Some(image) = &args.image {
        if defaults.get(arg::DOCKER_IMAGE).is_some_and(|old| old != image) {
            notes.push(format!(
                "--image {image} is the default image, not the {} its own config names",
                defaults[arg::DOCKER_IMAGE]
            ));
        }
    }
    let docker_path = args
        .docker_path
        .clone()
        .or_else(|| defaults.get(arg::DOCKER_PATH).cloned())
        .unwrap_or_else(|| DEFAULT_DOCKER_PATH.to_string())
        .trim_matches('/')
        .to_string();
    let mut set = |k: &str, v: &Option<String>| {
        if let Some(v) = v {
            defaults.insert(k.to_string(), v.clone());
        }
    };
    set(arg::DOCKER_IMAGE, &args.image);
    set(arg::DOCKER_PATH, &Some(docker_path));
    set(arg::RW, &args.rw_name);
    set(arg::NAMESPACE, &args.namespace);
    set(arg::ROOT, &args.root);
    set(arg::TOPLAYER, &args.toplayer);
    set(arg::TOPLAYER_PATH, &args.toplayer_path);
    if image_init != DEFAULT_INIT {
        defaults.insert(arg::INIT.into(), image_init.to_string());
    }
    Config {
        kernel: Some(kver.to_string()),
        modules: own.modules,
        defaults,
        walk_acpi_bus: None,
    }
}

/// layerboot-init where it is installed: beside this program (a cargo build), or in
/// `../lib/layerboot/` (the packages: /usr/bin/layerboot, /usr/lib/layerboot/layerboot-init).
fn default_init() -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(|e| Error::os("cannot find this program's own path", e))?;
    let beside = exe.with_file_name("layerboot-init");
    let packaged = exe
        .parent()
        .and_then(Path::parent)
        .map(|prefix| prefix.join("lib/layerboot/layerboot-init"));
    Ok(packaged.filter(|p| !beside.exists() && p.exists()).unwrap_or(beside))
}

/// Reads a program that must run without a dynamic loader (there is none in the initramfs).
fn read_static(path: &Path, what: &str, fix: &str) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e} (fix: {fix})", path.display()))?;
    let elf =
        goblin::elf::Elf::parse(&bytes).map_err(|e| format!("{what} {} is not an ELF program: {e}", path.display()))?;
    if let Some(interp) = elf.interpreter {
        return Err(format!(
            "{what} {} is dynamically linked (it asks for {interp}); it must be static (fix: {fix})",
            path.display()
        )
        .into());
    }
    Ok(bytes)
}

/// systemd's convention: /etc/initrd-release marks an initrd.
fn initrd_release() -> String {
    format!(
        "NAME=\"layerboot\"\nID=layerboot\nVERSION_ID={}\nPRETTY_NAME=\"layerboot initramfs\"\n",
        env!("CARGO_PKG_VERSION")
    )
}
