//! Reading the YAML text once: a parse that keeps positions, `${NAME}`
//! substitution from the environment, and a plain value tree that serde then
//! deserializes section by section (so one bad route does not hide the next).

use std::collections::{HashMap, HashSet};

use saphyr::{MarkedYaml, Scalar, ScalarStyle, YamlData, YamlLoader};
use serde_json::{Map, Number, Value};

use super::error::{ConfigError, Position};

/// The parsed file: values plus where each one was written.
pub struct Document {
    pub root: Value,
    positions: HashMap<String, Position>,
    /// Paths whose value came from the environment: their text never appears
    /// in an error, since it may be a secret.
    from_env: HashSet<String>,
}

impl Document {
    /// Parses `text`, resolving `${NAME}` with `env`. All substitution errors
    /// are collected; a YAML syntax error stops the parse.
    pub fn parse(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Document, Vec<ConfigError>> {
        // Scalars are kept as written so a quoted "${PORT}" stays a string.
        let mut loader: YamlLoader<'_, MarkedYaml<'_>> = YamlLoader::default();
        loader.early_parse(false);
        let mut parser = saphyr_parser::Parser::new_from_str(text);
        let loaded = parser
            .load(&mut loader, true)
            .and_then(|()| loader.error().cloned().map_or(Ok(()), Err));
        let docs = loaded.map(|()| loader.into_documents()).map_err(|e| {
            let m = e.marker();
            vec![ConfigError {
                path: String::new(),
                position: Some(Position {
                    line: m.line(),
                    column: m.col() + 1,
                }),
                message: format!("YAML syntax error: {}", e.info()),
            }]
        })?;
        let Some(first) = docs.first() else {
            return Err(vec![ConfigError {
                path: String::new(),
                position: None,
                message: "the file is empty".into(),
            }]);
        };
        let mut builder = Builder {
            env,
            positions: HashMap::new(),
            from_env: HashSet::new(),
            errors: Vec::new(),
        };
        let root = builder.convert(first, String::new());
        if docs.len() > 1 {
            builder.errors.push(ConfigError {
                path: String::new(),
                position: Some(position_of(&docs[1])),
                message: "the file holds more than one YAML document; put everything in one".into(),
            });
        }
        if !builder.errors.is_empty() {
            return Err(builder.errors);
        }
        Ok(Document {
            root,
            positions: builder.positions,
            from_env: builder.from_env,
        })
    }

    /// Where `path` was written, or else its nearest written ancestor.
    pub fn position(&self, path: &str) -> Option<Position> {
        let mut p = path;
        loop {
            if let Some(pos) = self.positions.get(p) {
                return Some(*pos);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }

    pub fn error(&self, path: impl Into<String>, message: impl Into<String>) -> ConfigError {
        let path = path.into();
        ConfigError {
            position: self.position(&path),
            message: message.into(),
            path,
        }
    }

    /// Whether the value at `path` (or inside it) came from the environment.
    pub fn is_from_env(&self, path: &str) -> bool {
        self.from_env.iter().any(|p| {
            p == path || p.starts_with(&format!("{path}.")) || p.starts_with(&format!("{path}["))
        })
    }
}

/// Joins a map key onto a YAML path: `routes[2]` + `match` = `routes[2].match`.
pub fn key_path(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// Joins a sequence index onto a YAML path: `routes` + 2 = `routes[2]`.
pub fn index_path(parent: &str, index: usize) -> String {
    format!("{parent}[{index}]")
}

fn position_of(node: &MarkedYaml<'_>) -> Position {
    Position {
        line: node.span.start.line(),
        column: node.span.start.col() + 1,
    }
}

struct Builder<'e> {
    env: &'e dyn Fn(&str) -> Option<String>,
    positions: HashMap<String, Position>,
    from_env: HashSet<String>,
    errors: Vec<ConfigError>,
}

impl Builder<'_> {
    fn convert(&mut self, node: &MarkedYaml<'_>, path: String) -> Value {
        self.positions
            .entry(path.clone())
            .or_insert(position_of(node));
        match &node.data {
            YamlData::Value(s) => self.scalar(s, false, &path, node),
            YamlData::Representation(text, style, _) => {
                let quoted = !matches!(style, ScalarStyle::Plain);
                let scalar = if quoted {
                    Scalar::String(text.clone())
                } else {
                    Scalar::parse_from_cow(text.clone())
                };
                self.scalar(&scalar, quoted, &path, node)
            }
            YamlData::Sequence(items) => Value::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| self.convert(item, index_path(&path, i)))
                    .collect(),
            ),
            YamlData::Mapping(entries) => {
                let mut map = Map::new();
                for (k, v) in entries.iter() {
                    let key = match &k.data {
                        YamlData::Value(Scalar::String(s)) => s.to_string(),
                        YamlData::Value(Scalar::Integer(i)) => i.to_string(),
                        YamlData::Value(Scalar::Boolean(b)) => b.to_string(),
                        YamlData::Representation(text, _, _) => text.to_string(),
                        _ => {
                            self.errors.push(ConfigError {
                                path: path.clone(),
                                position: Some(position_of(k)),
                                message: "mapping keys must be plain strings".into(),
                            });
                            continue;
                        }
                    };
                    let child = key_path(&path, &key);
                    self.positions.insert(child.clone(), position_of(k));
                    let value = self.convert(v, child);
                    map.insert(key, value);
                }
                Value::Object(map)
            }
            YamlData::Tagged(_, inner) => self.convert(inner, path),
            YamlData::Alias(_) | YamlData::BadValue => {
                self.errors.push(ConfigError {
                    path,
                    position: Some(position_of(node)),
                    message: "this value cannot be read (bad tag or unresolved alias)".into(),
                });
                Value::Null
            }
        }
    }

    fn scalar(&mut self, s: &Scalar<'_>, quoted: bool, path: &str, node: &MarkedYaml<'_>) -> Value {
        match s {
            Scalar::Null => Value::Null,
            Scalar::Boolean(b) => Value::Bool(*b),
            Scalar::Integer(i) => Value::Number((*i).into()),
            Scalar::FloatingPoint(f) => Number::from_f64(f.into_inner())
                .map(Value::Number)
                .unwrap_or(Value::Null),
            Scalar::String(text) => {
                if !text.contains("${") {
                    return Value::String(text.to_string());
                }
                match substitute(text, self.env) {
                    Ok(out) => {
                        self.from_env.insert(path.to_string());
                        // A plain `threads: ${THREADS}` reads as the number it names.
                        if !quoted && is_single_reference(text) {
                            let parsed = Scalar::parse_from_cow(out.clone().into());
                            if !matches!(parsed, Scalar::String(_)) {
                                return self.scalar(&parsed, true, path, node);
                            }
                        }
                        Value::String(out)
                    }
                    Err(message) => {
                        self.errors.push(ConfigError {
                            path: path.to_string(),
                            position: Some(position_of(node)),
                            message,
                        });
                        Value::Null
                    }
                }
            }
        }
    }
}

fn is_single_reference(text: &str) -> bool {
    text.starts_with("${") && text.ends_with('}') && text[2..].find('}') == Some(text.len() - 3)
}

/// Replaces every `${NAME}` in `text` with the environment value.
fn substitute(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err("unterminated ${...} reference".into());
        };
        let name = &after[..end];
        let valid =
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid {
            return Err(format!(
                "\"${{{name}}}\" is not a valid environment variable reference"
            ));
        }
        match env(name) {
            Some(value) => out.push_str(&value),
            None => return Err(format!("environment variable {name} is not set")),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "SECRET" => Some("hunter2".into()),
            "THREADS" => Some("4".into()),
            _ => None,
        }
    }

    #[test]
    fn records_positions_of_keys_and_items() {
        let doc = Document::parse("a:\n  b: 1\nlist:\n  - x\n  - y: 2\n", &env).unwrap();
        assert_eq!(doc.position("a.b"), Some(Position { line: 2, column: 3 }));
        assert_eq!(
            doc.position("list[1].y"),
            Some(Position { line: 5, column: 5 })
        );
        // Unknown children fall back to the nearest ancestor.
        assert_eq!(doc.position("a.b.c"), Some(Position { line: 2, column: 3 }));
    }

    #[test]
    fn substitutes_environment_and_types_whole_references() {
        let doc = Document::parse(
            "s: \"k-${SECRET}\"\nt: ${THREADS}\nq: \"${THREADS}\"\n",
            &env,
        )
        .unwrap();
        assert_eq!(doc.root["s"], "k-hunter2");
        assert_eq!(doc.root["t"], 4);
        assert_eq!(doc.root["q"], "4");
        assert!(doc.is_from_env("s"));
        assert!(!doc.is_from_env("x"));
    }

    #[test]
    fn unset_variables_are_all_reported_with_their_place() {
        let errors = Document::parse("a: ${NOPE}\nb:\n  - ${ALSO_NOPE}\n", &env)
            .err()
            .unwrap();
        assert_eq!(errors.len(), 2);
        assert_eq!(errors[0].path, "a");
        assert!(errors[0].message.contains("NOPE is not set"));
        assert_eq!(errors[1].path, "b[0]");
        assert_eq!(errors[1].position, Some(Position { line: 3, column: 5 }));
    }

    #[test]
    fn syntax_errors_and_duplicate_keys_have_a_line() {
        let e = Document::parse("a: [1, 2\n", &env).err().unwrap();
        assert!(e[0].message.starts_with("YAML syntax error"));
        assert!(e[0].position.is_some());
        let e = Document::parse("a: 1\na: 2\n", &env).err().unwrap();
        assert!(e[0].message.contains("duplicated key"));
        assert_eq!(e[0].position.map(|p| p.line), Some(2));
    }
}
