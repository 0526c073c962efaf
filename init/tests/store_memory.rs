//! What reading a store costs in memory, at the size bounds a store file may reach. Its
//! own test binary: the peak it reads (VmHWM) is the whole process's, and unit tests
//! beside it would move it.

use std::fs;

use layerboot_init::digest::sha256_of;
use layerboot_init::store::Store;

/// The process's peak resident memory, in bytes.
fn peak() -> u64 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib << 10
}

#[test]
fn an_image_config_costs_about_its_size_whatever_it_holds() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    // 8 MiB of tiny objects beside the diff IDs: each would be a whole map if built.
    let n = (8 << 20) / 7;
    let mut config = String::from(r#"{"rootfs":{"type":"layers","diff_ids":[]},"x":["#);
    for i in 0..n {
        config.push_str(if i == 0 { r#"{"":0}"# } else { r#",{"":0}"# });
    }
    config.push_str("]}");
    let id = sha256_of(config.as_bytes());
    let images = root.join("image/btrfs/imagedb/content/sha256");
    fs::create_dir_all(&images).unwrap();
    fs::write(images.join(&id), &config).unwrap();
    fs::write(root.join("image/btrfs/repositories.json"), r#"{"Repositories":{}}"#).unwrap();
    let size = config.len() as u64;
    drop(config);
    let before = peak();
    let _ = Store::open(root).unwrap().resolve(&format!("sha256:{id}"));
    let grown = peak().saturating_sub(before);
    assert!(
        grown < 4 * size,
        "reading a {} MiB config took {} MiB more",
        size >> 20,
        grown >> 20
    );
}
