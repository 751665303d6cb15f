//! Cache ids and the directory keys derived from them.
//!
//! An id is the user's handle and may be any text (BuildKit's default id is the
//! target path, e.g. `/var/cache/apt`), so it is never used as a path. Each id maps
//! to a *key*: one safe directory name under `STORE/caches/`.

use std::fmt;
use std::str::FromStr;

/// Longest id accepted, in bytes (the design's limit; also keeps error lines short).
pub const MAX_ID_BYTES: usize = 255;

/// Longest readable slug kept at the front of a key.
const MAX_SLUG_BYTES: usize = 40;

/// Hex digits of blake3(id) appended to a key; 64 bits, and the database's UNIQUE
/// constraint on keys turns the (theoretical) collision into an error, never a shared dir.
const HASH_HEX_DIGITS: usize = 16;

/// The name of a cache: any UTF-8 string of 1 to 255 bytes without NUL.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheId(String);

/// Why a string is not a valid [`CacheId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("cache id must be 1 to 255 bytes, got 0")]
    Empty,
    #[error("cache id must be 1 to 255 bytes, got {0}")]
    TooLong(usize),
    #[error("cache id must not contain a NUL byte (at byte {0})")]
    ContainsNul(usize),
}

impl CacheId {
    pub fn new(s: &str) -> Result<CacheId, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if s.len() > MAX_ID_BYTES {
            return Err(IdError::TooLong(s.len()));
        }
        if let Some(pos) = s.bytes().position(|b| b == 0) {
            return Err(IdError::ContainsNul(pos));
        }
        Ok(CacheId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The directory name this id's instances live under in `STORE/caches/`.
    pub fn key(&self) -> String {
        key_for(&self.0)
    }
}

impl fmt::Display for CacheId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for CacheId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CacheId::new(s)
    }
}

impl AsRef<str> for CacheId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Readable slug + "-" + 16 hex digits of blake3(id).
///
/// The slug keeps ASCII alphanumerics, '-', '_' and '.', turns everything else into
/// '-', collapses runs of '-', drops leading '-'/'.' (no hidden dirs, nothing that
/// looks like an option) and trailing '-', and is cut to 40 bytes. A slug that ends up
/// empty is left out, so the key is then the hash alone. The result is one path
/// component made only of `[A-Za-z0-9._-]`, never "." or "..".
pub(crate) fn key_for(id: &str) -> String {
    let mut slug = String::with_capacity(MAX_SLUG_BYTES);
    for c in id.chars() {
        let c = if c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-' {
            c
        } else {
            '-'
        };
        if c == '-' && (slug.is_empty() || slug.ends_with('-')) {
            continue;
        }
        if c == '.' && slug.is_empty() {
            continue;
        }
        if slug.len() == MAX_SLUG_BYTES {
            break;
        }
        slug.push(c);
    }
    while slug.ends_with('-') {
        slug.pop();
    }
    let hash = blake3::hash(id.as_bytes()).to_hex();
    let hash = &hash.as_str()[..HASH_HEX_DIGITS];
    if slug.is_empty() {
        hash.to_owned()
    } else {
        format!("{slug}-{hash}")
    }
}

/// Whether `key` (read back from the database) is one safe directory name, so a
/// damaged or hand-edited database can never point an instance outside the store.
pub(crate) fn is_safe_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_SLUG_BYTES + 1 + HASH_HEX_DIGITS
        && key != "."
        && key != ".."
        && !key.starts_with('.')
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn id_limits() {
        assert_eq!(CacheId::new(""), Err(IdError::Empty));
        assert!(CacheId::new(&"a".repeat(255)).is_ok());
        assert_eq!(CacheId::new(&"a".repeat(300)), Err(IdError::TooLong(300)));
        assert_eq!(
            CacheId::new(&"a".repeat(300)).unwrap_err().to_string(),
            "cache id must be 1 to 255 bytes, got 300"
        );
        assert_eq!(CacheId::new("a\0b"), Err(IdError::ContainsNul(1)));
        // 85 three-byte chars = 255 bytes: the limit is in bytes, not chars.
        assert!(CacheId::new(&"€".repeat(85)).is_ok());
        assert_eq!(CacheId::new(&"€".repeat(86)), Err(IdError::TooLong(258)));
    }

    #[test]
    fn id_display_and_fromstr_round_trip() {
        let id: CacheId = "/var/cache/apt".parse().unwrap();
        assert_eq!(id.to_string(), "/var/cache/apt");
        assert_eq!(id.as_str(), "/var/cache/apt");
    }

    #[test]
    fn keys_are_readable_and_safe() {
        let k = key_for("/var/cache/apt");
        assert!(k.starts_with("var-cache-apt-"), "{k}");
        assert_eq!(k.len(), "var-cache-apt-".len() + 16);
        for id in [
            "..",
            ".",
            "../../etc",
            "a/../../b",
            "/",
            "-",
            "...",
            "\u{1F600}",
            "é",
        ] {
            let k = key_for(id);
            assert!(is_safe_key(&k), "{id:?} -> {k:?}");
            assert!(!k.contains('/'));
        }
        assert_eq!(key_for("..").len(), 16, "an all-dot id keeps only the hash");
        assert!(key_for("../../etc").starts_with("etc-"));
        assert!(key_for("a/../../b").starts_with("a-..-..-b-"));
        assert_eq!(key_for(&"x".repeat(255)).len(), 40 + 1 + 16);
    }

    #[test]
    fn similar_ids_get_distinct_keys() {
        let ids = ["a/b", "a-b", "a b", "a_b", "A-B", "a--b", "a/b/"];
        let keys: std::collections::HashSet<String> = ids.iter().map(|i| key_for(i)).collect();
        assert_eq!(keys.len(), ids.len());
    }

    #[test]
    fn unsafe_keys_are_rejected() {
        for k in ["", ".", "..", "../x", "a/b", ".hidden", "a\0b", "é"] {
            assert!(!is_safe_key(k), "{k:?}");
        }
    }

    proptest! {
        #[test]
        fn every_valid_id_has_a_safe_key(s in "\\PC{1,120}") {
            if let Ok(id) = CacheId::new(&s) {
                prop_assert!(is_safe_key(&id.key()));
            }
        }

        #[test]
        fn any_string_is_accepted_or_rejected(s in ".{0,300}") {
            let _ = CacheId::new(&s);
        }
    }
}
