//! GRUB's side of deployments. GRUB has no boot counting of its own and no arithmetic,
//! so layerboot writes two files on the ESP:
//!
//! - `layerboot/grubenv`, a GRUB environment block with one variable per deployment,
//!   `lb_<id12>` = `good`, or the tries left (`3`, `2`, `1`, `0` = bad);
//! - `layerboot/grub.cfg`, a snippet the machine's `grub.cfg` sources with the ESP as
//!   `$root` (`source /layerboot/grub.cfg`, e.g. from `/etc/grub.d/40_custom`). It picks
//!   the newest deployment whose tries are not `0` as the default, and each menu entry
//!   steps its own counter down (`3`→`2`→`1`→`0`, a chain of string comparisons) and
//!   saves it *in the entry that boots*, not when the menu loads.
//!
//! A boot that gets good sets `good` (/init's bless unit, through `layerboot.grub=` and
//! `layerboot.esp=` on the command line: GRUB sets no `LoaderDevicePartUUID`).

use std::fs;
use std::path::{Path, PathBuf};

use layerboot_init::bootcount::Assessment;
use layerboot_init::error::{Error, Result};
use layerboot_init::grubenv;

use super::{Deployment, Record, DEPLOYMENTS_DIR, INITRAMFS, KERNEL};

pub fn env_path(esp: &Path) -> PathBuf {
    esp.join(DEPLOYMENTS_DIR).join("grubenv")
}

pub fn snippet_path(esp: &Path) -> PathBuf {
    esp.join(DEPLOYMENTS_DIR).join("grub.cfg")
}

/// The variables of the ESP's layerboot grubenv (none if it has none yet).
pub fn read_env(esp: &Path) -> Result<Vec<(String, String)>> {
    let path = env_path(esp);
    match fs::read(&path) {
        Ok(block) => grubenv::parse(&block).map_err(|e| e.context(path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(Error::io("cannot read", &path, e)),
    }
}

/// What the grubenv says of `record`; `None`: it has no variable (no menu entry).
pub fn assessment(env: &[(String, String)], record: &Record) -> Option<Assessment> {
    let value = grubenv::get(env, &grubenv::tries_variable(record.short_id())?)?;
    Some(match value {
        "good" => Assessment::Good,
        "0" => Assessment::Bad { done: record.tries },
        n => match n.parse::<u32>() {
            Ok(left) => Assessment::Trying {
                left,
                done: record.tries.saturating_sub(left),
            },
            Err(_) => Assessment::Bad { done: 0 },
        },
    })
}

/// The state a deployment's variable takes: `good` or the tries left.
pub fn value(a: Assessment) -> String {
    match a {
        Assessment::Good => "good".into(),
        Assessment::Trying { left, .. } => left.to_string(),
        Assessment::Bad { .. } => "0".into(),
    }
}

/// The snippet for `deployments` (GRUB's only), newest first.
pub fn snippet(deployments: &[&Deployment]) -> String {
    let mut ds: Vec<&&Deployment> = deployments.iter().filter(|d| d.is_grub()).collect();
    ds.sort_by_key(|d| std::cmp::Reverse(d.version));
    let env = format!("/{DEPLOYMENTS_DIR}/grubenv");
    let mut s = format!(
        "# Written by `layerboot deploy`: layerboot's deployments, newest first. Source it from grub.cfg\n\
         # with the ESP as $root: source /{DEPLOYMENTS_DIR}/grub.cfg\n\
         load_env -f {env}\nset lb_default=\"\"\n"
    );
    for d in &ds {
        let id = d.record.short_id();
        s += &format!(
            "if [ -z \"${{lb_default}}\" -a -n \"${{lb_{id}}}\" -a \"${{lb_{id}}}\" != \"0\" ]; then set lb_default=layerboot-{id}; fi\n"
        );
    }
    s += "if [ -n \"${lb_default}\" ]; then set default=\"${lb_default}\"; fi\n";
    for d in &ds {
        let r = &d.record;
        let id = r.short_id();
        let var = format!("lb_{id}");
        // Inside single quotes, on one line: no quote and no control character.
        let title: String = format!("layerboot: {} ({id}, kernel {})", r.reference, r.kernel)
            .chars()
            .filter(|&c| c != '\'' && !c.is_control())
            .collect();
        s += &format!("\nmenuentry '{title}' --id layerboot-{id} {{\n\tload_env -f {env} {var}\n");
        // One try used up, here, by the entry that boots.
        let mut first = true;
        for left in (1..=r.tries).rev() {
            let kw = if first { "if" } else { "elif" };
            first = false;
            s += &format!(
                "\t{kw} [ \"${{{var}}}\" = \"{left}\" ]; then set {var}={}; save_env -f {env} {var}\n",
                left - 1
            );
        }
        if !first {
            s += "\tfi\n";
        }
        s += &format!(
            "\tlinux /{DEPLOYMENTS_DIR}/{id}/{KERNEL} {}\n\tinitrd /{DEPLOYMENTS_DIR}/{id}/{INITRAMFS}\n}}\n",
            r.options
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(id: char, serial: u64, tries: u32) -> Deployment {
        let image_id = format!("sha256:{}", id.to_string().repeat(64));
        Deployment {
            record: Record {
                reference: format!("img:{id}"),
                image_id,
                kernel: "6.1.0".into(),
                serial,
                created: 0,
                store: "/s".into(),
                namespace: None,
                options: "root=LABEL=s rw".into(),
                initramfs_args: vec![],
                tries,
                loader: "grub".into(),
            },
            dir: PathBuf::from("/esp/layerboot/x"),
            entry: None,
            stale_entries: Vec::new(),
            assessment: None,
            version: serial,
        }
    }

    #[test]
    fn the_snippet_picks_the_newest_with_tries_and_counts_in_the_entry() {
        let (old, new) = (deployment('a', 1, 0), deployment('b', 2, 3));
        let s = snippet(&[&old, &new]);
        let b = s.find("lb_default=layerboot-bbbbbbbbbbbb").unwrap();
        let a = s.find("lb_default=layerboot-aaaaaaaaaaaa").unwrap();
        assert!(b < a, "newest first:\n{s}");
        let entry = &s[s.find("--id layerboot-bbbbbbbbbbbb").unwrap()..];
        for step in [
            "= \"3\" ]; then set lb_bbbbbbbbbbbb=2;",
            "= \"2\" ]; then set lb_bbbbbbbbbbbb=1;",
            "= \"1\" ]; then set lb_bbbbbbbbbbbb=0;",
        ] {
            assert!(entry.contains(step), "{step} in\n{entry}");
        }
        assert!(entry.contains("save_env -f /layerboot/grubenv lb_bbbbbbbbbbbb"));
        assert!(entry.contains("linux /layerboot/bbbbbbbbbbbb/vmlinuz root=LABEL=s rw"));
        // An uncounted deployment's entry saves nothing.
        let a_entry = &s[s.find("--id layerboot-aaaaaaaaaaaa").unwrap()..];
        assert!(!a_entry.contains("save_env"), "{a_entry}");
    }

    #[test]
    fn a_record_that_could_break_out_of_a_menu_entry_is_refused() {
        let good = deployment('a', 1, 3).record;
        assert_eq!(good.check("aaaaaaaaaaaa"), Ok(()));
        assert!(good.check("bbbbbbbbbbbb").is_err(), "another directory's");
        for options in ["x\nreboot", "x }\nmenuentry", "x; reboot", "x $(y)", "x 'y'", "x \\"] {
            let mut r = good.clone();
            r.options = options.to_string();
            assert!(r.check("aaaaaaaaaaaa").is_err(), "{options:?}");
        }
        let mut r = good.clone();
        r.image_id = "sha256:../../../EFI/BOOT/BOOTX64".into();
        assert!(r.check("../../../EFI").is_err());
    }

    #[test]
    fn the_grubenv_states_read_back() {
        let r = deployment('a', 1, 3).record;
        let env = |v: &str| vec![("lb_aaaaaaaaaaaa".to_string(), v.to_string())];
        assert_eq!(assessment(&env("good"), &r), Some(Assessment::Good));
        assert_eq!(assessment(&env("2"), &r), Some(Assessment::Trying { left: 2, done: 1 }));
        assert_eq!(assessment(&env("0"), &r), Some(Assessment::Bad { done: 3 }));
        assert_eq!(assessment(&[], &r), None);
        for a in [
            Assessment::Good,
            Assessment::Trying { left: 2, done: 1 },
            Assessment::Bad { done: 3 },
        ] {
            assert_eq!(assessment(&env(&value(a)), &r), Some(a));
        }
    }
}
