//! `/init`'s memory allocator: bump allocation from one static arena, given back all at
//! once when `/init` execs the image's init. Nothing is freed before that.
//!
//! Why not musl's allocator: it hands memory back to the kernel eagerly (parsing the
//! module index alone made 47 mmap and 46 munmap calls). Under emulation (TCG) every
//! munmap flushes the TLB and every fresh page faults, which cost /init more CPU time
//! than its own work. /init is short-lived and allocates a few MiB, so never freeing is
//! cheaper than freeing; what does not fit in the arena (a huge top layer's paths, a big
//! containerd meta.db) comes from the system allocator as before.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Address space, not memory: only the pages touched are ever backed (it is .bss).
const ARENA_SIZE: usize = 64 << 20;

#[repr(C, align(4096))]
struct Space(UnsafeCell<[u8; ARENA_SIZE]>);

// SAFETY: the bytes are only reached through the pointers handed out below, each range
// to one owner, the offset moving by compare-and-swap.
unsafe impl Sync for Space {}

static SPACE: Space = Space(UnsafeCell::new([0; ARENA_SIZE]));
/// Offset of the first byte never handed out.
static NEXT: AtomicUsize = AtomicUsize::new(0);

pub struct BootAllocator;

/// From now on, everything comes from the system allocator and is freed: for a process
/// that lives on (the post-switch helper), where never freeing would grow without end.
/// What the arena handed out stays valid.
pub fn retire() {
    NEXT.store(ARENA_SIZE, Ordering::SeqCst);
}

fn base() -> usize {
    SPACE.0.get() as usize
}

fn in_arena(ptr: *mut u8) -> bool {
    (base()..base() + ARENA_SIZE).contains(&(ptr as usize))
}

/// Takes `size` bytes aligned to `align` from the arena, or None if they do not fit.
fn bump(size: usize, align: usize) -> Option<*mut u8> {
    let mut next = NEXT.load(Ordering::Relaxed);
    loop {
        let start = (base() + next).checked_next_multiple_of(align)? - base();
        let end = start.checked_add(size).filter(|&e| e <= ARENA_SIZE)?;
        match NEXT.compare_exchange_weak(next, end, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return Some((base() + start) as *mut u8),
            Err(now) => next = now,
        }
    }
}

// SAFETY: every pointer returned is either a fresh, suitably aligned range of the arena
// that no one else holds, or the system allocator's; each is freed by its own allocator.
unsafe impl GlobalAlloc for BootAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match bump(layout.size(), layout.align()) {
            Some(p) => p,
            None => unsafe { System.alloc(layout) },
        }
    }

    /// Arena memory is handed out once, so it is still zero.
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match bump(layout.size(), layout.align()) {
            Some(p) => p,
            None => unsafe { System.alloc_zeroed(layout) },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !in_arena(ptr) {
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !in_arena(ptr) {
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // Shrinking keeps the bytes where they are (the arena never hands a byte out
        // twice, which is what makes its memory zero for alloc_zeroed).
        if new_size <= layout.size() {
            return ptr;
        }
        // The newest allocation grows in place (a Vec being filled, mostly).
        let (start, old_end) = (ptr as usize - base(), ptr as usize - base() + layout.size());
        if let Some(new_end) = start.checked_add(new_size).filter(|&e| e <= ARENA_SIZE) {
            if NEXT
                .compare_exchange(old_end, new_end, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                return ptr;
            }
        }
        // SAFETY: the caller guarantees new_size and the alignment make a valid layout.
        let new = unsafe { self.alloc(Layout::from_size_align_unchecked(new_size, layout.align())) };
        if !new.is_null() {
            unsafe { std::ptr::copy_nonoverlapping(ptr, new, layout.size()) };
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_aligned_distinct_zeroed_memory_that_grows_in_place() {
        let a = BootAllocator;
        unsafe {
            let l = Layout::from_size_align(10, 1).unwrap();
            let p = a.alloc(l);
            let q = a.alloc_zeroed(Layout::from_size_align(64, 64).unwrap());
            assert!(in_arena(p) && in_arena(q));
            assert_eq!(q as usize % 64, 0);
            assert!(q as usize >= p as usize + 10, "no overlap");
            assert!(std::slice::from_raw_parts(q, 64).iter().all(|&b| b == 0));
            // q is the newest: it grows where it is; p cannot, and moves with its bytes.
            std::ptr::write_bytes(q, 7, 64);
            let q2 = a.realloc(q, Layout::from_size_align(64, 64).unwrap(), 4096);
            assert_eq!(q2, q);
            std::ptr::write_bytes(p, 9, 10);
            let p2 = a.realloc(p, l, 100);
            assert_ne!(p2, p);
            assert_eq!(std::slice::from_raw_parts(p2, 10), [9; 10]);
            a.dealloc(p2, Layout::from_size_align(100, 1).unwrap());
            // Retired (the helper that lives on): the system's memory, freed again; what
            // the arena gave out stays readable.
            retire();
            let r = a.alloc(l);
            assert!(!r.is_null() && !in_arena(r));
            a.dealloc(r, l);
            assert_eq!(std::slice::from_raw_parts(q2, 64)[0], 7);
        }
    }

    #[test]
    fn what_does_not_fit_comes_from_the_system() {
        let a = BootAllocator;
        unsafe {
            let l = Layout::from_size_align(ARENA_SIZE + 1, 8).unwrap();
            let p = a.alloc(l);
            assert!(!p.is_null() && !in_arena(p));
            a.dealloc(p, l);
        }
    }
}
