//! Writes the seed corpus: a few real frames per target, built with
//! `tapnat::wire::build`, in each target's input layout.
//!
//! Run from anywhere: `cargo run --manifest-path tests/fuzz/Cargo.toml
//! --example gen_seeds`. The seeds are committed; rerun after changing a
//! target's input layout.
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use tapnat::wire::build::{self, Endpoints};
use tapnat::wire::fragment::fragment;
use tapnat::wire::{build_icmp_error, classify, csum, Classified, IcmpErrorKind, ETH_HLEN};

const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const GW_OUT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

fn dir(target: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    fs::create_dir_all(&d).unwrap();
    d
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    fs::write(dir(target).join(format!("seed-{name}")), bytes).unwrap();
}

fn fix_ip(f: &mut [u8]) {
    let ihl = usize::from(f[ETH_HLEN] & 0x0f) * 4;
    f[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&[0, 0]);
    let c = csum::checksum(&f[ETH_HLEN..ETH_HLEN + ihl]);
    f[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&c.to_be_bytes());
}

fn clear_df(mut f: Vec<u8>) -> Vec<u8> {
    f[ETH_HLEN + 6] &= !0x40;
    fix_ip(&mut f);
    f
}

fn arp_request() -> Vec<u8> {
    let mut out = [0u8; 42];
    let mac = Endpoints::new(POD, POD).src_mac;
    let n = tapnat::wire::build_arp_request(&mut out, mac, POD, Ipv4Addr::new(10, 244, 0, 1));
    out[..n].to_vec()
}

/// An ICMP error from `from` about `offending`, as the gateway builds them.
fn icmp_error(offending: &[u8], from: Ipv4Addr, kind: IcmpErrorKind) -> Vec<u8> {
    let Ok(Classified::Ipv4(v)) = classify(offending) else {
        panic!("offending packet does not classify");
    };
    let mut out = [0u8; 600];
    let mac = Endpoints::new(from, from).src_mac;
    let n = build_icmp_error(&mut out, offending, &v, mac, from, kind);
    out[..n].to_vec()
}

fn main() {
    let out = Endpoints::new(POD, REMOTE);
    let back = Endpoints::new(REMOTE, GW_OUT);
    let udp = build::udp(
        &out,
        40000,
        53,
        b"\x12\x34\x01\x00\x00\x01\0\0\0\0\0\0",
        true,
    );
    let udp_nocsum = build::udp(&out, 40001, 9, b"hello", false);
    let syn = build::tcp(&out, 40002, 443, tapnat::wire::TCP_SYN, &[]);
    let ack = build::tcp(&back, 443, 61000, tapnat::wire::TCP_ACK, b"data");
    let echo = build::icmp_echo(&out, true, 0x1234, 1, b"abcdefgh");
    let reply = build::icmp_echo(&back, false, 0x4321, 1, b"abcdefgh");
    // What an outside host sends about our masqueraded packets.
    let masq_udp = build::udp(&Endpoints::new(GW_OUT, REMOTE), 61001, 53, b"q", true);
    let masq_syn = build::tcp(&Endpoints::new(GW_OUT, REMOTE), 61002, 443, 2, &[]);
    let masq_echo = build::icmp_echo(&Endpoints::new(GW_OUT, REMOTE), true, 61003, 7, b"x");
    let port_unreach = icmp_error(
        &masq_udp,
        REMOTE,
        IcmpErrorKind {
            icmp_type: 3,
            code: 3,
            rest: 0,
        },
    );
    let frag_needed = icmp_error(&masq_syn, REMOTE, IcmpErrorKind::frag_needed(1400));
    let ttl_exceeded = icmp_error(&masq_echo, REMOTE, IcmpErrorKind::TTL_EXCEEDED);
    // What a pod sends about an inbound packet we forwarded to it.
    let pod_unreach = icmp_error(
        &ack,
        POD,
        IcmpErrorKind {
            icmp_type: 3,
            code: 3,
            rest: 0,
        },
    );
    let big = clear_df(build::udp(&out, 40003, 5000, &vec![0xa5; 3000], true));
    let mut frags = Vec::new();
    fragment(&big, 1500, &mut |p: &[u8]| frags.push(p.to_vec())).unwrap();
    let mut padded = build::udp(&out, 1, 2, b"hi", true);
    padded.extend_from_slice(&[0; 18]);

    // classify: 7 parameter bytes (new address, new port, end/mode), frame.
    let params = |end: u8| {
        let mut p = GW_OUT.octets().to_vec();
        p.extend_from_slice(&61000u16.to_be_bytes());
        p.push(end);
        p
    };
    let arp = arp_request();
    let frames: Vec<(&str, &[u8])> = vec![
        ("udp", &udp),
        ("udp-nocsum", &udp_nocsum),
        ("tcp-syn", &syn),
        ("tcp-ack", &ack),
        ("icmp-echo", &echo),
        ("icmp-reply", &reply),
        ("icmp-port-unreachable", &port_unreach),
        ("icmp-frag-needed", &frag_needed),
        ("frag-first", &frags[0]),
        ("frag-last", &frags[frags.len() - 1]),
        ("padded", &padded),
        ("arp", &arp),
    ];
    for (i, (name, f)) in frames.iter().enumerate() {
        let mut input = params((i % 4) as u8 | 0x0c);
        input.extend_from_slice(f);
        write("classify", name, &input);
    }

    // icmp_error: flag byte (bit 0: In2Out), outer address, inner address,
    // inner port, frame.
    for (name, f, in2out) in [
        ("port-unreachable", &port_unreach, false),
        ("frag-needed-tcp", &frag_needed, false),
        ("ttl-exceeded-echo", &ttl_exceeded, false),
        ("pod-port-unreachable", &pod_unreach, true),
    ] {
        let mut input = vec![u8::from(in2out) | 4];
        if in2out {
            input.extend_from_slice(&GW_OUT.octets());
            input.extend_from_slice(&REMOTE.octets());
            input.extend_from_slice(&443u16.to_be_bytes());
        } else {
            input.extend_from_slice(&POD.octets());
            input.extend_from_slice(&POD.octets());
            input.extend_from_slice(&40000u16.to_be_bytes());
        }
        input.extend_from_slice(f);
        write("icmp_error", name, &input);
    }

    // fragment: MTU - 68 (2 bytes), flag byte (0: make it valid-ish), frame.
    let with_opts = {
        // Loose Source Route (copied), NOP, Record Route (not copied), EOL.
        let plain = clear_df(build::udp(&out, 40004, 6000, &vec![0x5a; 1500], true));
        let opts = [0x83, 7, 4, 192, 0, 2, 1, 1, 0x07, 7, 4, 0, 0, 0, 0, 0];
        let mut f = plain[..ETH_HLEN + 20].to_vec();
        f.extend_from_slice(&opts);
        f.extend_from_slice(&plain[ETH_HLEN + 20..]);
        f[ETH_HLEN] = 0x49;
        let total = (f.len() - ETH_HLEN) as u16;
        f[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&total.to_be_bytes());
        fix_ip(&mut f);
        f
    };
    for (name, mtu, f) in [
        ("udp-3000-at-1500", 1500usize, &big),
        ("udp-3000-at-576", 576, &big),
        ("udp-3000-at-68", 68, &big),
        ("frag-again-at-576", 576, &frags[0]),
        ("options-at-576", 576, &with_opts),
        ("fits", 1500, &udp),
    ] {
        let mut input = ((mtu - 68) as u16).to_be_bytes().to_vec();
        input.push(2); // keep the frame's own total length
        input.extend_from_slice(f);
        write("fragment", name, &input);
    }

    // segment: a 2-byte segment size, a flag byte (0: the target makes the
    // frame valid-ish), the frame; one size too small for the 128-datagram
    // bound.
    for (name, size, f) in [
        ("udp-3000-by-1400", 1400u16, &big),
        ("udp-3000-by-1", 1, &big),
        ("fits", 1400, &udp),
    ] {
        let mut input = size.to_be_bytes().to_vec();
        input.push(0);
        input.extend_from_slice(f);
        write("segment", name, &input);
    }

    // frag_cache: arbitrary-decoded operations; a few hand-made byte strings
    // (any bytes decode to something).
    write(
        "frag_cache",
        "small",
        &[4, 8, 0x10, 0, 0xe8, 3, 0, 1, 1, 0, 100, 0, 10, 0],
    );
    write("frag_cache", "ops", &(0u8..=255).collect::<Vec<_>>());
    write(
        "frag_cache",
        "interleaved",
        &[
            8, 16, 0, 0x20, 0xd0, 7, 0, 1, 1, 0, 1, 0, 1, 1, 2, 0, 0, 1, 1, 0, 0, 0, 9, 2, 1, 2, 3,
        ],
    );

    // config: the embedded default, a minimal file, and a few variants.
    write(
        "config",
        "default.toml",
        tapnat::config::DEFAULT_TOML.as_bytes(),
    );
    write("config", "empty.toml", b"");
    write("config", "small.toml", SMALL.as_bytes());
    write(
        "config",
        "bad-key.toml",
        b"[pod]\nmtu = \"big\"\n[nat.timeouts]\nudp = \"0s\"\nextra = 1\n",
    );
    let r = tapnat::config::Config::from_toml_str(SMALL);
    assert!(r.is_ok(), "small.toml does not load: {r:?}");

    core_seeds();
}

const SMALL: &str = r#"[pod]
tap = "tap9"
address = "10.1.0.1/24"
mtu = 9000

[uplink]
address = "192.0.2.10/24"
gateway = "192.0.2.1"

[nat]
ports = "20000-30000"
max_flows = 1000
filtering = "address-and-port"

[nat.timeouts]
udp = "2m30s"
tcp_established = "2h4m"

[[masquerade]]
source = "10.1.0.0/24"
exclude = ["10.2.0.0/16"]

[[snat]]
source = "10.1.0.128/25"
to = "192.0.2.20-192.0.2.29"

[[forward]]
protocol = "tcp"
port = 8080
to = "10.1.0.2:80"

[workers]
threads = 2
busy_poll = "50us"
"#;

/// `core`: setup bytes, then operations (layout in `fuzz_targets/core.rs`).
/// A template frame: (side, src, dst, protocol, sport, dport, flags, ttl,
/// IP flags, fragment offset, id, payload length, gso_size); addresses and
/// ports are indices into the target's lists (0 pod .2, 1 pod .3, 5 remote,
/// 7 excluded, 8 the uplink address; ports 0 40000, 2 53, 3 80, 4 443,
/// 5 8080).
#[allow(clippy::too_many_arguments)]
fn tpl(
    side: u8,
    src: u8,
    dst: u8,
    proto: u8,
    sp: u8,
    dp: u8,
    flags: u8,
    ipf: u8,
    off: u16,
    plen: u16,
    gso: u16,
) -> Vec<u8> {
    let mut v = vec![1, 0, side, src, dst, proto, sp, dp, flags, 64, ipf];
    for x in [off, 0x4242, plen, gso] {
        v.extend_from_slice(&x.to_be_bytes());
    }
    v.push(0); // no patches
    v
}

/// Answer the last frame sent to `to` (0 pod, 1 uplink): `kind` 0 same
/// protocol (an echo reply), 3 port unreachable, 7 fragmentation needed.
fn answer(to: u8, kind: u8, flags: u8) -> Vec<u8> {
    vec![2, 0, to, kind, flags]
}

/// A seed's name, setup bytes and operations.
type CoreSeed<'a> = (&'a str, &'a [u8], Vec<Vec<u8>>);

fn core_seeds() {
    const SYN: u8 = 0x02;
    const SYNACK: u8 = 0x12;
    const ACK: u8 = 0x10;
    const DF: u8 = 1;
    let one = [0u8, 0, 15, 0, 3, 3, 15, 3];
    let two = [1u8, 0, 15, 0, 3, 3, 15, 3];
    let offload = [2u8, 0, 15, 0, 3, 3, 15, 3];
    let small_mtu = [0u8, 2, 15, 0, 3, 3, 15, 3];
    let tick = [3u8, 0, 10, 1, 4, 0, 255];
    let seeds: Vec<CoreSeed> = vec![
        (
            "tcp",
            &one,
            vec![
                tpl(0, 0, 5, 0, 0, 4, SYN, DF, 0, 0, 0),
                answer(1, 0, SYNACK),
                tpl(0, 0, 5, 0, 0, 4, ACK, DF, 0, 10, 0),
                tick.to_vec(),
            ],
        ),
        (
            "udp",
            &two,
            vec![
                tpl(0, 0, 5, 1, 0, 2, 0, DF, 0, 32, 0),
                answer(1, 0, 0),
                answer(0, 0, 0),
            ],
        ),
        (
            "echo",
            &one,
            vec![tpl(0, 0, 5, 2, 0, 7, 0, DF, 0, 8, 0), answer(1, 0, 0)],
        ),
        (
            "icmp-error",
            &one,
            vec![
                tpl(0, 0, 5, 1, 0, 2, 0, DF, 0, 32, 0),
                answer(1, 3, 0),
                answer(1, 7, 0),
            ],
        ),
        (
            "icmp-error-template",
            &one,
            vec![tpl(1, 5, 8, 4, 2, 0, 0, 0, 0, 0, 1400)],
        ),
        // The later fragment first (held), then the first, on two workers.
        (
            "fragments",
            &two,
            vec![
                tpl(0, 0, 5, 1, 0, 2, 0, 0, 3, 8, 0),
                tpl(0, 0, 5, 1, 0, 2, 0, 2, 0, 16, 0),
            ],
        ),
        (
            "hairpin-forward",
            &one,
            vec![
                tpl(0, 1, 8, 0, 0, 5, SYN, DF, 0, 0, 0),
                answer(0, 0, SYNACK),
            ],
        ),
        (
            "routed",
            &one,
            vec![tpl(0, 0, 7, 1, 0, 2, 0, DF, 0, 8, 0), answer(1, 0, 0)],
        ),
        (
            "ttl",
            &one,
            vec![{
                let mut t = tpl(0, 0, 5, 1, 0, 2, 0, DF, 0, 8, 0);
                t[9] = 1;
                t
            }],
        ),
        (
            "too-big",
            &small_mtu,
            vec![
                tpl(0, 0, 5, 1, 0, 2, 0, 0, 0, 1400, 0),
                tpl(0, 0, 5, 1, 0, 2, 0, DF, 0, 1400, 0),
            ],
        ),
        (
            "tso",
            &offload,
            vec![
                tpl(0, 0, 5, 0, 0, 4, SYN, DF, 0, 0, 0),
                answer(1, 0, SYNACK),
                tpl(0, 0, 5, 0, 0, 4, ACK, DF | 8 | 16, 0, 20000, 1448),
            ],
        ),
    ];
    for (name, setup, ops) in seeds {
        let mut input = setup.to_vec();
        ops.iter().for_each(|op| input.extend_from_slice(op));
        write("core", name, &input);
    }
    let arp = arp_request();
    let mut raw = one.to_vec();
    raw.extend_from_slice(&[0, 0, 0]);
    raw.extend_from_slice(&[0; 10]);
    raw.extend_from_slice(&(arp.len() as u16).to_be_bytes());
    raw.extend_from_slice(&arp);
    write("core", "raw-arp", &raw);
}
