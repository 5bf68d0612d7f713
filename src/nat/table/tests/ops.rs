//! Operator actions: a flush by predicate (`tapnat flush`) and forwards
//! removed and added while the table runs (`tapnat forward del|add`).
use super::*;

const TARGET: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);
const REMOTE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);

fn out(proto: Proto, eport: u16) -> OutKey {
    OutKey {
        proto,
        remote: REMOTE,
        rport: 40000,
        ext: EXT,
        eport,
    }
}

fn quarantining() -> FlowTable {
    let mut c = cfg(0, 1, 2000, 2009, 100);
    c.port_reuse_delay_ms = 1000;
    FlowTable::new(c)
}

#[test]
fn remove_where_takes_both_directions_and_quarantines_ports() {
    let mut t = quarantining();
    let udp = t.create(&ik(Proto::Udp, 2, 2000, 9, 53), EXT, 0).unwrap();
    let tcp = t.create(&ik(Proto::Tcp, 2, 2002, 9, 80), EXT, 0).unwrap();
    let udp_out = t.get(udp).out_key();
    let udp_in = t.get(udp).inside;
    t.add_forward(Proto::Udp, EXT, 2004, TARGET, 53).unwrap();
    assert_eq!(t.remove_where(|f| f.inside.proto == Proto::Udp), 1);
    assert_eq!(t.len(), 1);
    assert_eq!(t.lookup_in2out(&udp_in, 1), None);
    assert_eq!(t.lookup_out2in(&udp_out, 1), None);
    assert!(t.lookup_in2out(&t.get(tcp).inside.clone(), 1).is_some());
    // The released port waits in quarantine, as on expiry.
    assert_eq!(t.cooling_len(), 1);
    // Everything else; the forward stays.
    assert_eq!(t.remove_where(|_| true), 1);
    assert!(t.is_empty());
    assert_eq!(t.forwards_len(), 1);
    assert_eq!(t.cooling_len(), 2);
    assert_eq!(t.remove_where(|_| true), 0);
    check_consistent(&t);
}

#[test]
fn removed_forward_takes_its_flows_and_port_with_it() {
    let mut t = quarantining();
    t.add_forward(Proto::Tcp, EXT, 8080, TARGET, 80).unwrap();
    let id = t.inbound(&out(Proto::Tcp, 8080), SYN, 0).unwrap();
    let other = t.create(&ik(Proto::Tcp, 2, 2000, 9, 80), EXT, 0).unwrap();
    let other_key = t.get(other).inside;
    assert_eq!(t.get(id).ext_port, 8080);
    assert_eq!(t.remove_forward(Proto::Udp, 8080), None);
    assert_eq!(
        t.remove_forward(Proto::Tcp, 2000),
        None,
        "a dynamic mapping"
    );
    assert_eq!(t.remove_forward(Proto::Tcp, 8080), Some(1));
    assert_eq!(t.forwards_len(), 0);
    assert_eq!(t.forward_for_inside(Proto::Tcp, TARGET, 80), None);
    assert_eq!(
        t.inbound(&out(Proto::Tcp, 8080), SYN, 1),
        Err(InboundError::NoMapping)
    );
    assert_eq!(t.lookup_in2out(&other_key, 1), Some(other));
    assert_eq!(t.remove_forward(Proto::Tcp, 8080), None);
    // In quarantine; the forward may be added again at once, and the end of
    // the quarantine leaves it its port.
    assert_eq!(t.cooling_len(), 1);
    assert_eq!(t.can_add_forward(Proto::Tcp, 8080, TARGET, 80), Ok(()));
    t.add_forward(Proto::Tcp, EXT, 8080, TARGET, 80).unwrap();
    assert_eq!(
        t.add_forward(Proto::Tcp, EXT, 8080, TARGET, 81),
        Err(ForwardError::PortInUse)
    );
    // A port a dynamic mapping left in quarantine is not taken.
    let d = t.create(&ik(Proto::Tcp, 3, 2002, 9, 80), EXT, 1).unwrap();
    let dport = t.get(d).ext_port;
    t.remove(d);
    assert_eq!(
        t.can_add_forward(Proto::Tcp, dport, TARGET, 82),
        Err(ForwardError::PortInUse)
    );
    t.expire(5000, 100);
    assert_eq!(t.cooling_len(), 0);
    assert_eq!(
        t.can_add_forward(Proto::Tcp, 8080, TARGET, 81),
        Err(ForwardError::PortInUse)
    );
    assert!(t.inbound(&out(Proto::Tcp, 8080), SYN, 5000).is_ok());
    check_consistent(&t);
}

#[test]
fn can_add_forward_agrees_with_add_forward() {
    let mut t = FlowTable::new(cfg(1, 2, 2000, 2009, 100));
    let id = t.create(&ik(Proto::Tcp, 2, 2001, 9, 80), EXT, 0).unwrap();
    assert_eq!(t.get(id).ext_port, 2001);
    let cases = [
        (Proto::Tcp, 8080, TARGET, 80, Err(ForwardError::NotOwned)),
        (Proto::Icmp, 8081, TARGET, 80, Err(ForwardError::Icmp)),
        (Proto::Tcp, 2001, TARGET, 80, Err(ForwardError::PortInUse)),
        (
            Proto::Tcp,
            2003,
            Ipv4Addr::new(10, 0, 0, 2),
            2001,
            Err(ForwardError::InsideInUse),
        ),
        (Proto::Tcp, 2003, TARGET, 80, Ok(())),
    ];
    for (proto, port, addr, to, want) in cases {
        assert_eq!(t.can_add_forward(proto, port, addr, to), want, "{port}");
        assert_eq!(t.add_forward(proto, EXT, port, addr, to), want, "{port}");
    }
    check_consistent(&t);
}

#[test]
fn change_forwards_is_all_or_nothing_per_table() {
    // Worker 0 of 2 owns even ports.
    let mut t = FlowTable::new(cfg(0, 2, 2000, 2009, 100));
    t.add_forward(Proto::Tcp, EXT, 8080, TARGET, 80).unwrap();
    let id = t.create(&ik(Proto::Tcp, 2, 2000, 9, 80), EXT, 0).unwrap();
    assert_eq!(t.get(id).ext_port, 2000);
    // Retarget 8080 and add 8082 (and 8081, another worker's: skipped).
    let add = [
        (Proto::Tcp, 8080, TARGET, 81),
        (Proto::Tcp, 8081, TARGET, 80),
        (Proto::Tcp, 8082, TARGET, 80),
    ];
    // 8082's target is 8080's old one: free once 8080 is removed.
    assert_eq!(
        t.change_forwards(&[(Proto::Tcp, 8080)], &add, EXT, true),
        Ok(0)
    );
    assert_eq!(
        t.forward_for_inside(Proto::Tcp, TARGET, 80),
        Some((EXT, 8080))
    );
    // Without the remove, 8080 is in use: nothing changes.
    assert_eq!(
        t.change_forwards(&[], &add, EXT, false),
        Err((8080, ForwardError::PortInUse))
    );
    // A port held by a dynamic mapping refuses the whole change.
    let bad = [
        (Proto::Tcp, 8084, TARGET, 90),
        (Proto::Tcp, 2000, TARGET, 91),
    ];
    assert_eq!(
        t.change_forwards(&[(Proto::Tcp, 8080)], &bad, EXT, false),
        Err((2000, ForwardError::PortInUse))
    );
    assert_eq!(t.forwards_len(), 1);
    assert_eq!(t.forward_for_inside(Proto::Tcp, TARGET, 90), None);
    t.inbound(&out(Proto::Tcp, 8080), SYN, 1).unwrap();
    assert_eq!(
        t.change_forwards(&[(Proto::Tcp, 8080)], &add, EXT, false),
        Ok(1)
    );
    assert_eq!(
        t.forward_for_inside(Proto::Tcp, TARGET, 81),
        Some((EXT, 8080))
    );
    assert_eq!(
        t.forward_for_inside(Proto::Tcp, TARGET, 80),
        Some((EXT, 8082))
    );
    assert_eq!(t.forwards_len(), 2);
    check_consistent(&t);
}

#[test]
fn new_limits_apply_to_live_flows() {
    let mut t = FlowTable::new(cfg(0, 1, 2000, 2009, 100));
    let id = t.create(&ik(Proto::Udp, 2, 2000, 9, 53), EXT, 0).unwrap();
    let port = t.get(id).ext_port;
    let other = OutKey {
        proto: Proto::Udp,
        remote: Ipv4Addr::new(203, 0, 113, 9),
        rport: 9999,
        ext: EXT,
        eport: port,
    };
    // Address and port dependent: another port of the same remote is not
    // let in; address dependent after the change, counted from live flows.
    assert_eq!(t.inbound(&other, NONE, 1), Err(InboundError::Filtered));
    t.set_limits(100, T, Filtering::Address);
    assert!(t.inbound(&other, NONE, 1).is_ok());
    assert_eq!(t.len(), 2);
    check_consistent(&t);
    // A shorter UDP timeout expires both; a lower bound holds new flows.
    let short = Timeouts { udp_ms: 10, ..T };
    t.set_limits(1, short, Filtering::Address);
    assert_eq!(t.config().max_flows, 1);
    assert_eq!(t.expire(100, 100), 2);
    assert!(t.is_empty());
    check_consistent(&t);
}
