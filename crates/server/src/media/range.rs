//! HTTP `Range` requests (RFC 9110 §14) for one representation of a known size: pure parsing,
//! no I/O. One range is served as `206`; several ranges are answered with the whole object,
//! which the RFC allows and which keeps downloads simple to stream.

use std::ops::Range;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeOutcome {
    /// No (usable) range: send the whole object with `200`.
    Full,
    /// Send these bytes with `206`.
    Partial(Range<u64>),
    /// `416`: no byte of the object is in the range.
    Unsatisfiable,
}

/// Interprets a `Range` header value for an object of `size` bytes. Syntax errors and units
/// other than `bytes` are ignored (the header is then as good as absent), as the RFC requires.
pub fn parse(header: &str, size: u64) -> RangeOutcome {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return RangeOutcome::Full;
    };
    if spec.contains(',') {
        return RangeOutcome::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeOutcome::Full;
    };
    let (first, last) = (first.trim(), last.trim());
    let number = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    if first.is_empty() {
        // A suffix: the last n bytes.
        let Some(n) = number(last) else {
            return RangeOutcome::Full;
        };
        if n == 0 || size == 0 {
            return RangeOutcome::Unsatisfiable;
        }
        return RangeOutcome::Partial(size.saturating_sub(n)..size);
    }
    let Some(start) = number(first) else {
        return RangeOutcome::Full;
    };
    let end = if last.is_empty() {
        size
    } else {
        match number(last) {
            Some(l) if l >= start => l.saturating_add(1).min(size),
            _ => return RangeOutcome::Full,
        }
    };
    if start >= size {
        return RangeOutcome::Unsatisfiable;
    }
    RangeOutcome::Partial(start..end)
}

#[cfg(test)]
mod tests {
    use super::RangeOutcome::*;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_forms_of_one_range() {
        assert_eq!(parse("bytes=0-99", 1000), Partial(0..100));
        assert_eq!(parse("bytes=900-", 1000), Partial(900..1000));
        assert_eq!(parse("bytes=-100", 1000), Partial(900..1000));
        assert_eq!(parse("bytes=-5000", 1000), Partial(0..1000));
        assert_eq!(parse("bytes=990-5000", 1000), Partial(990..1000));
        assert_eq!(parse("bytes= 5 - 9 ", 1000), Partial(5..10));
    }

    #[test]
    fn unsatisfiable_and_ignored() {
        assert_eq!(parse("bytes=1000-", 1000), Unsatisfiable);
        assert_eq!(parse("bytes=-0", 1000), Unsatisfiable);
        assert_eq!(parse("bytes=0-", 0), Unsatisfiable);
        for ignored in [
            "items=0-1",
            "bytes=5-1",
            "bytes=a-b",
            "bytes=0-1,5-6",
            "bytes=",
            "bytes=-",
            "bytes=+1-2",
            "bytes=99999999999999999999999-",
        ] {
            assert_eq!(parse(ignored, 1000), Full, "{ignored}");
        }
    }

    proptest! {
        #[test]
        fn partial_ranges_are_inside_the_object(header in ".{0,40}", size in 0u64..10_000) {
            if let Partial(r) = parse(&header, size) {
                prop_assert!(r.start < r.end && r.end <= size);
            }
        }

        #[test]
        fn explicit_ranges_are_exact(size in 1u64..10_000, a in 0u64..10_000, len in 1u64..10_000) {
            let b = a + len - 1;
            let got = parse(&format!("bytes={a}-{b}"), size);
            if a >= size {
                prop_assert_eq!(got, Unsatisfiable);
            } else {
                prop_assert_eq!(got, Partial(a..(b + 1).min(size)));
            }
        }
    }
}
