//! Endpoint-independent mappings, port preservation, port classes and the
//! worker's port slice.

use super::*;

#[test]
fn icmp_id_mapping() {
    let mut t = FlowTable::new(cfg(1, 4, 1024, 65535, 100));
    let k = ik(Proto::Icmp, 2, 0x1235, 9, 0); // 0x1235 % 4 == 1
    let id = t.create(&k, EXT, 0).unwrap();
    assert_eq!(t.get(id).ext_port, 0x1235);
    assert_eq!(t.get(id).state, FlowState::Icmp);
    let ok = OutKey {
        proto: Proto::Icmp,
        remote: k.dst,
        rport: 0,
        ext: EXT,
        eport: 0x1235,
    };
    assert_eq!(t.lookup_out2in(&ok, 0), Some(id));
    // An id outside the port range and not owned: remapped, any value owned.
    let k2 = ik(Proto::Icmp, 3, 4, 9, 0);
    let id2 = t.create(&k2, EXT, 0).unwrap();
    assert_eq!(t.get(id2).ext_port % 4, 1);
    // Same id from another host: not overloaded.
    let k3 = ik(Proto::Icmp, 4, 0x1235, 9, 0);
    let id3 = t.create(&k3, EXT, 0).unwrap();
    assert_ne!(t.get(id3).ext_port, 0x1235);
    check_consistent(&t);
}

#[test]
fn eim_same_inside_endpoint_shares_port() {
    let mut t = FlowTable::new(cfg(0, 2, 1024, 65535, 100));
    let a = t.create(&ik(Proto::Udp, 2, 4001, 9, 53), EXT, 0).unwrap(); // 4001 odd: not owned
    let b = t.create(&ik(Proto::Udp, 2, 4001, 10, 123), EXT, 0).unwrap();
    let c = t.create(&ik(Proto::Udp, 2, 4001, 9, 54), EXT, 0).unwrap();
    let p = t.get(a).ext_port;
    assert_eq!(t.get(b).ext_port, p);
    assert_eq!(t.get(c).ext_port, p);
    assert_eq!(p % 2, 0);
    assert_eq!(t.mappings_len(), 1);
    // TCP from the same endpoint is a separate mapping (per proto), and
    // may well preserve the same number.
    let d = t.create(&ik(Proto::Tcp, 2, 4002, 9, 80), EXT, 0).unwrap();
    assert_eq!(t.get(d).ext_port, 4002);
    assert_eq!(t.mappings_len(), 2);
    check_consistent(&t);
}

#[test]
fn different_inside_endpoints_never_share_port() {
    let mut t = FlowTable::new(cfg(0, 1, 1024, 65535, 10_000));
    let mut seen = std::collections::HashSet::new();
    for src in 1..=50u8 {
        for proto in [Proto::Tcp, Proto::Udp, Proto::Icmp] {
            // All use the same inside port: only the first keeps it.
            let id = t.create(&ik(proto, src, 5555, 9, 80), EXT, 0).unwrap();
            assert!(seen.insert((proto, t.get(id).ext_port)));
        }
    }
    let kept = t.iter().filter(|f| f.ext_port == 5555).count();
    assert_eq!(kept, 3); // once per proto
    check_consistent(&t);
}

#[test]
fn port_preservation_and_worker_slice() {
    let mut t = FlowTable::new(cfg(2, 3, 2000, 3000, 100));
    // 2501 % 3 == 2: owned, in range, free -> kept.
    let a = t.create(&ik(Proto::Tcp, 2, 2501, 9, 80), EXT, 0).unwrap();
    assert_eq!(t.get(a).ext_port, 2501);
    // Taken by another endpoint: another port of the slice, in range.
    for src in 3..40 {
        let b = t.create(&ik(Proto::Tcp, src, 2501, 9, 80), EXT, 0).unwrap();
        let p = t.get(b).ext_port;
        assert_ne!(p, 2501);
        assert_eq!(p % 3, 2);
        assert!((2000..=3000).contains(&p));
    }
    // Not owned by this worker (2500 % 3 == 1): remapped into the slice.
    let c = t.create(&ik(Proto::Tcp, 2, 2500, 9, 80), EXT, 0).unwrap();
    assert_eq!(t.get(c).ext_port % 3, 2);
    // Out of range: remapped into the range.
    let d = t.create(&ik(Proto::Udp, 2, 5003, 9, 80), EXT, 0).unwrap();
    assert!((2000..=3000).contains(&t.get(d).ext_port));
    check_consistent(&t);
}

#[test]
fn port_class_kept() {
    // Range spans both classes.
    let mut t = FlowTable::new(cfg(0, 1, 500, 2000, 2000));
    let a = t.create(&ik(Proto::Tcp, 2, 800, 9, 80), EXT, 0).unwrap();
    assert_eq!(t.get(a).ext_port, 800);
    for src in 3..200 {
        let id = t.create(&ik(Proto::Tcp, src, 800, 9, 80), EXT, 0).unwrap();
        assert!((500..1024).contains(&t.get(id).ext_port), "low class lost");
        let id = t.create(&ik(Proto::Udp, src, 3000, 9, 80), EXT, 0).unwrap();
        assert!(
            (1024..=2000).contains(&t.get(id).ext_port),
            "high class lost"
        );
    }
    // Low class exhausted: falls back to high ports.
    let mut t = FlowTable::new(cfg(0, 1, 1020, 1100, 2000));
    for src in 1..=4 {
        let id = t.create(&ik(Proto::Tcp, src, 1021, 9, 80), EXT, 0).unwrap();
        assert!((1020..1024).contains(&t.get(id).ext_port));
    }
    let id = t.create(&ik(Proto::Tcp, 5, 1021, 9, 80), EXT, 0).unwrap();
    assert!((1024..=1100).contains(&t.get(id).ext_port));
    // High class never gets a low port while the range has high ports.
    let mut t = FlowTable::new(cfg(0, 1, 1020, 1024, 2000));
    let id = t.create(&ik(Proto::Tcp, 1, 5000, 9, 80), EXT, 0).unwrap();
    assert_eq!(t.get(id).ext_port, 1024);
    assert_eq!(
        t.create(&ik(Proto::Tcp, 2, 5000, 9, 80), EXT, 0),
        Err(CreateError::PortsExhausted)
    );
    // A range with only low ports: used for high inside ports too.
    let mut t = FlowTable::new(cfg(0, 1, 600, 601, 2000));
    let id = t.create(&ik(Proto::Udp, 1, 5000, 9, 80), EXT, 0).unwrap();
    assert!((600..=601).contains(&t.get(id).ext_port));
}

#[test]
fn ports_exhausted() {
    // Ports 2000..=2009, worker 1 of 2 owns the 5 odd ones.
    let mut t = FlowTable::new(cfg(1, 2, 2000, 2009, 100));
    let mut ports = Vec::new();
    for src in 1..=5 {
        let id = t.create(&ik(Proto::Udp, src, 7000, 9, 53), EXT, 0).unwrap();
        ports.push(t.get(id).ext_port);
    }
    ports.sort();
    assert_eq!(ports, vec![2001, 2003, 2005, 2007, 2009]);
    assert_eq!(
        t.create(&ik(Proto::Udp, 6, 7000, 9, 53), EXT, 0),
        Err(CreateError::PortsExhausted)
    );
    // The refusal left nothing behind.
    assert_eq!((t.len(), t.mappings_len()), (5, 5));
    // A known endpoint still gets new flows on its mapping.
    assert!(t.create(&ik(Proto::Udp, 1, 7000, 10, 53), EXT, 0).is_ok());
    // Other protocols have their own ports.
    assert!(t.create(&ik(Proto::Tcp, 6, 7000, 9, 53), EXT, 0).is_ok());
    // Freeing one makes room again.
    let id = t.lookup_in2out(&ik(Proto::Udp, 3, 7000, 9, 53), 0).unwrap();
    t.remove(id);
    assert!(t.create(&ik(Proto::Udp, 6, 7000, 9, 53), EXT, 0).is_ok());
    check_consistent(&t);
}

#[test]
fn mapping_released_with_last_flow() {
    let mut t = FlowTable::new(cfg(0, 1, 1024, 65535, 100));
    let a = t.create(&ik(Proto::Udp, 2, 5000, 9, 53), EXT, 0).unwrap();
    let b = t
        .create(&ik(Proto::Udp, 2, 5000, 10, 53), EXT, 100)
        .unwrap();
    assert_eq!(t.get(a).ext_port, 5000);
    assert_eq!(t.get(b).ext_port, 5000);
    // Another endpoint wanting 5000 can't have it.
    let c = t.create(&ik(Proto::Udp, 3, 5000, 9, 53), EXT, 200).unwrap();
    let pc = t.get(c).ext_port;
    assert_ne!(pc, 5000);
    // First flow expires: the mapping (and port) stay.
    assert_eq!(t.expire(T.udp_ms, usize::MAX), 1);
    assert_eq!(t.mappings_len(), 2);
    assert!(t.ports.is_used(Proto::Udp, 5000));
    // New flow of the endpoint still gets 5000.
    let d = t
        .create(&ik(Proto::Udp, 2, 5000, 11, 53), EXT, T.udp_ms)
        .unwrap();
    assert_eq!(t.get(d).ext_port, 5000);
    t.remove(b);
    assert!(t.ports.is_used(Proto::Udp, 5000));
    t.remove(d);
    assert!(!t.ports.is_used(Proto::Udp, 5000));
    assert_eq!(t.mappings_len(), 1);
    // Now a different endpoint can be preserved onto 5000.
    let e = t
        .create(&ik(Proto::Udp, 4, 5000, 9, 53), EXT, T.udp_ms)
        .unwrap();
    assert_eq!(t.get(e).ext_port, 5000);
    check_consistent(&t);
}

#[test]
fn ext_addr_change_keeps_port() {
    let mut t = table();
    let a = t.create(&ik(Proto::Udp, 2, 5000, 9, 53), EXT, 0).unwrap();
    let new = Ipv4Addr::new(198, 51, 100, 2);
    let b = t.create(&ik(Proto::Udp, 2, 5000, 10, 53), new, 0).unwrap();
    assert_eq!(t.get(a).ext_addr, EXT);
    assert_eq!(t.get(b).ext_addr, new);
    assert_eq!(t.get(b).ext_port, t.get(a).ext_port);
    let ok = t.get(b).out_key();
    assert_eq!(t.lookup_out2in(&ok, 0), Some(b));
    check_consistent(&t);
}
