//! The model's JSON answer, parsed with the byte span of every value (for per-field confidence) and the exact
//! text of every number (for decimals).

use serde_json::Value;

use crate::raster::text::Location;

/// A parsed JSON value with the byte range `[start, end)` of its text in the answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub value: NodeValue,
    pub start: usize,
    pub end: usize,
    /// (min, mean) probability of the tokens that produced this value; set by [`Node::attach_confidence`].
    pub confidence: Option<(f32, f32)>,
    /// Where the value is printed (its page, and its box when the text layer holds it): set by grounding
    /// ([`super::ground`]).
    pub location: Option<Location>,
    /// Whether the pages' text layer holds the value; None where it cannot say (no text layer, a derived field).
    pub grounded: Option<bool>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum NodeValue {
    Null,
    Bool(bool),
    /// The number exactly as written.
    Number(String),
    String(String),
    Array(Vec<Node>),
    /// Members in written order.
    Object(Vec<(String, Node)>),
}

impl Node {
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            NodeValue::Object(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self.value, NodeValue::Null)
    }

    /// As a `serde_json::Value` (numbers through serde_json's own parser).
    pub fn to_value(&self) -> Value {
        match &self.value {
            NodeValue::Null => Value::Null,
            NodeValue::Bool(b) => Value::Bool(*b),
            NodeValue::Number(n) => serde_json::from_str(n).unwrap_or(Value::Null),
            NodeValue::String(s) => Value::String(s.clone()),
            NodeValue::Array(a) => Value::Array(a.iter().map(Node::to_value).collect()),
            NodeValue::Object(m) => {
                Value::Object(m.iter().map(|(k, v)| (k.clone(), v.to_value())).collect())
            }
        }
    }

    /// Sets every node's confidence from the tokens overlapping its text. `token_ends[i]` is the byte offset where
    /// token `i` ends in the answer (token `i` covers `token_ends[i-1]..token_ends[i]`), `probs[i]` its probability.
    /// A string's own quotes do not count unless the string is empty.
    pub fn attach_confidence(&mut self, token_ends: &[usize], probs: &[f32]) {
        let (s, e) = match &self.value {
            NodeValue::String(_) if self.end - self.start > 2 => (self.start + 1, self.end - 1),
            _ => (self.start, self.end),
        };
        self.confidence = span_confidence(s, e, token_ends, probs);
        match &mut self.value {
            NodeValue::Array(a) => a
                .iter_mut()
                .for_each(|n| n.attach_confidence(token_ends, probs)),
            NodeValue::Object(m) => m
                .iter_mut()
                .for_each(|(_, n)| n.attach_confidence(token_ends, probs)),
            _ => {}
        }
    }
}

/// (min, mean) of the probabilities of tokens overlapping `[start, end)`.
pub fn span_confidence(
    start: usize,
    end: usize,
    token_ends: &[usize],
    probs: &[f32],
) -> Option<(f32, f32)> {
    let mut min = f32::INFINITY;
    let mut sum = 0f64;
    let mut n = 0usize;
    let mut prev = 0usize;
    for (i, &te) in token_ends.iter().enumerate() {
        let ts = prev;
        prev = te;
        if te <= start || ts >= end || te == ts {
            continue;
        }
        let p = probs.get(i).copied().unwrap_or(0.0);
        min = min.min(p);
        sum += f64::from(p);
        n += 1;
    }
    (n > 0).then(|| (min, (sum / n as f64) as f32))
}

/// Parses one JSON value that must span the whole text (surrounding whitespace allowed).
pub fn parse(text: &str) -> Result<Node, String> {
    let mut p = Parser {
        b: text.as_bytes(),
        text,
        i: 0,
        depth: 0,
    };
    p.ws();
    let n = p.value()?;
    p.ws();
    if p.i != p.b.len() {
        return Err(format!(
            "unexpected text after the JSON value at byte {}",
            p.i
        ));
    }
    Ok(n)
}

struct Parser<'a> {
    b: &'a [u8],
    text: &'a str,
    i: usize,
    depth: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.b.len() && matches!(self.b[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    fn err<T>(&self, what: &str) -> Result<T, String> {
        if self.i >= self.b.len() {
            Err(format!("answer ends early: {what}"))
        } else {
            Err(format!("{what} at byte {}", self.i))
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.b.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn value(&mut self) -> Result<Node, String> {
        self.depth += 1;
        if self.depth > 64 {
            return self.err("nesting deeper than 64");
        }
        let start = self.i;
        let value = match self.b.get(self.i) {
            Some(b'{') => {
                self.i += 1;
                let mut members = Vec::new();
                self.ws();
                if !self.eat(b'}') {
                    loop {
                        self.ws();
                        if self.b.get(self.i) != Some(&b'"') {
                            return self.err("expected a key");
                        }
                        let key = self.string()?;
                        self.ws();
                        if !self.eat(b':') {
                            return self.err("expected ':'");
                        }
                        self.ws();
                        let v = self.value()?;
                        members.push((key, v));
                        self.ws();
                        if self.eat(b',') {
                            continue;
                        }
                        if self.eat(b'}') {
                            break;
                        }
                        return self.err("expected ',' or '}'");
                    }
                }
                NodeValue::Object(members)
            }
            Some(b'[') => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if !self.eat(b']') {
                    loop {
                        self.ws();
                        items.push(self.value()?);
                        self.ws();
                        if self.eat(b',') {
                            continue;
                        }
                        if self.eat(b']') {
                            break;
                        }
                        return self.err("expected ',' or ']'");
                    }
                }
                NodeValue::Array(items)
            }
            Some(b'"') => NodeValue::String(self.string()?),
            Some(b't') if self.b[self.i..].starts_with(b"true") => {
                self.i += 4;
                NodeValue::Bool(true)
            }
            Some(b'f') if self.b[self.i..].starts_with(b"false") => {
                self.i += 5;
                NodeValue::Bool(false)
            }
            Some(b'n') if self.b[self.i..].starts_with(b"null") => {
                self.i += 4;
                NodeValue::Null
            }
            Some(b'-' | b'0'..=b'9') => {
                while self.i < self.b.len()
                    && matches!(
                        self.b[self.i],
                        b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'
                    )
                {
                    self.i += 1;
                }
                let n = &self.text[start..self.i];
                if serde_json::from_str::<serde_json::Number>(n).is_err() {
                    return Err(format!("invalid number {n:?} at byte {start}"));
                }
                NodeValue::Number(n.to_string())
            }
            _ => return self.err("expected a JSON value"),
        };
        self.depth -= 1;
        Ok(Node {
            value,
            start,
            end: self.i,
            confidence: None,
            location: None,
            grounded: None,
        })
    }

    /// A string starting at the current `"`, unescaped.
    fn string(&mut self) -> Result<String, String> {
        let start = self.i;
        self.i += 1;
        let mut out = String::new();
        loop {
            let Some(&c) = self.b.get(self.i) else {
                return self.err("unterminated string");
            };
            match c {
                b'"' => {
                    self.i += 1;
                    return Ok(out);
                }
                b'\\' => {
                    let Some(&e) = self.b.get(self.i + 1) else {
                        return self.err("unterminated escape");
                    };
                    self.i += 2;
                    match e {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let hi = self.hex4()?;
                            let cp = if (0xD800..0xDC00).contains(&hi) {
                                if !(self.eat(b'\\') && self.eat(b'u')) {
                                    return self.err("lone high surrogate");
                                }
                                let lo = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&lo) {
                                    return self.err("invalid low surrogate");
                                }
                                0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                            } else {
                                hi
                            };
                            match char::from_u32(cp) {
                                Some(ch) => out.push(ch),
                                None => return self.err("invalid \\u escape"),
                            }
                        }
                        _ => return self.err("invalid escape"),
                    }
                }
                0..=0x1f => return self.err("control character in string"),
                _ => {
                    // Copy one UTF-8 character.
                    let rest = &self.text[self.i..];
                    let Some(ch) = rest.chars().next() else {
                        return self.err("invalid UTF-8");
                    };
                    out.push(ch);
                    self.i += ch.len_utf8();
                }
            }
            if self.i - start > 1 << 24 {
                return self.err("string too long");
            }
        }
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let h = self
            .text
            .get(self.i..self.i + 4)
            .and_then(|h| u32::from_str_radix(h, 16).ok());
        match h {
            Some(v) => {
                self.i += 4;
                Ok(v)
            }
            None => self.err("invalid \\u escape"),
        }
    }
}
