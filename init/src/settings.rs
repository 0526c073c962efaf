//! Boot settings: the kernel command line over `/etc/layerboot.json` (baked in by the
//! builder) over defaults. Argument names follow mkinitcpio-docker-hooks, so its boot
//! entries keep working.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const CONFIG_PATH: &str = "/etc/layerboot.json";

/// The kernel arguments layerboot reads, by name: the one spelling that `/init`, the
/// builder's baked-in defaults and its boot entries all use.
pub mod arg {
    pub const ROOT: &str = "root";
    pub const ROOT_FSTYPE: &str = "rootfstype";
    pub const ROOT_FLAGS: &str = "rootflags";
    pub const DOCKER_PATH: &str = "docker_path";
    pub const DOCKER_IMAGE: &str = "docker_image";
    pub const TOPLAYER: &str = "toplayer";
    pub const TOPLAYER_FSTYPE: &str = "toplayerfstype";
    pub const TOPLAYER_FLAGS: &str = "toplayerflags";
    pub const TOPLAYER_PATH: &str = "toplayer_path";
    pub const INIT: &str = "init";
    pub const RW: &str = "layerboot.rw";
    pub const KEEP: &str = "layerboot.keep";
    pub const MODE: &str = "layerboot.mode";
    pub const UPPER: &str = "layerboot.upper";
    pub const NAMESPACE: &str = "layerboot.namespace";
    pub const MODULES: &str = "layerboot.modules";
    pub const TIMEOUT: &str = "layerboot.timeout";
    pub const RESCUE_TIMEOUT: &str = "layerboot.rescue_timeout";
    pub const RESCUE: &str = "layerboot.rescue";
    pub const DEBUG: &str = "layerboot.debug";
    pub const BLESS_TIMEOUT: &str = "layerboot.bless_timeout";
    /// GRUB deployments: the deployment this entry boots (its grubenv variable), and
    /// the ESP holding that grubenv (GRUB tells the system neither).
    pub const GRUB_DEPLOYMENT: &str = "layerboot.grub";
    pub const ESP: &str = "layerboot.esp";
    /// GRUB deployments: `1` when GRUB counted this boot (the deployment was not good
    /// yet): only then does a boot that never gets good reboot (`deadline.rs`).
    pub const GRUB_COUNTED: &str = "layerboot.counted";
}
pub const DEFAULT_DOCKER_PATH: &str = "var/lib/docker";
pub const DEFAULT_RW_NAME: &str = "layerboot-rw";
pub const DEFAULT_INIT: &str = "/sbin/init";
pub const DEFAULT_TIMEOUT_S: u64 = 30;
pub const DEFAULT_RESCUE_TIMEOUT_S: u64 = 60;
/// How long a counted boot may take to become good before systemd reboots it (15 min).
pub const DEFAULT_BLESS_TIMEOUT_S: u64 = 900;
/// The longest `layerboot.timeout=` and `layerboot.rescue_timeout=`: a day.
pub const MAX_WAIT_S: u64 = 86_400;
/// The most kept generations `layerboot.keep=` may ask for.
pub const MAX_KEEP: u64 = 100;

/// `/etc/layerboot.json`, written by `layerboot initramfs`. Every field is optional.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The kernel release the packed modules are for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Modules to load at boot (their dependencies are resolved at boot from modules.dep).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modules: Vec<String>,
    /// Defaults for kernel arguments, by argument name (`docker_image`, `docker_path`, …).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub defaults: BTreeMap<String, String>,
    /// Whether coldplug reads the modaliases of the ACPI bus's devices: `false` when no
    /// packed module serves ACPI objects themselves (an ACPI bus or PNP driver, or a module
    /// with PNP aliases), as the builder finds. The ACPI-described devices other drivers
    /// serve are also on their own bus, with the same `acpi:` modalias. Absent: read
    /// (0.9 ms under emulation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub walk_acpi_bus: Option<bool>,
}

impl Config {
    pub fn parse(text: &str) -> Result<Config> {
        serde_json::from_str(text).map_err(|e| {
            Error::new(format!(
                "{CONFIG_PATH} in the initramfs is invalid: {e} (fix: rebuild it with `layerboot initramfs`)"
            ))
        })
    }
}

/// mkinitcpio-docker-hooks' config, kept inside its users' images: the image their
/// initramfs booted (`{"docker_image": "archlinux/base", "docker_tag": "latest"}`).
/// layerboot reads it as the weakest default of `docker_image=`, below
/// `/etc/layerboot.json`.
pub const LEGACY_CONFIG_PATH: &str = "/etc/docker-btrfs.json";

/// The old hook's file; its other keys, if any, meant nothing to it either.
#[derive(Debug, Deserialize)]
struct LegacyConfig {
    docker_image: Option<String>,
    docker_tag: Option<String>,
}

/// The image `/etc/docker-btrfs.json` names, as one reference (`docker_image:docker_tag`),
/// or `None` when it names none.
pub fn legacy_image(text: &str) -> Result<Option<String>> {
    let bad = |why: String| {
        Error::new(format!(
            "{LEGACY_CONFIG_PATH} (mkinitcpio-docker-hooks' config) {why} \
             (fix: make it {{\"docker_image\": \"NAME\", \"docker_tag\": \"TAG\"}}, or move its image to docker_image= in /etc/layerboot.json)"
        ))
    };
    let old: LegacyConfig = serde_json::from_str(text).map_err(|e| bad(format!("is invalid: {e}")))?;
    let Some(image) = old.docker_image.filter(|i| !i.is_empty()) else {
        return Ok(None);
    };
    let reference = match old.docker_tag.filter(|t| !t.is_empty()) {
        Some(tag) => format!("{image}:{tag}"),
        None => image,
    };
    crate::reference::Reference::parse(&reference).map_err(|e| bad(format!("names no image: {e}")))?;
    Ok(Some(reference))
}

impl Config {
    /// Adds the old hook's image as the default of `docker_image=`, unless one is set;
    /// returns the image when it was taken.
    pub fn adopt_legacy_image(&mut self, legacy: Option<String>) -> Option<String> {
        let image = legacy.filter(|_| !self.defaults.contains_key(arg::DOCKER_IMAGE))?;
        self.defaults.insert(arg::DOCKER_IMAGE.to_string(), image.clone());
        Some(image)
    }
}

/// A device named as `root=` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    Label(String),
    Uuid(String),
    PartUuid(String),
    PartLabel(String),
    Path(String),
}

impl DeviceSpec {
    pub fn parse(arg: &str, value: &str) -> Result<DeviceSpec> {
        let (kind, rest) = value.split_once('=').unwrap_or(("", value));
        let spec = match kind.to_ascii_uppercase().as_str() {
            "LABEL" => DeviceSpec::Label(rest.to_string()),
            "UUID" => DeviceSpec::Uuid(rest.to_ascii_lowercase()),
            "PARTUUID" => DeviceSpec::PartUuid(rest.to_ascii_lowercase()),
            "PARTLABEL" => DeviceSpec::PartLabel(rest.to_string()),
            _ if value.starts_with("/dev/") => DeviceSpec::Path(value.to_string()),
            _ => {
                return Err(Error::new(format!(
                    "{arg}={value} is not a device: use LABEL=…, UUID=…, PARTUUID=…, PARTLABEL=… or /dev/…"
                )))
            }
        };
        if matches!(&spec, DeviceSpec::Label(s) | DeviceSpec::Uuid(s) | DeviceSpec::PartUuid(s) | DeviceSpec::PartLabel(s) if s.is_empty())
        {
            return Err(Error::new(format!(
                "{arg}={value} names no device: the value after '=' is empty"
            )));
        }
        Ok(spec)
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Label(s) => write!(f, "LABEL={s}"),
            DeviceSpec::Uuid(s) => write!(f, "UUID={s}"),
            DeviceSpec::PartUuid(s) => write!(f, "PARTUUID={s}"),
            DeviceSpec::PartLabel(s) => write!(f, "PARTLABEL={s}"),
            DeviceSpec::Path(s) => f.write_str(s),
        }
    }
}

/// Everything `/init` needs to know, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub root: DeviceSpec,
    pub root_fstype: Option<String>,
    /// `rootflags` without `subvol=` (which names the writable layer, for compatibility).
    pub root_flags: Vec<String>,
    pub read_only: bool,
    pub docker_path: String,
    pub image: String,
    pub toplayer: Option<DeviceSpec>,
    pub toplayer_fstype: Option<String>,
    pub toplayer_flags: Vec<String>,
    pub toplayer_path: String,
    pub init: String,
    pub rw_name: String,
    /// The name came as `rootflags=subvol=` (mkinitcpio-docker-hooks' spelling): an
    /// unmarked layer of that name is that hook's, moved aside once, never deleted.
    pub rw_adopt: bool,
    /// `None`: wait forever (`rootwait` without a timeout).
    pub timeout: Option<Duration>,
    pub rescue_timeout: Duration,
    /// `layerboot.bless_timeout=S`: a boot the loader counts must be blessed within this,
    /// or it reboots (0: never).
    pub bless_timeout: Duration,
    pub debug: bool,
    /// `layerboot.modules=a,b`: loaded whatever the devices.
    pub modules: Vec<String>,
    /// `layerboot.namespace=NS`: the containerd namespace to boot from (default: search).
    pub namespace: Option<String>,
    /// `layerboot.keep=N`: how many previous writable layers are kept (`NAME.prev`, …).
    pub keep: usize,
    /// `layerboot.mode=`: a fresh layer each boot, or the last one kept.
    pub mode: LayerMode,
    /// `layerboot.upper=`: where the writable layer lives.
    pub upper: Upper,
}

/// `layerboot.mode=`: what each boot does with the writable layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerMode {
    /// A fresh layer from the image at every boot (the default).
    Fresh,
    /// The last layer again, if it was made from the same image.
    Keep,
}

/// `layerboot.upper=`: where the writable layer lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upper {
    /// On the store's partition (the default).
    Disk,
    /// In memory: nothing is written to the disk.
    Tmpfs,
}

/// Splits `/proc/cmdline` into `key → value` (last one wins; a bare flag maps to "").
/// Double quotes group words, as the kernel's own parser does.
pub fn parse_cmdline(line: &str) -> BTreeMap<String, String> {
    let mut args = BTreeMap::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut words = Vec::new();
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    for w in words {
        let (k, v) = w.split_once('=').unwrap_or((&w, ""));
        args.insert(k.to_string(), v.to_string());
    }
    args
}

impl Settings {
    /// Resolves the settings; `cmdline` wins over `config.defaults`, which win over defaults.
    pub fn resolve(cmdline: &BTreeMap<String, String>, config: &Config) -> Result<Settings> {
        let get = |k: &str| cmdline.get(k).or_else(|| config.defaults.get(k)).map(String::as_str);
        let nonempty = |k: &str| get(k).filter(|v| !v.is_empty());

        let root = DeviceSpec::parse(
            arg::ROOT,
            nonempty(arg::ROOT).ok_or_else(|| {
                Error::new("no root= on the kernel command line: add root=LABEL=… (or UUID=, PARTUUID=, /dev/…) naming the partition that holds the image store")
            })?,
        )?;
        let mut root_flags = Vec::new();
        let mut rw_subvol = None;
        for flag in get(arg::ROOT_FLAGS).unwrap_or("").split(',').filter(|f| !f.is_empty()) {
            match flag.strip_prefix("subvol=") {
                Some(name) => rw_subvol = Some(name.trim_start_matches('/').to_string()),
                None => root_flags.push(flag.to_string()),
            }
        }
        let rw_adopt = nonempty(arg::RW).is_none() && rw_subvol.is_some();
        let rw_name = nonempty(arg::RW)
            .map(str::to_string)
            .or(rw_subvol)
            .unwrap_or_else(|| DEFAULT_RW_NAME.to_string());
        // A plain name: it becomes a path at the partition's top level and part of the
        // overlay's mount options, where ',' or ':' would inject options of their own.
        let plain = rw_name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@+-".contains(&b));
        if !plain || rw_name.starts_with('.') || rw_name.is_empty() || rw_name.len() > 200 {
            return Err(Error::new(format!(
                "writable layer name '{rw_name}' (layerboot.rw= or rootflags=subvol=) must be a plain name at the partition's top level \
                 (letters, digits and . _ @ + -, not starting with '.'), e.g. layerboot-rw"
            )));
        }
        let given = get(arg::DOCKER_PATH).unwrap_or(DEFAULT_DOCKER_PATH);
        if given.split('/').any(|c| c == "..") {
            return Err(Error::new(format!(
                "docker_path={given} must stay inside the root partition (no '..')"
            )));
        }
        let docker_path = plain_path(given);
        let image = nonempty(arg::DOCKER_IMAGE).map(str::to_string).ok_or_else(|| {
            Error::new("no image to boot: add docker_image=NAME:TAG to the kernel command line, or build the initramfs with `layerboot initramfs --image NAME:TAG`")
        })?;
        let toplayer = nonempty(arg::TOPLAYER)
            .map(|v| DeviceSpec::parse(arg::TOPLAYER, v))
            .transpose()?;
        let toplayer_flags = get(arg::TOPLAYER_FLAGS)
            .unwrap_or("")
            .split(',')
            .filter(|f| !f.is_empty())
            .map(str::to_string)
            .collect();
        let given = get(arg::TOPLAYER_PATH).unwrap_or("/");
        if given.split('/').any(|c| c == "..") {
            return Err(Error::new(format!(
                "toplayer_path={given} must stay inside the top-layer device (no '..')"
            )));
        }
        let toplayer_path = format!("/{}", plain_path(given));
        // Bounded: a huge value would wait for ever, or overflow a deadline into a panic.
        let number = |k: &str, default: u64, max: u64| -> Result<u64> {
            let unit = if k.ends_with("timeout") { " of seconds" } else { "" };
            match nonempty(k) {
                None => Ok(default),
                Some(v) => match v.parse::<u64>() {
                    Ok(n) if n <= max => Ok(n),
                    Ok(_) => Err(Error::new(format!("{k}={v} is too large: at most {max}{unit}"))),
                    Err(_) => Err(Error::new(format!("{k}={v} is not a number{unit}"))),
                },
            }
        };
        let timeout = match (cmdline.contains_key("rootwait"), cmdline.contains_key(arg::TIMEOUT)) {
            (true, false) => None,
            _ => Some(Duration::from_secs(number(
                arg::TIMEOUT,
                DEFAULT_TIMEOUT_S,
                MAX_WAIT_S,
            )?)),
        };
        let init = nonempty(arg::INIT).unwrap_or(DEFAULT_INIT).to_string();
        if !init.starts_with('/') {
            return Err(Error::new(format!(
                "init={init} must be an absolute path inside the image, e.g. /sbin/init"
            )));
        }
        Ok(Settings {
            root,
            root_fstype: nonempty(arg::ROOT_FSTYPE).map(str::to_string),
            root_flags,
            read_only: cmdline.contains_key("ro") && !cmdline.contains_key("rw"),
            docker_path,
            image,
            toplayer,
            toplayer_fstype: nonempty(arg::TOPLAYER_FSTYPE).map(str::to_string),
            toplayer_flags,
            toplayer_path,
            init,
            rw_name,
            rw_adopt,
            timeout,
            rescue_timeout: Duration::from_secs(number(arg::RESCUE_TIMEOUT, DEFAULT_RESCUE_TIMEOUT_S, MAX_WAIT_S)?),
            bless_timeout: Duration::from_secs(number(arg::BLESS_TIMEOUT, DEFAULT_BLESS_TIMEOUT_S, MAX_WAIT_S)?),
            debug: cmdline.contains_key(arg::DEBUG) || cmdline.contains_key("rd.debug"),
            keep: number(arg::KEEP, 1, MAX_KEEP)? as usize,
            mode: match nonempty(arg::MODE) {
                None | Some("fresh") => LayerMode::Fresh,
                Some("keep") => LayerMode::Keep,
                Some(v) => {
                    return Err(Error::new(format!(
                        "layerboot.mode={v} is unknown: use layerboot.mode=fresh (the default) or keep"
                    )))
                }
            },
            upper: match nonempty(arg::UPPER) {
                None | Some("disk") => Upper::Disk,
                Some("tmpfs") => Upper::Tmpfs,
                Some(v) => {
                    return Err(Error::new(format!(
                        "layerboot.upper={v} is unknown: use layerboot.upper=disk (the default) or tmpfs"
                    )))
                }
            },
            modules: get(arg::MODULES)
                .unwrap_or("")
                .split(',')
                .filter(|m| !m.is_empty())
                .map(str::to_string)
                .collect(),
            namespace: nonempty(arg::NAMESPACE).map(str::to_string),
        })
    }
}

/// A path in a partition as its names alone: no empty or `.` parts, no slash at either
/// end (`./var//lib/docker/` → `var/lib/docker`), so a check of its first name is a
/// check of the directory it names. (`..` is refused before.)
fn plain_path(path: &str) -> String {
    path.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(line: &str, config: &Config) -> Result<Settings> {
        Settings::resolve(&parse_cmdline(line), config)
    }

    #[test]
    fn the_old_hooks_config_names_the_default_image_below_layerboots_own() {
        let old = r#"{"docker_image": "sample_image", "docker_tag": "v2"}"#;
        assert_eq!(legacy_image(old).unwrap().as_deref(), Some("sample_image:v2"));
        // No tag: the engine's own default (latest); no image: nothing to take.
        assert_eq!(
            legacy_image(r#"{"docker_image": "a/b"}"#).unwrap().as_deref(),
            Some("a/b")
        );
        assert_eq!(legacy_image(r#"{"docker_tag": "latest"}"#).unwrap(), None);
        assert_eq!(legacy_image("{}").unwrap(), None);

        let mut config = Config::default();
        assert_eq!(
            config.adopt_legacy_image(legacy_image(old).unwrap()).as_deref(),
            Some("sample_image:v2")
        );
        let s = settings("root=LABEL=x", &config).unwrap();
        assert_eq!(s.image, "sample_image:v2");
        // The command line wins, and so does /etc/layerboot.json.
        assert_eq!(
            settings("root=LABEL=x docker_image=other", &config).unwrap().image,
            "other"
        );
        let mut own = Config::default();
        own.defaults.insert(arg::DOCKER_IMAGE.into(), "mine".into());
        assert_eq!(own.adopt_legacy_image(Some("sample_image:v2".into())), None);
        assert_eq!(settings("root=LABEL=x", &own).unwrap().image, "mine");
    }

    #[test]
    fn a_broken_old_config_is_named_with_its_fix() {
        for (text, why) in [
            ("{\"docker_image\": ", "is invalid"),
            (r#"{"docker_image": 7}"#, "is invalid"),
            (r#"{"docker_image": "Bad Name", "docker_tag": "x"}"#, "names no image"),
            (r#"{"docker_image": "a", "docker_tag": "x y"}"#, "names no image"),
            (r#"{"docker_image": "a", "docker_tag": "../x"}"#, "names no image"),
        ] {
            let e = legacy_image(text).unwrap_err().to_string();
            assert!(
                e.contains("/etc/docker-btrfs.json") && e.contains(why) && e.contains("fix:"),
                "{text}: {e}"
            );
        }
    }

    #[test]
    fn mkinitcpio_docker_hooks_entry_still_boots() {
        // The seed's rEFInd entry.
        let s = settings(
            "root=UUID=ABCD-1 rw rootflags=subvol=docker_rw,compress=zstd docker_path=var/lib/docker toplayer=LABEL=top toplayerflags=ro toplayer_path=/hosts/pc1 docker_image=arch:desktop",
            &Config::default(),
        )
        .unwrap();
        assert_eq!(s.root, DeviceSpec::Uuid("abcd-1".into()));
        assert_eq!(s.rw_name, "docker_rw");
        assert!(s.rw_adopt, "the hook's unmarked layer may be adopted");
        assert_eq!(s.root_flags, vec!["compress=zstd"]);
        assert_eq!(s.toplayer, Some(DeviceSpec::Label("top".into())));
        assert_eq!(s.toplayer_flags, vec!["ro"]);
        assert_eq!(s.toplayer_path, "/hosts/pc1");
        assert_eq!(s.image, "arch:desktop");
        assert!(!s.read_only);
    }

    #[test]
    fn paths_are_read_as_their_names_so_the_clash_checks_see_them() {
        for (given, docker, top) in [
            ("./layerboot-rw", "layerboot-rw", "/layerboot-rw"),
            (".", "", "/"),
            ("/./var//lib/./docker/", "var/lib/docker", "/var/lib/docker"),
        ] {
            let s = settings(
                &format!("root=/dev/vda docker_image=x docker_path={given} toplayer_path={given}"),
                &Config::default(),
            )
            .unwrap();
            assert_eq!(
                (s.docker_path.as_str(), s.toplayer_path.as_str()),
                (docker, top),
                "{given}"
            );
        }
        // So the writable layer's generations can never be the store or hold it.
        for given in ["./layerboot-rw", ".", "./"] {
            let s = settings(
                &format!("root=/dev/vda docker_image=x docker_path={given}"),
                &Config::default(),
            )
            .unwrap();
            assert!(
                crate::writable::check_clear_of(&s.rw_name, "the image store", &s.docker_path).is_err(),
                "{given}"
            );
        }
    }

    #[test]
    fn cmdline_beats_config_beats_defaults() {
        let mut config = Config::default();
        config.defaults.insert("docker_image".into(), "baked:1".into());
        config.defaults.insert("docker_path".into(), "/srv/docker/".into());
        let s = settings("root=/dev/vda ro quiet", &config).unwrap();
        assert_eq!((s.image.as_str(), s.docker_path.as_str()), ("baked:1", "srv/docker"));
        assert_eq!((s.rw_name.as_str(), s.init.as_str()), (DEFAULT_RW_NAME, DEFAULT_INIT));
        assert!(s.read_only && s.toplayer.is_none());
        assert_eq!(s.timeout, Some(Duration::from_secs(30)));
        assert_eq!((s.keep, s.mode, s.upper), (1, LayerMode::Fresh, Upper::Disk));
        let s = settings(
            "root=/dev/vda layerboot.keep=3 layerboot.mode=keep layerboot.upper=tmpfs layerboot.modules=nvme,xhci_pci",
            &config,
        )
        .unwrap();
        assert_eq!((s.keep, s.mode, s.upper), (3, LayerMode::Keep, Upper::Tmpfs));
        assert_eq!(s.modules, ["nvme", "xhci_pci"]);
        assert_eq!(s.namespace, None);
        config.defaults.insert("layerboot.namespace".into(), "moby".into());
        assert_eq!(
            settings("root=/dev/vda", &config).unwrap().namespace.as_deref(),
            Some("moby")
        );
        assert_eq!(
            settings("root=/dev/vda layerboot.namespace=k8s.io", &config)
                .unwrap()
                .namespace
                .as_deref(),
            Some("k8s.io")
        );
        let s = settings(
            "root=/dev/vda docker_image=x:2 init=/bin/sh rootwait \"layerboot.rw=a\" docker_image=x:3",
            &config,
        )
        .unwrap();
        assert_eq!(
            (s.image.as_str(), s.init.as_str(), s.rw_name.as_str()),
            ("x:3", "/bin/sh", "a")
        );
        assert_eq!(s.timeout, None);
    }

    #[test]
    fn bad_arguments_name_the_fix() {
        let c = Config::default();
        for (line, want) in [
            ("docker_image=x", "no root="),
            ("root=/dev/vda", "no image to boot"),
            ("root=sda1 docker_image=x", "root=sda1 is not a device"),
            ("root=LABEL= docker_image=x", "names no device"),
            (
                "root=/dev/vda docker_image=x docker_path=../etc",
                "inside the root partition",
            ),
            ("root=/dev/vda docker_image=x layerboot.rw=a/b", "plain name"),
            ("root=/dev/vda docker_image=x layerboot.rw=a,lowerdir=/", "plain name"),
            ("root=/dev/vda docker_image=x rootflags=subvol=a:b", "plain name"),
            ("root=/dev/vda docker_image=x layerboot.rw=..", "plain name"),
            ("root=/dev/vda docker_image=x layerboot.timeout=soon", "not a number"),
            ("root=/dev/vda docker_image=x init=sbin/init", "absolute path"),
            (
                "root=/dev/vda docker_image=x toplayer=top",
                "toplayer=top is not a device",
            ),
            (
                "root=/dev/vda docker_image=x layerboot.mode=sticky",
                "layerboot.mode=sticky is unknown",
            ),
            (
                "root=/dev/vda docker_image=x layerboot.upper=ram",
                "layerboot.upper=ram is unknown",
            ),
            (
                "root=/dev/vda docker_image=x layerboot.keep=-1",
                "layerboot.keep=-1 is not a number",
            ),
            (
                "root=/dev/vda docker_image=x layerboot.keep=18446744073709551615",
                "at most 100",
            ),
            (
                "root=/dev/vda docker_image=x layerboot.rescue_timeout=99999999999999999",
                "at most 86400 of seconds",
            ),
            (
                "root=/dev/vda docker_image=x layerboot.timeout=99999999999",
                "too large",
            ),
        ] {
            let e = settings(line, &c).unwrap_err().to_string();
            assert!(e.contains(want), "{line}: {e}");
        }
        assert!(Config::parse("{\"modules\": 1}")
            .unwrap_err()
            .to_string()
            .contains("rebuild"));
    }
}
