//! The request parser: any line gives a request or an error naming it, never a panic.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        let _ = llama_tpu::server::protocol::parse_line(data);
    });
}
