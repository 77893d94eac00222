//! Turning a stream of token ids into a stream of text that never splits a UTF-8 character and
//! never shows any part of a stop string.

use crate::tokenizer::Tokenizer;

/// Accumulates token bytes and releases text that is complete and cannot be the start of a
/// stop string.
pub struct TextStream {
    bytes: Vec<u8>,
    /// Decoded text not yet released (it might begin a stop string).
    held: String,
    stops: Vec<String>,
    pending_ids: Vec<u32>,
}

/// What pushing a token released.
pub struct Released {
    pub text: String,
    /// The tokens whose text is (at least partly) in `text`.
    pub token_ids: Vec<u32>,
    /// A stop string was found: `text` ends right before it; generation must end.
    pub stopped: bool,
}

impl TextStream {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            bytes: Vec::new(),
            held: String::new(),
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending_ids: Vec::new(),
        }
    }

    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Option<Released> {
        self.push_bytes(id, tokenizer.token_bytes(id))
    }

    /// [`Self::push`] of a token that decodes to `bytes`.
    fn push_bytes(&mut self, id: u32, bytes: &[u8]) -> Option<Released> {
        self.pending_ids.push(id);
        self.bytes.extend_from_slice(bytes);
        self.decode_complete();
        if let Some((at, _)) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|at| (at, s)))
            .min()
        {
            // Whatever follows the stop string is never shown.
            self.held.truncate(at);
            self.bytes.clear();
            return Some(self.release_all(true));
        }
        let keep = self.stop_prefix_len();
        if self.held.len() == keep {
            return None;
        }
        let tail = self.held.split_off(self.held.len() - keep);
        let text = std::mem::replace(&mut self.held, tail);
        Some(Released {
            text,
            token_ids: std::mem::take(&mut self.pending_ids),
            stopped: false,
        })
    }

    /// Everything still held, at the end of generation.
    pub fn finish(&mut self) -> Option<Released> {
        if !self.bytes.is_empty() {
            // An incomplete character at the very end can never be completed.
            self.held.push_str(&String::from_utf8_lossy(&self.bytes));
            self.bytes.clear();
        }
        if self.held.is_empty() && self.pending_ids.is_empty() {
            return None;
        }
        Some(self.release_all(false))
    }

    fn release_all(&mut self, stopped: bool) -> Released {
        Released {
            text: std::mem::take(&mut self.held),
            token_ids: std::mem::take(&mut self.pending_ids),
            stopped,
        }
    }

    /// Moves the longest valid UTF-8 prefix of `bytes` into `held`; invalid bytes (which no
    /// later byte can complete) become U+FFFD, an incomplete tail waits.
    fn decode_complete(&mut self) {
        loop {
            match std::str::from_utf8(&self.bytes) {
                Ok(s) => {
                    self.held.push_str(s);
                    self.bytes.clear();
                    return;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    self.held
                        .push_str(std::str::from_utf8(&self.bytes[..valid]).unwrap_or_default());
                    match e.error_len() {
                        None => {
                            self.bytes.drain(..valid);
                            return;
                        }
                        Some(n) => {
                            self.held.push(char::REPLACEMENT_CHARACTER);
                            self.bytes.drain(..valid + n);
                        }
                    }
                }
            }
        }
    }

    /// Length of the longest suffix of `held` that is a proper prefix of a stop string.
    fn stop_prefix_len(&self) -> usize {
        let mut best = 0;
        for stop in &self.stops {
            let max = stop.len().saturating_sub(1).min(self.held.len());
            for len in (best + 1..=max).rev() {
                let start = self.held.len() - len;
                if self.held.is_char_boundary(start) && stop.starts_with(&self.held[start..]) {
                    best = len;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pushes tokens of the given bytes (ids 0, 1, …) and then finishes: each release's text,
    /// tokens and whether a stop ended it.
    fn run(stops: &[&str], tokens: &[&[u8]]) -> Vec<(String, Vec<u32>, bool)> {
        let mut s = TextStream::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        for (id, bytes) in tokens.iter().enumerate() {
            if let Some(r) = s.push_bytes(id as u32, bytes) {
                let stopped = r.stopped;
                out.push((r.text, r.token_ids, stopped));
                if stopped {
                    return out;
                }
            }
        }
        out.extend(s.finish().map(|r| (r.text, r.token_ids, r.stopped)));
        out
    }

    fn text(releases: &[(String, Vec<u32>, bool)]) -> String {
        releases.iter().map(|r| r.0.as_str()).collect()
    }

    #[test]
    fn a_character_split_across_tokens_waits_for_its_last_byte() {
        let euro = "€".as_bytes(); // 3 bytes
        let r = run(&[], &[b"a", &euro[..1], &euro[1..2], &euro[2..], b"b"]);
        assert_eq!(
            r,
            vec![
                ("a".into(), vec![0], false),
                ("€".into(), vec![1, 2, 3], false),
                ("b".into(), vec![4], false),
            ]
        );
    }

    #[test]
    fn bytes_no_later_byte_can_complete_become_one_replacement_each() {
        let r = run(&[], &[b"x\xff", b"y"]);
        assert_eq!(text(&r), "x\u{fffd}y");
        // An incomplete character at the very end is released as a replacement.
        let r = run(&[], &[b"z", &"é".as_bytes()[..1]]);
        assert_eq!(text(&r), "z\u{fffd}");
    }

    #[test]
    fn a_stop_string_across_tokens_is_never_shown() {
        let r = run(&["END"], &[b"one E", b"N", b"D two"]);
        assert_eq!(r.last().map(|r| r.2), Some(true));
        assert_eq!(text(&r), "one ");
        // Text that only looked like the start of a stop is released once it is not.
        let r = run(&["END"], &[b"E", b"N", b"O"]);
        assert_eq!(r, vec![("ENO".into(), vec![0, 1, 2], false)]);
    }

    #[test]
    fn a_multibyte_stop_string_split_inside_a_character_is_found() {
        let stop = "→fin";
        let b = stop.as_bytes(); // → is 3 bytes
        let r = run(&[stop], &[b"a ", &b[..2], &b[2..4], &b[4..], b" more"]);
        assert_eq!(text(&r), "a ");
        assert!(r.last().unwrap().2);
    }

    #[test]
    fn held_text_is_released_at_the_end() {
        // "EN" may begin the stop string until generation ends without it.
        let r = run(&["END"], &[b"the EN"]);
        assert_eq!(
            r,
            vec![
                ("the ".into(), vec![0], false),
                ("EN".into(), vec![], false)
            ]
        );
    }
}
