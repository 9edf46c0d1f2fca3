//! The UNIX-socket transport: binding (or adopting systemd's socket), the accept loop with its
//! connection cap and peer check, and one thread per connection.

use std::collections::HashMap;
use std::io::{self, Read};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

use super::events::{EventId, EventWriter};
use super::framing::{Frame, LineFramer, MAX_LINE};
use super::outbound::Outbound;
use super::session::{Flow, Output, Session};
use super::shared::Shared;

/// How often a client's writer thread, blocked on a client that does not read, looks up to
/// see whether the connection is over (the engine never waits on it: see [`super::outbound`]).
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// How often blocked loops look at the shutdown flag.
const POLL_MS: i32 = 100;

/// Why the socket could not be set up. All of these are configuration problems.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Another daemon answers on the path.
    #[error("{0}: another llama-tpu daemon is already serving on this socket")]
    InUse(PathBuf),
    /// Something that is not a socket is in the way.
    #[error("{0}: exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// A system call failed.
    #[error("{path}: cannot {what}: {err}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The socket path.
        path: PathBuf,
        /// The error.
        err: io::Error,
    },
    /// The configured group does not exist.
    #[error("socket group '{0}' does not exist")]
    NoGroup(String),
    /// systemd passed something unusable.
    #[error("the socket passed by systemd (LISTEN_FDS) is not a listening UNIX stream socket: {0}")]
    Activation(io::Error),
}

/// A listening socket; a socket file the daemon made itself is removed when it is dropped.
pub struct Listener {
    inner: UnixListener,
    owned_path: Option<PathBuf>,
}

impl Listener {
    /// Binds `path` with file mode `mode` and optionally group `group`. A stale socket file (no
    /// daemon behind it) is replaced; a live one is refused.
    ///
    /// # Errors
    /// See [`ListenError`].
    pub fn bind(path: &Path, mode: u32, group: Option<&str>) -> Result<Listener, ListenError> {
        let io_err = |what, err| ListenError::Io {
            what,
            path: path.to_path_buf(),
            err,
        };
        let gid = match group {
            Some(name) => Some(
                nix::unistd::Group::from_name(name)
                    .ok()
                    .flatten()
                    .ok_or_else(|| ListenError::NoGroup(name.to_string()))?
                    .gid,
            ),
            None => None,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| io_err("create its directory", e))?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => return Err(ListenError::NotASocket(path.to_path_buf())),
            Ok(_) => match UnixStream::connect(path) {
                Ok(_) => return Err(ListenError::InUse(path.to_path_buf())),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    log::warn!("{}: removing a stale socket file", path.display());
                    std::fs::remove_file(path).map_err(|e| io_err("remove the stale socket", e))?;
                }
                Err(e) => return Err(io_err("check the existing socket", e)),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("inspect", e)),
        }
        // No moment with looser permissions than asked: the socket is made owner-only, then
        // opened up to `mode` once its group is right.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
        let bound = UnixListener::bind(path);
        nix::sys::stat::umask(old);
        let inner = bound.map_err(|e| io_err("bind", e))?;
        let listener = Listener {
            inner,
            owned_path: Some(path.to_path_buf()),
        };
        if let Some(gid) = gid {
            nix::unistd::chown(path, None, Some(gid)).map_err(|e| io_err("set the socket's group", e.into()))?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| io_err("set the socket's mode", e))?;
        Ok(listener)
    }

    /// The socket systemd passed (socket activation), if any.
    ///
    /// # Errors
    /// LISTEN_FDS names a descriptor that is not a listening UNIX socket.
    pub fn from_systemd() -> Result<Option<Listener>, ListenError> {
        let mut fds = listenfd::ListenFd::from_env();
        if fds.len() == 0 {
            return Ok(None);
        }
        let inner = fds.take_unix_listener(0).map_err(ListenError::Activation)?;
        Ok(inner.map(|inner| Listener {
            inner,
            owned_path: None,
        }))
    }

    /// Where it listens, for logs.
    pub fn describe(&self) -> String {
        match &self.owned_path {
            Some(p) => p.display().to_string(),
            None => match self
                .inner
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(Path::to_path_buf))
            {
                Some(p) => format!("{} (from systemd)", p.display()),
                None => "the socket from systemd".into(),
            },
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(p) = &self.owned_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Open connections, so shutdown can close them.
#[derive(Default)]
pub struct Connections {
    streams: Mutex<HashMap<u64, UnixStream>>,
}

impl Connections {
    /// Ends every connection's reading: their threads see the end of input and end, and each
    /// writer thread sends what its client has not yet read (the end of a reply) and closes.
    pub fn close_all(&self) {
        for s in self.streams.lock().unwrap_or_else(PoisonError::into_inner).values() {
            let _ = s.shutdown(Shutdown::Read);
        }
    }

    /// Connections still open.
    pub fn open(&self) -> usize {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

/// Accepts connections until shutdown begins.
pub fn accept_loop(
    listener: Listener,
    shared: Arc<Shared>,
    conns: Arc<Connections>,
    max_connections: usize,
    outbound_buffer: usize,
) {
    if let Err(e) = listener.inner.set_nonblocking(true) {
        log::error!("socket: {e}");
        return;
    }
    let mut next_id = 0u64;
    while !shared.is_stopping() {
        let mut fds = [PollFd::new(listener.inner.as_raw_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, POLL_MS).unwrap_or(0) == 0 {
            continue;
        }
        match listener.inner.accept() {
            Ok((stream, _)) => {
                next_id += 1;
                admit(stream, next_id, &shared, &conns, (max_connections, outbound_buffer));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // Out of descriptors, for instance: wait instead of spinning.
                log::warn!("socket accept: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    drop(listener);
}

fn refuse(stream: UnixStream, code: &str, message: &str) {
    let mut w = EventWriter::new();
    super::refusal::refuse(stream, w.error(&EventId::default(), code, message).to_vec());
}

fn admit(
    stream: UnixStream,
    id: u64,
    shared: &Arc<Shared>,
    conns: &Arc<Connections>,
    (max_connections, outbound_buffer): (usize, usize),
) {
    let _ = stream.set_nonblocking(false);
    let peer = match getsockopt(stream.as_raw_fd(), PeerCredentials) {
        Ok(c) => (c.pid(), c.uid(), c.gid()),
        Err(e) => {
            log::warn!("socket: cannot read the peer's credentials ({e}); connection refused");
            return refuse(stream, "permission_denied", "peer credentials unavailable");
        }
    };
    let name = format!("socket client {id} (pid {}, uid {}, gid {})", peer.0, peer.1, peer.2);
    if !shared.defaults().allows(peer.1, peer.2) {
        log::warn!("{name}: refused, not in allow_uids / allow_gids");
        return refuse(stream, "permission_denied", "this user may not use the daemon");
    }
    let open = shared.stats.connections.load(Ordering::Relaxed) as usize;
    if open >= max_connections {
        log::warn!("{name}: refused, {open} connections open (max_connections)");
        return refuse(
            stream,
            "too_many_connections",
            "the daemon has too many connections open",
        );
    }
    let (writer, registered) = match (stream.try_clone(), stream.try_clone()) {
        (Ok(w), Ok(r)) => (w, r),
        (Err(e), _) | (_, Err(e)) => return log::warn!("{name}: {e}"),
    };
    // The writer thread wakes up this often while a client does not read, to see whether the
    // connection is over.
    let _ = writer.set_write_timeout(Some(WRITE_TIMEOUT));
    // Our bounded buffer is the one that counts: keep the kernel's behind it small.
    let _ = nix::sys::socket::setsockopt(writer.as_raw_fd(), nix::sys::socket::sockopt::SndBuf, &outbound_buffer);
    let outbound = Outbound::new(outbound_buffer);
    if let Err(e) = outbound.drain_into(Box::new(writer), format!("client-{id}-out")) {
        return log::error!("{name}: cannot start its writer thread: {e}");
    }
    log::info!("{name}: connected");
    shared.stats.connections.fetch_add(1, Ordering::Relaxed);
    conns
        .streams
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(id, registered);
    let session = Session::new(Output::new(outbound, false), Arc::clone(shared), false, name.clone());
    let registration = Registration {
        id,
        name,
        conns: Arc::clone(conns),
        shared: Arc::clone(shared),
    };
    let spawned = std::thread::Builder::new()
        .name(format!("client-{id}"))
        .stack_size(super::CONNECTION_STACK)
        .spawn(move || {
            // Dropped however the thread ends, an unwinding panic included: the slot is freed
            // and the client's socket closed either way.
            let _registration = registration;
            serve_connection(stream, session);
        });
    if let Err(e) = spawned {
        log::error!("cannot start a connection thread: {e}");
    }
}

/// A connection's place in the daemon: its entry in the open connections and its count.
/// Dropping it gives both back.
struct Registration {
    id: u64,
    name: String,
    conns: Arc<Connections>,
    shared: Arc<Shared>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        // Its descriptor goes; the client sees the end once the writer thread has sent what
        // was queued and dropped the last one.
        self.conns
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
        self.shared.stats.connections.fetch_sub(1, Ordering::Relaxed);
        // Logged once the slot is free: whoever reads the log may count on it.
        if std::thread::panicking() {
            log::error!("{}: its connection thread failed; connection closed", self.name);
        } else {
            log::info!("{}: disconnected", self.name);
        }
    }
}

fn serve_connection(mut stream: UnixStream, mut session: Session) {
    let mut framer = LineFramer::new(MAX_LINE);
    // A fixed buffer per connection: reading cannot grow it.
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                framer.push(&buf[..n]);
                while let Some(frame) = framer.next_frame() {
                    if let Frame::Line(line) = &frame {
                        crate::faults::connection_panic(line);
                    }
                    if session.frame(frame) == Flow::Quit {
                        session.cancel();
                        return;
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    if let Some(frame) = framer.finish() {
        session.frame(frame);
    }
    // The client stopped sending. It may only have shut down its half (`socat`, `nc -N`) and
    // still wait for the answer, or it may be gone: then its request is cancelled.
    while session.busy() {
        let mut fds = [PollFd::new(stream.as_raw_fd(), PollFlags::empty())];
        let hung_up = poll(&mut fds, POLL_MS).is_ok_and(|n| n > 0)
            && fds[0]
                .revents()
                .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR));
        if hung_up || session.is_gone() {
            session.cancel();
            break;
        }
    }
}
