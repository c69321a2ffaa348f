//! Turning a stream of token bytes into text deltas: only complete UTF-8 is released (a
//! character split across tokens waits for its last byte), and text that could be the
//! start of a stop sequence is held back until it is known not to be one.

/// Incremental detokenizer with stop-sequence detection.
#[derive(Debug, Default)]
pub struct TextStream {
    pending: Vec<u8>,
    text: String,
    emitted: usize,
    stops: Vec<String>,
}

/// What one token did to the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Push<'a> {
    /// Text that is now safe to send (may be empty).
    Text(&'a str),
    /// A stop sequence matched: send this last piece (the text before the stop) and finish.
    Stopped(&'a str),
}

impl TextStream {
    /// A stream that finishes at the first occurrence of any of `stops` (empty ones ignored).
    pub fn new(stops: Vec<String>) -> Self {
        let stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).collect();
        Self {
            stops,
            ..Self::default()
        }
    }

    /// Adds one token's bytes; returns what may be sent now.
    pub fn push(&mut self, bytes: &[u8]) -> Push<'_> {
        self.pending.extend_from_slice(bytes);
        // Decode everything that is complete: invalid sequences become U+FFFD and decoding
        // goes on after them; only an incomplete character at the very end waits.
        let mut done = 0;
        loop {
            match std::str::from_utf8(&self.pending[done..]) {
                Ok(s) => {
                    self.text.push_str(s);
                    done = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = &self.pending[done..done + e.valid_up_to()];
                    self.text
                        .push_str(std::str::from_utf8(valid).unwrap_or_default());
                    done += valid.len();
                    // `None`: an incomplete character at the end, kept for the next token.
                    let Some(bad) = e.error_len() else { break };
                    self.text.push(char::REPLACEMENT_CHARACTER);
                    done += bad;
                }
            }
        }
        self.pending.drain(..done);
        self.after_append()
    }

    fn after_append(&mut self) -> Push<'_> {
        if self.stops.is_empty() {
            let start = self.emitted;
            self.emitted = self.text.len();
            return Push::Text(&self.text[start..]);
        }
        // Emitted text never ends in a proper prefix of a stop, so any match starts at or
        // after `emitted`; the held-back text is shorter than the longest stop.
        let from = self.emitted;
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
            .min();
        if let Some(at) = hit {
            let start = self.emitted;
            self.emitted = at;
            self.text.truncate(at);
            return Push::Stopped(&self.text[start..at]);
        }
        // Hold back the longest suffix that is a proper prefix of some stop sequence.
        let mut safe = self.text.len();
        for s in &self.stops {
            for k in (1..s.len()).rev() {
                if self.text.len() >= k && s.is_char_boundary(k) && self.text.ends_with(&s[..k]) {
                    safe = safe.min(self.text.len() - k);
                    break;
                }
            }
        }
        let safe = safe.max(self.emitted);
        let start = self.emitted;
        self.emitted = safe;
        Push::Text(&self.text[start..safe])
    }

    /// At the end of generation: everything still held back, incomplete UTF-8 replaced,
    /// cut before a stop sequence if the replacement completed one.
    pub fn finish(&mut self) -> String {
        if !self.pending.is_empty() {
            let s = String::from_utf8_lossy(&self.pending).into_owned();
            self.pending.clear();
            self.text.push_str(&s);
        }
        let start = self.emitted;
        let end = self
            .stops
            .iter()
            .filter_map(|s| self.text[start..].find(s.as_str()).map(|i| start + i))
            .min()
            .unwrap_or(self.text.len());
        self.text.truncate(end);
        self.emitted = end;
        self.text[start..].to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(stream: &mut TextStream, pieces: &[&[u8]]) -> (String, bool) {
        let mut out = String::new();
        for p in pieces {
            match stream.push(p) {
                Push::Text(t) => out.push_str(t),
                Push::Stopped(t) => {
                    out.push_str(t);
                    return (out, true);
                }
            }
        }
        out.push_str(&stream.finish());
        (out, false)
    }

    /// `bytes` cut into consecutive pieces of the given lengths (clamped), then the rest.
    fn split<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
        let mut pieces = Vec::new();
        let mut i = 0;
        for c in cuts {
            let j = (i + c).min(bytes.len());
            pieces.push(&bytes[i..j]);
            i = j;
        }
        pieces.push(&bytes[i..]);
        pieces
    }

    #[test]
    fn multibyte_characters_split_across_tokens_are_released_whole() {
        let mut s = TextStream::new(vec![]);
        let e = "é".as_bytes();
        assert_eq!(s.push(b"caf"), Push::Text("caf"));
        assert_eq!(s.push(&e[..1]), Push::Text(""));
        assert_eq!(s.push(&e[1..]), Push::Text("é"));
        let emoji = "🌍".as_bytes();
        assert_eq!(s.push(&emoji[..3]), Push::Text(""));
        assert_eq!(s.push(&emoji[3..]), Push::Text("🌍"));
    }

    #[test]
    fn stop_sequence_across_tokens_is_cut_and_never_shown() {
        let mut s = TextStream::new(vec!["\nUser:".into()]);
        let (out, stopped) = run(&mut s, &[b"Hello", b"\n", b"Us", b"er:", b" more"]);
        assert!(stopped);
        assert_eq!(out, "Hello");
    }

    #[test]
    fn held_back_prefix_is_released_when_it_diverges() {
        let mut s = TextStream::new(vec!["STOP".into()]);
        assert_eq!(s.push(b"a ST"), Push::Text("a "));
        assert_eq!(s.push(b"ART"), Push::Text("START"));
        assert_eq!(s.finish(), "");
    }

    #[test]
    fn incomplete_utf8_at_the_end_is_replaced() {
        let mut s = TextStream::new(vec![]);
        let _ = s.push(&"é".as_bytes()[..1]);
        assert_eq!(s.finish(), "\u{FFFD}");
    }

    #[test]
    fn text_after_an_invalid_byte_is_released_at_once_and_stops_still_cut() {
        let mut s = TextStream::new(vec!["STOP".into()]);
        assert_eq!(s.push(b"\xffok"), Push::Text("\u{FFFD}ok"));
        let mut s = TextStream::new(vec!["STOP".into()]);
        assert_eq!(s.push(b"\xc3"), Push::Text(""));
        // The lead byte turns out invalid; the stop after it must still end the text.
        assert_eq!(s.push(b" STOP"), Push::Stopped("\u{FFFD} "));
        let mut s = TextStream::new(vec!["\u{FFFD}".into()]);
        assert_eq!(s.push(b"a\xc3"), Push::Text("a"));
        // Replacing the incomplete tail at the end completes the stop: it is cut there too.
        assert_eq!(s.finish(), "");
    }

    proptest! {
        #[test]
        fn any_bytes_give_lossy_text_cut_before_the_first_stop(
            bytes in proptest::collection::vec(proptest::sample::select(vec![b'a', b'b', b' ', 0xc3, 0xa9, 0xff, 0xf0, 0x9f]), 0..40),
            stop in "[ab]{1,2}|\u{FFFD}",
            cuts in proptest::collection::vec(0usize..6, 0..20),
        ) {
            let mut s = TextStream::new(vec![stop.clone()]);
            let (out, _) = run(&mut s, &split(&bytes, &cuts));
            let text = String::from_utf8_lossy(&bytes);
            let want = text.find(&stop).map_or(&text[..], |at| &text[..at]);
            prop_assert_eq!(out, want);
        }

        #[test]
        fn output_equals_text_before_first_stop(text in "[a-c é🌍]{0,40}", stop in "[a-c]{1,3}", cuts in proptest::collection::vec(0usize..8, 0..20)) {
            let mut s = TextStream::new(vec![stop.clone()]);
            let (out, stopped) = run(&mut s, &split(text.as_bytes(), &cuts));
            match text.find(&stop) {
                Some(at) => { prop_assert!(stopped); prop_assert_eq!(out, &text[..at]); }
                None => { prop_assert!(!stopped); prop_assert_eq!(out, text); }
            }
        }
    }
}
