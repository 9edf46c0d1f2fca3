//! Which KV cache a new request goes to.
//!
//! A slot is one conversation's KV cache. A request should land where its prompt's beginning
//! is already computed (a conversation's next turn), but not at the cost of another
//! conversation that will come back: taking a slot saves its common prefix now and throws away
//! the rest, which that conversation would compute again on its return. A slot is chosen for
//! what it holds when what it saves is more than twice what it throws away (a next turn
//! throws away nothing, or a token or two where the answer re-tokenizes differently; another
//! conversation that shares only a system prompt throws away its own turns); among those, the
//! one that saves most. Otherwise the request takes the least recently used slot, an empty one
//! first. (llama.cpp's server asks that the common part be half of what the slot holds, which
//! lets a new conversation with a long shared system prompt evict a short one.)
//!
//! A text-mode connection (socket, serial console) keeps its slot for its next turn: other
//! requests take it only when no other idle slot is left.

/// What the choice needs to know of one slot.
#[derive(Debug, Clone, Copy)]
pub struct SlotView<'a> {
    /// Tokens its KV cache holds.
    pub cached: &'a [u32],
    /// The connection whose conversation it keeps, if any.
    pub owner: Option<u64>,
    /// When it last served (a counter; 0 never).
    pub last_used: u64,
    /// No request runs in it.
    pub idle: bool,
}

/// Tokens at the start of `a` and `b` that are equal.
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The slot for a request with `prompt` from connection `affinity`; `None` when none is idle.
pub fn choose(slots: &[SlotView<'_>], prompt: &[u32], affinity: Option<u64>) -> Option<usize> {
    if let Some(own) = affinity {
        if let Some(i) = slots.iter().position(|s| s.idle && s.owner == Some(own)) {
            return Some(i);
        }
    }
    // Slots kept for other connections are the last resort.
    let free = |s: &SlotView<'_>| s.idle && (s.owner.is_none() || s.owner == affinity);
    let kept = |s: &SlotView<'_>| s.idle && s.owner.is_some() && s.owner != affinity;
    for tier in [&free as &dyn Fn(&SlotView<'_>) -> bool, &kept] {
        let same_conversation = slots
            .iter()
            .enumerate()
            .filter(|(_, s)| tier(s))
            .map(|(i, s)| {
                let common = common_prefix(s.cached, prompt);
                let lost = s.cached.len() - common;
                (i, common, common as i64 - 2 * lost as i64, s)
            })
            .filter(|&(_, _, score, _)| score > 0)
            .max_by_key(|&(i, common, score, s)| (score, common, std::cmp::Reverse(s.last_used), std::cmp::Reverse(i)));
        if let Some((i, _, _, _)) = same_conversation {
            return Some(i);
        }
        let least_recent = slots
            .iter()
            .enumerate()
            .filter(|(_, s)| tier(s))
            .min_by_key(|&(i, s)| (s.last_used, i));
        if let Some((i, _)) = least_recent {
            return Some(i);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(cached: &[u32], owner: Option<u64>, last_used: u64, idle: bool) -> SlotView<'_> {
        SlotView {
            cached,
            owner,
            last_used,
            idle,
        }
    }

    #[test]
    fn a_next_turn_goes_where_its_conversation_is() {
        let (a, b) = ([1, 2, 3, 4], [1, 2, 9, 9]);
        let slots = [
            view(&a, None, 5, true),
            view(&b, None, 1, true),
            view(&[], None, 0, true),
        ];
        assert_eq!(choose(&slots, &[1, 2, 3, 4, 5, 6], None), Some(0));
        assert_eq!(choose(&slots, &[1, 2, 9, 9, 7], None), Some(1));
    }

    #[test]
    fn a_new_conversation_sharing_only_a_system_prompt_takes_an_empty_slot() {
        let a = [1, 2, 3, 4, 5, 6, 7, 8];
        let slots = [view(&a, None, 5, true), view(&[], None, 0, true)];
        // Shares 5 of the 8 tokens slot 0 holds (llama.cpp would take it): not its
        // conversation.
        assert_eq!(choose(&slots, &[1, 2, 3, 4, 5, 40, 41], None), Some(1));
        // A next turn that re-tokenized its answer's last token differently is.
        assert_eq!(choose(&slots, &[1, 2, 3, 4, 5, 6, 7, 9, 10, 11], None), Some(0));
    }

    #[test]
    fn without_a_match_the_least_recently_used_slot_is_taken() {
        let (a, b) = ([5, 5], [6, 6]);
        let slots = [
            view(&a, None, 7, true),
            view(&b, None, 3, true),
            view(&[], None, 9, false),
        ];
        assert_eq!(choose(&slots, &[1], None), Some(1));
    }

    #[test]
    fn a_connection_keeps_its_slot_until_no_other_is_left() {
        let (a, b) = ([1, 2], [1, 2]);
        // Slot 0 is kept for connection 7; slot 1 is free: another request goes there, even
        // though slot 0 is older and shares as much.
        let slots = [view(&a, Some(7), 1, true), view(&b, None, 5, true)];
        assert_eq!(choose(&slots, &[3], Some(8)), Some(1));
        assert_eq!(choose(&slots, &[3], Some(7)), Some(0));
        // Slot 1 busy: the kept slot is taken rather than waiting.
        let slots = [view(&a, Some(7), 1, true), view(&b, None, 5, false)];
        assert_eq!(choose(&slots, &[3], Some(8)), Some(0));
        // Never while its own request runs.
        let slots = [view(&a, Some(7), 1, false), view(&b, None, 5, false)];
        assert_eq!(choose(&slots, &[3], None), None);
    }
}
