//! An HTTP request head as the daemon reads one (httparse and our checks), then the policy of
//! each kind of listener and the route table. Any bytes give a head or an error, never a
//! panic, and what is read holds together:
//! - a head is whole: it ends at an empty line inside the bytes taken, at most `MAX_HEAD` of
//!   them; read alone those bytes give the same head, and one byte fewer is still incomplete
//!   (a head read as it arrives, in pieces, is the same head or none yet);
//! - "incomplete" only below `MAX_HEAD` bytes; refusals are 400, 411, 413, 417 or 431;
//! - the fields keep their limits (`MAX_BODY`, no query in the path, a plain preflight list);
//! - the policy: a wrong key is 401 and only where the key is needed, a foreign `Host` or
//!   `Origin` 403 whether or not the key is needed, a `Host` is admitted only if it is a name
//!   of the server, a CORS origin is named back only if configured;
//! - the routes: a path routes iff the table has it, every route but the page and `/health`
//!   needs the key, `HEAD` routes as `GET`, `OPTIONS` is a preflight on any known path.
use std::net::IpAddr;

use llama_tpu::server::http::head::{self, Head, Hosts, Method, Policy, MAX_BODY, MAX_HEAD};
use llama_tpu::server::http::routes::{self, Route};

const KEY: &str = "key";

fn contains_ci(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

fn check_head(data: &[u8], h: &Head, used: usize) {
    assert!(used <= data.len(), "took {used} of {} bytes", data.len());
    assert!(used <= MAX_HEAD, "a head of {used} bytes passed MAX_HEAD");
    let raw = &data[..used];
    assert!(
        raw.ends_with(b"\n\n") || raw.ends_with(b"\n\r\n"),
        "the head does not end at an empty line"
    );
    // The same bytes alone, without what follows: the same head.
    assert_eq!(head::parse(raw).ok(), Some(Some((h.clone(), used))));
    // One byte short of the blank line, or half of it: nothing yet (never another head, and
    // never a refusal of a head that is only still arriving).
    for k in [used.saturating_sub(1), used / 2] {
        assert!(
            matches!(head::parse(&data[..k]), Ok(None)),
            "{k} of the head's {used} bytes gave {:?}",
            head::parse(&data[..k])
        );
    }
    assert!(h.content_length <= MAX_BODY);
    assert!(!h.path.contains(['?', '#']), "path {:?} kept its query", h.path);
    assert!(h.path.is_empty() || raw.windows(h.path.len()).any(|w| w == h.path.as_bytes()));
    for v in [&h.host, &h.origin, &h.bearer].into_iter().flatten() {
        assert_eq!(v.trim(), v, "a header value kept its blanks");
        assert!(v.len() < used);
    }
    if let Some(t) = &h.content_type {
        assert!(!t.contains(';') && *t == t.to_ascii_lowercase() && t.trim() == t);
    }
    if let Some(list) = &h.cors_request_headers {
        assert!(list.len() <= 512);
        assert!(list.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_, ".contains(&b)));
    }
    // Flags come from the version or a header saying so.
    assert!(!h.close || h.http10 || contains_ci(raw, "close"));
    assert!(!h.expect_continue || contains_ci(raw, "100-continue"));
    assert!(h.bearer.is_none() || contains_ci(raw, "authorization"));
    assert!(h.content_length == 0 || contains_ci(raw, "content-length"));
}

fn check_policy(p: &Policy, h: &Head) {
    let open = p.check(h, false);
    let closed = p.check(h, true);
    if let Err(e) = &open {
        assert_eq!(e.status, 403, "{e:?}");
        assert_eq!(&closed, &open, "a refusal changed with the key");
    } else {
        match (&p.api_key, &closed) {
            (None, _) => assert_eq!(&closed, &open),
            (Some(k), Ok(_)) => assert_eq!(h.bearer.as_deref(), Some(k.as_str()), "a wrong key passed"),
            (Some(k), Err(e)) => {
                assert_eq!(e.status, 401, "{e:?}");
                assert_ne!(h.bearer.as_deref(), Some(k.as_str()), "the right key was refused");
            }
        }
    }
    if let Ok(admitted) = &open {
        if let Hosts::Names(names) = &p.hosts {
            let host = h.host.as_deref().unwrap_or("");
            let name = head::host_name(host);
            assert!(
                !host.is_empty() && (name == "localhost" || name.parse::<IpAddr>().is_ok() || names.contains(&name)),
                "Host {host:?} was admitted"
            );
        }
        if let Some(o) = &admitted.cors_origin {
            assert_eq!(*o, o.to_ascii_lowercase());
            assert!(!o.ends_with('/'));
            assert!(
                p.cors_origins.iter().any(|c| c == o || c == "*"),
                "{o} is not configured"
            );
            let sent = h.origin.as_deref().unwrap_or_default();
            assert_eq!(*o, sent.trim_end_matches('/').to_ascii_lowercase());
        }
    }
    // Nothing stands between a local process and a UNIX socket but an origin and the key.
    if p.hosts == Hosts::Any && h.origin.is_none() {
        assert!(open.is_ok(), "{open:?}");
    }
}

fn check_routes(h: &Head) {
    let row = routes::find(&h.path);
    assert_eq!(routes::needs_key(&h.path), row.is_none_or(|r| r.needs_key));
    for m in [
        Method::Get,
        Method::Head,
        Method::Post,
        Method::Options,
        Method::Other,
        h.method,
    ] {
        match routes::route(m, &h.path) {
            Ok(r) => {
                assert!(row.is_some(), "{:?} routed to {r:?} outside the table", h.path);
                assert_eq!(r == Route::Preflight, m == Method::Options);
                let open = matches!(r, Route::Page | Route::Health);
                assert!(r == Route::Preflight || open != routes::needs_key(&h.path), "{r:?}");
            }
            Err(e) if row.is_none() => assert_eq!(e.status, 404, "{e:?}"),
            Err(e) => {
                assert_eq!(e.status, 405, "{e:?}");
                assert_ne!(m, Method::Options);
            }
        }
    }
    assert_eq!(
        routes::route(Method::Get, &h.path).ok(),
        routes::route(Method::Head, &h.path).ok()
    );
}

fn main() {
    let policies = [
        Policy::for_tcp(None, None, &[]),
        Policy::for_tcp(None, Some(KEY.into()), &["https://app.example".into()]),
        Policy::for_tcp(Some(&["box.local".into()]), None, &["*".into()]),
        Policy::for_unix(None, &[]),
        Policy::for_unix(Some(KEY.into()), &[]),
    ];
    afl::fuzz!(|data: &[u8]| {
        match head::parse(data) {
            Ok(Some((h, used))) => {
                check_head(data, &h, used);
                for p in &policies {
                    check_policy(p, &h);
                }
                check_routes(&h);
            }
            Ok(None) => assert!(data.len() < MAX_HEAD, "{} bytes and still incomplete", data.len()),
            Err(e) => assert!([400, 411, 413, 417, 431].contains(&e.status), "{e:?}"),
        }
    });
}
