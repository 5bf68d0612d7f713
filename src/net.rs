//! Plain network types shared by every layer: an IPv4 prefix and a port range.
//!
//! Nothing here knows about configuration keys, flows or devices.
use std::{fmt, net::Ipv4Addr, str::FromStr};

/// An IPv4 address with a prefix length, e.g. `10.244.0.1/16`.
///
/// `addr` keeps the host bits as written. `prefix_len` is at most 32 when
/// parsed; the methods treat a larger value as 32 rather than panic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

impl Ipv4Net {
    fn mask(&self) -> u32 {
        match self.prefix_len.min(32) {
            0 => 0,
            n => u32::MAX << (32 - n),
        }
    }

    /// Whether `ip` is inside this prefix.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr) & self.mask()
    }

    /// The address with the host bits cleared.
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    /// The address with the host bits set.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask())
    }

    /// Whether the two prefixes share any address.
    pub fn overlaps(&self, other: &Ipv4Net) -> bool {
        self.contains(other.network()) || other.contains(self.network())
    }

    /// Whether `addr` is usable as a host address of this prefix: not the
    /// network or broadcast address, except on /31 and /32 (RFC 3021).
    pub fn is_host_address(&self) -> bool {
        self.prefix_len >= 31 || (self.addr != self.network() && self.addr != self.broadcast())
    }
}

/// Why a string is not an [`Ipv4Net`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Ipv4NetError {
    #[error("invalid CIDR {input:?}: {problem}")]
    Invalid {
        input: String,
        problem: &'static str,
    },
}

impl FromStr for Ipv4Net {
    type Err = Ipv4NetError;

    /// `a.b.c.d/n`; a bare address means `/32`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |problem| Ipv4NetError::Invalid {
            input: s.to_string(),
            problem,
        };
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| fail("not an IPv4 address (expected a.b.c.d/n)"))?;
        let prefix_len = match prefix {
            None => 32,
            Some(p) if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) => {
                return Err(fail("prefix length must be a number 0 to 32"))
            }
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= 32 => n,
                _ => return Err(fail("prefix length must be 0 to 32")),
            },
        };
        Ok(Ipv4Net { addr, prefix_len })
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// An inclusive range of ports, `1 <= first <= last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    /// Whether `port` is inside the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    /// Whether the two ranges share any port.
    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.first <= other.last && other.first <= self.last
    }
}

/// Why a string is not a [`PortRange`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortRangeError {
    /// A part is not a number 0 to 65535.
    #[error("{input:?}: {part:?} is not a port number 1 to 65535")]
    NotAPort { input: String, part: String },
    /// Port 0 cannot be sent to or from.
    #[error("{input:?}: port 0 is not allowed")]
    Zero { input: String },
    /// `FIRST-LAST` with `FIRST` above `LAST`.
    #[error("{input:?}: first port {first} is above last port {last}")]
    Reversed {
        input: String,
        first: u16,
        last: u16,
    },
}

impl FromStr for PortRange {
    type Err = PortRangeError;

    /// `"8080"` or `"8000-8099"`, each port 1 to 65535; spaces around a
    /// port are allowed.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let port = |p: &str| match p.trim().parse::<u16>() {
            Ok(0) => Err(PortRangeError::Zero {
                input: s.to_string(),
            }),
            Ok(n) => Ok(n),
            Err(_) => Err(PortRangeError::NotAPort {
                input: s.to_string(),
                part: p.trim().to_string(),
            }),
        };
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let (first, last) = (port(a)?, port(b)?);
        if first > last {
            return Err(PortRangeError::Reversed {
                input: s.to_string(),
                first,
                last,
            });
        }
        Ok(PortRange { first, last })
    }
}

/// `8080` or `8000-8099`, as written in the file.
impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    // ---- Ipv4Net ----

    #[test]
    fn ipv4net_parse_and_methods() {
        let n = net("10.244.0.1/16");
        assert_eq!(n.addr, Ipv4Addr::new(10, 244, 0, 1));
        assert_eq!(n.prefix_len, 16);
        assert_eq!(n.to_string(), "10.244.0.1/16");
        assert_eq!(n.network(), Ipv4Addr::new(10, 244, 0, 0));
        assert_eq!(n.broadcast(), Ipv4Addr::new(10, 244, 255, 255));
        assert!(n.contains(Ipv4Addr::new(10, 244, 200, 3)));
        assert!(!n.contains(Ipv4Addr::new(10, 245, 0, 1)));
        assert!(n.overlaps(&net("10.0.0.0/8")));
        assert!(net("10.0.0.0/8").overlaps(&n));
        assert!(!n.overlaps(&net("10.245.0.0/16")));
        assert_eq!(net("192.0.2.7"), net("192.0.2.7/32"));
        let all = net("0.0.0.0/0");
        assert!(all.contains(Ipv4Addr::new(255, 255, 255, 255)));
        assert_eq!(all.broadcast(), Ipv4Addr::BROADCAST);
    }

    #[test]
    fn ipv4net_rejects() {
        for bad in [
            "",
            "10.0.0.1/33",
            "10.0.0.1/",
            "10.0.0.1/-1",
            "10.0.0/8",
            "x/8",
            "10.0.0.1/8/8",
        ] {
            assert!(bad.parse::<Ipv4Net>().is_err(), "{bad:?} accepted");
        }
    }

    // ---- PortRange ----

    #[test]
    fn port_range_parse() {
        let r = |first, last| PortRange { first, last };
        assert_eq!("8080".parse(), Ok(r(8080, 8080)));
        assert_eq!("1-65535".parse(), Ok(r(1, 65535)));
        assert_eq!(" 10 - 20 ".parse(), Ok(r(10, 20)));
        assert_eq!(r(8000, 8099).to_string(), "8000-8099");
        assert_eq!(r(53, 53).to_string(), "53");
    }

    #[test]
    fn port_range_rejects() {
        use PortRangeError::*;
        assert!(matches!("0".parse::<PortRange>(), Err(Zero { .. })));
        assert!(matches!("0-100".parse::<PortRange>(), Err(Zero { .. })));
        assert!(matches!(
            "2000-1000".parse::<PortRange>(),
            Err(Reversed {
                first: 2000,
                last: 1000,
                ..
            })
        ));
        for bad in ["1024-65536", "70000", "", "a-b", "1-2-3", "-5"] {
            assert!(
                matches!(bad.parse::<PortRange>(), Err(NotAPort { .. })),
                "{bad:?}"
            );
        }
        assert_eq!(
            "a-b".parse::<PortRange>().unwrap_err().to_string(),
            "\"a-b\": \"a\" is not a port number 1 to 65535"
        );
    }
}
