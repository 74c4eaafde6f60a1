//! Tokenizers for generation: a byte-level BPE built from a GGUF file's
//! `tokenizer.ggml.*` metadata (the way llama.cpp reads it), or a `tokenizer.json`.

use kiln_core::{Error, Result, TokenizerSource};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

/// `tokenizer.ggml.token_type` of tokens that are never split (control, user-defined).
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

/// The tokenizer a generator's [`TokenizerSource`] describes.
///
/// GGUF byte-level BPE: the pre-tokenizer follows `tokenizer.ggml.pre` as llama.cpp does
/// — `smollm` splits every digit on its own before GPT-2's pattern; `gpt2` and `default`
/// use GPT-2's pattern alone; others are refused by name (put the model's
/// `tokenizer.json` beside it instead). Control and user-defined tokens (`<|im_start|>`)
/// are special: matched whole in the text, never split.
pub fn generation_tokenizer(source: &TokenizerSource) -> Result<Tokenizer> {
    match source {
        TokenizerSource::File(path) => Tokenizer::from_file(path)
            .map_err(|e| Error::model_load(path, format!("cannot read the tokenizer: {e}"))),
        TokenizerSource::GgufBpe { pre, tokens, merges, token_types } => {
            let pre_tokenizer: PreTokenizerWrapper = match pre.as_str() {
                "smollm" => {
                    Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()])
                        .into()
                }
                "gpt2" | "default" => ByteLevel::new(false, true, true).into(),
                other => {
                    return Err(Error::Unsupported(format!(
                        "the GGUF tokenizer's pre-tokenizer `{other}` is not known to kiln (it knows smollm, gpt2, \
                         default); put the model's tokenizer.json beside the GGUF file"
                    )));
                }
            };
            let vocab: tokenizers::models::bpe::Vocab =
                tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
            let merges = merges
                .iter()
                .map(|m| {
                    m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())).ok_or_else(|| {
                        Error::InvalidInput(format!("GGUF merge rule `{m}` is not two tokens"))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let bpe = BPE::builder()
                .vocab_and_merges(vocab, merges)
                .build()
                .map_err(|e| Error::InvalidInput(format!("the GGUF vocabulary does not make a BPE: {e}")))?;
            let mut tokenizer = Tokenizer::new(bpe);
            tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
            tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
            let special: Vec<AddedToken> = tokens
                .iter()
                .zip(token_types)
                .filter(|(_, t)| **t == CONTROL || **t == USER_DEFINED)
                .map(|(s, _)| AddedToken::from(s.clone(), true))
                .collect();
            tokenizer
                .add_special_tokens(special)
                .map_err(|e| Error::InvalidInput(format!("the GGUF special tokens: {e}")))?;
            Ok(tokenizer)
        }
        TokenizerSource::None => {
            Err(Error::Unsupported("this generator names no tokenizer; pass token ids".into()))
        }
        _ => Err(Error::Unsupported("a tokenizer source this version of kiln does not know".into())),
    }
}

/// Text from token ids as they come, one piece at a time, never ending a piece inside
/// a UTF-8 sequence: a piece is released once the ids after the last release decode to
/// text that does not end in U+FFFD (a byte-level BPE token can hold part of a
/// character).
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    /// Ids before `prefix` are settled; `prefix..read` is context for the next piece.
    prefix: usize,
    read: usize,
}

impl Default for IncrementalDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl IncrementalDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        IncrementalDecoder { ids: Vec::new(), prefix: 0, read: 0 }
    }

    /// Adds `id`; returns the text it completes, if any.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let decode = |ids: &[u32]| {
            tokenizer.decode(ids, true).map_err(|e| Error::InvalidInput(format!("decoding tokens: {e}")))
        };
        let before = decode(&self.ids[self.prefix..self.read])?;
        let now = decode(&self.ids[self.prefix..])?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') && now.is_char_boundary(before.len()) {
            let piece = now[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            return Ok(Some(piece));
        }
        Ok(None)
    }

    /// The ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}
