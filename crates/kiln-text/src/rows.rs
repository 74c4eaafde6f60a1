//! Token rows, fast: what the tokenizer pool runs for every text.
//!
//! Profiled on 150-word texts, Hugging Face `tokenizers` spent ~400 µs a text, most of
//! it in Unicode category tables: BERT's normaliser asks of every character whether it
//! is a control character, its pre-tokenizer whether it is punctuation — a dozen
//! binary searches per character — and every word past `max_length` was tokenized only
//! to be cut off. [`RowTokenizer`] is the folder's tokenizer with two changes that keep
//! its output identical (the tests compare it with the unchanged tokenizer):
//!
//! - BERT's normaliser and pre-tokenizer are replaced by equivalents that answer for
//!   ASCII without the tables: the same steps, the same predicates (`tests` pins them
//!   character by character); a text with any non-ASCII character goes through the
//!   original normaliser.
//! - With BERT's pre-tokenizer, which splits words at whitespace, a text is first cut
//!   after `max_length` words (at a space, tab or line break: characters the normaliser
//!   keeps as word breaks). Every word gives at least one token, so the prefix fills
//!   the row; when it does not (words of removed characters only), the whole text is
//!   tokenized. A 2 MB text now costs what its first `max_length` words cost.
//! - Before all that, a text is cut to its first `max_chars` characters
//!   (`text.max_chars`, by default 128 per token of `max_length`): a text without
//!   word breaks (CJK, one endless word) is not bounded by the word cut.
//! - A text for a BERT WordPiece tokenizer (the normaliser, pre-tokenizer and model
//!   above; none of the added tokens' first characters in it) skips `tokenizers`
//!   altogether ([`WordPieceRows`]): the same steps — clean, set CJK apart, strip
//!   accents (NFD), lowercase, split at whitespace and punctuation, greedy longest
//!   match — straight to ids, stopping at `max_length`. Plain ASCII goes on bytes with
//!   no tables; other texts use the Unicode tables and NFD `tokenizers` uses (the same
//!   crates), ASCII characters among them answered without tables, read in segments
//!   only as far as the row needs. `tokenizers` builds an `Encoding` (offsets, word
//!   ids, masks, each piece a `String`) for every text; on a GPU host that work, ~180 µs
//!   a 128-word text a thread, was what limited kiln's throughput (docs/benchmarks.md).

use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::tokenizer::{
    NormalizedString, Normalizer, PreTokenizedString, PreTokenizer, Result as TkResult,
    SplitDelimiterBehavior,
};
use tokenizers::{
    DecoderWrapper, Encoding, Model, ModelWrapper, NormalizerWrapper, PostProcessorWrapper,
    PreTokenizerWrapper, Tokenizer, TokenizerImpl,
};
use unicode_categories::UnicodeCategories;

/// The folder's normaliser; BERT's with an ASCII fast path.
#[derive(Clone)]
pub(crate) enum RowNormalizer {
    Bert(BertNormalizer),
    Other(NormalizerWrapper),
}

impl Normalizer for RowNormalizer {
    fn normalize(&self, normalized: &mut NormalizedString) -> TkResult<()> {
        let bert = match self {
            RowNormalizer::Other(other) => return other.normalize(normalized),
            RowNormalizer::Bert(bert) if !normalized.get().is_ascii() => return bert.normalize(normalized),
            RowNormalizer::Bert(bert) => bert,
        };
        // BertNormalizer's steps, for ASCII. Cleaning removes control characters other
        // than tab and line breaks (NUL included), then turns what whitespace is left
        // into spaces; Chinese characters and accents do not occur; lowercasing is
        // ASCII lowercasing.
        if bert.clean_text && normalized.get().bytes().any(|b| b.is_ascii_control()) {
            normalized.filter(|c| !c.is_ascii_control() || is_kept_break(c));
            normalized.map(|c| if is_kept_break(c) { ' ' } else { c });
        }
        if bert.lowercase && normalized.get().bytes().any(|b| b.is_ascii_uppercase()) {
            normalized.lowercase();
        }
        Ok(())
    }
}

/// Whitespace that BERT's cleaning keeps (as a space): every other ASCII control
/// character, vertical tab and form feed included, is removed.
fn is_kept_break(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r')
}

/// The folder's pre-tokenizer; BERT's without table lookups for ASCII.
#[derive(Clone)]
pub(crate) enum RowPreTokenizer {
    Bert,
    Other(PreTokenizerWrapper),
}

/// BERT's punctuation: ASCII punctuation (which includes the symbols `$+<=>^`|~`) or a
/// character of a Unicode punctuation category. No ASCII character outside the ASCII
/// punctuation is in a punctuation category, so ASCII needs no table.
fn is_bert_punctuation(c: char) -> bool {
    if c.is_ascii() { c.is_ascii_punctuation() } else { c.is_punctuation() }
}

impl PreTokenizer for RowPreTokenizer {
    fn pre_tokenize(&self, pretokenized: &mut PreTokenizedString) -> TkResult<()> {
        match self {
            RowPreTokenizer::Other(other) => other.pre_tokenize(pretokenized),
            // BertPreTokenizer's two splits, with the faster punctuation test.
            RowPreTokenizer::Bert => {
                pretokenized.split(|_, s| s.split(char::is_whitespace, SplitDelimiterBehavior::Removed))?;
                pretokenized.split(|_, s| s.split(is_bert_punctuation, SplitDelimiterBehavior::Isolated))
            }
        }
    }
}

type Inner =
    TokenizerImpl<ModelWrapper, RowNormalizer, RowPreTokenizer, PostProcessorWrapper, DecoderWrapper>;

/// One text at a time to token ids, as the folder's tokenizer gives them, faster.
#[derive(Clone)]
pub(crate) struct RowTokenizer {
    inner: Inner,
    /// Words kept before tokenizing: set where words never merge across whitespace.
    prefix_words: Option<usize>,
    max_length: usize,
    /// Characters read at most (0: all).
    max_chars: usize,
    /// Texts straight to ids, where the tokenizer is BERT's WordPiece.
    wordpiece: Option<WordPieceRows>,
}

/// A text's ids, type ids, and whether any of it was cut.
pub(crate) type Row = (Vec<u32>, Vec<u32>, bool);

impl RowTokenizer {
    /// From the pipeline's tokenizer, truncation set to `max_length`.
    pub fn new(tokenizer: &Tokenizer, max_length: usize, max_chars: usize) -> TkResult<Self> {
        let mut inner: Inner = TokenizerImpl::new(tokenizer.get_model().clone());
        inner.with_normalizer(tokenizer.get_normalizer().cloned().map(|n| match n {
            NormalizerWrapper::BertNormalizer(bert) => RowNormalizer::Bert(bert),
            other => RowNormalizer::Other(other),
        }))?;
        let bert_words =
            matches!(tokenizer.get_pre_tokenizer(), Some(PreTokenizerWrapper::BertPreTokenizer(_)));
        inner.with_pre_tokenizer(tokenizer.get_pre_tokenizer().cloned().map(|p| match p {
            PreTokenizerWrapper::BertPreTokenizer(BertPreTokenizer) => RowPreTokenizer::Bert,
            other => RowPreTokenizer::Other(other),
        }));
        inner.with_post_processor(tokenizer.get_post_processor().cloned());
        inner.with_decoder(tokenizer.get_decoder().cloned());
        inner.with_added_vocabulary(tokenizer.get_added_vocabulary().clone());
        inner.with_truncation(tokenizer.get_truncation().cloned())?;
        // A special token written with a space inside would be cut in two.
        let spaced_tokens =
            tokenizer.get_added_tokens_decoder().values().any(|t| t.content.chars().any(char::is_whitespace));
        let normalizer_keeps_breaks =
            matches!(tokenizer.get_normalizer(), None | Some(NormalizerWrapper::BertNormalizer(_)));
        let prefix_words = (bert_words && normalizer_keeps_breaks && !spaced_tokens).then_some(max_length);
        let mut rows = RowTokenizer { inner, prefix_words, max_length, max_chars, wordpiece: None };
        rows.wordpiece = WordPieceRows::new(tokenizer, &rows, max_length)?;
        Ok(rows)
    }

    /// [`RowTokenizer::encode`]'s ids, type ids and cut, from [`WordPieceRows`] where it
    /// takes the text.
    pub fn row(&self, whole: &str) -> TkResult<Row> {
        let text = char_prefix(whole, self.max_chars);
        if let Some(row) = self.wordpiece.as_ref().and_then(|w| w.row(text)) {
            let (ids, types, cut) = row;
            return Ok((ids, types, cut || text.len() < whole.len()));
        }
        let (e, cut) = self.encode(whole)?;
        Ok((e.get_ids().to_vec(), e.get_type_ids().to_vec(), cut))
    }

    /// The text's encoding, special tokens added, truncated to `max_length`, and whether
    /// any of the text was cut: it had tokens past `max_length`, or more than `max_chars`
    /// characters (counted as cut without reading the rest).
    pub fn encode(&self, whole: &str) -> TkResult<(Encoding, bool)> {
        let text = char_prefix(whole, self.max_chars);
        let chars_cut = text.len() < whole.len();
        let cut = |e: Encoding| {
            let truncated = chars_cut || !e.get_overflowing().is_empty();
            (e, truncated)
        };
        let Some(words) = self.prefix_words else {
            return self.inner.encode_fast(text, true).map(cut);
        };
        let prefix = word_prefix(text, words);
        let encoding = self.inner.encode_fast(prefix, true)?;
        if prefix.len() < text.len() && encoding.len() < self.max_length {
            // The prefix did not fill the row: the rest of the text decides.
            return self.inner.encode_fast(text, true).map(cut);
        }
        // A full row with words left unread: each word is at least one more token.
        let words_left = !text[prefix.len()..].trim().is_empty();
        let (encoding, truncated) = cut(encoding);
        Ok((encoding, truncated || words_left))
    }
}

/// BERT's normaliser, pre-tokenizer and WordPiece tokenizer straight to ids (see the
/// module's notes): ASCII texts on bytes, others through the same Unicode tables and
/// decomposition `tokenizers` uses.
#[derive(Clone)]
struct WordPieceRows {
    vocab: std::collections::HashMap<Box<str>, u32>,
    unk: u32,
    /// `##`: what a piece inside a word is looked up with.
    continuing: String,
    max_word_chars: usize,
    /// BertNormalizer's steps.
    clean_text: bool,
    chinese: bool,
    strip_accents: bool,
    lowercase: bool,
    /// Bytes that may start an added token (`[` for BERT's): texts with one go the long way.
    added_starts: [bool; 128],
    /// The special tokens before and after a text's pieces, with their type ids, and the
    /// pieces' type id.
    before: Vec<(u32, u32)>,
    after: Vec<(u32, u32)>,
    piece_type: u32,
    /// Pieces kept at most: `max_length` less the special tokens.
    limit: usize,
}

impl WordPieceRows {
    /// For BERT's normaliser, pre-tokenizer and WordPiece model, and special tokens
    /// around a text that `rows` shows on two probes; `None` for anything else.
    fn new(tokenizer: &Tokenizer, rows: &RowTokenizer, max_length: usize) -> TkResult<Option<Self>> {
        let (
            Some(NormalizerWrapper::BertNormalizer(normalizer)),
            Some(PreTokenizerWrapper::BertPreTokenizer(_)),
        ) = (tokenizer.get_normalizer(), tokenizer.get_pre_tokenizer())
        else {
            return Ok(None);
        };
        let ModelWrapper::WordPiece(model) = tokenizer.get_model() else { return Ok(None) };
        let Some(unk) = model.token_to_id(&model.unk_token) else { return Ok(None) };
        let mut added_starts = [false; 128];
        for token in tokenizer.get_added_tokens_decoder().values() {
            for c in
                [token.content.chars().next(), token.content.chars().next().map(|c| c.to_ascii_lowercase())]
            {
                match c {
                    Some(c) if c.is_ascii() => added_starts[c as usize] = true,
                    Some(_) => return Ok(None), // a non-ASCII added token: not for this path
                    None => {}
                }
            }
        }
        let mut wp = WordPieceRows {
            vocab: model.get_vocab().into_iter().map(|(k, v)| (k.into_boxed_str(), v)).collect(),
            unk,
            continuing: model.continuing_subword_prefix.clone(),
            max_word_chars: model.max_input_chars_per_word,
            clean_text: normalizer.clean_text,
            chinese: normalizer.handle_chinese_chars,
            strip_accents: normalizer.strip_accents.unwrap_or(normalizer.lowercase),
            lowercase: normalizer.lowercase,
            added_starts,
            before: Vec::new(),
            after: Vec::new(),
            piece_type: 0,
            limit: 0,
        };
        // The special tokens: an empty text gives them alone; a one-word text shows
        // where its piece goes among them.
        let empty = rows.inner.encode_fast("", true)?;
        let word = rows.inner.encode_fast("a", true)?;
        let special: Vec<(u32, u32)> =
            empty.get_ids().iter().copied().zip(empty.get_type_ids().iter().copied()).collect();
        let probe: Vec<(u32, u32)> =
            word.get_ids().iter().copied().zip(word.get_type_ids().iter().copied()).collect();
        let mut piece = Vec::new();
        wp.push_word("a", &mut String::new(), &mut piece);
        let Some(at) = (0..=special.len()).find(|&at| {
            probe.len() == special.len() + 1
                && probe[..at] == special[..at]
                && probe[at + 1..] == special[at..]
                && piece == [probe[at].0]
        }) else {
            return Ok(None);
        };
        if max_length <= special.len() {
            return Ok(None);
        }
        wp.piece_type = probe[at].1;
        wp.before = special[..at].to_vec();
        wp.after = special[at..].to_vec();
        wp.limit = max_length - special.len();
        Ok(Some(wp))
    }

    /// The row of `text` (already cut to `max_chars`), or `None` when the text needs the
    /// whole tokenizer (an added token's first character in it).
    fn row(&self, text: &str) -> Option<Row> {
        let bytes = text.as_bytes();
        let plain =
            |b: u8| b.is_ascii() && !self.added_starts[b as usize] && (!b.is_ascii_control() || is_break(b));
        if !bytes.iter().all(|&b| plain(b)) {
            return self.unicode_row(text);
        }
        let mut pieces = Vec::with_capacity(self.limit.min(bytes.len() + 1));
        let mut word = String::with_capacity(64);
        let mut key = String::with_capacity(64);
        let mut at = 0;
        while at < bytes.len() && pieces.len() < self.limit {
            let b = bytes[at];
            if is_break(b) {
                at += 1;
                continue;
            }
            // A word runs to whitespace; punctuation is a word of its own.
            let end = if b.is_ascii_punctuation() {
                at + 1
            } else {
                at + bytes[at..]
                    .iter()
                    .position(|&c| is_break(c) || c.is_ascii_punctuation())
                    .unwrap_or(bytes.len() - at)
            };
            word.clear();
            word.extend(
                bytes[at..end]
                    .iter()
                    .map(|&c| char::from(if self.lowercase { c.to_ascii_lowercase() } else { c })),
            );
            self.push_word(&word, &mut key, &mut pieces);
            at = end;
        }
        // Pieces past the limit, from the last word or the words after it.
        let cut = pieces.len() > self.limit || bytes[at..].iter().any(|&b| !is_break(b));
        Some(self.finish(pieces, cut))
    }

    /// The row of a text that is not plain ASCII: BertNormalizer's steps in its order —
    /// control characters removed and whitespace made spaces, Chinese characters set
    /// apart, NFD with the nonspacing marks dropped, lowercasing — with the tables and
    /// decomposition `tokenizers` uses, ASCII characters answered without tables; then
    /// BertPreTokenizer's words and WordPiece as on the ASCII path.
    ///
    /// The text is read in segments ending at ASCII whitespace, and no further than the
    /// row needs: every step is local to a character but NFD's reordering, which never
    /// crosses an ASCII character, and words end at whitespace — so a segment's words
    /// are the whole text's.
    fn unicode_row(&self, text: &str) -> Option<Row> {
        // ASCII characters are their own bytes in UTF-8, and no other byte is ASCII.
        let added = |b: u8| b.is_ascii() && self.added_starts[b as usize];
        if text.bytes().any(added) {
            return None;
        }
        let (mut cleaned, mut normalized) = (String::new(), String::new());
        let mut pieces = Vec::with_capacity(self.limit.min(text.len() + 1));
        let mut key = String::with_capacity(64);
        let mut raw = text;
        let mut cut = false;
        // Once the row is full, segments are still read until one gives a word: that
        // word cuts the row.
        while !raw.is_empty() && !cut {
            let end =
                raw.bytes().enumerate().skip(256).find(|&(_, b)| is_break(b)).map_or(raw.len(), |(at, _)| at);
            self.normalize(&raw[..end], &mut cleaned, &mut normalized);
            raw = &raw[end..];
            // Lowercasing can make ASCII of other characters (the Kelvin sign is `k`).
            if normalized.bytes().any(added) {
                return None;
            }
            let mut rest = normalized.as_str();
            loop {
                rest = rest.trim_start_matches(char::is_whitespace);
                let Some(first) = rest.chars().next() else { break };
                if pieces.len() >= self.limit {
                    cut = true;
                    break;
                }
                // A word runs to whitespace; punctuation is a word of its own.
                let end = match is_bert_punctuation(first) {
                    true => first.len_utf8(),
                    false => {
                        rest.find(|c: char| c.is_whitespace() || is_bert_punctuation(c)).unwrap_or(rest.len())
                    }
                };
                self.push_word(&rest[..end], &mut key, &mut pieces);
                rest = &rest[end..];
            }
        }
        let cut = cut || pieces.len() > self.limit;
        Some(self.finish(pieces, cut))
    }

    /// BertNormalizer's steps on `raw` into `out` (`cleaned` is scratch).
    fn normalize(&self, raw: &str, cleaned: &mut String, out: &mut String) {
        cleaned.clear();
        out.clear();
        for c in raw.chars() {
            let c = match self.clean_text {
                true if c == '\0' || c == '\u{fffd}' || is_removed_control(c) => continue,
                // Tab and line breaks included.
                true if c.is_whitespace() => ' ',
                _ => c,
            };
            if self.chinese && is_chinese_char(c) {
                cleaned.extend([' ', c, ' ']);
            } else {
                cleaned.push(c);
            }
        }
        let mut push = |c: char| match (self.lowercase, c.is_ascii()) {
            (false, _) => out.push(c),
            (true, true) => out.push(c.to_ascii_lowercase()),
            (true, false) => out.extend(c.to_lowercase()),
        };
        if !self.strip_accents {
            cleaned.chars().for_each(&mut push);
            return;
        }
        // NFD by runs of non-ASCII characters: an ASCII character decomposes to itself
        // and is a starter, which canonical reordering never moves marks across, so
        // each run decomposes as it would inside the whole text.
        use unicode_normalization_alignments::UnicodeNormalization;
        let mut rest = cleaned.as_str();
        while !rest.is_empty() {
            let ascii = rest.bytes().position(|b| !b.is_ascii()).unwrap_or(rest.len());
            rest[..ascii].chars().for_each(&mut push);
            rest = &rest[ascii..];
            let run = rest.bytes().position(|b| b.is_ascii()).unwrap_or(rest.len());
            rest[..run].nfd().map(|(c, _)| c).filter(|c| !c.is_mark_nonspacing()).for_each(&mut push);
            rest = &rest[run..];
        }
    }

    /// The row of a text's `pieces`: cut to the limit, the special tokens around them.
    fn finish(&self, mut pieces: Vec<u32>, cut: bool) -> Row {
        pieces.truncate(self.limit);
        let ids = self
            .before
            .iter()
            .map(|s| s.0)
            .chain(pieces.iter().copied())
            .chain(self.after.iter().map(|s| s.0));
        let types = self
            .before
            .iter()
            .map(|s| s.1)
            .chain(pieces.iter().map(|_| self.piece_type))
            .chain(self.after.iter().map(|s| s.1));
        (ids.collect(), types.collect(), cut)
    }

    /// A word's pieces by greedy longest match, `##` before every piece but the first;
    /// `[UNK]` for the whole word when a part matches nothing or it is too long.
    /// `key` is scratch for the looked-up piece, kept by the caller across words.
    fn push_word(&self, word: &str, key: &mut String, pieces: &mut Vec<u32>) {
        // Bytes bound characters: only a long word needs counting.
        if word.len() > self.max_word_chars && word.chars().count() > self.max_word_chars {
            pieces.push(self.unk);
            return;
        }
        let first = pieces.len();
        let mut start = 0;
        while start < word.len() {
            let mut end = word.len();
            let found = loop {
                key.clear();
                if start > 0 {
                    key.push_str(&self.continuing);
                }
                key.push_str(&word[start..end]);
                if let Some(&id) = self.vocab.get(key.as_str()) {
                    break Some(id);
                }
                // One character shorter.
                end -= word[start..end].chars().next_back().map_or(1, char::len_utf8);
                if end == start {
                    break None;
                }
            };
            let Some(id) = found else {
                pieces.truncate(first);
                pieces.push(self.unk);
                return;
            };
            pieces.push(id);
            start = end;
        }
    }
}

/// A character BertNormalizer's cleaning removes: in category C (control, format,
/// private use) but not tab or a line break; ASCII answered without the tables.
fn is_removed_control(c: char) -> bool {
    match c.is_ascii() {
        true => c.is_ascii_control() && !is_kept_break(c),
        false => c.is_other(),
    }
}

/// The CJK ideographs BertNormalizer sets apart with spaces (its ranges).
fn is_chinese_char(c: char) -> bool {
    matches!(
        c as u32,
        0x4E00..=0x9FFF
            | 0x3400..=0x4DBF
            | 0x20000..=0x2A6DF
            | 0x2A700..=0x2B73F
            | 0x2B740..=0x2B81F
            | 0x2B920..=0x2CEAF
            | 0xF900..=0xFAFF
            | 0x2F800..=0x2FA1F
    )
}

/// Whitespace BERT's normaliser keeps (as a space) and its pre-tokenizer splits at.
fn is_break(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// The text's first `chars` characters (all of it when `chars` is 0).
fn char_prefix(text: &str, chars: usize) -> &str {
    // A character takes at least one byte: a text of no more bytes is whole.
    if chars == 0 || text.len() <= chars {
        return text;
    }
    text.char_indices().nth(chars).map_or(text, |(end, _)| &text[..end])
}

/// The text up to the end of its `words`-th word, words being separated by spaces,
/// tabs and line breaks.
fn word_prefix(text: &str, words: usize) -> &str {
    let mut seen = 0;
    let mut in_word = false;
    for (i, b) in text.bytes().enumerate() {
        let separator = matches!(b, b' ' | b'\t' | b'\n' | b'\r');
        if separator && in_word {
            seen += 1;
            if seen == words {
                // Bytes of a multi-byte character are never ASCII, so i is a boundary.
                return &text[..i];
            }
        }
        in_word = !separator;
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ascii_predicates_are_the_tables_answers() {
        for b in 0u8..128 {
            let c = char::from(b);
            assert_eq!(is_bert_punctuation(c), c.is_ascii_punctuation() || c.is_punctuation(), "{b:#x}");
            // BertNormalizer: removed when control (its is_control: not \t \n \r, and
            // in category C), then kept whitespace becomes a space.
            let removed = !matches!(c, '\t' | '\n' | '\r') && c.is_other();
            assert_eq!(c.is_ascii_control() && !is_kept_break(c), removed, "{b:#x}");
            if !removed {
                let becomes_space = matches!(c, '\t' | '\n' | '\r') || c.is_whitespace();
                assert_eq!(is_kept_break(c) || c == ' ', becomes_space, "{b:#x}");
            }
        }
    }

    /// The fast path against the tokenizer it stands in for, ids, type ids and cut, on
    /// texts built to reach every branch: unknown and over-long words, punctuation runs,
    /// case, digits, breaks, rows cut inside a word and exactly at the limit; and texts
    /// in other scripts and of every Unicode step — accents, decomposed and composed,
    /// Hangul (NFD splits its syllables), CJK set apart, lowercasing that changes length
    /// or makes ASCII, control, format and private-use characters, other whitespace,
    /// Unicode punctuation, long multi-byte words. Only texts with an added token's
    /// first character (`[`) are left to the tokenizer.
    #[test]
    fn fast_rows_are_the_tokenizers_rows() {
        let folder =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.kiln/models/all-MiniLM-L6-v2");
        let mut tokenizer = Tokenizer::from_file(folder.join("tokenizer.json")).unwrap_or_else(|e| {
            panic!("MiniLM's tokenizer.json (scripts/setup fetches it) did not load: {e}")
        });
        let words = [
            "the",
            "Inference",
            "tokenizers",
            "GPU",
            "throughput,",
            "x86_64",
            "3.14159",
            "don't",
            "e-mail",
            "qwxzvkj",
            "antidisestablishmentarianism",
            "$$$",
            "(a)",
            "!!?",
            "NaN",
        ];
        let foreign = [
            "naïve",
            "Café",
            "cafe\u{301}",
            "Straße",
            "İstanbul",
            "ΣΟΦΙΑ",
            "Ωmega",
            "\u{212a}elvin",
            "日本語の文章",
            "中文分词",
            "한국어",
            "Привет,",
            "мир!",
            "مَرْحَبًا",
            "שָׁלוֹם",
            "हिन्दी",
            "ไทย",
            "emoji😀ok",
            "«quoted»",
            "—dash—",
            "¿qué?",
            "zero\u{200b}width",
            "join\u{200d}er",
            "private\u{e000}use",
            "nbsp\u{a0}space",
            "ideo\u{3000}space",
            "ﬁligature",
            "Ａｂｃ",
        ];
        let mut texts: Vec<String> = vec![
            String::new(),
            " \t\r\n ".into(),
            "a".into(),
            "x".repeat(100),
            "x".repeat(101),
            format!("{} tail", "y".repeat(150)),
            "under_score and back\\slash ^caret~ `tick`".into(),
            "[CLS] brackets go the long way".into(),
            "vertical\u{b}tab and form\u{c}feed".into(),
            "nul\u{0}and\u{fffd}replacement".into(),
            "é".repeat(100),
            "é".repeat(101),
            format!("{} tail", "日".repeat(150)),
            "ünïcödé".repeat(30),
            "\u{85}next line, \u{2028}line separator".into(),
            "［fullwidth bracket］".into(),
            // Six over-long words of 260 bytes, a segment each: at max_length 8 the
            // row is full as the sixth ends, and what is left decides the cut.
            format!("{} \u{200b}", vec!["é".repeat(130); 6].join(" ")),
            format!("{} é", vec!["é".repeat(130); 6].join(" ")),
        ];
        let mut state = 7u64;
        let mut pick = |list: &[&'static str]| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            list[(state >> 33) as usize % list.len()]
        };
        for n in [1usize, 5, 13, 40, 200] {
            for round in 0..40 {
                // Half the texts ASCII, half mixed with other scripts.
                let text: Vec<&str> = (0..n)
                    .map(|i| if round % 2 == 1 && i % 3 == 0 { pick(&foreign) } else { pick(&words) })
                    .collect();
                texts.push(text.join(if n % 2 == 0 { " " } else { "\n" }));
            }
        }
        for max_length in [3, 8, 16, 128] {
            // Truncation as the pipeline sets it.
            let truncation = tokenizers::TruncationParams { max_length, ..Default::default() };
            tokenizer.with_truncation(Some(truncation)).unwrap();
            let rows = RowTokenizer::new(&tokenizer, max_length, 0).unwrap();
            let fast = rows.wordpiece.as_ref().expect("MiniLM's tokenizer takes the fast path");
            let mut taken = 0;
            for text in &texts {
                let (e, cut) = rows.encode(text).unwrap();
                let want = (e.get_ids().to_vec(), e.get_type_ids().to_vec(), cut);
                match fast.row(text) {
                    Some(got) => {
                        taken += 1;
                        assert_eq!(got, want, "max_length {max_length}: {text:?}");
                    }
                    None => assert!(text.contains('['), "left to the tokenizer: {text:?}"),
                }
                assert_eq!(rows.row(text).unwrap(), want, "max_length {max_length}, either path: {text:?}");
            }
            assert_eq!(taken, texts.len() - 1, "max_length {max_length}: every text but the [CLS] one");
        }
    }

    #[test]
    fn word_prefix_ends_after_the_nth_word() {
        assert_eq!(word_prefix("a bb  ccc\tdd", 2), "a bb");
        assert_eq!(word_prefix("  a bb", 1), "  a");
        assert_eq!(word_prefix("a bb", 5), "a bb");
        assert_eq!(word_prefix("día añejo más", 2), "día añejo");
        assert_eq!(word_prefix("", 3), "");
    }
}
