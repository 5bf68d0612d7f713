//! Tests of the RFC 4787 / 5382 / 6888 / 7857 behaviour: inbound filtering,
//! static forwards, RST validation, full-table policy and port quarantine.

use super::*;

const REMOTE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);
const OTHER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const TARGET: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);

fn with(filtering: Filtering, delay: u64, max: usize) -> FlowTable {
    FlowTable::new(TableConfig {
        filtering,
        port_reuse_delay_ms: delay,
        ..cfg(0, 1, 1024, 65535, max)
    })
}

fn ok(proto: Proto, remote: Ipv4Addr, rport: u16, eport: u16) -> OutKey {
    OutKey {
        proto,
        remote,
        rport,
        ext: EXT,
        eport,
    }
}

/// An outbound UDP flow 10.0.0.2:5000 -> REMOTE:53, mapped to EXT:5000.
fn udp_mapping(t: &mut FlowTable) -> FlowId {
    let id = t.create(&ik(Proto::Udp, 2, 5000, 9, 53), EXT, 0).unwrap();
    assert_eq!(t.get(id).ext_port, 5000);
    acc(t, id, Direction::In2Out, NONE, 60, 0);
    id
}

#[test]
fn eif_accepts_any_remote_on_a_live_mapping() {
    let mut t = with(Filtering::EndpointIndependent, 0, 100);
    let before = Before::of(&t);
    let a = udp_mapping(&mut t);
    // Same remote, same port: the session itself.
    let k = ok(Proto::Udp, REMOTE, 53, 5000);
    assert_eq!(t.lookup_out2in(&k, 1), Some(a));
    assert_eq!(t.inbound(&k, NONE, 1), Ok(a));
    // Same address, other port; other address: new sessions.
    for (remote, rport) in [(REMOTE, 54), (OTHER, 53)] {
        let k = ok(Proto::Udp, remote, rport, 5000);
        assert_eq!(t.lookup_out2in(&k, 1), None);
        let id = t.inbound(&k, NONE, 1).unwrap();
        assert!(t.opened_inbound(id));
        let f = *t.get(id);
        assert_eq!(f.out_key(), k);
        let inside = InKey {
            proto: Proto::Udp,
            src: Ipv4Addr::new(10, 0, 0, 2),
            sport: 5000,
            dst: remote,
            dport: rport,
        };
        assert_eq!(f.inside, inside);
        acc(&mut t, id, Direction::Out2In, NONE, 60, 1);
        assert!(!t.get(id).replied, "the remote opened it");
        // The pod's answer hits it.
        assert_eq!(t.lookup_in2out(&inside, 2), Some(id));
        acc(&mut t, id, Direction::In2Out, NONE, 60, 2);
        assert!(t.get(id).replied);
        assert_eq!(t.lookup_out2in(&k, 2), Some(id));
    }
    assert_eq!(inbound_flows(&t), 2);
    assert_eq!(before.created(&t), 3);
    assert_eq!(t.mappings_len(), 1);
    // Wrong outside address, unmapped port, ICMP: no mapping.
    let wrong = OutKey {
        ext: Ipv4Addr::new(198, 51, 100, 99),
        ..ok(Proto::Udp, OTHER, 1, 5000)
    };
    assert_eq!(t.inbound(&wrong, NONE, 2), Err(InboundError::NoMapping));
    assert_eq!(
        t.inbound(&ok(Proto::Udp, OTHER, 1, 5001), NONE, 2),
        Err(InboundError::NoMapping)
    );
    assert_eq!(
        t.inbound(&ok(Proto::Icmp, OTHER, 0, 5000), NONE, 2),
        Err(InboundError::NoMapping)
    );
    assert_eq!(
        t.inbound(&ok(Proto::Tcp, OTHER, 1, 5000), SYN, 2),
        Err(InboundError::NoMapping)
    );
    check_consistent(&t);
    // The inbound sessions keep the mapping after the first flow goes.
    t.remove(a);
    assert_eq!(t.mappings_len(), 1);
    assert!(t.inbound(&ok(Proto::Udp, OTHER, 77, 5000), NONE, 3).is_ok());
    // Once every session has expired the mapping is gone: nothing opens.
    assert_eq!(t.expire(3 + T.udp_ms, usize::MAX), 3);
    assert_eq!(t.mappings_len(), 0);
    assert_eq!(
        t.inbound(&ok(Proto::Udp, OTHER, 78, 5000), NONE, 3 + T.udp_ms),
        Err(InboundError::NoMapping)
    );
    check_consistent(&t);
}

#[test]
fn adf_accepts_known_addresses_only() {
    let mut t = with(Filtering::Address, 0, 100);
    let a = udp_mapping(&mut t);
    let same_addr = ok(Proto::Udp, REMOTE, 54, 5000);
    let id = t.inbound(&same_addr, NONE, 1).unwrap();
    assert_eq!(t.get(id).inside.dport, 54);
    assert_eq!(
        t.inbound(&ok(Proto::Udp, OTHER, 53, 5000), NONE, 1),
        Err(InboundError::Filtered)
    );
    assert_eq!(t.len(), 2);
    check_consistent(&t);
    // After the pod talks to OTHER, OTHER may come in on any port.
    let b = t.create(&ik(Proto::Udp, 2, 5000, 10, 123), EXT, 2).unwrap();
    assert_eq!(t.get(b).ext_port, 5000);
    assert!(t
        .inbound(&ok(Proto::Udp, OTHER, 9999, 5000), NONE, 2)
        .is_ok());
    check_consistent(&t);
    // REMOTE's sessions gone: REMOTE is filtered again.
    t.remove(a);
    t.remove(id);
    assert_eq!(
        t.inbound(&ok(Proto::Udp, REMOTE, 55, 5000), NONE, 3),
        Err(InboundError::Filtered)
    );
    assert_eq!(t.len(), 2);
    check_consistent(&t);
}

#[test]
fn apdf_accepts_nothing_new() {
    let mut t = with(Filtering::AddressAndPort, 0, 100);
    let a = udp_mapping(&mut t);
    assert_eq!(t.inbound(&ok(Proto::Udp, REMOTE, 53, 5000), NONE, 1), Ok(a));
    for k in [
        ok(Proto::Udp, REMOTE, 54, 5000),
        ok(Proto::Udp, OTHER, 53, 5000),
    ] {
        assert_eq!(t.inbound(&k, NONE, 1), Err(InboundError::Filtered));
    }
    assert_eq!(inbound_flows(&t), 0);
    assert_eq!(t.len(), 1);
}

#[test]
fn inbound_tcp_needs_a_syn_and_starts_from_the_remote() {
    let mut t = with(Filtering::EndpointIndependent, 0, 100);
    let out = t.create(&ik(Proto::Tcp, 2, 5000, 9, 443), EXT, 0).unwrap();
    acc(&mut t, out, Direction::In2Out, SYN, 60, 0);
    let k = ok(Proto::Tcp, OTHER, 40000, 5000);
    for f in [ACK, SYNACK, RST, FINACK, NONE] {
        assert_eq!(t.inbound(&k, f, 1), Err(InboundError::NotSyn));
    }
    assert_eq!(t.len(), 1);
    let id = t.inbound(&k, SYN, 1).unwrap();
    acc(&mut t, id, Direction::Out2In, SYN, 60, 1);
    assert_eq!(tcp_state(&t, id), TcpState::SynSent);
    assert!(!t.get(id).replied);
    assert_eq!(t.get(id).expires_at_ms(&T), 1 + T.tcp_transitory_ms);
    acc(&mut t, id, Direction::In2Out, SYNACK, 60, 2);
    assert_eq!(tcp_state(&t, id), TcpState::SynReceived);
    assert!(t.get(id).replied);
    acc(&mut t, id, Direction::Out2In, ACK, 52, 3);
    assert_eq!(tcp_state(&t, id), TcpState::Established);
    // Closing and a reopen by the remote (the initiator here).
    acc(&mut t, id, Direction::Out2In, RST, 40, 4);
    assert_eq!(tcp_state(&t, id), TcpState::Closed);
    acc(&mut t, id, Direction::In2Out, SYN, 60, 5); // not the initiator
    assert_eq!(tcp_state(&t, id), TcpState::Closed);
    acc(&mut t, id, Direction::Out2In, SYN, 60, 5);
    assert_eq!(tcp_state(&t, id), TcpState::SynSent);
    assert!(t.opened_inbound(id));
    check_consistent(&t);
}

#[test]
fn inbound_simultaneous_open() {
    // The remote's SYN arrives first (EIF opens a session), then the pod's
    // own SYN to the same remote hits it: RFC 5382 REQ-2.
    let mut t = with(Filtering::EndpointIndependent, 0, 100);
    let out = t.create(&ik(Proto::Tcp, 2, 5000, 9, 443), EXT, 0).unwrap();
    acc(&mut t, out, Direction::In2Out, SYN, 60, 0);
    let id = t
        .inbound(&ok(Proto::Tcp, OTHER, 6000, 5000), SYN, 1)
        .unwrap();
    acc(&mut t, id, Direction::Out2In, SYN, 60, 1);
    let inside = t.get(id).inside;
    assert_eq!(t.lookup_in2out(&inside, 1), Some(id));
    acc(&mut t, id, Direction::In2Out, SYN, 60, 1);
    assert_eq!(tcp_state(&t, id), TcpState::SynReceived);
    acc(&mut t, id, Direction::In2Out, SYNACK, 60, 2);
    acc(&mut t, id, Direction::Out2In, SYNACK, 60, 2);
    assert_eq!(tcp_state(&t, id), TcpState::Established);
}

#[test]
fn inbound_respects_max_flows() {
    let mut t = with(Filtering::EndpointIndependent, 0, 2);
    let a = udp_mapping(&mut t);
    acc(&mut t, a, Direction::Out2In, NONE, 60, 0);
    let b = t.inbound(&ok(Proto::Udp, OTHER, 1, 5000), NONE, 1).unwrap();
    acc(&mut t, b, Direction::In2Out, NONE, 60, 1); // replied
    assert_eq!(
        t.inbound(&ok(Proto::Udp, OTHER, 2, 5000), NONE, 2),
        Err(InboundError::TableFull)
    );
    // Both flows are replied: the refusal evicted nothing.
    assert_eq!(t.stats(), TableStats::default());
    assert_eq!(t.len(), 2);
    check_consistent(&t);
}

#[test]
fn forward_opens_sessions_on_syn_only() {
    // Default APDF filtering: forwards are open whatever the filtering.
    let mut t = FlowTable::new(cfg(0, 2, 20000, 30000, 100));
    t.add_forward(Proto::Tcp, EXT, 8080, TARGET, 80).unwrap();
    assert_eq!(t.forwards_len(), 1);
    assert_eq!(
        t.forward_for_inside(Proto::Tcp, TARGET, 80),
        Some((EXT, 8080))
    );
    assert_eq!(t.forward_for_inside(Proto::Udp, TARGET, 80), None);
    assert_eq!(t.forward_for_inside(Proto::Tcp, TARGET, 81), None);
    let k = ok(Proto::Tcp, REMOTE, 40000, 8080);
    assert_eq!(t.lookup_out2in(&k, 0), None);
    for f in [ACK, SYNACK, RST, NONE] {
        assert_eq!(t.inbound(&k, f, 0), Err(InboundError::NotSyn));
    }
    assert!(t.is_empty());
    let id = t.inbound(&k, SYN, 0).unwrap();
    let inside = InKey {
        proto: Proto::Tcp,
        src: TARGET,
        sport: 80,
        dst: REMOTE,
        dport: 40000,
    };
    assert_eq!(t.get(id).inside, inside);
    assert_eq!((t.get(id).ext_addr, t.get(id).ext_port), (EXT, 8080));
    acc(&mut t, id, Direction::Out2In, SYN, 60, 0);
    // The target's SYN+ACK is found by the in2out lookup.
    assert_eq!(t.lookup_in2out(&inside, 1), Some(id));
    acc(&mut t, id, Direction::In2Out, SYNACK, 60, 1);
    acc(&mut t, id, Direction::Out2In, ACK, 52, 2);
    assert_eq!(tcp_state(&t, id), TcpState::Established);
    assert_eq!(t.lookup_out2in(&k, 3), Some(id));
    // Another remote, another session on the same forward.
    let k2 = ok(Proto::Tcp, OTHER, 40000, 8080);
    let id2 = t.inbound(&k2, SYN, 3).unwrap();
    assert_ne!(id, id2);
    assert_eq!(inbound_flows(&t), 2);
    // Wrong outside address: no forward there.
    let k3 = OutKey {
        ext: Ipv4Addr::new(198, 51, 100, 7),
        ..k2
    };
    assert_eq!(t.inbound(&k3, SYN, 3), Err(InboundError::NoMapping));
    check_consistent(&t);
    // A new outbound connection from the target keeps the forwarded port
    // and address, whatever address the caller passes.
    let other_addr = Ipv4Addr::new(198, 51, 100, 2);
    let o = t
        .create(
            &InKey {
                dst: OTHER,
                dport: 9,
                ..inside
            },
            other_addr,
            4,
        )
        .unwrap();
    assert_eq!((t.get(o).ext_addr, t.get(o).ext_port), (EXT, 8080));
    // Sessions end; the forward and its port stay, also across clear().
    t.expire(4 + T.tcp_established_ms, usize::MAX);
    assert!(t.is_empty());
    assert_eq!(t.forwards_len(), 1);
    t.clear();
    assert_eq!(t.forwards_len(), 1);
    assert!(t.ports.is_used(Proto::Tcp, 8080));
    assert!(t.inbound(&k, SYN, 5).is_ok());
    check_consistent(&t);
}

#[test]
fn udp_forward_opens_on_any_packet() {
    let mut t = with(Filtering::AddressAndPort, 0, 100);
    t.add_forward(Proto::Udp, EXT, 5353, TARGET, 53).unwrap();
    let id = t
        .inbound(&ok(Proto::Udp, REMOTE, 1234, 5353), NONE, 0)
        .unwrap();
    assert_eq!(t.get(id).inside.src, TARGET);
    assert_eq!(t.get(id).inside.sport, 53);
    // TCP on the same port number is not forwarded.
    assert_eq!(
        t.inbound(&ok(Proto::Tcp, REMOTE, 1234, 5353), SYN, 0),
        Err(InboundError::NoMapping)
    );
}

#[test]
fn add_forward_checks() {
    let mut t = FlowTable::new(cfg(1, 2, 2000, 2009, 100));
    assert_eq!(
        t.add_forward(Proto::Tcp, EXT, 8080, TARGET, 80),
        Err(ForwardError::NotOwned)
    );
    assert_eq!(
        t.add_forward(Proto::Icmp, EXT, 8081, TARGET, 80),
        Err(ForwardError::Icmp)
    );
    t.add_forward(Proto::Tcp, EXT, 8081, TARGET, 80).unwrap();
    assert_eq!(
        t.add_forward(Proto::Tcp, EXT, 8081, TARGET, 81),
        Err(ForwardError::PortInUse)
    );
    assert_eq!(
        t.add_forward(Proto::Tcp, EXT, 8083, TARGET, 80),
        Err(ForwardError::InsideInUse)
    );
    // UDP is separate.
    t.add_forward(Proto::Udp, EXT, 8081, TARGET, 80).unwrap();
    // A port held by a dynamic mapping; an endpoint with a mapping.
    let id = t.create(&ik(Proto::Tcp, 2, 2001, 9, 80), EXT, 0).unwrap();
    assert_eq!(t.get(id).ext_port, 2001);
    assert_eq!(
        t.add_forward(Proto::Tcp, EXT, 2001, TARGET, 22),
        Err(ForwardError::PortInUse)
    );
    assert_eq!(
        t.add_forward(Proto::Tcp, EXT, 2003, Ipv4Addr::new(10, 0, 0, 2), 2001),
        Err(ForwardError::InsideInUse)
    );
    assert_eq!(t.forwards_len(), 2);
    assert_eq!(
        ForwardError::NotOwned.to_string(),
        "outside port belongs to another worker"
    );
    check_consistent(&t);
}

#[test]
fn forward_port_never_allocated_dynamically() {
    // Worker 1 of 2 owns 2001, 2003, ..., 2009; 2005 is forwarded.
    let mut t = FlowTable::new(cfg(1, 2, 2000, 2009, 100));
    t.add_forward(Proto::Udp, EXT, 2005, TARGET, 53).unwrap();
    // Port preservation must not take it either.
    let id = t.create(&ik(Proto::Udp, 2, 2005, 9, 53), EXT, 0).unwrap();
    assert_ne!(t.get(id).ext_port, 2005);
    let mut ports = vec![t.get(id).ext_port];
    for src in 3..=5 {
        let id = t.create(&ik(Proto::Udp, src, 2005, 9, 53), EXT, 0).unwrap();
        ports.push(t.get(id).ext_port);
    }
    ports.sort();
    assert_eq!(ports, vec![2001, 2003, 2007, 2009]);
    assert_eq!(
        t.create(&ik(Proto::Udp, 6, 2005, 9, 53), EXT, 0),
        Err(CreateError::PortsExhausted)
    );
    // Freed dynamic ports never free the forward's.
    t.expire(T.udp_ms, usize::MAX);
    assert!(t.is_empty());
    assert!(t.ports.is_used(Proto::Udp, 2005));
    check_consistent(&t);
}

/// Sequence numbers of the RST tests: inside ISN, outside ISN.
const ISN_IN: u32 = 1_000_000;
const ISN_OUT: u32 = 4_000_000_000;

/// An established outbound TCP flow with real sequence numbers; the pod
/// advertises `win_in`, the remote `win_out` (raw, unscaled).
fn established(t: &mut FlowTable, sport: u16, win_in: u16, win_out: u16) -> FlowId {
    let id = t.create(&ik(Proto::Tcp, 2, sport, 9, 443), EXT, 0).unwrap();
    let mut a = |d, s| assert_eq!(t.account(id, d, s, 60, 0), Verdict::Accept);
    a(Direction::In2Out, tseg(SYN, ISN_IN, 0, win_in, 0));
    a(
        Direction::Out2In,
        tseg(SYNACK, ISN_OUT, ISN_IN + 1, win_out, 0),
    );
    a(
        Direction::In2Out,
        tseg(ACK, ISN_IN + 1, ISN_OUT.wrapping_add(1), win_in, 0),
    );
    assert_eq!(tcp_state(t, id), TcpState::Established);
    id
}

#[test]
fn rst_in_window_closes() {
    let mut t = table();
    let id = established(&mut t, 5000, 512, 512);
    let rcv_nxt = ISN_OUT.wrapping_add(1);
    let v = t.account(id, Direction::Out2In, tseg(RST, rcv_nxt, 0, 0, 0), 40, 10);
    assert_eq!(v, Verdict::Accept);
    assert_eq!(tcp_state(&t, id), TcpState::Closed);
    assert_eq!(t.get(id).expires_at_ms(&T), 10 + T.tcp_transitory_ms);
    // From inside, in the remote's window.
    let id = established(&mut t, 5001, 512, 512);
    let v = t.account(
        id,
        Direction::In2Out,
        tseg(RST, ISN_IN + 1, 0, 0, 0),
        40,
        10,
    );
    assert_eq!(v, Verdict::Accept);
    assert_eq!(tcp_state(&t, id), TcpState::Closed);
}

#[test]
fn rst_out_of_window_dropped_and_flow_unchanged() {
    let mut t = table();
    let id = established(&mut t, 5000, 1, 1);
    let rcv_nxt = ISN_OUT.wrapping_add(1);
    let before = *t.get(id);
    let tags = t.slab.tag(id.index() as usize);
    let seqs = t.slab.seq(id.index() as usize);
    for seq in [
        rcv_nxt.wrapping_sub(1),           // below RCV.NXT
        rcv_nxt.wrapping_add(16_385),      // past 1 << 14
        rcv_nxt.wrapping_add(0x8000_0000), // far away
        ISN_IN,                            // the wrong side's numbers
    ] {
        for f in [RST, RSTACK] {
            let v = t.account(id, Direction::Out2In, tseg(f, seq, 0, 0, 0), 40, 999);
            assert_eq!(v, Verdict::DropInvalidRst, "seq {seq}");
        }
    }
    let after = *t.get(id);
    assert_eq!(after.state, before.state);
    assert_eq!(after.last_seen_ms, before.last_seen_ms);
    assert_eq!(after.packets_out2in, before.packets_out2in);
    assert_eq!(after.bytes_out2in, before.bytes_out2in);
    assert_eq!(t.slab.tag(id.index() as usize), tags);
    assert_eq!(t.slab.seq(id.index() as usize), seqs);
    // The edges are in.
    let v = t.account(
        id,
        Direction::Out2In,
        tseg(RST, rcv_nxt.wrapping_add(16_384), 0, 0, 0),
        40,
        1000,
    );
    assert_eq!(v, Verdict::Accept);
    assert_eq!(tcp_state(&t, id), TcpState::Closed);
}

#[test]
fn rst_with_scaled_windows_accepted() {
    // The pod advertises 1000 << 10 = 1 MB; the remote sends 300 kB we see
    // plus 500 kB lost upstream, then aborts: RST at its SND.NXT.
    let mut t = table();
    let id = established(&mut t, 5000, 1000, 1000);
    let base = ISN_OUT.wrapping_add(1);
    let mut seq = base;
    for _ in 0..200 {
        let v = t.account(
            id,
            Direction::Out2In,
            tseg(ACK, seq, ISN_IN + 1, 1000, 1500),
            1540,
            1,
        );
        assert_eq!(v, Verdict::Accept);
        seq = seq.wrapping_add(1500);
    }
    // The pod acked the first 100 kB.
    let v = t.account(
        id,
        Direction::In2Out,
        tseg(ACK, ISN_IN + 1, base.wrapping_add(100_000), 1000, 0),
        40,
        2,
    );
    assert_eq!(v, Verdict::Accept);
    for rst_seq in [
        seq,                        // data-path abort at what we saw
        seq.wrapping_add(500_000),  // after upstream loss
        base.wrapping_add(100_000), // a RST answering the pod's ACK
        base.wrapping_add(150_000), // somewhere in flight
    ] {
        let mut t2 = table();
        let id2 = established(&mut t2, 5000, 1000, 1000);
        let mut s = base;
        for _ in 0..200 {
            let _ = t2.account(
                id2,
                Direction::Out2In,
                tseg(ACK, s, ISN_IN + 1, 1000, 1500),
                1540,
                1,
            );
            s = s.wrapping_add(1500);
        }
        let _ = t2.account(
            id2,
            Direction::In2Out,
            tseg(ACK, ISN_IN + 1, base.wrapping_add(100_000), 1000, 0),
            40,
            2,
        );
        let v = t2.account(
            id2,
            Direction::Out2In,
            tseg(RSTACK, rst_seq, ISN_IN + 1, 0, 0),
            40,
            3,
        );
        assert_eq!(v, Verdict::Accept, "rst seq {rst_seq}");
        assert_eq!(tcp_state(&t2, id2), TcpState::Closed);
    }
    // Below what the pod acked: dropped.
    let v = t.account(
        id,
        Direction::Out2In,
        tseg(RST, base.wrapping_add(99_999), 0, 0, 0),
        40,
        3,
    );
    assert_eq!(v, Verdict::DropInvalidRst);
    assert_eq!(tcp_state(&t, id), TcpState::Established);
    // The pod aborts with its full window of 2^14-scaled data: fine too.
    let v = t.account(id, Direction::In2Out, tseg(RST, ISN_IN + 1, 0, 0, 0), 40, 4);
    assert_eq!(v, Verdict::Accept);
}

#[test]
fn rst_refusing_a_syn() {
    let mut t = table();
    let id = t.create(&ik(Proto::Tcp, 2, 5000, 9, 443), EXT, 0).unwrap();
    assert_eq!(
        t.account(id, Direction::In2Out, tseg(SYN, ISN_IN, 0, 100, 0), 60, 0),
        Verdict::Accept
    );
    // Blind RSTs: no ACK, or the wrong ACK.
    for s in [tseg(RST, 7, 0, 0, 0), tseg(RSTACK, 7, ISN_IN + 2, 0, 0)] {
        assert_eq!(
            t.account(id, Direction::Out2In, s, 40, 1),
            Verdict::DropInvalidRst
        );
        assert_eq!(tcp_state(&t, id), TcpState::SynSent);
    }
    assert_eq!(
        t.account(
            id,
            Direction::Out2In,
            tseg(RSTACK, 0, ISN_IN + 1, 0, 0),
            40,
            1
        ),
        Verdict::Accept
    );
    assert_eq!(tcp_state(&t, id), TcpState::Closed);
    // Reopen with a new ISN: the tracking restarts.
    let isn2 = ISN_IN.wrapping_add(0x4000_0000);
    assert_eq!(
        t.account(id, Direction::In2Out, tseg(SYN, isn2, 0, 100, 0), 60, 2),
        Verdict::Accept
    );
    assert_eq!(tcp_state(&t, id), TcpState::SynSent);
    assert_eq!(
        t.account(
            id,
            Direction::Out2In,
            tseg(RSTACK, 0, ISN_IN + 1, 0, 0),
            40,
            3
        ),
        Verdict::DropInvalidRst
    );
    assert_eq!(
        t.account(
            id,
            Direction::Out2In,
            tseg(RSTACK, 0, isn2 + 1, 0, 0),
            40,
            3
        ),
        Verdict::Accept
    );
    // A forward's target refusing the remote's SYN (port closed).
    t.add_forward(Proto::Tcp, EXT, 8080, TARGET, 80).unwrap();
    let k = ok(Proto::Tcp, REMOTE, 40000, 8080);
    let f = t.inbound(&k, SYN, 4).unwrap();
    assert_eq!(
        t.account(f, Direction::Out2In, tseg(SYN, ISN_OUT, 0, 100, 0), 60, 4),
        Verdict::Accept
    );
    assert_eq!(
        t.account(
            f,
            Direction::In2Out,
            tseg(RSTACK, 0, ISN_OUT.wrapping_add(1), 0, 0),
            40,
            4
        ),
        Verdict::Accept
    );
    assert_eq!(tcp_state(&t, f), TcpState::Closed);
}

#[test]
fn udp_and_icmp_ignore_segments() {
    let mut t = table();
    let id = t.create(&ik(Proto::Udp, 2, 5000, 9, 53), EXT, 0).unwrap();
    // Even a bogus "RST" segment is irrelevant for UDP.
    let v = t.account(id, Direction::Out2In, tseg(RST, 1, 2, 3, 4), 40, 1);
    assert_eq!(v, Verdict::Accept);
    assert_eq!(t.get(id).state, FlowState::Udp);
}

#[test]
fn syn_flood_never_evicts_replied_flows() {
    let max = 100;
    let mut t = with(Filtering::AddressAndPort, 0, max);
    let before = Before::of(&t);
    // 60 established flows.
    let mut good = Vec::new();
    for i in 0..60u16 {
        let k = ik(Proto::Tcp, 2, 10_000 + i, 9, 443);
        let id = t.create(&k, EXT, 0).unwrap();
        handshake(&mut t, id, 0);
        good.push(k);
    }
    // 5000 SYNs from distinct inside endpoints that never get an answer.
    let attempts = 5000u64;
    let (mut ok_creates, mut refused) = (0u64, 0u64);
    for i in 0..attempts {
        let k = InKey {
            proto: Proto::Tcp,
            src: Ipv4Addr::from(0x0a01_0000 | i as u32),
            sport: 30_000,
            dst: REMOTE,
            dport: 80,
        };
        let now = 1 + i;
        match t.create(&k, EXT, now) {
            Ok(id) => {
                acc(&mut t, id, Direction::In2Out, SYN, 60, now);
                ok_creates += 1;
            }
            Err(CreateError::TableFull) => refused += 1,
            Err(e) => panic!("{e:?}"),
        }
        assert!(t.len() <= max);
    }
    let st = t.stats();
    assert_eq!(
        before.created(&t),
        60 + ok_creates,
        "every Ok is a new flow"
    );
    assert_eq!(st.early_dropped, ok_creates - 40);
    assert_eq!(refused, 0, "an unreplied victim is always in reach");
    for k in &good {
        let id = t.lookup_in2out(k, attempts).expect("replied flow evicted");
        assert_eq!(tcp_state(&t, id), TcpState::Established);
    }
    check_consistent(&t);

    // Now only replied flows: every further create is refused.
    let mut t = with(Filtering::AddressAndPort, 0, max);
    for i in 0..max as u16 {
        let id = t
            .create(&ik(Proto::Udp, 2, 10_000 + i, 9, 53), EXT, 0)
            .unwrap();
        acc(&mut t, id, Direction::Out2In, NONE, 60, 0);
    }
    for i in 0..1000u16 {
        assert_eq!(
            t.create(&ik(Proto::Udp, 3, 10_000 + i, 9, 53), EXT, 1),
            Err(CreateError::TableFull)
        );
    }
    assert_eq!(t.stats().early_dropped, 0);
    assert_eq!(t.len(), max);
}

#[test]
fn inbound_syn_flood_never_evicts_replied_flows() {
    let mut t = with(Filtering::EndpointIndependent, 0, 50);
    t.add_forward(Proto::Tcp, EXT, 8080, TARGET, 80).unwrap();
    let mut good = Vec::new();
    for i in 0..30u16 {
        let k = ik(Proto::Udp, 2, 10_000 + i, 9, 53);
        let id = t.create(&k, EXT, 0).unwrap();
        acc(&mut t, id, Direction::Out2In, NONE, 60, 0);
        good.push(k);
    }
    // A remote served by the target (handshake completed) is kept too; one
    // only answered with a SYN-ACK is not yet (see expiry: half-open TCP
    // can be early-dropped, or a flood the target answers fills the table).
    let before = Before::of(&t);
    let served = t.inbound(&ok(Proto::Tcp, OTHER, 1, 8080), SYN, 0).unwrap();
    acc(&mut t, served, Direction::Out2In, SYN, 60, 0);
    acc(&mut t, served, Direction::In2Out, SYNACK, 60, 0);
    acc(&mut t, served, Direction::Out2In, ACK, 52, 0);
    assert_eq!(tcp_state(&t, served), TcpState::Established);
    let served_key = t.get(served).inside;
    let attempts = 2000u32;
    for i in 0..attempts {
        let remote = Ipv4Addr::from(0xc633_0000 | i); // 198.51.x.x
        let id = t
            .inbound(
                &ok(Proto::Tcp, remote, 1024 + (i % 60000) as u16, 8080),
                SYN,
                1,
            )
            .unwrap();
        assert!(t.opened_inbound(id));
        acc(&mut t, id, Direction::Out2In, SYN, 60, 1);
        assert!(!t.get(id).replied);
    }
    let st = t.stats();
    // Only inbound() created flows since `before`.
    assert_eq!(before.created(&t), 1 + u64::from(attempts));
    assert_eq!(st.early_dropped, u64::from(attempts) - 19);
    for k in &good {
        assert!(t.lookup_in2out(k, 1).is_some());
    }
    assert!(t.lookup_in2out(&served_key, 1).is_some());
    check_consistent(&t);
}

#[test]
fn port_reuse_delay() {
    const D: u64 = 120_000;
    // Worker 0 of 1, ports 2000..=2003.
    let mut t = FlowTable::new(TableConfig {
        port_reuse_delay_ms: D,
        ..cfg(0, 1, 2000, 2003, 100)
    });
    let a = t.create(&ik(Proto::Udp, 2, 2000, 9, 53), EXT, 0).unwrap();
    assert_eq!(t.get(a).ext_port, 2000);
    t.remove(a); // released at t = 0 (the latest time seen)
    assert_eq!(t.cooling_len(), 1);
    assert_eq!(t.mappings_len(), 0);
    // Nobody gets 2000 for D ms, not even its previous owner.
    let mut ports = Vec::new();
    for src in 2..=4 {
        let id = t
            .create(&ik(Proto::Udp, src, 2000, 9, 53), EXT, 10)
            .unwrap();
        ports.push(t.get(id).ext_port);
    }
    ports.sort();
    assert_eq!(ports, vec![2001, 2002, 2003]);
    check_consistent(&t);
    assert_eq!(
        t.create(&ik(Proto::Udp, 5, 2000, 9, 53), EXT, D - 1),
        Err(CreateError::PortsExhausted)
    );
    // The refusal left nothing behind.
    assert_eq!((t.len(), t.mappings_len()), (3, 3));
    // TCP and ICMP have their own ports; ICMP ids are not quarantined.
    let icmp = t.create(&ik(Proto::Icmp, 2, 7, 9, 0), EXT, D - 1).unwrap();
    assert_eq!(t.get(icmp).ext_port, 7);
    t.remove(icmp);
    let icmp = t.create(&ik(Proto::Icmp, 3, 7, 9, 0), EXT, D - 1).unwrap();
    assert_eq!(t.get(icmp).ext_port, 7);
    // Time is up.
    let id = t.create(&ik(Proto::Udp, 5, 2000, 9, 53), EXT, D).unwrap();
    assert_eq!(t.get(id).ext_port, 2000);
    assert_eq!(t.cooling_len(), 0);
    check_consistent(&t);

    // Expiry releases at the sweep's time; expire() also ends quarantines.
    let now = 10 + T.udp_ms;
    assert_eq!(t.expire(now, usize::MAX), 4); // 3 UDP flows and the ICMP one
    assert_eq!(t.cooling_len(), 3);
    check_consistent(&t);
    assert_eq!(t.expire(now + D - 1, 0), 0);
    assert_eq!(t.cooling_len(), 3);
    assert_eq!(t.expire(now + D, 0), 0);
    assert_eq!(t.cooling_len(), 0);
    check_consistent(&t);

    // clear() quarantines every dynamic TCP/UDP port.
    t.create(&ik(Proto::Tcp, 9, 2001, 9, 80), EXT, now + D)
        .unwrap();
    t.clear();
    assert_eq!(t.cooling_len(), 2); // UDP 2000 and TCP 2001
    check_consistent(&t);
    let id = t
        .create(&ik(Proto::Tcp, 9, 2001, 9, 80), EXT, now + D)
        .unwrap();
    assert_ne!(t.get(id).ext_port, 2001);
    check_consistent(&t);
}

#[test]
fn forward_added_on_a_cooling_port_keeps_it() {
    let mut t = FlowTable::new(TableConfig {
        port_reuse_delay_ms: 1000,
        ..cfg(0, 1, 2000, 2003, 100)
    });
    let a = t.create(&ik(Proto::Tcp, 2, 2000, 9, 53), EXT, 0).unwrap();
    t.remove(a);
    assert_eq!(
        t.add_forward(Proto::Tcp, EXT, 2000, TARGET, 80),
        Err(ForwardError::PortInUse)
    );
    t.expire(1000, 0);
    t.add_forward(Proto::Tcp, EXT, 2000, TARGET, 80).unwrap();
    check_consistent(&t);
}

#[test]
fn a_forwarded_port_inside_the_pool_is_never_handed_out() {
    // `[[forward]]` on 8080 with nat.ports 1024-65535: a pod whose own port
    // is 8080 (port preservation would keep it) gets another one, and so
    // does every flow while the pool has other ports.
    let mut t = FlowTable::new(cfg(0, 1, 8080, 8083, 100));
    t.add_forward(Proto::Tcp, EXT, 8080, TARGET, 80).unwrap();
    let pod = Ipv4Addr::new(10, 0, 0, 9);
    let mut seen = Vec::new();
    for (i, sport) in [8080u16, 8081, 8082].into_iter().enumerate() {
        let k = InKey {
            proto: Proto::Tcp,
            src: pod,
            sport,
            dst: REMOTE,
            dport: 443,
        };
        let id = t.create(&k, EXT, i as u64).unwrap();
        seen.push(t.get(id).ext_port);
        // Established, so the pod has no flow of its own to give up a port.
        acc(&mut t, id, Direction::In2Out, SYN, 60, i as u64);
        acc(&mut t, id, Direction::Out2In, SYNACK, 60, i as u64);
        acc(&mut t, id, Direction::In2Out, ACK, 60, i as u64);
    }
    seen.sort();
    assert_eq!(seen, [8081, 8082, 8083]);
    // The pool is now used up; the forwarded port is still not taken.
    let k = InKey {
        proto: Proto::Tcp,
        src: pod,
        sport: 9000,
        dst: REMOTE,
        dport: 443,
    };
    assert_eq!(t.create(&k, EXT, 5), Err(CreateError::PortsExhausted));
    // UDP has its own ports: 8080/udp is free for a flow.
    let u = InKey {
        proto: Proto::Udp,
        ..k
    };
    let id = t.create(&InKey { sport: 8080, ..u }, EXT, 6).unwrap();
    assert_eq!(t.get(id).ext_port, 8080);
    check_consistent(&t);
}
