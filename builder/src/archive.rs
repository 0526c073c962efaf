//! The initramfs file: a newc cpio (the cpio crate) of an in-memory tree, compressed.
//! Entries are written in path order, owned by root, with one mtime, so the same inputs
//! give the same bytes.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;

/// One entry of the archive.
pub enum Node {
    Dir,
    File { data: Vec<u8>, mode: u32 },
    CharDev { major: u32, minor: u32, mode: u32 },
}

#[derive(Default)]
pub struct Tree(BTreeMap<String, Node>);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Compression {
    /// Each module its own zstd frame, which /init decompresses if it loads it; the
    /// archive itself uncompressed (see [`compress`]).
    Zstd,
    /// The whole archive gzipped, modules as they are.
    Gzip,
    None,
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "zstd" => Ok(Compression::Zstd),
            "gzip" => Ok(Compression::Gzip),
            "none" => Ok(Compression::None),
            _ => Err(format!("unknown compression '{s}': use zstd, gzip or none")),
        }
    }
}

/// The level of each module's zstd frame. Measured on the default set (59 modules, 18 MiB,
/// the zstd CLI on one core): level 6 gives 4.09 MB in 0.94 s, 9 gives 3.99 MB in 1.30 s,
/// 12 only 3.97 MB in 2.37 s. Every level decompresses at the same ~14 instructions a
/// byte, so size and build time decide: 9 is what keeps the unpacked archive (modules
/// and an uncompressed /init) under 5 MiB.
const ZSTD_LEVEL: i32 = 9;

impl Tree {
    pub fn dir(&mut self, path: &str) {
        self.0.insert(path.to_string(), Node::Dir);
    }

    pub fn file(&mut self, path: &str, data: Vec<u8>, mode: u32) {
        self.0.insert(path.to_string(), Node::File { data, mode });
    }

    pub fn char_dev(&mut self, path: &str, major: u32, minor: u32, mode: u32) {
        self.0.insert(path.to_string(), Node::CharDev { major, minor, mode });
    }

    /// Paths and sizes, for `--list`.
    pub fn listing(&self) -> Vec<(String, usize)> {
        self.0
            .iter()
            .map(|(p, n)| (p.clone(), if let Node::File { data, .. } = n { data.len() } else { 0 }))
            .collect()
    }

    fn add_parent_dirs(&mut self) {
        let parents: BTreeSet<String> = self
            .0
            .keys()
            .flat_map(|p| {
                let parts: Vec<&str> = p.split('/').collect();
                (1..parts.len()).map(move |i| parts[..i].join("/"))
            })
            .collect();
        for p in parents {
            self.0.entry(p).or_insert(Node::Dir);
        }
    }

    /// The uncompressed newc archive.
    pub fn cpio(mut self, mtime: u32) -> std::io::Result<Vec<u8>> {
        self.add_parent_dirs();
        let mut out = Vec::new();
        for (ino, (path, node)) in self.0.iter().enumerate() {
            let b = cpio::newc::Builder::new(path)
                .ino(ino as u32 + 1)
                .uid(0)
                .gid(0)
                .mtime(mtime);
            out = match node {
                Node::Dir => b.mode(0o040755).nlink(2).write(out, 0).finish()?,
                Node::File { data, mode } => {
                    let mut w = b.mode(0o100000 | mode).nlink(1).write(out, data.len() as u32);
                    w.write_all(data)?;
                    w.finish()?
                }
                Node::CharDev { major, minor, mode } => b
                    .mode(0o020000 | mode)
                    .nlink(1)
                    .rdev_major(*major)
                    .rdev_minor(*minor)
                    .write(out, 0)
                    .finish()?,
            };
        }
        cpio::newc::trailer(out)
    }
}

/// zstd frames of each of `items` alone, at the archive's level, on every core. Each
/// frame records its content size, which /init reads to size its buffer.
pub fn zstd_each(items: &[&[u8]]) -> std::io::Result<Vec<Vec<u8>>> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut frames: Vec<(usize, Vec<u8>)> = std::thread::scope(|scope| {
        // Worker w takes items w, w + workers, …: the big modules spread over the cores.
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                scope.spawn(move || -> std::io::Result<Vec<(usize, Vec<u8>)>> {
                    let mut enc = zstd::bulk::Compressor::new(ZSTD_LEVEL)?;
                    let mine = items.iter().enumerate().skip(w).step_by(workers);
                    mine.map(|(i, data)| Ok((i, enc.compress(data)?))).collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a compressing thread panicked"))
            .collect::<std::io::Result<Vec<_>>>()
    })?
    .into_iter()
    .flatten()
    .collect();
    frames.sort_by_key(|(i, _)| *i);
    Ok(frames.into_iter().map(|(_, frame)| frame).collect())
}

/// The archive as the kernel gets it. With zstd each module is already its own frame
/// and the archive stays as it is: compressing it again would save 0.7 MiB (mostly
/// /init) but make the kernel decompress /init at every boot, which cost 13 ms more
/// than copying the whole 5 MiB (boot bench, `-icount`: /init ran at 1.719 s, 1.706 s
/// uncompressed).
pub fn compress(data: Vec<u8>, how: Compression) -> std::io::Result<Vec<u8>> {
    match how {
        Compression::None | Compression::Zstd => Ok(data),
        Compression::Gzip => {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            enc.write_all(&data)?;
            enc.finish()
        }
    }
}
