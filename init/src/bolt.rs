//! A read-only reader of bbolt database files, enough to walk containerd's
//! `meta.db` and its snapshotters' `metadata.db`.
//!
//! Why not a crate: `bbolt-rs` refuses a meta page without a freelist, and containerd
//! writes `meta.db` exactly so (`NoFreelistSync`); `nut` reads the page the freelist
//! field names, which is `u64::MAX` there; `bolt-lite` does not verify the meta
//! checksum, so after a crash it could follow a torn meta page. This reader never
//! looks at the freelist, picks the newest meta page whose FNV-1a checksum holds, and
//! checks every offset against the file before it reads. Format: bbolt's
//! `internal/common/{page,meta,bucket}.go`; notes in docs/image-stores.md, section "The bbolt reader".
//!
//! The file is read whole into memory (containerd's databases are a few MiB) and never
//! locked or written, so a store mounted read-only, or one an engine has open, reads fine.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

const MAGIC: u32 = 0xED0C_DAED;
const VERSION: u32 = 2;
const PAGE_HEADER: usize = 16;
const ELEMENT: usize = 16;
const BRANCH: u16 = 0x01;
const LEAF: u16 = 0x02;
const BUCKET_FLAG: u32 = 0x01;
/// A bucket header (root page, sequence) precedes an inline bucket's page in its value.
const BUCKET_HEADER: usize = 16;
/// B+tree depth bound: a corrupt file with a page cycle must not loop forever.
const MAX_DEPTH: usize = 64;
/// The largest database read whole into memory (containerd's meta.db is a few MiB).
const MAX_DB_BYTES: u64 = 256 << 20;

/// An opened database file.
pub struct Db {
    path: PathBuf,
    data: Vec<u8>,
    page_size: usize,
    root: u64,
    /// Elements this reader may still decode: see [`work_budget`].
    budget: std::cell::Cell<u64>,
}

/// A bucket: a B+tree of keys, each holding a value or a nested bucket.
#[derive(Clone, Copy)]
pub struct Bucket<'a> {
    db: &'a Db,
    /// The root page, or the inline page held in the parent's value.
    root: Node<'a>,
}

#[derive(Clone, Copy)]
enum Node<'a> {
    Page(u64),
    Inline(&'a [u8]),
}

/// What a key holds.
pub enum Item<'a> {
    Value(&'a [u8]),
    Bucket(Bucket<'a>),
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A meta page's (page size, root bucket page, txid), if its magic, version and checksum hold.
fn meta_at(data: &[u8], offset: usize) -> Option<(usize, u64, u64)> {
    let m = data.get(offset + PAGE_HEADER..offset + PAGE_HEADER + 64)?;
    let valid = u32_at(m, 0) == MAGIC && u32_at(m, 4) == VERSION && fnv1a64(&m[..56]) == u64_at(m, 56);
    valid.then(|| (u32_at(m, 8) as usize, u64_at(m, 16), u64_at(m, 48)))
}

impl Db {
    pub fn open(path: &Path) -> Result<Db> {
        let data = crate::store::read_bounded(path, MAX_DB_BYTES)?;
        Db::from_bytes(path, data)
    }

    pub fn from_bytes(path: &Path, data: Vec<u8>) -> Result<Db> {
        let first = meta_at(&data, 0);
        // The second meta page sits one page in; the page size comes from the first
        // meta, or (if that one is torn) from the sizes systems use.
        let sizes: Vec<usize> = match first {
            Some((ps, _, _)) => vec![ps],
            None => vec![4096, 8192, 16384, 32768, 65536],
        };
        let second = sizes
            .iter()
            .filter(|&&ps| ps >= 1024)
            .find_map(|&ps| meta_at(&data, ps));
        let (page_size, root, _) = [first, second]
            .into_iter()
            .flatten()
            .max_by_key(|m| m.2)
            .ok_or_else(|| {
                Error::new(format!(
                    "{} is not a bbolt database (or both its meta pages are corrupt): no valid meta page",
                    path.display()
                ))
            })?;
        if !(1024..=1 << 20).contains(&page_size) || !page_size.is_power_of_two() {
            return Err(Error::new(format!(
                "{} is corrupt: page size {page_size}",
                path.display()
            )));
        }
        Ok(Db {
            path: path.to_path_buf(),
            budget: std::cell::Cell::new(work_budget(data.len())),
            data,
            page_size,
            root,
        })
    }

    /// The top-level bucket that holds every other.
    pub fn root(&self) -> Bucket<'_> {
        Bucket {
            db: self,
            root: Node::Page(self.root),
        }
    }

    fn corrupt(&self, what: &str) -> Error {
        Error::new(format!(
            "{} is corrupt: {what} (fix: the engine rewrites it; copy the store again if it was copied)",
            self.path.display()
        ))
    }

    /// A page with its overflow pages, checked to lie inside the file.
    fn page(&self, id: u64) -> Result<&[u8]> {
        let start = usize::try_from(id)
            .ok()
            .and_then(|i| i.checked_mul(self.page_size))
            .filter(|&s| s + PAGE_HEADER <= self.data.len());
        let start = start.ok_or_else(|| self.corrupt(&format!("page {id} lies past the end of the file")))?;
        let overflow = u32_at(&self.data, start + 12) as usize;
        let end = (overflow + 1)
            .checked_mul(self.page_size)
            .and_then(|n| n.checked_add(start));
        match end {
            Some(end) if end <= self.data.len() => Ok(&self.data[start..end]),
            _ => Err(self.corrupt(&format!(
                "page {id} (with {overflow} overflow pages) runs past the end of the file"
            ))),
        }
    }
}

/// How many page elements one open database may decode in all. A real file is read a
/// few times over at most; a crafted one can make each lookup decode a whole chain of
/// full pages (65 535 elements each) and point every record at it: days of work in a
/// 256 MiB file, a boot that never ends. Four readings of every element the file could
/// hold, and never less than 16 million (well under a second).
fn work_budget(file_bytes: usize) -> u64 {
    (4 * (file_bytes / ELEMENT) as u64).max(16 << 20)
}

/// One element of a branch or leaf page.
struct Element<'a> {
    key: &'a [u8],
    /// Leaf: (flags, value). Branch: the child page.
    leaf: Option<(u32, &'a [u8])>,
    child: u64,
}

impl<'a> Bucket<'a> {
    /// The value or nested bucket at `key`, if any.
    pub fn get(&self, key: &[u8]) -> Result<Option<Item<'a>>> {
        let mut node = self.root;
        for _ in 0..MAX_DEPTH {
            let (flags, elements) = self.elements(node)?;
            if flags & BRANCH != 0 {
                // The child whose first key is the last one not above `key`.
                let i = elements.partition_point(|e| e.key <= key);
                let Some(e) = elements.get(i.saturating_sub(1)) else {
                    return Ok(None);
                };
                node = Node::Page(e.child);
                continue;
            }
            return match elements.iter().find(|e| e.key == key) {
                Some(e) => self.entry(e).map(Some),
                None => Ok(None),
            };
        }
        Err(self.db.corrupt("its B+tree is deeper than any real one (a page cycle)"))
    }

    /// A nested bucket at `key`, if there is one (a plain value there counts as none).
    pub fn bucket(&self, key: &str) -> Result<Option<Bucket<'a>>> {
        Ok(match self.get(key.as_bytes())? {
            Some(Item::Bucket(b)) => Some(b),
            _ => None,
        })
    }

    /// A plain value at `key`, if there is one.
    pub fn value(&self, key: &str) -> Result<Option<&'a [u8]>> {
        Ok(match self.get(key.as_bytes())? {
            Some(Item::Value(v)) => Some(v),
            _ => None,
        })
    }

    /// Every key in order, with what it holds.
    pub fn entries(&self) -> Result<Vec<(&'a [u8], Item<'a>)>> {
        let mut out = Vec::new();
        self.collect(self.root, 0, &mut out, &mut std::collections::HashSet::new())?;
        Ok(out)
    }

    /// In a B+tree each page has one parent: a page met twice (a crafted or corrupt file
    /// whose branches all point at one child) would make the walk exponential.
    fn collect(
        &self,
        node: Node<'a>,
        depth: usize,
        out: &mut Vec<(&'a [u8], Item<'a>)>,
        seen: &mut std::collections::HashSet<u64>,
    ) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(self.db.corrupt("its B+tree is deeper than any real one (a page cycle)"));
        }
        if let Node::Page(id) = node {
            if !seen.insert(id) {
                return Err(self.db.corrupt(&format!("page {id} is referenced twice in one bucket")));
            }
        }
        let (flags, elements) = self.elements(node)?;
        for e in &elements {
            if flags & BRANCH != 0 {
                self.collect(Node::Page(e.child), depth + 1, out, seen)?;
            } else {
                out.push((e.key, self.entry(e)?));
            }
        }
        Ok(())
    }

    fn entry(&self, e: &Element<'a>) -> Result<Item<'a>> {
        let (flags, value) = e.leaf.expect("leaf elements only");
        if flags & BUCKET_FLAG == 0 {
            return Ok(Item::Value(value));
        }
        if value.len() < BUCKET_HEADER {
            return Err(self.db.corrupt("a nested bucket's header is truncated"));
        }
        let root = u64_at(value, 0);
        let root = if root == 0 {
            Node::Inline(&value[BUCKET_HEADER..])
        } else {
            Node::Page(root)
        };
        Ok(Item::Bucket(Bucket { db: self.db, root }))
    }

    /// The page's flags and elements, every offset checked against the page.
    fn elements(&self, node: Node<'a>) -> Result<(u16, Vec<Element<'a>>)> {
        let page: &'a [u8] = match node {
            Node::Page(id) => self.db.page(id)?,
            Node::Inline(p) => p,
        };
        if page.len() < PAGE_HEADER {
            return Err(self.db.corrupt("an inline bucket's page is truncated"));
        }
        let flags = u16_at(page, 8);
        if flags & (BRANCH | LEAF) == 0 {
            return Err(self.db.corrupt(&format!(
                "a bucket points at a page that is neither branch nor leaf (flags {flags:#x})"
            )));
        }
        let count = u16_at(page, 10) as usize;
        let left = self.db.budget.get().checked_sub(count as u64).ok_or_else(|| {
            self.db
                .corrupt("reading it takes more work than a database of its size can need (crafted page references)")
        })?;
        self.db.budget.set(left);
        let mut out = Vec::with_capacity(count);
        for i in 0..count {
            let at = PAGE_HEADER + i * ELEMENT;
            let el = page
                .get(at..at + ELEMENT)
                .ok_or_else(|| self.db.corrupt("a page's element table runs past the page"))?;
            let slice = |from: usize, len: usize| {
                page.get(at + from..at + from + len)
                    .ok_or_else(|| self.db.corrupt("a key or value runs past its page"))
            };
            if flags & BRANCH != 0 {
                let (pos, ksize) = (u32_at(el, 0) as usize, u32_at(el, 4) as usize);
                out.push(Element {
                    key: slice(pos, ksize)?,
                    leaf: None,
                    child: u64_at(el, 8),
                });
            } else {
                let (f, pos, ksize, vsize) = (
                    u32_at(el, 0),
                    u32_at(el, 4) as usize,
                    u32_at(el, 8) as usize,
                    u32_at(el, 12) as usize,
                );
                let key = slice(pos, ksize)?;
                let value = slice(pos + ksize, vsize)?;
                out.push(Element {
                    key,
                    leaf: Some((f, value)),
                    child: 0,
                });
            }
        }
        Ok((flags, out))
    }
}

/// Go's `binary.Uvarint`, as containerd stores snapshot IDs.
pub fn uvarint(b: &[u8]) -> Option<u64> {
    let mut x = 0u64;
    for (i, byte) in b.iter().enumerate().take(10) {
        x |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(x);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a bbolt file the way bbolt lays it out: two meta pages, then leaf pages.
    /// Each `pages` entry is (page id, flags, elements as (flags or child, key, value)).
    struct Builder {
        ps: usize,
        data: Vec<u8>,
    }

    impl Builder {
        fn new(ps: usize, pages: usize) -> Builder {
            Builder {
                ps,
                data: vec![0; ps * pages],
            }
        }
        fn meta(&mut self, page: usize, root: u64, txid: u64) {
            let at = page * self.ps;
            self.data[at..at + 8].copy_from_slice(&(page as u64).to_le_bytes());
            self.data[at + 8..at + 10].copy_from_slice(&0x04u16.to_le_bytes());
            let m = at + PAGE_HEADER;
            self.data[m..m + 4].copy_from_slice(&MAGIC.to_le_bytes());
            self.data[m + 4..m + 8].copy_from_slice(&VERSION.to_le_bytes());
            self.data[m + 8..m + 12].copy_from_slice(&(self.ps as u32).to_le_bytes());
            self.data[m + 16..m + 24].copy_from_slice(&root.to_le_bytes());
            self.data[m + 32..m + 40].copy_from_slice(&u64::MAX.to_le_bytes()); // no freelist, as containerd writes it
            self.data[m + 48..m + 56].copy_from_slice(&txid.to_le_bytes());
            let sum = fnv1a64(&self.data[m..m + 56]);
            self.data[m + 56..m + 64].copy_from_slice(&sum.to_le_bytes());
        }
        /// A page image: leaf elements (flags, key, value) or branch elements (child, key).
        fn page_image(flags: u16, elems: &[(u64, &[u8], &[u8])]) -> Vec<u8> {
            let mut p = vec![0u8; PAGE_HEADER + ELEMENT * elems.len()];
            p[8..10].copy_from_slice(&flags.to_le_bytes());
            p[10..12].copy_from_slice(&(elems.len() as u16).to_le_bytes());
            for (i, (f, k, v)) in elems.iter().enumerate() {
                let at = PAGE_HEADER + i * ELEMENT;
                let pos = (p.len() - at) as u32;
                if flags == LEAF {
                    p[at..at + 4].copy_from_slice(&(*f as u32).to_le_bytes());
                    p[at + 4..at + 8].copy_from_slice(&pos.to_le_bytes());
                    p[at + 8..at + 12].copy_from_slice(&(k.len() as u32).to_le_bytes());
                    p[at + 12..at + 16].copy_from_slice(&(v.len() as u32).to_le_bytes());
                } else {
                    p[at..at + 4].copy_from_slice(&pos.to_le_bytes());
                    p[at + 4..at + 8].copy_from_slice(&(k.len() as u32).to_le_bytes());
                    p[at + 8..at + 16].copy_from_slice(&f.to_le_bytes());
                }
                p.extend_from_slice(k);
                p.extend_from_slice(v);
            }
            p
        }
        fn page(&mut self, id: usize, image: &[u8]) {
            let at = id * self.ps;
            self.data[at..at + image.len()].copy_from_slice(image);
        }
    }

    fn inline_bucket(elems: &[(u64, &[u8], &[u8])]) -> Vec<u8> {
        let mut v = vec![0u8; BUCKET_HEADER];
        v.extend(Builder::page_image(LEAF, elems));
        v
    }

    /// root (page 2) → branch over two leaves (pages 3, 4); "v1" holds an inline bucket.
    fn sample() -> Builder {
        let mut b = Builder::new(4096, 5);
        b.meta(0, 2, 7);
        b.meta(1, 2, 6);
        b.page(2, &Builder::page_image(BRANCH, &[(3, b"a", b""), (4, b"v1", b"")]));
        b.page(3, &Builder::page_image(LEAF, &[(0, b"a", b"1"), (0, b"b", b"2")]));
        let nested = inline_bucket(&[(0, b"id", &[0xac, 0x02]), (0, b"kind", &[3])]);
        b.page(
            4,
            &Builder::page_image(LEAF, &[(BUCKET_FLAG as u64, b"v1", &nested), (0, b"zz", b"last")]),
        );
        b
    }

    #[test]
    fn reads_values_nested_inline_buckets_through_branch_pages() {
        let db = Db::from_bytes(Path::new("t.db"), sample().data).unwrap();
        let root = db.root();
        assert_eq!(root.value("a").unwrap(), Some(&b"1"[..]));
        assert_eq!(root.value("zz").unwrap(), Some(&b"last"[..]));
        assert!(root.value("nope").unwrap().is_none());
        assert!(root.value("0").unwrap().is_none(), "before the first key");
        let v1 = root.bucket("v1").unwrap().expect("inline bucket");
        assert_eq!(uvarint(v1.value("id").unwrap().unwrap()), Some(300));
        let keys: Vec<&[u8]> = root.entries().unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, vec![&b"a"[..], b"b", b"v1", b"zz"]);
    }

    #[test]
    fn takes_the_newest_meta_whose_checksum_holds() {
        let mut b = sample();
        b.data.resize(6 * 4096, 0);
        b.page(5, &Builder::page_image(LEAF, &[(0, b"a", b"newer")]));
        b.meta(1, 5, 9); // meta 1 is now the newer one, with its own root page
        let db = Db::from_bytes(Path::new("t.db"), b.data.clone()).unwrap();
        assert_eq!(db.root().value("a").unwrap(), Some(&b"newer"[..]));
        // A torn meta 1 (checksum off) falls back to meta 0.
        b.data[4096 + PAGE_HEADER + 48] ^= 1;
        let db = Db::from_bytes(Path::new("t.db"), b.data).unwrap();
        assert_eq!(db.root().value("a").unwrap(), Some(&b"1"[..]));
    }

    #[test]
    fn lookups_that_cost_more_than_the_file_could_need_stop_with_a_named_error() {
        // One full leaf of 3500 elements, and lookups of it again and again: as if every
        // record of a crafted file pointed at one heavy chain of pages.
        let keys: Vec<[u8; 2]> = (0..3500u16).map(|i| i.to_be_bytes()).collect();
        let elems: Vec<(u64, &[u8], &[u8])> = keys.iter().map(|k| (0, &k[..], &b""[..])).collect();
        let mut b = Builder::new(1 << 16, 3);
        b.meta(0, 2, 1);
        b.meta(1, 2, 0);
        b.page(2, &Builder::page_image(LEAF, &elems));
        let db = Db::from_bytes(Path::new("heavy.db"), b.data).unwrap();
        assert_eq!(db.budget.get(), 16 << 20, "a small file's floor");
        db.budget.set(100 * 3500); // the floor's 4800 lookups, shortened for the test
        let root = db.root();
        let lookups = (0..).find(|_| root.value("absent").is_err()).unwrap();
        assert_eq!(lookups, 100);
        let e = root.value("absent").err().unwrap().to_string();
        assert!(e.contains("heavy.db is corrupt") && e.contains("more work"), "{e}");
        assert_eq!(work_budget(256 << 20), 4 << 24);
    }

    #[test]
    fn corrupt_files_are_named_errors_not_panics() {
        let e = Db::from_bytes(Path::new("x.db"), vec![0; 8192])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("x.db is not a bbolt database"), "{e}");
        let mut b = sample();
        b.page(2, &Builder::page_image(BRANCH, &[(99, b"a", b"")])); // child past the end
        let db = Db::from_bytes(Path::new("x.db"), b.data).unwrap();
        let e = db.root().value("a").err().unwrap().to_string();
        assert!(e.contains("page 99 lies past the end"), "{e}");
        let mut b = sample();
        b.page(2, &Builder::page_image(BRANCH, &[(2, b"a", b"")])); // a cycle
        let db = Db::from_bytes(Path::new("x.db"), b.data).unwrap();
        assert!(db.root().value("a").err().unwrap().to_string().contains("page cycle"));
        assert!(db.root().entries().is_err());
    }

    #[test]
    fn a_page_referenced_twice_is_refused_not_walked_exponentially() {
        // 40 levels of branch pages whose two children are both the next level: 2^40
        // visits of one leaf if walked blindly.
        let levels = 40;
        let mut b = Builder::new(4096, levels + 4);
        b.meta(0, 2, 7);
        b.meta(1, 2, 6);
        for l in 0..levels {
            let next = (3 + l) as u64;
            b.page(
                2 + l,
                &Builder::page_image(BRANCH, &[(next, b"a", b""), (next, b"b", b"")]),
            );
        }
        b.page(2 + levels, &Builder::page_image(LEAF, &[(0, b"a", b"1")]));
        let db = Db::from_bytes(Path::new("x.db"), b.data).unwrap();
        let e = db.root().entries().err().unwrap().to_string();
        assert!(e.contains("referenced twice"), "{e}");
    }
}
