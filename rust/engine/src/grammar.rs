//! Constrained sampling with llguidance. A grammar (a JSON schema, a Lark grammar or a regex)
//! is compiled against the model's vocabulary; before every sampled token the constraint masks
//! out the tokens that would leave the grammar, so the output always stays inside it.
//!
//! The token trie and llguidance's parser factory are built once per model, on the first
//! constrained request (a few hundred milliseconds for a 128k vocabulary).

use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::tokenizer::{TokenType, Tokenizer};

/// What a constrained generation must produce.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// A JSON Schema (as JSON text); `{"type": "object"}` asks for any JSON object. Unless the
    /// schema says otherwise (`x-guidance`), the JSON is written on one line with `", "` and
    /// `": "` separators, so a sampled answer cannot wander off into whitespace.
    JsonSchema(String),
    /// A grammar in llguidance's Lark syntax, which may embed schemas with `%json { … }`.
    Lark(String),
    /// A regular expression (Rust `regex` syntax) the whole output must match.
    Regex(String),
}

impl Grammar {
    fn to_top_level(&self) -> Result<TopLevelGrammar> {
        Ok(match self {
            Grammar::JsonSchema(text) => {
                let mut schema: Value = serde_json::from_str(text).map_err(|e| {
                    Error::invalid("json_schema", format!("is not valid JSON: {e}"))
                })?;
                match &mut schema {
                    Value::Object(map) => {
                        map.entry("x-guidance").or_insert_with(|| {
                            serde_json::json!({
                                "whitespace_flexible": false,
                                "item_separator": ", ",
                                "key_separator": ": ",
                                "coerce_one_of": true,
                            })
                        });
                    }
                    Value::Bool(_) => {}
                    _ => {
                        return Err(Error::invalid(
                            "json_schema",
                            "must be a JSON object (or true / false)",
                        ))
                    }
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            Grammar::Lark(text) => TopLevelGrammar::from_lark(text.clone()),
            Grammar::Regex(rx) => TopLevelGrammar::from_regex(rx),
        })
    }

    fn param(&self) -> &'static str {
        match self {
            Grammar::JsonSchema(_) => "json_schema",
            Grammar::Lark(_) => "grammar",
            Grammar::Regex(_) => "regex",
        }
    }
}

/// The vocabulary as llguidance sees it: each token's bytes, control tokens marked with
/// llguidance's special-token byte so that grammar text never spells them by accident.
struct VocabEnv {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for VocabEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie
            .tokenize_with_greedy_fallback(s, |text| self.tokenizer.encode(text, false, false))
    }
}

fn vocab_env(tokenizer: Arc<Tokenizer>, n_vocab: usize) -> Result<VocabEnv> {
    let eog = tokenizer.eog_tokens().to_vec();
    let Some(&eos) = tokenizer.eos().as_ref().or(eog.first()) else {
        return Err(Error::Tokenizer(
            "the vocabulary has no end-of-generation token, which constrained output needs".into(),
        ));
    };
    // The embedding may have more rows than the vocabulary; those ids are never allowed.
    let words: Vec<Vec<u8>> = (0..n_vocab as u32)
        .map(|id| match tokenizer.token_type(id) {
            Some(TokenType::Control) => {
                let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                w.extend_from_slice(tokenizer.token_bytes(id));
                w
            }
            _ => tokenizer.token_bytes(id).to_vec(),
        })
        .collect();
    let mut info = TokRxInfo::new(n_vocab as u32, eos);
    info.tok_bos = tokenizer.bos();
    let trie = TokTrie::from(&info, &words).with_eos_tokens(&eog);
    Ok(VocabEnv { trie, tokenizer })
}

/// Compiles grammars for one model; cheap to hold, built on first use.
pub struct Grammars {
    tokenizer: Arc<Tokenizer>,
    n_vocab: usize,
    factory: OnceLock<std::result::Result<ParserFactory, String>>,
}

impl Grammars {
    pub fn new(tokenizer: Arc<Tokenizer>, n_vocab: usize) -> Self {
        Self {
            tokenizer,
            n_vocab,
            factory: OnceLock::new(),
        }
    }

    fn factory(&self) -> Result<&ParserFactory> {
        self.factory
            .get_or_init(|| {
                let started = std::time::Instant::now();
                let env =
                    vocab_env(self.tokenizer.clone(), self.n_vocab).map_err(|e| e.to_string())?;
                let env: llguidance::toktrie::TokEnv = Arc::new(env);
                let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
                factory.quiet();
                tracing::info!(
                    seconds = started.elapsed().as_secs_f64(),
                    "grammar engine ready"
                );
                Ok(factory)
            })
            .as_ref()
            .map_err(|e| Error::Tokenizer(format!("building the grammar engine: {e}")))
    }

    /// Compiles `grammar`; an error names what is wrong with it.
    pub fn compile(&self, grammar: &Grammar) -> Result<Constraint> {
        let top = grammar.to_top_level()?;
        let parser = self
            .factory()?
            .create_parser(top)
            .map_err(|e| Error::invalid(grammar.param(), format!("{e:#}")))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(Error::invalid(grammar.param(), e));
        }
        Ok(Constraint { matcher })
    }
}

/// The state of one constrained generation.
pub struct Constraint {
    matcher: Matcher,
}

impl Constraint {
    /// Sets the logit of every token the grammar does not allow next to minus infinity.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        let allowed = self.matcher.compute_mask_or_eos().map_err(grammar_failed)?;
        if allowed.is_zero() {
            return Err(grammar_failed("no token can continue the output"));
        }
        for (id, l) in logits.iter_mut().enumerate() {
            if !allowed.is_allowed(id as TokenId) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Advances past a sampled token (which `mask` allowed).
    pub fn accept(&mut self, id: u32) -> Result<()> {
        self.matcher.consume_token(id).map_err(grammar_failed)
    }

    /// The tokens the grammar forces next (in the tokenizer's canonical tokenization; a
    /// model may still choose another spelling of the same bytes), none if it leaves a choice.
    pub fn forced(&mut self) -> Vec<u32> {
        self.matcher.compute_ff_tokens()
    }

    /// The grammar is complete and allows nothing more.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

fn grammar_failed(e: impl std::fmt::Display) -> Error {
    Error::Inference(format!("constrained sampling: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_schemas_are_refused_with_the_parameter_named() {
        let err = Grammar::JsonSchema("{not json".into())
            .to_top_level()
            .unwrap_err()
            .to_string();
        assert!(err.contains("json_schema"), "{err}");
        let err = Grammar::JsonSchema("[1, 2]".into())
            .to_top_level()
            .unwrap_err()
            .to_string();
        assert!(err.contains("must be a JSON object"), "{err}");
    }

    #[test]
    fn compact_json_is_the_default_and_a_schema_may_override_it() {
        let g = Grammar::JsonSchema(r#"{"type": "object"}"#.into())
            .to_top_level()
            .unwrap();
        let schema = g.grammars[0].json_schema.as_ref().unwrap();
        assert_eq!(schema["x-guidance"]["whitespace_flexible"], false);
        let g = Grammar::JsonSchema(r#"{"x-guidance": {"whitespace_flexible": true}}"#.into())
            .to_top_level()
            .unwrap();
        let schema = g.grammars[0].json_schema.as_ref().unwrap();
        assert_eq!(schema["x-guidance"]["whitespace_flexible"], true);
    }
}
