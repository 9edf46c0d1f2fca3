//! The GGUF parser: any file gives a model description or an error, never a panic or a huge
//! allocation (its strings, arrays and dimensions are capped).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Ok(g) = llama_tpu::model::Gguf::parse(data) {
            let _ = llama_tpu::model::config::LlamaConfig::from_gguf(&g);
            let _ = llama_tpu::tokenizer::Tokenizer::from_gguf(&g);
        }
    });
}
