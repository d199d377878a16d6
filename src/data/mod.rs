//! Labeled text data: sources (MR, BBC News, GLUE TSV, CSV, JSONL), k-shot sampling, test splits,
//! client partitions (iid / Dirichlet) and token noise for FedBPT's perturbation.

/// One labeled example. `text_b` is the second sentence of pair tasks (MRPC, RTE, SNLI).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Example {
    pub text: String,
    pub text_b: Option<String>,
    pub label: usize,
}

/// A whole labeled corpus as read from its source, before any sampling.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub name: String,
    /// Class names, indexed by `Example::label`.
    pub label_names: Vec<String>,
    pub examples: Vec<Example>,
    /// Things the loader had to work around (for instance a file that was not valid UTF-8).
    pub warnings: Vec<String>,
}

pub mod sources;
pub mod split;

impl Dataset {
    /// A SHA-256 of the corpus as loaded (label names, then each example's texts and label):
    /// what a checkpoint records, so that a run is continued only on the data it began on.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        let mut field = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        for name in &self.label_names {
            field(name.as_bytes());
        }
        for e in &self.examples {
            field(e.text.as_bytes());
            field(e.text_b.as_deref().unwrap_or("\u{0}none").as_bytes());
            field(&(e.label as u64).to_le_bytes());
        }
        hex::encode(h.finalize())
    }
}

pub use sources::{load_bbc, load_csv, load_glue_tsv, load_jsonl, load_mr, Columns, GlueKind};
pub use split::{k_shot, noise_tokens, partition_dirichlet, partition_iid, test_split, Split};
