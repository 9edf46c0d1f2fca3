//! Events sent back to JSON-lines clients, one object per line, written into one reused buffer:
//! a token event allocates nothing (the id is serialized once per request; text is escaped
//! straight into the buffer).

use std::io::Write;

use serde_json::Value;

use crate::engine::Summary;

/// Initial buffer size: a token event is well under this; a long error message may grow it once.
const INITIAL_CAPACITY: usize = 1024;

/// Room for an id's JSON form: a string of at most 256 bytes (the protocol's bound), each of
/// which escapes to at most 6 (`\u001f`), and its quotes; a number is far shorter.
const ID_JSON_BYTES: usize = 256 * 6 + 2;

/// Longest error message sent, in bytes before escaping (a longer one is cut at a character
/// boundary): messages name a setting or a file, and what a client sent is never echoed whole.
pub const MAX_MESSAGE_BYTES: usize = 300;

/// The longest line that can end a reply: an `error` with the longest id, a code and the
/// longest message, each byte escaped to 6 (a `done` is shorter: its other fields are numbers
/// and names), its CR on a serial line. [`super::outbound::RESERVE`] holds it.
pub const MAX_LAST_LINE: usize = r#"{"id":,"event":"error","code":"","message":""}"#.len()
    + ID_JSON_BYTES
    + 32
    + 6 * MAX_MESSAGE_BYTES
    + "\r\n".len();

/// A request id, serialized once (`None` when the client gave none), held inline: its bound
/// is in its type.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventId(Option<heapless::String<ID_JSON_BYTES>>);

impl EventId {
    /// From the id the client sent (a string of at most 256 bytes or a number, already
    /// validated; anything longer is dropped rather than echoed).
    pub fn new(id: Option<&Value>) -> EventId {
        EventId(id.and_then(|v| heapless::String::try_from(v.to_string().as_str()).ok()))
    }
}

/// Encodes events into a buffer owned by the connection.
#[derive(Debug)]
pub struct EventWriter {
    buf: Vec<u8>,
}

impl Default for EventWriter {
    fn default() -> Self {
        EventWriter::new()
    }
}

impl EventWriter {
    /// A writer with its buffer allocated.
    pub fn new() -> EventWriter {
        EventWriter {
            buf: Vec::with_capacity(INITIAL_CAPACITY),
        }
    }

    fn start(&mut self, id: &EventId, event: &str) {
        self.buf.clear();
        self.buf.extend_from_slice(b"{");
        if let Some(id) = &id.0 {
            self.buf.extend_from_slice(b"\"id\":");
            self.buf.extend_from_slice(id.as_bytes());
            self.buf.push(b',');
        }
        self.buf.extend_from_slice(b"\"event\":\"");
        self.buf.extend_from_slice(event.as_bytes());
        self.buf.push(b'"');
    }

    fn string_field(&mut self, name: &str, value: &str) {
        self.buf.extend_from_slice(b",\"");
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.extend_from_slice(b"\":");
        // Writing a str into a Vec cannot fail; serde_json escapes it in place.
        let _ = serde_json::to_writer(&mut self.buf, value);
    }

    fn finish(&mut self) -> &[u8] {
        self.buf.extend_from_slice(b"}\n");
        &self.buf
    }

    /// `{"id":..,"event":"queued","position":N}`: N requests are ahead of this one.
    pub fn queued(&mut self, id: &EventId, position: usize) -> &[u8] {
        self.start(id, "queued");
        let _ = write!(self.buf, ",\"position\":{position}");
        self.finish()
    }

    /// `{"id":..,"event":"token","text":".."}`.
    pub fn token(&mut self, id: &EventId, text: &str) -> &[u8] {
        self.start(id, "token");
        self.string_field("text", text);
        self.finish()
    }

    /// `{"id":..,"event":"token","text":..,"reasoning":true}`: a piece of the answer's
    /// reasoning (thinking on).
    pub fn reasoning(&mut self, id: &EventId, text: &str) -> &[u8] {
        self.start(id, "token");
        self.string_field("text", text);
        self.buf.extend_from_slice(b",\"reasoning\":true");
        self.finish()
    }

    /// `{"id":..,"event":"done","reason":..,"prompt_tokens":..,"completion_tokens":..,
    /// "cached_tokens":..,"time_to_first_token_ms":..,"tokens_per_second":..,"dropped_messages":..,
    /// "picker":..}`.
    pub fn done(&mut self, id: &EventId, s: &Summary) -> &[u8] {
        self.start(id, "done");
        self.string_field("reason", s.reason.as_str());
        let _ = write!(
            self.buf,
            ",\"prompt_tokens\":{},\"completion_tokens\":{},\"cached_tokens\":{},\"time_to_first_token_ms\":{:.1},\"tokens_per_second\":{:.2},\"dropped_messages\":{}",
            s.prompt_tokens,
            s.completion_tokens,
            s.cached_tokens,
            s.time_to_first_token.as_secs_f64() * 1000.0,
            s.generation_tokens_per_second(),
            s.dropped_messages
        );
        self.string_field("picker", s.picker);
        self.finish()
    }

    /// `{"id":..,"event":NAME,...fields}`: replies to control requests (status, pong, ...).
    pub fn reply(&mut self, id: &EventId, event: &str, fields: &serde_json::Map<String, Value>) -> &[u8] {
        self.start(id, event);
        for (name, value) in fields {
            self.buf.extend_from_slice(b",");
            let _ = serde_json::to_writer(&mut self.buf, name);
            self.buf.push(b':');
            let _ = serde_json::to_writer(&mut self.buf, value);
        }
        self.finish()
    }

    /// `{"id":..,"event":"error","code":"..","message":".."}`; the message cut to
    /// [`MAX_MESSAGE_BYTES`].
    pub fn error(&mut self, id: &EventId, code: &str, message: &str) -> &[u8] {
        self.start(id, "error");
        self.string_field("code", code);
        self.string_field("message", cut(message, MAX_MESSAGE_BYTES));
        self.finish()
    }
}

/// The longest start of `s` of at most `max` bytes that ends on a character boundary.
pub fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::engine::FinishReason;

    fn parse(line: &[u8]) -> Value {
        assert_eq!(line.last(), Some(&b'\n'), "one line");
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1, "exactly one newline");
        serde_json::from_slice(line).unwrap()
    }

    #[test]
    fn events_are_one_json_object_per_line_with_the_id_echoed() {
        let mut w = EventWriter::new();
        let id = EventId::new(Some(&Value::String("req \"7\"".into())));
        let v = parse(w.token(&id, "line one\nline \"two\"\t\u{1f600}\u{0}"));
        assert_eq!(v["id"], "req \"7\"");
        assert_eq!(v["event"], "token");
        assert_eq!(v["text"], "line one\nline \"two\"\t\u{1f600}\u{0}");
        let v = parse(w.queued(&EventId::new(Some(&serde_json::json!(42))), 3));
        assert_eq!((v["id"].as_u64(), v["position"].as_u64()), (Some(42), Some(3)));
        let v = parse(w.error(&EventId::default(), "busy", "the queue is full"));
        assert!(v.get("id").is_none());
        assert_eq!(
            (v["code"].as_str(), v["message"].as_str()),
            (Some("busy"), Some("the queue is full"))
        );
        let s = Summary {
            reason: FinishReason::Stop,
            prompt_tokens: 12,
            cached_tokens: 4,
            completion_tokens: 9,
            dropped_messages: 2,
            prompt_time: Duration::from_millis(30),
            time_to_first_token: Duration::from_millis(45),
            picker: "sample_head",
            generation_time: Duration::from_millis(80),
        };
        let v = parse(w.done(&id, &s));
        assert_eq!(v["reason"], "stop");
        assert_eq!(v["completion_tokens"], 9);
        assert_eq!(v["dropped_messages"], 2);
        assert_eq!(v["picker"], "sample_head");
        assert_eq!(v["time_to_first_token_ms"].as_f64(), Some(45.0));
        assert_eq!(v["tokens_per_second"].as_f64(), Some(100.0));
        let mut fields = serde_json::Map::new();
        fields.insert("queue_depth".into(), 3.into());
        fields.insert("model".into(), "a \"b\"".into());
        let v = parse(w.reply(&id, "status", &fields));
        assert_eq!(
            (v["event"].as_str(), v["queue_depth"].as_u64()),
            (Some("status"), Some(3))
        );
        assert_eq!(v["model"], "a \"b\"");
    }

    #[test]
    fn token_events_reuse_the_buffer() {
        let mut w = EventWriter::new();
        let id = EventId::new(Some(&serde_json::json!("x")));
        w.token(&id, "warm");
        let cap = w.buf.capacity();
        let ptr = w.buf.as_ptr();
        for i in 0..10_000 {
            w.token(&id, if i % 2 == 0 { " hello" } else { "é\n" });
        }
        assert_eq!((w.buf.capacity(), w.buf.as_ptr()), (cap, ptr));
    }
}
