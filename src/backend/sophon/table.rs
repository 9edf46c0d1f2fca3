//! The embedding table of a bmodel built without embedding nets (tpu-mlir's
//! `--embedding_disk`): `LlmConverter` writes the checkpoint's `embed_tokens` as raw rows,
//! `[vocabulary, hidden]` in the hidden states' type (f16 for the `*f16` modes, bf16 for the
//! `*bf16` ones), no header, to `config/embedding.bin` in the folder of the bmodel. The host
//! gathers a prompt's rows from the mapped file and writes them where block 0 reads.

use std::path::{Path, PathBuf};

use crate::model::mmap::MappedFile;

/// Names the vendor's tools give the table, relative to the bmodel's folder.
pub const TABLE_NAMES: [&str; 2] = ["config/embedding.bin", "embedding.bin"];

/// A mapped, size-checked embedding table.
#[derive(Debug)]
pub struct EmbeddingTable {
    map: MappedFile,
    /// Bytes per row.
    row: usize,
    rows: usize,
}

impl EmbeddingTable {
    /// Finds the table (`given`, or beside `bmodel` by the vendor's names) and checks that it
    /// holds `rows` rows of `row` bytes.
    ///
    /// # Errors
    /// Not found, unreadable, or of another size, with what was expected.
    pub fn open(given: Option<&Path>, bmodel: &Path, rows: usize, row: usize) -> Result<EmbeddingTable, String> {
        let dir = bmodel.parent().unwrap_or(Path::new("."));
        let candidates: Vec<PathBuf> = match given {
            Some(p) => vec![p.to_path_buf()],
            None => TABLE_NAMES.iter().map(|n| dir.join(n)).collect(),
        };
        let Some(path) = candidates.iter().find(|p| p.is_file()) else {
            let tried: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
            return Err(format!(
                "the bmodel has no embedding nets (built with --embedding_disk): its embedding table was not found \
                 (looked for {}); name it with --embedding-table FILE",
                tried.join(", ")
            ));
        };
        let map = MappedFile::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let want = rows.saturating_mul(row);
        if rows == 0 || map.len() != want {
            return Err(format!(
                "{}: {} bytes, expected {want} ({rows} tokens x {row} bytes: the vocabulary of lm_head, \
                 hidden size x the hidden states' type)",
                path.display(),
                map.len()
            ));
        }
        Ok(EmbeddingTable { map, row, rows })
    }

    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.row
    }

    /// Copies the rows of `tokens` into `out` (at least `tokens.len()` rows long); a token
    /// past the table is refused before anything is read.
    ///
    /// # Errors
    /// A token outside the table.
    pub fn gather(&self, tokens: &[u32], out: &mut [u8]) -> Result<(), u32> {
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.rows) {
            return Err(bad);
        }
        for (dst, &t) in out.chunks_exact_mut(self.row).zip(tokens) {
            let at = t as usize * self.row;
            dst.copy_from_slice(&self.map[at..at + self.row]);
        }
        Ok(())
    }

    /// Where it was read from.
    pub fn path(&self) -> &Path {
        self.map.path()
    }
}
