//! Extended attributes, never following a symlink. nix has no xattr calls; these are the
//! plain l*xattr(2) system calls, each asked for its size first, so no list or value is
//! cut short. The one place layerboot touches xattrs: the top layer's copy, the layers'
//! marks, overlay's opaque markers.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;

use crate::error::{Error, Result};

/// The value of xattr `name` of `path`, if it has one (and it can be read).
pub fn get(path: &Path, name: &str) -> Option<Vec<u8>> {
    let p = CString::new(path.as_os_str().as_bytes()).ok()?;
    let n = CString::new(name).ok()?;
    // SAFETY: both strings are NUL-terminated; read_sized passes a buffer valid for its length.
    read_sized(|buf, len| unsafe { nix::libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.cast(), len) }).ok()
}

/// Sets xattr `name` of `path` to `value`.
pub fn set(path: &Path, name: &str, value: &[u8]) -> Result<()> {
    let p = CString::new(path.as_os_str().as_bytes()).map_err(|_| Error::new("NUL in path"))?;
    let n = CString::new(name).map_err(|_| Error::new("NUL in xattr name"))?;
    // SAFETY: NUL-terminated strings; the value is valid for its length.
    let r = unsafe { nix::libc::lsetxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    Errno::result(r)
        .map(drop)
        .map_err(|e| Error::io(&format!("cannot set {name} on"), path, e))
}

/// The prefix of layerboot's own xattrs (a layer's marks).
pub const OWN_PREFIX: &[u8] = b"trusted.layerboot.";

/// Copies every xattr (security.*, trusted.*, user.*) of `src` to `dest`, neither followed,
/// but layerboot's own ([`OWN_PREFIX`]): a copied file never carries a layer's marks.
/// An attribute the new root's filesystem refuses, or one of layerboot's, is a warning
/// (returned), not a failure; a full disk or an I/O error is a failure.
pub fn copy_all(src: &Path, dest: &Path, is_link: bool) -> Result<Vec<String>> {
    let s = CString::new(src.as_os_str().as_bytes()).map_err(|_| Error::new("NUL in path"))?;
    let d = CString::new(dest.as_os_str().as_bytes()).map_err(|_| Error::new("NUL in path"))?;
    // SAFETY: valid C string; a null buffer of size 0 asks for the size.
    let names = read_sized(|buf, len| unsafe { nix::libc::llistxattr(s.as_ptr(), buf.cast(), len) });
    let names = match names {
        Ok(n) => n,
        Err(Errno::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("cannot list xattrs of", src, e)),
    };
    let mut warnings = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let n = CString::new(name).map_err(|_| Error::new("NUL in an xattr name"))?;
        let shown = String::from_utf8_lossy(name);
        if name.starts_with(OWN_PREFIX) {
            warnings.push(format!(
                "did not copy xattr {shown}: layerboot's own marks are never copied"
            ));
            continue;
        }
        // SAFETY: as above.
        let value = read_sized(|buf, len| unsafe { nix::libc::lgetxattr(s.as_ptr(), n.as_ptr(), buf.cast(), len) })
            .map_err(|e| Error::io(&format!("cannot read xattr {shown} of"), src, e))?;
        // SAFETY: NUL-terminated strings; value is valid for its length.
        let r = unsafe { nix::libc::lsetxattr(d.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
        if r < 0 {
            match Errno::last() {
                // Symlinks cannot carry user.* xattrs; the kernel refuses, as it would for cp -a.
                Errno::EPERM if is_link => {}
                e @ (Errno::ENOSPC | Errno::EDQUOT | Errno::EIO) => {
                    return Err(Error::os(format!("cannot set xattr {shown}"), e))
                }
                e => warnings.push(format!(
                    "did not copy xattr {shown}: the new root's filesystem refused it ({e})"
                )),
            }
        }
    }
    Ok(warnings)
}

/// Calls a size-then-fill system call (listxattr, getxattr) until the buffer fits, as
/// the value may grow between the two calls.
fn read_sized(call: impl Fn(*mut u8, usize) -> isize) -> std::result::Result<Vec<u8>, Errno> {
    for _ in 0..8 {
        let size = Errno::result(call(std::ptr::null_mut(), 0))? as usize;
        let mut buf = vec![0u8; size.max(1)];
        match Errno::result(call(buf.as_mut_ptr(), buf.len())) {
            Ok(len) => {
                buf.truncate(len as usize);
                return Ok(buf);
            }
            Err(Errno::ERANGE) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Errno::ERANGE)
}
