//! Tasks: templates and verbalizers as data. A template is a string with markers `{text}`,
//! `{text_b}`, `{mask}` (masked LMs) and `{prompt}` (where suffix placement puts the placeholders).

use serde::{Deserialize, Serialize};

use crate::data::Example;
use crate::objective::Metric;
use crate::{Error, Result};

/// Template and verbalizer of a masked LM: class score = MLM logit of each label word at `{mask}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlmTemplate {
    pub template: String,
    /// One word per class; each must be a single token (leading space included for BPE vocabularies).
    pub label_words: Vec<String>,
}

/// Template and verbalizer of a causal LM: class score = next-token logit of each label word
/// after the rendered template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CausalTemplate {
    pub template: String,
    pub label_words: Vec<String>,
}

/// Template and verbalizer of a sentence encoder: class score = cosine(pooled prompted input,
/// pooled label description) / temperature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncoderTemplate {
    pub template: String,
    pub label_descriptions: Vec<String>,
    pub temperature: f32,
}

/// A classification task as the backends see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    pub name: String,
    pub label_names: Vec<String>,
    pub mlm: MlmTemplate,
    pub causal: CausalTemplate,
    pub encoder: EncoderTemplate,
    /// What reports, best-on-dev and the `perf` loss measure: accuracy, or F1 (MRPC, as the
    /// reference).
    #[serde(default)]
    pub metric: Metric,
}

/// One piece of a rendered template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Template text (never perturbed).
    Literal(String),
    /// Example text (what token noise may replace).
    Data(String),
    Mask,
    Prompt,
}

impl TaskSpec {
    /// Built-in task definitions, as in the reference where it has one.
    pub fn builtin(name: &str) -> Result<TaskSpec> {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let sentiment = |name: &str| TaskSpec {
            name: name.into(),
            label_names: s(&["negative", "positive"]),
            mlm: MlmTemplate {
                template: "{prompt} . {text} . It was {mask} .".into(),
                label_words: s(&[" bad", " great"]),
            },
            causal: CausalTemplate {
                template: "Review: {text}\n{prompt}Sentiment:".into(),
                label_words: s(&[" negative", " positive"]),
            },
            encoder: EncoderTemplate {
                template: "{text}{prompt}".into(),
                label_descriptions: s(&["It was terrible.", "It was great."]),
                temperature: 0.05,
            },
            metric: Metric::Accuracy,
        };
        let pair = |name: &str, labels: &[&str], words: &[&str]| TaskSpec {
            name: name.into(),
            label_names: s(labels),
            mlm: MlmTemplate {
                template: "{prompt} . {text} ? {mask} , {text_b}".into(),
                label_words: words.iter().map(|w| format!(" {w}")).collect(),
            },
            causal: CausalTemplate {
                template: "Sentence 1: {text}\nSentence 2: {text_b}\n{prompt}Answer:".into(),
                label_words: words.iter().map(|w| format!(" {w}")).collect(),
            },
            encoder: EncoderTemplate {
                template: "{text} ? {text_b}{prompt}".into(),
                label_descriptions: words.iter().map(|w| format!("{w}.")).collect(),
                temperature: 0.05,
            },
            metric: Metric::Accuracy,
        };
        Ok(match name {
            "mr" | "sst2" | "yelp" => sentiment(name),
            "agnews" => TaskSpec {
                name: name.into(),
                label_names: s(&["world", "sports", "business", "tech"]),
                mlm: MlmTemplate {
                    template: "{prompt} . {mask} News: {text}".into(),
                    label_words: s(&[" World", " Sports", " Business", " Tech"]),
                },
                causal: CausalTemplate {
                    template: "Article: {text}\n{prompt}Topic:".into(),
                    label_words: s(&[" world", " sports", " business", " tech"]),
                },
                encoder: EncoderTemplate {
                    template: "{text}{prompt}".into(),
                    label_descriptions: s(&[
                        "World news.",
                        "Sports news.",
                        "Business news.",
                        "Technology news.",
                    ]),
                    temperature: 0.05,
                },
                metric: Metric::Accuracy,
            },
            "bbc" => TaskSpec {
                name: name.into(),
                label_names: s(&["business", "entertainment", "politics", "sport", "tech"]),
                mlm: MlmTemplate {
                    template: "{prompt} . {mask} News: {text}".into(),
                    label_words: s(&[" Business", " Entertainment", " Politics", " Sports", " Tech"]),
                },
                causal: CausalTemplate {
                    template: "Article: {text}\n{prompt}Topic:".into(),
                    label_words: s(&[" business", " entertainment", " politics", " sports", " tech"]),
                },
                encoder: EncoderTemplate {
                    template: "{text}{prompt}".into(),
                    label_descriptions: s(&[
                        "Business news.",
                        "Entertainment news.",
                        "Politics news.",
                        "Sports news.",
                        "Technology news.",
                    ]),
                    temperature: 0.05,
                },
                metric: Metric::Accuracy,
            },
            "mrpc" => TaskSpec {
                metric: Metric::F1,
                ..pair(name, &["not_equivalent", "equivalent"], &["No", "Yes"])
            },
            "rte" => pair(name, &["entailment", "not_entailment"], &["Yes", "No"]),
            "snli" => pair(name, &["entailment", "neutral", "contradiction"], &["Yes", "Maybe", "No"]),
            other => {
                return Err(Error::config(
                    "task_name",
                    format!(
                        "unknown task `{other}` (built in: mr, sst2, yelp, agnews, bbc, mrpc, rte, snli)"
                    ),
                ))
            }
        })
    }

    pub fn n_classes(&self) -> usize {
        self.label_names.len()
    }

    /// Checks that every verbalizer has one entry per class.
    pub fn validate(&self) -> Result<()> {
        let n = self.n_classes();
        let check = |key: &str, got: usize| {
            if got != n {
                Err(Error::config(key, format!("{got} entries for {n} classes")))
            } else {
                Ok(())
            }
        };
        check("task.mlm.label_words", self.mlm.label_words.len())?;
        check("task.causal.label_words", self.causal.label_words.len())?;
        check("task.encoder.label_descriptions", self.encoder.label_descriptions.len())?;
        // Two classes with the same word (or an empty one) score alike: a constant prediction.
        for (key, words) in [
            ("task.mlm.label_words", &self.mlm.label_words),
            ("task.causal.label_words", &self.causal.label_words),
            ("task.encoder.label_descriptions", &self.encoder.label_descriptions),
        ] {
            if let Some(i) = words.iter().position(|w| w.trim().is_empty()) {
                return Err(Error::config(key, format!("entry {i} is empty")));
            }
            if let Some((i, w)) = words.iter().enumerate().find(|(i, w)| words[..*i].contains(w)) {
                return Err(Error::config(
                    key,
                    format!("entry {i} ({w:?}) repeats an earlier one: the classes could not be told apart"),
                ));
            }
        }
        if let Some((i, n)) =
            self.label_names.iter().enumerate().find(|(i, n)| self.label_names[..*i].contains(n))
        {
            return Err(Error::config(
                "task.label_names",
                format!("entry {i} ({n:?}) appears twice"),
            ));
        }
        for (key, t) in [
            ("task.mlm.template", &self.mlm.template),
            ("task.causal.template", &self.causal.template),
            ("task.encoder.template", &self.encoder.template),
        ] {
            parse(t).map_err(|m| Error::config(key, m))?;
        }
        if self.encoder.temperature.is_nan() || self.encoder.temperature <= 0.0 {
            return Err(Error::config("task.encoder.temperature", "must be > 0"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Lit(String),
    Text,
    TextB,
    Mask,
    Prompt,
}

fn parse(template: &str) -> std::result::Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        if start > 0 {
            out.push(Token::Lit(rest[..start].to_string()));
        }
        let end = rest[start..]
            .find('}')
            .ok_or_else(|| format!("unclosed `{{` in template {template:?}"))?;
        let name = &rest[start + 1..start + end];
        out.push(match name {
            "text" => Token::Text,
            "text_b" => Token::TextB,
            "mask" => Token::Mask,
            "prompt" => Token::Prompt,
            other => return Err(format!("unknown marker {{{other}}} in template {template:?}")),
        });
        rest = &rest[start + end + 1..];
    }
    if !rest.is_empty() {
        out.push(Token::Lit(rest.to_string()));
    }
    if !out.contains(&Token::Text) {
        return Err(format!("template {template:?} has no {{text}}"));
    }
    Ok(out)
}

/// Render `template` for `example`. With `with_prompt = false` the `{prompt}` marker is dropped.
/// Whitespace that ends a literal moves to the front of the following data piece, so BPE
/// vocabularies see " word" as in running text.
pub fn render(template: &str, example: &Example, with_prompt: bool) -> Result<Vec<Piece>> {
    let tokens = parse(template).map_err(Error::Task)?;
    let mut pieces: Vec<Piece> = Vec::new();
    for tok in tokens {
        match tok {
            Token::Lit(s) => pieces.push(Piece::Literal(s)),
            Token::Text | Token::TextB => {
                let text = if tok == Token::Text {
                    example.text.clone()
                } else {
                    example.text_b.clone().ok_or_else(|| {
                        Error::Task(format!("template {template:?} needs a second text (text_b)"))
                    })?
                };
                let mut lead = String::new();
                if let Some(Piece::Literal(prev)) = pieces.last_mut() {
                    let trimmed = prev.trim_end().len();
                    lead = prev[trimmed..].to_string();
                    prev.truncate(trimmed);
                    if prev.is_empty() {
                        pieces.pop();
                    }
                }
                pieces.push(Piece::Data(format!("{lead}{text}")));
            }
            Token::Mask => pieces.push(Piece::Mask),
            Token::Prompt => {
                if with_prompt {
                    pieces.push(Piece::Prompt)
                }
            }
        }
    }
    Ok(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(t: &str) -> Example {
        Example { text: t.into(), text_b: None, label: 0 }
    }

    #[test]
    fn render_moves_space_to_data_and_drops_prompt() {
        let p = render("Review: {text}\n{prompt}Sentiment:", &ex("good film"), true).unwrap();
        assert_eq!(
            p,
            vec![
                Piece::Literal("Review:".into()),
                Piece::Data(" good film".into()),
                Piece::Literal("\n".into()),
                Piece::Prompt,
                Piece::Literal("Sentiment:".into()),
            ]
        );
        let p = render("Review: {text}\n{prompt}Sentiment:", &ex("x"), false).unwrap();
        assert!(!p.contains(&Piece::Prompt));
    }

    #[test]
    fn bad_templates_are_errors() {
        assert!(render("{prompt} {mask}", &ex("x"), true).is_err());
        assert!(render("{text} {oops}", &ex("x"), true).is_err());
        assert!(render("{text} {text_b}", &ex("x"), true).is_err());
        for name in ["mr", "sst2", "agnews", "bbc", "mrpc", "rte", "snli"] {
            TaskSpec::builtin(name).unwrap().validate().unwrap();
        }
        assert!(TaskSpec::builtin("nope").is_err());
    }

    #[test]
    fn verbalizers_that_cannot_tell_classes_apart_are_refused() {
        let mut t = TaskSpec::builtin("mr").unwrap();
        t.causal.label_words = vec![" good".into(), " good".into()];
        let e = t.validate().unwrap_err().to_string();
        assert!(e.contains("task.causal.label_words") && e.contains("repeats"), "{e}");
        let mut t = TaskSpec::builtin("mr").unwrap();
        t.encoder.label_descriptions = vec!["It was great.".into(), " ".into()];
        let e = t.validate().unwrap_err().to_string();
        assert!(e.contains("task.encoder.label_descriptions") && e.contains("empty"), "{e}");
        let mut t = TaskSpec::builtin("mr").unwrap();
        t.label_names = vec!["a".into(), "a".into()];
        assert!(t.validate().is_err());
    }
}
