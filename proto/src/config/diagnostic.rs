//! Config problems with their position in the file.

use std::fmt;

/// One problem in a config file: where it is (1-based line and column), which key, and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: String,
    pub line: u32,
    pub column: u32,
    /// The key path, e.g. `routes[1].upstream`; empty when the parser cannot tell.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

impl From<&Diagnostic> for crate::v1::Diagnostic {
    fn from(d: &Diagnostic) -> Self {
        crate::v1::Diagnostic {
            file: d.file.clone(),
            line: d.line,
            column: d.column,
            key: d.key.clone(),
            message: d.message.clone(),
        }
    }
}

impl From<crate::v1::Diagnostic> for Diagnostic {
    fn from(d: crate::v1::Diagnostic) -> Self {
        Diagnostic {
            file: d.file,
            line: d.line,
            column: d.column,
            key: d.key,
            message: d.message,
        }
    }
}

/// Every problem found in one file, in file order.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// Maps byte offsets in a source text to 1-based line and column (in characters).
pub(crate) struct Positions<'a> {
    name: &'a str,
    text: &'a str,
    line_starts: Vec<usize>,
}

impl<'a> Positions<'a> {
    pub(crate) fn new(name: &'a str, text: &'a str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Self {
            name,
            text,
            line_starts,
        }
    }

    pub(crate) fn line_col(&self, offset: usize) -> (u32, u32) {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&s| s <= offset).max(1) - 1;
        let start = self.line_starts[line];
        let col = self
            .text
            .get(start..offset)
            .map_or(offset - start, |s| s.chars().count());
        (line as u32 + 1, col as u32 + 1)
    }

    pub(crate) fn diagnostic(&self, offset: usize, key: &str, message: String) -> Diagnostic {
        let (line, column) = self.line_col(offset);
        Diagnostic {
            file: self.name.to_string(),
            line,
            column,
            key: key.to_string(),
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_is_one_based() {
        let p = Positions::new("f", "ab\ncd\n\né");
        assert_eq!(p.line_col(0), (1, 1));
        assert_eq!(p.line_col(1), (1, 2));
        assert_eq!(p.line_col(3), (2, 1));
        assert_eq!(p.line_col(4), (2, 2));
        assert_eq!(p.line_col(7), (4, 1));
        assert_eq!(p.line_col(1000), (4, 2));
    }
}
