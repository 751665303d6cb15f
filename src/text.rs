//! Text from outside (names from the store, a tar, a registry, a layer tree; ids; paths) made
//! safe to print: one line, no control characters, nothing that makes a terminal show other
//! than what is there. Every name cachefs prints goes through here.

use std::borrow::Cow;
use std::path::Path;

/// Whether `c` could break a line or make text on a terminal look other than it is: control
/// characters, line and paragraph separators, zero-width and bidirectional formatting marks.
pub fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}'
        )
}

/// User text (an id, a command, a path) made safe to print on one line. Text that needs no
/// escaping is returned as is; other text is shown quoted with Rust's escapes (`"a\nb"`), so
/// an escaped form can always be told from text that merely contains a backslash.
pub fn one_line(s: &str) -> Cow<'_, str> {
    if s.chars().any(needs_escape) {
        Cow::Owned(format!("{s:?}"))
    } else {
        Cow::Borrowed(s)
    }
}

/// [`one_line`] for a path (a non-UTF-8 byte shows as U+FFFD).
pub fn path_line(p: &Path) -> String {
    one_line(&p.to_string_lossy()).into_owned()
}

/// [`one_line`] for raw name bytes (a tree entry, a tar member). Bytes that are not UTF-8
/// make the name quoted too, each shown as `\xNN`: two different names never look the same.
pub fn bytes_line(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) => one_line(s).into_owned(),
        Err(_) => quoted(b),
    }
}

/// Raw name bytes always quoted and escaped (`"a\nb"`, `"\xff"`), for messages that quote
/// the name.
pub fn quoted(b: &[u8]) -> String {
    let mut out = String::with_capacity(b.len() + 2);
    out.push('"');
    for chunk in b.utf8_chunks() {
        for c in chunk.valid().chars() {
            if needs_escape(c) || c == '"' || c == '\\' {
                out.extend(c.escape_debug());
            } else {
                out.push(c);
            }
        }
        for x in chunk.invalid() {
            out.push_str(&format!("\\x{x:02x}"));
        }
    }
    out.push('"');
    out
}

/// The longest name or path a message shows whole; longer ones lose their middle.
pub const SHOWN_MAX: usize = 200;

/// `s` with its middle cut out (`…`) when it is over `max` characters: both ends of a long
/// path say more than either alone.
pub fn cut_middle(s: &str, max: usize) -> Cow<'_, str> {
    let n = s.chars().count();
    if n <= max {
        return Cow::Borrowed(s);
    }
    let keep = max.saturating_sub(1);
    let head = keep / 2;
    let tail = keep - head;
    let mut out: String = s.chars().take(head).collect();
    out.push('…');
    out.extend(s.chars().skip(n - tail));
    Cow::Owned(out)
}

/// A path for an error message: escaped onto one line and at most [`SHOWN_MAX`] characters.
pub fn path_short(p: &Path) -> String {
    cut_middle(&path_line(p), SHOWN_MAX).into_owned()
}

/// Raw name bytes for an error message: quoted, escaped, at most [`SHOWN_MAX`] characters
/// (a cut may fall inside an escape; what is shown stays free of control characters).
pub fn quoted_short(b: &[u8]) -> String {
    cut_middle(&quoted(b), SHOWN_MAX).into_owned()
}

/// A whole message from elsewhere (another crate's error, a server's reply) made one line:
/// control characters are escaped where they stand, the rest is kept.
pub fn escape_controls(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if needs_escape(c) {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_cuts() {
        assert_eq!(one_line("plain"), "plain");
        assert_eq!(one_line("a\nb"), "\"a\\nb\"");
        assert_eq!(bytes_line(b"\x1b[2Jx"), "\"\\u{1b}[2Jx\"");
        assert_eq!(bytes_line(b"\xff\xfe-x\n"), "\"\\xff\\xfe-x\\n\"");
        assert_eq!(bytes_line("é".as_bytes()), "é");
        assert_eq!(quoted(b"a\"b\\"), "\"a\\\"b\\\\\"");
        assert_eq!(escape_controls("x\x1b[31my\n"), "x\\u{1b}[31my\\n");
        let long = "a/".repeat(3000);
        let cut = cut_middle(&long, 50);
        assert_eq!(cut.chars().count(), 50);
        assert!(cut.contains('…'));
        let q = quoted_short(long.as_bytes());
        assert!(q.chars().count() <= SHOWN_MAX, "{q}");
        assert!(q.starts_with("\"a/") && q.ends_with("a/\""), "{q}");
        let q = quoted_short(&[b'\n'; 5000]);
        assert!(!q.contains('\n') && q.chars().count() <= SHOWN_MAX, "{q}");
    }
}
