//! Refused connections, closed so that the client reads why: the refusal is written, the
//! writing side shut, what the client still sends (its request line, a body) read off and
//! dropped for a moment, and only then the socket closed. Closing at once with unread input
//! makes the kernel answer with a reset, and a client still writing gets EPIPE and never
//! reads the refusal. A few threads of their own do it, so the accept loop never waits; when
//! too many refusals are lingering at once (a flood), the next ones are closed at once.

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Refused connections lingering at once; beyond it a refusal closes at once.
const MAX_LINGERING: usize = 32;
/// How long a refused client may keep sending before its socket is closed anyway.
const LINGER: Duration = Duration::from_secs(2);
/// How much of what it sends is read off at most.
const LINGER_BYTES: usize = 64 * 1024;
/// A refusal write never waits longer than this for a client that does not read.
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);

static LINGERING: AtomicUsize = AtomicUsize::new(0);

/// A connection that can be written, shut and read off.
pub trait Refusable: Read + Write + Send + 'static {
    /// `shutdown(2)` of one side or both.
    fn shut(&self, how: Shutdown);
    /// A read timeout.
    fn read_timeout(&self, t: Duration);
    /// A write timeout.
    fn write_timeout(&self, t: Duration);
}

impl Refusable for UnixStream {
    fn shut(&self, how: Shutdown) {
        let _ = self.shutdown(how);
    }
    fn read_timeout(&self, t: Duration) {
        let _ = self.set_read_timeout(Some(t));
    }
    fn write_timeout(&self, t: Duration) {
        let _ = self.set_write_timeout(Some(t));
    }
}

impl Refusable for std::net::TcpStream {
    fn shut(&self, how: Shutdown) {
        let _ = self.shutdown(how);
    }
    fn read_timeout(&self, t: Duration) {
        let _ = self.set_read_timeout(Some(t));
    }
    fn write_timeout(&self, t: Duration) {
        let _ = self.set_write_timeout(Some(t));
    }
}

/// Writes `refusal` to `stream` and closes it gently (see the module documentation), on a
/// thread of its own.
pub fn refuse<S: Refusable>(mut stream: S, refusal: Vec<u8>) {
    stream.write_timeout(WRITE_TIMEOUT);
    let written = stream.write_all(&refusal).is_ok();
    if !written || LINGERING.fetch_add(1, Ordering::AcqRel) >= MAX_LINGERING {
        if written {
            LINGERING.fetch_sub(1, Ordering::AcqRel);
        }
        stream.shut(Shutdown::Both);
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("refused".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            linger(&mut stream);
            LINGERING.fetch_sub(1, Ordering::AcqRel);
        });
    if spawned.is_err() {
        LINGERING.fetch_sub(1, Ordering::AcqRel);
    }
}

fn linger<S: Refusable>(stream: &mut S) {
    stream.shut(Shutdown::Write);
    let mut buf = [0u8; 4096];
    read_off(stream, |s, t| s.read_timeout(t), LINGER, LINGER_BYTES, &mut buf);
    stream.shut(Shutdown::Both);
}

/// Reads and drops what a client still sends (the caller shut its own writing side first),
/// until the client's end, `max` bytes, or `limit` of time; `set_timeout` bounds each read.
pub fn read_off<S: Read>(
    stream: &mut S,
    set_timeout: impl Fn(&S, Duration),
    limit: Duration,
    max: usize,
    buf: &mut [u8],
) {
    let until = Instant::now() + limit;
    let mut left = max;
    while left > 0 {
        let now = Instant::now();
        if now >= until {
            break;
        }
        set_timeout(stream, (until - now).min(Duration::from_millis(100)));
        match stream.read(buf) {
            Ok(0) => break,
            Ok(n) => left = left.saturating_sub(n),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client that is still writing when it is refused reads the refusal, then the end.
    #[test]
    fn a_refused_client_still_writing_reads_the_refusal() {
        for _ in 0..20 {
            let (server, mut client) = UnixStream::pair().unwrap();
            // The client's request is in the socket before the refusal goes out.
            client.write_all(&[b'x'; 3000]).unwrap();
            refuse(server, b"refused: busy\n".to_vec());
            // It keeps writing for a while: no EPIPE, the daemon reads it off.
            for _ in 0..10 {
                client.write_all(&[b'y'; 1000]).unwrap();
            }
            let mut got = String::new();
            client.read_to_string(&mut got).unwrap();
            assert_eq!(got, "refused: busy\n");
        }
    }
}
