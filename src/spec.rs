//! Cache-mount specs in Dockerfile syntax, so a line can be pasted from a Dockerfile:
//! `type=cache,id=apt,target=/var/cache/apt,sharing=locked,uid=0,gid=0,mode=0755,ro`.
//!
//! Follows BuildKit's `RUN --mount` parser (keys case-insensitive, CSV fields, octal
//! mode, `id` defaulting to the target) and is stricter where BuildKit is silently
//! lenient: unknown or repeated keys are errors, not ignored or overridden.
//!
//! Two keys are cachefs's own: `lock-timeout=DUR` (e.g. `30s`, `5m`, `1h30m`; see
//! [`crate::units::parse_duration`]) bounds how long a mount waits for a busy
//! `sharing=locked` cache; without it the mount waits as long as it takes. `max-size=SIZE`
//! (e.g. `2G`, `500M`; see [`crate::units::parse_size`]) sets the cache's budget, stored
//! with the cache and enforced by every later mount of it.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::store::IdError;
pub use crate::store::{CacheId, Driver};
use crate::units::{self, Shown, UnitError};

/// How concurrent mounts of one cache id share it (BuildKit's `sharing=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sharing {
    /// All mounts see the same instance at once.
    #[default]
    Shared,
    /// One mount at a time; later ones wait.
    Locked,
    /// A busy cache gets another instance.
    Private,
}

impl Sharing {
    pub const ALL: [Sharing; 3] = [Sharing::Shared, Sharing::Locked, Sharing::Private];

    pub fn as_str(self) -> &'static str {
        match self {
            Sharing::Shared => "shared",
            Sharing::Locked => "locked",
            Sharing::Private => "private",
        }
    }
}

impl fmt::Display for Sharing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Sharing {
    type Err = SpecError;
    /// Case-insensitive, as BuildKit lowercases the value.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Sharing::ALL
            .into_iter()
            .find(|m| m.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| SpecError::InvalidSharing {
                value: s.to_owned(),
            })
    }
}

/// Default permission bits of a new cache directory (BuildKit's).
pub const DEFAULT_MODE: u32 = 0o755;

/// One `--mount=type=cache,...` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    pub id: CacheId,
    pub target: PathBuf,
    pub sharing: Sharing,
    /// Owner of a newly created cache directory.
    pub uid: u32,
    pub gid: u32,
    /// Permission bits of a newly created cache directory (at most 0o7777).
    pub mode: u32,
    pub read_only: bool,
    /// How long to wait for a cache another mount holds locked (`lock-timeout=`);
    /// `None` waits forever, zero gives up at once. At most [`units::MAX_DURATION`].
    pub lock_timeout: Option<Duration>,
    /// The cache's budget in bytes (4 KiB blocks), `max-size=`: stored with the cache.
    pub max_size: Option<u64>,
    /// A layer (tag, digest or digest prefix) to seed the cache with when it is empty,
    /// `from=` (BuildKit's `from` names a build stage; here it names a layer).
    pub from: Option<String>,
    /// A registry reference to seed the cache from when it is empty, `cache-from=` (a
    /// reference that is missing or unreachable is a warning, as in BuildKit).
    pub cache_from: Option<String>,
    /// A registry reference to push the cache to after the command succeeded, `cache-to=`.
    pub cache_to: Option<String>,
    /// Push to `cache_to` only when the tree differs from what the reference holds,
    /// `cache-to-when=changed` (default `always`).
    pub cache_to_if_changed: bool,
    /// `driver=fuse|bind`; `None` uses the driver stored with the cache (else fuse). Given,
    /// it becomes the cache's stored default.
    pub driver: Option<Driver>,
    /// `xattrs=on|off` (default off): serve extended attributes and POSIX ACLs. Off, the
    /// kernel stops asking for them after the first request (about four round trips fewer
    /// per file written or chowned); set, get and list then fail with EOPNOTSUPP, as on a
    /// filesystem without xattrs. Layers carry no xattrs either way.
    pub xattrs: bool,
}

/// Keys accepted in a spec, in the order error messages list them.
pub const VALID_KEYS: &[&str] = &[
    "type",
    "id",
    "target",
    "dst",
    "destination",
    "sharing",
    "uid",
    "gid",
    "mode",
    "ro",
    "readonly",
    "rw",
    "readwrite",
    "lock-timeout",
    "max-size",
    "from",
    "cache-from",
    "cache-to",
    "cache-to-when",
    "driver",
    "xattrs",
];

/// Why a mount spec was rejected. Each message is one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("mount spec is empty: expected e.g. type=cache,target=/var/cache/apt")]
    Empty,
    #[error("mount spec: field {position} is empty (two commas in a row, or a trailing comma?)")]
    EmptyField { position: usize },
    #[error("mount spec: {problem} in field {position} ('{}')", Shown(field))]
    Quote {
        position: usize,
        field: String,
        problem: &'static str,
    },
    #[error("mount spec: field '{}' must be key=value", Shown(field))]
    NotKeyValue { field: String },
    #[error("mount spec: unknown key '{}' (valid keys: {})", Shown(key), VALID_KEYS.join(", "))]
    UnknownKey { key: String },
    #[error("mount spec: '{key}' is not supported: {reason}")]
    Unsupported { key: String, reason: &'static str },
    #[error(
        "mount spec: type={} is not supported: cachefs only serves type=cache mounts",
        Shown(value)
    )]
    UnsupportedType { value: String },
    #[error("mount spec: '{key}' given twice{}", if first == key { String::new() } else { format!(" (already set by '{first}')") })]
    Duplicate { key: String, first: String },
    #[error("mount spec: empty value for '{key}'")]
    EmptyValue { key: String },
    #[error("mount spec: invalid {key} '{}': expected {expected}", Shown(value))]
    InvalidValue {
        key: String,
        value: String,
        expected: &'static str,
    },
    #[error("mount spec needs target=PATH (e.g. type=cache,target=/var/cache/apt)")]
    MissingTarget,
    #[error("mount spec: target must not contain a NUL byte")]
    TargetNul,
    #[error("mount spec: {}: {source}", if *from_target { "the target is the default id" } else { "invalid id" })]
    InvalidId {
        from_target: bool,
        #[source]
        source: IdError,
    },
    #[error(
        "invalid sharing mode '{}' (valid: shared, locked, private)",
        Shown(value)
    )]
    InvalidSharing { value: String },
}

/// The settings that several keys write to; a second write to one is a duplicate.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    Type,
    Id,
    Target,
    Sharing,
    Uid,
    Gid,
    Mode,
    ReadOnly,
    LockTimeout,
    MaxSize,
    From,
    CacheFrom,
    CacheTo,
    CacheToWhen,
    Driver,
    Xattrs,
}

fn slot_of(key: &str) -> Option<Slot> {
    Some(match key {
        "type" => Slot::Type,
        "id" => Slot::Id,
        "target" | "dst" | "destination" => Slot::Target,
        "sharing" => Slot::Sharing,
        "uid" => Slot::Uid,
        "gid" => Slot::Gid,
        "mode" => Slot::Mode,
        "ro" | "readonly" | "rw" | "readwrite" => Slot::ReadOnly,
        "lock-timeout" => Slot::LockTimeout,
        "max-size" => Slot::MaxSize,
        "from" => Slot::From,
        "cache-from" => Slot::CacheFrom,
        "cache-to" => Slot::CacheTo,
        "cache-to-when" => Slot::CacheToWhen,
        "driver" => Slot::Driver,
        "xattrs" => Slot::Xattrs,
        _ => return None,
    })
}

/// Why keys that Dockerfiles accept for other uses are refused here.
fn unsupported_reason(key: &str) -> Option<&'static str> {
    match key {
        "source" | "src" => Some(
            "cachefs serves the whole cache directory, not a subpath of it (mount a separate id instead)",
        ),
        _ => None,
    }
}

impl MountSpec {
    /// Parses a spec such as `type=cache,id=apt,target=/var/cache/apt,sharing=locked`.
    pub fn parse(s: &str) -> Result<MountSpec, SpecError> {
        if s.trim().is_empty() {
            return Err(SpecError::Empty);
        }
        let mut id: Option<String> = None;
        let mut target: Option<String> = None;
        let mut sharing = Sharing::default();
        let mut uid = 0;
        let mut gid = 0;
        let mut mode = DEFAULT_MODE;
        let mut read_only = false;
        let mut lock_timeout = None;
        let mut max_size = None;
        let mut from = None;
        let mut cache_from = None;
        let mut cache_to = None;
        let mut cache_to_if_changed = false;
        let mut driver = None;
        let mut xattrs = false;
        let mut seen: Vec<(Slot, String)> = Vec::new();

        for (i, (field, quoted)) in split_fields(s)?.into_iter().enumerate() {
            let position = i + 1;
            // Whitespace around an unquoted value is dropped, as around keys: `target=/x ,id=a`
            // means /x (a space pasted before a comma or from a wrapped line is never meant as
            // part of a path). A quoted value keeps everything: `target="/x "`.
            let (raw_key, value) = match field.split_once('=') {
                Some((k, v)) if quoted => (k, Some(v)),
                Some((k, v)) => (k, Some(v.trim())),
                None => (field.as_str(), None),
            };
            let key_trimmed = raw_key.trim();
            if key_trimmed.is_empty() {
                return Err(if value.is_some() {
                    SpecError::NotKeyValue { field }
                } else {
                    SpecError::EmptyField { position }
                });
            }
            let key = key_trimmed.to_ascii_lowercase();
            if let Some(reason) = unsupported_reason(&key) {
                return Err(SpecError::Unsupported { key, reason });
            }
            let Some(slot) = slot_of(&key) else {
                return Err(SpecError::UnknownKey {
                    key: key_trimmed.to_owned(),
                });
            };
            if let Some((_, first)) = seen.iter().find(|(s, _)| *s == slot) {
                return Err(SpecError::Duplicate {
                    key,
                    first: first.clone(),
                });
            }
            seen.push((slot, key.clone()));

            // Bare flags: only the read-only switches may come without a value.
            let Some(value) = value else {
                match slot {
                    Slot::ReadOnly => {
                        read_only = matches!(key.as_str(), "ro" | "readonly");
                        continue;
                    }
                    _ => return Err(SpecError::NotKeyValue { field }),
                }
            };
            if value.is_empty() {
                return Err(SpecError::EmptyValue { key });
            }
            let invalid = |expected| SpecError::InvalidValue {
                key: key.clone(),
                value: value.to_owned(),
                expected,
            };
            match slot {
                Slot::Type => {
                    if !value.eq_ignore_ascii_case("cache") {
                        return Err(SpecError::UnsupportedType {
                            value: value.to_owned(),
                        });
                    }
                }
                Slot::Id => id = Some(value.to_owned()),
                Slot::Target => target = Some(value.to_owned()),
                Slot::Sharing => {
                    sharing = value
                        .parse()
                        .map_err(|_| invalid("shared, locked or private"))?
                }
                Slot::Uid => uid = parse_id_number(value).ok_or_else(|| invalid(ID_EXPECTED))?,
                Slot::Gid => gid = parse_id_number(value).ok_or_else(|| invalid(ID_EXPECTED))?,
                Slot::Mode => {
                    mode = parse_mode(value)
                        .ok_or_else(|| invalid("octal permission bits from 0 to 7777, e.g. 0755"))?
                }
                Slot::ReadOnly => {
                    let b = parse_bool(value).ok_or_else(|| invalid("true or false"))?;
                    read_only = if matches!(key.as_str(), "ro" | "readonly") {
                        b
                    } else {
                        !b
                    };
                }
                Slot::LockTimeout => {
                    let d =
                        units::parse_duration(value).map_err(|e| invalid(duration_expected(&e)))?;
                    lock_timeout = Some(d);
                }
                Slot::MaxSize => {
                    let n = units::parse_size(value)
                        .map_err(|_| invalid("a size such as 500M, 2G or 1.5T (binary units)"))?;
                    max_size = Some(n);
                }
                Slot::From => {
                    let hex = value.strip_prefix("blake3:").unwrap_or(value);
                    let is_digest =
                        (8..=64).contains(&hex.len()) && hex.bytes().all(|b| b.is_ascii_hexdigit());
                    if !is_digest && crate::store::check_tag(value).is_err() {
                        return Err(invalid(
                            "a layer: its tag, or its digest (at least 8 hex digits); see cachefs layers",
                        ));
                    }
                    from = Some(value.to_owned());
                }
                Slot::CacheFrom | Slot::CacheTo => {
                    if value.is_empty()
                        || value.chars().any(|c| c.is_whitespace() || c.is_control())
                    {
                        return Err(invalid(
                            "a registry reference, e.g. registry.example.com/team/caches:apt",
                        ));
                    }
                    if slot == Slot::CacheFrom {
                        cache_from = Some(value.to_owned());
                    } else {
                        cache_to = Some(value.to_owned());
                    }
                }
                Slot::CacheToWhen => {
                    cache_to_if_changed = match value {
                        "always" => false,
                        "changed" => true,
                        _ => return Err(invalid("always or changed")),
                    };
                }
                Slot::Driver => {
                    driver = Some(value.parse().map_err(|()| invalid("fuse or bind"))?);
                }
                Slot::Xattrs => {
                    xattrs = match value.to_ascii_lowercase().as_str() {
                        "on" => true,
                        "off" => false,
                        _ => parse_bool(value).ok_or_else(|| invalid("on or off"))?,
                    };
                }
            }
        }

        let target = target.ok_or(SpecError::MissingTarget)?;
        if target.contains('\0') {
            return Err(SpecError::TargetNul);
        }
        // BuildKit's default id is the target as written.
        let (id, from_target) = match id {
            Some(id) => (id, false),
            None => (target.clone(), true),
        };
        let id = CacheId::new(&id).map_err(|source| SpecError::InvalidId {
            from_target,
            source,
        })?;
        Ok(MountSpec {
            id,
            target: PathBuf::from(target),
            sharing,
            uid,
            gid,
            mode,
            read_only,
            lock_timeout,
            max_size,
            from,
            cache_from,
            cache_to,
            cache_to_if_changed,
            driver,
            xattrs,
        })
    }
}

impl MountSpec {
    /// Owner and mode for the cache's directory, if this mount creates it.
    pub fn instance_init(&self) -> crate::store::InstanceInit {
        crate::store::InstanceInit {
            uid: self.uid,
            gid: self.gid,
            mode: self.mode,
        }
    }
}

impl FromStr for MountSpec {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MountSpec::parse(s)
    }
}

/// The canonical spec text; parses back to an equal `MountSpec`. Every field is
/// written, `ro` and `lock-timeout` only when set, and values that need it are
/// double-quoted. The timeout is written exactly ([`units::format_duration_exact`]).
impl fmt::Display for MountSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "type=cache,id=")?;
        write_value(f, self.id.as_str())?;
        write!(f, ",target=")?;
        write_value(f, &self.target.to_string_lossy())?;
        write!(
            f,
            ",sharing={},uid={},gid={},mode={:04o}",
            self.sharing, self.uid, self.gid, self.mode
        )?;
        if self.read_only {
            write!(f, ",ro")?;
        }
        if let Some(d) = self.lock_timeout {
            write!(f, ",lock-timeout={}", units::format_duration_exact(d))?;
        }
        if let Some(n) = self.max_size {
            write!(f, ",max-size={n}")?;
        }
        if let Some(l) = &self.from {
            write!(f, ",from={l}")?;
        }
        if let Some(r) = &self.cache_from {
            write!(f, ",cache-from={r}")?;
        }
        if let Some(r) = &self.cache_to {
            write!(f, ",cache-to={r}")?;
        }
        if self.cache_to_if_changed {
            write!(f, ",cache-to-when=changed")?;
        }
        if let Some(d) = self.driver {
            write!(f, ",driver={d}")?;
        }
        if self.xattrs {
            write!(f, ",xattrs=on")?;
        }
        Ok(())
    }
}

/// Quotes a value when it holds a separator, a quote, or edge whitespace.
fn write_value(f: &mut fmt::Formatter<'_>, v: &str) -> fmt::Result {
    f.write_str(&quote_value(v))
}

/// A spec value as it must be written inside a spec: double-quoted when it holds a
/// separator, a quote, or edge whitespace. For building specs from other input.
pub fn quote_value(v: &str) -> std::borrow::Cow<'_, str> {
    let plain = !v.contains([',', '"'])
        && !v.starts_with(char::is_whitespace)
        && !v.ends_with(char::is_whitespace);
    if plain {
        std::borrow::Cow::Borrowed(v)
    } else {
        std::borrow::Cow::Owned(format!("\"{}\"", v.replace('"', "\"\"")))
    }
}

const ID_EXPECTED: &str = "a decimal number from 0 to 4294967294";

/// What a rejected duration should have been, by why it was rejected.
fn duration_expected(e: &UnitError) -> &'static str {
    match e {
        UnitError::Negative { .. } => "a duration that is not negative, such as 30s, 5m or 1h",
        UnitError::TooLarge { .. } => "a duration of at most 36500d (about 100 years)",
        _ => "a duration such as 30s, 5m or 1h (units: ms, s, m, h, d, w)",
    }
}

/// Decimal uid/gid. `u32::MAX` is refused: to chown it means "leave unchanged".
fn parse_id_number(s: &str) -> Option<u32> {
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return None; // also rejects the '+' that u32::from_str would take
    }
    s.parse().ok().filter(|&n| n != u32::MAX)
}

/// Octal mode, with or without a leading 0, at most 0o7777 (like BuildKit's base-8 parse).
fn parse_mode(s: &str) -> Option<u32> {
    if !s.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return None;
    }
    u32::from_str_radix(s, 8).ok().filter(|&m| m <= 0o7777)
}

/// Go's strconv.ParseBool, which BuildKit uses for `ro=`.
fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// Splits on commas, honouring double quotes as BuildKit's CSV reader does.
///
/// A quoted section may span the whole field (`"id=a,b"`, as Go's encoding/csv reads
/// it) or the whole value (`id="a,b"`, which reads more naturally). Inside quotes `""`
/// is a literal quote. A quote anywhere else, or text after a closing quote, is an
/// error rather than a guess.
/// Each field comes with whether any of it was quoted.
fn split_fields(s: &str) -> Result<Vec<(String, bool)>, SpecError> {
    let mut fields = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        let position = fields.len() + 1;
        let mut field = String::new();
        // Whether `field` so far is only a key and '=' (a quote may start the value).
        let mut at_value_start = false;
        let mut quoted_once = false;
        let more = loop {
            match chars.next() {
                None => break false,
                Some(',') => break true,
                Some('"') => {
                    let starts_field = field.is_empty();
                    if quoted_once || !(starts_field || at_value_start) {
                        return Err(SpecError::Quote {
                            position,
                            field: field + "\"",
                            problem: "stray '\"' (quote the whole field or the whole value)",
                        });
                    }
                    quoted_once = true;
                    loop {
                        match chars.next() {
                            None => {
                                return Err(SpecError::Quote {
                                    position,
                                    field,
                                    problem: "unterminated '\"'",
                                });
                            }
                            Some('"') if chars.peek() == Some(&'"') => {
                                chars.next();
                                field.push('"');
                            }
                            Some('"') => break,
                            Some(c) => field.push(c),
                        }
                    }
                    // A quoted value ends its field; a quoted whole field may not
                    // continue either.
                    match chars.peek() {
                        None | Some(',') => {}
                        Some(_) => {
                            return Err(SpecError::Quote {
                                position,
                                field,
                                problem: "text after a closing '\"'",
                            });
                        }
                    }
                    at_value_start = false;
                }
                Some(c) => {
                    field.push(c);
                    at_value_start = c == '=' && !field[..field.len() - 1].contains('=');
                }
            }
        };
        fields.push((field, quoted_once));
        // After a trailing comma the loop runs once more and yields an empty field,
        // which the caller reports.
        if !more {
            return Ok(fields);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(s: &str) -> MountSpec {
        MountSpec::parse(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    fn err(s: &str) -> String {
        match MountSpec::parse(s) {
            Ok(m) => panic!("{s:?} parsed to {m:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn full_dockerfile_line() {
        let m = parse(
            "type=cache,id=apt,target=/var/cache/apt,sharing=locked,uid=1000,gid=100,mode=0700,ro",
        );
        assert_eq!(m.id.as_str(), "apt");
        assert_eq!(m.target, PathBuf::from("/var/cache/apt"));
        assert_eq!(m.sharing, Sharing::Locked);
        assert_eq!(
            (m.uid, m.gid, m.mode, m.read_only),
            (1000, 100, 0o700, true)
        );
        let init = m.instance_init();
        assert_eq!((init.uid, init.gid, init.mode), (1000, 100, 0o700));
    }

    #[test]
    fn defaults_follow_buildkit() {
        let m = parse("type=cache,target=/root/.cache/pip");
        assert_eq!(
            m.id.as_str(),
            "/root/.cache/pip",
            "id defaults to the target"
        );
        assert_eq!(m.sharing, Sharing::Shared);
        assert_eq!((m.uid, m.gid, m.mode, m.read_only), (0, 0, 0o755, false));
        assert_eq!(m.lock_timeout, None, "waits forever by default");
        // type may be omitted.
        assert_eq!(parse("target=/x"), parse("type=cache,target=/x"));
        // Relative targets are kept as written.
        assert_eq!(parse("target=rel/dir").target, PathBuf::from("rel/dir"));
    }

    #[test]
    fn keys_and_enum_values_are_case_insensitive() {
        let m = parse("TYPE=Cache,Target=/x,SHARING=Private,ReadOnly");
        assert_eq!(m.sharing, Sharing::Private);
        assert!(m.read_only);
        // Values that are data keep their case.
        assert_eq!(parse("target=/X,id=MyId").id.as_str(), "MyId");
    }

    #[test]
    fn target_aliases() {
        for k in ["target", "dst", "destination", "DST"] {
            assert_eq!(parse(&format!("{k}=/t")).target, PathBuf::from("/t"));
        }
        assert_eq!(
            err("target=/a,dst=/b"),
            "mount spec: 'dst' given twice (already set by 'target')"
        );
        assert_eq!(
            err("type=cache,id=x"),
            "mount spec needs target=PATH (e.g. type=cache,target=/var/cache/apt)"
        );
        assert_eq!(err("target="), "mount spec: empty value for 'target'");
    }

    #[test]
    fn read_only_flags() {
        assert!(parse("target=/x,ro").read_only);
        assert!(parse("target=/x,readonly").read_only);
        assert!(parse("target=/x,ro=true").read_only);
        assert!(parse("target=/x,ro=1").read_only);
        assert!(!parse("target=/x,ro=false").read_only);
        assert!(!parse("target=/x,readonly=False").read_only);
        assert!(!parse("target=/x,rw").read_only);
        assert!(parse("target=/x,rw=false").read_only);
        assert_eq!(
            err("target=/x,ro=yes"),
            "mount spec: invalid ro 'yes': expected true or false"
        );
        assert_eq!(
            err("target=/x,ro,readonly"),
            "mount spec: 'readonly' given twice (already set by 'ro')"
        );
        assert_eq!(err("target=/x,ro,ro"), "mount spec: 'ro' given twice");
    }

    #[test]
    fn numbers() {
        assert_eq!(parse("target=/x,mode=755").mode, 0o755);
        assert_eq!(parse("target=/x,mode=0").mode, 0);
        assert_eq!(parse("target=/x,mode=07777").mode, 0o7777);
        assert_eq!(parse("target=/x,mode=1777").mode, 0o1777);
        assert_eq!(parse("target=/x,uid=4294967294").uid, 4294967294);
        assert_eq!(
            err("target=/x,uid=abc"),
            "mount spec: invalid uid 'abc': expected a decimal number from 0 to 4294967294"
        );
        // Surrounding whitespace is dropped (see whitespace_around_unquoted_values_is_dropped).
        assert_eq!(parse("target=/x,gid= 1").gid, 1);
        for bad in [
            "-1",
            "+1",
            "1.0",
            "1 2",
            "4294967295",
            "99999999999",
            "0x10",
        ] {
            let e = err(&format!("target=/x,gid={bad}"));
            assert!(
                e.starts_with(&format!("mount spec: invalid gid '{bad}'")),
                "{e}"
            );
        }
        assert_eq!(
            err("target=/x,mode=0999"),
            "mount spec: invalid mode '0999': expected octal permission bits from 0 to 7777, e.g. 0755"
        );
        for bad in ["99999", "17777", "0o755", "rwx", "-755"] {
            assert!(
                err(&format!("target=/x,mode={bad}")).starts_with("mount spec: invalid mode"),
                "{bad}"
            );
        }
        assert_eq!(err("target=/x,uid="), "mount spec: empty value for 'uid'");
        assert_eq!(
            err("target=/x,uid"),
            "mount spec: field 'uid' must be key=value"
        );
    }

    #[test]
    fn max_sizes() {
        let m = |s: &str| parse(&format!("target=/x,{s}")).max_size;
        assert_eq!(parse("target=/x").max_size, None, "no budget by default");
        assert_eq!(m("max-size=2G"), Some(2 << 30));
        assert_eq!(m("MAX-SIZE=500M"), Some(500 << 20));
        assert_eq!(m("max-size=1.5K"), Some(1536));
        assert_eq!(m("max-size=4096"), Some(4096));
        for bad in ["-1G", "lots", "1.5", "2X", "99999999999999999999999"] {
            assert_eq!(
                err(&format!("target=/x,max-size={bad}")),
                format!(
                    "mount spec: invalid max-size '{bad}': expected a size such as 500M, 2G or 1.5T (binary units)"
                )
            );
        }
        let spec = parse("target=/x,max-size=1M");
        assert_eq!(parse(&spec.to_string()), spec);
    }

    #[test]
    fn lock_timeouts() {
        let t = |s: &str| parse(&format!("target=/x,sharing=locked,{s}")).lock_timeout;
        let secs = Duration::from_secs;
        assert_eq!(t("lock-timeout=30s"), Some(secs(30)));
        assert_eq!(t("lock-timeout=30"), Some(secs(30)));
        assert_eq!(t("lock-timeout=0"), Some(Duration::ZERO));
        assert_eq!(t("lock-timeout=250ms"), Some(Duration::from_millis(250)));
        assert_eq!(t("lock-timeout=1h30m"), Some(secs(5400)));
        assert_eq!(t("lock-timeout=1.5h"), Some(secs(5400)));
        assert_eq!(t("LOCK-TIMEOUT=2M"), Some(secs(120)));
        assert_eq!(t("Lock-Timeout=1w"), Some(secs(7 * 86_400)));
        assert_eq!(t("\"lock-timeout=5m\""), Some(secs(300)));
        assert_eq!(t("lock-timeout=36500d"), Some(units::MAX_DURATION));

        assert_eq!(
            err("target=/x,lock-timeout=-5s"),
            "mount spec: invalid lock-timeout '-5s': expected a duration that is not negative, such as 30s, 5m or 1h"
        );
        assert!(err("target=/x,lock-timeout=-0").contains("negative"));
        assert_eq!(
            err("target=/x,lock-timeout=5x"),
            "mount spec: invalid lock-timeout '5x': expected a duration such as 30s, 5m or 1h (units: ms, s, m, h, d, w)"
        );
        for bad in [
            "soon", "1h30", "30m1h", "5 s", "nan", "inf", "1e3", "forever",
        ] {
            assert!(
                err(&format!("target=/x,lock-timeout={bad}")).starts_with(&format!(
                    "mount spec: invalid lock-timeout '{bad}': expected a duration such as"
                )),
                "{bad}"
            );
        }
        assert_eq!(
            err("target=/x,lock-timeout=101000d"),
            "mount spec: invalid lock-timeout '101000d': expected a duration of at most 36500d (about 100 years)"
        );
        assert!(
            err(&format!("target=/x,lock-timeout={}s", "9".repeat(40))).contains("at most 36500d")
        );
        assert_eq!(
            err("target=/x,lock-timeout="),
            "mount spec: empty value for 'lock-timeout'"
        );
        assert_eq!(
            err("target=/x,lock-timeout"),
            "mount spec: field 'lock-timeout' must be key=value"
        );
        assert_eq!(
            err("target=/x,lock-timeout=1s,LOCK-TIMEOUT=2s"),
            "mount spec: 'lock-timeout' given twice"
        );
        // The underscore spelling is not a key.
        assert!(err("target=/x,lock_timeout=1s").contains("unknown key 'lock_timeout'"));
        let e = err("target=/x,lock-timeout=1\n2s");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn sharing_values() {
        for (s, m) in [
            ("shared", Sharing::Shared),
            ("locked", Sharing::Locked),
            ("private", Sharing::Private),
        ] {
            assert_eq!(parse(&format!("target=/x,sharing={s}")).sharing, m);
            assert_eq!(s.parse::<Sharing>().unwrap(), m);
            assert_eq!(m.to_string(), s);
        }
        assert_eq!(
            err("target=/x,sharing=exclusive"),
            "mount spec: invalid sharing 'exclusive': expected shared, locked or private"
        );
        assert_eq!(
            "nope".parse::<Sharing>().unwrap_err().to_string(),
            "invalid sharing mode 'nope' (valid: shared, locked, private)"
        );
        assert_eq!(Sharing::default(), Sharing::Shared);
    }

    #[test]
    fn registry_keys() {
        let m = parse(
            "target=/x,cache-from=ghcr.io/o/c:apt,cache-to=127.0.0.1:5000/c:apt,cache-to-when=changed",
        );
        assert_eq!(m.cache_from.as_deref(), Some("ghcr.io/o/c:apt"));
        assert_eq!(m.cache_to.as_deref(), Some("127.0.0.1:5000/c:apt"));
        assert!(m.cache_to_if_changed);
        // Display writes them back.
        assert_eq!(MountSpec::parse(&m.to_string()).unwrap(), m);
        assert!(!parse("target=/x,cache-to=r/c:t,cache-to-when=always").cache_to_if_changed);
        assert_eq!(
            err("target=/x,cache-to-when=sometimes"),
            "mount spec: invalid cache-to-when 'sometimes': expected always or changed"
        );
        assert!(err("target=/x,cache-from=").contains("empty value"));
        assert!(err("target=/x,cache-to=a b").contains("expected a registry reference"));
    }

    #[test]
    fn unsupported_and_unknown() {
        assert_eq!(
            err("type=bind,target=/x"),
            "mount spec: type=bind is not supported: cachefs only serves type=cache mounts"
        );
        assert!(err("type=tmpfs,target=/x").contains("type=tmpfs is not supported"));
        assert!(
            err("target=/x,from=../x")
                .starts_with("mount spec: invalid from '../x': expected a layer"),
            "{}",
            err("target=/x,from=../x")
        );
        assert_eq!(
            parse("target=/x,from=apt-2026").from.as_deref(),
            Some("apt-2026")
        );
        assert_eq!(
            parse("target=/x,from=3f2a9c1e").from.as_deref(),
            Some("3f2a9c1e")
        );
        assert!(
            err("target=/x,source=/sub").starts_with("mount spec: 'source' is not supported: ")
        );
        assert!(err("target=/x,src=/sub").starts_with("mount spec: 'src' is not supported: "));
        assert_eq!(
            err("target=/x,foo=1"),
            "mount spec: unknown key 'foo' (valid keys: type, id, target, dst, destination, sharing, uid, gid, mode, ro, readonly, rw, readwrite, lock-timeout, max-size, from, cache-from, cache-to, cache-to-when, driver, xattrs)"
        );
        assert!(err("target=/x,Size=1").contains("unknown key 'Size'"));
        assert_eq!(err("target=/x,id=a,id=b"), "mount spec: 'id' given twice");
        assert_eq!(
            err("target=/x,sharing=locked,SHARING=shared"),
            "mount spec: 'sharing' given twice"
        );
    }

    #[test]
    fn empty_fields_and_specs() {
        assert_eq!(
            err(""),
            "mount spec is empty: expected e.g. type=cache,target=/var/cache/apt"
        );
        assert_eq!(err("   "), err(""));
        assert_eq!(
            err("type=cache,,target=/x"),
            "mount spec: field 2 is empty (two commas in a row, or a trailing comma?)"
        );
        assert_eq!(
            err("target=/x,"),
            "mount spec: field 2 is empty (two commas in a row, or a trailing comma?)"
        );
        assert_eq!(
            err(",target=/x"),
            "mount spec: field 1 is empty (two commas in a row, or a trailing comma?)"
        );
        assert_eq!(
            err("target=/x,=v"),
            "mount spec: field '=v' must be key=value"
        );
    }

    #[test]
    fn ids() {
        assert_eq!(parse("target=/x,id=../../etc").id.as_str(), "../../etc");
        let long = "a".repeat(256);
        assert_eq!(
            err(&format!("target=/x,id={long}")),
            "mount spec: invalid id: cache id must be 1 to 255 bytes, got 256"
        );
        assert_eq!(
            err(&format!("target=/{long}")),
            "mount spec: the target is the default id: cache id must be 1 to 255 bytes, got 257"
        );
        assert_eq!(
            err("target=/x\0y"),
            "mount spec: target must not contain a NUL byte"
        );
        assert!(
            err("target=/x,id=a\0b")
                .starts_with("mount spec: invalid id: cache id must not contain a NUL")
        );
    }

    #[test]
    fn quoting() {
        assert_eq!(parse("target=/x,id=\"a,b\"").id.as_str(), "a,b");
        assert_eq!(parse("target=/x,\"id=a,b\"").id.as_str(), "a,b");
        assert_eq!(parse("\"target=/x,y\"").target, PathBuf::from("/x,y"));
        assert_eq!(
            parse("target=/x,id=\"say \"\"hi\"\"\"").id.as_str(),
            "say \"hi\""
        );
        assert_eq!(parse("target=/x,id=\"=\"").id.as_str(), "=");
        assert_eq!(
            err("target=/x,id=\"a,b"),
            "mount spec: unterminated '\"' in field 2 ('id=a,b')"
        );
        assert_eq!(
            err("target=/x,id=a\"b\""),
            "mount spec: stray '\"' (quote the whole field or the whole value) in field 2 ('id=a\"')"
        );
        assert_eq!(
            err("target=/x,id=\"a\"b"),
            "mount spec: text after a closing '\"' in field 2 ('id=a')"
        );
        assert!(err("target=/x,\"id\"=a").contains("text after a closing"));
        // A quoted empty value is still empty.
        assert_eq!(err("target=/x,id=\"\""), "mount spec: empty value for 'id'");
    }

    #[test]
    fn whitespace_around_unquoted_values_is_dropped() {
        let m = parse("target=/x/t ,id=a");
        assert_eq!(m.target, PathBuf::from("/x/t"));
        assert_eq!(m.id.as_str(), "a");
        let m = parse(" type = cache , id = apt ,target=\t/var/cache/apt\t, sharing= locked ");
        assert_eq!(m.target, PathBuf::from("/var/cache/apt"));
        assert_eq!(m.id.as_str(), "apt");
        assert_eq!(m.sharing, Sharing::Locked);
        // Inner spaces stay; quoted values keep their edges.
        assert_eq!(parse("target=/x/a b ").target, PathBuf::from("/x/a b"));
        assert_eq!(parse("target=\"/x/t \"").target, PathBuf::from("/x/t "));
        assert_eq!(parse("\"target=/x/t \"").target, PathBuf::from("/x/t "));
        // Nothing but whitespace is an empty value.
        assert_eq!(err("target=/x,id=  "), "mount spec: empty value for 'id'");
        // What Display writes (edge whitespace quoted) still parses back.
        let m = parse("target=\" /x \",id=\" a\"");
        assert_eq!(parse(&m.to_string()), m);
    }

    #[test]
    fn errors_are_one_line_even_for_hostile_input() {
        let e = err("target=/x,fo\no=1");
        assert!(!e.contains('\n'), "{e}");
        assert!(e.contains("fo\\no"), "{e}");
        let e = err(&format!("target=/x,uid={}", "9".repeat(500)));
        assert!(e.len() < 250, "{e}");
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "type=cache,target=/var/cache/apt",
            "type=cache,id=\"a,b\",target=\" /sp ace \",sharing=private,uid=7,gid=8,mode=0,ro",
            "target=/x,id=\"q\"\"uote\"",
            "target=/x,sharing=locked,lock-timeout=0",
            "target=/x,lock-timeout=1.5h",
            "target=/x,lock-timeout=1.000000001s,ro",
            "target=/x,lock-timeout=36500d",
        ] {
            let m = parse(s);
            let text = m.to_string();
            assert_eq!(parse(&text), m, "{s} -> {text}");
        }
        assert_eq!(
            parse("target=/var/cache/apt,id=apt,sharing=locked").to_string(),
            "type=cache,id=apt,target=/var/cache/apt,sharing=locked,uid=0,gid=0,mode=0755"
        );
        assert_eq!(
            parse("target=/c,id=c,sharing=locked,lock-timeout=5400,ro").to_string(),
            "type=cache,id=c,target=/c,sharing=locked,uid=0,gid=0,mode=0755,ro,lock-timeout=1h30m"
        );
    }

    #[test]
    fn driver_is_fuse_or_bind_and_optional() {
        assert_eq!(parse("target=/x").driver, None);
        assert_eq!(parse("target=/x,driver=bind").driver, Some(Driver::Bind));
        assert_eq!(parse("target=/x,Driver=FUSE").driver, Some(Driver::Fuse));
        assert_eq!(
            err("target=/x,driver=overlay"),
            "mount spec: invalid driver 'overlay': expected fuse or bind"
        );
        assert!(err("target=/x,driver=bind,driver=fuse").contains("given twice"));
        assert_eq!(
            parse("target=/x,driver=bind").to_string(),
            "type=cache,id=/x,target=/x,sharing=shared,uid=0,gid=0,mode=0755,driver=bind"
        );
    }

    #[test]
    fn xattrs_key() {
        assert!(!parse("target=/x").xattrs, "off by default");
        assert!(parse("target=/x,xattrs=on").xattrs);
        assert!(parse("target=/x,xattrs=true").xattrs);
        assert!(!parse("target=/x,xattrs=off").xattrs);
        assert_eq!(
            parse("target=/x,xattrs=on").to_string(),
            "type=cache,id=/x,target=/x,sharing=shared,uid=0,gid=0,mode=0755,xattrs=on"
        );
        assert_eq!(
            MountSpec::parse("target=/x,xattrs=maybe")
                .unwrap_err()
                .to_string(),
            "mount spec: invalid xattrs 'maybe': expected on or off"
        );
    }

    fn spec_strategy() -> impl Strategy<Value = MountSpec> {
        (
            "[^\0]{1,60}",
            "[^\0]{1,60}",
            prop::sample::select(Sharing::ALL.to_vec()),
            0..u32::MAX,
            0..u32::MAX,
            0..=0o7777u32,
            any::<bool>(),
            prop::option::of(
                (0..=units::MAX_DURATION.as_secs(), 0..1_000_000_000u32)
                    .prop_map(|(s, n)| Duration::new(s, n).min(units::MAX_DURATION)),
            ),
            prop::option::of(any::<u64>()),
            prop::option::of(prop::sample::select(Driver::ALL.to_vec())),
            any::<bool>(),
        )
            .prop_map(
                |(
                    id,
                    target,
                    sharing,
                    uid,
                    gid,
                    mode,
                    read_only,
                    lock_timeout,
                    max_size,
                    driver,
                    xattrs,
                )| {
                    MountSpec {
                        id: CacheId::new(&id).unwrap(),
                        target: PathBuf::from(target),
                        sharing,
                        uid,
                        gid,
                        mode,
                        read_only,
                        lock_timeout,
                        max_size,
                        from: None,
                        cache_from: None,
                        cache_to: None,
                        cache_to_if_changed: false,
                        driver,
                        xattrs,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn never_panics(s in ".{0,200}") {
            let _ = MountSpec::parse(&s);
        }

        #[test]
        fn never_panics_on_spec_like_input(
            fields in prop::collection::vec(
                "(\"|type|id|target|dst|ro|rw|mode|uid|sharing|lock-timeout|from|=|,|-|[a-z0-9/.\"]{0,6}){0,6}",
                0..8,
            )
        ) {
            let s = fields.join(",");
            if let Err(e) = MountSpec::parse(&s) {
                prop_assert!(!e.to_string().contains('\n'));
            }
        }

        #[test]
        fn round_trip(m in spec_strategy()) {
            let text = m.to_string();
            let back = MountSpec::parse(&text);
            prop_assert_eq!(back.as_ref().ok(), Some(&m), "{} -> {:?}", text, back);
        }
    }
}
