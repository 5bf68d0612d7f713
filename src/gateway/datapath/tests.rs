//! The core's decisions, path by path, without devices or root: frames are
//! built with `wire::build`, fed to [`Core::frame`], and the actions (and
//! counters) checked.
use std::net::Ipv4Addr;
use std::sync::Arc;

use smoltcp::wire::EthernetAddress;

use super::*;
use crate::config::{Forward, ForwardProtocol, MasqueradeRule};
use crate::gateway::neighbour::{Event, News};
use crate::nat::frag::FragCacheConfig;
use crate::nat::{Filtering, Proto, TableConfig, Timeouts};
use crate::net::{Ipv4Net, PortRange};
use crate::policy::mac_for;
use crate::wire::build::{self, checksums_ok, Endpoints};
use crate::wire::vnet::{VnetHdr, F_NEEDS_CSUM, GSO_TCPV4, GSO_UDP_L4, VNET_HDR_LEN};
use crate::wire::{csum, fragment, Classified, ICMP_ERROR_FRAME_MAX};

pub(crate) const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
const POD2: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 3);
pub(crate) const TARGET: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 9);
pub(crate) const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const EXCLUDED: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
pub(crate) const EXT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub(crate) const GW: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
pub(crate) const ON_LINK: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 77);
pub(crate) const FORWARDED: u16 = 8080;
pub(crate) const POD_MAC: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 2]);
pub(crate) const GW_MAC: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 0xfe]);
const PORT_UNREACHABLE: IcmpErrorKind = IcmpErrorKind {
    icmp_type: wire::ICMP_DEST_UNREACHABLE,
    code: 3,
    rest: 0,
};

fn net(a: Ipv4Addr, len: u8) -> Ipv4Net {
    Ipv4Net {
        addr: a,
        prefix_len: len,
    }
}

/// Pods 10.244.0.0/16 behind 203.0.113.10, pod-to-pod and 192.0.2.0/24
/// routed, TCP 8080 forwarded to 10.244.0.9:80.
pub(crate) fn addressing(uplink_mtu: usize) -> Addressing {
    let forward = [Forward {
        protocol: ForwardProtocol::Tcp,
        ports: PortRange {
            first: FORWARDED,
            last: FORWARDED,
        },
        to_addr: TARGET,
        to_port: 80,
    }];
    Addressing {
        pod_mac: mac_for(Ipv4Addr::new(10, 244, 0, 1), 0),
        pod_net: net(Ipv4Addr::new(10, 244, 0, 1), 16),
        pod_mtu: 1500,
        uplink_mac: mac_for(EXT, 1),
        uplink_net: net(EXT, 24),
        uplink_gateway: GW,
        dhcp: false,
        uplink_mtu,
        masquerade: vec![MasqueradeRule {
            source: net(Ipv4Addr::new(10, 244, 0, 0), 16),
            exclude: vec![
                net(Ipv4Addr::new(10, 244, 0, 0), 16),
                net(Ipv4Addr::new(192, 0, 2, 0), 24),
            ],
        }],
        snat: vec![],
        forward_targets: crate::policy::forwarded_ports(&forward)
            .map(|(proto, ext, to, to_port)| ((proto, to, to_port), ext))
            .collect(),
    }
}

pub(crate) struct Rig {
    pub core: Core,
    pub c: Arc<Counters>,
    pub pool: Pool,
    pub a: Arc<Addressing>,
    out: Actions,
    now: u64,
}

pub(crate) struct Setup {
    pub worker: usize,
    pub workers: usize,
    pub uplink_mtu: usize,
    /// Bytes of virtio-net header (0 or VNET_HDR_LEN).
    pub hdr: usize,
    pub icmp_burst: u32,
    pub max_flows: usize,
    /// Fragment handling on.
    pub frags: bool,
}

pub(crate) const ONE: Setup = Setup {
    worker: 0,
    workers: 1,
    uplink_mtu: 1500,
    hdr: 0,
    icmp_burst: 50,
    max_flows: 1024,
    frags: true,
};

pub(crate) fn rig(s: Setup) -> Rig {
    let a = Arc::new(addressing(s.uplink_mtu));
    let mut table = FlowTable::new(TableConfig {
        worker: s.worker as u16,
        workers: s.workers as u16,
        port_first: 1024,
        port_last: 65535,
        max_flows: s.max_flows,
        max_flows_per_pod: 0,
        ports_per_pod: 0,
        timeouts: Timeouts {
            tcp_established_ms: 7_440_000,
            tcp_transitory_ms: 240_000,
            udp_ms: 300_000,
            icmp_ms: 60_000,
        },
        seed: 1,
        filtering: Filtering::Address,
        port_reuse_delay_ms: 0,
    });
    if usize::from(FORWARDED) % s.workers == s.worker {
        table
            .add_forward(Proto::Tcp, EXT, FORWARDED, TARGET, 80)
            .unwrap();
    }
    let pool = Pool::new(64, s.hdr + 14 + 65535 + 64, s.hdr);
    let c = Arc::new(Counters::default());
    let mut core = Core::new(CoreParts {
        worker: s.worker,
        workers: s.workers,
        addressing: a.clone(),
        table,
        frags: s.frags.then(|| {
            FragCache::new(FragCacheConfig {
                max_datagrams: 16,
                max_held_fragments: 8,
                max_held_bytes: 1 << 16,
                timeout_ms: 2000,
            })
        }),
        icmp_limit: Some(IcmpRateLimit::new(1, s.icmp_burst)),
        pool: pool.clone(),
        counters: c.clone(),
    });
    for (ip, mac) in [
        (GW, GW_MAC),
        (POD, POD_MAC),
        (POD2, POD_MAC),
        (TARGET, POD_MAC),
    ] {
        core.neighbour(ip, News::Reachable(mac));
    }
    Rig {
        core,
        c,
        pool,
        a,
        out: Vec::new(),
        now: 1000,
    }
}

impl Rig {
    /// Feeds one frame (behind a zeroed header, if any) and returns the
    /// actions, leaving out `Neighbour` news for the control thread.
    fn input(&mut self, side: Side, frame: &[u8]) -> Vec<Action> {
        let buf = self.pool.frame(frame).unwrap();
        self.feed(side, buf)
    }
    fn feed(&mut self, side: Side, buf: Buf) -> Vec<Action> {
        self.core.frame(side, buf, self.now, &mut self.out);
        self.take()
    }
    fn take(&mut self) -> Vec<Action> {
        self.out
            .drain(..)
            .filter(|a| !matches!(a, Action::Neighbour(_)))
            .collect()
    }
    /// Feeds a frame that must come out as exactly one frame on `to`.
    fn through(&mut self, from: Side, frame: &[u8], to: Side) -> Vec<u8> {
        let (side, f) = sent(self.input(from, frame));
        assert_eq!(side, to);
        f
    }
    fn get(&self, c: Counter) -> u64 {
        self.c.get(c)
    }
}

/// The one frame an action list sends.
fn sent(actions: Vec<Action>) -> (Side, Vec<u8>) {
    match <[Action; 1]>::try_from(actions) {
        Ok([Action::Send { side, buf }]) => (side, buf.frame().to_vec()),
        Ok([other]) => panic!("not sent: {other:?}"),
        Err(v) => panic!("not one action: {v:?}"),
    }
}

fn dropped(actions: Vec<Action>) -> Counter {
    match <[Action; 1]>::try_from(actions) {
        Ok([Action::Drop { why, .. }]) => why,
        Ok([other]) => panic!("not dropped: {other:?}"),
        Err(v) => panic!("not one action: {v:?}"),
    }
}

pub(crate) fn view(frame: &[u8]) -> Ipv4View {
    match wire::classify(frame) {
        Ok(Classified::Ipv4(v)) => v,
        other => panic!("not IPv4: {other:?}"),
    }
}

pub(crate) fn pod_ep(a: &Addressing, src: Ipv4Addr, dst: Ipv4Addr) -> Endpoints {
    let mut e = Endpoints::new(src, dst);
    e.src_mac = POD_MAC;
    e.dst_mac = a.pod_mac;
    e
}

pub(crate) fn up_ep(a: &Addressing, src: Ipv4Addr, dst: Ipv4Addr) -> Endpoints {
    let mut e = Endpoints::new(src, dst);
    e.src_mac = GW_MAC;
    e.dst_mac = a.uplink_mac;
    e
}

/// The source or destination (address, port) of a translated frame.
pub(crate) fn src(f: &[u8]) -> (Ipv4Addr, u16) {
    let v = view(f);
    (v.src, v.ports().unwrap().0)
}
pub(crate) fn dst(f: &[u8]) -> (Ipv4Addr, u16) {
    let v = view(f);
    (v.dst, v.ports().unwrap().1)
}

/// Clears DF and fixes the IPv4 header checksum.
fn clear_df(f: &mut [u8]) {
    f[14 + 6] &= !0x40;
    f[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
    let c = csum::checksum(&f[14..34]);
    f[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
}

/// A UDP datagram of 3000 payload bytes without DF and with IP id `id`,
/// cut into three fragments.
fn fragments(ep: &Endpoints, sport: u16, id: u16) -> Vec<Vec<u8>> {
    let mut f = build::udp(ep, sport, 53, &[7u8; 3000], true);
    f[14 + 4..14 + 6].copy_from_slice(&id.to_be_bytes());
    clear_df(&mut f);
    let mtu = 1500;
    let mut out = Vec::new();
    fragment::fragment(&f, mtu, &mut |p: &[u8]| out.push(p.to_vec())).unwrap();
    out
}

#[test]
fn tcp_translates_out_and_back_in() {
    let mut r = rig(ONE);
    let syn = build::tcp(&pod_ep(&r.a, POD, REMOTE), 40000, 443, wire::TCP_SYN, b"");
    let out = r.through(Side::Pod, &syn, Side::Uplink);
    assert_eq!(src(&out), (EXT, 40000), "port preserved");
    assert_eq!(dst(&out), (REMOTE, 443));
    assert_eq!(wire::macs(&out), (GW_MAC, r.a.uplink_mac));
    assert_eq!(view(&out).ttl, 63);
    assert!(checksums_ok(&out));
    let syn_ack = build::tcp(
        &up_ep(&r.a, REMOTE, EXT),
        443,
        40000,
        wire::TCP_SYN | wire::TCP_ACK,
        b"hi",
    );
    let back = r.through(Side::Uplink, &syn_ack, Side::Pod);
    assert_eq!(dst(&back), (POD, 40000));
    assert_eq!(wire::macs(&back), (POD_MAC, r.a.pod_mac));
    assert!(checksums_ok(&back));
    assert_eq!(r.get(Counter::FlowsCreated), 1);
    assert_eq!(r.get(Counter::In2outPackets), 1);
    assert_eq!(r.get(Counter::Out2inPackets), 1);
}

#[test]
fn udp_and_echo_translate_both_ways() {
    let mut r = rig(ONE);
    let q = build::udp(&pod_ep(&r.a, POD, REMOTE), 5353, 53, b"q", true);
    let out = r.through(Side::Pod, &q, Side::Uplink);
    let (ext, port) = src(&out);
    assert_eq!(ext, EXT);
    let a = build::udp(&up_ep(&r.a, REMOTE, EXT), 53, port, b"answer", true);
    let back = r.through(Side::Uplink, &a, Side::Pod);
    assert_eq!(dst(&back), (POD, 5353));
    assert!(checksums_ok(&back));

    let ping = build::icmp_echo(&pod_ep(&r.a, POD, REMOTE), true, 77, 1, b"p");
    let out = r.through(Side::Pod, &ping, Side::Uplink);
    let L4::IcmpEcho { id, .. } = view(&out).l4 else {
        panic!("not an echo")
    };
    let pong = build::icmp_echo(&up_ep(&r.a, REMOTE, EXT), false, id, 1, b"p");
    let back = r.through(Side::Uplink, &pong, Side::Pod);
    assert!(matches!(view(&back).l4, L4::IcmpEcho { id: 77, .. }));
    assert_eq!(view(&back).dst, POD);
    assert!(checksums_ok(&back));
}

#[test]
fn warming_a_burst_changes_no_decision() {
    let mut r = rig(ONE);
    let q = build::udp(&pod_ep(&r.a, POD, REMOTE), 5353, 53, b"q", true);
    let first = r.through(Side::Pod, &q, Side::Uplink);
    let (_, port) = src(&first);
    let a = build::udp(&up_ep(&r.a, REMOTE, EXT), 53, port, b"answer", true);
    let ping = build::icmp_echo(&pod_ep(&r.a, POD, REMOTE), true, 77, 1, b"p");
    // Known flows, a new one, and frames that are no flow at all.
    let burst: Vec<&[u8]> = vec![&q, &ping, &[], &q[..20], &a[..40]];
    r.core.warm(Side::Pod, burst.iter().copied());
    assert_eq!(r.through(Side::Pod, &q, Side::Uplink), first);
    r.core
        .warm(Side::Uplink, [&a[..], &ping[..], &[0u8; 3][..]]);
    let back = r.through(Side::Uplink, &a, Side::Pod);
    assert_eq!(dst(&back), (POD, 5353));
    assert!(checksums_ok(&back));
}

#[test]
fn new_flows_start_only_with_syn_request_or_datagram() {
    let mut r = rig(ONE);
    let ack = build::tcp(&pod_ep(&r.a, POD, REMOTE), 40000, 443, wire::TCP_ACK, b"");
    assert_eq!(dropped(r.input(Side::Pod, &ack)), Counter::DropTcpNotSyn);
    let reply = build::icmp_echo(&pod_ep(&r.a, POD, REMOTE), false, 9, 1, b"");
    assert_eq!(dropped(r.input(Side::Pod, &reply)), Counter::DropIcmpNoFlow);
    assert_eq!(r.get(Counter::FlowsCreated), 0);
}

#[test]
fn unsolicited_and_filtered_inbound_is_dropped() {
    let mut r = rig(ONE);
    let udp = build::udp(&up_ep(&r.a, REMOTE, EXT), 53, 5353, b"x", true);
    assert_eq!(dropped(r.input(Side::Uplink, &udp)), Counter::DropNoFlow);
    let syn = build::tcp(&up_ep(&r.a, REMOTE, EXT), 1, 22, wire::TCP_SYN, b"");
    assert_eq!(dropped(r.input(Side::Uplink, &syn)), Counter::DropNoFlow);
    // A mapping lets in only the addresses it was used towards (RFC 4787 REQ-8).
    let q = build::udp(&pod_ep(&r.a, POD, REMOTE), 5353, 53, b"q", true);
    let (_, port) = src(&r.through(Side::Pod, &q, Side::Uplink));
    let other = build::udp(&up_ep(&r.a, ROUTER, EXT), 53, port, b"x", true);
    assert_eq!(
        dropped(r.input(Side::Uplink, &other)),
        Counter::DropFiltered
    );
}

#[test]
fn spoofed_malformed_and_foreign_frames_are_dropped() {
    let mut r = rig(ONE);
    let spoof = build::udp(
        &pod_ep(&r.a, Ipv4Addr::new(172, 16, 0, 1), REMOTE),
        1,
        2,
        b"",
        true,
    );
    assert_eq!(
        dropped(r.input(Side::Pod, &spoof)),
        Counter::DropSpoofedSource
    );
    let mut bad = build::udp(&pod_ep(&r.a, POD, REMOTE), 1, 2, b"", true);
    bad[14 + 10] ^= 0xff;
    assert_eq!(
        dropped(r.input(Side::Pod, &bad)),
        Counter::DropBadIpChecksum
    );
    assert_eq!(dropped(r.input(Side::Pod, &[0u8; 10])), Counter::DropRunt);
    let mut short = build::tcp(&pod_ep(&r.a, POD, REMOTE), 1, 2, wire::TCP_SYN, b"");
    short[14 + 20 + 12] = 0xf0; // data offset 60 > the segment
    assert_eq!(
        dropped(r.input(Side::Pod, &short)),
        Counter::DropBadL4Header
    );
    let mut e = pod_ep(&r.a, POD, REMOTE);
    e.dst_mac = EthernetAddress([2, 9, 9, 9, 9, 9]);
    let f = build::udp(&e, 1, 2, b"", true);
    assert_eq!(dropped(r.input(Side::Pod, &f)), Counter::DropNotForUs);
    let to_gw = build::tcp(&pod_ep(&r.a, POD, r.a.pod_ip()), 1, 22, wire::TCP_SYN, b"");
    assert_eq!(dropped(r.input(Side::Pod, &to_gw)), Counter::DropToGateway);
}

#[test]
fn the_gateways_own_traffic_is_local_and_data_frames_teach_no_neighbour() {
    let mut r = rig(ONE);
    let ping = build::icmp_echo(&pod_ep(&r.a, POD, r.a.pod_ip()), true, 1, 1, b"");
    let buf = r.pool.frame(&ping).unwrap();
    r.core.frame(Side::Pod, buf, 0, &mut r.out);
    assert!(
        matches!(
            r.out.as_slice(),
            [Action::Local {
                side: Side::Pod,
                ..
            }]
        ),
        "{:?}",
        r.out
    );
    r.out.clear();
    let mut arp = [0u8; wire::ARP_FRAME_MAX];
    let n = wire::build_arp_request(&mut arp, POD_MAC, POD, r.a.pod_ip());
    let buf = r.pool.frame(&arp[..n]).unwrap();
    r.core.frame(Side::Pod, buf, 0, &mut r.out);
    assert!(
        matches!(
            r.out.as_slice(),
            [Action::Local {
                side: Side::Pod,
                ..
            }]
        ),
        "ARP for the gateway is its own stack's: {:?}",
        r.out
    );
    r.out.clear();
    // A frame with POD's address from another MAC (a spoofer, or POD
    // re-created) changes nothing: POD's traffic still goes to its MAC.
    let mut spoof = pod_ep(&r.a, POD, REMOTE);
    spoof.src_mac = EthernetAddress([2, 0, 0, 0, 0, 0x66]);
    let f = build::udp(&spoof, 5353, 53, b"q", true);
    let _ = r.input(Side::Pod, &f);
    spoof.src_mac = EthernetAddress::BROADCAST;
    let _ = r.input(Side::Pod, &build::udp(&spoof, 5354, 53, b"q", true));
    assert!(r.out.is_empty());
    assert_eq!(r.core.neighbour_mac(POD), Some(POD_MAC));
}

#[test]
fn a_new_gateway_mac_is_followed_and_stale_entries_report_use_and_confirmation_once() {
    let mut r = rig(ONE);
    let q = build::udp(&pod_ep(&r.a, POD, REMOTE), 5353, 53, b"q", true);
    let out = r.through(Side::Pod, &q, Side::Uplink);
    assert_eq!(wire::macs(&out).0, GW_MAC);
    let new_gw = EthernetAddress([2, 0, 0, 0, 0, 0xfd]);
    r.core.neighbour(GW, News::Reachable(new_gw));
    assert_eq!(
        wire::macs(&r.through(Side::Pod, &q, Side::Uplink)).0,
        new_gw
    );
    let news = |r: &mut Rig, side: Side, f: &[u8]| -> Vec<Event> {
        let buf = r.pool.frame(f).unwrap();
        r.core.frame(side, buf, r.now, &mut r.out);
        r.out
            .drain(..)
            .filter_map(|a| match a {
                Action::Neighbour(e) => Some(e),
                _ => None,
            })
            .collect()
    };
    // Stale: the first frame sent to it is reported, once.
    r.core.neighbour(GW, News::Stale(new_gw));
    assert_eq!(news(&mut r, Side::Pod, &q), [Event::Used(GW)]);
    assert_eq!(news(&mut r, Side::Pod, &q), []);
    // A pod told stale is confirmed by a frame from its MAC, not another's.
    r.core.neighbour(POD, News::Stale(POD_MAC));
    let mut other = pod_ep(&r.a, POD, REMOTE);
    other.src_mac = EthernetAddress([2, 0, 0, 0, 0, 0x42]);
    assert_eq!(
        news(&mut r, Side::Pod, &build::udp(&other, 1, 53, b"q", true)),
        []
    );
    assert_eq!(
        news(&mut r, Side::Pod, &q),
        [Event::Confirmed(POD, POD_MAC)]
    );
    assert_eq!(news(&mut r, Side::Pod, &q), []);
    // A runt from the uplink while the next hop is watched is only a drop.
    r.core.neighbour(GW, News::Stale(new_gw));
    assert_eq!(news(&mut r, Side::Uplink, &[0u8; 5]), []);
    assert_eq!(
        news(&mut r, Side::Uplink, &[]),
        [],
        "found by the core fuzz target"
    );
    // Gone: frames for it go to the control thread to resolve.
    r.core.neighbour(GW, News::Gone);
    let buf = r.pool.frame(&q).unwrap();
    r.core.frame(Side::Pod, buf, r.now, &mut r.out);
    assert!(
        matches!(r.out.as_slice(), [Action::Resolve { next_hop: GW, .. }]),
        "{:?}",
        r.out
    );
    r.out.clear();
    // Overheard ARP with a new MAC is the table's to judge; the known MAC
    // is not worth a message.
    let mut arp = [0u8; wire::ARP_FRAME_MAX];
    let n = wire::build_arp_request(&mut arp, POD_MAC, POD, POD2);
    assert_eq!(news(&mut r, Side::Pod, &arp[..n]), []);
    let moved = EthernetAddress([2, 0, 0, 0, 0, 0x42]);
    let n = wire::build_arp_request(&mut arp, moved, POD, POD);
    assert_eq!(
        news(&mut r, Side::Pod, &arp[..n]),
        [Event::Arp {
            ip: POD,
            mac: moved,
            kind: crate::gateway::neighbour::ArpKind::Gratuitous
        }]
    );
    assert_eq!(r.core.neighbour_mac(POD), Some(POD_MAC));
}

#[test]
fn a_hairpin_turns_around_through_the_forward() {
    let mut r = rig(ONE);
    let syn = build::tcp(
        &pod_ep(&r.a, POD, EXT),
        40000,
        FORWARDED,
        wire::TCP_SYN,
        b"",
    );
    let f = r.through(Side::Pod, &syn, Side::Pod);
    assert_eq!(src(&f), (EXT, 40000), "the sender's own mapping");
    assert_eq!(dst(&f), (TARGET, 80));
    assert_eq!(view(&f).ttl, 63, "decremented once in all");
    assert_eq!(wire::macs(&f), (POD_MAC, r.a.pod_mac));
    assert!(checksums_ok(&f));
    assert_eq!(r.get(Counter::Hairpinned), 1);
    assert_eq!(r.get(Counter::In2outPackets), 1);
    assert_eq!(r.get(Counter::Out2inPackets), 1);
}

#[test]
fn excluded_destinations_are_routed_and_only_replies_come_back() {
    let mut r = rig(ONE);
    let p2p = build::udp(&pod_ep(&r.a, POD, POD2), 1000, 2000, b"x", true);
    let f = r.through(Side::Pod, &p2p, Side::Pod);
    assert_eq!((src(&f), dst(&f)), ((POD, 1000), (POD2, 2000)));
    assert_eq!(view(&f).ttl, 63);
    let out = build::udp(&pod_ep(&r.a, POD, EXCLUDED), 1000, 53, b"q", true);
    let f = r.through(Side::Pod, &out, Side::Uplink);
    assert_eq!(src(&f), (POD, 1000), "untranslated");
    assert!(checksums_ok(&f));
    let reply = build::udp(&up_ep(&r.a, EXCLUDED, POD), 53, 1000, b"a", true);
    let f = r.through(Side::Uplink, &reply, Side::Pod);
    assert_eq!(dst(&f), (POD, 1000));
    let stray = build::udp(&up_ep(&r.a, EXCLUDED, POD), 53, 1001, b"a", true);
    assert_eq!(dropped(r.input(Side::Uplink, &stray)), Counter::DropNoFlow);
    assert_eq!(r.get(Counter::RoutedPackets), 3);
    assert_eq!(r.get(Counter::FlowsCreated), 0);
}

#[test]
fn unanswered_routed_sessions_expire_after_30_s_answered_ones_keep_their_timeout() {
    let mut r = rig(ONE);
    let q = |r: &Rig, sport| build::udp(&pod_ep(&r.a, POD, EXCLUDED), sport, 53, b"q", true);
    let a = |r: &Rig, dport| build::udp(&up_ep(&r.a, EXCLUDED, POD), 53, dport, b"a", true);
    let (lonely, answered) = (q(&r, 1000), q(&r, 1001));
    r.through(Side::Pod, &lonely, Side::Uplink);
    r.through(Side::Pod, &answered, Side::Uplink);
    let reply = a(&r, 1001);
    r.through(Side::Uplink, &reply, Side::Pod);
    // Past 30 s idle (and a sweep): the unanswered one is gone, the answered
    // one lives on its UDP timeout (300 s here).
    r.now += 31_000;
    r.core.tick(r.now, 256, &mut r.out);
    r.take();
    let late = a(&r, 1000);
    assert_eq!(dropped(r.input(Side::Uplink, &late)), Counter::DropNoFlow);
    r.through(Side::Uplink, &reply, Side::Pod);
    r.now += 299_000;
    r.core.tick(r.now, 256, &mut r.out);
    r.take();
    r.through(Side::Uplink, &reply, Side::Pod);
    r.now += 301_000;
    r.core.tick(r.now, 256, &mut r.out);
    r.take();
    assert_eq!(dropped(r.input(Side::Uplink, &reply)), Counter::DropNoFlow);
}

#[test]
fn ttl_1_gets_time_exceeded_back_to_the_sender() {
    let mut r = rig(ONE);
    let mut e = pod_ep(&r.a, POD, REMOTE);
    e.ttl = 1;
    let f = build::udp(&e, 1000, 53, b"q", true);
    let acts = r.input(Side::Pod, &f);
    let [Action::Reject {
        to,
        kind,
        why,
        view: v,
        buf,
    }] = <[Action; 1]>::try_from(acts).unwrap()
    else {
        panic!("not rejected")
    };
    assert_eq!(
        (to, kind, why),
        (
            Side::Pod,
            IcmpErrorKind::TTL_EXCEEDED,
            Counter::DropTtlExceeded
        )
    );
    assert_eq!(buf.frame(), &f[..], "the offending frame, untouched");
    // What the worker sends from it.
    let mut out = [0u8; ICMP_ERROR_FRAME_MAX];
    let n = wire::build_icmp_error(&mut out, buf.frame(), &v, r.a.pod_mac, r.a.pod_ip(), kind);
    let err = view(&out[..n]);
    assert_eq!((err.src, err.dst), (r.a.pod_ip(), POD));
    assert!(matches!(err.l4, L4::IcmpError { icmp_type: 11, .. }));
}

#[test]
fn df_too_big_gets_fragmentation_needed_with_the_mtu() {
    let mut r = rig(Setup {
        uplink_mtu: 1400,
        ..ONE
    });
    let f = build::udp(&pod_ep(&r.a, POD, REMOTE), 1000, 53, &[0; 1472], true);
    let acts = r.input(Side::Pod, &f);
    assert!(
        matches!(
            acts.as_slice(),
            [Action::Reject { to: Side::Pod, kind, why: Counter::DropTooBig, .. }]
                if *kind == IcmpErrorKind::frag_needed(1400)
        ),
        "{acts:?}"
    );
}

#[test]
fn non_df_too_big_is_fragmented_to_the_mtu() {
    let mut r = rig(Setup {
        uplink_mtu: 1400,
        ..ONE
    });
    let mut f = build::udp(&pod_ep(&r.a, POD, REMOTE), 1000, 53, &[5; 2000], true);
    clear_df(&mut f);
    let acts = r.input(Side::Pod, &f);
    assert_eq!(acts.len(), 2, "{acts:?}");
    let mut bytes = 0;
    for a in acts {
        let Action::Send {
            side: Side::Uplink,
            buf,
        } = a
        else {
            panic!("{a:?}")
        };
        let v = view(buf.frame());
        assert!(v.total_len <= 1400 && v.is_fragment && v.src == EXT);
        assert_eq!(wire::macs(buf.frame()).0, GW_MAC);
        bytes += v.total_len - v.ihl;
    }
    assert_eq!(bytes, 8 + 2000);
    assert_eq!(r.get(Counter::FragmentsCreated), 2);
}

#[test]
fn a_tso_super_frame_gets_its_segment_size_cut_to_the_egress_mtu() {
    let mut r = rig(Setup {
        uplink_mtu: 1400,
        hdr: VNET_HDR_LEN,
        ..ONE
    });
    let syn = build::tcp(&pod_ep(&r.a, POD, REMOTE), 40000, 443, wire::TCP_SYN, b"");
    r.through(Side::Pod, &syn, Side::Uplink);
    let data = build::tcp(
        &pod_ep(&r.a, POD, REMOTE),
        40000,
        443,
        wire::TCP_ACK,
        &[1; 8000],
    );
    let mut buf = r.pool.frame(&data).unwrap();
    let hdr = VnetHdr {
        gso_type: GSO_TCPV4,
        gso_size: 1448,
        hdr_len: 54,
        ..VnetHdr::default()
    };
    hdr.write(buf.vnet_mut());
    let (side, _) = sent(r.feed(Side::Pod, buf));
    assert_eq!(side, Side::Uplink);
    // The frame went out whole; its header says 1400 - 20 - 20.
    let mut buf = r.pool.frame(&data).unwrap();
    hdr.write(buf.vnet_mut());
    r.core.frame(Side::Pod, buf, r.now, &mut r.out);
    let Some(Action::Send { buf, .. }) = r.out.pop() else {
        panic!("not sent")
    };
    let h = VnetHdr::parse(buf.vnet()).unwrap();
    assert_eq!(h.gso_size, 1360);
    assert_eq!(
        view(buf.frame()).total_len,
        20 + 20 + 8000,
        "not fragmented"
    );
    assert_eq!(r.get(Counter::GsoFrames), 2);
    // A TCP super-frame of segment size 0 is refused
    // (corpus/core/seed-regression-gso-size-zero).
    let mut buf = r.pool.frame(&data).unwrap();
    VnetHdr { gso_size: 0, ..hdr }.write(buf.vnet_mut());
    let acts = r.feed(Side::Pod, buf);
    assert!(
        matches!(
            acts.as_slice(),
            [Action::Drop {
                why: Counter::DropUnsupportedProtocol,
                ..
            }]
        ),
        "{acts:?}"
    );
}

/// A UDP super-frame from the pod as its kernel hands it over with USO:
/// one header for all of `payload`, the checksum field holding only the
/// pseudo-header sum, and a vnet header saying `gso` bytes per datagram.
fn uso_frame(r: &Rig, payload: &[u8], gso: u16, df: bool) -> Buf {
    let mut f = build::udp(&pod_ep(&r.a, POD, REMOTE), 40000, 443, payload, true);
    if !df {
        clear_df(&mut f);
    }
    let l4 = wire::ETH_HLEN + 20;
    let ph = csum::pseudo_header(POD.octets(), REMOTE.octets(), 17, (f.len() - l4) as u16);
    f[l4 + 6..l4 + 8].copy_from_slice(&(ph as u16).to_be_bytes());
    let mut buf = r.pool.frame(&f).unwrap();
    VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_UDP_L4,
        hdr_len: 42,
        gso_size: gso,
        csum_start: l4 as u16,
        csum_offset: 6,
    }
    .write(buf.vnet_mut());
    buf
}

#[test]
fn a_uso_super_frame_whose_datagrams_fit_goes_out_whole() {
    let mut r = rig(Setup {
        hdr: VNET_HDR_LEN,
        ..ONE
    });
    let payload: Vec<u8> = (0..8000u32).map(|i| i as u8).collect();
    let buf = uso_frame(&r, &payload, 1400, true);
    let acts = r.feed(Side::Pod, buf);
    let [Action::Send {
        side: Side::Uplink,
        buf,
    }] = acts.as_slice()
    else {
        panic!("{acts:?}")
    };
    let h = VnetHdr::parse(buf.vnet()).unwrap();
    assert_eq!((h.gso_type, h.gso_size), (GSO_UDP_L4, 1400));
    let v = view(buf.frame());
    assert_eq!((v.src, v.total_len), (EXT, 20 + 8 + 8000));
    // Finished as the receiving kernel would, the checksum verifies: the
    // translation patched the pseudo-header sum for the new address only.
    let mut f = buf.frame().to_vec();
    let at = usize::from(h.csum_start) + usize::from(h.csum_offset);
    let c = csum::checksum(&f[usize::from(h.csum_start)..]);
    f[at..at + 2].copy_from_slice(&c.to_be_bytes());
    assert!(checksums_ok(&f));
    assert_eq!(r.get(Counter::GsoFrames), 1);
    assert_eq!(r.get(Counter::GsoSegmented), 0);
}

#[test]
fn a_uso_super_frame_too_big_for_the_egress_is_cut_into_its_datagrams() {
    let mut r = rig(Setup {
        uplink_mtu: 1280,
        hdr: VNET_HDR_LEN,
        ..ONE
    });
    // Six datagrams (5 x 1400 + 1000 bytes); each 1400-byte one needs two
    // fragments at MTU 1280, the last fits: 11 frames.
    let payload: Vec<u8> = (0..8000u32).map(|i| (i % 253) as u8).collect();
    let buf = uso_frame(&r, &payload, 1400, false);
    let acts = r.feed(Side::Pod, buf);
    assert_eq!(acts.len(), 11, "{acts:?}");
    let mut data = Vec::new();
    for a in &acts {
        let Action::Send {
            side: Side::Uplink,
            buf,
        } = a
        else {
            panic!("{a:?}")
        };
        assert!(VnetHdr::parse(buf.vnet()).unwrap() == VnetHdr::default());
        let v = view(buf.frame());
        assert!(v.total_len <= 1280 && v.src == EXT, "{v:?}");
        if !v.is_fragment {
            assert!(checksums_ok(buf.frame()));
        }
        // The payload of each datagram (the UDP header in first fragments).
        let ip = &buf.frame()[wire::ETH_HLEN..wire::ETH_HLEN + v.total_len];
        let first = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff == 0;
        data.extend_from_slice(&ip[v.ihl + if first { 8 } else { 0 }..]);
    }
    assert_eq!(data, payload, "every byte, in order");
    assert_eq!(r.get(Counter::GsoSegmented), 6);
    assert_eq!(r.get(Counter::FragmentsCreated), 10);
}

#[test]
fn a_uso_super_frame_too_big_with_df_gets_fragmentation_needed() {
    let mut r = rig(Setup {
        uplink_mtu: 1280,
        hdr: VNET_HDR_LEN,
        ..ONE
    });
    let buf = uso_frame(&r, &[7; 4000], 1400, true);
    let acts = r.feed(Side::Pod, buf);
    assert!(
        matches!(
            acts.as_slice(),
            [Action::Reject { to: Side::Pod, kind, why: Counter::DropTooBig, .. }]
                if *kind == IcmpErrorKind::frag_needed(1280)
        ),
        "{acts:?}"
    );
    // A TCP-typed GSO header on a UDP frame, and a UDP super-frame of
    // segment size 0, are refused.
    for (gso_type, gso_size) in [(GSO_TCPV4, 1000), (GSO_UDP_L4, 0)] {
        let mut buf = uso_frame(&r, &[7; 4000], 1000, true);
        let mut h = VnetHdr::parse(buf.vnet()).unwrap();
        (h.gso_type, h.gso_size) = (gso_type, gso_size);
        h.write(buf.vnet_mut());
        let acts = r.feed(Side::Pod, buf);
        assert!(
            matches!(
                acts.as_slice(),
                [Action::Drop {
                    why: Counter::DropUnsupportedProtocol,
                    ..
                }]
            ),
            "{acts:?}"
        );
    }
}

#[test]
fn a_packet_another_worker_owns_is_handed_off_and_translated_there() {
    let two = |worker| Setup {
        worker,
        workers: 2,
        ..ONE
    };
    let (mut r0, mut r1) = (rig(two(0)), rig(two(1)));
    let q = build::udp(&pod_ep(&r0.a, POD, REMOTE), 5001, 53, b"q", true);
    let acts = r0.input(Side::Pod, &q);
    let [Action::HandOff { worker: 1, packet }] = <[Action; 1]>::try_from(acts).unwrap() else {
        panic!("not handed to worker 1")
    };
    assert_eq!(r0.get(Counter::HandedOff), 1);
    r1.core.packet(packet, r1.now, &mut r1.out);
    let (side, f) = sent(r1.take());
    assert_eq!(side, Side::Uplink);
    assert_eq!(src(&f).1 % 2, 1, "an outside port of worker 1");
    assert_eq!(r1.get(Counter::In2outPackets), 1);
}

#[test]
fn an_unknown_next_hop_is_resolved_first() {
    let mut r = rig(ONE);
    let q = build::udp(&pod_ep(&r.a, POD, ON_LINK), 5353, 53, b"q", true);
    let acts = r.input(Side::Pod, &q);
    assert!(
        matches!(
            acts.as_slice(),
            [Action::Resolve {
                side: Side::Uplink,
                next_hop: ON_LINK,
                ..
            }]
        ),
        "{acts:?}"
    );
    r.core.neighbour(ON_LINK, News::Reachable(GW_MAC));
    let q = build::udp(&pod_ep(&r.a, POD, ON_LINK), 5353, 53, b"q2", true);
    r.through(Side::Pod, &q, Side::Uplink);
}

#[test]
fn icmp_errors_are_translated_both_ways() {
    let mut r = rig(ONE);
    // Outbound flow; a router on the way says the port is unreachable.
    let q = build::udp(&pod_ep(&r.a, POD, REMOTE), 5353, 53, b"q", true);
    let out = r.through(Side::Pod, &q, Side::Uplink);
    let mut e = [0u8; ICMP_ERROR_FRAME_MAX];
    let n = wire::build_icmp_error(&mut e, &out, &view(&out), GW_MAC, ROUTER, PORT_UNREACHABLE);
    let back = r.through(Side::Uplink, &e[..n], Side::Pod);
    let v = view(&back);
    assert_eq!((v.src, v.dst), (ROUTER, POD));
    let emb = wire::icmp::parse_embedded(&back, &v).unwrap();
    assert_eq!((emb.src, emb.ports().0), (POD, 5353), "quote restored");
    assert!(checksums_ok(&back));
    // Inbound packet on that flow; the pod says its port is unreachable.
    let (_, port) = src(&out);
    let a = build::udp(&up_ep(&r.a, REMOTE, EXT), 53, port, b"a", true);
    let inside = r.through(Side::Uplink, &a, Side::Pod);
    let mut e = [0u8; ICMP_ERROR_FRAME_MAX];
    let n = wire::build_icmp_error(
        &mut e,
        &inside,
        &view(&inside),
        POD_MAC,
        POD,
        PORT_UNREACHABLE,
    );
    wire::set_macs(&mut e[..n], r.a.pod_mac, POD_MAC);
    let up = r.through(Side::Pod, &e[..n], Side::Uplink);
    let v = view(&up);
    assert_eq!((v.src, v.dst), (EXT, REMOTE));
    let emb = wire::icmp::parse_embedded(&up, &v).unwrap();
    assert_eq!((emb.dst, emb.ports().1), (EXT, port));
    assert_eq!(r.get(Counter::IcmpErrorsTranslated), 2);
}

#[test]
fn an_icmp_error_about_no_flow_is_dropped() {
    let mut r = rig(ONE);
    let stray = build::udp(&Endpoints::new(EXT, REMOTE), 4444, 53, b"q", true);
    let mut e = [0u8; ICMP_ERROR_FRAME_MAX];
    let n = wire::build_icmp_error(
        &mut e,
        &stray,
        &view(&stray),
        GW_MAC,
        ROUTER,
        PORT_UNREACHABLE,
    );
    wire::set_macs(&mut e[..n], r.a.uplink_mac, GW_MAC);
    assert_eq!(
        dropped(r.input(Side::Uplink, &e[..n])),
        Counter::DropIcmpErrorNoFlow
    );
}

#[test]
fn fragments_in_order_follow_the_first() {
    let mut r = rig(ONE);
    let frags = fragments(&pod_ep(&r.a, POD, REMOTE), 5353, 1);
    assert_eq!(frags.len(), 3);
    let first = r.through(Side::Pod, &frags[0], Side::Uplink);
    assert_eq!(src(&first), (EXT, 5353));
    for f in &frags[1..] {
        let out = r.through(Side::Pod, f, Side::Uplink);
        assert_eq!(view(&out).src, EXT);
        assert_eq!(view(&out).l4, L4::Fragment);
    }
    assert_eq!(r.get(Counter::FragmentsTranslated), 2);
}

#[test]
fn fragments_out_of_order_are_held_until_the_first() {
    let mut r = rig(ONE);
    let frags = fragments(&pod_ep(&r.a, POD, REMOTE), 5353, 1);
    assert!(r.input(Side::Pod, &frags[2]).is_empty(), "held");
    assert!(r.input(Side::Pod, &frags[1]).is_empty(), "held");
    assert_eq!(r.get(Counter::FragmentsHeld), 2);
    let acts = r.input(Side::Pod, &frags[0]);
    assert_eq!(acts.len(), 3, "{acts:?}");
    for a in acts {
        let Action::Send { side, buf } = a else {
            panic!("{a:?}")
        };
        assert_eq!((side, view(buf.frame()).src), (Side::Uplink, EXT));
    }
    // Held ones whose first fragment never comes time out.
    let late = fragments(&pod_ep(&r.a, POD, REMOTE), 6000, 2);
    assert!(r.input(Side::Pod, &late[1]).is_empty());
    r.core.tick(r.now + 5000, 256, &mut r.out);
    assert_eq!(dropped(r.take()), Counter::DropFragmentTimeout);
}

#[test]
fn icmp_errors_are_rate_limited_but_fragmentation_needed_is_not() {
    let mut r = rig(Setup {
        uplink_mtu: 1400,
        icmp_burst: 1,
        ..ONE
    });
    let mut e = pod_ep(&r.a, POD, REMOTE);
    e.ttl = 1;
    let f = build::udp(&e, 1000, 53, b"q", true);
    assert!(matches!(
        r.input(Side::Pod, &f).as_slice(),
        [Action::Reject { .. }]
    ));
    assert_eq!(dropped(r.input(Side::Pod, &f)), Counter::DropTtlExceeded);
    assert_eq!(r.get(Counter::IcmpErrorsRateLimited), 1);
    let big = build::udp(&pod_ep(&r.a, POD, REMOTE), 1000, 53, &[0; 1472], true);
    assert!(matches!(
        r.input(Side::Pod, &big).as_slice(),
        [Action::Reject { .. }]
    ));
    // Never an error about an error.
    let mut err = [0u8; ICMP_ERROR_FRAME_MAX];
    let victim = build::udp(&Endpoints::new(REMOTE, POD), 53, 1000, b"a", true);
    let n = wire::build_icmp_error(
        &mut err,
        &victim,
        &view(&victim),
        POD_MAC,
        POD,
        PORT_UNREACHABLE,
    );
    err[14 + 8] = 1;
    err[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
    let c = csum::checksum(&err[14..34]);
    err[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
    wire::set_macs(&mut err[..n], r.a.pod_mac, POD_MAC);
    assert_eq!(
        dropped(r.input(Side::Pod, &err[..n])),
        Counter::DropTtlExceeded
    );
}

#[test]
fn a_first_fragment_tells_the_worker_tracking_its_datagram() {
    let two = |worker| Setup {
        worker,
        workers: 2,
        ..ONE
    };
    let (mut r0, mut r1) = (rig(two(0)), rig(two(1)));
    // An even source port belongs to worker 0; find a datagram whose
    // fragments worker 1 tracks.
    let ep = pod_ep(&r0.a, POD, REMOTE);
    let (frags, key) = (1..)
        .map(|id| {
            let f = fragments(&ep, 5000, id);
            let key = crate::gateway::classify::frag_key(&f[0], &view(&f[0]));
            (f, key)
        })
        .find(|(_, key)| crate::gateway::classify::frag_port(key) % 2 == 1)
        .unwrap();
    let acts = r0.input(Side::Pod, &frags[0]);
    let [Action::FragNews {
        worker: 1,
        key: k,
        rewrite,
    }, Action::Send { .. }] = <[Action; 2]>::try_from(acts).unwrap()
    else {
        panic!("no news for worker 1")
    };
    assert_eq!((k, rewrite.addr, rewrite.egress), (key, EXT, Side::Uplink));
    r1.core.first_fragment_seen(k, rewrite, r1.now, &mut r1.out);
    assert!(r1.take().is_empty());
    let out = r1.through(Side::Pod, &frags[1], Side::Uplink);
    assert_eq!(view(&out).src, EXT);
}

#[test]
fn per_pod_refusals_are_counted_per_reason() {
    let mut r = rig(ONE);
    r.core.table_mut().set_pod_limits(2, 1);
    // One mapping, answered: the pod's whole share of UDP ports.
    let q = build::udp(&pod_ep(&r.a, POD, REMOTE), 5353, 53, b"q", true);
    let (_, port) = src(&r.through(Side::Pod, &q, Side::Uplink));
    let a = build::udp(&up_ep(&r.a, REMOTE, EXT), 53, port, b"a", true);
    r.through(Side::Uplink, &a, Side::Pod);
    let q2 = build::udp(&pod_ep(&r.a, POD, REMOTE), 5354, 53, b"q", true);
    assert_eq!(dropped(r.input(Side::Pod, &q2)), Counter::DropPodPortLimit);
    // A second flow on the mapping needs no port; answered, it fills the
    // pod's share of flows.
    let other = Ipv4Addr::new(198, 51, 100, 77);
    let q3 = build::udp(&pod_ep(&r.a, POD, other), 5353, 53, b"q", true);
    r.through(Side::Pod, &q3, Side::Uplink);
    let a3 = build::udp(&up_ep(&r.a, other, EXT), 53, port, b"a", true);
    r.through(Side::Uplink, &a3, Side::Pod);
    let q4 = build::tcp(&pod_ep(&r.a, POD, REMOTE), 40000, 443, wire::TCP_SYN, b"");
    assert_eq!(dropped(r.input(Side::Pod, &q4)), Counter::DropPodFlowLimit);
    // An inbound session for the pod at its limit too (the forward's
    // target is another pod address, so it gets in).
    r.core.table_mut().set_pod_limits(1, 0);
    let syn = build::tcp(&up_ep(&r.a, REMOTE, EXT), 1, FORWARDED, wire::TCP_SYN, b"");
    r.through(Side::Uplink, &syn, Side::Pod);
    let syn2 = build::tcp(&up_ep(&r.a, REMOTE, EXT), 2, FORWARDED, wire::TCP_SYN, b"");
    // The first session is unanswered: the second takes its place.
    r.through(Side::Uplink, &syn2, Side::Pod);
    assert_eq!(r.c.get(Counter::FlowsCreated), 4);
    assert_eq!(r.core.table_mut().stats().early_dropped, 1);
    // Every flow of the target pod answered...
    let ack = build::tcp(
        &pod_ep(&r.a, TARGET, REMOTE),
        80,
        2,
        wire::TCP_SYN | wire::TCP_ACK,
        b"",
    );
    r.through(Side::Pod, &ack, Side::Uplink);
    // ... and established (a handshake never completed would be evicted).
    let est = build::tcp(&up_ep(&r.a, REMOTE, EXT), 2, FORWARDED, wire::TCP_ACK, b"");
    r.through(Side::Uplink, &est, Side::Pod);
    let syn3 = build::tcp(&up_ep(&r.a, REMOTE, EXT), 3, FORWARDED, wire::TCP_SYN, b"");
    assert_eq!(
        dropped(r.input(Side::Uplink, &syn3)),
        Counter::DropPodFlowLimit
    );
}

#[test]
fn refusals_without_an_icmp_error_are_counted_drops() {
    let mut r = rig(Setup {
        max_flows: 1,
        frags: false,
        hdr: VNET_HDR_LEN,
        ..ONE
    });
    let q = build::udp(&pod_ep(&r.a, POD, REMOTE), 5353, 53, b"q", true);
    let (_, port) = src(&r.through(Side::Pod, &q, Side::Uplink));
    // Replied, so it is not evicted early to make room.
    let a = build::udp(&up_ep(&r.a, REMOTE, EXT), 53, port, b"a", true);
    r.through(Side::Uplink, &a, Side::Pod);
    let q2 = build::udp(&pod_ep(&r.a, POD, REMOTE), 5354, 53, b"q", true);
    assert_eq!(dropped(r.input(Side::Pod, &q2)), Counter::DropTableFull);
    // Fragment handling off: a later fragment has nowhere to go.
    let frags = fragments(&pod_ep(&r.a, POD, REMOTE), 5353, 3);
    assert_eq!(
        dropped(r.input(Side::Pod, &frags[1])),
        Counter::DropFragment
    );
    // A segmentation-offload super-frame that is not TCP cannot be re-cut.
    let mut buf = r.pool.frame(&q).unwrap();
    let gso = VnetHdr {
        gso_type: GSO_TCPV4,
        gso_size: 1000,
        ..VnetHdr::default()
    };
    gso.write(buf.vnet_mut());
    assert_eq!(
        dropped(r.feed(Side::Pod, buf)),
        Counter::DropUnsupportedProtocol
    );
    let other = build::udp(&pod_ep(&r.a, POD, REMOTE), 1, 2, b"", true);
    let mut other = other;
    other[14 + 9] = 47; // GRE
    other[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
    let c = csum::checksum(&other[14..34]);
    other[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
    assert_eq!(
        dropped(r.input(Side::Pod, &other)),
        Counter::DropUnsupportedProtocol
    );
}

#[test]
fn ethernet_padding_after_the_packet_is_not_forwarded() {
    // A short datagram padded out to 1514 bytes by the pod: only the IP
    // packet goes out (the padding would leak the pod's bytes outside, and
    // past a smaller uplink MTU).
    let mut r = rig(ONE);
    let mut q = build::udp(&pod_ep(&r.a, POD, REMOTE), 5353, 53, b"q", true);
    let packet_len = q.len();
    q.resize(1514, 0xa5);
    let out = r.through(Side::Pod, &q, Side::Uplink);
    assert_eq!(out.len(), packet_len);
    assert!(checksums_ok(&out));
}

/// `frame` (IPv4 in Ethernet, DF clear) with IP id `id`, cut to `mtu`.
fn cut(mut f: Vec<u8>, id: u16, mtu: usize) -> Vec<Vec<u8>> {
    f[14 + 4..14 + 6].copy_from_slice(&id.to_be_bytes());
    clear_df(&mut f);
    let mut out = Vec::new();
    fragment::fragment(&f, mtu, &mut |p: &[u8]| out.push(p.to_vec())).unwrap();
    out
}

/// Puts fragments (any order) back together as one unfragmented frame,
/// checking each one's IPv4 header checksum on the way.
fn reassemble(frags: &[Vec<u8>]) -> Vec<u8> {
    let mut parts: Vec<(usize, &[u8])> = frags
        .iter()
        .map(|f| {
            let ihl = usize::from(f[14] & 0x0f) * 4;
            assert_eq!(csum::sum(&f[14..14 + ihl]), 0xffff, "IPv4 header checksum");
            let info = fragment::frag_info(f).unwrap();
            (info.offset, &f[14 + ihl..14 + view(f).total_len])
        })
        .collect();
    parts.sort_by_key(|p| p.0);
    let first = frags
        .iter()
        .find(|f| fragment::frag_info(f).unwrap().offset == 0)
        .unwrap();
    let mut whole = first[..14 + 20].to_vec();
    for (at, data) in parts {
        assert_eq!(whole.len() - 34, at, "contiguous");
        whole.extend_from_slice(data);
    }
    let total = (whole.len() - 14) as u16;
    whole[14 + 2..14 + 4].copy_from_slice(&total.to_be_bytes());
    whole[14 + 6..14 + 8].copy_from_slice(&[0, 0]);
    whole[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
    let c = csum::checksum(&whole[14..34]);
    whole[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
    whole
}

/// Every action must be a frame sent to `to`; their frames.
fn all_sent(actions: Vec<Action>, to: Side) -> Vec<Vec<u8>> {
    actions
        .into_iter()
        .map(|a| match a {
            Action::Send { side, buf } if side == to => buf.frame().to_vec(),
            other => panic!("not sent to {to:?}: {other:?}"),
        })
        .collect()
}

#[test]
fn fragments_of_a_routed_pod_to_pod_datagram_follow_the_first() {
    let mut r = rig(ONE);
    let ep = pod_ep(&r.a, POD, POD2);
    // In order.
    let frags = fragments(&ep, 5353, 1);
    let out: Vec<Vec<u8>> = frags
        .iter()
        .map(|f| r.through(Side::Pod, f, Side::Pod))
        .collect();
    for f in &out {
        let v = view(f);
        assert_eq!((v.src, v.dst, v.ttl), (POD, POD2, 63), "untranslated");
        assert_eq!(wire::macs(f), (POD_MAC, r.a.pod_mac), "to the other pod");
    }
    let whole = reassemble(&out);
    assert!(checksums_ok(&whole));
    assert_eq!(src(&whole), (POD, 5353));
    // Out of order: the later ones wait for the first, then follow it.
    let frags = fragments(&ep, 5354, 2);
    assert!(r.input(Side::Pod, &frags[2]).is_empty(), "held");
    assert!(r.input(Side::Pod, &frags[1]).is_empty(), "held");
    let out = all_sent(r.input(Side::Pod, &frags[0]), Side::Pod);
    assert_eq!(out.len(), 3);
    assert!(out.iter().all(|f| view(f).dst == POD2));
    assert!(checksums_ok(&reassemble(&out)));
    assert_eq!(r.get(Counter::FragmentsTranslated), 4);
    assert_eq!(r.get(Counter::FlowsCreated), 0);
}

#[test]
fn fragments_of_a_routed_datagram_out_the_uplink_and_back_follow_the_first() {
    let mut r = rig(ONE);
    let frags = fragments(&pod_ep(&r.a, POD, EXCLUDED), 5353, 1);
    let out: Vec<Vec<u8>> = frags
        .iter()
        .map(|f| r.through(Side::Pod, f, Side::Uplink))
        .collect();
    for f in &out {
        assert_eq!((view(f).src, view(f).dst), (POD, EXCLUDED));
        assert_eq!(wire::macs(f).0, GW_MAC, "through the uplink router");
    }
    assert!(checksums_ok(&reassemble(&out)));
    // The reply, fragmented too, comes back in untranslated.
    let mut reply = build::udp(&up_ep(&r.a, EXCLUDED, POD), 53, 5353, &[9u8; 3000], true);
    reply[14 + 8] = 64;
    let frags = cut(reply, 7, 1500);
    assert!(r.input(Side::Uplink, &frags[1]).is_empty(), "held");
    let mut back = all_sent(r.input(Side::Uplink, &frags[0]), Side::Pod);
    back.push(r.through(Side::Uplink, &frags[2], Side::Pod));
    assert_eq!(back.len(), 3);
    assert!(back.iter().all(|f| view(f).dst == POD));
    let whole = reassemble(&back);
    assert!(checksums_ok(&whole));
    assert_eq!(dst(&whole), (POD, 5353));
    assert_eq!(r.get(Counter::FragmentsTranslated), 4);
}

#[test]
fn fragments_of_a_hairpinned_datagram_reach_the_target_with_both_ends_rewritten() {
    let mut r = rig(ONE);
    let syn = |sport| {
        build::tcp(
            &pod_ep(&r.a, POD, EXT),
            sport,
            FORWARDED,
            wire::TCP_SYN,
            &[5u8; 3000],
        )
    };
    let (a, b) = (syn(40000), syn(40001));
    // In order.
    let out: Vec<Vec<u8>> = cut(a, 1, 1500)
        .iter()
        .map(|f| r.through(Side::Pod, f, Side::Pod))
        .collect();
    assert_eq!(out.len(), 3);
    for f in &out {
        let v = view(f);
        assert_eq!((v.src, v.dst, v.ttl), (EXT, TARGET, 63));
        assert_eq!(wire::macs(f), (POD_MAC, r.a.pod_mac), "to the target");
    }
    let whole = reassemble(&out);
    assert!(
        checksums_ok(&whole),
        "addresses and ports rewritten consistently"
    );
    assert_eq!((src(&whole), dst(&whole)), ((EXT, 40000), (TARGET, 80)));
    // Out of order.
    let frags = cut(b, 2, 1500);
    assert!(r.input(Side::Pod, &frags[2]).is_empty(), "held");
    assert!(r.input(Side::Pod, &frags[1]).is_empty(), "held");
    let out = all_sent(r.input(Side::Pod, &frags[0]), Side::Pod);
    assert_eq!(out.len(), 3);
    assert!(out
        .iter()
        .all(|f| view(f).dst == TARGET && view(f).ttl == 63));
    let whole = reassemble(&out);
    assert!(checksums_ok(&whole));
    assert_eq!((src(&whole), dst(&whole)), ((EXT, 40001), (TARGET, 80)));
    assert_eq!(r.get(Counter::Hairpinned), 6);
}

#[test]
fn packets_to_a_subnets_network_or_broadcast_address_are_dropped() {
    let mut r = rig(ONE);
    for to in [
        Ipv4Addr::new(203, 0, 113, 255),
        Ipv4Addr::new(203, 0, 113, 0),
        Ipv4Addr::new(10, 244, 0, 0),
        Ipv4Addr::new(10, 244, 255, 255),
    ] {
        let f = build::udp(&pod_ep(&r.a, POD, to), 1000, 53, b"x", true);
        assert_eq!(
            dropped(r.input(Side::Pod, &f)),
            Counter::DropNoRoute,
            "{to}"
        );
    }
    assert_eq!(r.get(Counter::FlowsCreated), 0);
    // An ordinary host on the uplink subnet is still resolved.
    let f = build::udp(&pod_ep(&r.a, POD, ON_LINK), 1000, 53, b"x", true);
    let acts = r.input(Side::Pod, &f);
    assert!(
        matches!(&acts[..], [Action::Resolve { side: Side::Uplink, next_hop, .. }] if *next_hop == ON_LINK),
        "{acts:?}"
    );
}

#[test]
fn a_pod_speaking_as_the_gateway_or_a_subnet_edge_is_spoofing() {
    // Found by the core fuzz target: a SYN "from" 10.244.0.1 was translated
    // and its reply resolved the gateway's own pod address.
    let mut r = rig(ONE);
    for src in [
        Ipv4Addr::new(10, 244, 0, 1),
        EXT,
        Ipv4Addr::new(10, 244, 0, 0),
        Ipv4Addr::new(10, 244, 255, 255),
    ] {
        let f = build::tcp(&pod_ep(&r.a, src, REMOTE), 40000, 443, wire::TCP_SYN, b"");
        assert_eq!(
            dropped(r.input(Side::Pod, &f)),
            Counter::DropSpoofedSource,
            "from {src}"
        );
    }
    assert_eq!(r.get(Counter::FlowsCreated), 0);
}

#[test]
fn each_rule_counts_the_packets_it_translates_both_ways() {
    use crate::config::SnatRule;
    use crate::gateway::stats::Snapshot;
    let mut r = rig(ONE);
    // SNAT for POD2 (position 0, SNAT rules come first), the masquerade
    // rule for the rest of the pods (position 1).
    let pool = Ipv4Addr::new(203, 0, 113, 20);
    let mut a = (*r.a).clone();
    a.snat = vec![SnatRule {
        source: net(POD2, 32),
        to_first: pool,
        to_last: pool,
        exclude: vec![],
    }];
    r.core.set_addressing(Arc::new(a));
    let q = |from| build::udp(&pod_ep(&r.a, from, REMOTE), 5353, 53, b"q", true);
    let (q1, q2) = (q(POD), q(POD2));
    let out = r.through(Side::Pod, &q1, Side::Uplink);
    let (_, port) = src(&out);
    let out2 = r.through(Side::Pod, &q2, Side::Uplink);
    assert_eq!(src(&out2).0, pool);
    r.through(Side::Pod, &q1, Side::Uplink);
    let answer = build::udp(&up_ep(&r.a, REMOTE, EXT), 53, port, b"answer", true);
    r.through(Side::Uplink, &answer, Side::Pod);
    let s = Snapshot::sum([&*r.c]);
    assert_eq!(s.rule(0), (1, 29), "snat[0]: one 29-byte datagram");
    assert_eq!(s.rule(1), (3, 29 + 29 + 34), "masquerade[0]: out, out, in");
    // The rules change: the remembered decision goes with them.
    r.core.set_addressing(r.a.clone());
    r.through(Side::Pod, &q1, Side::Uplink);
    let s = Snapshot::sum([&*r.c]);
    assert_eq!(s.rule(0), (2, 29 + 29), "masquerade[0] is position 0 now");
    assert_eq!(s.rule(1).0, 3);
}
