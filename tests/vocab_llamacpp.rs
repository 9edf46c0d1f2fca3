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
    assert_eq!(loaded.kind(), built.kind(), "{name}");
    // A tokenizer.json names no BOS or EOS (tokenizer_config.json does): the one the model
    // starts with must be found, and its end must end a generation.
    if built.add_bos {
        assert_eq!(loaded.bos, built.bos, "{name}");
    }
    let eos = built.eos.unwrap();
    assert!(
        loaded.eog_tokens().contains(&eos),
        "{name}: {eos} does not end a generation"
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

/// Qwen2's vocabulary (Qwen2.5's and Qwen3's: the same BPE, its own pre-tokenizer with digits
/// one by one).
#[test]
fn qwen2_byte_level_vocabulary_matches_llama_cpp() {
    check("ggml-vocab-qwen2");
}

/// The original Llama-2 demos ship SentencePiece's `tokenizer.model`: one written from the
/// Llama-2 vocabulary by the sentencepiece package itself gives, through `--tokenizer
/// tokenizer.model`, SentencePiece's ids and llama.cpp's on llama.cpp's test texts.
#[test]
fn llama2_tokenizer_model_matches_sentencepiece_and_llama_cpp() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/llama-vocab");
    let name = "ggml-vocab-llama-spm";
    let vocab = dir.join(format!("{name}.gguf"));
    assert!(vocab.exists(), "{} is missing: run `make test-data`", vocab.display());
    let model = common::scratch("tokenizer-model").join("tokenizer.model");
    let python = std::env::var("LLAMA_TPU_PYTHON").unwrap_or_else(|_| "python3".into());
    let inp = dir.join(format!("{name}.gguf.inp"));
    let out = std::process::Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/write_tokenizer_model.py"))
        .arg(&vocab)
        .arg(&model)
        .arg(&inp)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    assert!(
        out.status.success(),
        "writing tokenizer.model needs gguf, sentencepiece and protobuf (`make venv`):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tok = Tokenizer::from_file(&model).unwrap();
    assert_eq!(
        (tok.vocab_size(), tok.bos, tok.eos, tok.add_bos),
        (32000, Some(1), Some(2), true)
    );
    let texts = std::fs::read_to_string(&inp).unwrap();
    let texts: Vec<&str> = texts.split("\n__ggml_vocab_test__\n").collect();
    let llama_cpp = std::fs::read_to_string(dir.join(format!("{name}.gguf.out"))).unwrap();
    let sentencepiece = String::from_utf8(out.stdout).unwrap();
    let ids = |line: &str| -> Vec<u32> { line.split_whitespace().map(|t| t.parse().unwrap()).collect() };
    assert!(texts.len() >= 40);
    for ((text, spm), cpp) in texts.iter().zip(sentencepiece.lines()).zip(llama_cpp.lines()) {
        let got = tok.encode(text, false).unwrap();
        assert_eq!(got, ids(spm), "SentencePiece: {text:?}");
        assert_eq!(got, ids(cpp), "llama.cpp: {text:?}");
    }
    // BOS first, as the demos add it.
    assert_eq!(tok.encode("Hello", true).unwrap()[0], 1);
}
