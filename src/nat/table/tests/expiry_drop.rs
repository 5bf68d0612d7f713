//! Timeouts, the sweep and the `max_flows` bound with early drop.

use super::*;

#[test]
fn expiry_per_protocol() {
    for (proto, timeout) in [
        (Proto::Udp, T.udp_ms),
        (Proto::Icmp, T.icmp_ms),
        (Proto::Tcp, T.tcp_transitory_ms),
    ] {
        let mut t = table();
        let k = ik(proto, 2, 5000, 9, if proto == Proto::Icmp { 0 } else { 80 });
        let id = t.create(&k, EXT, 1000).unwrap();
        let ok = t.get(id).out_key();
        assert_eq!(t.get(id).expires_at_ms(&T), 1000 + timeout);
        assert_eq!(t.lookup_in2out(&k, 1000 + timeout - 1), Some(id));
        assert_eq!(t.lookup_out2in(&ok, 1000 + timeout - 1), Some(id));
        // Refresh moves the deadline.
        acc(&mut t, id, Direction::In2Out, SYN, 60, 2000);
        assert_eq!(t.lookup_out2in(&ok, 2000 + timeout - 1), Some(id));
        assert_eq!(t.lookup_out2in(&ok, 2000 + timeout), None);
        assert_eq!(t.lookup_in2out(&k, 2000 + timeout), None);
        assert!(t.is_empty());
        assert_eq!(t.stats().expired, 1);
        assert_eq!(t.mappings_len(), 0);
        check_consistent(&t);
    }
    // TCP established uses the long timeout.
    let mut t = table();
    let k = ik(Proto::Tcp, 2, 5000, 9, 443);
    let id = t.create(&k, EXT, 0).unwrap();
    acc(&mut t, id, Direction::In2Out, SYN, 60, 0);
    acc(&mut t, id, Direction::Out2In, SYNACK, 60, 0);
    acc(&mut t, id, Direction::In2Out, ACK, 52, 0);
    assert_eq!(tcp_state(&t, id), TcpState::Established);
    assert_eq!(t.lookup_in2out(&k, T.tcp_established_ms - 1), Some(id));
    assert_eq!(t.lookup_in2out(&k, T.tcp_established_ms), None);
}

#[test]
fn max_flows_early_drop_then_table_full() {
    let mut t = FlowTable::new(cfg(0, 1, 1024, 65535, 4));
    let mut ids = Vec::new();
    for i in 0..4u16 {
        ids.push(
            t.create(&ik(Proto::Udp, 2, 5000 + i, 9, 53), EXT, u64::from(i))
                .unwrap(),
        );
    }
    // Reply to all but the second one (created at t=1).
    for (n, &id) in ids.iter().enumerate() {
        if n != 1 {
            acc(&mut t, id, Direction::Out2In, NONE, 10, 10);
        }
    }
    let k = ik(Proto::Udp, 3, 6000, 9, 53);
    let id = t.create(&k, EXT, 20).unwrap();
    assert_eq!(t.len(), 4);
    assert_eq!(t.stats().early_dropped, 1);
    assert_eq!(t.lookup_in2out(&ik(Proto::Udp, 2, 5001, 9, 53), 20), None);
    assert_eq!(t.mappings_len(), 4);
    // Now every flow but the new one is replied; reply to it as well.
    acc(&mut t, id, Direction::Out2In, NONE, 10, 20);
    assert_eq!(
        t.create(&ik(Proto::Udp, 4, 6000, 9, 53), EXT, 20),
        Err(CreateError::TableFull)
    );
    // The refusal evicted nothing.
    assert_eq!(t.stats().early_dropped, 1);
    assert_eq!(t.len(), 4);
    // An expired flow is reclaimed before anything is evicted.
    let late = 10 + T.udp_ms;
    let id = t
        .create(&ik(Proto::Udp, 4, 6000, 9, 53), EXT, late)
        .unwrap();
    assert_eq!(t.stats().expired, 1);
    assert_eq!(t.stats().early_dropped, 1);
    assert_eq!(t.get(id).last_seen_ms, late);
    check_consistent(&t);
}

#[test]
fn early_drop_picks_oldest_unreplied() {
    let mut t = FlowTable::new(cfg(0, 1, 1024, 65535, 3));
    t.create(&ik(Proto::Udp, 2, 5000, 9, 53), EXT, 5).unwrap();
    t.create(&ik(Proto::Udp, 2, 5001, 9, 53), EXT, 1).unwrap();
    t.create(&ik(Proto::Udp, 2, 5002, 9, 53), EXT, 3).unwrap();
    t.create(&ik(Proto::Udp, 3, 5003, 9, 53), EXT, 6).unwrap();
    assert_eq!(t.lookup_in2out(&ik(Proto::Udp, 2, 5001, 9, 53), 6), None);
    assert_eq!(t.len(), 3);
}

#[test]
fn early_drop_takes_a_half_open_tcp_flow_never_an_established_one() {
    let mut t = FlowTable::new(cfg(0, 1, 1024, 65535, 2));
    let est = ik(Proto::Tcp, 2, 5000, 9, 443);
    let id = t.create(&est, EXT, 0).unwrap();
    acc(&mut t, id, Direction::In2Out, SYN, 60, 0);
    acc(&mut t, id, Direction::Out2In, SYNACK, 60, 0);
    acc(&mut t, id, Direction::In2Out, ACK, 52, 0);
    assert_eq!(tcp_state(&t, id), TcpState::Established);
    // Answered with a SYN-ACK, never ACKed (the other end of a SYN flood).
    let half = ik(Proto::Tcp, 2, 5001, 9, 443);
    let id = t.create(&half, EXT, 1).unwrap();
    acc(&mut t, id, Direction::In2Out, SYN, 60, 1);
    acc(&mut t, id, Direction::Out2In, SYNACK, 60, 1);
    assert!(t.get(id).replied);
    assert_eq!(tcp_state(&t, id), TcpState::SynReceived);
    let new = ik(Proto::Tcp, 3, 6000, 9, 443);
    let id = t.create(&new, EXT, 2).unwrap();
    assert_eq!(t.stats().early_dropped, 1);
    assert_eq!(t.lookup_in2out(&half, 2), None);
    assert!(t.lookup_in2out(&est, 2).is_some());
    // Once the new one is established too, nothing is left to evict.
    acc(&mut t, id, Direction::In2Out, SYN, 60, 2);
    acc(&mut t, id, Direction::Out2In, SYNACK, 60, 2);
    acc(&mut t, id, Direction::In2Out, ACK, 52, 2);
    assert_eq!(
        t.create(&ik(Proto::Tcp, 4, 6000, 9, 443), EXT, 3),
        Err(CreateError::TableFull)
    );
    check_consistent(&t);
}

#[test]
fn max_flows_zero() {
    let mut t = FlowTable::new(cfg(0, 1, 1024, 65535, 0));
    assert_eq!(
        t.create(&ik(Proto::Udp, 2, 5000, 9, 53), EXT, 0),
        Err(CreateError::TableFull)
    );
}

#[test]
fn expire_honours_budget() {
    let mut t = FlowTable::new(cfg(0, 1, 1024, 65535, 1000));
    for i in 0..100u16 {
        // Even ones at t=0, odd ones at t=100_000.
        let now = if i % 2 == 0 { 0 } else { 100_000 };
        t.create(&ik(Proto::Udp, 2, 2000 + i, 9, 53), EXT, now)
            .unwrap();
    }
    assert_eq!(t.expire(T.udp_ms - 1, usize::MAX), 0);
    let now = T.udp_ms; // even ones expired
    assert_eq!(t.expire(now, 0), 0);
    let mut removed = 0;
    let mut calls = 0;
    while removed < 50 {
        let r = t.expire(now, 7);
        assert!(r <= 7);
        removed += r;
        calls += 1;
        assert!(calls < 100);
    }
    assert_eq!(calls, 15); // the last expired slot (98) is examined by call ceil(99 / 7) = 15
    assert_eq!(removed, 50);
    assert_eq!(t.len(), 50);
    assert_eq!(t.stats().expired, 50);
    // Budget larger than the slab: one lap only.
    assert_eq!(t.expire(now, 1_000_000), 0);
    assert_eq!(t.expire(100_000 + T.udp_ms, 1_000_000), 50);
    assert!(t.is_empty());
    assert_eq!(t.mappings_len(), 0);
    check_consistent(&t);
    t.clear();
    assert_eq!(t.expire(0, 10), 0);
}
