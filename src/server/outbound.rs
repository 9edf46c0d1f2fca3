//! A connection's outbound buffer: what the session and the engine thread write for one
//! client, bounded, drained to the client by a thread of the transport's. Writing never
//! blocks: a client that stops reading fills its own buffer and nobody else's time, and a
//! write that does not fit says so at once (the engine then ends that client's request).
//!
//! The last [`RESERVE`] bytes are kept for the message that ends a reply, so a request
//! stopped for a full buffer can still tell its client why.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Bytes kept for the end of a reply: the longest last line a request can make (an error with
/// a 256-byte id and a message of control characters, each escaped to 6 bytes: 3,422), and
/// HTTP's stream end (a model file name of 255 bytes included). A `done` is usually 250.
pub const RESERVE: usize = 4096;
const _: () = assert!(super::events::MAX_LAST_LINE <= RESERVE);

/// Smallest buffer: the reserve and room for a few events.
pub const MIN_CAPACITY: usize = 2 * RESERVE;

/// Default size: a 512-token JSON answer (about 40 bytes an event) fits whole, so a serial
/// line at 9600 baud that reads nothing until the end keeps up.
pub const DEFAULT_CAPACITY: usize = 64 * 1024;

/// How long a client whose session is over still has to take what was queued for it (the end
/// of a request stopped because it did not read, say) before its drainer gives up.
pub const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Largest size the setting accepts.
pub const MAX_CAPACITY: usize = 16 << 20;

/// What became of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued for the client.
    Queued,
    /// It does not fit: the client is not reading fast enough.
    Full,
    /// The client is gone (the drainer's write failed, or the connection closed).
    Gone,
}

struct Pending {
    bytes: VecDeque<u8>,
    capacity: usize,
    /// No more bytes will come: the drainer ends once the queue is empty.
    closed: bool,
    /// When it was closed.
    closed_at: Option<Instant>,
    /// The client cannot be written to.
    gone: bool,
    /// The drainer wrote every byte up to the close (an HTTP connection may then carry the
    /// next request).
    delivered: bool,
}

/// See the module documentation.
pub struct Outbound {
    pending: Mutex<Pending>,
    more: Condvar,
    created: Instant,
    /// Milliseconds after `created` when the client last took bytes (a write succeeded).
    taken_ms: AtomicU64,
}

fn lock(m: &Mutex<Pending>) -> MutexGuard<'_, Pending> {
    // Each critical section is one queue update: the data stays consistent.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Outbound {
    /// A buffer of `capacity` bytes (clamped to [`MIN_CAPACITY`]..=[`MAX_CAPACITY`]),
    /// allocated now: queuing never allocates.
    pub fn new(capacity: usize) -> Arc<Outbound> {
        let capacity = capacity.clamp(MIN_CAPACITY, MAX_CAPACITY);
        Arc::new(Outbound {
            pending: Mutex::new(Pending {
                bytes: VecDeque::with_capacity(capacity),
                capacity,
                closed: false,
                closed_at: None,
                gone: false,
                delivered: false,
            }),
            more: Condvar::new(),
            created: Instant::now(),
            taken_ms: AtomicU64::new(0),
        })
    }

    /// When the client last took bytes (or the buffer was made): a client that reads
    /// nothing leaves this behind.
    pub fn last_taken(&self) -> Instant {
        self.created + Duration::from_millis(self.taken_ms.load(Ordering::Relaxed))
    }

    fn taken(&self) {
        let ms = u64::try_from(self.created.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.taken_ms.store(ms, Ordering::Relaxed);
    }

    /// Queues `bytes` whole or not at all. Ordinary writes leave [`RESERVE`] bytes free;
    /// `last` (the end of a reply) may use them.
    pub fn push(&self, bytes: &[u8], last: bool) -> Pushed {
        let mut p = lock(&self.pending);
        if p.gone || p.closed {
            return Pushed::Gone;
        }
        let limit = if last { p.capacity } else { p.capacity - RESERVE };
        if p.bytes.len() + bytes.len() > limit {
            return Pushed::Full;
        }
        p.bytes.extend(bytes);
        drop(p);
        self.more.notify_one();
        Pushed::Queued
    }

    /// For the drainer: waits for bytes and moves up to `buf.len()` of them into `buf`.
    /// Returns 0 once the buffer is closed (or the client gone) and empty.
    pub fn pull(&self, buf: &mut [u8]) -> usize {
        let mut p = lock(&self.pending);
        loop {
            if p.gone {
                return 0;
            }
            if !p.bytes.is_empty() {
                let n = p.bytes.len().min(buf.len());
                for (slot, b) in buf.iter_mut().zip(p.bytes.drain(..n)) {
                    *slot = b;
                }
                return n;
            }
            if p.closed {
                return 0;
            }
            p = self.more.wait(p).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// No more writes: the drainer sends what is queued, then ends.
    pub fn close(&self) {
        let mut p = lock(&self.pending);
        if !p.closed {
            p.closed = true;
            p.closed_at = Some(Instant::now());
        }
        drop(p);
        self.more.notify_all();
    }

    /// The client cannot be written to any more: writes fail from now on.
    pub fn mark_gone(&self) {
        lock(&self.pending).gone = true;
        self.more.notify_all();
    }

    /// Whether the client is known to be gone.
    pub fn is_gone(&self) -> bool {
        lock(&self.pending).gone
    }

    /// Whether the drainer has ended, and whether it had delivered everything queued before
    /// [`Outbound::close`]: `None` while it runs.
    pub fn delivered(&self) -> Option<bool> {
        let p = lock(&self.pending);
        p.gone.then_some(p.delivered)
    }

    /// Whether a drainer whose write timed out should try again: the client is not gone,
    /// and the session is not over or ended less than [`CLOSE_WAIT`] ago.
    fn may_wait(&self) -> bool {
        let p = lock(&self.pending);
        !p.gone && p.closed_at.is_none_or(|t| t.elapsed() < CLOSE_WAIT)
    }

    /// Starts the thread that drains this buffer into `writer` (the client's socket or serial
    /// port; give it a write timeout of a second or so). It ends when the buffer is closed and
    /// empty, or a write fails. A client that does not read only keeps this thread waiting
    /// (its requests wait out of the batch, then stop); once its session is over, it has
    /// [`CLOSE_WAIT`] to read the rest.
    ///
    /// # Errors
    /// The thread cannot be started.
    pub fn drain_into(self: &Arc<Self>, mut writer: Box<dyn Write + Send>, name: String) -> std::io::Result<()> {
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name(name)
            .stack_size(super::DRAINER_STACK)
            .spawn(move || {
                let mut buf = vec![0u8; 16 * 1024];
                'pulling: loop {
                    let n = me.pull(&mut buf);
                    if n == 0 {
                        let mut p = lock(&me.pending);
                        p.delivered = p.closed && !p.gone;
                        break;
                    }
                    let mut sent = 0;
                    while sent < n {
                        match writer.write(&buf[sent..n]) {
                            Ok(0) => break 'pulling,
                            Ok(k) => {
                                sent += k;
                                me.taken();
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                ) && me.may_wait() => {}
                            Err(_) => break 'pulling,
                        }
                    }
                    let _ = writer.flush();
                }
                me.mark_gone();
            })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_fit_or_are_refused_whole_and_the_reserve_is_for_the_end() {
        let o = Outbound::new(MIN_CAPACITY);
        let chunk = [b'x'; 100];
        let mut queued = 0;
        while o.push(&chunk, false) == Pushed::Queued {
            queued += chunk.len();
        }
        let room = MIN_CAPACITY - RESERVE;
        assert_eq!(queued, room - room % chunk.len());
        // The end of a reply still fits.
        assert_eq!(o.push(&[b'd'; 300], true), Pushed::Queued);
        let mut buf = [0u8; MIN_CAPACITY];
        assert_eq!(o.pull(&mut buf), queued + 300);
        assert_eq!(o.push(&chunk, false), Pushed::Queued);
        o.mark_gone();
        assert_eq!(o.push(&chunk, false), Pushed::Gone);
        assert_eq!(o.pull(&mut buf), 0);
    }

    /// The longest last line a request can make fits the reserve, whatever filled the buffer
    /// before it (issue 23: an id of 256 control characters escapes to 1,538 bytes, and its
    /// `done` did not fit 1,024; an error message can be longer still).
    #[test]
    fn the_longest_last_line_fits_the_reserve() {
        use crate::engine::{FinishReason, Summary};
        use crate::server::events::{EventId, EventWriter};
        use std::time::Duration;
        let id = EventId::new(Some(&serde_json::Value::String("\u{1}".repeat(256))));
        let summary = Summary {
            reason: FinishReason::SlowClient,
            prompt_tokens: usize::MAX,
            cached_tokens: usize::MAX,
            completion_tokens: usize::MAX,
            dropped_messages: usize::MAX,
            prompt_time: Duration::MAX,
            time_to_first_token: Duration::from_secs(365 * 24 * 3600),
            generation_time: Duration::from_nanos(1),
            picker: "greedy_head",
        };
        let mut w = EventWriter::new();
        let done = w.done(&id, &summary).to_vec();
        let error = w.error(&id, "no_chat_template", &"\u{1}".repeat(100_000)).to_vec();
        for last in [done, error] {
            // Filled to the last byte ordinary writes may use, one byte at a time.
            let o = Outbound::new(MIN_CAPACITY);
            while o.push(b"x", false) == Pushed::Queued {}
            assert_eq!(
                o.push(&last, true),
                Pushed::Queued,
                "a last line of {} bytes",
                last.len()
            );
        }
    }

    #[test]
    fn the_drainer_delivers_in_order_and_ends_when_closed() {
        let o = Outbound::new(MIN_CAPACITY);
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        o.drain_into(Box::new(b), "drain-test".into()).unwrap();
        for i in 0..50u8 {
            while o.push(&[i; 10], false) == Pushed::Full {
                std::thread::yield_now();
            }
        }
        o.close();
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut a, &mut got).unwrap();
        let want: Vec<u8> = (0..50u8).flat_map(|i| [i; 10]).collect();
        assert_eq!(got, want);
    }
}
