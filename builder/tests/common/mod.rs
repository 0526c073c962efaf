//! What the builder's integration tests share: the fixture stores tests/run builds and
//! mounts, their image IDs, and the `layerboot` binary run as a user runs it.
// Each test file uses its own part of these.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

pub fn fixtures() -> PathBuf {
    std::env::var_os("LAYERBOOT_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/fixtures"))
}

/// An image ID the fixture script recorded (`DEMO_ID`, `DEMO_V2_ID`, …).
pub fn image_id(key: &str) -> String {
    let env = std::fs::read_to_string(fixtures().join("images.env")).unwrap();
    env.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap()
        .to_string()
}

pub fn layerboot(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_layerboot"))
        .args(args)
        .output()
        .unwrap()
}

/// The standard output of a run that must succeed.
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The standard error of a run that must fail.
pub fn err(out: Output) -> String {
    assert!(
        !out.status.success(),
        "expected a failure: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}
