//! Kernel module index from depmod's text files (modules.dep, .softdep, .alias,
//! .builtin), used by the builder to choose what to pack and by `/init` to load it in
//! order: soft "pre" dependencies, hard dependencies, the module, soft "post" ones.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

use crate::error::{Error, Result};

pub const INDEX_FILES: [&str; 4] = ["modules.dep", "modules.softdep", "modules.alias", "modules.builtin"];

#[derive(Debug, Default, Clone)]
pub struct ModuleIndex {
    /// name → (path relative to /lib/modules/<kver>, hard dependencies by name)
    modules: BTreeMap<String, (String, Vec<String>)>,
    /// name → (pre, post) soft dependencies, as written (names or aliases)
    softdeps: BTreeMap<String, (Vec<String>, Vec<String>)>,
    /// modules.alias as read. [`Alias`]es are places in it: reading the index at boot
    /// allocates nothing per line (it did, and that was /init's largest step).
    alias_text: String,
    /// Every alias line, in file order.
    aliases: Vec<Alias>,
    /// The first [`KEY`] bytes and position in `aliases` of each pattern whose literal
    /// start is at least that long, in order: a modalias is only matched against the
    /// patterns that begin as it does (`pci:v00008086`, `usb:v0BC2p20`) …
    by_key: Vec<([u8; KEY], usize)>,
    /// … and against these, whose literal start is shorter (`pci:v*d*sv*sd*bc01sc06i01*`,
    /// `acpi*:80860F14:*`), by their first byte (0 for a pattern that starts with a
    /// wildcard, which any text may match) and position: only those that begin with
    /// the text's first byte are tried.
    short: Vec<(u8, usize)>,
    /// modules.builtin as read, its names sorted and unique only when first asked
    /// (bisection then): a boot whose modules are all in modules.dep never asks.
    builtin_text: String,
    builtin: std::cell::OnceCell<Vec<String>>,
}

/// The soft dependencies kept per module and direction (real ones name a handful).
const MAX_SOFTDEPS: usize = 32;

/// How many leading bytes of a modalias choose the patterns it is matched against: the
/// bus and the vendor for PCI (`pci:v00008086`) and USB (`usb:v0BC2p20`).
const KEY: usize = 13;

/// One `alias PATTERN MODULE` line: byte ranges in [`ModuleIndex::alias_text`].
#[derive(Debug, Clone, Copy)]
struct Alias {
    pattern: (usize, usize),
    module: (usize, usize),
    /// The length of the pattern's start before its first `*`, `?` or `[`.
    literal: usize,
}

/// One module to load, in order; `optional` for soft dependencies, whose failure is no error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub name: String,
    pub path: String,
    pub optional: bool,
}

/// `kernel/fs/btrfs/btrfs.ko.zst` → `btrfs`; `crc32c-intel` → `crc32c_intel`.
pub fn module_name(path_or_name: &str) -> String {
    // On bytes, one allocation, no substring searcher: this runs for every line of
    // modules.dep and modules.builtin at boot. '/', '.', '-' and '_' are ASCII, so the
    // cuts and the swap keep the text valid UTF-8.
    let bytes = path_or_name.as_bytes();
    let base = &bytes[bytes.iter().rposition(|&b| b == b'/').map_or(0, |i| i + 1)..];
    let end = (0..base.len().saturating_sub(2))
        .find(|&i| base[i..i + 3] == *b".ko")
        .unwrap_or(base.len());
    let name: Vec<u8> = base[..end].iter().map(|&b| if b == b'-' { b'_' } else { b }).collect();
    String::from_utf8(name).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

impl ModuleIndex {
    /// Reads the index files from a `/lib/modules/<kver>` directory; only modules.dep is
    /// required. The aliases come from the builder's [`COMPILED_ALIAS`] when it is there
    /// (layerboot's initramfs), else from modules.alias (a distro's, under `--mount-root`).
    pub fn load(dir: &Path) -> Result<ModuleIndex> {
        let read = |name: &str, required: bool| -> Result<Option<Vec<u8>>> {
            let p = dir.join(name);
            match fs::read(&p) {
                Ok(s) => Ok(Some(s)),
                Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io("cannot read module index", &p, e)),
            }
        };
        let text = |name: &str, required: bool| -> Result<String> {
            let bytes = read(name, required)?.unwrap_or_default();
            String::from_utf8(bytes).map_err(|_| {
                Error::new(format!(
                    "{} is not text (fix: run depmod for that kernel again)",
                    dir.join(name).display()
                ))
            })
        };
        let mut idx = ModuleIndex::parse_without_aliases(
            &text("modules.dep", true)?,
            &text("modules.softdep", false)?,
            &text("modules.builtin", false)?,
        );
        match read(COMPILED_ALIAS, false)? {
            Some(table) => match decode_alias_table(table) {
                Ok((text, aliases)) => idx.index_aliases(text, aliases),
                Err(problem) => {
                    return Err(Error::new(format!(
                        "{} {problem} (fix: build the initramfs again with this version of layerboot)",
                        dir.join(COMPILED_ALIAS).display()
                    )))
                }
            },
            None => {
                let text = text("modules.alias", false)?;
                let aliases = alias_lines(&text);
                idx.index_aliases(text, aliases);
            }
        }
        Ok(idx)
    }

    pub fn parse(dep: &str, softdep: &str, alias: &str, builtin: &str) -> ModuleIndex {
        let mut idx = ModuleIndex::parse_without_aliases(dep, softdep, builtin);
        idx.index_aliases(alias.to_string(), alias_lines(alias));
        idx
    }

    fn parse_without_aliases(dep: &str, softdep: &str, builtin: &str) -> ModuleIndex {
        let mut idx = ModuleIndex::default();
        for line in dep.lines() {
            let Some((path, deps)) = line.split_once(':') else {
                continue;
            };
            let deps = deps.split_ascii_whitespace().map(module_name).collect();
            idx.modules.insert(module_name(path), (path.trim().to_string(), deps));
        }
        for line in softdep.lines().filter(|l| !l.trim_start().starts_with('#')) {
            let mut words = line.split_ascii_whitespace();
            if words.next() != Some("softdep") {
                continue;
            }
            let Some(module) = words.next() else { continue };
            let entry = idx.softdeps.entry(module_name(module)).or_default();
            let mut post = false;
            for w in words {
                let list = match w {
                    "pre:" => {
                        post = false;
                        continue;
                    }
                    "post:" => {
                        post = true;
                        continue;
                    }
                    _ if post => &mut entry.1,
                    _ => &mut entry.0,
                };
                // Each name once, and a real module's few: every name is matched against
                // the aliases on each visit, so a crafted line of thousands made loading
                // one module quadratic (seconds for 127 KB of index, days at its bound).
                if list.len() < MAX_SOFTDEPS && !list.iter().any(|x| x == w) {
                    list.push(w.to_string());
                }
            }
        }
        idx.builtin_text = builtin.to_string();
        idx
    }

    /// Takes modules.alias's `text` and its lines' places in it, and sorts the patterns
    /// by the keys coldplug looks them up by.
    fn index_aliases(&mut self, text: String, aliases: Vec<Alias>) {
        self.alias_text = text;
        self.aliases = aliases;
        self.by_key.clear();
        self.short.clear();
        let bytes = self.alias_text.as_bytes();
        for (i, a) in self.aliases.iter().enumerate() {
            match bytes[a.pattern.0..a.pattern.1].first_chunk::<KEY>() {
                Some(key) if a.literal >= KEY => self.by_key.push((*key, i)),
                _ => {
                    let first = if a.literal == 0 { 0 } else { bytes[a.pattern.0] };
                    self.short.push((first, i))
                }
            }
        }
        // Keys copied out and positions unique: a plain sort, the cheapest there is.
        self.by_key.sort_unstable();
        self.short.sort_unstable();
    }

    /// The built-in module names, sorted and unique.
    fn builtin(&self) -> &[String] {
        self.builtin.get_or_init(|| {
            let mut names: Vec<String> = self
                .builtin_text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(module_name)
                .collect();
            names.sort_unstable();
            names.dedup();
            names
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.modules.contains_key(&module_name(name))
    }

    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin().binary_search(&module_name(name)).is_ok()
    }

    /// Whether module `name` can work on the CPU whose modalias (`/sys/devices/system/cpu/modalias`)
    /// is `cpu`: a module with `cpu:` aliases (crc32c-intel, sha256-ssse3) needs one of
    /// them to match, or its init fails with ENODEV after the whole (slow) load.
    pub fn fits_cpu(&self, name: &str, cpu: &str) -> bool {
        let mut cpu_aliases = self
            .aliases
            .iter()
            .filter(|a| self.pattern_of(a).starts_with("cpu:") && module_name(self.module_of(a)) == name)
            .peekable();
        cpu_aliases.peek().is_none() || cpu_aliases.any(|a| glob_match(self.pattern_of(a), cpu))
    }

    fn pattern_of(&self, a: &Alias) -> &str {
        &self.alias_text[a.pattern.0..a.pattern.1]
    }

    /// The module an alias names, as written (depmod writes `_`, never `-`).
    fn module_of(&self, a: &Alias) -> &str {
        &self.alias_text[a.module.0..a.module.1]
    }

    pub fn path(&self, name: &str) -> Option<&str> {
        self.modules.get(&module_name(name)).map(|(p, _)| p.as_str())
    }

    /// Module names for a name or alias (`crc32c` → `crc32c_generic`, `crc32c_intel`).
    pub fn resolve(&self, name_or_alias: &str) -> Vec<String> {
        let name = module_name(name_or_alias);
        if self.modules.contains_key(&name) {
            return vec![name];
        }
        // The patterns that can match: those that begin as the text does, and the short ones.
        let text = name_or_alias.as_bytes();
        let starting = |first: u8| {
            let from = self.short.partition_point(|&(f, _)| f < first);
            let to = self.short.partition_point(|&(f, _)| f <= first);
            self.short[from..to].iter().map(|&(_, i)| i)
        };
        let mut candidates: Vec<usize> = starting(0).collect();
        if let Some(&first) = text.first().filter(|&&b| b != 0) {
            candidates.extend(starting(first));
        }
        if let Some(start) = text.first_chunk::<KEY>() {
            let from = self.by_key.partition_point(|(key, _)| key < start);
            let to = self.by_key.partition_point(|(key, _)| key <= start);
            candidates.extend(self.by_key[from..to].iter().map(|(_, i)| i));
        }
        candidates.sort_unstable(); // file order, as modprobe reports matches
        let mut out: Vec<String> = candidates
            .into_iter()
            .map(|i| &self.aliases[i])
            .filter(|a| glob_match_after(self.pattern_of(a).as_bytes(), text, a.literal))
            .map(|a| module_name(self.module_of(a)))
            .filter(|m| self.modules.contains_key(m))
            .collect();
        out.dedup();
        out
    }

    /// The load order for `wanted`, each module once. A wanted module that is neither in
    /// the index nor built in is an error; soft dependencies that cannot be found are skipped.
    pub fn load_order(&self, wanted: &[String]) -> Result<Vec<Step>> {
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        for w in wanted {
            let names = self.resolve(w);
            if names.is_empty() {
                if self.is_builtin(w) {
                    continue;
                }
                return Err(Error::new(format!(
                    "kernel module '{w}' is not in modules.dep (not packed, or not built for this kernel)"
                )));
            }
            for n in names {
                self.visit(&n, false, &mut seen, &mut order, 0)?;
            }
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        optional: bool,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<Step>,
        depth: usize,
    ) -> Result<()> {
        if depth > 64 {
            return Err(Error::new(format!("module dependencies of '{name}' loop")));
        }
        if !seen.insert(name.to_string()) {
            return Ok(());
        }
        let Some((path, deps)) = self.modules.get(name) else {
            return Err(Error::new(format!(
                "kernel module '{name}' is missing from modules.dep"
            )));
        };
        let (pre, post) = self.softdeps.get(name).cloned().unwrap_or_default();
        for s in &pre {
            for m in self.resolve(s) {
                self.visit(&m, true, seen, order, depth + 1)?;
            }
        }
        for d in deps {
            self.visit(d, optional, seen, order, depth + 1)?;
        }
        order.push(Step {
            name: name.to_string(),
            path: path.clone(),
            optional,
        });
        for s in &post {
            for m in self.resolve(s) {
                self.visit(&m, true, seen, order, depth + 1)?;
            }
        }
        Ok(())
    }

    /// The index files restricted to `names` (for packing into the initramfs).
    pub fn render(&self, names: &BTreeSet<String>) -> BTreeMap<&'static str, String> {
        let mut dep = String::new();
        for (name, (path, deps)) in &self.modules {
            if names.contains(name) {
                let deps: Vec<&str> = deps
                    .iter()
                    .filter_map(|d| self.modules.get(d).map(|(p, _)| p.as_str()))
                    .collect();
                dep.push_str(&format!("{path}: {}\n", deps.join(" ")).replace(": \n", ":\n"));
            }
        }
        let mut soft = String::new();
        for (name, (pre, post)) in &self.softdeps {
            if names.contains(name) {
                let mut line = format!("softdep {name}");
                if !pre.is_empty() {
                    line.push_str(&format!(" pre: {}", pre.join(" ")));
                }
                if !post.is_empty() {
                    line.push_str(&format!(" post: {}", post.join(" ")));
                }
                soft.push_str(&line);
                soft.push('\n');
            }
        }
        // Sorted by pattern: /init sorts the patterns it indexes as it reads them, and a
        // sorted run costs it one pass instead of a sort (0.5 ms under emulation). Which
        // modules an alias names does not depend on the order.
        let mut lines: Vec<(&str, &str)> = self
            .aliases
            .iter()
            .filter(|a| names.contains(&module_name(self.module_of(a))))
            .map(|a| (self.pattern_of(a), self.module_of(a)))
            .collect();
        lines.sort_unstable();
        lines.dedup();
        let alias: String = lines.iter().map(|(p, m)| format!("alias {p} {m}\n")).collect();
        let builtin: String = self.builtin().iter().map(|m| format!("{m}\n")).collect();
        BTreeMap::from([
            ("modules.dep", dep),
            ("modules.softdep", soft),
            ("modules.alias", alias),
            ("modules.builtin", builtin),
        ])
    }
}

/// fnmatch(3) without flags, as POSIX and musl define it: `*`, `?` and `[...]` classes,
/// an unterminated `[` a literal (glibc differs when such a bracket ends in `-`), as
/// modules.alias uses them, on bytes (aliases are ASCII). Coldplug matches every device against every alias, so
/// this runs ~10⁵ times per boot under emulation: it must not allocate, and a pattern
/// whose literal start differs from the text is dismissed before any glob work.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p = pattern.as_bytes();
    glob_match_after(p, text.as_bytes(), literal_start(p))
}

/// The length of a pattern's start before its first `*`, `?` or `[`.
fn literal_start(p: &[u8]) -> usize {
    p.iter()
        .position(|b| matches!(b, b'*' | b'?' | b'['))
        .unwrap_or(p.len())
}

/// Every `alias PATTERN MODULE` line of modules.alias, in order, as places in `text`.
fn alias_lines(text: &str) -> Vec<Alias> {
    // Each word's place in the text: words are slices of it.
    let at = |word: &str| word.as_ptr() as usize - text.as_ptr() as usize;
    let mut aliases = Vec::new();
    for line in text.lines() {
        let mut words = line.split_ascii_whitespace();
        if let (Some("alias"), Some(pattern), Some(module)) = (words.next(), words.next(), words.next()) {
            aliases.push(Alias {
                pattern: (at(pattern), at(pattern) + pattern.len()),
                module: (at(module), at(module) + module.len()),
                literal: literal_start(pattern.as_bytes()),
            });
        }
    }
    aliases
}

/// The alias table the builder packs in place of modules.alias: that file's text, then
/// where each line's pattern and module are in it. Scanning 50 KB of text for its lines
/// and words was 1.2 of the 1.4 M instructions /init took to read the module index under
/// emulation; this table is read in a pass over its numbers.
pub const COMPILED_ALIAS: &str = "layerboot.alias";

/// The table's first bytes; the `1` is its layout's version.
const TABLE_MAGIC: &[u8; 8] = b"LBALIAS1";

/// The table: [`TABLE_MAGIC`], the number of lines, per line its pattern's start and end,
/// its module's start and end and the length of the pattern's literal start, then the
/// text. All numbers are little-endian u32s: five fixed fields need no format crate (any
/// would decode field by field just the same).
pub fn compile_aliases(text: &str) -> Vec<u8> {
    let aliases = alias_lines(text);
    let mut table = Vec::with_capacity(12 + 20 * aliases.len() + text.len());
    let put = |t: &mut Vec<u8>, n: usize| t.extend_from_slice(&(n as u32).to_le_bytes());
    table.extend_from_slice(TABLE_MAGIC);
    put(&mut table, aliases.len());
    for a in &aliases {
        for n in [a.pattern.0, a.pattern.1, a.module.0, a.module.1, a.literal] {
            put(&mut table, n);
        }
    }
    table.extend_from_slice(text.as_bytes());
    table
}

/// A [`compile_aliases`] table back as its text and lines. Every place is checked against
/// the text, so a damaged table is an error, never a panic or a slice out of it.
fn decode_alias_table(mut table: Vec<u8>) -> std::result::Result<(String, Vec<Alias>), &'static str> {
    let number = |b: &[u8], at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize;
    if table.len() < 12 || table[..8] != TABLE_MAGIC[..] {
        return Err("is not a layerboot alias table of this version");
    }
    let count = number(&table, 8);
    let text_start = count
        .checked_mul(20)
        .and_then(|n| n.checked_add(12))
        .filter(|&n| n <= table.len())
        .ok_or("is cut short")?;
    let text = String::from_utf8(table.split_off(text_start)).map_err(|_| "holds an alias text that is not UTF-8")?;
    let mut aliases = Vec::with_capacity(count);
    for record in table[12..].chunks_exact(20) {
        let a = Alias {
            pattern: (number(record, 0), number(record, 4)),
            module: (number(record, 8), number(record, 12)),
            literal: number(record, 16),
        };
        let place = |(start, end): (usize, usize)| (start <= end).then(|| text.get(start..end)).flatten();
        let (Some(pattern), Some(_)) = (place(a.pattern), place(a.module)) else {
            return Err("places a line outside its text");
        };
        // The literal start ends at the pattern's end or at a wildcard. Whether it holds
        // none would take a pass over every pattern (0.19 M instructions at each boot)
        // for a file written by the builder that wrote /init beside it.
        match pattern.as_bytes().get(a.literal) {
            None if a.literal == pattern.len() => {}
            Some(b'*' | b'?' | b'[') => {}
            _ => return Err("gives a pattern a literal start that does not end at a wildcard"),
        }
        aliases.push(a);
    }
    Ok((text, aliases))
}

/// [`glob_match`] for a pattern whose literal start, `literal` bytes long, is known.
fn glob_match_after(p: &[u8], t: &[u8], literal: usize) -> bool {
    if literal == p.len() {
        return p == t;
    }
    if !t.starts_with(&p[..literal]) {
        return false;
    }
    let (mut pi, mut ti) = (literal, literal);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(next) = (pi < p.len()).then(|| match_one(p, pi, t[ti])).flatten() {
            pi = next;
            ti += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

/// Matches one pattern element at `p[pi]` against `c`; returns the index after it.
fn match_one(p: &[u8], pi: usize, c: u8) -> Option<usize> {
    match p[pi] {
        b'?' => Some(pi + 1),
        b'[' => {
            let mut i = pi + 1;
            let negate = i < p.len() && (p[i] == b'!' || p[i] == b'^');
            if negate {
                i += 1;
            }
            let mut hit = false;
            let start = i;
            while i < p.len() && (p[i] != b']' || i == start) {
                if i + 2 < p.len() && p[i + 1] == b'-' && p[i + 2] != b']' {
                    hit |= p[i] <= c && c <= p[i + 2];
                    i += 3;
                } else {
                    hit |= p[i] == c;
                    i += 1;
                }
            }
            if i >= p.len() {
                return (p[pi] == c).then_some(pi + 1); // unterminated: a literal '['
            }
            (hit != negate).then_some(i + 1)
        }
        x => (x == c).then_some(pi + 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Lines as in Debian 12's 6.1 kernel.
    const DEP: &str =
        "kernel/fs/btrfs/btrfs.ko: kernel/crypto/xor.ko kernel/lib/raid6/raid6_pq.ko kernel/lib/libcrc32c.ko
kernel/crypto/xor.ko:
kernel/lib/raid6/raid6_pq.ko:
kernel/lib/libcrc32c.ko:
kernel/crypto/crc32c_generic.ko:
kernel/arch/x86/crypto/crc32c-intel.ko:
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
";
    const SOFT: &str = "# comment\nsoftdep btrfs pre: crypto-crc32c\nsoftdep libcrc32c pre: crc32c\n";
    const ALIAS: &str = "alias crypto-crc32c crc32c_intel\nalias crc32c crc32c_intel\nalias cpu:type:x86,ven*fam*mod*:feature:*0094* crc32c_intel\nalias crypto-crc32c crc32c_generic\nalias crc32c crc32c_generic\nalias virtio:d00000002v* virtio_blk\n";

    fn idx() -> ModuleIndex {
        ModuleIndex::parse(DEP, SOFT, ALIAS, "kernel/fs/ext4/ext4.ko\n")
    }

    fn names(steps: &[Step]) -> Vec<(&str, bool)> {
        steps.iter().map(|s| (s.name.as_str(), s.optional)).collect()
    }

    #[test]
    fn btrfs_loads_crc32c_before_libcrc32c_before_btrfs() {
        let order = idx().load_order(&["btrfs".into()]).unwrap();
        assert_eq!(
            names(&order),
            vec![
                ("crc32c_intel", true),
                ("crc32c_generic", true),
                ("xor", false),
                ("raid6_pq", false),
                ("libcrc32c", false),
                ("btrfs", false)
            ]
        );
        assert_eq!(order.last().unwrap().path, "kernel/fs/btrfs/btrfs.ko");
    }

    #[test]
    fn module_names_come_from_paths_and_aliases_as_modprobe_spells_them() {
        for (given, name) in [
            ("kernel/fs/btrfs/btrfs.ko.zst", "btrfs"),
            ("crc32c-intel", "crc32c_intel"),
            ("kernel/drivers/ata/pata_it8213.ko", "pata_it8213"),
            ("a/b/", ""),
            (".ko", ""),
            ("ko", "ko"),
            ("x.k", "x.k"),
            ("é-ü.ko.xz", "é_ü"),
        ] {
            assert_eq!(module_name(given), name, "{given}");
        }
    }

    proptest::proptest! {
        /// The byte-wise cut agrees with the plain reading: the text after the last '/',
        /// up to the first ".ko", with '-' as '_'.
        #[test]
        fn module_name_agrees_with_the_plain_reading(s in "[a-z/._é-]{0,24}") {
            let base = s.rsplit('/').next().unwrap();
            let plain = base[..base.find(".ko").unwrap_or(base.len())].replace('-', "_");
            proptest::prop_assert_eq!(module_name(&s), plain);
        }
    }

    #[test]
    fn a_softdep_line_of_thousands_of_names_costs_a_few() {
        let softdep = format!("softdep btrfs pre: {} post: a a b\n", "q ".repeat(100_000));
        let distinct: String = (0..1000).map(|i| format!("q{i} ")).collect();
        let softdep = format!("{softdep}softdep ext4 pre: {distinct}\n");
        let alias: String = (0..4000).map(|i| format!("alias *{i} x\n")).collect();
        let idx = ModuleIndex::parse(
            "kernel/fs/btrfs/btrfs.ko:\nkernel/fs/ext4/ext4.ko:\n",
            &softdep,
            &alias,
            "",
        );
        assert_eq!(
            idx.softdeps["btrfs"],
            (vec!["q".to_string()], vec!["a".to_string(), "b".to_string()])
        );
        assert_eq!(idx.softdeps["ext4"].0.len(), MAX_SOFTDEPS);
        let names = |steps: Vec<Step>| steps.into_iter().map(|s| s.name).collect::<Vec<_>>();
        assert_eq!(
            names(idx.load_order(&["btrfs".into(), "ext4".into()]).unwrap()),
            ["btrfs", "ext4"]
        );
    }

    #[test]
    fn builtins_are_skipped_and_unknown_modules_named() {
        assert!(idx().load_order(&["ext4".into()]).unwrap().is_empty());
        let e = idx().load_order(&["nvme".into()]).unwrap_err().to_string();
        assert!(e.contains("'nvme' is not in modules.dep"), "{e}");
        assert_eq!(idx().resolve("virtio:d00000002v00001AF4"), vec!["virtio_blk"]);
        assert_eq!(idx().resolve("crc32c-intel"), vec!["crc32c_intel"]);
    }

    #[test]
    fn modaliases_match_their_bus_patterns_and_wildcard_led_ones_in_file_order() {
        let idx = ModuleIndex::parse(
            "a.ko:\nb.ko:\nc.ko:\n",
            "",
            "alias pci:v1234d* b\nalias usb:v1234* c\nalias ?ci:v1234* a\nalias pci:v1234d0001* c\n",
            "",
        );
        assert_eq!(idx.resolve("pci:v1234d0001sv0"), ["b", "a", "c"]);
        assert_eq!(idx.resolve("usb:v1234p1"), ["c"]);
        assert!(idx.resolve("acpi:v1234").is_empty());
    }

    /// What `resolve` must return for a modalias: every line's pattern tried in file
    /// order, as modprobe does, with no keyed shortcut.
    fn every_line(alias: &str, modules: &ModuleIndex, text: &str) -> Vec<String> {
        let mut out: Vec<String> = alias
            .lines()
            .filter_map(|l| l.strip_prefix("alias ")?.split_once(' '))
            .filter(|(p, _)| glob_match(p, text))
            .map(|(_, m)| module_name(m))
            .filter(|m| modules.contains(m))
            .collect();
        out.dedup();
        out
    }

    proptest::proptest! {
        /// Patterns of every shape (literal starts shorter and longer than the key, a
        /// leading wildcard, none at all) against modaliases built from their pieces: the
        /// keyed lookup finds exactly what trying every line finds, in the same order.
        #[test]
        fn the_keyed_lookup_finds_what_every_line_finds(
            patterns in proptest::collection::vec(("(pci:v0000|usb:v|acpi|\\*|crc)", "(8086|80|[0-9A]{1,4})", "(d|\\*|\\?|\\[0-9\\])?", "(00007010|[0-9]{0,4})", "\\*?", 0..4usize), 1..40),
            texts in proptest::collection::vec(("(pci:v0000|usb:v|acpi|crc)", "(8086|80|[0-9A]{1,4})", "d?", "(00007010|[0-9]{0,4})", "(sv00|)"), 1..20),
        ) {
            let alias: String = patterns
                .iter()
                .map(|(a, b, c, d, e, m)| format!("alias {a}{b}{c}{d}{e} m{m}\n"))
                .collect();
            let idx = ModuleIndex::parse("m0.ko:\nm1.ko:\nm2.ko:\n", "", &alias, "");
            for (a, b, c, d, e) in &texts {
                let text = format!("{a}{b}{c}{d}{e}");
                proptest::prop_assert_eq!(idx.resolve(&text), every_line(&alias, &idx, &text), "{}", text);
            }
        }
    }

    #[test]
    fn cpu_bound_modules_fit_only_cpus_with_their_feature() {
        // Feature 0x94 is SSE4.2; QEMU's default TCG CPU (qemu64) lacks it.
        let with = "cpu:type:x86,ven0000fam0006mod003F:feature:,0000,0001,0094,00E5";
        let without = "cpu:type:x86,ven0000fam0006mod0006:feature:,0000,0001,0002,0003";
        assert!(idx().fits_cpu("crc32c_intel", with));
        assert!(!idx().fits_cpu("crc32c_intel", without));
        assert!(idx().fits_cpu("crc32c_generic", without), "no cpu: alias, no condition");
    }

    #[test]
    fn rendered_index_round_trips() {
        let keep: BTreeSet<String> = ["btrfs", "xor", "raid6_pq", "libcrc32c", "crc32c_generic"]
            .map(String::from)
            .into();
        let files = idx().render(&keep);
        let again = ModuleIndex::parse(
            &files["modules.dep"],
            &files["modules.softdep"],
            &files["modules.alias"],
            &files["modules.builtin"],
        );
        let order = again.load_order(&["btrfs".into()]).unwrap();
        assert_eq!(
            names(&order).iter().map(|n| n.0).collect::<Vec<_>>(),
            ["crc32c_generic", "xor", "raid6_pq", "libcrc32c", "btrfs"]
        );
        assert!(!files["modules.alias"].contains("crc32c_intel"));
    }

    #[test]
    fn globs_behave_like_fnmatch() {
        for (p, t, want) in [
            ("pci:v00008086d*sv*", "pci:v00008086d00001234sv0000", true),
            ("pci:v00008086d*sv*", "pci:v00001AF4d00001234sv0000", false),
            ("a?c", "abc", true),
            ("[a-c]x", "bx", true),
            ("[!a-c]x", "bx", false),
            ("*", "", true),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "aXbY", false),
            ("virtio:d00000002v*", "virtio:d00000002v00001AF4", true),
            ("virtio:d00000002v*", "virtio:d00000001v00001AF4", false),
            ("crc32c", "crc32c", true),
            ("crc32c", "crc32c-intel", false),
            ("acpi*:PNP0A03:*", "acpi:PNP0A03:", true),
            ("[ab]*", "", false),
        ] {
            assert_eq!(glob_match(p, t), want, "{p} {t}");
        }
    }

    /// Found by the `glob` fuzz target against glibc's fnmatch: an unterminated bracket
    /// ending in a range with no end. POSIX and musl (the libc of /init) read the `[` as
    /// a literal; glibc says no match. glob_match follows POSIX.
    #[test]
    fn an_unterminated_bracket_is_a_literal_as_posix_says() {
        assert!(glob_match("*[]-", "*[]-"));
        assert!(glob_match("a[b-", "a[b-"));
        assert!(!glob_match("a[b-", "ab"));
    }

    /// What a reader of the index sees of its aliases: each line's pattern, module and
    /// literal start, in order.
    fn alias_view(idx: &ModuleIndex) -> Vec<(String, String, usize)> {
        idx.aliases
            .iter()
            .map(|a| (idx.pattern_of(a).to_string(), idx.module_of(a).to_string(), a.literal))
            .collect()
    }

    #[test]
    fn the_compiled_alias_table_reads_back_as_modules_alias_does() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("modules.dep"), DEP).unwrap();
        fs::write(t.path().join("modules.alias"), ALIAS).unwrap();
        let from_text = ModuleIndex::load(t.path()).unwrap();
        // The table wins over modules.alias when both are there.
        fs::write(t.path().join("modules.alias"), "alias virtio:* wrong\n").unwrap();
        fs::write(t.path().join(COMPILED_ALIAS), compile_aliases(ALIAS)).unwrap();
        let from_table = ModuleIndex::load(t.path()).unwrap();
        assert_eq!(alias_view(&from_table), alias_view(&from_text));
        assert_eq!(
            (from_table.by_key.clone(), from_table.short.clone()),
            (from_text.by_key, from_text.short)
        );
        assert_eq!(from_table.resolve("virtio:d00000002v00001AF4"), ["virtio_blk"]);
        assert_eq!(from_table.resolve("crc32c"), ["crc32c_intel", "crc32c_generic"]);
    }

    #[test]
    fn a_damaged_alias_table_is_named_never_read_wrong() {
        let good = compile_aliases(ALIAS);
        let count = ALIAS.lines().count();
        let mut cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", Vec::new()),
            ("another version", [b"LBALIAS2", &good[8..]].concat()),
            ("cut in its header", good[..10].to_vec()),
            ("cut in its lines", good[..12 + 20 * count - 3].to_vec()),
            (
                "a count past the end",
                [&good[..8], &u32::MAX.to_le_bytes()[..], &good[12..]].concat(),
            ),
        ];
        let mut field = |name: &'static str, at: usize, value: u32| {
            let mut bad = good.clone();
            bad[at..at + 4].copy_from_slice(&value.to_le_bytes());
            cases.push((name, bad));
        };
        field("a pattern past the text", 16, ALIAS.len() as u32 + 1);
        field("a pattern ending before it starts", 12, 20);
        field("a module past the text", 24, u32::MAX);
        field("a literal start longer than its pattern", 28, 1000);
        field("a literal start ending at no wildcard", 28, 3);
        let mut not_utf8 = good.clone();
        *not_utf8.last_mut().unwrap() = 0xff;
        cases.push(("a text that is not UTF-8", not_utf8));
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("modules.dep"), DEP).unwrap();
        for (what, table) in cases {
            fs::write(t.path().join(COMPILED_ALIAS), table).unwrap();
            let e = ModuleIndex::load(t.path()).unwrap_err().to_string();
            assert!(
                e.contains("layerboot.alias") && e.contains("fix: build the initramfs again"),
                "{what}: {e}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn any_alias_text_compiles_to_the_same_lines(text in "(alias [a-z:*?\\[\\]]{0,12} [a-z_]{0,6}\n|[ a-z\n]{0,8}){0,8}") {
            let mut idx = ModuleIndex::default();
            let (decoded, lines) = decode_alias_table(compile_aliases(&text)).unwrap();
            idx.index_aliases(decoded, lines);
            proptest::prop_assert_eq!(alias_view(&idx), alias_view(&ModuleIndex::parse("", "", &text, "")));
        }

        #[test]
        fn any_bytes_as_an_alias_table_are_an_error_or_places_in_its_text(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..96)) {
            if let Ok((text, lines)) = decode_alias_table([&TABLE_MAGIC[..], &bytes].concat()) {
                for a in lines {
                    proptest::prop_assert!(text.get(a.pattern.0..a.pattern.1).is_some() && text.get(a.module.0..a.module.1).is_some());
                }
            }
        }
    }
}
