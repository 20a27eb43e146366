//! containerd's filter language, as used by `List` (Walk):
//! `kind==committed,labels."containerd.io/snapshot.ref"==sha256:…`.
//!
//! A filter is selectors joined by `,` (all must match); a list of filters
//! matches when any filter does. A selector is a field path, optionally
//! followed by `==`, `!=` or `~=` (regular expression) and a value. Path
//! segments and values may be quoted with `"`, `/` or `|`.

use regex::Regex;

#[derive(Debug)]
enum Operator {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

#[derive(Debug)]
struct Selector {
    path: Vec<String>,
    operator: Operator,
}

/// Any of several filters (an empty list matches everything).
#[derive(Debug, Default)]
pub struct Filters {
    any: Vec<Vec<Selector>>,
}

impl Filters {
    pub fn parse<S: AsRef<str>>(filters: &[S]) -> Result<Self, String> {
        let mut any = Vec::new();
        for filter in filters {
            let filter = filter.as_ref();
            if filter.trim().is_empty() {
                // An empty filter matches everything.
                return Ok(Self::default());
            }
            any.push(parse_filter(filter).map_err(|e| format!("filter {filter:?}: {e}"))?);
        }
        Ok(Self { any })
    }

    /// Whether the object whose fields `field` looks up matches.
    pub fn matches(&self, field: impl Fn(&[String]) -> Option<String>) -> bool {
        self.any.is_empty()
            || self.any.iter().any(|all| {
                all.iter().all(|selector| {
                    let value = field(&selector.path);
                    match &selector.operator {
                        Operator::Present => value.is_some(),
                        Operator::Equal(v) => value.as_deref() == Some(v.as_str()),
                        Operator::NotEqual(v) => value.as_deref().unwrap_or("") != v,
                        Operator::Matches(re) => re.is_match(value.as_deref().unwrap_or("")),
                    }
                })
            })
    }
}

struct Scanner<'a> {
    input: &'a str,
    pos: usize,
}

impl Scanner<'_> {
    fn peek(&self) -> Option<char> {
        self.input[self.pos..].chars().next()
    }

    fn rest(&self) -> &str {
        &self.input[self.pos..]
    }

    fn skip_spaces(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    /// A quoted string starting at the current position.
    fn quoted(&mut self) -> Result<String, String> {
        let quote = self.peek().expect("caller checked");
        self.pos += 1;
        let mut out = String::new();
        loop {
            let Some(c) = self.peek() else {
                return Err("unterminated quoted string".into());
            };
            self.pos += c.len_utf8();
            match c {
                c if c == quote => return Ok(out),
                '\\' => {
                    let Some(next) = self.peek() else {
                        return Err("unterminated escape".into());
                    };
                    self.pos += next.len_utf8();
                    out.push(match next {
                        'n' => '\n',
                        't' => '\t',
                        'r' => '\r',
                        other => other,
                    });
                }
                c => out.push(c),
            }
        }
    }

    fn field(&mut self) -> Result<String, String> {
        match self.peek() {
            Some('"' | '/' | '|') => self.quoted(),
            _ => {
                let start = self.pos;
                while self
                    .peek()
                    .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '-')
                {
                    self.pos += 1;
                }
                if start == self.pos {
                    return Err(format!("expected a field name at {:?}", self.rest()));
                }
                Ok(self.input[start..self.pos].to_owned())
            }
        }
    }

    fn value(&mut self) -> Result<String, String> {
        self.skip_spaces();
        match self.peek() {
            Some('"' | '/' | '|') => self.quoted(),
            _ => {
                let end = self
                    .rest()
                    .find(',')
                    .map_or(self.input.len(), |i| self.pos + i);
                let value = self.input[self.pos..end].trim_end().to_owned();
                self.pos = end;
                if value.is_empty() {
                    return Err("expected a value".into());
                }
                Ok(value)
            }
        }
    }
}

fn parse_filter(filter: &str) -> Result<Vec<Selector>, String> {
    let mut s = Scanner {
        input: filter,
        pos: 0,
    };
    let mut selectors = Vec::new();
    loop {
        s.skip_spaces();
        let mut path = vec![s.field()?];
        while s.peek() == Some('.') {
            s.pos += 1;
            path.push(s.field()?);
        }
        s.skip_spaces();
        let operator = if s.rest().starts_with("==") {
            s.pos += 2;
            Operator::Equal(s.value()?)
        } else if s.rest().starts_with("!=") {
            s.pos += 2;
            Operator::NotEqual(s.value()?)
        } else if s.rest().starts_with("~=") {
            s.pos += 2;
            let pattern = s.value()?;
            Operator::Matches(Regex::new(&pattern).map_err(|e| e.to_string())?)
        } else {
            Operator::Present
        };
        selectors.push(Selector { path, operator });
        s.skip_spaces();
        match s.peek() {
            None => return Ok(selectors),
            Some(',') => s.pos += 1,
            Some(_) => return Err(format!("unexpected {:?}", s.rest())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn info<'a>(
        name: &'a str,
        kind: &'a str,
        labels: &'a BTreeMap<String, String>,
    ) -> impl Fn(&[String]) -> Option<String> + 'a {
        move |path: &[String]| match path.first().map(String::as_str) {
            Some("name") => Some(name.to_owned()),
            Some("kind") => Some(kind.to_owned()),
            Some("parent") => Some(String::new()),
            Some("labels") => labels.get(&path[1..].join(".")).cloned(),
            _ => None,
        }
    }

    #[test]
    fn containerd_filters_match_as_containerd_does() {
        let labels: BTreeMap<String, String> = [
            (
                "containerd.io/snapshot.ref".to_owned(),
                "sha256:abc".to_owned(),
            ),
            ("l".to_owned(), "2".to_owned()),
        ]
        .into();
        let f = |filters: &[&str]| {
            Filters::parse(filters)
                .unwrap()
                .matches(info("a-wl", "committed", &labels))
        };
        assert!(f(&[]));
        assert!(f(&[
            "labels.\"containerd.io/snapshot.ref\"==sha256:abc,parent==\"\""
        ]));
        assert!(!f(&["labels.\"containerd.io/snapshot.ref\"==sha256:abd"]));
        assert!(f(&["kind==committed,labels.l"]));
        assert!(!f(&["kind==active,labels.l"]));
        assert!(f(&["name==p", "name==a-wl"]));
        assert!(f(&["labels.l==2"]));
        assert!(!f(&["labels.missing"]));
        assert!(f(&["parent!=x"]));
        assert!(!f(&["parent!=\"\""]));
        assert!(f(&["name~=/^a-/"]));
        assert!(!f(&["name~=^b"]));
    }

    #[test]
    fn malformed_filters_are_rejected_with_the_filter_named() {
        for bad in [
            "kind==",
            "labels.\"open",
            "==x",
            "name~=(",
            "kind==a extra,",
        ] {
            let err = Filters::parse(&[bad]).unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }
}
