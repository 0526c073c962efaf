//! Overlay2 images' mount options: a usual image's layers by their full names relative to
//! the driver's home (no `link` files read); a many-layer one's by their short `l/`
//! links, so 130 layers fit in the one page mount(2) takes; beyond that the error says
//! why and what to do. Mounted for real (needs root).

use std::fs;
use std::path::Path;

use layerboot_init::mounts::{mount, unmount};
use layerboot_init::store::{Driver, Image, Layer};
use layerboot_init::writable::overlay_data;
use sys_mount::MountFlags;

/// A fake overlay2 driver home with `n` layers, each adding file `f<i>`, topmost first.
fn image_with_layers(home: &Path, n: usize, links: bool) -> Image {
    let mut layers = Vec::new();
    fs::create_dir_all(home.join("l")).unwrap();
    for i in (0..n).rev() {
        let cache_id = format!("{i:064x}");
        let diff = home.join(&cache_id).join("diff");
        fs::create_dir_all(&diff).unwrap();
        fs::write(diff.join(format!("f{i}")), i.to_string()).unwrap();
        let link = format!("{:0>26}", format!("L{i}"));
        std::os::unix::fs::symlink(format!("../{cache_id}/diff"), home.join("l").join(&link)).unwrap();
        if links {
            fs::write(home.join(&cache_id).join("link"), &link).unwrap();
        }
        layers.push(Layer {
            chain_id: String::new(),
            diff_id: String::new(),
            cache_id,
            dir: diff,
        });
    }
    Image {
        id: format!("sha256:{}", "b".repeat(64)),
        driver: Driver::Overlay2,
        layers,
        refs: vec![],
        namespace: None,
    }
}

/// Mounts `data` (relative to `home`) at `target`; the files seen there, and `f<top>`'s text.
fn mount_and_look(home: &Path, target: &Path, data: &str, top: usize) -> (usize, String) {
    // The working directory is the process's: one test's mount at a time.
    static CWD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = CWD.lock().unwrap_or_else(|e| e.into_inner());
    let cwd = std::env::current_dir().unwrap();
    std::env::set_current_dir(home).unwrap();
    let mounted = mount(Path::new("overlay"), target, "overlay", MountFlags::empty(), data);
    std::env::set_current_dir(cwd).unwrap();
    mounted.unwrap();
    let files = fs::read_dir(target).unwrap().count();
    let text = fs::read_to_string(target.join(format!("f{top}"))).unwrap();
    unmount(target).unwrap();
    (files, text)
}

#[test]
fn a_usual_image_is_mounted_by_full_names_without_reading_its_links() {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("overlay2");
    let img = image_with_layers(&home, 7, true);
    // A damaged link file would be refused if read; it is not needed at all.
    fs::write(home.join(&img.layers[0].cache_id).join("link"), "../../etc").unwrap();
    let rw = t.path().join("layerboot-rw");
    fs::create_dir_all(rw.join("upper")).unwrap();
    fs::create_dir_all(rw.join("work")).unwrap();
    let data = overlay_data(&img, &home, &rw.join("upper"), &rw.join("work")).unwrap();
    // (The upper dir's absolute path may hold "l/" itself: a temporary name ending in l.)
    let lower = data.split(',').find_map(|o| o.strip_prefix("lowerdir=")).unwrap();
    assert!(
        lower.starts_with(&format!("{}/diff:", img.layers[0].cache_id))
            && !lower.split(':').any(|d| d.starts_with("l/")),
        "{data}"
    );
    assert_eq!(
        mount_and_look(&home, &t.path().join("root"), &data, 6),
        (7, "6".to_string())
    );
}

#[test]
fn a_130_layer_image_mounts_and_a_longer_one_is_refused_clearly() {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("overlay2");
    let img = image_with_layers(&home, 130, true);
    let rw = t.path().join("layerboot-rw");
    fs::create_dir_all(rw.join("upper")).unwrap();
    fs::create_dir_all(rw.join("work")).unwrap();
    let data = overlay_data(&img, &home, &rw.join("upper"), &rw.join("work")).unwrap();
    assert!(
        data.len() < 4096 && data.starts_with("lowerdir=l/"),
        "{} bytes",
        data.len()
    );

    assert_eq!(
        mount_and_look(&home, &t.path().join("root"), &data, 129),
        (130, "129".to_string())
    );

    // Without the short links (a damaged store) the names are too long for one page.
    let img = image_with_layers(&t.path().join("other"), 130, false);
    let e = overlay_data(&img, &home, &rw.join("upper"), &rw.join("work"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("130 layers") && e.contains("exceed the kernel's limit of 4096") && e.contains("squash"),
        "{e}"
    );
}
