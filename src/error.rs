//! Error chains as one line of text, for places that keep text rather than the error: error rows in the
//! output, JSON events, worker replies. Every module's error enum keeps its cause as a typed `source`, never in
//! its own message, so each cause appears once.
//!
//! Storage errors carry the server's response body in their message (object_store puts it there), and an S3 or
//! Azure authentication error body holds the request as signed (`<CanonicalRequest>`, `<StringToSign>`: header
//! values such as a session token). Every chain is therefore passed through [`redact`], which keeps only such a
//! body's `Code` and `Message`.

use std::borrow::Cow;
use std::error::Error;

/// Whether a failure is worth another attempt, decided from the error's type, never from its text. Every module
/// boundary that can fail for a passing reason answers it for its own error: the source's fetch (storage
/// unavailable after its retries), the renderer (crash, timeout), the model (an ONNX Runtime run), the output's
/// storage and its committed files. A retryable failure of a document becomes a `retry` row (attempts counted);
/// a permanent one an `error` row, recorded once.
pub trait Retryable {
    fn is_retryable(&self) -> bool;
}

/// `error: cause: cause of the cause ...`, each message once, storage response bodies reduced by [`redact`].
pub fn chain(e: &(dyn Error + 'static)) -> String {
    let mut out = redact(&e.to_string()).into_owned();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = redact(&cause.to_string()).into_owned();
        // A wrapper that repeats its cause (`#[error(transparent)]`-like) adds nothing.
        if !text.is_empty() && !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

/// The text with every XML error body (`<?xml ...?><Error>...</Error>`, as S3, GCS's XML API and Azure answer)
/// replaced by its `Code: Message`; the rest of the body (signed request, string to sign, request ids) is
/// dropped. Text without such a body is returned as it is.
pub fn redact(text: &str) -> Cow<'_, str> {
    let start_of = |t: &str| {
        [t.find("<?xml"), t.find("<Error>"), t.find("<Error ")]
            .into_iter()
            .flatten()
            .min()
    };
    let Some(mut start) = start_of(text) else {
        return Cow::Borrowed(text);
    };
    let mut out = String::with_capacity(text.len().min(512));
    let mut rest = text;
    loop {
        out.push_str(&rest[..start]);
        let body = &rest[start..];
        let end = body
            .find("</Error>")
            .map(|i| i + "</Error>".len())
            .unwrap_or(body.len());
        out.push_str(
            xml_error_summary(&body[..end])
                .as_deref()
                .unwrap_or("(response body withheld)"),
        );
        rest = &body[end..];
        match start_of(rest) {
            Some(s) => start = s,
            None => {
                out.push_str(rest);
                return Cow::Owned(out);
            }
        }
    }
}

/// An XML error body's `Code: Message` (or whichever of the two it has); None when it has neither.
pub fn xml_error_summary(body: &str) -> Option<String> {
    let element = |name: &str| {
        let open = format!("<{name}>");
        let close = format!("</{name}>");
        let from = body.find(&open)? + open.len();
        let to = body[from..].find(&close)? + from;
        Some(body[from..to].trim().to_string())
    };
    match (element("Code"), element("Message")) {
        (Some(code), Some(message)) => Some(format!("{code}: {message}")),
        (Some(code), None) => Some(code),
        (None, Some(message)) => Some(message),
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::{chain, redact};

    #[test]
    fn storage_error_bodies_keep_only_code_and_message() {
        // As S3 answers a bad signature (shortened): the canonical request holds the session token's value.
        let body = "Server returned non-2xx status code: 403 Forbidden: <?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
            <Error><Code>SignatureDoesNotMatch</Code><Message>The request signature we calculated does not match \
            the signature you provided.</Message><AWSAccessKeyId>AKIAEXAMPLE</AWSAccessKeyId><StringToSign>\
            AWS4-HMAC-SHA256 20261203T000000Z</StringToSign><CanonicalRequest>GET /lake/in/a.pdf\n\
            x-amz-security-token:FQoGZXIvYXdzEXAMPLESESSIONTOKEN\n</CanonicalRequest>\
            <RequestId>4442587FB7D0A2F9</RequestId></Error>";
        let e = Outer(std::io::Error::other(body));
        let text = chain(&e);
        assert_eq!(
            text,
            "outer: Server returned non-2xx status code: 403 Forbidden: SignatureDoesNotMatch: The request \
             signature we calculated does not match the signature you provided."
        );
        for secret in [
            "SESSIONTOKEN",
            "AKIAEXAMPLE",
            "StringToSign",
            "4442587FB7D0A2F9",
        ] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        // Azure's body names its element differently; an unterminated body is cut too.
        assert_eq!(
            redact(
                "x: <Error><Code>AuthenticationFailed</Code><AuthenticationErrorDetail>string to sign"
            ),
            "x: AuthenticationFailed"
        );
        assert_eq!(redact("no body here"), "no body here");
        assert_eq!(
            redact("a <Error><Code>SlowDown</Code></Error> then <Error>?</Error> end"),
            "a SlowDown then (response body withheld) end"
        );
    }

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn chain_joins_every_cause_once() {
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(chain(&e), "outer: inner");
    }
}
