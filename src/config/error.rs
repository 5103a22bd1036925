//! Configuration errors: each names its YAML path and, when the parser knows
//! it, the line and column, and says in plain words what is wrong.

use std::fmt;

/// A 1-based line and column in the configuration file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

/// One problem found in the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// YAML path such as `routes[2].upstream`; empty for the document itself.
    pub path: String,
    pub position: Option<Position>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = if self.path.is_empty() {
            "(document)"
        } else {
            &self.path
        };
        match self.position {
            Some(p) => write!(
                f,
                "{path} (line {}, column {}): {}",
                p.line, p.column, self.message
            ),
            None => write!(f, "{path}: {}", self.message),
        }
    }
}

/// Every problem found in one configuration file, in file order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn push(&mut self, error: ConfigError) {
        self.0.push(error);
    }

    pub fn iter(&self) -> impl Iterator<Item = &ConfigError> {
        self.0.iter()
    }

    /// Sorts by position so the report reads top to bottom; errors without a
    /// position keep their relative order after the located ones.
    pub fn sort(&mut self) {
        self.0.sort_by_key(|e| {
            e.position
                .map(|p| (0, p.line, p.column))
                .unwrap_or((1, 0, 0))
        });
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "error: {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(ConfigErrors),
}
