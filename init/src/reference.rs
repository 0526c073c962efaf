//! Image references, normalised the way Docker's `distribution/reference` does, so that
//! `debian`, `debian:latest` and `docker.io/library/debian:latest` name the same image.

use crate::error::{Error, Result};

pub const DEFAULT_DOMAIN: &str = "docker.io";
const LEGACY_DOMAIN: &str = "index.docker.io";
const OFFICIAL_PREFIX: &str = "library/";

/// A parsed, fully qualified reference: `domain/path[:tag][@digest]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub domain: String,
    pub path: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl Reference {
    /// Parses `s` as `docker pull` would, filling in `docker.io`, `library/` and `:latest`.
    pub fn parse(s: &str) -> Result<Reference> {
        let bad = |why: &str| {
            Error::new(format!(
                "invalid image reference '{s}': {why} (expected NAME[:TAG] or NAME@sha256:DIGEST, \
                 e.g. debian:12 or registry:5000/team/app:v1)"
            ))
        };
        if s.is_empty() {
            return Err(bad("it is empty"));
        }
        let (name_tag, digest) = match s.split_once('@') {
            Some((n, d)) => {
                let hex = d
                    .strip_prefix("sha256:")
                    .ok_or_else(|| bad("only sha256 digests are supported"))?;
                if !crate::digest::is_hex64(hex) {
                    return Err(bad("the digest must be sha256: and 64 lowercase hex digits"));
                }
                (n, Some(d.to_string()))
            }
            None => (s, None),
        };
        // A tag is a ':' after the last '/', so `localhost:5000/x` has none.
        let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name_tag[last_slash..].rfind(':') {
            Some(i) => {
                let i = last_slash + i;
                (&name_tag[..i], Some(name_tag[i + 1..].to_string()))
            }
            None => (name_tag, None),
        };
        if let Some(t) = &tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
                && !t.starts_with(['.', '-']);
            if !ok {
                return Err(bad(&format!("'{t}' is not a valid tag")));
            }
        }
        if name.is_empty() {
            return Err(bad("the name is empty"));
        }
        let (domain, path) = split_domain(name);
        if !valid_domain(&domain) {
            return Err(bad(&format!("'{domain}' is not a valid registry host")));
        }
        if path.is_empty() || path.split('/').any(|c| !valid_path_component(c)) {
            return Err(bad(
                "a repository name is lowercase letters, digits and separators (. _ __ -) between slashes",
            ));
        }
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_string())
        } else {
            tag
        };
        Ok(Reference {
            domain,
            path,
            tag,
            digest,
        })
    }

    /// `docker.io/library/debian` → `debian`; `docker.io/acc/x` → `acc/x`; others unchanged.
    pub fn familiar_name(&self) -> String {
        if self.domain == DEFAULT_DOMAIN {
            match self.path.strip_prefix(OFFICIAL_PREFIX) {
                Some(rest) if !rest.contains('/') => rest.to_string(),
                _ => self.path.clone(),
            }
        } else {
            format!("{}/{}", self.domain, self.path)
        }
    }

    /// The key Docker's tag store files this reference under: the digest wins over a tag.
    pub fn familiar_string(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => format!("{}@{d}", self.familiar_name()),
            (None, Some(t)) => format!("{}:{t}", self.familiar_name()),
            (None, None) => self.familiar_name(),
        }
    }

    /// `docker.io/library/debian:latest`.
    pub fn full_string(&self) -> String {
        let mut s = format!("{}/{}", self.domain, self.path);
        if let Some(t) = &self.tag {
            s = format!("{s}:{t}");
        }
        if let Some(d) = &self.digest {
            s = format!("{s}@{d}");
        }
        s
    }
}

/// The first component is a registry if it has a '.' or ':', is `localhost`, or has
/// upper-case letters (which a repository path may not).
fn split_domain(name: &str) -> (String, String) {
    let (domain, path) = match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':']) || first == "localhost" || first.chars().any(|c| c.is_ascii_uppercase()) =>
        {
            (first.to_string(), rest.to_string())
        }
        _ => (DEFAULT_DOMAIN.to_string(), name.to_string()),
    };
    let domain = if domain == LEGACY_DOMAIN {
        DEFAULT_DOMAIN.to_string()
    } else {
        domain
    };
    let path = if domain == DEFAULT_DOMAIN && !path.contains('/') {
        format!("{OFFICIAL_PREFIX}{path}")
    } else {
        path
    };
    (domain, path)
}

/// `host[:port]`, host being dot-separated `[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?` labels.
fn valid_domain(d: &str) -> bool {
    let (host, port) = match d.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (d, None),
    };
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    host.split('.').all(label_ok) && port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// `[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*`
fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !is_alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-')) {
            return false;
        }
    }
    true
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> String {
        Reference::parse(s).unwrap().familiar_string()
    }

    #[test]
    fn official_images_normalise_to_one_key() {
        for s in [
            "debian",
            "debian:latest",
            "docker.io/library/debian:latest",
            "index.docker.io/library/debian",
            "docker.io/debian",
        ] {
            assert_eq!(key(s), "debian:latest", "{s}");
        }
        assert_eq!(
            Reference::parse("debian").unwrap().full_string(),
            "docker.io/library/debian:latest"
        );
    }

    #[test]
    fn user_repos_and_registries() {
        assert_eq!(key("acc/x:1"), "acc/x:1");
        assert_eq!(key("docker.io/acc/x:1"), "acc/x:1");
        assert_eq!(key("localhost:5000/x/y:t"), "localhost:5000/x/y:t");
        assert_eq!(key("localhost/x"), "localhost/x:latest");
        assert_eq!(key("ghcr.io/o/r"), "ghcr.io/o/r:latest");
        let r = Reference::parse("localhost:5000/x/y").unwrap();
        assert_eq!(
            (r.domain.as_str(), r.path.as_str(), r.tag.as_deref()),
            ("localhost:5000", "x/y", Some("latest"))
        );
    }

    #[test]
    fn digest_wins_over_tag() {
        let d = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(key(&format!("debian@{d}")), format!("debian@{d}"));
        assert_eq!(key(&format!("debian:12@{d}")), format!("debian@{d}"));
    }

    #[test]
    fn bad_references_say_what_is_wrong() {
        for (s, why) in [
            ("", "empty"),
            ("Debian", "lowercase"),
            ("debian:", "valid tag"),
            ("debian:-x", "valid tag"),
            ("debian@sha256:abc", "64 lowercase hex"),
            ("debian@md5:abc", "only sha256"),
            ("a//b", "lowercase letters"),
            ("../etc", "valid registry host"),
            ("host:x/y", "valid registry host"),
        ] {
            let e = Reference::parse(s).unwrap_err().to_string();
            assert!(e.contains(why), "{s}: {e}");
            assert!(e.contains("expected NAME[:TAG]"), "{e}");
        }
    }
}
