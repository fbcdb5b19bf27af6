//! One page's text folded for searching (lowercase, whitespace runs as one space, dashes and quotes unified), with
//! every folded character pointing back at the page character it came from, so a match becomes a box.

use crate::raster::text::{Location, TextLayer};

/// A match on a page: the page characters `first..=last`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Span {
    pub first: usize,
    pub last: usize,
}

pub struct PageText<'a> {
    /// 1-based page number in the document.
    pub page: u32,
    pub layer: &'a TextLayer,
    /// Folded text and, per folded character, the index of its page character.
    folded: Vec<char>,
    origin: Vec<usize>,
    /// The folded text without spaces, for values printed with other spacing than the answer's.
    dense: Vec<char>,
    dense_origin: Vec<usize>,
}

/// The folded form of one character (lowercase; typographic variants as their plain forms).
pub fn fold_char(c: char, out: &mut Vec<char>) {
    match c {
        '\u{2010}'..='\u{2015}' | '\u{2212}' => out.push('-'),
        '\u{2018}' | '\u{2019}' | '\u{201b}' | '`' => out.push('\''),
        '\u{201c}' | '\u{201d}' => out.push('"'),
        c if c.is_whitespace() => out.push(' '),
        c => out.extend(c.to_lowercase()),
    }
}

/// `text` folded as a page is (whitespace runs as one space, trimmed).
pub fn fold(text: &str) -> Vec<char> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        let at = out.len();
        fold_char(c, &mut out);
        if out.get(at) == Some(&' ') && (at == 0 || out[at - 1] == ' ') {
            out.truncate(at);
        }
    }
    while out.last() == Some(&' ') {
        out.pop();
    }
    out
}

impl<'a> PageText<'a> {
    pub fn new(page: u32, layer: &'a TextLayer) -> PageText<'a> {
        let (mut folded, mut origin) = (Vec::new(), Vec::new());
        let mut buf = Vec::new();
        for (i, c) in layer.chars.iter().enumerate() {
            buf.clear();
            fold_char(c.ch, &mut buf);
            for &f in &buf {
                if f == ' ' && folded.last().is_none_or(|&l| l == ' ') {
                    continue;
                }
                folded.push(f);
                origin.push(i);
            }
        }
        let (dense, dense_origin) = folded
            .iter()
            .zip(&origin)
            .filter(|(c, _)| **c != ' ')
            .map(|(c, o)| (*c, *o))
            .unzip();
        PageText {
            page,
            layer,
            folded,
            origin,
            dense,
            dense_origin,
        }
    }

    /// Every place `needle` (folded) occurs. Spacing may differ from the page's (`"1 234,50"` as `"1234,50"`,
    /// a name across two runs); with `whole_word`, a match may not continue a word or number on either side.
    pub fn find(&self, needle: &[char], whole_word: bool) -> Vec<Span> {
        let needle: Vec<char> = needle.iter().copied().filter(|c| *c != ' ').collect();
        if needle.is_empty() || needle.len() > self.dense.len() {
            return Vec::new();
        }
        let mut out = Vec::new();
        for start in 0..=self.dense.len() - needle.len() {
            if self.dense[start..start + needle.len()] == needle[..] {
                let span = Span {
                    first: self.dense_origin[start],
                    last: self.dense_origin[start + needle.len() - 1],
                };
                if !whole_word || self.stands_alone(span) {
                    out.push(span);
                }
            }
        }
        out
    }

    /// Approximate occurrences of `needle`: at most `max_edits` insertions, deletions or substitutions (folded,
    /// spaces kept). The best end of each run of matching ends is kept, with the start that gives its distance.
    pub fn find_fuzzy(&self, needle: &[char], max_edits: usize) -> Vec<(Span, usize)> {
        let (m, text) = (needle.len(), &self.folded);
        if m == 0 || text.is_empty() {
            return Vec::new();
        }
        // Sellers: column j of the edit distance of the needle against text ending at j, any start.
        let mut prev: Vec<usize> = (0..=m).collect();
        let mut ends: Vec<(usize, usize)> = Vec::new();
        for (j, &tc) in text.iter().enumerate() {
            let mut cur = vec![0; m + 1];
            for i in 1..=m {
                let sub = prev[i - 1] + usize::from(needle[i - 1] != tc);
                cur[i] = sub.min(prev[i] + 1).min(cur[i - 1] + 1);
            }
            if cur[m] <= max_edits {
                ends.push((j, cur[m]));
            }
            prev = cur;
        }
        let mut out: Vec<(Span, usize)> = Vec::new();
        let mut i = 0;
        while i < ends.len() {
            // A run of consecutive ends is one occurrence: take its best end.
            let mut best = ends[i];
            let mut k = i + 1;
            while k < ends.len() && ends[k].0 == ends[k - 1].0 + 1 {
                if ends[k].1 < best.1 {
                    best = ends[k];
                }
                k += 1;
            }
            if let Some(start) = self.best_start(needle, best.0, best.1) {
                out.push((
                    Span {
                        first: self.origin[start],
                        last: self.origin[best.0],
                    },
                    best.1,
                ));
            }
            i = k;
        }
        out
    }

    /// The start of the text ending at `end` whose edit distance to `needle` is `dist`.
    fn best_start(&self, needle: &[char], end: usize, dist: usize) -> Option<usize> {
        let m = needle.len();
        let lo = (end + 1).saturating_sub(m + dist);
        let hi = (end + 1).saturating_sub(m.saturating_sub(dist)).min(end);
        (lo..=hi).find(|&s| levenshtein(needle, &self.folded[s..=end]) == dist)
    }

    /// The span does not continue a word or number: the page characters around it are not letters or digits.
    pub fn stands_alone(&self, span: Span) -> bool {
        let chars = &self.layer.chars;
        let before = span.first.checked_sub(1).and_then(|i| chars.get(i));
        let after = chars.get(span.last + 1);
        let joins = |c: Option<&crate::raster::text::TextChar>,
                     edge: Option<&crate::raster::text::TextChar>| {
            match (c, edge) {
                (Some(c), Some(e)) => c.ch.is_alphanumeric() && e.ch.is_alphanumeric(),
                _ => false,
            }
        };
        !joins(before, chars.get(span.first)) && !joins(after, chars.get(span.last))
    }

    /// The page characters of a span as printed.
    pub fn text_of(&self, span: Span) -> String {
        self.layer.chars[span.first..=span.last]
            .iter()
            .map(|c| c.ch)
            .collect()
    }

    /// The union box of the span's characters that have one.
    pub fn location(&self, span: Span) -> Option<Location> {
        let mut b = [
            f32::INFINITY,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NEG_INFINITY,
        ];
        for c in self.layer.chars[span.first..=span.last]
            .iter()
            .filter(|c| c.has_box())
        {
            b = [
                b[0].min(c.bbox[0]),
                b[1].min(c.bbox[1]),
                b[2].max(c.bbox[2]),
                b[3].max(c.bbox[3]),
            ];
        }
        (b[0] <= b[2]).then_some(Location {
            page: self.page,
            bbox: Some(b),
        })
    }

    /// Runs of digits and number separators on the page (`1,234.50`, `1 234,50`, `4.00`): each with its span.
    /// A separator counts only between digits; a space only before a group of exactly three digits.
    pub fn number_tokens(&self) -> Vec<(String, Span)> {
        let chars = &self.layer.chars;
        let mut out = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            if !chars[i].ch.is_ascii_digit()
                || (i > 0 && (chars[i - 1].ch.is_ascii_digit() || chars[i - 1].ch.is_alphabetic()))
            {
                i += 1;
                continue;
            }
            let start = i;
            let mut token = String::new();
            let mut end = i;
            while end < chars.len() {
                let c = chars[end].ch;
                if c.is_ascii_digit() {
                    token.push(c);
                    end += 1;
                    continue;
                }
                let next_digits = chars[end + 1..]
                    .iter()
                    .take_while(|c| c.ch.is_ascii_digit())
                    .count();
                let ok = super::notation::is_number_separator(c)
                    && next_digits > 0
                    && (!c.is_whitespace()
                        || (next_digits == 3
                            && token
                                .rsplit(|c: char| !c.is_ascii_digit())
                                .next()
                                .is_some_and(|g| g.len() <= 3)));
                if !ok {
                    break;
                }
                token.push(if c.is_whitespace() { ' ' } else { c });
                end += 1;
            }
            // A space may group thousands ("12 345,60") or part two numbers ("12 115,50": a quantity and a
            // price): both readings are offered, the whole run and each part.
            if token.contains(' ') {
                let mut at = start;
                for piece in token.split(' ') {
                    let n = piece.chars().count();
                    out.push((
                        piece.to_string(),
                        Span {
                            first: at,
                            last: at + n - 1,
                        },
                    ));
                    at += n + 1;
                }
            }
            out.push((
                token,
                Span {
                    first: start,
                    last: end - 1,
                },
            ));
            i = end;
        }
        out
    }
}

fn levenshtein(a: &[char], b: &[char]) -> usize {
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, &ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}
