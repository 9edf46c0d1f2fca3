//! Tokenizers built from GGUF vocabularies against llama.cpp's own test vectors: the Llama-2
//! SentencePiece vocabulary (scores, byte fallback) and the Llama-3 byte-level BPE one.
//! The files come from the llama-cpp-python sdist on PyPI (`make test-data` extracts them
//! into .cache/llama-vocab); without them this test fails and says so.
mod common;

use std::path::Path;

use llama_tpu::model::{Gguf, MappedFile};
use llama_tpu::tokenizer::Tokenizer;

fn check(name: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/llama-vocab");
    let gguf_path = dir.join(format!("{name}.gguf"));
    assert!(
        gguf_path.exists(),
        "{} is missing: run `make test-data`",
        gguf_path.display()
    );
    let file = MappedFile::open(&gguf_path).unwrap();
    let built = Tokenizer::from_gguf(&Gguf::parse(&file).unwrap()).unwrap();
    // The same pipeline through tokenizer.json (the Sophon backend's path) must agree too.
    let json = common::scratch(name).join("tokenizer.json");
    std::fs::write(&json, built.to_json().unwrap()).unwrap();
    let loaded = Tokenizer::from_file(&json).unwrap();
    assert_eq!(
        (loaded.kind(), loaded.bos, loaded.eos),
        (built.kind(), built.bos, built.eos),
        "{name}"
    );
    let inputs = std::fs::read_to_string(dir.join(format!("{name}.gguf.inp"))).unwrap();
    let outputs = std::fs::read_to_string(dir.join(format!("{name}.gguf.out"))).unwrap();
    let inputs: Vec<&str> = inputs.split("\n__ggml_vocab_test__\n").collect();
    let outputs: Vec<&str> = outputs.split('\n').collect();
    assert!(inputs.len() >= 40, "{name}: only {} test texts", inputs.len());
    for (text, want) in inputs.iter().zip(&outputs) {
        let want: Vec<u32> = want.split_whitespace().map(|t| t.parse().unwrap()).collect();
        assert_eq!(built.encode(text, false).unwrap(), want, "{name}: {text:?}");
        assert_eq!(
            loaded.encode(text, false).unwrap(),
            want,
            "{name} via tokenizer.json: {text:?}"
        );
    }
}

#[test]
fn llama2_sentencepiece_vocabulary_matches_llama_cpp() {
    check("ggml-vocab-llama-spm");
}

#[test]
fn llama3_byte_level_vocabulary_matches_llama_cpp() {
    check("ggml-vocab-llama-bpe");
}
