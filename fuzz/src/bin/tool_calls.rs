//! Reading tool calls out of an answer: any text, in any chunking, for each syntax, never
//! panics; text that cannot open a call comes through whole and in order; whatever is read
//! as a call has JSON arguments.
use llama_tpu::chat::ToolSyntax;
use llama_tpu::server::tools::CallReader;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        // The first byte picks the syntax and the piece size, as the engine hands text over.
        let Some((&pick, rest)) = data.split_first() else {
            return;
        };
        let Ok(answer) = std::str::from_utf8(rest) else { return };
        let syntax = [ToolSyntax::Generic, ToolSyntax::Hermes, ToolSyntax::Llama3][pick as usize % 3];
        let size = (pick as usize / 3) % 13 + 1;
        let mut reader = CallReader::new(syntax);
        let mut text = String::new();
        let mut piece_start = 0;
        while piece_start < answer.len() {
            let mut end = (piece_start + size).min(answer.len());
            while !answer.is_char_boundary(end) {
                end += 1;
            }
            reader.push(&answer[piece_start..end], &mut text);
            piece_start = end;
        }
        let calls = reader.finish(&mut text);
        for c in &calls {
            let args: Result<serde_json::Value, _> = serde_json::from_str(&c.arguments);
            assert!(args.is_ok(), "arguments that are not JSON: {:?}", c.arguments);
        }
        let can_call = match syntax {
            ToolSyntax::Hermes => answer.contains("<tool_call>"),
            ToolSyntax::Llama3 => answer.trim_start().starts_with('{'),
            ToolSyntax::Generic => answer.trim_start().starts_with('{'),
        };
        if !can_call {
            assert!(calls.is_empty());
            assert_eq!(text, answer, "text that opens no call must come through whole");
        }
    });
}
