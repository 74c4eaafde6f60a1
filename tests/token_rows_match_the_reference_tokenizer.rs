//! The tokenizer pool's fast rows (BERT's WordPiece straight to ids for ASCII and for
//! other scripts, ASCII fast paths in BERT's normaliser and pre-tokenizer, long texts
//! cut after `max_length` words) give exactly the ids of the
//! folder's unchanged tokenizer: MiniLM's real tokenizer.json, texts in many scripts and
//! the characters each shortcut has to get right.

mod support;

use kiln::TextConfig;
use kiln::text::TextPipeline;

fn texts() -> Vec<String> {
    let mut texts = support::reference().texts;
    let words =
        ["Model", "inference,", "BATCH", "latency.", "(cache)", "token-vector", "$5", "a+b=c", "x^2|y~z"];
    let long: Vec<&str> = (0..700).map(|i| words[i % words.len()]).collect();
    texts.extend(
        [
            "",
            "   ",
            "Hello, World! It's 9:30 a.m. -- \"quoted\" [brackets] {braces} <angle> `tick` ~tilde~ @at #hash %pct &amp;",
            "tabs\tand\nline\r\nbreaks\u{b}vertical\u{c}feed carriage\rreturn",
            "nul\u{0}inside\u{1}controls\u{7f}del",
            "next\u{85}line joins, no\u{a0}break space splits",
            "[CLS] special [SEP] tokens [PAD] in [MASK] text [UNK]",
            "Café naïve RÉSUMÉ Ångström e\u{301}t\u{e9}",
            "Grüße aus Köln – „Anführungszeichen“ und Gedankenstriche…",
            "中文文本，没有空格。日本語のテキスト",
            "مرحبا بالعالم، هذا نص عربي.",
            "emoji 🙂👍🏽 family 👨‍👩‍👧 flags 🇩🇪",
            "ALL CAPS SHOUTING WITH PUNCTUATION!!!",
        ]
        .map(String::from),
    );
    texts.push(long.join(" "));
    texts.push(long.join("\t"));
    // The first words are removed entirely (control characters), so the prefix of
    // max_length words does not fill the row: the whole text must decide.
    let mut hollow: Vec<String> = (0..300).map(|_| "\u{1}\u{2}".to_string()).collect();
    hollow.extend(long.iter().map(|w| w.to_string()));
    texts.push(hollow.join(" "));
    texts.push(format!("{} Ünïcödé at the end", long[..200].join(" ")));
    // No word breaks: only the character cut (text.max_chars) bounds these. Past
    // 128 × 256 characters, so the cut applies at every max_length below.
    texts.push("中文".repeat(17_000));
    texts.push("a".repeat(40_000));
    texts
}

#[test]
fn fast_rows_are_the_reference_tokenizers_ids() {
    for max_length in [8, 128, 256] {
        let config = TextConfig { max_length: Some(max_length), ..TextConfig::default() };
        let pipeline = TextPipeline::from_model_dir(&support::minilm_dir(), &config, Some(512)).unwrap();
        let texts = texts();
        let rows = pipeline.encode_rows(&texts).unwrap();
        assert_eq!(rows.len(), texts.len());
        for (i, (text, row)) in texts.iter().zip(&rows).enumerate() {
            let reference = pipeline.encode(&[text]).unwrap();
            let ids = reference.inputs.get("input_ids").unwrap().to_vec::<i64>().unwrap();
            let types = reference.inputs.get("token_type_ids").unwrap().to_vec::<i64>().unwrap();
            let start: String = text.chars().take(60).collect();
            assert_eq!(row.ids, ids, "text {i} at max_length {max_length}: {start:?}");
            assert_eq!(row.type_ids, types, "text {i} at max_length {max_length}");
            assert!(row.ids.len() <= max_length);
        }
        // The long texts reach the limit; the reference agrees on where they stop.
        assert_eq!(rows[rows.len() - 5].ids.len(), max_length);
        assert_eq!(rows[rows.len() - 2].ids.len(), max_length);
    }
}

#[test]
fn a_text_is_cut_to_max_chars_before_tokenizing() {
    // Only a run of whitespace (or of words over 100 characters) that fills the first
    // max_chars characters can show the cut: the words after it are never read.
    let text = format!("first{}after the run", " ".repeat(3_000));
    let rows = |max_chars| {
        let config = TextConfig { max_length: Some(16), max_chars, ..TextConfig::default() };
        let pipeline = TextPipeline::from_model_dir(&support::minilm_dir(), &config, Some(512)).unwrap();
        pipeline.encode_rows(&[text.as_str()]).unwrap().remove(0).ids
    };
    let whole = rows(Some(0));
    assert_eq!(whole.len(), 6, "[CLS] first after the run [SEP]: {whole:?}");
    let cut = rows(Some(1_000));
    assert_eq!(cut.len(), 3, "[CLS] first [SEP]: {cut:?}");
    assert_eq!(cut[..2], whole[..2]);
    // The default (128 characters per token of max_length: 2048 here) cuts it too.
    assert_eq!(rows(None), cut);
}
