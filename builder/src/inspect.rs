//! `layerboot inspect`: what a store holds, and what an image would boot.

use std::path::PathBuf;

use argh::FromArgs;
use layerboot_init::error::Result;
use layerboot_init::lookup::MergedView;
use layerboot_init::store::{Image, Store};
use serde_json::json;

#[derive(FromArgs)]
#[argh(subcommand, name = "inspect")]
/// list the images of a store, or show one image's layer stack and kernels
pub struct Args {
    /// the engine's data root, e.g. /var/lib/docker
    #[argh(option)]
    store: PathBuf,
    /// containerd stores: the namespace to look in (default: moby, then default, then the rest)
    #[argh(option)]
    namespace: Option<String>,
    /// print JSON instead of text
    #[argh(switch)]
    json: bool,
    /// image reference (name:tag, name@sha256:…, or image ID); omit to list all images
    #[argh(positional)]
    reference: Option<String>,
}

/// Kernel versions an image carries: `/lib/modules/<ver>` and `/boot/vmlinuz-<ver>`.
#[derive(serde::Serialize)]
pub struct Kernel {
    pub version: String,
    /// The kernel image inside the image, if there is one.
    pub vmlinuz: Option<String>,
    /// Whether `/lib/modules/<ver>/modules.dep` exists (modules can be packed).
    pub modules: bool,
}

/// A kernel version as kernels name themselves (`6.1.0-50-amd64`, `6.6.8-arch1-1`,
/// `5.15.0+rt~1`): the version goes into loader entries, file names and messages, so one
/// with other characters (a newline would add lines to the boot entry) is not a kernel.
pub fn plain_version(v: &str) -> bool {
    !v.is_empty() && v != "." && v != ".." && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"._+~-".contains(&b))
}

/// The kernels an image holds, by their plain versions (see [`plain_version`]).
pub fn kernels(view: &MergedView) -> Result<Vec<Kernel>> {
    let mut versions = std::collections::BTreeSet::new();
    for dir in ["/lib/modules", "/usr/lib/modules"] {
        versions.extend(view.read_dir(dir)?.unwrap_or_default());
    }
    for name in view.read_dir("/boot")?.unwrap_or_default() {
        if let Some(v) = name.strip_prefix("vmlinuz-") {
            versions.insert(v.to_string());
        }
    }
    let mut out = Vec::new();
    for version in versions.into_iter().filter(|v| plain_version(v)) {
        let vmlinuz = [
            format!("/boot/vmlinuz-{version}"),
            format!("/usr/lib/modules/{version}/vmlinuz"),
        ]
        .into_iter()
        .find(|p| matches!(view.lookup_follow(p), Ok(Some(e)) if e.metadata.is_file()));
        let modules = matches!(
            view.lookup_follow(&format!("/lib/modules/{version}/modules.dep")),
            Ok(Some(_))
        ) || matches!(
            view.lookup_follow(&format!("/usr/lib/modules/{version}/modules.dep")),
            Ok(Some(_))
        );
        out.push(Kernel {
            version,
            vmlinuz,
            modules,
        });
    }
    Ok(out)
}

pub fn run(args: Args) -> Result<()> {
    let store = Store::open(&args.store)?.with_namespace(args.namespace.clone());
    match &args.reference {
        Some(r) => show(&store, r, args.json),
        None => list(&store, args.json),
    }
}

fn short(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    &hex[..hex.len().min(12)]
}

fn list(store: &Store, as_json: bool) -> Result<()> {
    let mut rows = Vec::new();
    for entry in store.images()? {
        // A damaged image is listed with its error rather than hiding the rest.
        let (layers, kernels, error) = match store.load(&entry) {
            Ok(img) => (Some(img.layers.len()), kernels(&MergedView::new(&img))?, None),
            Err(e) => (None, Vec::new(), Some(e.to_string())),
        };
        rows.push((entry, layers, kernels, error));
    }
    if as_json {
        let v: Vec<_> = rows
            .iter()
            .map(|(e, layers, kernels, error)| {
                json!({"id": e.id, "refs": e.refs, "namespace": e.namespace, "driver": store.driver(), "layers": layers, "kernels": kernels, "error": error})
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"store": store.root(), "engine": store.engine(), "driver": store.driver(), "images": v})
            )
            .unwrap()
        );
        return Ok(());
    }
    println!(
        "store {} ({}, {} driver)",
        store.root().display(),
        store.engine().name,
        store.driver().name()
    );
    println!("{:<36} {:<12} {:>6}  KERNELS", "REFS", "IMAGE ID", "LAYERS");
    for (entry, layers, kernels, error) in rows {
        let mut refs = if entry.refs.is_empty() {
            "<none>".to_string()
        } else {
            entry.refs.join(", ")
        };
        if let Some(ns) = &entry.namespace {
            refs = format!("{ns}: {refs}");
        }
        let layers = layers.map_or("?".to_string(), |n| n.to_string());
        let kernels = match error {
            Some(e) => format!("ERROR: {e}"),
            None if kernels.is_empty() => "-".to_string(),
            None => kernels
                .iter()
                .map(|k| k.version.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        };
        println!("{refs:<36} {:<12} {layers:>6}  {kernels}", short(&entry.id));
    }
    Ok(())
}

fn show(store: &Store, reference: &str, as_json: bool) -> Result<()> {
    let img: Image = store.resolve(reference)?;
    let kernels = kernels(&MergedView::new(&img))?;
    if as_json {
        let v = json!({
            "store": store.root(), "engine": store.engine(), "namespace": img.namespace, "driver": img.driver, "id": img.id, "refs": img.refs,
            "layers": img.layers, "kernels": kernels,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap());
        return Ok(());
    }
    println!("image    {}", img.id);
    println!("refs     {}", img.refs.join(", "));
    if let Some(ns) = &img.namespace {
        println!("engine   {} (namespace {ns})", store.engine().name);
    }
    println!("driver   {}", img.driver.name());
    println!("layers   {} (topmost first)", img.layers.len());
    for l in &img.layers {
        println!("  {}  {}", short(&l.chain_id), l.dir.display());
    }
    if kernels.is_empty() {
        println!("kernels  none (the image cannot boot: install a kernel package such as linux-image-amd64)");
    }
    for k in &kernels {
        let vmlinuz = k.vmlinuz.as_deref().unwrap_or("no kernel image");
        let modules = if k.modules { "modules" } else { "no modules.dep" };
        println!("kernel   {}  {vmlinuz}, {modules}", k.version);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_version_with_odd_characters_is_no_kernel() {
        let t = tempfile::tempdir().unwrap();
        let boot = t.path().join("boot");
        std::fs::create_dir_all(&boot).unwrap();
        for v in ["6.1.0-50-amd64", "6.1.0\noptions systemd.debug_shell", "..", "a b", ""] {
            std::fs::write(boot.join(format!("vmlinuz-{v}")), "kernel").unwrap();
        }
        let view = MergedView::from_dirs(vec![t.path().to_path_buf()]);
        let found: Vec<String> = kernels(&view).unwrap().into_iter().map(|k| k.version).collect();
        assert_eq!(found, ["6.1.0-50-amd64"]);
        assert!(plain_version("6.6.8-arch1-1") && plain_version("5.15.0+rt~1"));
    }
}
