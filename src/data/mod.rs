//! Training data: token shards (`shard`), pre-training grouping (`pretrain`), SFT examples and
//! batches (`sft`). Nothing here touches a backend.
//!
//! Tokenization goes through [`Encoder`], which the vocabulary's `Tokenizer` implements, so the
//! grouping and example logic can be tested over any id stream. [`HfText`] adds what HF's slow
//! `LlamaTokenizer` does around SentencePiece, which the original scripts relied on: the literal
//! text of a special token (`<s>`, `</s>`, `<unk>`, the pad token) becomes that token's id, and the
//! text between special tokens is encoded chunk by chunk.

pub mod pretrain;
pub mod sft;
pub mod shard;

pub use pretrain::{PretrainConfig, PretrainManifest, PretrainShards};
pub use sft::{SftBatch, SftConfig, SftExample, SftManifest, SftShards};

/// Label of a position that carries no loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// A SentencePiece encoder: plain text to ids, no BOS/EOS, no special-token parsing.
pub trait Encoder: Sync {
    /// Ids of `text` (the empty string gives no ids).
    fn encode(&self, text: &str) -> Vec<u32>;
    /// Pieces in the model.
    fn vocab_size(&self) -> usize;
    fn bos_id(&self) -> u32;
    fn eos_id(&self) -> u32;
    fn unk_id(&self) -> u32;
    /// The `[PAD]` piece, when the model has one.
    fn pad_id(&self) -> Option<u32>;
}

/// A loaded SentencePiece tokenizer checked for what the recipe needs (`<s>` and `</s>`
/// control pieces), as an [`Encoder`].
pub struct TokenizerEncoder {
    pub tokenizer: crate::vocab::Tokenizer,
    bos: u32,
    eos: u32,
}

impl TokenizerEncoder {
    pub fn new(tokenizer: crate::vocab::Tokenizer) -> anyhow::Result<Self> {
        let bos = tokenizer
            .bos_id()
            .ok_or_else(|| anyhow::anyhow!("tokenizer has no <s> control piece"))?;
        let eos = tokenizer
            .eos_id()
            .ok_or_else(|| anyhow::anyhow!("tokenizer has no </s> control piece"))?;
        Ok(TokenizerEncoder {
            tokenizer,
            bos,
            eos,
        })
    }

    /// `Tokenizer::load` (a `.model` file or a directory holding `tokenizer.model`), checked.
    pub fn load(path: &std::path::Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        let t = crate::vocab::Tokenizer::load(path)
            .with_context(|| format!("cannot load tokenizer {}", path.display()))?;
        Self::new(t).with_context(|| format!("tokenizer {}", path.display()))
    }
}

impl Encoder for TokenizerEncoder {
    fn encode(&self, text: &str) -> Vec<u32> {
        self.tokenizer.encode(text)
    }
    fn vocab_size(&self) -> usize {
        self.tokenizer.vocab_size()
    }
    fn bos_id(&self) -> u32 {
        self.bos
    }
    fn eos_id(&self) -> u32 {
        self.eos
    }
    fn unk_id(&self) -> u32 {
        self.tokenizer.unk_id()
    }
    fn pad_id(&self) -> Option<u32> {
        self.tokenizer.pad_id()
    }
}

/// HF slow `LlamaTokenizer` text encoding over an [`Encoder`] (transformers 4.28, the version
/// the original ran): special-token strings are split out first and mapped to their ids; every
/// other non-empty chunk is SentencePiece-encoded on its own.
pub struct HfText<'a, E: Encoder + ?Sized> {
    enc: &'a E,
    specials: Vec<Special>,
    /// Total ids including an added pad (the HF `len(tokenizer)`).
    vocab_size: usize,
    pad_id: Option<u32>,
}

struct Special {
    text: String,
    id: u32,
    /// Whitespace next to it is stripped: true for a special token added at run time as a plain
    /// string (`add_special_tokens({"pad_token": "[PAD]"})`), false for the tokenizer's own
    /// (`AddedToken(lstrip=False, rstrip=False)`).
    strip: bool,
}

/// Python's `str.isspace` (Unicode White_Space plus U+001C..U+001F).
fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

enum Piece<'t> {
    Text(&'t str),
    Special(u32, bool),
}

impl<'a, E: Encoder + ?Sized> HfText<'a, E> {
    /// As `LlamaTokenizer.from_pretrained` loads it: `<unk>`, `<s>`, `</s>`, plus `[PAD]` when the
    /// model has that piece (the Chinese-Alpaca tokenizer registers it as the pad token).
    pub fn new(enc: &'a E) -> Self {
        let sp = |text: &str, id| Special {
            text: text.to_string(),
            id,
            strip: false,
        };
        let mut specials = vec![
            sp("<unk>", enc.unk_id()),
            sp("<s>", enc.bos_id()),
            sp("</s>", enc.eos_id()),
        ];
        if let Some(p) = enc.pad_id() {
            specials.push(sp("[PAD]", p));
        }
        HfText {
            enc,
            specials,
            vocab_size: enc.vocab_size(),
            pad_id: enc.pad_id(),
        }
    }

    /// As the SFT script: a tokenizer without a pad token gets `[PAD]` added as a special token
    /// with the next id (`add_special_tokens({"pad_token": "[PAD]"})`).
    pub fn with_pad(enc: &'a E) -> Self {
        let mut t = Self::new(enc);
        if t.pad_id.is_none() {
            let id = t.vocab_size as u32;
            t.specials.push(Special {
                text: "[PAD]".to_string(),
                id,
                strip: true,
            });
            t.pad_id = Some(id);
            t.vocab_size += 1;
        }
        t
    }

    /// `len(tokenizer)`: the model vocabulary plus any added pad.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }
    /// `out += tokenizer(text, add_special_tokens=False)["input_ids"]`.
    pub fn encode_into(&self, text: &str, out: &mut Vec<u32>) {
        if !text.contains(['<', '[']) {
            if !text.is_empty() {
                out.extend(self.enc.encode(text));
            }
            return;
        }
        // Split at special tokens: the earliest match, the longest one when several start there.
        let mut pieces = Vec::new();
        let mut rest = text;
        loop {
            let mut best: Option<(usize, &Special)> = None;
            for s in &self.specials {
                if let Some(p) = rest.find(s.text.as_str())
                    && best
                        .is_none_or(|(bp, bs)| p < bp || (p == bp && s.text.len() > bs.text.len()))
                {
                    best = Some((p, s));
                }
            }
            match best {
                None => {
                    pieces.push(Piece::Text(rest));
                    break;
                }
                Some((p, s)) => {
                    pieces.push(Piece::Text(&rest[..p]));
                    pieces.push(Piece::Special(s.id, s.strip));
                    rest = &rest[p + s.text.len()..];
                }
            }
        }
        // A stripping special eats the whitespace on both sides.
        for i in 0..pieces.len() {
            if let Piece::Special(_, true) = pieces[i] {
                if let Some(Piece::Text(t)) = pieces.get_mut(i + 1) {
                    *t = t.trim_start_matches(py_isspace);
                }
                if i > 0
                    && let Piece::Text(t) = &mut pieces[i - 1]
                {
                    *t = t.trim_end_matches(py_isspace);
                }
            }
        }
        for p in pieces {
            match p {
                Piece::Text(t) if !t.is_empty() => out.extend(self.enc.encode(t)),
                Piece::Text(_) => {}
                Piece::Special(id, _) => out.push(id),
            }
        }
    }

    /// `tokenizer(text)["input_ids"]`: BOS, then the text (LLaMA adds no EOS).
    pub fn encode_with_bos(&self, text: &str) -> Vec<u32> {
        let mut v = vec![self.enc.bos_id()];
        self.encode_into(text, &mut v);
        v
    }
}

/// Hex sha256 of a file (identifies the tokenizer in manifests).
pub fn sha256_file(path: &std::path::Path) -> anyhow::Result<String> {
    use anyhow::Context;
    use sha2::Digest;
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Write `dir` atomically: `build` fills a temporary sibling directory, which is then renamed to
/// `dir`. `dir` must not exist (refusing beats silently mixing old and new shards).
pub fn write_dir_atomic(
    dir: &std::path::Path,
    build: impl FnOnce(&std::path::Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    anyhow::ensure!(
        !dir.exists(),
        "output {} already exists; remove it or choose another",
        dir.display()
    );
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let tmp = crate::util::temp_path(dir);
    // Removed on an error return, a panic unwinding through here, or SIGINT/SIGTERM.
    let guard = crate::util::TempGuard::new(&tmp);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).ok();
    }
    std::fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    build(&tmp)?;
    std::fs::rename(&tmp, dir)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()))?;
    guard.disarm();
    Ok(())
}
