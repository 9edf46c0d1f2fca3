//! Model files: the GGUF container, its tensor types, the memory mapping, and the Llama
//! hyper-parameters read from metadata.

pub mod config;
pub mod ggml_type;
pub mod gguf;
pub mod mmap;

pub use config::LlamaConfig;
pub use ggml_type::GgmlType;
pub use gguf::{Gguf, GgufError, TensorInfo};
pub use mmap::MappedFile;
