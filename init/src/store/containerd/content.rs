//! containerd's content store: blobs by digest, each verified before it is parsed, and
//! the walk from an image record's index or manifest to its config.

use serde::Deserialize;

use super::{Containerd, Record, BLOBS};
use crate::digest::{sha256_hex, sha256_of};
use crate::error::{Error, Result};
use crate::store::read;

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Deserialize)]
struct IndexOrManifest {
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
}

/// GOARCH of the machine layerboot runs on: the platform an index is resolved for.
fn goarch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

impl Containerd<'_> {
    /// A blob of the content store, verified against its digest.
    pub(super) fn blob(&self, digest: &str, what: &str) -> Result<Vec<u8>> {
        let hex = sha256_hex(digest).ok_or_else(|| {
            Error::new(format!(
                "{what} digest '{digest}' is malformed: expected sha256:<64 lowercase hex>"
            ))
        })?;
        let path = self.root.join(BLOBS).join(hex);
        if !path.is_file() {
            return Err(Error::new(format!(
                "the {what} {digest} is missing from the content store: {} does not exist \
                 (the image was only partly pulled; fix: pull the image again)",
                path.display()
            )));
        }
        let data = read(&path)?;
        if sha256_of(&data) != hex {
            return Err(Error::new(format!(
                "blob {} is corrupt: its sha256 is not its name (fix: pull the image again)",
                path.display()
            )));
        }
        Ok(data)
    }

    /// The image config of `record` (its digest and bytes): through an index (this machine's platform, present
    /// locally, no attestations) and a manifest.
    pub(super) fn config_of(&self, record: &Record) -> Result<(String, Vec<u8>)> {
        let mut digest = record.digest.clone();
        for _ in 0..4 {
            let data = self.blob(&digest, "manifest")?;
            let doc: IndexOrManifest = serde_json::from_slice(&data)
                .map_err(|e| Error::new(format!("manifest {digest} of {} is not valid JSON: {e}", record.name)))?;
            if let Some(config) = doc.config {
                let data = self.blob(&config.digest, "image config")?;
                return Ok((config.digest, data));
            }
            let manifests = doc.manifests.unwrap_or_default();
            let arch = goarch();
            let pick = manifests.iter().find(|m| {
                let attestation = m
                    .annotations
                    .get("vnd.docker.reference.type")
                    .is_some_and(|t| t == "attestation-manifest");
                let present = sha256_hex(&m.digest).is_some_and(|h| self.root.join(BLOBS).join(h).is_file());
                !attestation
                    && present
                    && m.platform
                        .as_ref()
                        .is_some_and(|p| p.os == "linux" && p.architecture == arch)
            });
            let Some(pick) = pick else {
                let platforms: Vec<String> = manifests
                    .iter()
                    .filter_map(|m| m.platform.as_ref())
                    .map(|p| format!("{}/{}", p.os, p.architecture))
                    .collect();
                return Err(Error::new(format!(
                    "image {} has no linux/{arch} manifest present in the store (it lists {}; fix: pull it for this platform, e.g. --platform linux/{arch})",
                    record.name,
                    if platforms.is_empty() { "none".to_string() } else { platforms.join(", ") }
                )));
            };
            log::debug!("{}: {} {} for linux/{arch}", record.name, pick.media_type, pick.digest);
            digest = pick.digest.clone();
        }
        Err(Error::new(format!(
            "image {}: indexes nest deeper than any real image",
            record.name
        )))
    }
}
