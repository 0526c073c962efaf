//! Which image records a reference names: by name (normalised as Docker does), by
//! digest within a repository, or by a unique ID prefix.

use super::Record;
use crate::digest::sha256_hex;
use crate::error::{Error, Result};
use crate::reference::Reference;

/// Whether the image record `name` (`domain/path:tag` or `…@digest`) is in repository
/// `repo` (`domain/path`). The tag is what follows the last `/`'s `:`, so a registry's
/// port (`localhost:5000/x`) is part of the repository.
pub(super) fn same_repository(name: &str, repo: &str) -> bool {
    let without_digest = name.split('@').next().unwrap_or(name);
    let last_slash = without_digest.rfind('/').map_or(0, |i| i + 1);
    let without_tag = match without_digest[last_slash..].find(':') {
        Some(colon) => &without_digest[..last_slash + colon],
        None => without_digest,
    };
    without_tag == repo
}

/// The records of one namespace that `reference` names: a name (normalised as Docker
/// does), a digest reference, or an ID / unique ID prefix.
pub(super) fn matching<'a>(reference: &str, records: Vec<&'a Record>) -> Result<Vec<&'a Record>> {
    if let Ok(r) = Reference::parse(reference) {
        let full = r.full_string();
        if let Some(hit) = records.iter().find(|rec| rec.name == full) {
            return Ok(vec![hit]);
        }
        if let Some(d) = &r.digest {
            let repo = format!("{}/{}", r.domain, r.path);
            let hits: Vec<&Record> = records
                .iter()
                .copied()
                .filter(|rec| &rec.digest == d && same_repository(&rec.name, &repo))
                .collect();
            if !hits.is_empty() {
                return Ok(hits);
            }
        }
    }
    let hex = reference
        .strip_prefix("sha256:")
        .unwrap_or(reference)
        .to_ascii_lowercase();
    if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(Vec::new());
    }
    let hits: Vec<&Record> = records
        .iter()
        .copied()
        .filter(|rec| sha256_hex(&rec.digest).is_some_and(|h| h.starts_with(&hex)))
        .collect();
    let mut ids: Vec<&str> = hits.iter().map(|r| r.digest.as_str()).collect();
    ids.sort();
    ids.dedup();
    if ids.len() > 1 {
        return Err(Error::new(format!(
            "image ID prefix '{reference}' is ambiguous: it matches {} (fix: give more digits of the ID)",
            ids.iter().map(|d| &d[7..23]).collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(hits)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_registry_port_is_part_of_the_repository() {
        assert!(super::same_repository("localhost:5000/x/y:1", "localhost:5000/x/y"));
        assert!(super::same_repository(
            "docker.io/library/demo:latest",
            "docker.io/library/demo"
        ));
        assert!(super::same_repository(
            "docker.io/library/demo@sha256:ab",
            "docker.io/library/demo"
        ));
        assert!(!super::same_repository("localhost:5000/x/y:1", "localhost"));
        assert!(!super::same_repository(
            "docker.io/library/demo2:1",
            "docker.io/library/demo"
        ));
    }
}
