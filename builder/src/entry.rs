//! `layerboot entry`: boot menu entries carrying layerboot's kernel arguments, one per
//! image (a fleet's menu): systemd-boot (Boot Loader Specification type 1), GRUB and
//! rEFInd (the stanza mkinitcpio-docker-hooks users have).

use std::path::PathBuf;

use argh::FromArgs;

use crate::image::write_atomically;
use layerboot_init::error::{Error, Result};
use layerboot_init::settings::arg;

#[derive(FromArgs)]
#[argh(subcommand, name = "entry")]
/// print or write boot loader entries that boot images from their store
pub struct Args {
    /// systemd-boot, grub or refind
    #[argh(option)]
    loader: Loader,
    /// image to boot (repeatable: one entry each)
    #[argh(option)]
    image: Vec<String>,
    /// the kernel as the loader sees it, e.g. /layerboot/vmlinuz-6.1.0-50-amd64
    #[argh(option)]
    kernel: String,
    /// the initramfs as the loader sees it, e.g. /layerboot/initramfs.img
    #[argh(option)]
    initrd: String,
    /// root= (the store partition), e.g. LABEL=store
    #[argh(option)]
    root: String,
    /// rootflags=
    #[argh(option)]
    rootflags: Option<String>,
    /// docker_path=
    #[argh(option)]
    docker_path: Option<String>,
    /// toplayer=
    #[argh(option)]
    toplayer: Option<String>,
    /// toplayer_path=
    #[argh(option)]
    toplayer_path: Option<String>,
    /// toplayerflags=
    #[argh(option)]
    toplayerflags: Option<String>,
    /// layerboot.namespace= (containerd stores)
    #[argh(option)]
    namespace: Option<String>,
    /// layerboot.rw= (the writable layer's name)
    #[argh(option)]
    rw: Option<String>,
    /// more kernel arguments, e.g. "console=ttyS0 quiet"
    #[argh(option)]
    options: Option<String>,
    /// rEFInd: the volume (label) holding kernel and initramfs
    #[argh(option)]
    volume: Option<String>,
    /// systemd-boot: a directory for one .conf per image; grub, refind: a file
    #[argh(option, short = 'o')]
    output: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Loader {
    SystemdBoot,
    Grub,
    Refind,
}

impl std::str::FromStr for Loader {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "systemd-boot" => Ok(Loader::SystemdBoot),
            "grub" => Ok(Loader::Grub),
            "refind" => Ok(Loader::Refind),
            _ => Err(format!("unknown loader '{s}': use systemd-boot, grub or refind")),
        }
    }
}

/// The kernel command line for one image.
fn options(a: &Args, image: &str) -> Result<String> {
    let mut o = vec![format!("{}={}", arg::ROOT, a.root), "rw".to_string()];
    let mut push = |k: &str, v: &Option<String>| -> Result<()> {
        if let Some(v) = v {
            if v.contains(char::is_whitespace) || v.contains('"') {
                return Err(format!(
                    "--{} '{v}' contains spaces or quotes, which a kernel argument cannot",
                    k.replace('_', "-")
                )
                .into());
            }
            o.push(format!("{k}={v}"));
        }
        Ok(())
    };
    push(arg::ROOT_FLAGS, &a.rootflags)?;
    push(arg::DOCKER_PATH, &a.docker_path)?;
    push(arg::DOCKER_IMAGE, &Some(image.to_string()))?;
    push(arg::TOPLAYER, &a.toplayer)?;
    push(arg::TOPLAYER_PATH, &a.toplayer_path)?;
    push(arg::TOPLAYER_FLAGS, &a.toplayerflags)?;
    push(arg::NAMESPACE, &a.namespace)?;
    push(arg::RW, &a.rw)?;
    if let Some(extra) = &a.options {
        o.push(extra.clone());
    }
    Ok(o.join(" "))
}

/// A file-name-safe form of an image reference: `layerboot/demo:v2` → `layerboot-demo-v2`.
fn slug(image: &str) -> String {
    image
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '-' })
        .collect()
}

/// (file name for systemd-boot, text) per image.
pub fn render(a: &Args) -> Result<Vec<(String, String)>> {
    if a.image.is_empty() {
        return Err("no --image given: name at least one image to make an entry for".into());
    }
    let mut out = Vec::new();
    for image in &a.image {
        let opts = options(a, image)?;
        let title = format!("layerboot: {image}");
        let text = match a.loader {
            Loader::SystemdBoot => {
                format!(
                    "title {title}\nlinux {}\ninitrd {}\noptions {opts}\n",
                    a.kernel, a.initrd
                )
            }
            Loader::Grub => format!(
                "menuentry '{}' {{\n\tlinux {} {opts}\n\tinitrd {}\n}}\n",
                title.replace('\'', "'\\''"),
                a.kernel,
                a.initrd
            ),
            Loader::Refind => {
                let volume = a.volume.as_ref().map(|v| format!("\tvolume {v}\n")).unwrap_or_default();
                format!(
                    "menuentry \"{title}\" {{\n{volume}\tloader {}\n\tinitrd {}\n\toptions \"{opts}\"\n}}\n",
                    a.kernel, a.initrd
                )
            }
        };
        out.push((format!("layerboot-{}.conf", slug(image)), text));
    }
    Ok(out)
}

pub fn run(a: Args) -> Result<()> {
    let entries = render(&a)?;
    match (&a.output, a.loader) {
        (None, _) => {
            for (_, text) in &entries {
                println!("{text}");
            }
        }
        (Some(dir), Loader::SystemdBoot) => {
            std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create", dir, e))?;
            for (name, text) in &entries {
                write_atomically(&dir.join(name), text.as_bytes(), 0o644)?;
                println!("{}", dir.join(name).display());
            }
        }
        (Some(file), _) => {
            let all: Vec<&str> = entries.iter().map(|(_, t)| t.as_str()).collect();
            write_atomically(file, all.join("\n").as_bytes(), 0o644)?;
            println!("{}", file.display());
        }
    }
    Ok(())
}
