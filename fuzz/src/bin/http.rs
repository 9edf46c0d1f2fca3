//! An HTTP request as the daemon reads one: the head (httparse and our checks), the policy
//! for each kind of listener, the route table, then the rest as an OpenAI body for both
//! endpoints. Any bytes give a request or an error, never a panic.
use llama_tpu::server::http::{head, openai, routes};

fn main() {
    let policies = [
        head::Policy::for_tcp(None, None, &[]),
        head::Policy::for_tcp(None, Some("key".into()), &["https://app.example".into()]),
        head::Policy::for_tcp(Some(&["box.local".into()]), None, &["*".into()]),
        head::Policy::for_unix(None, &[]),
    ];
    afl::fuzz!(|data: &[u8]| {
        let body = match head::parse(data) {
            Ok(Some((h, used))) => {
                for p in &policies {
                    let _ = p.check(&h, routes::needs_key(&h.path));
                }
                let _ = routes::route(h.method, &h.path);
                &data[used..]
            }
            _ => data,
        };
        let _ = openai::parse(openai::Endpoint::Chat, body);
        let _ = openai::parse(openai::Endpoint::Completion, body);
    });
}
