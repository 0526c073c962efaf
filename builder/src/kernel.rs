//! `layerboot kernel`: copies the image's own kernel out, for the boot loader.

use std::path::PathBuf;

use argh::FromArgs;

use crate::image::{write_atomically, SourceImage};
use layerboot_init::error::{Error, Result};

#[derive(FromArgs)]
#[argh(subcommand, name = "kernel")]
/// copy the image's kernel to DIR as vmlinuz-<version>
pub struct Args {
    /// the engine's data root, e.g. /var/lib/docker
    #[argh(option)]
    store: PathBuf,
    /// containerd stores: the namespace to look in (default: moby, then default, then the rest)
    #[argh(option)]
    namespace: Option<String>,
    /// image reference
    #[argh(option)]
    image: String,
    /// kernel version, if the image has several
    #[argh(option)]
    kver: Option<String>,
    /// output directory (created if needed)
    #[argh(option, short = 'o')]
    output: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let src = SourceImage::open(&args.store, &args.image, args.namespace.as_deref())?;
    let kernel = src.kernel(args.kver.as_deref(), |k| k.vmlinuz.is_some())?;
    let path = kernel.vmlinuz.as_deref().unwrap_or_default();
    let data = src.read(path)?.ok_or_else(|| format!("the image has no {path}"))?;
    std::fs::create_dir_all(&args.output).map_err(|e| Error::io("cannot create", &args.output, e))?;
    let dest = args.output.join(format!("vmlinuz-{}", kernel.version));
    write_atomically(&dest, &data, 0o644)?;
    println!("{}", dest.display());
    Ok(())
}
