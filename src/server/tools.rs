//! Tool calls (OpenAI's `tools`, on HTTP and the socket): the tools a client offers, how the
//! model is told of them and what its answer may be, in the syntax its chat template teaches
//! ([`ToolSyntax`]), and how calls are read back out of the answer as it streams.
//!
//! Pure, like the parsers: JSON values in; plain messages, an answer [`Shape`] and calls out.
//! The transports parse a request's `tools`, `tool_choice` and its messages' calls and results
//! with [`parse_tools`], [`parse_choice`] and [`parse_calls`]; [`prepare`] rewrites the
//! conversation for the model and says what its answer must be; a [`CallReader`] splits the
//! answer into the text a client sees at once and the calls it gets at the end.

use std::fmt::Write as _;
use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::chat::{Message, Role, ToolCall, ToolSyntax};
use crate::engine::constraint::json_part;
use crate::engine::Shape;

/// Most tools one request may offer.
pub const MAX_TOOLS: usize = 128;

/// Longest tool name (OpenAI's limit).
pub const MAX_NAME: usize = 64;

/// A function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    /// Letters, digits, `_` and `-`, at most [`MAX_NAME`].
    pub name: String,
    /// What it does, for the model.
    pub description: Option<String>,
    /// Its arguments: a JSON Schema of an object.
    pub parameters: Value,
}

/// `tool_choice`, once `none` has been taken out (no tools at all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model decides: text, or calls.
    Auto,
    /// At least one call of any of the tools.
    Required,
    /// A call of this tool.
    Named(String),
}

/// The tools of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Tools {
    /// What may be called.
    pub list: Vec<Tool>,
    /// Whether and what must be called.
    pub choice: ToolChoice,
}

/// Whether an answer under these tools may think first (`enable_thinking`): not when it must
/// call, since the call's grammar holds from the first token; with `auto` the model writes
/// freely until it opens a call.
pub fn leaves_room_to_think(tools: Option<&Tools>) -> bool {
    tools.is_none_or(|t| t.choice == ToolChoice::Auto)
}

fn expected(field: &str, what: &str) -> String {
    format!("'{field}' must be {what}")
}

/// `tools`: `[{"type": "function", "function": {"name", "description"?, "parameters"?,
/// "strict"?}}]`. An empty list is no tools.
///
/// # Errors
/// A message naming the field that is wrong.
pub fn parse_tools(value: Value) -> Result<Vec<Tool>, String> {
    let Value::Array(items) = value else {
        return Err(expected("tools", "a list of tools"));
    };
    if items.len() > MAX_TOOLS {
        return Err(expected("tools", &format!("a list of at most {MAX_TOOLS} tools")));
    }
    let mut tools: Vec<Tool> = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let at = format!("tools[{i}]");
        let Value::Object(mut item) = item else {
            return Err(expected(&at, "an object"));
        };
        match item.get("type").and_then(Value::as_str) {
            Some("function") => {}
            _ => return Err(expected(&format!("{at}.type"), "\"function\"")),
        }
        let Some(Value::Object(mut function)) = item.remove("function") else {
            return Err(expected(&format!("{at}.function"), "an object"));
        };
        let name = match function.remove("name") {
            Some(Value::String(n)) if valid_name(&n) => n,
            _ => {
                return Err(expected(
                    &format!("{at}.function.name"),
                    &format!("1 to {MAX_NAME} letters, digits, '_' or '-'"),
                ))
            }
        };
        if tools.iter().any(|t| t.name == name) {
            return Err(format!("'{at}.function.name': '{name}' is offered twice"));
        }
        let description = match function.remove("description") {
            None | Some(Value::Null) => None,
            Some(Value::String(d)) => Some(d),
            Some(_) => return Err(expected(&format!("{at}.function.description"), "a string")),
        };
        // A function without parameters takes none (OpenAI's reading).
        let parameters = match function.remove("parameters") {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(p @ Value::Object(_)) => p,
            Some(_) => {
                return Err(expected(
                    &format!("{at}.function.parameters"),
                    "a JSON schema (an object)",
                ))
            }
        };
        // `strict` asks for what the daemon always does: arguments that follow the schema.
        tools.push(Tool {
            name,
            description,
            parameters,
        });
    }
    Ok(tools)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `tool_choice`: `"none"`, `"auto"`, `"required"` or `{"type": "function", "function":
/// {"name": ...}}`; `None` for `"none"`.
///
/// # Errors
/// A message naming the field that is wrong.
pub fn parse_choice(value: &Value) -> Result<Option<ToolChoice>, String> {
    match value {
        Value::Null => Ok(Some(ToolChoice::Auto)),
        Value::String(s) => match s.as_str() {
            "none" => Ok(None),
            "auto" => Ok(Some(ToolChoice::Auto)),
            "required" => Ok(Some(ToolChoice::Required)),
            _ => Err(expected(
                "tool_choice",
                "\"none\", \"auto\", \"required\" or a named function",
            )),
        },
        Value::Object(o) => match o.get("function").and_then(|f| f.get("name")).and_then(Value::as_str) {
            Some(name) => Ok(Some(ToolChoice::Named(name.to_string()))),
            None => Err(expected("tool_choice.function.name", "a tool's name")),
        },
        _ => Err(expected("tool_choice", "a string or an object")),
    }
}

/// Puts tools and a choice together, checking that a named tool is offered.
///
/// # Errors
/// A choice that asks for a call without tools, or of a tool not offered.
pub fn offer(list: Vec<Tool>, choice: Option<ToolChoice>) -> Result<Option<Tools>, String> {
    let Some(choice) = choice else {
        return Ok(None);
    };
    if list.is_empty() {
        return match choice {
            ToolChoice::Auto => Ok(None),
            _ => Err("'tool_choice' asks for a call, but no 'tools' are given".into()),
        };
    }
    if let ToolChoice::Named(name) = &choice {
        if !list.iter().any(|t| &t.name == name) {
            return Err(format!("'tool_choice' names '{name}', which is not among the 'tools'"));
        }
    }
    Ok(Some(Tools { list, choice }))
}

/// An assistant message's `tool_calls`: `[{"id", "type": "function", "function": {"name",
/// "arguments"}}]` (arguments a JSON text, as OpenAI sends them, or an object).
///
/// # Errors
/// A message naming the field (under `at`) that is wrong.
pub fn parse_calls(value: Value, at: &str) -> Result<Vec<ToolCall>, String> {
    let items = match value {
        Value::Null => return Ok(Vec::new()),
        Value::Array(items) if items.len() <= MAX_TOOLS => items,
        _ => return Err(expected(at, &format!("a list of at most {MAX_TOOLS} calls"))),
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let at = format!("{at}[{i}]");
            let id = item.get("id").and_then(Value::as_str).unwrap_or("").to_string();
            let function = item
                .get("function")
                .ok_or_else(|| expected(&format!("{at}.function"), "given"))?;
            let name = function
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| expected(&format!("{at}.function.name"), "a string"))?
                .to_string();
            let arguments = match function.get("arguments") {
                None | Some(Value::Null) => "{}".to_string(),
                // Kept as the client wrote it, if it is JSON.
                Some(Value::String(text)) => match serde_json::from_str::<Value>(text) {
                    Ok(_) => text.clone(),
                    Err(_) => return Err(expected(&format!("{at}.function.arguments"), "JSON text")),
                },
                Some(v @ Value::Object(_)) => v.to_string(),
                Some(_) => return Err(expected(&format!("{at}.function.arguments"), "JSON text")),
            };
            Ok(ToolCall { id, name, arguments })
        })
        .collect()
}

/// Rewrites a conversation for the model and says what its answer must be: the tools (if
/// any) described where `syntax` puts them, earlier calls and results written the way the
/// model writes them (always: a conversation may carry results after tools are withdrawn).
/// `response` is the `response_format` shape, which the generic format can carry as its
/// `response`. Returns the answer's shape (`None`: free text).
///
/// # Errors
/// A `response_format` beside tools where the syntax cannot hold both.
pub fn prepare(
    syntax: ToolSyntax,
    tools: Option<&Tools>,
    messages: &mut Vec<Message>,
    response: Option<&Shape>,
    default_system: Option<&str>,
) -> Result<Option<Shape>, String> {
    flatten(syntax, tools.is_some(), messages);
    let Some(tools) = tools else {
        return Ok(response.cloned());
    };
    if response.is_some() && syntax != ToolSyntax::Generic {
        return Err(format!(
            "'response_format' beside 'tools' is not supported for this model's tool syntax ({})",
            syntax.as_str()
        ));
    }
    let offered: Vec<&Tool> = match &tools.choice {
        ToolChoice::Named(name) => tools.list.iter().filter(|t| &t.name == name).collect(),
        _ => tools.list.iter().collect(),
    };
    let must_call = tools.choice != ToolChoice::Auto;
    match syntax {
        ToolSyntax::Generic => {
            add_to_system(messages, &generic_instructions(&tools.list, must_call), default_system);
            let call = json!({
                "type": "object",
                "properties": {"tool_call": any_of(offered.iter().map(|t| call_schema(t, "arguments")).collect())},
                "required": ["tool_call"],
            });
            let shape = if must_call {
                call
            } else {
                let answer = match response {
                    Some(Shape::Schema(s)) => Value::clone(s),
                    Some(Shape::AnyJson) => json!({}),
                    _ => json!({"type": "string"}),
                };
                json!({"anyOf": [call, {
                    "type": "object", "properties": {"response": answer}, "required": ["response"],
                }]})
            };
            Ok(Some(Shape::Schema(Arc::new(shape))))
        }
        ToolSyntax::Hermes => {
            add_to_system(messages, &hermes_instructions(&tools.list), default_system);
            let call = any_of(offered.iter().map(|t| call_schema(t, "arguments")).collect());
            let call = json_part(call).map_err(|e| e.0)?;
            let mut lark = String::from("%llguidance {}\n");
            if must_call {
                lark.push_str("start: \"<tool_call>\\n\" call \"\\n</tool_call>\" more*\n");
            } else {
                // Text without a call, or text up to the first `<tool_call>` and then calls.
                lark.push_str("start: TEXT | lead call \"\\n</tool_call>\" more*\n");
                lark.push_str("TEXT: /(?s:.*)/ & ~/(?s:.*)<tool_call>(?s:.*)/\n");
                lark.push_str("lead[lazy]: /(?s:.*)<tool_call>\\n/\n");
            }
            lark.push_str("more: \"\\n<tool_call>\\n\" call \"\\n</tool_call>\"\n");
            let _ = writeln!(lark, "call: %json {call}");
            Ok(Some(Shape::Lark(lark.into())))
        }
        ToolSyntax::Llama3 => {
            add_to_first_user(messages, &llama3_instructions(&tools.list));
            let call = any_of(offered.iter().map(|t| call_schema(t, "parameters")).collect());
            if must_call {
                return Ok(Some(Shape::Schema(Arc::new(call))));
            }
            let call = json_part(call).map_err(|e| e.0)?;
            // Text that does not open with `{`, or a call.
            let lark = format!("%llguidance {{}}\nstart: TEXT | call\nTEXT: /[^{{](?s:.*)/\ncall: %json {call}\n");
            Ok(Some(Shape::Lark(lark.into())))
        }
    }
}

/// One tool's call as a schema: its name, then its arguments under `arguments` (or
/// Llama-3.1's `parameters`).
fn call_schema(tool: &Tool, arguments: &str) -> Value {
    let mut properties = Map::new();
    properties.insert("name".into(), json!({"const": tool.name}));
    properties.insert(arguments.into(), tool.parameters.clone());
    json!({"type": "object", "properties": properties, "required": ["name", arguments]})
}

fn any_of(mut schemas: Vec<Value>) -> Value {
    if schemas.len() == 1 {
        schemas.remove(0)
    } else {
        json!({"anyOf": schemas})
    }
}

/// The tools as OpenAI's own description of them, one JSON line each.
fn tool_lines(tools: &[Tool], wrapped: bool) -> String {
    let mut out = String::new();
    for t in tools {
        let mut function = Map::new();
        function.insert("name".into(), Value::String(t.name.clone()));
        if let Some(d) = &t.description {
            function.insert("description".into(), Value::String(d.clone()));
        }
        function.insert("parameters".into(), t.parameters.clone());
        let line = if wrapped {
            json!({"type": "function", "function": function})
        } else {
            Value::Object(function)
        };
        let _ = writeln!(out, "{line}");
    }
    out
}

/// The generic format's instructions (llama-server's, for templates that know no tools).
fn generic_instructions(tools: &[Tool], must_call: bool) -> String {
    let mut s = String::from("You can call any of the following tools to satisfy the user's requests:\n");
    s.push_str(&tool_lines(tools, false));
    if must_call {
        s.push_str("\nRespond in JSON format with `tool_call` (a request to call a tool).\n");
    } else {
        s.push_str(
            "\nRespond in JSON format, either with `tool_call` (a request to call tools) or with `response` reply to the user's request.\n",
        );
    }
    s.push_str("Example tool call syntax:\n{\"tool_call\": {\"name\": \"tool_name\", \"arguments\": {\"arg1\": \"some_value\"}}}");
    s
}

/// Hermes' instructions, as Qwen2.5's template writes them.
fn hermes_instructions(tools: &[Tool]) -> String {
    let mut s = String::from(
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n",
    );
    s.push_str(&tool_lines(tools, true));
    s.push_str("</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>");
    s
}

/// Llama-3.1's instructions for tools the user gives (in the first user message).
fn llama3_instructions(tools: &[Tool]) -> String {
    let mut s = String::from(
        "Given the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.\n\nRespond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}. Do not use variables.\n\n",
    );
    s.push_str(&tool_lines(tools, true));
    s
}

/// Adds `text` to the conversation's system message; without one, to the template's own
/// (`default`: Qwen2.5's), as the template itself does with tools.
fn add_to_system(messages: &mut Vec<Message>, text: &str, default: Option<&str>) {
    match messages.first_mut() {
        Some(m) if m.role == Role::System => {
            m.content.push_str("\n\n");
            m.content.push_str(text);
        }
        _ => {
            let content = default.map_or_else(|| text.to_string(), |d| format!("{d}\n\n{text}"));
            messages.insert(0, Message::new(Role::System, content));
        }
    }
}

fn add_to_first_user(messages: &mut Vec<Message>, text: &str) {
    match messages.iter_mut().find(|m| m.role == Role::User) {
        Some(m) => m.content = format!("{text}\n{}", m.content),
        None => messages.push(Message::new(Role::User, text)),
    }
}

/// Writes earlier calls and results as the model writes and reads them. In the generic
/// format with tools on, an assistant's plain answer is written as its `response` too, so the
/// model sees the format it is held to.
fn flatten(syntax: ToolSyntax, tools_on: bool, messages: &mut Vec<Message>) {
    if !messages.iter().any(|m| !m.calls.is_empty() || m.role == Role::Tool) && !tools_on {
        return;
    }
    let names: Vec<(String, String)> = messages
        .iter()
        .flat_map(|m| m.calls.iter().map(|c| (c.id.clone(), c.name.clone())))
        .collect();
    // A result without an id (Ollama's) answers the last calls in their order.
    let mut unanswered: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    let name_of = |id: &Option<String>, unanswered: &mut std::collections::VecDeque<String>| {
        let by_id = id
            .as_ref()
            .filter(|id| !id.is_empty())
            .and_then(|id| names.iter().find(|(i, _)| i == id))
            .map(|(_, n)| n.clone());
        let next = unanswered.pop_front();
        by_id.or(next)
    };
    let mut out: Vec<Message> = Vec::with_capacity(messages.len());
    for mut m in messages.drain(..) {
        let calls = std::mem::take(&mut m.calls);
        if !calls.is_empty() {
            unanswered = calls.iter().map(|c| c.name.clone()).collect();
        }
        let tool_name = if m.role == Role::Tool {
            name_of(&m.call_id, &mut unanswered)
        } else {
            None
        };
        let arguments = |c: &ToolCall| serde_json::from_str::<Value>(&c.arguments).unwrap_or_else(|_| json!({}));
        match (syntax, m.role) {
            (ToolSyntax::Generic, Role::Assistant) if !calls.is_empty() && !tools_on => {
                for c in &calls {
                    if !m.content.is_empty() {
                        m.content.push('\n');
                    }
                    let _ = write!(m.content, "I call {} with {}.", c.name, c.arguments);
                }
            }
            (ToolSyntax::Generic, Role::Assistant) if !calls.is_empty() => {
                let written: Vec<Value> = calls
                    .iter()
                    .map(|c| json!({"name": c.name, "arguments": arguments(c)}))
                    .collect();
                m.content = if written.len() == 1 {
                    json!({"tool_call": written[0]}).to_string()
                } else {
                    json!({"tool_calls": written}).to_string()
                };
            }
            (ToolSyntax::Generic, Role::Assistant) if tools_on => {
                m.content = json!({"response": m.content}).to_string();
            }
            (ToolSyntax::Generic, Role::Tool) if tools_on => {
                let response = json!({"tool_response": {
                    "tool": tool_name, "tool_call_id": m.call_id, "content": m.content,
                }});
                m = Message::new(Role::User, response.to_string());
            }
            // Tools withdrawn (`tool_choice: "none"`): the answer is text, and the model reads
            // what happened as text too (JSON here leads a small model to answer in JSON).
            (ToolSyntax::Generic, Role::Tool) => {
                let tool = tool_name.unwrap_or_else(|| "the tool".into());
                m = Message::new(Role::User, format!("{tool} returned: {}", m.content));
            }
            (ToolSyntax::Hermes, Role::Assistant) => {
                for c in &calls {
                    if !m.content.is_empty() {
                        m.content.push('\n');
                    }
                    let call = json!({"name": c.name, "arguments": arguments(c)});
                    let _ = write!(m.content, "<tool_call>\n{call}\n</tool_call>");
                }
            }
            (ToolSyntax::Hermes, Role::Tool) => {
                let block = format!("<tool_response>\n{}\n</tool_response>", m.content);
                // Results that follow each other make one user turn, as Qwen's template has it.
                if let Some(last) = out
                    .last_mut()
                    .filter(|l| l.role == Role::User && l.content.ends_with("</tool_response>"))
                {
                    last.content.push('\n');
                    last.content.push_str(&block);
                    continue;
                }
                m = Message::new(Role::User, block);
            }
            (ToolSyntax::Llama3, Role::Assistant) => {
                if let Some(c) = calls.first() {
                    m.content = json!({"name": c.name, "parameters": arguments(c)}).to_string();
                }
            }
            // Llama-3.1 reads a result in an `ipython` turn: the role stays.
            _ => {}
        }
        out.push(m);
    }
    *messages = out;
}

/// A call read out of an answer (the transport gives it its id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadCall {
    /// The tool's name.
    pub name: String,
    /// Its arguments, a JSON object as text.
    pub arguments: String,
}

/// Where a [`CallReader`] is in the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// Nothing decides yet what the answer is.
    Deciding,
    /// Text for the client.
    Text,
    /// Inside the generic format's `response` string, at this byte of `held`.
    Response(usize),
    /// Calls (or the generic format's object): held whole until the end.
    Held,
}

/// Splits an answer, as it streams, into text for the client now and calls at the end.
#[derive(Debug, Clone)]
pub struct CallReader {
    syntax: ToolSyntax,
    reading: Reading,
    held: String,
}

const HERMES_OPEN: &str = "<tool_call>";
const GENERIC_RESPONSE: &str = "{\"response\": \"";

impl CallReader {
    /// A reader for a model's syntax.
    pub fn new(syntax: ToolSyntax) -> CallReader {
        CallReader {
            syntax,
            reading: Reading::Deciding,
            held: String::with_capacity(256),
        }
    }

    /// Takes a piece of the answer; appends to `text` what the client may see now.
    pub fn push(&mut self, piece: &str, text: &mut String) {
        self.held.push_str(piece);
        loop {
            match (self.syntax, self.reading) {
                (_, Reading::Held) => return,
                (_, Reading::Text) => {
                    if self.syntax == ToolSyntax::Hermes {
                        if let Some(at) = self.held.find(HERMES_OPEN) {
                            text.push_str(&self.held[..at]);
                            self.held.drain(..at);
                            self.reading = Reading::Held;
                            return;
                        }
                        // What could be the start of `<tool_call>` waits for the next piece.
                        let keep = partial_suffix(&self.held, HERMES_OPEN);
                        let send = self.held.len() - keep;
                        text.push_str(&self.held[..send]);
                        self.held.drain(..send);
                    } else {
                        text.push_str(&self.held);
                        self.held.clear();
                    }
                    return;
                }
                (ToolSyntax::Generic, Reading::Deciding) => {
                    if self.held.starts_with(GENERIC_RESPONSE) {
                        self.reading = Reading::Response(GENERIC_RESPONSE.len());
                    } else if !GENERIC_RESPONSE.starts_with(self.held.as_str()) {
                        self.reading = Reading::Held;
                    } else {
                        return;
                    }
                }
                (ToolSyntax::Generic, Reading::Response(at)) => {
                    let (end, done) = decode_json_string(&self.held[at..], text);
                    self.reading = if done {
                        Reading::Held
                    } else {
                        Reading::Response(at + end)
                    };
                    return;
                }
                (ToolSyntax::Hermes, Reading::Deciding) => self.reading = Reading::Text,
                (ToolSyntax::Llama3, Reading::Deciding) => match self.held.trim_start().chars().next() {
                    None => return,
                    Some('{') => self.reading = Reading::Held,
                    Some(_) => self.reading = Reading::Text,
                },
                (_, Reading::Response(_)) => self.reading = Reading::Held,
            }
        }
    }

    /// The answer is over: appends what remains for the client to `text` and returns the
    /// calls. What does not read as a call (an answer cut short) is given as text.
    pub fn finish(&mut self, text: &mut String) -> Vec<ReadCall> {
        let held = std::mem::take(&mut self.held);
        let reading = std::mem::replace(&mut self.reading, Reading::Deciding);
        let calls = match (self.syntax, reading) {
            (_, Reading::Text) => None,
            // The response string was streamed: what is left is its object's end.
            (ToolSyntax::Generic, Reading::Response(_)) => return Vec::new(),
            (ToolSyntax::Generic, Reading::Held) if held.starts_with(GENERIC_RESPONSE) => return Vec::new(),
            (ToolSyntax::Generic, _) => read_generic(&held, text),
            (ToolSyntax::Hermes, _) => read_hermes(&held),
            (ToolSyntax::Llama3, _) => read_llama3(&held),
        };
        match calls {
            Some(calls) => calls,
            None => {
                text.push_str(&held);
                Vec::new()
            }
        }
    }
}

/// How many bytes at the end of `held` could begin `marker`.
fn partial_suffix(held: &str, marker: &str) -> usize {
    (1..marker.len().min(held.len() + 1))
        .rev()
        .find(|&n| held.is_char_boundary(held.len() - n) && marker.starts_with(&held[held.len() - n..]))
        .unwrap_or(0)
}

/// Decodes a JSON string's body from the start of `s` into `out`, as far as it is whole.
/// Returns how many bytes were used and whether the closing quote was reached.
fn decode_json_string(s: &str, out: &mut String) -> (usize, bool) {
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => return (i + 1, true),
            b'\\' => {
                let Some(&e) = bytes.get(i + 1) else {
                    return (i, false);
                };
                let simple = match e {
                    b'"' => Some('"'),
                    b'\\' => Some('\\'),
                    b'/' => Some('/'),
                    b'b' => Some('\u{8}'),
                    b'f' => Some('\u{c}'),
                    b'n' => Some('\n'),
                    b'r' => Some('\r'),
                    b't' => Some('\t'),
                    _ => None,
                };
                if let Some(c) = simple {
                    out.push(c);
                    i += 2;
                    continue;
                }
                // \uXXXX, perhaps a surrogate pair \uD83D\uDE00.
                let hex = |at: usize| s.get(at..at + 4).and_then(|h| u32::from_str_radix(h, 16).ok());
                let Some(first) = hex(i + 2) else {
                    return (i, false);
                };
                if (0xD800..0xDC00).contains(&first) {
                    if s.len() < i + 12 {
                        return (i, false);
                    }
                    // Bytes, not a str slice: after a lone high surrogate any character may
                    // follow, and a slice inside it would panic.
                    let low = if bytes.get(i + 6..i + 8) == Some(b"\\u") {
                        hex(i + 8)
                    } else {
                        None
                    };
                    match low {
                        Some(low) if (0xDC00..0xE000).contains(&low) => {
                            let c = 0x10000 + ((first - 0xD800) << 10) + (low - 0xDC00);
                            out.push(char::from_u32(c).unwrap_or('\u{FFFD}'));
                            i += 12;
                        }
                        _ => {
                            out.push('\u{FFFD}');
                            i += 6;
                        }
                    }
                } else {
                    out.push(char::from_u32(first).unwrap_or('\u{FFFD}'));
                    i += 6;
                }
            }
            _ => {
                // A run of plain characters (never splits one: the run ends at ASCII).
                let run = bytes[i..]
                    .iter()
                    .position(|&b| b == b'"' || b == b'\\')
                    .unwrap_or(bytes.len() - i);
                out.push_str(&s[i..i + run]);
                i += run;
            }
        }
    }
    (i, false)
}

fn read_call(v: &Value, arguments: &[&str]) -> Option<ReadCall> {
    let name = v.get("name")?.as_str()?.to_string();
    let args = arguments
        .iter()
        .find_map(|k| v.get(*k))
        .cloned()
        .unwrap_or_else(|| json!({}));
    Some(ReadCall {
        name,
        arguments: args.to_string(),
    })
}

/// The generic format's object: calls, or the response (written to `text`).
fn read_generic(held: &str, text: &mut String) -> Option<Vec<ReadCall>> {
    let v: Value = serde_json::from_str(held).ok()?;
    if let Some(call) = v.get("tool_call") {
        return read_call(call, &["arguments"]).map(|c| vec![c]);
    }
    if let Some(Value::Array(calls)) = v.get("tool_calls") {
        return calls.iter().map(|c| read_call(c, &["arguments"])).collect();
    }
    match v.get("response")? {
        Value::String(s) => text.push_str(s),
        other => text.push_str(&other.to_string()),
    }
    Some(Vec::new())
}

/// `<tool_call>\n{...}\n</tool_call>` blocks.
fn read_hermes(held: &str) -> Option<Vec<ReadCall>> {
    let mut calls = Vec::new();
    for block in held.split(HERMES_OPEN).skip(1) {
        let body = block.split("</tool_call>").next()?;
        let v: Value = serde_json::from_str(body.trim()).ok()?;
        calls.push(read_call(&v, &["arguments", "parameters"])?);
    }
    (!calls.is_empty()).then_some(calls)
}

/// Llama-3.1's `{"name": ..., "parameters": ...}`.
fn read_llama3(held: &str) -> Option<Vec<ReadCall>> {
    let v: Value = serde_json::from_str(held.trim()).ok()?;
    read_call(&v, &["parameters", "arguments"]).map(|c| vec![c])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Vec<Tool> {
        parse_tools(
            json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]),
        )
        .unwrap()
    }

    /// Found by the `tool_calls` fuzz target: a lone high surrogate followed by a multi-byte
    /// character sliced that character.
    #[test]
    fn a_lone_surrogate_before_any_character_decodes() {
        let mut out = String::new();
        assert_eq!(decode_json_string("\\udae9b\u{580}cdefgh\"", &mut out), (16, true));
        assert_eq!(out, "\u{FFFD}b\u{580}cdefgh");
        out.clear();
        assert_eq!(decode_json_string("\\ud83d\\ude00\"", &mut out), (13, true));
        assert_eq!(out, "\u{1F600}");
    }

    #[test]
    fn only_an_answer_that_may_write_freely_thinks() {
        assert!(leaves_room_to_think(None));
        let auto = offer(weather(), Some(ToolChoice::Auto)).unwrap();
        assert!(leaves_room_to_think(auto.as_ref()));
        let required = offer(weather(), Some(ToolChoice::Required)).unwrap();
        assert!(!leaves_room_to_think(required.as_ref()));
        let named = offer(weather(), Some(ToolChoice::Named("get_weather".into()))).unwrap();
        assert!(!leaves_room_to_think(named.as_ref()));
    }

    fn read_all(syntax: ToolSyntax, pieces: &[&str]) -> (String, Vec<ReadCall>, Vec<String>) {
        let mut r = CallReader::new(syntax);
        let mut text = String::new();
        let mut seen = Vec::new();
        for p in pieces {
            let before = text.len();
            r.push(p, &mut text);
            seen.push(text[before..].to_string());
        }
        let calls = r.finish(&mut text);
        (text, calls, seen)
    }

    #[test]
    fn tools_and_choices_are_read_and_checked() {
        let tools = weather();
        assert_eq!(tools[0].name, "get_weather");
        assert_eq!(tools[0].description.as_deref(), Some("Weather now"));
        for (bad, field) in [
            (json!({}), "'tools'"),
            (json!([{"type": "web"}]), "tools[0].type"),
            (json!([{"type": "function"}]), "tools[0].function"),
            (
                json!([{"type": "function", "function": {"name": "a b"}}]),
                "tools[0].function.name",
            ),
            (
                json!([{"type": "function", "function": {"name": "f", "parameters": 3}}]),
                "parameters",
            ),
            (
                json!([{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]),
                "twice",
            ),
        ] {
            let e = parse_tools(bad).unwrap_err();
            assert!(e.contains(field), "{e}");
        }
        assert_eq!(parse_choice(&json!("none")).unwrap(), None);
        assert_eq!(parse_choice(&json!("required")).unwrap(), Some(ToolChoice::Required));
        assert_eq!(
            parse_choice(&json!({"type": "function", "function": {"name": "get_weather"}})).unwrap(),
            Some(ToolChoice::Named("get_weather".into()))
        );
        assert!(parse_choice(&json!("sometimes")).is_err());
        assert!(offer(weather(), Some(ToolChoice::Named("nope".into()))).is_err());
        assert!(offer(Vec::new(), Some(ToolChoice::Required)).is_err());
        assert_eq!(offer(Vec::new(), Some(ToolChoice::Auto)).unwrap(), None);
        assert_eq!(offer(weather(), None).unwrap(), None);
    }

    #[test]
    fn calls_in_history_are_read() {
        let calls = parse_calls(
            json!([{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]),
            "messages[1].tool_calls",
        )
        .unwrap();
        assert_eq!(calls[0].arguments, "{\"a\": 1}");
        let e = parse_calls(
            json!([{"function": {"name": "f", "arguments": "{nope"}}]),
            "messages[1].tool_calls",
        )
        .unwrap_err();
        assert!(e.contains("messages[1].tool_calls[0].function.arguments"), "{e}");
    }

    #[test]
    fn the_generic_format_describes_the_tools_and_shapes_the_answer() {
        let tools = offer(weather(), Some(ToolChoice::Auto)).unwrap();
        let mut messages = vec![Message::new(Role::User, "Weather in Paris?")];
        let shape = prepare(ToolSyntax::Generic, tools.as_ref(), &mut messages, None, None).unwrap();
        assert_eq!(messages[0].role, Role::System);
        assert!(messages[0].content.contains("\"name\":\"get_weather\""));
        assert!(messages[0].content.contains("either with `tool_call`"));
        let Some(Shape::Schema(s)) = shape else {
            panic!("{shape:?}")
        };
        assert_eq!(
            s["anyOf"][0]["properties"]["tool_call"]["properties"]["name"]["const"],
            "get_weather"
        );
        assert_eq!(s["anyOf"][1]["properties"]["response"]["type"], "string");
        // Required: a call only.
        let tools = offer(weather(), Some(ToolChoice::Required)).unwrap();
        let mut messages = vec![Message::new(Role::System, "Be brief."), Message::new(Role::User, "Hi")];
        let Some(Shape::Schema(s)) = prepare(ToolSyntax::Generic, tools.as_ref(), &mut messages, None, None).unwrap()
        else {
            panic!()
        };
        assert_eq!(s["required"][0], "tool_call");
        assert!(messages[0].content.starts_with("Be brief.\n\n"));
        assert_eq!(messages.len(), 2);
    }

    #[test]
    fn tools_follow_the_templates_own_system_message() {
        let tools = offer(weather(), Some(ToolChoice::Auto)).unwrap();
        let mut m = vec![Message::new(Role::User, "Weather?")];
        let qwen = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";
        prepare(ToolSyntax::Hermes, tools.as_ref(), &mut m, None, Some(qwen)).unwrap();
        assert!(
            m[0].content.starts_with(&format!("{qwen}\n\n# Tools\n")),
            "{}",
            m[0].content
        );
        let mut m = vec![
            Message::new(Role::System, "Be brief."),
            Message::new(Role::User, "Weather?"),
        ];
        prepare(ToolSyntax::Hermes, tools.as_ref(), &mut m, None, Some(qwen)).unwrap();
        assert!(m[0].content.starts_with("Be brief.\n\n# Tools\n"), "{}", m[0].content);
    }

    #[test]
    fn calls_and_results_are_written_as_the_model_writes_them() {
        let history = || {
            let mut call = Message::new(Role::Assistant, "");
            call.calls = vec![ToolCall {
                id: "call_1".into(),
                name: "get_weather".into(),
                arguments: "{\"city\": \"Paris\"}".into(),
            }];
            let mut result = Message::new(Role::Tool, "18 C");
            result.call_id = Some("call_1".into());
            let mut result2 = Message::new(Role::Tool, "sunny");
            result2.call_id = Some("call_1".into());
            vec![Message::new(Role::User, "Weather?"), call, result, result2]
        };
        let mut m = history();
        prepare(ToolSyntax::Generic, None, &mut m, None, None).unwrap();
        assert_eq!(m[1].content, r#"I call get_weather with {"city": "Paris"}."#);
        assert_eq!(m[2].content, "get_weather returned: 18 C");
        let mut m = history();
        let tools = offer(weather(), Some(ToolChoice::Auto)).unwrap();
        prepare(ToolSyntax::Generic, tools.as_ref(), &mut m, None, None).unwrap();
        assert_eq!(m[0].role, Role::System);
        assert_eq!(
            m[2].content,
            r#"{"tool_call":{"name":"get_weather","arguments":{"city":"Paris"}}}"#
        );
        assert_eq!(m[3].role, Role::User);
        assert_eq!(
            m[3].content,
            r#"{"tool_response":{"tool":"get_weather","tool_call_id":"call_1","content":"18 C"}}"#
        );
        let mut m = history();
        prepare(ToolSyntax::Hermes, None, &mut m, None, None).unwrap();
        assert_eq!(
            m[1].content,
            "<tool_call>\n{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Paris\"}}\n</tool_call>"
        );
        assert_eq!(m.len(), 3, "two results, one user turn");
        assert_eq!(
            m[2].content,
            "<tool_response>\n18 C\n</tool_response>\n<tool_response>\nsunny\n</tool_response>"
        );
        let mut m = history();
        prepare(ToolSyntax::Llama3, None, &mut m, None, None).unwrap();
        assert_eq!(m[1].content, r#"{"name":"get_weather","parameters":{"city":"Paris"}}"#);
        assert_eq!(m[2].role, Role::Tool);
    }

    #[test]
    fn the_generic_reader_streams_the_response_and_holds_calls() {
        let (text, calls, seen) = read_all(
            ToolSyntax::Generic,
            &[
                "{\"",
                "response\": \"It is",
                " sunny\\",
                "n\\u00e9t\\ud83d",
                "\\ude00 ok\"",
                "}",
            ],
        );
        assert!(calls.is_empty());
        assert_eq!(text, "It is sunny\nét😀 ok");
        assert_eq!(seen, ["", "It is", " sunny", "\nét", "😀 ok", ""]);
        let (text, calls, seen) = read_all(
            ToolSyntax::Generic,
            &[
                "{\"tool_call\": {\"name\": \"get_weather\", ",
                "\"arguments\": {\"city\": \"Paris\"}}}",
            ],
        );
        assert_eq!(text, "");
        assert!(seen.iter().all(String::is_empty));
        assert_eq!(
            calls,
            [ReadCall {
                name: "get_weather".into(),
                arguments: "{\"city\":\"Paris\"}".into()
            }]
        );
        // Cut short: what there was is text.
        let (text, calls, _) = read_all(ToolSyntax::Generic, &["{\"tool_call\": {\"na"]);
        assert!(calls.is_empty());
        assert_eq!(text, "{\"tool_call\": {\"na");
    }

    #[test]
    fn the_hermes_reader_streams_text_until_a_call_opens() {
        let (text, calls, seen) = read_all(
            ToolSyntax::Hermes,
            &[
                "Let me",
                " check.\n<tool",
                "_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
                "\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}\n</tool_call>",
            ],
        );
        assert_eq!(seen[1], " check.\n", "the start of the marker waits");
        assert_eq!(text, "Let me check.\n");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1].arguments, "{\"city\":\"Rome\"}");
        let (text, calls, _) = read_all(ToolSyntax::Hermes, &["a < b", " <tool"]);
        assert!(calls.is_empty());
        assert_eq!(text, "a < b <tool");
    }

    #[test]
    fn the_llama3_reader_tells_a_call_by_its_brace() {
        let (text, calls, _) = read_all(
            ToolSyntax::Llama3,
            &[
                " {\"name\": \"get_weather\",",
                " \"parameters\": {\"city\": \"Paris\"}}",
            ],
        );
        assert_eq!(text, "");
        assert_eq!(calls[0].name, "get_weather");
        let (text, calls, seen) = read_all(ToolSyntax::Llama3, &["It", " is sunny."]);
        assert!(calls.is_empty());
        assert_eq!(seen, ["It", " is sunny."]);
        assert_eq!(text, "It is sunny.");
    }

    #[test]
    fn a_partial_marker_is_measured_on_char_boundaries() {
        assert_eq!(partial_suffix("abc<tool", "<tool_call>"), 5);
        assert_eq!(partial_suffix("abc", "<tool_call>"), 0);
        assert_eq!(partial_suffix("é<", "<tool_call>"), 1);
        assert_eq!(partial_suffix("<tool_call", "<tool_call>"), 10);
    }
}
