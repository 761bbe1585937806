//! keygate's global allocator: mimalloc, called as Rust's own `System` allocator calls malloc.
//!
//! The `mimalloc` crate passes every allocation to `mi_malloc_aligned`, even at alignment 1.
//! mimalloc 3 serves an aligned request above 1 KiB whose size class is not a power of two
//! by over-allocating and aligning inside the block, which `mi_malloc` never does: hyper's
//! 8 KiB read buffers (a Vec of bytes, alignment 1) and the boxed future of each request took
//! that path, about 900 instructions a request under callgrind. Like `std::alloc::System`,
//! this asks for alignment only when the size class alone does not give it: `mi_malloc`
//! returns blocks aligned to 16 bytes (`MI_MAX_ALIGN_SIZE`), or to their size when smaller.

#![no_std]

use core::alloc::{GlobalAlloc, Layout};
use core::ffi::c_void;

use libmimalloc_sys as ffi;

/// What `malloc` alone guarantees: `MI_MAX_ALIGN_SIZE` on 64-bit targets.
const MALLOC_ALIGN: usize = 16;

/// See the crate documentation.
#[derive(Debug, Clone, Copy, Default)]
pub struct MiMalloc;

/// Whether plain `mi_malloc` already aligns a block of this layout, as `System` decides.
#[inline]
fn malloc_aligns(layout: &Layout) -> bool {
    layout.align() <= MALLOC_ALIGN && layout.align() <= layout.size()
}

// SAFETY: every block comes from mimalloc and goes back to it: `mi_malloc`, `mi_zalloc` and
// `mi_realloc` return blocks aligned to `MALLOC_ALIGN` or to their size when smaller, so a
// layout passing `malloc_aligns` is honoured; other layouts go to the `_aligned` functions.
// `mi_free` and `mi_realloc_aligned` take blocks from either.
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: FFI calls with a size and a power-of-two alignment from a `Layout`.
        unsafe {
            if malloc_aligns(&layout) {
                ffi::mi_malloc(layout.size()).cast()
            } else {
                ffi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        unsafe {
            if malloc_aligns(&layout) {
                ffi::mi_zalloc(layout.size()).cast()
            } else {
                ffi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` was returned by this allocator, so by mimalloc.
        unsafe { ffi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from mimalloc; the new layout keeps `layout`'s alignment.
        unsafe {
            if layout.align() <= MALLOC_ALIGN && layout.align() <= new_size {
                ffi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                ffi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;

    #[test]
    fn every_layout_gets_its_alignment_and_keeps_its_bytes() {
        let a = MiMalloc;
        for size in [
            1,
            7,
            8,
            24,
            48,
            1000,
            1500,
            4096,
            8192,
            8200,
            70_000,
            5 << 20,
        ] {
            for align in [1, 2, 8, 16, 32, 64, 4096] {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: non-zero sizes; each block is freed with its layout.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size} align {align}");
                    p.write_bytes(0xab, size);
                    let grown = a.realloc(p, layout, size * 3);
                    assert_eq!(
                        grown as usize % align,
                        0,
                        "realloc: size {size} align {align}"
                    );
                    assert_eq!(*grown.add(size - 1), 0xab);
                    a.dealloc(grown, Layout::from_size_align(size * 3, align).unwrap());
                    let z = a.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0);
                    assert!((0..size).all(|i| *z.add(i) == 0));
                    a.dealloc(z, layout);
                }
            }
        }
    }
}
