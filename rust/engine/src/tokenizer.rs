//! Byte-level BPE built from the GGUF vocabulary (`tokenizer.ggml.model = "gpt2"`), following
//! llama.cpp's rules so that token ids match it: the pre-tokenizer regexes that
//! `tokenizer.ggml.pre` names, special tokens partitioned out of the text longest first, and
//! `ignore_merges` for the Llama-3 style vocabularies.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};

use fancy_regex::Regex;
use hashbrown::HashTable;

use crate::error::{Error, Result};
use crate::gguf::{GgufFile, MetadataValue};

/// llama.cpp's token attribute types (`tokenizer.ggml.token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_i32(v: i32) -> Self {
        match v {
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Normal,
        }
    }

    fn is_special(self) -> bool {
        matches!(self, Self::Control | Self::UserDefined | Self::Unknown)
    }
}

const LLAMA3_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT2_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";

/// The split regexes llama.cpp applies for a `tokenizer.ggml.pre` value, in order; each one
/// splits the pieces the previous one produced, and text between matches stays a piece.
/// Returns the list and whether merges are skipped for words already in the vocabulary.
fn pre_tokenizer(pre: &str) -> Result<(Vec<&'static str>, bool)> {
    Ok(match pre {
        "llama-bpe" | "llama3" | "falcon3" | "pixtral" | "lfm2" | "smaug-bpe" => {
            (vec![LLAMA3_SPLIT], true)
        }
        "gpt-2" | "mpt" | "olmo" => (vec![LLAMA3_SPLIT], false),
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
            (vec![r"\p{N}", GPT2_SPLIT], false)
        }
        "default" => (
            vec![
                r"[\p{P}\$\+<=>\^~\|]+",
                GPT2_SPLIT,
                r"\p{N}+",
                "[0-9][0-9][0-9]",
            ],
            false,
        ),
        other => {
            return Err(Error::Tokenizer(format!(
                "unsupported pre-tokenizer tokenizer.ggml.pre = {other:?} (supported: llama-bpe, \
                 smollm, gpt-2, starcoder, default and their aliases)"
            )))
        }
    })
}

/// GPT-2's reversible mapping of bytes to printable characters.
fn bytes_to_unicode() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        map[b as usize] = if printable {
            b as char
        } else {
            n += 1;
            char::from_u32(255 + n).expect("valid code point")
        };
    }
    map
}

/// Byte strings stored end to end in one buffer, by index. A vocabulary's entries average a
/// few bytes, so a heap allocation each (and a `String` header each) would cost several times
/// the text: on SmolLM2's 49,152 tokens the texts, their decoded bytes and the lookup table
/// took about 9 MB as `String`s and a `HashMap<String, u32>`, and take about 1.5 MB so.
#[derive(Default)]
struct Pool {
    bytes: Vec<u8>,
    ends: Vec<u32>,
}

impl Pool {
    fn push(&mut self, entry: &[u8]) {
        self.bytes.extend_from_slice(entry);
        self.ends
            .push(u32::try_from(self.bytes.len()).expect("a vocabulary under 4 GiB"));
    }

    fn get(&self, i: usize) -> Option<&[u8]> {
        let end = *self.ends.get(i)? as usize;
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        Some(&self.bytes[start..end])
    }

    fn len(&self) -> usize {
        self.ends.len()
    }

    fn shrink_to_fit(&mut self) {
        self.bytes.shrink_to_fit();
        self.ends.shrink_to_fit();
    }
}

/// Token ids by their vocabulary text: a hash table of ids that hashes and compares the texts
/// in the [`Pool`], so the texts are not stored twice.
struct TextIndex {
    table: HashTable<u32>,
    hasher: RandomState,
}

impl TextIndex {
    /// Every text's id; where a text occurs twice the later id wins, as in llama.cpp.
    fn new(texts: &Pool) -> Self {
        let hasher = RandomState::new();
        let mut table = HashTable::with_capacity(texts.len());
        let text = |id: u32| texts.get(id as usize).expect("ids index the pool");
        for id in 0..texts.len() as u32 {
            let hash = hasher.hash_one(text(id));
            match table.find_mut(hash, |&other| text(other) == text(id)) {
                Some(slot) => *slot = id,
                None => {
                    table.insert_unique(hash, id, |&other| hasher.hash_one(text(other)));
                }
            }
        }
        Self { table, hasher }
    }

    fn get(&self, texts: &Pool, key: &[u8]) -> Option<u32> {
        let hash = self.hasher.hash_one(key);
        self.table
            .find(hash, |&id| texts.get(id as usize) == Some(key))
            .copied()
    }
}

pub struct Tokenizer {
    /// Vocabulary text as stored (byte-level encoded for normal tokens); every entry UTF-8.
    texts: Pool,
    types: Vec<TokenType>,
    /// The bytes each token stands for when decoded.
    pieces: Pool,
    token_to_id: TextIndex,
    /// The token of each byte's byte-level character, where the vocabulary has it: the
    /// symbols BPE starts from.
    byte_ids: [Option<u32>; 256],
    /// (left id, right id) -> (rank, merged id)
    merges: HashMap<(u32, u32), (u32, u32)>,
    splits: Vec<Regex>,
    ignore_merges: bool,
    byte_encoder: [char; 256],
    /// Special tokens, longest text first, for partitioning.
    specials: Vec<u32>,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    eog: Vec<u32>,
    /// A `tokenizer.json` that replaces the GGUF vocabulary's encoding when present.
    hf: Option<tokenizers::Tokenizer>,
}

/// Texts llama.cpp treats as end-of-generation wherever they appear in a vocabulary.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
];

impl Tokenizer {
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let model = gguf.require_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(Error::Tokenizer(format!(
                "unsupported tokenizer model {model:?} (byte-level BPE, \"gpt2\", is supported)"
            )));
        }
        let mut texts = Pool::default();
        for v in gguf.require_array("tokenizer.ggml.tokens")? {
            let text = v
                .to_string()
                .map_err(|e| Error::Tokenizer(format!("tokenizer.ggml.tokens: {e}")))?;
            texts.push(text.as_bytes());
        }
        texts.shrink_to_fit();
        if texts.len() == 0 {
            return Err(Error::Tokenizer("the vocabulary is empty".into()));
        }
        let mut types = match gguf.get("tokenizer.ggml.token_type") {
            Some(_) => gguf
                .require_array("tokenizer.ggml.token_type")?
                .iter()
                .map(|v| {
                    v.to_i32()
                        .or_else(|_| v.to_u32().map(|x| x as i32))
                        .map(TokenType::from_i32)
                })
                .collect::<candle_core::Result<Vec<_>>>()
                .map_err(|e| Error::Tokenizer(format!("tokenizer.ggml.token_type: {e}")))?,
            None => vec![TokenType::Normal; texts.len()],
        };
        if types.len() != texts.len() {
            return Err(Error::Tokenizer(format!(
                "{} token types for {} tokens",
                types.len(),
                texts.len()
            )));
        }
        let merges_raw: &[MetadataValue] = match gguf.get("tokenizer.ggml.merges") {
            Some(_) => gguf.require_array("tokenizer.ggml.merges")?,
            None => &[],
        };
        let pre = gguf.get_str("tokenizer.ggml.pre")?.unwrap_or("default");
        let (patterns, ignore_merges) = pre_tokenizer(pre)?;
        let splits = patterns
            .iter()
            .map(|p| Regex::new(p).map_err(|e| Error::Tokenizer(format!("regex {p:?}: {e}"))))
            .collect::<Result<Vec<_>>>()?;

        let token_to_id = TextIndex::new(&texts);
        let id = |text: &str| token_to_id.get(&texts, text.as_bytes());
        let mut merges = HashMap::with_capacity(merges_raw.len());
        let mut joined = String::new();
        for (rank, line) in merges_raw.iter().enumerate() {
            let line = line
                .to_string()
                .map_err(|e| Error::Tokenizer(format!("tokenizer.ggml.merges: {e}")))?;
            let Some((a, b)) = line.split_once(' ') else {
                return Err(Error::Tokenizer(format!(
                    "merge {rank} {line:?} has no space"
                )));
            };
            joined.clear();
            joined.push_str(a);
            joined.push_str(b);
            // Merges whose parts are missing from the vocabulary can never fire; skip them.
            if let (Some(l), Some(r), Some(m)) = (id(a), id(b), id(&joined)) {
                merges.entry((l, r)).or_insert((rank as u32, m));
            }
        }

        merges.shrink_to_fit();
        let byte_encoder = bytes_to_unicode();
        let byte_ids = byte_encoder.map(|c| id(c.encode_utf8(&mut [0; 4])));
        let byte_decoder: HashMap<char, u8> = byte_encoder
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        let id_of = |key: &str| -> Result<Option<u32>> {
            match gguf.get_usize(key)? {
                Some(id) if id < texts.len() => Ok(Some(id as u32)),
                Some(id) => Err(Error::Tokenizer(format!(
                    "{key} = {id} is outside the vocabulary of {}",
                    texts.len()
                ))),
                None => Ok(None),
            }
        };
        let bos = id_of("tokenizer.ggml.bos_token_id")?;
        let eos = id_of("tokenizer.ggml.eos_token_id")?;
        let mut eog: Vec<u32> = [
            eos,
            id_of("tokenizer.ggml.eot_token_id")?,
            id_of("tokenizer.ggml.eom_token_id")?,
        ]
        .into_iter()
        .flatten()
        .collect();
        for text in EOG_TEXTS {
            if let Some(id) = id(text) {
                eog.push(id);
                if !types[id as usize].is_special() {
                    types[id as usize] = TokenType::Control;
                }
            }
        }
        eog.sort_unstable();
        eog.dedup();
        let add_bos = gguf
            .get_bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(false)
            && bos.is_some();

        let mut pieces = Pool::default();
        let mut piece = Vec::new();
        for (i, ty) in types.iter().enumerate() {
            let text = texts.get(i).expect("one type per text");
            piece.clear();
            match ty {
                TokenType::Normal => {
                    let text = std::str::from_utf8(text).expect("pushed from a str");
                    for c in text.chars() {
                        match byte_decoder.get(&c) {
                            Some(&b) => piece.push(b),
                            None => piece.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                        }
                    }
                }
                TokenType::Unused => {}
                _ => piece.extend_from_slice(text),
            }
            pieces.push(&piece);
        }
        pieces.shrink_to_fit();
        let text_len = |i: u32| texts.get(i as usize).map_or(0, |t| t.len());
        let mut specials: Vec<u32> = (0..texts.len() as u32)
            .filter(|&i| types[i as usize].is_special() && text_len(i) > 0)
            .collect();
        specials.sort_by_key(|&i| std::cmp::Reverse(text_len(i)));

        Ok(Self {
            texts,
            types,
            pieces,
            token_to_id,
            byte_ids,
            merges,
            splits,
            ignore_merges,
            byte_encoder,
            specials,
            bos,
            eos,
            add_bos,
            eog,
            hf: None,
        })
    }

    /// Encodes with a Hugging Face `tokenizer.json` instead of the GGUF rules. Decoding, the
    /// special tokens and end-of-generation tokens still come from the GGUF vocabulary, which
    /// must agree with it.
    pub fn set_override(&mut self, path: &std::path::Path) -> Result<()> {
        let hf = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let n = hf.get_vocab_size(true);
        if n > self.texts.len() {
            return Err(Error::Tokenizer(format!(
                "{} has {n} tokens, the GGUF vocabulary {}",
                path.display(),
                self.texts.len()
            )));
        }
        tracing::info!(path = %path.display(), "tokenizer.json overrides the GGUF tokenizer");
        self.hf = Some(hf);
        Ok(())
    }

    pub fn n_vocab(&self) -> usize {
        self.texts.len()
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// End-of-generation tokens: eos, eot, eom and the end-of-turn texts llama.cpp knows.
    pub fn eog_tokens(&self) -> &[u32] {
        &self.eog
    }

    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// The id of a token by its exact vocabulary text, e.g. `<|im_end|>` or `<think>`.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.token_to_id.get(&self.texts, text.as_bytes())
    }

    pub fn token_text(&self, id: u32) -> Option<&str> {
        let text = self.texts.get(id as usize)?;
        // SAFETY: every entry of `texts` was pushed whole from a `str` (`from_gguf`).
        Some(unsafe { std::str::from_utf8_unchecked(text) })
    }

    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }

    /// The bytes a token decodes to (a control token decodes to its text).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.pieces.get(id as usize).unwrap_or(&[])
    }

    /// Tokenizes `text`. With `special`, control-token texts in it (such as `<|im_start|>`)
    /// become those tokens; user-defined tokens are always recognised, as in llama.cpp.
    pub fn encode(&self, text: &str, add_bos: bool, special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_bos {
            if let Some(bos) = self.bos {
                out.push(bos);
            }
        }
        if let Some(hf) = &self.hf {
            // tokenizer.json always recognises its added tokens, whatever `special` says.
            match hf.encode(text, false) {
                Ok(enc) => out.extend_from_slice(enc.get_ids()),
                Err(e) => tracing::error!(error = %e, "tokenizer.json failed to encode"),
            }
            return out;
        }
        for fragment in self.partition(text, special) {
            match fragment {
                Fragment::Special(id) => out.push(id),
                Fragment::Text(t) => self.encode_text(t, &mut out),
            }
        }
        out
    }

    fn partition<'a>(&self, text: &'a str, special: bool) -> Vec<Fragment<'a>> {
        let mut fragments = vec![Fragment::Text(text)];
        for &id in &self.specials {
            let ty = self.types[id as usize];
            if !special && ty != TokenType::UserDefined {
                continue;
            }
            let needle = self.token_text(id).unwrap_or_default();
            let mut next = Vec::with_capacity(fragments.len());
            for f in fragments {
                let Fragment::Text(mut rest) = f else {
                    next.push(f);
                    continue;
                };
                while let Some(at) = rest.find(needle) {
                    if at > 0 {
                        next.push(Fragment::Text(&rest[..at]));
                    }
                    next.push(Fragment::Special(id));
                    rest = &rest[at + needle.len()..];
                }
                if !rest.is_empty() {
                    next.push(Fragment::Text(rest));
                }
            }
            fragments = next;
        }
        fragments
    }

    fn split_words<'a>(&self, text: &'a str) -> Vec<&'a str> {
        let mut words = vec![text];
        for re in &self.splits {
            let mut next = Vec::with_capacity(words.len() * 2);
            for word in words {
                let mut last = 0;
                for m in re.find_iter(word) {
                    // A regex error here can only be a backtracking limit on pathological
                    // input; the unmatched rest stays one piece, which still tokenizes.
                    let Ok(m) = m else { break };
                    if m.start() > last {
                        next.push(&word[last..m.start()]);
                    }
                    if m.end() > m.start() {
                        next.push(m.as_str());
                    }
                    last = m.end();
                }
                if last < word.len() {
                    next.push(&word[last..]);
                }
            }
            words = next;
        }
        words
    }

    fn encode_text(&self, text: &str, out: &mut Vec<u32>) {
        let mut encoded = String::new();
        for word in self.split_words(text) {
            if self.ignore_merges {
                encoded.clear();
                encoded.extend(word.bytes().map(|b| self.byte_encoder[b as usize]));
                if let Some(id) = self.token_id(&encoded) {
                    out.push(id);
                    continue;
                }
            }
            self.bpe(word.as_bytes(), out);
        }
    }

    /// BPE over a word's bytes: from the tokens of their byte-level characters, merges the pair
    /// of lowest rank (leftmost on ties) until none applies.
    fn bpe(&self, word: &[u8], out: &mut Vec<u32>) {
        let mut symbols: Vec<u32> = Vec::with_capacity(word.len());
        for &b in word {
            match self.byte_ids[b as usize] {
                Some(id) => symbols.push(id),
                // Every byte-level character is in a complete vocabulary; a vocabulary without
                // one has no way to spell it, so it is skipped as llama.cpp skips it.
                None => {
                    tracing::warn!(char = %self.byte_encoder[b as usize], "character missing from the vocabulary")
                }
            }
        }
        loop {
            let best = symbols
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| self.merges.get(&(w[0], w[1])).map(|&(r, m)| (r, i, m)))
                .min();
            let Some((_, i, merged)) = best else { break };
            symbols[i] = merged;
            symbols.remove(i + 1);
        }
        out.extend_from_slice(&symbols);
    }

    /// Decodes ids to text; bytes that are not valid UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&id| self.token_bytes(id).iter().copied())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

enum Fragment<'a> {
    Text(&'a str),
    Special(u32),
}

#[cfg(test)]
impl Tokenizer {
    /// A tokenizer without a file, for tests: the given vocabulary, ids in order, no merges.
    /// Texts of the form `<…>` are control tokens, the others normal ones in byte-level text
    /// (`Ċ` is a line break); end-of-generation tokens are found by their text, as in a file.
    pub(crate) fn for_tests(vocab: &[&str]) -> Self {
        let mut texts = Pool::default();
        for text in vocab {
            texts.push(text.as_bytes());
        }
        let types: Vec<TokenType> = vocab
            .iter()
            .map(|t| {
                if t.len() > 2 && t.starts_with('<') && t.ends_with('>') {
                    TokenType::Control
                } else {
                    TokenType::Normal
                }
            })
            .collect();
        let token_to_id = TextIndex::new(&texts);
        let byte_encoder = bytes_to_unicode();
        let byte_ids =
            byte_encoder.map(|c| token_to_id.get(&texts, c.encode_utf8(&mut [0; 4]).as_bytes()));
        let byte_decoder: HashMap<char, u8> = byte_encoder
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        let mut pieces = Pool::default();
        for (text, ty) in vocab.iter().zip(&types) {
            let piece: Vec<u8> = match ty {
                TokenType::Normal => text.chars().map(|c| byte_decoder[&c]).collect(),
                _ => text.as_bytes().to_vec(),
            };
            pieces.push(&piece);
        }
        let mut eog: Vec<u32> = EOG_TEXTS
            .iter()
            .filter_map(|t| token_to_id.get(&texts, t.as_bytes()))
            .collect();
        eog.sort_unstable();
        let mut specials: Vec<u32> = (0..vocab.len() as u32)
            .filter(|&i| types[i as usize].is_special())
            .collect();
        specials.sort_by_key(|&i| std::cmp::Reverse(vocab[i as usize].len()));
        let (patterns, ignore_merges) = pre_tokenizer("default").expect("a known name");
        Self {
            texts,
            types,
            pieces,
            token_to_id,
            byte_ids,
            merges: HashMap::new(),
            splits: patterns.iter().map(|p| Regex::new(p).unwrap()).collect(),
            ignore_merges,
            byte_encoder,
            specials,
            bos: None,
            eos: eog.first().copied(),
            add_bos: false,
            eog,
            hf: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_is_a_bijection() {
        let map = bytes_to_unicode();
        let mut seen: Vec<char> = map.to_vec();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 256);
        assert_eq!(map[b' ' as usize], 'Ġ');
        assert_eq!(map[b'\n' as usize], 'Ċ');
    }

    #[test]
    fn unknown_pre_tokenizer_is_named() {
        let err = pre_tokenizer("no-such-pre").unwrap_err().to_string();
        assert!(err.contains("no-such-pre"), "{err}");
    }
}
