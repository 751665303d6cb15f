//! Human units for the command line: durations (`30s`, `1h30m`, `1.5h`), byte sizes (`512M`,
//! `20G`, `1.5 GiB`), ages (`3m ago`) and local timestamps.
//!
//! Parsers are strict and their errors are one line naming the input and what was expected.
//! The formatters are for people: [`format_duration`] and [`format_size`] round, so their
//! output parses back to a value close to, not always equal to, the original;
//! [`format_duration_exact`] is the lossless form for text that must round-trip.

use std::fmt;
use std::time::Duration;

/// The longest duration [`parse_duration`] accepts: 36500 days, about 100 years. Anything
/// longer is a typo, and the bound keeps deadlines computed from it far from overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(36_500 * DAY_SECS);

const DAY_SECS: u64 = 86_400;
const NANOS_PER_SEC: u128 = 1_000_000_000;

/// What was being parsed, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantity {
    Duration,
    Size,
}

impl Quantity {
    fn name(self) -> &'static str {
        match self {
            Quantity::Duration => "duration",
            Quantity::Size => "size",
        }
    }

    fn example(self) -> &'static str {
        match self {
            Quantity::Duration => "30s, 5m or 1h30m",
            Quantity::Size => "512M, 20G or 1.5GiB",
        }
    }

    fn units(self) -> &'static str {
        match self {
            Quantity::Duration => "ms, s, m, h, d, w",
            Quantity::Size => "B, K, M, G, T, P, E, each optionally followed by B or iB",
        }
    }

    fn limit(self) -> &'static str {
        match self {
            Quantity::Duration => "at most 36500d, about 100 years",
            Quantity::Size => "at most 18446744073709551615 bytes, just under 16 EiB",
        }
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a duration or size was rejected. Each message is one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("empty {kind}: expected e.g. {}", kind.example())]
    Empty { kind: Quantity },
    #[error("invalid {kind} '{}': {kind}s cannot be negative", Shown(input))]
    Negative { kind: Quantity, input: String },
    #[error(
        "invalid {kind} '{}': unknown unit '{}' (valid: {})",
        Shown(input),
        Shown(unit),
        kind.units()
    )]
    UnknownUnit {
        kind: Quantity,
        input: String,
        unit: String,
    },
    #[error("invalid {kind} '{}': {problem}", Shown(input))]
    Malformed {
        kind: Quantity,
        input: String,
        problem: &'static str,
    },
    #[error("invalid {kind} '{}': too large ({})", Shown(input), kind.limit())]
    TooLarge { kind: Quantity, input: String },
}

impl UnitError {
    /// The text that was rejected (empty for [`UnitError::Empty`]).
    pub fn input(&self) -> &str {
        match self {
            UnitError::Empty { .. } => "",
            UnitError::Negative { input, .. }
            | UnitError::UnknownUnit { input, .. }
            | UnitError::Malformed { input, .. }
            | UnitError::TooLarge { input, .. } => input,
        }
    }
}

/// Shows user text inside a one-line message: control characters escaped, long text cut.
pub(crate) struct Shown<'a>(pub(crate) &'a str);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MAX_CHARS: usize = 80;
        for (i, c) in self.0.chars().enumerate() {
            if i == MAX_CHARS {
                return f.write_str("...");
            }
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

/// A decimal number as written: whole part and fraction, kept exact.
struct Decimal<'a> {
    whole: &'a str,
    fraction: &'a str,
}

impl Decimal<'_> {
    /// `self * scale`, rounded to the nearest integer; `None` past `u128`.
    fn times(&self, scale: u128) -> Option<u128> {
        let mut whole: u128 = 0;
        for b in self.whole.bytes() {
            whole = whole.checked_mul(10)?.checked_add(u128::from(b - b'0'))?;
        }
        // Digits past the 20th move the result by less than 0.02 for any scale below 2^64
        // (the largest used is 2^60, an EiB), so they are dropped.
        let digits = &self.fraction[..self.fraction.len().min(20)];
        let mut frac: u128 = 0;
        for b in digits.bytes() {
            frac = frac * 10 + u128::from(b - b'0');
        }
        let denom = 10u128.pow(digits.len() as u32);
        // frac < 10^20 and scale < 2^64, so the product fits in u128.
        let frac_part = (frac * scale + denom / 2) / denom;
        whole.checked_mul(scale)?.checked_add(frac_part)
    }
}

/// Splits a leading number (`12`, `1.5`, `.5`, `5.`) off `s`; `None` if there is none.
fn split_number(s: &str) -> Option<(Decimal<'_>, &str)> {
    let whole_len = s.bytes().take_while(u8::is_ascii_digit).count();
    let (whole, rest) = s.split_at(whole_len);
    let (fraction, rest) = match rest.strip_prefix('.') {
        Some(after) => {
            let n = after.bytes().take_while(u8::is_ascii_digit).count();
            after.split_at(n)
        }
        None => ("", rest),
    };
    if whole.is_empty() && fraction.is_empty() {
        return None;
    }
    Some((Decimal { whole, fraction }, rest))
}

/// Duration units from largest to smallest, with their length in nanoseconds.
const DURATION_UNITS: [(&str, u128); 6] = [
    ("w", 7 * DAY_SECS as u128 * NANOS_PER_SEC),
    ("d", DAY_SECS as u128 * NANOS_PER_SEC),
    ("h", 3600 * NANOS_PER_SEC),
    ("m", 60 * NANOS_PER_SEC),
    ("s", NANOS_PER_SEC),
    ("ms", 1_000_000),
];

/// Parses a duration: a plain number of seconds (`0`, `30`, `1.5`), or numbers each followed
/// by a unit, largest unit first and each unit at most once (`250ms`, `1.5s`, `2m`, `1h30m`,
/// `2m5s`, `14d`, `1w`).
///
/// Units (case-insensitive): `ms`, `s`, `m` (minutes), `h`, `d` (24 hours), `w` (7 days).
/// Fractions are allowed anywhere (`1.5h` is 90 minutes) and the result is rounded to the
/// nanosecond. Whitespace around the whole text is ignored; inside it is an error. Negative
/// durations and ones longer than [`MAX_DURATION`] are errors.
pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    let kind = Quantity::Duration;
    let input = s.trim();
    let malformed = |problem| UnitError::Malformed {
        kind,
        input: input.to_owned(),
        problem,
    };
    if input.is_empty() {
        return Err(UnitError::Empty { kind });
    }
    if input.starts_with('-') {
        return Err(UnitError::Negative {
            kind,
            input: input.to_owned(),
        });
    }
    let too_large = || UnitError::TooLarge {
        kind,
        input: input.to_owned(),
    };
    let max_nanos = MAX_DURATION.as_nanos();

    let mut rest = input;
    let mut total: u128 = 0;
    // Index into DURATION_UNITS of the next unit allowed (units only get smaller).
    let mut next_unit = 0;
    let mut first = true;
    while !rest.is_empty() {
        let Some((number, after)) = split_number(rest) else {
            return Err(malformed(
                "expected a number and a unit, such as 30s, 5m, 1.5h or 1h30m",
            ));
        };
        let unit_len = after
            .bytes()
            .take_while(|b| b.is_ascii_alphabetic() || *b >= 0x80)
            .count();
        let (unit, after) = after.split_at(unit_len);
        let scale = if unit.is_empty() {
            if first && after.is_empty() {
                NANOS_PER_SEC // a plain number is seconds
            } else if after.is_empty() {
                return Err(malformed(
                    "the last number has no unit (ms, s, m, h, d or w), as in 1h30m",
                ));
            } else {
                return Err(malformed(
                    "expected a number and a unit, such as 30s, 5m, 1.5h or 1h30m",
                ));
            }
        } else {
            let Some(i) = DURATION_UNITS
                .iter()
                .position(|(name, _)| name.eq_ignore_ascii_case(unit))
            else {
                return Err(UnitError::UnknownUnit {
                    kind,
                    input: input.to_owned(),
                    unit: unit.to_owned(),
                });
            };
            if i < next_unit {
                return Err(malformed(
                    "units must go from largest to smallest, each at most once, as in 1h30m",
                ));
            }
            next_unit = i + 1;
            DURATION_UNITS[i].1
        };
        let part = number.times(scale).ok_or_else(too_large)?;
        total = total.checked_add(part).ok_or_else(too_large)?;
        if total > max_nanos {
            return Err(too_large());
        }
        rest = after;
        first = false;
    }
    let secs = (total / NANOS_PER_SEC) as u64; // at most MAX_DURATION, so it fits
    Ok(Duration::new(secs, (total % NANOS_PER_SEC) as u32))
}

/// `n / d` rounded to the nearest integer, halves up.
fn div_round(n: u128, d: u128) -> u128 {
    (n + d / 2) / d
}

/// A duration for people, rounded to 2 or 3 significant figures: `0s`, `850ms`, `3.2s`, `59s`,
/// `2m05s`, `1h02m`, `3d04h`, `15d`. Days are the largest unit. The text parses back with
/// [`parse_duration`] (up to [`MAX_DURATION`]) to within the rounding.
///
/// Only an exact zero is `0s`; a nonzero duration under half a millisecond shows as `0ms`.
pub fn format_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_owned();
    }
    let ms = div_round(nanos, 1_000_000);
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let tenths = div_round(nanos, NANOS_PER_SEC / 10);
    if tenths < 100 {
        return format!("{}.{}s", tenths / 10, tenths % 10);
    }
    let secs = div_round(nanos, NANOS_PER_SEC);
    if secs < 60 {
        return format!("{secs}s");
    }
    if secs < 3600 {
        return format!("{}m{:02}s", secs / 60, secs % 60);
    }
    let mins = div_round(secs, 60);
    if mins < 24 * 60 {
        return format!("{}h{:02}m", mins / 60, mins % 60);
    }
    let hours = div_round(secs, 3600);
    if hours < 10 * 24 {
        return format!("{}d{:02}h", hours / 24, hours % 24);
    }
    format!("{}d", div_round(secs, DAY_SECS as u128))
}

/// A duration written exactly, in the largest units that divide it: `0s`, `250ms`, `30s`,
/// `5m`, `1h30m`, `2d1h`, `1m2.5s`, `1.000000001s`. [`parse_duration`] reads it back to the
/// same value (for durations up to [`MAX_DURATION`]); this is the form for canonical text.
pub fn format_duration_exact(d: Duration) -> String {
    let total = d.as_secs();
    let nanos = d.subsec_nanos();
    let (days, h, m, s) = (
        total / DAY_SECS,
        total % DAY_SECS / 3600,
        total % 3600 / 60,
        total % 60,
    );
    let mut out = String::new();
    for (n, unit) in [(days, "d"), (h, "h"), (m, "m")] {
        if n > 0 {
            out += &format!("{n}{unit}");
        }
    }
    if nanos == 0 {
        if s > 0 || out.is_empty() {
            out += &format!("{s}s");
        }
    } else if s == 0 && nanos % 1_000_000 == 0 {
        out += &format!("{}ms", nanos / 1_000_000);
    } else {
        let frac = format!("{nanos:09}");
        out += &format!("{s}.{}s", frac.trim_end_matches('0'));
    }
    out
}

/// Size suffixes and their powers of 1024.
const SIZE_UNITS: [(char, u32); 6] = [('k', 1), ('m', 2), ('g', 3), ('t', 4), ('p', 5), ('e', 6)];

/// Parses a byte size: a number with an optional suffix, `1024`, `0`, `512M`, `10K`, `10KB`,
/// `10KiB`, `1.5G`, `20G`, `2T`, `1.5 GiB`.
///
/// Like ccache, sizes are binary: `K`, `M`, `G`, `T`, `P` and `E` are powers of 1024. Each may be
/// followed by `B` or `iB`, which mean the same thing: `10KB`, `10KiB` and `10K` are all 10240
/// bytes, never 10000. A lone `B` is bytes. Suffixes are case-insensitive and may be separated
/// from the number by spaces, as [`format_size`] writes them. Fractions need a suffix
/// and are rounded to the nearest byte (`1.5K` is 1536; `1.5` is an error). Negative sizes and
/// sizes past `u64::MAX` are errors.
pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    let kind = Quantity::Size;
    let input = s.trim();
    let malformed = |problem| UnitError::Malformed {
        kind,
        input: input.to_owned(),
        problem,
    };
    if input.is_empty() {
        return Err(UnitError::Empty { kind });
    }
    if input.starts_with('-') {
        return Err(UnitError::Negative {
            kind,
            input: input.to_owned(),
        });
    }
    let Some((number, rest)) = split_number(input) else {
        return Err(malformed(
            "expected a number with an optional suffix, such as 4096, 512M or 1.5G",
        ));
    };
    let suffix = rest.trim_start_matches(' ');
    let power = size_power(suffix).ok_or_else(|| UnitError::UnknownUnit {
        kind,
        input: input.to_owned(),
        unit: suffix.to_owned(),
    })?;
    if power == 0 && !number.fraction.is_empty() {
        return Err(malformed(
            "a number of bytes must be whole (use a suffix for fractions, as in 1.5K)",
        ));
    }
    number
        .times(1u128 << (10 * power))
        .and_then(|n| u64::try_from(n).ok())
        .ok_or(UnitError::TooLarge {
            kind,
            input: input.to_owned(),
        })
}

/// The power of 1024 a size suffix stands for: `` and `B` are 0, `K`/`KB`/`KiB` 1, and so on.
fn size_power(suffix: &str) -> Option<u32> {
    let lower = suffix.to_ascii_lowercase();
    if lower.is_empty() || lower == "b" {
        return Some(0);
    }
    let mut chars = lower.chars();
    let letter = chars.next()?;
    let (_, power) = SIZE_UNITS.iter().find(|(c, _)| *c == letter)?;
    matches!(chars.as_str(), "" | "b" | "ib").then_some(*power)
}

/// A size for people: bytes below 1 KiB (`0 B`, `512 B`), else one decimal in the largest
/// binary unit that keeps the number below 1024: `1.0 KiB`, `12.3 MiB`, `1.5 GiB`, up to
/// `16.0 EiB`. [`parse_size`] reads it back to within the rounding, except `16.0 EiB` (what
/// the last 0.05 EiB below `u64::MAX` round to), which is just past what a `u64` holds.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let bytes = u128::from(bytes);
    let mut power = 1;
    while power < UNITS.len() && bytes >= 1u128 << (10 * (power + 1)) {
        power += 1;
    }
    let mut tenths = div_round(bytes * 10, 1u128 << (10 * power));
    // Rounding up may reach 1024.0 of this unit: show 1.0 of the next one instead.
    if tenths >= 10_240 && power < UNITS.len() {
        power += 1;
        tenths = div_round(bytes * 10, 1u128 << (10 * power));
    }
    format!("{}.{} {}", tenths / 10, tenths % 10, UNITS[power - 1])
}

/// How long ago `then` was, in the largest whole unit: `just now` (under a second), `5s ago`,
/// `3m ago`, `2h ago`, `4d ago`. Times in the future (clock skew) are `just now`.
pub fn format_age(then_unix_secs: i64, now_unix_secs: i64) -> String {
    let age = i128::from(now_unix_secs) - i128::from(then_unix_secs);
    match age {
        ..1 => "just now".to_owned(),
        1..60 => format!("{age}s ago"),
        60..3600 => format!("{}m ago", age / 60),
        3600..86_400 => format!("{}h ago", age / 3600),
        _ => format!("{}d ago", age / 86_400),
    }
}

/// A Unix time as local wall-clock time, `2026-11-25 22:31:43` (the system's time zone, `TZ`).
/// A time the C library cannot convert is shown as the plain number of seconds.
pub fn format_local_time(unix_secs: i64) -> String {
    let fallback = || unix_secs.to_string();
    // time_t is 32 bits on some targets.
    let Some(t) = libc::time_t::try_from(unix_secs).ok() else {
        return fallback();
    };
    // SAFETY: tm is plain data; localtime_r only writes through the pointer it is given and
    // returns it, or null on failure (in which case tm is not read).
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return fallback();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        i64::from(tm.tm_year) + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn dur(s: &str) -> Duration {
        parse_duration(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    fn dur_err(s: &str) -> String {
        match parse_duration(s) {
            Ok(d) => panic!("{s:?} parsed to {d:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn size(s: &str) -> u64 {
        parse_size(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    fn size_err(s: &str) -> String {
        match parse_size(s) {
            Ok(n) => panic!("{s:?} parsed to {n}"),
            Err(e) => e.to_string(),
        }
    }

    const MIN: u64 = 60;
    const HOUR: u64 = 3600;

    #[test]
    fn durations() {
        let secs = Duration::from_secs;
        let ms = Duration::from_millis;
        for (s, d) in [
            ("0", secs(0)),
            ("30", secs(30)),
            ("1.5", ms(1500)),
            ("0s", secs(0)),
            ("1.5s", ms(1500)),
            ("250ms", ms(250)),
            ("2m", secs(2 * MIN)),
            ("1h30m", secs(HOUR + 30 * MIN)),
            ("2m5s", secs(2 * MIN + 5)),
            ("14d", secs(14 * DAY_SECS)),
            ("1w", secs(7 * DAY_SECS)),
            ("1.5h", secs(90 * MIN)),
            (".5s", ms(500)),
            ("5.s", secs(5)),
            (
                "1w2d3h4m5s6ms",
                secs(9 * DAY_SECS + 3 * HOUR + 4 * MIN + 5) + ms(6),
            ),
            ("  45s\t", secs(45)),
            ("1H30M", secs(HOUR + 30 * MIN)),
            ("250MS", ms(250)),
            ("2Ms", ms(2)),
            ("1.000000001s", Duration::new(1, 1)),
            ("0.0000000004s", secs(0)),
            ("0.0000000005s", Duration::new(0, 1)),
            ("007s", secs(7)),
            ("36500d", MAX_DURATION),
        ] {
            assert_eq!(dur(s), d, "{s}");
        }
    }

    #[test]
    fn duration_errors() {
        assert_eq!(
            dur_err(""),
            "empty duration: expected e.g. 30s, 5m or 1h30m"
        );
        assert_eq!(dur_err("  "), dur_err(""));
        assert_eq!(
            dur_err("-1s"),
            "invalid duration '-1s': durations cannot be negative"
        );
        assert!(dur_err("-0").contains("cannot be negative"));
        assert_eq!(
            dur_err("5x"),
            "invalid duration '5x': unknown unit 'x' (valid: ms, s, m, h, d, w)"
        );
        assert!(dur_err("5 s").contains("expected a number and a unit"));
        assert!(dur_err("5sec").contains("unknown unit 'sec'"));
        assert!(dur_err("5µs").contains("unknown unit 'µs'"));
        assert_eq!(
            dur_err("1h30"),
            "invalid duration '1h30': the last number has no unit (ms, s, m, h, d or w), as in 1h30m"
        );
        assert!(dur_err("30m1h").contains("largest to smallest"));
        assert!(dur_err("1m1m").contains("largest to smallest"));
        assert!(dur_err("1s500ms1s").contains("largest to smallest"));
        for bad in [
            "abc", "s", "h1", "1..5s", ".s", ".", "+5s", "1e3s", "0x10s", "1,5s", "1_000s", "5s!",
            "5ss",
        ] {
            let e = dur_err(bad);
            assert!(e.starts_with(&format!("invalid duration '{bad}': ")), "{e}");
        }
        for bad in ["nan", "NaN", "inf", "infinity", "-inf"] {
            assert!(dur_err(bad).starts_with("invalid duration"), "{bad}");
        }
        assert_eq!(
            dur_err("36500d1ms"),
            "invalid duration '36500d1ms': too large (at most 36500d, about 100 years)"
        );
        assert!(dur_err("5300w").contains("too large"));
        assert!(dur_err("18446744073709551616").contains("too large"));
        assert!(dur_err("1e400").contains("unknown unit 'e'"));
        assert!(dur_err("101y").contains("unknown unit 'y'"));
        assert!(dur_err(&"9".repeat(100)).contains("too large"));
    }

    #[test]
    fn duration_errors_are_one_line() {
        let e = dur_err("1h\n30m");
        assert!(!e.contains('\n'), "{e}");
        let e = dur_err(&format!("{}x", "1".repeat(500)));
        assert!(e.len() < 200, "{e}");
    }

    #[test]
    fn formats_durations() {
        let ms = Duration::from_millis;
        let secs = Duration::from_secs;
        for (d, s) in [
            (Duration::ZERO, "0s"),
            (Duration::from_nanos(1), "0ms"),
            (Duration::from_micros(499), "0ms"),
            (Duration::from_micros(500), "1ms"),
            (ms(850), "850ms"),
            (ms(999), "999ms"),
            (Duration::from_micros(999_500), "1.0s"),
            (ms(3240), "3.2s"),
            (ms(3250), "3.3s"),
            (ms(9949), "9.9s"),
            (ms(9950), "10s"),
            (secs(59), "59s"),
            (ms(59_500), "1m00s"),
            (secs(125), "2m05s"),
            (secs(HOUR - 1), "59m59s"),
            (secs(HOUR), "1h00m"),
            (secs(HOUR + 2 * MIN + 29), "1h02m"),
            (secs(HOUR + 2 * MIN + 30), "1h03m"),
            (secs(DAY_SECS - 30), "1d00h"),
            (secs(3 * DAY_SECS + 4 * HOUR + 10 * MIN), "3d04h"),
            (secs(10 * DAY_SECS - HOUR / 2), "10d"),
            (secs(15 * DAY_SECS + 3 * HOUR), "15d"),
            (MAX_DURATION, "36500d"),
        ] {
            assert_eq!(format_duration(d), s, "{d:?}");
        }
        // The largest Duration does not overflow.
        assert!(format_duration(Duration::MAX).ends_with('d'));
    }

    #[test]
    fn formats_durations_exactly() {
        for (s, text) in [
            ("0", "0s"),
            ("250ms", "250ms"),
            ("30s", "30s"),
            ("300s", "5m"),
            ("5400s", "1h30m"),
            ("1h0m5s", "1h5s"),
            ("2w", "14d"),
            ("1d1h", "1d1h"),
            ("62.5s", "1m2.5s"),
            ("1m250ms", "1m250ms"),
            ("1m0.25s", "1m250ms"),
            ("1.25s", "1.25s"),
            ("1.000000001s", "1.000000001s"),
            ("36500d", "36500d"),
        ] {
            let d = dur(s);
            assert_eq!(format_duration_exact(d), text, "{s}");
            assert_eq!(dur(text), d, "{text}");
        }
    }

    #[test]
    fn sizes() {
        const K: u64 = 1024;
        for (s, n) in [
            ("0", 0),
            ("1024", 1024),
            ("512B", 512),
            ("10K", 10 * K),
            ("10KB", 10 * K),
            ("10KiB", 10 * K),
            ("10kib", 10 * K),
            ("10kb", 10 * K),
            ("10 K", 10 * K),
            ("1.5G", 3 * K * K * K / 2),
            ("1.5 GiB", 3 * K * K * K / 2),
            ("20G", 20 * K * K * K),
            ("2T", 2 * K * K * K * K),
            ("512M", 512 * K * K),
            ("1P", K.pow(5)),
            ("15E", 15 * K.pow(6)),
            ("0.5K", 512),
            ("0.0001K", 0),
            ("0.0005K", 1),
            (" 7M ", 7 * K * K),
            ("18446744073709551615", u64::MAX),
            ("16383.999999999999999P", u64::MAX),
        ] {
            assert_eq!(size(s), n, "{s}");
        }
    }

    #[test]
    fn size_errors() {
        assert_eq!(
            size_err(""),
            "empty size: expected e.g. 512M, 20G or 1.5GiB"
        );
        assert_eq!(
            size_err("-1G"),
            "invalid size '-1G': sizes cannot be negative"
        );
        assert_eq!(
            size_err("10X"),
            "invalid size '10X': unknown unit 'X' (valid: B, K, M, G, T, P, E, each optionally followed by B or iB)"
        );
        for bad in [
            "10KiBB", "10Kb/s", "10 KB B", "10bit", "10kk", "10ib", "10i",
        ] {
            assert!(size_err(bad).contains("unknown unit"), "{bad}");
        }
        assert_eq!(
            size_err("1.5"),
            "invalid size '1.5': a number of bytes must be whole (use a suffix for fractions, as in 1.5K)"
        );
        assert!(size_err("1.5B").contains("must be whole"));
        for bad in ["abc", "K", ".K", "+5K", "0x10", "nan", "inf", "1e9"] {
            let e = size_err(bad);
            assert!(e.starts_with(&format!("invalid size '{bad}': ")), "{e}");
        }
        assert_eq!(
            size_err("18446744073709551616"),
            "invalid size '18446744073709551616': too large (at most 18446744073709551615 bytes, just under 16 EiB)"
        );
        assert!(size_err("16E").contains("too large"));
        assert!(size_err(&"9".repeat(60)).contains("too large"));
        assert!(!size_err("1\nK").contains('\n'));
        assert!(size_err("1\tK").contains("unknown unit"));
    }

    #[test]
    fn formats_sizes() {
        const K: u64 = 1024;
        for (n, s) in [
            (0, "0 B"),
            (512, "512 B"),
            (1023, "1023 B"),
            (1024, "1.0 KiB"),
            (1536, "1.5 KiB"),
            (12 * K * K + 3 * K * K / 10 + 1, "12.3 MiB"),
            (3 * K * K * K / 2, "1.5 GiB"),
            (K * K - 1, "1.0 MiB"),
            (K * K - 52, "1023.9 KiB"),
            (5 * K.pow(4), "5.0 TiB"),
            (K.pow(5), "1.0 PiB"),
            (K.pow(6), "1.0 EiB"),
            (u64::MAX, "16.0 EiB"),
        ] {
            assert_eq!(format_size(n), s, "{n}");
        }
    }

    #[test]
    fn ages() {
        let now = 1_800_000_000;
        for (ago, s) in [
            (0, "just now"),
            (-5, "just now"),
            (1, "1s ago"),
            (59, "59s ago"),
            (60, "1m ago"),
            (3599, "59m ago"),
            (3600, "1h ago"),
            (2 * 3600 + 59 * 60, "2h ago"),
            (86_399, "23h ago"),
            (86_400, "1d ago"),
            (4 * 86_400 + 3600, "4d ago"),
        ] {
            assert_eq!(format_age(now - ago, now), s, "{ago}");
        }
        assert_eq!(format_age(i64::MIN, i64::MAX), "213503982334601d ago");
        assert_eq!(format_age(i64::MAX, i64::MIN), "just now");
    }

    #[test]
    fn local_time() {
        for t in [0, 1_764_109_903, -1, 4_102_444_800] {
            let s = format_local_time(t);
            let b = s.as_bytes();
            assert_eq!(b.len(), 19, "{s}");
            for (i, &c) in b.iter().enumerate() {
                match i {
                    4 | 7 => assert_eq!(c, b'-', "{s}"),
                    10 => assert_eq!(c, b' ', "{s}"),
                    13 | 16 => assert_eq!(c, b':', "{s}"),
                    _ => assert!(c.is_ascii_digit(), "{s}"),
                }
            }
            // Time zones differ from UTC by whole minutes.
            assert_eq!(s[17..].parse::<i64>().unwrap(), t.rem_euclid(60), "{s}");
        }
        // Beyond what struct tm can hold: the number itself, no panic.
        assert_eq!(format_local_time(i64::MAX), i64::MAX.to_string());
        assert_eq!(format_local_time(i64::MIN), i64::MIN.to_string());
    }

    proptest! {
        #[test]
        fn format_size_never_panics_and_parses_back(n in any::<u64>()) {
            let s = format_size(n);
            if s == "16.0 EiB" {
                let back = parse_size(&s);
                prop_assert!(matches!(back, Err(UnitError::TooLarge { .. })), "{:?}", back);
                return Ok(());
            }
            let back = parse_size(&s).unwrap();
            // One decimal of the unit: off by at most 5% (exact below 1 KiB).
            let err = back.abs_diff(n) as f64;
            prop_assert!(err <= n as f64 * 0.05, "{} -> {} -> {}", n, s, back);
        }

        #[test]
        fn whole_seconds_round_trip(n in 0..=MAX_DURATION.as_secs()) {
            prop_assert_eq!(parse_duration(&format!("{n}s")), Ok(Duration::from_secs(n)));
            prop_assert_eq!(parse_duration(&format!("{n}")), Ok(Duration::from_secs(n)));
        }

        #[test]
        fn exact_durations_round_trip(secs in 0..=MAX_DURATION.as_secs(), nanos in 0..1_000_000_000u32) {
            let d = Duration::new(secs, nanos).min(MAX_DURATION);
            let s = format_duration_exact(d);
            prop_assert_eq!(parse_duration(&s), Ok(d), "{}", s);
        }

        #[test]
        fn formatted_durations_parse_back_close(secs in 0..=MAX_DURATION.as_secs(), nanos in 0..1_000_000_000u32) {
            let d = Duration::new(secs, nanos).min(MAX_DURATION);
            let s = format_duration(d);
            let back = parse_duration(&s).unwrap();
            // 2 or 3 significant figures: within 5%, or half a millisecond.
            let err = back.abs_diff(d).as_secs_f64();
            prop_assert!(err <= d.as_secs_f64() * 0.05 + 0.0005, "{:?} -> {} -> {:?}", d, s, back);
        }

        #[test]
        fn format_duration_never_panics(secs in any::<u64>(), nanos in 0..1_000_000_000u32) {
            let _ = format_duration(Duration::new(secs, nanos));
            let _ = format_duration_exact(Duration::new(secs, nanos));
        }

        #[test]
        fn parse_size_never_panics(s in ".{0,40}") {
            if let Err(e) = parse_size(&s) {
                prop_assert!(!e.to_string().contains('\n'));
            }
        }

        #[test]
        fn parse_size_never_panics_on_size_like_input(s in "[-+ 0-9.]{0,25}[ kKmMgGtTpPeEiIbB]{0,4}") {
            let _ = parse_size(&s);
        }

        #[test]
        fn parse_duration_never_panics(s in ".{0,40}") {
            if let Err(e) = parse_duration(&s) {
                prop_assert!(!e.to_string().contains('\n'));
            }
        }

        #[test]
        fn parse_duration_never_panics_on_duration_like_input(
            s in "([-+ 0-9.]{0,22}(ms|s|m|h|d|w|MS|x)?){0,4}"
        ) {
            if let Ok(d) = parse_duration(&s) {
                prop_assert!(d <= MAX_DURATION);
            }
        }

        #[test]
        fn ages_never_panic(then in any::<i64>(), now in any::<i64>()) {
            let _ = format_age(then, now);
        }
    }
}
