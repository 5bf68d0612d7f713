//! `uplink.address = "dhcp"`: what a DHCPv4 lease means for the gateway
//! (pure; the client itself is smoltcp's `dhcpv4` socket on the uplink
//! stack, see `local` and `control`, which does discovery, renewal at T1
//! and rebinding at T2, RFC 2131 §4.4.5).
//!
//! [`LeaseState`] turns the socket's events into changes of the outside
//! address: a first lease, a renewal that keeps the address, a new
//! address (the old one's flows are flushed, as the kernel's
//! `nf_nat_masquerade` does on `NETDEV_DOWN` / `NETDEV_CHANGEADDR` and
//! `inet` address events) and a lost lease (flushed too; until the next
//! lease outbound packets are dropped and counted `drop_no_lease`). A
//! lease the gateway cannot use is refused and treated as no lease.
use std::net::Ipv4Addr;

use crate::net::Ipv4Net;

/// A lease in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The outside address with the leased subnet's prefix.
    pub address: Ipv4Net,
    /// The next hop: the lease's router, else `uplink.gateway`.
    pub router: Ipv4Addr,
    /// The server that granted it.
    pub server: Ipv4Addr,
    /// When it was granted or last renewed, and when it ends (gateway
    /// clock, ms), capped by the client's maximum lease time.
    pub granted_ms: u64,
    pub expires_ms: u64,
}

impl Lease {
    /// Seconds left until the lease ends, at `now_ms`.
    pub fn secs_left(&self, now_ms: u64) -> u64 {
        self.expires_ms.saturating_sub(now_ms) / 1000
    }
}

/// What a DHCP event changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Nothing the data path sees (a renewal with the same address and
    /// next hop, or still no lease).
    Same,
    /// The outside address or next hop is now `new` (`None`: no lease);
    /// flows on `old` (if any) are to be flushed when the address differs.
    Readdress {
        old: Option<Ipv4Net>,
        new: Option<(Ipv4Net, Ipv4Addr)>,
    },
}

/// Why a lease was not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("leased subnet {lease} overlaps pod.address {pod}")]
    OverlapsPod { lease: Ipv4Net, pod: Ipv4Net },
    #[error("leased address {addr} is inside masquerade source {rule}")]
    InSource { addr: Ipv4Addr, rule: Ipv4Net },
    #[error("the lease names no router and uplink.gateway {gateway} is outside the leased subnet {lease}")]
    NoRouter { gateway: Ipv4Addr, lease: Ipv4Net },
}

/// An offer as the client accepted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offer {
    pub address: Ipv4Net,
    pub router: Option<Ipv4Addr>,
    pub server: Ipv4Addr,
    /// The lease time the server granted (seconds); `None` if unknown.
    pub lease_secs: Option<u32>,
}

/// The lease the gateway uses, and the checks a new one must pass.
#[derive(Debug, Clone)]
pub struct LeaseState {
    current: Option<Lease>,
    pod_net: Ipv4Net,
    sources: Vec<Ipv4Net>,
    fallback_gateway: Ipv4Addr,
    max_lease_ms: Option<u64>,
}

/// Lease time assumed when the server names none (RFC 2131 requires the
/// option in an ACK; smoltcp assumes 120 s as well).
const DEFAULT_LEASE_SECS: u32 = 120;

impl LeaseState {
    /// `sources` are the masquerade sources a leased address must lie
    /// outside of; `fallback_gateway` is `uplink.gateway`.
    pub fn new(
        pod_net: Ipv4Net,
        sources: Vec<Ipv4Net>,
        fallback_gateway: Ipv4Addr,
        max_lease_ms: Option<u64>,
    ) -> LeaseState {
        LeaseState {
            current: None,
            pod_net,
            sources,
            fallback_gateway,
            max_lease_ms,
        }
    }

    pub fn current(&self) -> Option<Lease> {
        self.current
    }

    /// The client has (or renewed) a lease. A lease the gateway cannot use
    /// drops the current one, if any.
    pub fn configured(&mut self, offer: Offer, now_ms: u64) -> (Change, Option<Refused>) {
        match self.check(&offer) {
            Ok(router) => {
                let mut ms = u64::from(offer.lease_secs.unwrap_or(DEFAULT_LEASE_SECS)) * 1000;
                if let Some(max) = self.max_lease_ms {
                    ms = ms.min(max);
                }
                let lease = Lease {
                    address: offer.address,
                    router,
                    server: offer.server,
                    granted_ms: now_ms,
                    expires_ms: now_ms.saturating_add(ms),
                };
                let old = self.current.replace(lease);
                let change = match old {
                    Some(o) if o.address == lease.address && o.router == lease.router => {
                        Change::Same
                    }
                    _ => Change::Readdress {
                        old: old.map(|o| o.address),
                        new: Some((lease.address, lease.router)),
                    },
                };
                (change, None)
            }
            Err(why) => (self.deconfigured(), Some(why)),
        }
    }

    /// The client has no lease any more (a NAK, or it expired).
    pub fn deconfigured(&mut self) -> Change {
        match self.current.take() {
            Some(o) => Change::Readdress {
                old: Some(o.address),
                new: None,
            },
            None => Change::Same,
        }
    }

    fn check(&self, offer: &Offer) -> Result<Ipv4Addr, Refused> {
        if self.pod_net.overlaps(&offer.address) {
            return Err(Refused::OverlapsPod {
                lease: offer.address,
                pod: self.pod_net,
            });
        }
        if let Some(s) = self.sources.iter().find(|s| s.contains(offer.address.addr)) {
            return Err(Refused::InSource {
                addr: offer.address.addr,
                rule: *s,
            });
        }
        match offer.router {
            Some(r) => Ok(r),
            None if offer.address.contains(self.fallback_gateway)
                && self.fallback_gateway != offer.address.addr =>
            {
                Ok(self.fallback_gateway)
            }
            None => Err(Refused::NoRouter {
                gateway: self.fallback_gateway,
                lease: offer.address,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn offer(addr: &str, router: Option<[u8; 4]>) -> Offer {
        Offer {
            address: net(addr),
            router: router.map(Ipv4Addr::from),
            server: Ipv4Addr::new(192, 0, 2, 1),
            lease_secs: Some(600),
        }
    }

    fn state(max: Option<u64>) -> LeaseState {
        LeaseState::new(
            net("10.244.0.1/16"),
            vec![net("10.244.0.0/16")],
            Ipv4Addr::new(192, 0, 2, 254),
            max,
        )
    }

    #[test]
    fn first_lease_then_renewal_then_new_address_then_loss() {
        let mut s = state(None);
        assert_eq!(s.deconfigured(), Change::Same, "no lease to lose yet");
        let (c, why) = s.configured(offer("192.0.2.50/24", Some([192, 0, 2, 1])), 1000);
        assert_eq!(why, None);
        assert_eq!(
            c,
            Change::Readdress {
                old: None,
                new: Some((net("192.0.2.50/24"), Ipv4Addr::new(192, 0, 2, 1)))
            }
        );
        let l = s.current().unwrap();
        assert_eq!((l.granted_ms, l.expires_ms), (1000, 601_000));
        assert_eq!(l.secs_left(301_000), 300);
        assert_eq!(l.secs_left(700_000), 0);
        // A renewal keeps the address: nothing is flushed, the end moves.
        let (c, _) = s.configured(offer("192.0.2.50/24", Some([192, 0, 2, 1])), 5000);
        assert_eq!(c, Change::Same);
        assert_eq!(s.current().unwrap().expires_ms, 605_000);
        // Another address: the old one's flows go.
        let (c, _) = s.configured(offer("192.0.2.77/24", Some([192, 0, 2, 1])), 6000);
        assert_eq!(
            c,
            Change::Readdress {
                old: Some(net("192.0.2.50/24")),
                new: Some((net("192.0.2.77/24"), Ipv4Addr::new(192, 0, 2, 1)))
            }
        );
        // Same address, new router: the next hop changes, no flows are lost
        // by the address (the caller compares the addresses).
        let (c, _) = s.configured(offer("192.0.2.77/24", Some([192, 0, 2, 2])), 7000);
        assert!(matches!(c, Change::Readdress { old: Some(o), .. } if o == net("192.0.2.77/24")));
        assert_eq!(
            s.deconfigured(),
            Change::Readdress {
                old: Some(net("192.0.2.77/24")),
                new: None
            }
        );
        assert_eq!(s.current(), None);
    }

    #[test]
    fn the_lease_time_is_capped_and_defaults() {
        let mut s = state(Some(10_000));
        s.configured(offer("192.0.2.50/24", Some([192, 0, 2, 1])), 0);
        assert_eq!(s.current().unwrap().expires_ms, 10_000);
        let mut s = state(None);
        let mut o = offer("192.0.2.50/24", Some([192, 0, 2, 1]));
        o.lease_secs = None;
        s.configured(o, 0);
        assert_eq!(s.current().unwrap().expires_ms, 120_000);
    }

    #[test]
    fn unusable_leases_are_refused_and_drop_the_current_one() {
        let mut s = state(None);
        s.configured(offer("192.0.2.50/24", Some([192, 0, 2, 1])), 0);
        let (c, why) = s.configured(offer("10.244.9.9/24", Some([10, 244, 9, 1])), 1);
        assert!(matches!(why, Some(Refused::OverlapsPod { .. })), "{why:?}");
        assert!(matches!(c, Change::Readdress { new: None, .. }));
        assert_eq!(s.current(), None);
        let mut s = LeaseState::new(
            net("10.244.0.1/16"),
            vec![net("172.16.0.0/12")],
            Ipv4Addr::new(192, 0, 2, 254),
            None,
        );
        let (_, why) = s.configured(offer("172.17.0.5/24", Some([172, 17, 0, 1])), 1);
        assert!(matches!(why, Some(Refused::InSource { .. })), "{why:?}");
        // No router: uplink.gateway when it is on the leased subnet.
        let (c, why) = s.configured(offer("192.0.2.50/24", None), 2);
        assert_eq!(why, None);
        assert_eq!(s.current().unwrap().router, Ipv4Addr::new(192, 0, 2, 254));
        assert!(matches!(c, Change::Readdress { new: Some(_), .. }));
        let (_, why) = s.configured(offer("198.51.100.7/24", None), 3);
        assert!(matches!(why, Some(Refused::NoRouter { .. })), "{why:?}");
        assert_eq!(s.current(), None);
    }
}
