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

use super::{Deployment, DEPLOYMENTS_DIR, INITRAMFS, KERNEL};

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

/// What the grubenv says of the deployment `name` with `tries`; `None`: it has no
/// variable (no menu entry).
pub fn assessment(env: &[(String, String)], name: &str, tries: u32) -> Option<Assessment> {
    let value = grubenv::get(env, &grubenv::tries_variable(name)?)?;
    Some(match value {
        "good" => Assessment::Good,
        "0" => Assessment::Bad { done: tries },
        n => match n.parse::<u32>() {
            Ok(left) => Assessment::Trying {
                left,
                done: tries.saturating_sub(left),
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

/// `word` as GRUB's lexer reads it back (grub-core/script/yylex.l): bare when it holds
/// only characters that are never special to it (no `|&<>;$` metacharacter, quote,
/// blank, brace, `#` or wildcard), else in single quotes, inside which every character
/// is itself (a quote itself is closed, escaped and reopened: `'\''`).
pub fn quote(word: &str) -> String {
    let bare = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@+%".contains(c));
    if bare {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
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
        let id = d.name();
        s += &format!(
            "if [ -z \"${{lb_default}}\" -a -n \"${{lb_{id}}}\" -a \"${{lb_{id}}}\" != \"0\" ]; then set lb_default=layerboot-{id}; fi\n"
        );
    }
    s += "if [ -n \"${lb_default}\" ]; then set default=\"${lb_default}\"; fi\n";
    for d in &ds {
        let r = &d.record;
        let id = d.name();
        let var = format!("lb_{id}");
        // Inside single quotes, on one line: no quote and no control character.
        let title: String = format!("layerboot: {} ({id}, kernel {})", r.reference, r.kernel)
            .chars()
            .filter(|&c| c != '\'' && !c.is_control())
            .collect();
        s += &format!("\nmenuentry '{title}' --id layerboot-{id} {{\n\tload_env -f {env} {var}\n");
        // One try used up, here, by the entry that boots; the booted system is told it was
        // counted, so that a boot that never gets good reboots (a good one's would not).
        s += "\tset lb_counted=layerboot.counted=0\n";
        let mut first = true;
        for left in (1..=r.tries).rev() {
            let kw = if first { "if" } else { "elif" };
            first = false;
            s += &format!(
                "\t{kw} [ \"${{{var}}}\" = \"{left}\" ]; then set {var}={}; save_env -f {env} {var}; \
                 set lb_counted=layerboot.counted=1\n",
                left - 1
            );
        }
        if !first {
            s += "\tfi\n";
        }
        // Each kernel argument one word, whatever GRUB's lexer would make of it bare.
        let options: Vec<String> = r.options.split(' ').filter(|a| !a.is_empty()).map(quote).collect();
        s += &format!(
            "\tlinux /{DEPLOYMENTS_DIR}/{id}/{KERNEL} {} $lb_counted\n\tinitrd /{DEPLOYMENTS_DIR}/{id}/{INITRAMFS}\n}}\n",
            options.join(" ")
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deploy::Record;

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
                files: None,
            },
            dir: PathBuf::from("/esp/layerboot").join(id.to_string().repeat(12)),
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
        grub_script_check(&s);
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
        // The booted system learns whether this boot was counted: only a counted one that
        // never gets good reboots (a good deployment's would come back to itself).
        assert!(entry.contains("\tset lb_counted=layerboot.counted=0\n"), "{entry}");
        assert_eq!(
            entry
                .matches("save_env -f /layerboot/grubenv lb_bbbbbbbbbbbb; set lb_counted=layerboot.counted=1")
                .count(),
            3
        );
        assert!(
            entry
                .lines()
                .any(|l| l.starts_with("\tlinux ") && l.ends_with(" $lb_counted")),
            "{entry}"
        );
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

    /// `grub-script-check` (grub-common) accepts `snippet`, as GRUB's own parser would.
    pub(crate) fn grub_script_check(snippet: &str) {
        use std::io::Write;
        let mut child = std::process::Command::new("grub-script-check")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("grub-script-check runs (fix: apt-get install grub-common)");
        child.stdin.take().unwrap().write_all(snippet.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "grub-script-check refused it: {}{}\n{snippet}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The words of one line of GRUB script as GRUB's lexer reads them (yylex.l): blanks
    /// split words, `'…'` is literal, `\\x` is `x`; an unquoted metacharacter is no word.
    fn grub_words(line: &str) -> Vec<String> {
        let (mut words, mut word, mut in_word) = (Vec::new(), String::new(), false);
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                ' ' | '\t' => {
                    if in_word {
                        words.push(std::mem::take(&mut word));
                    }
                    in_word = false;
                    continue;
                }
                '\'' => word.extend(chars.by_ref().take_while(|&c| c != '\'')),
                '\\' => word.push(chars.next().unwrap()),
                '|' | '&' | '<' | '>' | ';' | '$' | '{' | '}' | '"' | '*' | '?' | '[' | '#' => {
                    panic!("{c:?} unquoted in {line}")
                }
                c => word.push(c),
            }
            in_word = true;
        }
        if in_word {
            words.push(word);
        }
        words
    }

    #[test]
    fn every_kernel_argument_reaches_grubs_linux_command_as_it_is() {
        let mut d = deployment('a', 1, 3);
        let args = [
            "root=LABEL=s",
            "rw",
            "a|b",
            "x&y",
            "in<out>",
            "glob=*?[ab]",
            "#hash",
            "~user",
            "docker_image=sha256:aaaa",
        ];
        d.record.options = args.join(" ");
        assert_eq!(d.record.check("aaaaaaaaaaaa"), Ok(()), "none of these needs refusing");
        let s = snippet(&[&d]);
        grub_script_check(&s);
        let line = s.lines().find(|l| l.trim_start().starts_with("linux ")).unwrap();
        // The last word is GRUB's own variable: whether it counted this boot.
        let line = line.strip_suffix(" $lb_counted").unwrap_or_else(|| panic!("{line}"));
        let words = grub_words(line.trim_start());
        assert_eq!(words[..2], ["linux", "/layerboot/aaaaaaaaaaaa/vmlinuz"]);
        assert_eq!(words[2..], args, "{line}");
    }

    #[test]
    fn the_grubenv_states_read_back() {
        let r = |env: &[(String, String)]| assessment(env, "aaaaaaaaaaaa", 3);
        let env = |v: &str| vec![("lb_aaaaaaaaaaaa".to_string(), v.to_string())];
        assert_eq!(r(&env("good")), Some(Assessment::Good));
        assert_eq!(r(&env("2")), Some(Assessment::Trying { left: 2, done: 1 }));
        assert_eq!(r(&env("0")), Some(Assessment::Bad { done: 3 }));
        assert_eq!(r(&[]), None);
        for a in [
            Assessment::Good,
            Assessment::Trying { left: 2, done: 1 },
            Assessment::Bad { done: 3 },
        ] {
            assert_eq!(r(&env(&value(a))), Some(a));
        }
    }
}
