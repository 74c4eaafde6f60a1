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

use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::tokenizer::{
    NormalizedString, Normalizer, PreTokenizedString, PreTokenizer, Result as TkResult,
    SplitDelimiterBehavior,
};
use tokenizers::{
    DecoderWrapper, Encoding, ModelWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    Tokenizer, TokenizerImpl,
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
}

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
        Ok(RowTokenizer { inner, prefix_words, max_length, max_chars })
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

    #[test]
    fn word_prefix_ends_after_the_nth_word() {
        assert_eq!(word_prefix("a bb  ccc\tdd", 2), "a bb");
        assert_eq!(word_prefix("  a bb", 1), "  a");
        assert_eq!(word_prefix("a bb", 5), "a bb");
        assert_eq!(word_prefix("día añejo más", 2), "día añejo");
        assert_eq!(word_prefix("", 3), "");
    }
}
