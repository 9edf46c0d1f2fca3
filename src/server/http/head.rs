//! An HTTP/1.1 request head, as a pure function: bytes in, a [`Head`] or an [`HttpError`] out
//! (httparse does the tokenizing), and the policy every request passes before it is routed:
//! who may connect (the `Host`, against DNS rebinding), from which web pages (the `Origin`,
//! with CORS for the origins the administrator names) and with which key. No sockets: it can
//! be unit-tested and fuzzed alone.

use std::net::IpAddr;

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
    /// OPTIONS (a CORS preflight).
    Options,
    /// Anything else.
    Other,
}

impl Method {
    /// The method as the request line spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Options => "OPTIONS",
            Method::Other => "this method",
        }
    }
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
    /// The client speaks HTTP/1.0 (no chunked replies; the connection closes unless it asks
    /// for keep-alive).
    pub http10: bool,
    /// The connection closes after this request (`Connection: close`, or HTTP/1.0 without
    /// `Connection: keep-alive`).
    pub close: bool,
    /// `Expect: 100-continue`: the client waits for `100 Continue` before sending the body.
    pub expect_continue: bool,
    /// A preflight's `Access-Control-Request-Headers`, when it is a plain list of header names
    /// (so it can be named back).
    pub cors_request_headers: Option<String>,
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
        Some("OPTIONS") => Method::Options,
        _ => Method::Other,
    };
    let target = req.path.unwrap_or("/");
    let path = target.split(['?', '#']).next().unwrap_or("/").to_string();
    let http10 = req.version == Some(0);
    let mut head = Head {
        method,
        path,
        host: None,
        origin: None,
        content_type: None,
        content_length: 0,
        bearer: None,
        http10,
        close: http10,
        expect_continue: false,
        cors_request_headers: None,
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
            "connection" => {
                for option in value.split(',').map(str::trim) {
                    if option.eq_ignore_ascii_case("close") {
                        head.close = true;
                    } else if option.eq_ignore_ascii_case("keep-alive") && http10 {
                        head.close = false;
                    }
                }
            }
            "access-control-request-headers"
                if value.len() <= 512 && value.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_, ".contains(&b)) =>
            {
                head.cors_request_headers = Some(value.to_string());
            }
            "expect" if value.eq_ignore_ascii_case("100-continue") => head.expect_continue = true,
            "expect" => {
                return Err(HttpError::new(
                    417,
                    "invalid_request_error",
                    "expectation_failed",
                    format!("Expect: {value} is not supported (only 100-continue)"),
                ))
            }
            _ => {}
        }
    }
    Ok(Some((head, n)))
}

/// Which `Host` names a TCP listener answers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hosts {
    /// Any name: a UNIX socket (no web page can reach it), `allowed_hosts = ["*"]`, or an API
    /// key without `allowed_hosts` (a page that rebinds a name to this address has no key).
    Any,
    /// `localhost`, IP addresses (a rebinding attack needs a name of the attacker's) and these
    /// names (lower case), on any port: an SSH tunnel or a proxy may use another one.
    Names(Vec<String>),
}

/// Who may ask: the names the server answers to, the web origins that may call it, the key.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Accepted `Host` names.
    pub hosts: Hosts,
    /// The API key; when set, every request but the page and `/health` must carry it.
    pub api_key: Option<String>,
    /// Web origins (`https://app.example:8443`, lower case, or `*`) that may call the API from
    /// their pages: preflights are answered and replies carry CORS headers for them.
    pub cors_origins: Vec<String>,
}

/// What a request may do after the policy looked at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    /// The origin to name in `Access-Control-Allow-Origin` (a configured CORS origin).
    pub cors_origin: Option<String>,
}

/// The name part of a `Host` value or an origin's authority (`[::1]:80` -> `::1`,
/// `Box.Local:8080` -> `box.local`).
pub fn host_name(authority: &str) -> String {
    let a = authority.trim();
    let name = if let Some(rest) = a.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        a.rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(a, |(name, _)| name)
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl Policy {
    /// The policy for a TCP listener: `allowed_hosts` as configured (`None`: not set).
    pub fn for_tcp(allowed_hosts: Option<&[String]>, api_key: Option<String>, cors_origins: &[String]) -> Policy {
        let hosts = match allowed_hosts {
            Some(list) if list.iter().any(|h| h == "*") => Hosts::Any,
            Some(list) => Hosts::Names(list.iter().map(|h| host_name(h)).collect()),
            None if api_key.is_some() => Hosts::Any,
            None => Hosts::Names(Vec::new()),
        };
        Policy {
            hosts,
            api_key,
            cors_origins: cors_origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
        }
    }

    /// The policy for a UNIX socket: any `Host` (only local processes reach it: a proxy).
    pub fn for_unix(api_key: Option<String>, cors_origins: &[String]) -> Policy {
        Policy {
            hosts: Hosts::Any,
            ..Policy::for_tcp(None, api_key, cors_origins)
        }
    }

    /// Whether `name` (no port) is one this server answers to.
    fn host_allowed(&self, name: &str) -> bool {
        match &self.hosts {
            Hosts::Any => true,
            Hosts::Names(names) => {
                name == "localhost" || name.parse::<IpAddr>().is_ok() || names.iter().any(|n| n == name)
            }
        }
    }

    /// Whether a web origin counts as this server's own: the page itself (the origin is the
    /// `Host`, over http or https: a TLS proxy), a localhost name (a tunnel) or a name
    /// `allowed_hosts` lists.
    fn same_origin(&self, origin: &str, host: Option<&str>) -> bool {
        let Some(authority) = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
        else {
            return false;
        };
        if host.is_some_and(|h| h.eq_ignore_ascii_case(authority)) {
            return true;
        }
        let name = host_name(authority);
        match &self.hosts {
            Hosts::Names(names) => name == "localhost" || names.contains(&name),
            Hosts::Any => false,
        }
    }

    /// The configured CORS origin a request comes from, if any (named back even on a refusal,
    /// so the page can read why).
    pub fn cors_origin(&self, head: &Head) -> Option<String> {
        let origin = head.origin.as_deref()?.trim_end_matches('/').to_ascii_lowercase();
        self.cors_origins
            .iter()
            .any(|o| *o == origin || o == "*")
            .then_some(origin)
    }

    /// Checks where a request comes from; `needs_key`: anything but the page and `/health`
    /// (as llama.cpp's server does).
    ///
    /// # Errors
    /// 403 for a foreign `Host` or `Origin`, 401 for a missing or wrong key.
    pub fn check(&self, head: &Head, needs_key: bool) -> Result<Admitted, HttpError> {
        if self.hosts != Hosts::Any {
            let host = head.host.as_deref().unwrap_or("");
            if !self.host_allowed(&host_name(host)) || host.is_empty() {
                return Err(HttpError::forbidden(format!(
                    "Host '{host}' is not a name of this server: add it to allowed_hosts (or set an API key)"
                )));
            }
        }
        let mut admitted = Admitted { cors_origin: None };
        if let Some(origin) = &head.origin {
            let origin = origin.trim_end_matches('/').to_ascii_lowercase();
            if let Some(allowed) = self.cors_origin(head) {
                admitted.cors_origin = Some(allowed);
            } else if !self.same_origin(&origin, head.host.as_deref()) {
                return Err(HttpError::forbidden(format!(
                    "cross-origin requests from '{origin}' are refused (cors_origins names the origins that may call)"
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
        Ok(admitted)
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
        let raw = "POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: 12\r\nAuthorization: Bearer k3y\r\nExpect: 100-continue\r\n\r\n{\"a\": true}X";
        let (h, n) = parse(raw.as_bytes()).unwrap().unwrap();
        assert_eq!(&raw[n..], "{\"a\": true}X");
        assert_eq!(h.method, Method::Post);
        assert_eq!(h.path, "/v1/chat/completions");
        assert_eq!(h.content_type.as_deref(), Some("application/json"));
        assert_eq!(h.content_length, 12);
        assert_eq!(h.bearer.as_deref(), Some("k3y"));
        assert!(!h.close && !h.http10 && h.expect_continue);
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
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nExpect: magic\r\n\r\n").unwrap_err().status,
            417
        );
    }

    #[test]
    fn connection_persistence_follows_the_version_and_the_header() {
        assert!(head("GET / HTTP/1.0\r\n\r\n").close);
        assert!(!head("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").close);
        assert!(!head("GET / HTTP/1.1\r\n\r\n").close);
        assert!(head("GET / HTTP/1.1\r\nConnection: keep-alive, close\r\n\r\n").close);
    }

    #[test]
    fn host_names_lose_their_port() {
        assert_eq!(host_name("Box.Local:8080"), "box.local");
        assert_eq!(host_name("[::1]:9000"), "::1");
        assert_eq!(host_name("[fe80::1]"), "fe80::1");
        assert_eq!(host_name("example.com."), "example.com");
        assert_eq!(host_name("192.168.1.20"), "192.168.1.20");
    }

    #[test]
    fn loopback_without_a_key_answers_local_names_on_any_port() {
        let p = Policy::for_tcp(None, None, &[]);
        for host in [
            "localhost:8080",
            "localhost:9999",
            "127.0.0.1:8080",
            "[::1]:1",
            "192.168.1.20:8080",
        ] {
            let h = head(&format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n"));
            assert!(p.check(&h, true).is_ok(), "{host}");
        }
        for host in ["rebound.example:8080", "box.local:8080", ""] {
            let h = head(&format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n"));
            assert_eq!(p.check(&h, false).unwrap_err().status, 403, "{host}");
        }
        assert_eq!(p.check(&head("GET / HTTP/1.1\r\n\r\n"), false).unwrap_err().status, 403);
        // The page from a tunnel or a TLS proxy is same-origin; another site is not.
        let ok = head("POST /v1/x HTTP/1.1\r\nHost: localhost:9999\r\nOrigin: http://localhost:9999\r\n\r\n");
        assert!(p.check(&ok, true).is_ok());
        let tls = head("POST /v1/x HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nOrigin: https://localhost\r\n\r\n");
        assert!(p.check(&tls, true).is_ok());
        for origin in [
            "http://evil.example",
            "http://192.168.1.9",
            "null",
            "file://",
            "http://localhost.evil.example",
        ] {
            let h = head(&format!(
                "POST /v1/x HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nOrigin: {origin}\r\n\r\n"
            ));
            assert_eq!(p.check(&h, true).unwrap_err().status, 403, "{origin}");
        }
    }

    #[test]
    fn a_key_or_allowed_hosts_open_other_names() {
        let keyed = Policy::for_tcp(None, Some("secret".into()), &[]);
        let lan = head("POST /v1/x HTTP/1.1\r\nHost: box.local:8080\r\nAuthorization: Bearer secret\r\n\r\n");
        assert!(keyed.check(&lan, true).is_ok());
        let wrong = head("POST /v1/x HTTP/1.1\r\nHost: box.local:8080\r\nAuthorization: Bearer secreT\r\n\r\n");
        assert_eq!(keyed.check(&wrong, true).unwrap_err().status, 401);
        assert!(keyed.check(&wrong, false).is_ok(), "the page and /health need no key");
        let named = Policy::for_tcp(Some(&["Box.Local".to_string()]), None, &[]);
        assert!(named
            .check(&head("GET / HTTP/1.1\r\nHost: box.local:8080\r\n\r\n"), true)
            .is_ok());
        assert!(named
            .check(&head("GET / HTTP/1.1\r\nHost: localhost:7\r\n\r\n"), true)
            .is_ok());
        let other = head("GET / HTTP/1.1\r\nHost: other.local:8080\r\n\r\n");
        assert_eq!(named.check(&other, true).unwrap_err().status, 403);
        let proxied = head("POST /v1/x HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nOrigin: https://box.local\r\n\r\n");
        assert!(
            named.check(&proxied, true).is_ok(),
            "https origins of allowed hosts are the page's"
        );
        let star = Policy::for_tcp(Some(&["*".to_string()]), None, &[]);
        assert!(star.check(&other, true).is_ok());
        let foreign = head("POST /v1/x HTTP/1.1\r\nHost: other.local:8080\r\nOrigin: http://evil.example\r\n\r\n");
        assert_eq!(star.check(&foreign, true).unwrap_err().status, 403);
    }

    #[test]
    fn cors_origins_are_named_back() {
        let p = Policy::for_tcp(None, None, &["https://App.Example:8443/".to_string()]);
        let h = head(
            "OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: localhost:8080\r\nOrigin: https://app.example:8443\r\nAccess-Control-Request-Headers: authorization, x-stainless-os\r\n\r\n",
        );
        assert_eq!(h.cors_request_headers.as_deref(), Some("authorization, x-stainless-os"));
        let odd = head("OPTIONS / HTTP/1.1\r\nAccess-Control-Request-Headers: a:b\r\n\r\n");
        assert_eq!(odd.cors_request_headers, None);
        assert_eq!(
            p.check(&h, false).unwrap().cors_origin.as_deref(),
            Some("https://app.example:8443")
        );
        let other = head("GET / HTTP/1.1\r\nHost: localhost:8080\r\nOrigin: https://app.example\r\n\r\n");
        assert_eq!(p.check(&other, false).unwrap_err().status, 403);
    }

    #[test]
    fn a_unix_socket_takes_any_host_but_not_foreign_origins() {
        let p = Policy::for_unix(None, &[]);
        assert!(p.check(&head("GET / HTTP/1.1\r\nHost: anything\r\n\r\n"), true).is_ok());
        assert!(p.check(&head("GET / HTTP/1.1\r\n\r\n"), true).is_ok());
        let proxied = head("POST /v1/x HTTP/1.1\r\nHost: box.example\r\nOrigin: https://box.example\r\n\r\n");
        assert!(p.check(&proxied, true).is_ok());
        let browser = head("GET / HTTP/1.1\r\nHost: box.example\r\nOrigin: http://localhost\r\n\r\n");
        assert_eq!(p.check(&browser, false).unwrap_err().status, 403);
    }

    #[test]
    fn keys_compare_whole() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
