//! Parsers for the kinds of value several sections share: addresses,
//! interface names, namespaces, bounded integers, durations. Each returns
//! the [`Reason`] a value is rejected; the section attaches the key.
use std::{
    net::Ipv4Addr,
    ops::RangeInclusive,
    path::{Path, PathBuf},
    time::Duration,
};

use super::{
    error::{AddressForm, DurationProblem, NameProblem, Reason},
    MAX_TAP_NAME_LEN,
};
use crate::net::{Ipv4Net, PortRange};

/// `net` with the host bits cleared: the subnet, for messages.
pub(super) fn net_of(net: &Ipv4Net) -> Ipv4Net {
    Ipv4Net {
        addr: net.network(),
        prefix_len: net.prefix_len,
    }
}

pub(super) fn cidr(s: &str) -> Result<Ipv4Net, Reason> {
    s.parse().map_err(Reason::BadCidr)
}

/// An interface address: a CIDR whose address is a host of its own prefix.
pub(super) fn host_address(s: &str) -> Result<Ipv4Net, Reason> {
    let net = cidr(s)?;
    if net.prefix_len == 0 {
        return Err(Reason::ZeroPrefix);
    }
    host_of(net.addr, &net)?;
    Ok(net)
}

/// `addr` is a host address of `subnet`: not its network or broadcast
/// address (which /31 and /32 do not have, RFC 3021).
pub(super) fn host_of(addr: Ipv4Addr, subnet: &Ipv4Net) -> Result<(), Reason> {
    let host = Ipv4Net {
        addr,
        prefix_len: subnet.prefix_len,
    };
    if host.is_host_address() {
        Ok(())
    } else {
        Err(Reason::NotHost {
            addr,
            subnet: net_of(subnet),
        })
    }
}

/// `part` of `input` as an IPv4 address written in `form`.
pub(super) fn ipv4(input: &str, part: &str, form: AddressForm) -> Result<Ipv4Addr, Reason> {
    part.trim().parse().map_err(|_| Reason::BadAddress {
        input: input.to_string(),
        part: part.trim().to_string(),
        form,
    })
}

pub(super) fn ports(s: &str) -> Result<PortRange, Reason> {
    s.parse().map_err(Reason::BadPorts)
}

/// A Linux interface name: 1 to 15 bytes, not `.` or `..`, no `/`, `:` or
/// whitespace.
pub(super) fn tap_name(name: String) -> Result<String, Reason> {
    let problem = if name.is_empty() {
        NameProblem::Empty
    } else if name.len() > MAX_TAP_NAME_LEN {
        NameProblem::TooLong {
            len: name.len(),
            max: MAX_TAP_NAME_LEN,
        }
    } else if name == "." || name == ".." {
        NameProblem::Dots
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        NameProblem::BadChar
    } else {
        return Ok(name);
    };
    Err(Reason::BadTapName { name, problem })
}

/// An empty string means "no namespace", so an environment variable can
/// clear a file's `netns`. Otherwise an absolute path: a bare `pod` is most
/// likely meant as `/run/netns/pod`, and a path relative to the working
/// directory would be a surprise.
pub(super) fn netns(raw: Option<String>) -> Result<Option<PathBuf>, Reason> {
    match raw.filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(s) if Path::new(&s).is_absolute() => Ok(Some(PathBuf::from(s))),
        Some(path) => Err(Reason::RelativeNetns { path }),
    }
}

/// `value` as a `T` within `range`; `zero_means` explains a 0 minimum in
/// the message.
pub(super) fn bounded<T>(
    value: i64,
    range: RangeInclusive<T>,
    zero_means: Option<&'static str>,
) -> Result<T, Reason>
where
    T: TryFrom<i64> + PartialOrd + Copy,
    i64: TryFrom<T>,
{
    match T::try_from(value) {
        Ok(v) if range.contains(&v) => Ok(v),
        _ => Err(Reason::OutOfRange {
            value,
            min: i64::try_from(*range.start()).unwrap_or(i64::MIN),
            max: i64::try_from(*range.end()).unwrap_or(i64::MAX),
            zero_means,
        }),
    }
}

/// A duration above zero.
pub(super) fn duration(s: &str) -> Result<Duration, Reason> {
    match duration_or_zero(s)? {
        d if d.is_zero() => Err(Reason::ZeroDuration {
            input: s.to_string(),
        }),
        d => Ok(d),
    }
}

/// A duration that may be zero (`"0s"`).
pub(super) fn duration_or_zero(s: &str) -> Result<Duration, Reason> {
    parse_duration(s).map_err(|problem| Reason::BadDuration {
        input: s.to_string(),
        problem,
    })
}

/// Parse `2h4m`, `300s`, `1500ms`, `50us`: numbers each followed by a unit
/// (h, m, s, ms, us), units in decreasing order, each at most once.
pub(super) fn parse_duration(s: &str) -> Result<Duration, DurationProblem> {
    if s.is_empty() {
        return Err(DurationProblem::Empty);
    }
    let mut rest = s;
    let mut total = Duration::ZERO;
    let mut last_rank = u8::MAX;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(DurationProblem::NoNumber);
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| DurationProblem::TooLarge)?;
        rest = &rest[digits..];
        let (unit, rank, len) = if rest.starts_with("us") {
            (Duration::from_micros(1), 0, 2)
        } else if rest.starts_with("ms") {
            (Duration::from_millis(1), 1, 2)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 2, 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 3, 1)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 4, 1)
        } else if rest.is_empty() {
            return Err(DurationProblem::MissingUnit);
        } else {
            return Err(DurationProblem::UnknownUnit);
        };
        if rank >= last_rank {
            return Err(DurationProblem::UnitOrder);
        }
        last_rank = rank;
        rest = &rest[len..];
        let part = u32::try_from(n)
            .ok()
            .and_then(|n| unit.checked_mul(n))
            .ok_or(DurationProblem::TooLarge)?;
        total = total.checked_add(part).ok_or(DurationProblem::TooLarge)?;
    }
    Ok(total)
}

/// `7440s` -> `2h4m`, for messages.
pub(crate) fn format_duration(d: Duration) -> String {
    if d.subsec_nanos() % 1_000_000 != 0 {
        return format!("{}us", d.as_micros());
    }
    if d.subsec_millis() != 0 || d.as_secs() == 0 {
        return format!("{}ms", d.as_millis());
    }
    let s = d.as_secs();
    let mut out = String::new();
    for (n, unit) in [(s / 3600, "h"), (s % 3600 / 60, "m"), (s % 60, "s")] {
        if n != 0 {
            out.push_str(&format!("{n}{unit}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accepted() {
        for (s, want) in [
            ("300s", Duration::from_secs(300)),
            ("5m", Duration::from_secs(300)),
            ("2h4m", Duration::from_secs(7440)),
            ("1500ms", Duration::from_millis(1500)),
            ("2h", Duration::from_secs(7200)),
            ("1h2m3s4ms", Duration::from_millis(3_723_004)),
        ] {
            assert_eq!(parse_duration(s), Ok(want), "{s}");
        }
        assert_eq!(format_duration(Duration::from_secs(7440)), "2h4m");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(parse_duration("50us"), Ok(Duration::from_micros(50)));
        assert_eq!(parse_duration("1ms500us"), Ok(Duration::from_micros(1500)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(format_duration(Duration::from_micros(1500)), "1500us");
        assert_eq!(format_duration(Duration::ZERO), "0ms");
    }

    #[test]
    fn durations_rejected_with_their_problem() {
        use DurationProblem::*;
        for (s, want) in [
            ("", Empty),
            ("s", NoNumber),
            ("-1s", NoNumber),
            (" 5s", NoNumber),
            ("5", MissingUnit),
            ("1.5s", UnknownUnit),
            ("5x", UnknownUnit),
            ("5s2m", UnitOrder),
            ("1m1m", UnitOrder),
            ("5us1ms", UnitOrder),
            ("99999999999999999999s", TooLarge),
            ("5000000000h", TooLarge),
        ] {
            assert_eq!(parse_duration(s), Err(want), "{s:?}");
        }
    }

    #[test]
    fn bounded_reports_the_range() {
        assert_eq!(bounded(576, 576u16..=9000, None), Ok(576u16));
        assert_eq!(
            bounded(70000, 576u16..=9000, None),
            Err(Reason::OutOfRange {
                value: 70000,
                min: 576,
                max: 9000,
                zero_means: None
            })
        );
        assert!(bounded(-1, 0usize..=256, Some("one per core")).is_err());
        assert_eq!(
            bounded(u32::MAX.into(), 0u32..=u32::MAX, None),
            Ok(u32::MAX)
        );
    }
}
