//! Error chains as one line of text, for places that keep text rather than the error: error rows in the
//! output, JSON events, worker replies. Every module's error enum keeps its cause as a typed `source`, never in
//! its own message, so each cause appears once.

use std::error::Error;

/// `error: cause: cause of the cause ...`, each message once.
pub fn chain(e: &(dyn Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        // A wrapper that repeats its cause (`#[error(transparent)]`-like) adds nothing.
        if !text.is_empty() && !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::chain;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn chain_joins_every_cause_once() {
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(chain(&e), "outer: inner");
    }
}
