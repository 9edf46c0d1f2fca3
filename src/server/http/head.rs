//! An HTTP/1.1 request head, as a pure function: bytes in, a [`Head`] or an [`HttpError`] out
//! (httparse does the tokenizing), and the checks every request passes before it is routed:
//! the `Host` (against DNS rebinding), the `Origin` (no cross-origin browser requests) and the
//! API key. No sockets: it can be unit-tested and fuzzed alone.

use super::HttpError;

/// Largest request head (request line and headers).
pub const MAX_HEAD: usize = 16 * 1024;
/// Most headers in a head.
pub const MAX_HEADERS: usize = 48;
/// Largest request body (a long conversation fits; the context is the real limit).
pub const MAX_BODY: usize = 1024 * 1024;

/// Request methods the daemon routes; any other is answered 405.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// GET.
    Get,
    /// HEAD (answered as GET, without a body).
    Head,
    /// POST.
    Post,
    /// Anything else (OPTIONS included: no CORS preflight is ever granted).
    Other,
}

/// What the daemon reads from a request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The method.
    pub method: Method,
    /// The path, without the query string.
    pub path: String,
    /// `Host`, as sent.
    pub host: Option<String>,
    /// `Origin`, as sent (browsers send it on cross-origin and on POST requests).
    pub origin: Option<String>,
    /// `Content-Type`'s media type, lower case, without parameters.
    pub content_type: Option<String>,
    /// `Content-Length` (0 when absent).
    pub content_length: usize,
    /// The token of `Authorization: Bearer <token>`.
    pub bearer: Option<String>,
    /// `Connection: close` or HTTP/1.0: close after the response.
    pub close: bool,
}

/// Parses a request head from the start of `buf`. `Ok(None)`: incomplete, read more (unless
/// `buf` already holds [`MAX_HEAD`] bytes, which is an error). `Ok(Some((head, n)))`: the
/// head took `n` bytes; the body follows.
///
/// # Errors
/// A malformed or over-long head, a body that is chunked or larger than [`MAX_BODY`].
pub fn parse(buf: &[u8]) -> Result<Option<(Head, usize)>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let n = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Ok(None),
        Ok(_) => return Err(HttpError::header_too_large()),
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::header_too_large()),
        Err(e) => return Err(HttpError::bad_request(format!("malformed HTTP request: {e}"))),
    };
    let method = match req.method {
        Some("GET") => Method::Get,
        Some("HEAD") => Method::Head,
        Some("POST") => Method::Post,
        _ => Method::Other,
    };
    let target = req.path.unwrap_or("/");
    let path = target.split(['?', '#']).next().unwrap_or("/").to_string();
    let mut head = Head {
        method,
        path,
        host: None,
        origin: None,
        content_type: None,
        content_length: 0,
        bearer: None,
        close: req.version == Some(0),
    };
    let mut length_seen = false;
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value)
            .map_err(|_| HttpError::bad_request(format!("header '{}' is not UTF-8", h.name)))?
            .trim();
        let name = h.name.to_ascii_lowercase();
        let once = |slot: &mut Option<String>| {
            if slot.is_some() {
                return Err(HttpError::bad_request(format!("header '{}' given twice", h.name)));
            }
            *slot = Some(value.to_string());
            Ok(())
        };
        match name.as_str() {
            "host" => once(&mut head.host)?,
            "origin" => once(&mut head.origin)?,
            "content-type" => {
                let media = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
                once(&mut head.content_type)?;
                head.content_type = Some(media);
            }
            "content-length" => {
                if length_seen {
                    return Err(HttpError::bad_request("header 'Content-Length' given twice".into()));
                }
                length_seen = true;
                let n: usize = value
                    .parse()
                    .map_err(|_| HttpError::bad_request("Content-Length is not a number".into()))?;
                if n > MAX_BODY {
                    return Err(HttpError::body_too_large());
                }
                head.content_length = n;
            }
            "transfer-encoding" => {
                return Err(HttpError::new(
                    411,
                    "invalid_request_error",
                    "length_required",
                    "send the body with Content-Length (chunked bodies are not accepted)".into(),
                ))
            }
            "authorization" => {
                let token = value.strip_prefix("Bearer ").map(str::trim).unwrap_or("");
                head.bearer = Some(token.to_string());
            }
            "connection" if value.eq_ignore_ascii_case("close") => head.close = true,
            _ => {}
        }
    }
    Ok(Some((head, n)))
}

/// Who may ask: the names the server answers to and the API key.
#[derive(Debug, Clone)]
pub struct Policy {
    /// `Host` values accepted (lower case). Empty: any (a UNIX socket, which no web page can
    /// reach).
    pub hosts: Vec<String>,
    /// The API key; when set, every API request must carry it.
    pub api_key: Option<String>,
}

impl Policy {
    /// The policy for a TCP address `ip:port`: that address and the localhost names on its
    /// port. A browser resolving some other name to this address (DNS rebinding) sends that
    /// name as `Host`, which is refused.
    pub fn for_tcp(addr: std::net::SocketAddr, api_key: Option<String>) -> Policy {
        let port = addr.port();
        let ip = match addr.ip() {
            std::net::IpAddr::V4(ip) => ip.to_string(),
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        };
        let mut hosts = vec![format!("{ip}:{port}")];
        if port == 80 {
            hosts.push(ip.clone());
        }
        if addr.ip().is_loopback() {
            for name in ["localhost", "127.0.0.1", "[::1]"] {
                hosts.push(format!("{name}:{port}"));
                if port == 80 {
                    hosts.push(name.to_string());
                }
            }
        }
        hosts.sort();
        hosts.dedup();
        Policy { hosts, api_key }
    }

    /// Checks where a request comes from; `needs_key`: the path is an API one (the page and
    /// `/health` are served without the key, as llama.cpp's server does).
    ///
    /// # Errors
    /// 403 for a foreign `Host` or `Origin`, 401 for a missing or wrong key.
    pub fn check(&self, head: &Head, needs_key: bool) -> Result<(), HttpError> {
        if !self.hosts.is_empty() {
            let host = head.host.as_deref().unwrap_or("").to_ascii_lowercase();
            if !self.hosts.contains(&host) {
                return Err(HttpError::forbidden(format!(
                    "Host '{host}' is not a name of this server (allowed: {})",
                    self.hosts.join(", ")
                )));
            }
        }
        if let Some(origin) = &head.origin {
            // Same origin only: the page served here. A UNIX socket has no web origin at all.
            let origin = origin.to_ascii_lowercase();
            let same = origin
                .strip_prefix("http://")
                .is_some_and(|h| !self.hosts.is_empty() && self.hosts.iter().any(|a| a == h));
            if !same {
                return Err(HttpError::forbidden(format!(
                    "cross-origin requests are refused (Origin '{origin}')"
                )));
            }
        }
        if needs_key {
            if let Some(key) = &self.api_key {
                let given = head.bearer.as_deref().unwrap_or("");
                if !constant_time_eq(given.as_bytes(), key.as_bytes()) {
                    return Err(HttpError::new(
                        401,
                        "invalid_request_error",
                        "invalid_api_key",
                        "a valid API key is required: 'Authorization: Bearer KEY'".into(),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Compares without stopping at the first difference, so the time taken does not tell how
/// much of a guessed key was right (the length is not secret: keys are long and random).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Head {
        parse(text.as_bytes()).unwrap().unwrap().0
    }

    #[test]
    fn a_post_head_is_read() {
        let raw = "POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: 12\r\nAuthorization: Bearer k3y\r\n\r\n{\"a\": true}X";
        let (h, n) = parse(raw.as_bytes()).unwrap().unwrap();
        assert_eq!(&raw[n..], "{\"a\": true}X");
        assert_eq!(h.method, Method::Post);
        assert_eq!(h.path, "/v1/chat/completions");
        assert_eq!(h.content_type.as_deref(), Some("application/json"));
        assert_eq!(h.content_length, 12);
        assert_eq!(h.bearer.as_deref(), Some("k3y"));
        assert!(!h.close);
    }

    #[test]
    fn incomplete_over_long_and_malformed_heads() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHost: a\r\n").unwrap(), None);
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(parse(long.as_bytes()).unwrap_err().status, 431);
        assert_eq!(parse(b"GET / HTTP/1.1\r\nbad header\r\n\r\n").unwrap_err().status, 400);
        let big = format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_BODY + 1);
        assert_eq!(parse(big.as_bytes()).unwrap_err().status, 413);
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
                .unwrap_err()
                .status,
            411
        );
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
                .unwrap_err()
                .status,
            400
        );
        assert!(head("GET / HTTP/1.0\r\n\r\n").close);
    }

    #[test]
    fn host_origin_and_key() {
        let p = Policy::for_tcp("127.0.0.1:8080".parse().unwrap(), Some("secret".into()));
        let ok = head("POST /v1/models HTTP/1.1\r\nHost: localhost:8080\r\nAuthorization: Bearer secret\r\n\r\n");
        assert!(p.check(&ok, true).is_ok());
        let rebound = head("GET / HTTP/1.1\r\nHost: evil.example:8080\r\n\r\n");
        assert_eq!(p.check(&rebound, false).unwrap_err().status, 403);
        let no_host = head("GET / HTTP/1.1\r\n\r\n");
        assert_eq!(p.check(&no_host, false).unwrap_err().status, 403);
        let foreign = head("POST /v1/x HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nOrigin: http://evil.example\r\nAuthorization: Bearer secret\r\n\r\n");
        assert_eq!(p.check(&foreign, true).unwrap_err().status, 403);
        let same = head("POST /v1/x HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nOrigin: http://127.0.0.1:8080\r\nAuthorization: Bearer secret\r\n\r\n");
        assert!(p.check(&same, true).is_ok());
        let wrong = head("POST /v1/x HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAuthorization: Bearer secreT\r\n\r\n");
        assert_eq!(p.check(&wrong, true).unwrap_err().status, 401);
        assert!(p.check(&wrong, false).is_ok(), "the page and /health need no key");
        let v6 = Policy::for_tcp("[::1]:9000".parse().unwrap(), None);
        assert!(v6.hosts.contains(&"[::1]:9000".to_string()));
        assert!(v6.hosts.contains(&"localhost:9000".to_string()));
        let any = Policy {
            hosts: Vec::new(),
            api_key: None,
        };
        assert!(any.check(&no_host, true).is_ok());
        let browser = head("GET / HTTP/1.1\r\nOrigin: http://localhost\r\n\r\n");
        assert_eq!(any.check(&browser, false).unwrap_err().status, 403);
    }

    #[test]
    fn keys_compare_whole() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
