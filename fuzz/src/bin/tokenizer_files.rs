//! Tokenizer files given with --tokenizer: a SentencePiece tokenizer.model (our protobuf
//! reader) and, when the bytes look like JSON, a tokenizer.json. Never a panic.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Ok(m) = llama_tpu::tokenizer::sentencepiece::parse(data) {
            assert!(!m.pieces.is_empty());
        }
        let dir = std::env::temp_dir().join(format!("llama-tpu-fuzz-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("tokenizer.model");
        if std::fs::write(&path, data).is_ok() {
            if let Ok(t) = llama_tpu::tokenizer::Tokenizer::from_file(&path) {
                let _ = t.encode("Hello world", true);
            }
        }
        // AFL runs thousands of these processes: leave no directory behind each.
        let _ = std::fs::remove_dir_all(&dir);
    });
}
