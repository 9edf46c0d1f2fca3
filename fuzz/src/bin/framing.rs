//! Line framing: any bytes, in any chunking, give lines no longer than the cap, and never a
//! panic.
use llama_tpu::server::framing::{Frame, LineFramer};

fn main() {
    afl::fuzz!(|data: &[u8]| {
        const MAX: usize = 64;
        let mut f = LineFramer::new(MAX);
        // The first byte picks the chunk size, as reads split the stream.
        let (size, rest) = data.split_first().map_or((1, data), |(s, r)| (*s as usize % 17 + 1, r));
        for chunk in rest.chunks(size) {
            f.push(chunk);
            while let Some(frame) = f.next_frame() {
                if let Frame::Line(l) = frame {
                    assert!(l.len() <= MAX, "a line of {} bytes passed a cap of {MAX}", l.len());
                }
            }
        }
        if let Some(Frame::Line(l)) = f.finish() {
            assert!(l.len() <= MAX);
        }
    });
}
