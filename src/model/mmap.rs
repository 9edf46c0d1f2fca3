//! Read-only memory mapping of model files: the weights are used where they lie, never copied.
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
}

impl Deref for MappedFile {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.map
    }
}
