//! The serial console's line editor: any bytes (noise, breaks, escape sequences) give edits
//! and an echo, never a panic, and a line within its cap.
use llama_tpu::server::serial::ConsoleEditor;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        const MAX: usize = 64;
        let mut e = ConsoleEditor::new(MAX);
        let mut echo = Vec::with_capacity(64);
        for &b in data {
            echo.clear();
            let _ = e.feed(b, &mut echo);
            assert!(e.line().len() <= MAX);
        }
    });
}
