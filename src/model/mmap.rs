//! Read-only memory mapping of model files: the weights are used where they lie, never copied
//! (except rows a kernel wants rearranged, whose pages are then released), with a prefetch hint
//! for the rows about to be read.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::ops::Deref;
use std::path::{Path, PathBuf};

/// A model file mapped read-only into memory.
#[derive(Debug)]
pub struct MappedFile {
    map: memmap2::Mmap,
    path: PathBuf,
}

impl MappedFile {
    /// Maps `path` read-only.
    ///
    /// # Errors
    /// The file cannot be opened or mapped.
    pub fn open(path: &Path) -> io::Result<MappedFile> {
        let file = File::open(path)?;
        // SAFETY: the mapping is read-only and private to this process. The remaining hazard
        // of any file mapping is another process truncating or rewriting the file while it is
        // mapped; model files are installed once and treated as immutable, which the README
        // states (replace a model by writing a new file and renaming it over the old one, which
        // leaves this mapping on the old inode).
        let map = unsafe { memmap2::Mmap::map(&file)? };
        Ok(MappedFile {
            map,
            path: path.to_path_buf(),
        })
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Drops the resident pages of `range` from this process (the whole pages it touches):
    /// for bytes that have been copied elsewhere and will not be read again soon. They are
    /// read from the file again if they are.
    ///
    /// # Errors
    /// The range is outside the file, or the kernel refused the advice.
    pub fn release(&self, range: std::ops::Range<usize>) -> io::Result<()> {
        // SAFETY: MADV_DONTNEED on a private, read-only file mapping that has never been
        // written drops only the page-table entries: a later read faults the same bytes back
        // in from the file, so every slice of the mapping keeps reading what it read before.
        // (The hazard memmap2 warns of is pages written through a private mapping, whose
        // changes would be lost; this mapping cannot be written.)
        unsafe {
            self.map
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, range.start, range.len())
        }
    }
}

impl Deref for MappedFile {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.map
    }
}

/// Asks the CPU to start loading every cache line of `bytes` (normally rows of a mapped
/// weight matrix about to be read), without waiting for them.
///
/// Matrix-vector products read each weight byte once per token and are bound by memory
/// latency; the hardware prefetcher does not cross the 4 KiB pages of a file mapping, and
/// without this hint generation ran at well under half the machine's bandwidth.
#[inline(always)]
pub fn prefetch(bytes: &[u8]) {
    for i in (0..bytes.len()).step_by(64) {
        prefetch_line(bytes[i..].as_ptr());
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_line(p: *const u8) {
    // SAFETY: a prefetch is a hint: it never faults, reads nothing into the program and has
    // no effect on memory contents; `p` points into a live slice anyway. SSE is part of the
    // x86_64 baseline, so the instruction exists on every CPU this code runs on.
    unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast()) }
}

#[cfg(target_arch = "aarch64")]
#[inline(always)]
fn prefetch_line(p: *const u8) {
    // SAFETY: PRFM is a hint that never faults and changes no architectural state besides the
    // caches; `p` points into a live slice. (The intrinsic is not stable; the instruction is
    // in every ARMv8-A core, the Cortex-A53 included.)
    unsafe { std::arch::asm!("prfm pldl1keep, [{0}]", in(reg) p, options(nostack, preserves_flags, readonly)) }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
#[inline(always)]
fn prefetch_line(_p: *const u8) {}
