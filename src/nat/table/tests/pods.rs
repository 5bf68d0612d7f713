//! Fairness between pods: the per-pod flow and port limits, whose flows
//! go first, and the accounting behind them (checked by
//! `check_consistent` after every step).

use super::*;

fn limited(max: usize, flows: u32, ports: u32, delay: u64) -> FlowTable {
    FlowTable::new(TableConfig {
        max_flows_per_pod: flows,
        ports_per_pod: ports,
        port_reuse_delay_ms: delay,
        ..cfg(0, 1, 1024, 65535, max)
    })
}

fn udp(pod: u8, sport: u16) -> InKey {
    ik(Proto::Udp, pod, sport, 9, 53)
}

fn reply(t: &mut FlowTable, id: FlowId, now: u64) {
    acc(t, id, Direction::Out2In, NONE, 60, now);
}

#[test]
fn a_pod_at_its_flow_limit_loses_its_own_oldest_unreplied_flow() {
    let mut t = limited(100, 3, 0, 0);
    let a: Vec<FlowId> = (0..3)
        .map(|i| t.create(&udp(2, 5000 + i), EXT, u64::from(i)).unwrap())
        .collect();
    reply(&mut t, a[0], 3);
    // Another pod's flows are not charged to this one.
    let b = t.create(&udp(3, 5000), EXT, 3).unwrap();
    // At its limit: the oldest unreplied flow (5001; 5000 is replied) goes.
    t.create(&udp(2, 6000), EXT, 4).unwrap();
    assert_eq!(t.stats().early_dropped, 1);
    assert_eq!(t.lookup_in2out(&udp(2, 5001), 4), None);
    assert!(t.lookup_in2out(&udp(2, 5000), 4).is_some());
    assert!(t.lookup_in2out(&udp(2, 5002), 4).is_some());
    check_consistent(&t);
    // Every flow of the pod replied: refused, nothing evicted.
    for k in [udp(2, 5002), udp(2, 6000)] {
        let id = t.lookup_in2out(&k, 5).unwrap();
        reply(&mut t, id, 5);
    }
    assert_eq!(
        t.create(&udp(2, 7000), EXT, 6),
        Err(CreateError::PodFlowLimit)
    );
    assert_eq!(t.stats().early_dropped, 1);
    assert_eq!(t.len(), 4);
    // The other pod is unaffected, and the refused pod's flows still work.
    t.create(&udp(3, 5001), EXT, 6).unwrap();
    assert!(t.lookup_in2out(&udp(2, 5000), 6).is_some());
    assert_eq!(t.get(b).inside.src, Ipv4Addr::new(10, 0, 0, 3));
    // A flow of an existing mapping counts as a flow too.
    assert_eq!(
        t.create(&ik(Proto::Udp, 2, 5000, 10, 53), EXT, 7),
        Err(CreateError::PodFlowLimit)
    );
    check_consistent(&t);
    // A removed flow frees its place.
    t.remove(a[0]);
    t.create(&udp(2, 7000), EXT, 8).unwrap();
    check_consistent(&t);
}

#[test]
fn a_flood_of_one_packet_flows_never_exceeds_the_pods_share() {
    // The bind/send/close loop: a new socket (mapping) per datagram.
    let mut t = limited(1000, 50, 20, 120_000);
    let mut refused = 0;
    for i in 0..500u16 {
        match t.create(&udp(2, 10_000 + i), EXT, u64::from(i)) {
            Ok(_) => {}
            Err(CreateError::PodPortLimit) => refused += 1,
            Err(e) => panic!("{e:?}"),
        }
        let (flows, ports) = t.pods.usage(Ipv4Addr::new(10, 0, 0, 2));
        assert!(flows <= 20 && ports[Proto::Udp.index()] <= 20);
    }
    // Its own unreplied flows made way, each port reused without
    // quarantine (nobody answered on it): nothing refused, nothing parked.
    assert_eq!(refused, 0);
    assert_eq!(t.cooling_len(), 0);
    assert_eq!(t.len(), 20);
    assert_eq!(t.stats().early_dropped, 480);
    // Closed sockets' ports wait in quarantine, charged to the pod: at
    // most its share of them, however fast it churns.
    for i in 0..500u16 {
        let id = t.create(&udp(2, 30_000 + i), EXT, 700).unwrap();
        reply(&mut t, id, 700);
        t.remove(id);
        let (_, ports) = t.pods.usage(Ipv4Addr::new(10, 0, 0, 2));
        assert!(ports[Proto::Udp.index()] <= 20);
    }
    assert!(t.cooling_len() <= 20, "{} ports parked", t.cooling_len());
    check_consistent(&t);
    // Another pod gets its own full share meanwhile (pod 2 holds 19 flows
    // and one port in quarantine).
    for i in 0..20u16 {
        t.create(&udp(3, 10_000 + i), EXT, 800).unwrap();
    }
    assert_eq!(t.len(), 39);
    check_consistent(&t);
}

#[test]
fn quarantined_ports_stay_charged_to_the_pod_that_released_them() {
    const D: u64 = 120_000;
    let mut t = limited(100, 0, 2, D);
    let a = t.create(&udp(2, 5000), EXT, 0).unwrap();
    let b = t.create(&udp(2, 5001), EXT, 0).unwrap();
    reply(&mut t, a, 1);
    reply(&mut t, b, 1);
    // Both replied: a third port is refused.
    assert_eq!(
        t.create(&udp(2, 5002), EXT, 2),
        Err(CreateError::PodPortLimit)
    );
    // A new flow on an existing mapping needs no port.
    t.create(&ik(Proto::Udp, 2, 5000, 10, 53), EXT, 2).unwrap();
    // Port limits are per protocol: TCP has its own share.
    t.create(&ik(Proto::Tcp, 2, 5000, 9, 80), EXT, 2).unwrap();
    // Closing a mapping sends its port into quarantine, still charged:
    // the pod cannot take a fresh port, but may take its own back.
    let b_port = t.get(b).ext_port;
    t.remove(b);
    assert_eq!(t.cooling_len(), 1);
    check_consistent(&t);
    let c = t.create(&udp(2, 5002), EXT, 3).unwrap();
    assert_eq!(t.get(c).ext_port, b_port);
    assert_eq!(t.cooling_len(), 0);
    check_consistent(&t);
    // Its own quarantined ports only: another pod's are not reclaimed.
    let mut u = limited(100, 0, 1, D);
    let x = u.create(&udp(3, 6000), EXT, 0).unwrap();
    u.remove(x);
    let y = u.create(&udp(2, 6000), EXT, 1).unwrap();
    assert_ne!(u.get(y).ext_port, 6000, "another pod's port in quarantine");
    reply(&mut u, y, 1);
    assert_eq!(
        u.create(&udp(2, 6001), EXT, 2),
        Err(CreateError::PodPortLimit)
    );
    // Once its quarantine ends the port is free for anyone.
    u.remove(y);
    u.create(&udp(3, 6000), EXT, D + 10).unwrap();
    check_consistent(&u);
    // A pod whose ports all cool down keeps getting its own back, at any
    // rate: a client opening and closing connections is never starved.
    t.remove(c);
    for i in 0..1000u16 {
        let id = t.create(&udp(2, 20_000 + i), EXT, D + 20).unwrap();
        reply(&mut t, id, D + 20);
        t.remove(id);
    }
    assert!(t.cooling_len() <= 2);
    check_consistent(&t);
    // A replied flow of a single-flow mapping is never evicted for a port.
    let (flows, _) = t.pods.usage(Ipv4Addr::new(10, 0, 0, 2));
    assert_eq!(flows, 3);
    assert_eq!(t.stats().early_dropped, 0);
}

#[test]
fn only_the_creating_pods_flows_go_for_a_port_when_the_range_runs_out() {
    // Worker 0 of 1, ports 2000..=2003, no per-pod limits.
    let mut t = FlowTable::new(cfg(0, 1, 2000, 2003, 100));
    for i in 0..3u16 {
        t.create(&udp(2, 2000 + i), EXT, 0).unwrap();
    }
    let b = t.create(&udp(3, 5000), EXT, 0).unwrap();
    reply(&mut t, b, 1);
    // Pod 3 has no unreplied flow of its own: another pod's are not taken.
    assert_eq!(
        t.create(&udp(3, 5001), EXT, 2),
        Err(CreateError::PortsExhausted)
    );
    assert_eq!(t.len(), 4);
    // Pod 2 gives up its own oldest unreplied mapping.
    t.create(&udp(2, 7000), EXT, 3).unwrap();
    assert_eq!(t.lookup_in2out(&udp(2, 2000), 3), None);
    assert_eq!(t.stats().early_dropped, 1);
    check_consistent(&t);
}

#[test]
fn a_full_table_takes_from_the_pod_over_its_share() {
    let mut t = limited(8, 0, 0, 0);
    // Pod 2 fills 6 of 8 slots, unreplied; pod 3 holds 2, one unreplied.
    for i in 0..6u16 {
        t.create(&udp(2, 5000 + i), EXT, u64::from(i)).unwrap();
    }
    let b = t.create(&udp(3, 5000), EXT, 10).unwrap();
    reply(&mut t, b, 10);
    t.create(&udp(3, 5001), EXT, 11).unwrap();
    // Pod 3 (2 of 8, below its share of 4) makes room by early drop: the
    // least recently seen unreplied flow, pod 2's oldest.
    t.create(&udp(3, 5002), EXT, 12).unwrap();
    assert_eq!(t.lookup_in2out(&udp(2, 5000), 12), None);
    assert!(t.lookup_in2out(&udp(3, 5001), 12).is_some());
    // Pod 2 (5 of 8, over its share) gives up its own oldest first, even
    // though pod 3's unreplied flow is older than its newest.
    t.create(&udp(2, 6000), EXT, 13).unwrap();
    assert_eq!(t.lookup_in2out(&udp(2, 5001), 13), None);
    assert!(t.lookup_in2out(&udp(3, 5001), 13).is_some());
    assert!(t.lookup_in2out(&udp(3, 5002), 13).is_some());
    assert_eq!(t.stats().early_dropped, 2);
    assert!(t.lookup_in2out(&udp(3, 5000), 13).is_some(), "replied");
    check_consistent(&t);
}

#[test]
fn sessions_opened_from_outside_count_for_the_target_pod() {
    let target = Ipv4Addr::new(10, 0, 0, 5);
    let mut t = limited(100, 2, 0, 0);
    t.add_forward(Proto::Tcp, EXT, 8080, target, 80).unwrap();
    let syn = |rport| OutKey {
        proto: Proto::Tcp,
        remote: Ipv4Addr::new(203, 0, 113, 9),
        rport,
        ext: EXT,
        eport: 8080,
    };
    let a = t.inbound(&syn(40000), SYN, 0).unwrap();
    acc(&mut t, a, Direction::Out2In, SYN, 60, 0);
    acc(&mut t, a, Direction::In2Out, SYNACK, 60, 0);
    acc(&mut t, a, Direction::Out2In, ACK, 60, 0);
    // A SYN flood at the forward: each new half-open session evicts the
    // previous one, never the established connection.
    for i in 1..50u16 {
        t.inbound(&syn(40000 + i), SYN, u64::from(i)).unwrap();
    }
    assert_eq!(t.len(), 2);
    assert_eq!(t.stats().early_dropped, 48);
    assert!(t.lookup_out2in(&syn(40000), 60).is_some());
    // All of the pod's sessions established: refused as the pod's limit
    // (a handshake answered but never completed would go, as a SYN flood's).
    let last = t.lookup_out2in(&syn(40049), 60).unwrap();
    acc(&mut t, last, Direction::In2Out, SYNACK, 60, 60);
    acc(&mut t, last, Direction::Out2In, ACK, 60, 60);
    assert_eq!(
        t.inbound(&syn(41000), SYN, 61),
        Err(InboundError::PodFlowLimit)
    );
    // Forwards charge no port to the pod, and the refusal left it intact.
    assert_eq!(t.pods.usage(target), (2, [0; 3]));
    assert_eq!(t.forwards_len(), 1);
    check_consistent(&t);
}

#[test]
fn pod_limits_change_at_run_time() {
    let mut t = limited(100, 0, 0, 0);
    for i in 0..5u16 {
        let id = t.create(&udp(2, 5000 + i), EXT, 0).unwrap();
        reply(&mut t, id, 0);
    }
    t.set_pod_limits(3, 0);
    assert_eq!(t.config().max_flows_per_pod, 3);
    // Above the lowered limit it keeps its flows but gets no new one.
    assert_eq!(t.len(), 5);
    assert_eq!(
        t.create(&udp(2, 6000), EXT, 1),
        Err(CreateError::PodFlowLimit)
    );
    t.set_pod_limits(0, 5);
    assert_eq!(
        t.create(&udp(2, 6000), EXT, 1),
        Err(CreateError::PodPortLimit)
    );
    t.set_pod_limits(0, 0);
    t.create(&udp(2, 6000), EXT, 1).unwrap();
    check_consistent(&t);
}

#[test]
fn clear_and_expiry_give_every_charge_back() {
    const D: u64 = 1000;
    let mut t = limited(100, 10, 10, D);
    for i in 0..5u16 {
        t.create(&udp(2, 5000 + i), EXT, 0).unwrap();
        t.create(&ik(Proto::Icmp, 3, 100 + i, 9, 0), EXT, 0)
            .unwrap();
    }
    t.clear();
    check_consistent(&t);
    // UDP ports stay charged while quarantined; ICMP ids are free at once.
    assert_eq!(t.pods.usage(Ipv4Addr::new(10, 0, 0, 2)), (0, [0, 0, 5]));
    assert_eq!(t.pods.usage(Ipv4Addr::new(10, 0, 0, 3)), (0, [0; 3]));
    t.expire(D, 100);
    assert_eq!(t.pods.usage(Ipv4Addr::new(10, 0, 0, 2)), (0, [0; 3]));
    assert_eq!(t.pods.flows_by_pod().count(), 0, "idle pods are forgotten");
    for i in 0..5u16 {
        t.create(&udp(2, 6000 + i), EXT, D).unwrap();
    }
    t.expire(D + T.udp_ms, 100);
    assert!(t.is_empty());
    t.expire(D + T.udp_ms + D, 100);
    assert_eq!(t.pods.flows_by_pod().count(), 0);
    check_consistent(&t);
}

#[test]
fn the_victim_queue_stays_bounded_under_churn() {
    // One key created and removed over and over, plus replied flows: the
    // queue is compacted to the live unreplied flows, once each.
    let mut t = limited(100, 0, 0, 0);
    for i in 0..10u16 {
        let id = t.create(&udp(2, 5000 + i), EXT, 0).unwrap();
        reply(&mut t, id, 0);
    }
    for n in 0..10_000u64 {
        let id = t.create(&udp(2, 9000), EXT, n).unwrap();
        if n % 2 == 0 {
            t.remove(id);
        }
        let len = t.pods.queue_len(Ipv4Addr::new(10, 0, 0, 2));
        // Compacted above 2 x flows + 16 as a flow is added; one may have
        // gone since.
        assert!(
            len <= 2 * (t.len() + 1) + 17,
            "queue of {len} for {} flows",
            t.len()
        );
    }
    check_consistent(&t);
}

#[test]
fn a_pod_churning_short_connections_gives_up_its_closed_ones_first() {
    // Connections closed by RST (or FIN both ways) keep their flow and
    // mapping for the transitory timeout (RFC 7857); a pod opening them
    // faster than its limits allow over that time pushes out its own
    // closed ones, never an open one.
    for (flows, ports) in [(100, 0), (0, 50), (100, 50)] {
        let mut t = FlowTable::new(TableConfig {
            max_flows_per_pod: flows,
            ports_per_pod: ports,
            port_reuse_delay_ms: 120_000,
            ..cfg(0, 1, 1024, 65535, 10_000)
        });
        // Ten long-lived connections first, at the front of its queue.
        let open: Vec<FlowId> = (0..10u16)
            .map(|i| {
                let id = t
                    .create(&ik(Proto::Tcp, 2, 2000 + i, 9, 443), EXT, 0)
                    .unwrap();
                acc(&mut t, id, Direction::In2Out, SYN, 60, 0);
                acc(&mut t, id, Direction::Out2In, SYNACK, 60, 0);
                acc(&mut t, id, Direction::In2Out, ACK, 60, 0);
                id
            })
            .collect();
        for i in 0..2000u16 {
            let now = u64::from(i);
            let k = ik(Proto::Tcp, 2, 30_000 + i, 9, 80);
            let id = t
                .create(&k, EXT, now)
                .unwrap_or_else(|e| panic!("{i}: {e:?}"));
            acc(&mut t, id, Direction::In2Out, SYN, 60, now);
            acc(&mut t, id, Direction::Out2In, SYNACK, 60, now);
            acc(&mut t, id, Direction::In2Out, ACK, 60, now);
            if i % 2 == 0 {
                acc(&mut t, id, Direction::In2Out, RST, 60, now);
            } else {
                acc(&mut t, id, Direction::In2Out, FINACK, 60, now);
                acc(&mut t, id, Direction::Out2In, FINACK, 60, now);
            }
        }
        for &id in &open {
            assert_eq!(tcp_state(&t, id), TcpState::Established, "{flows}/{ports}");
        }
        let (held, p) = t.pods.usage(Ipv4Addr::new(10, 0, 0, 2));
        assert!(flows == 0 || held <= flows);
        assert!(ports == 0 || p[Proto::Tcp.index()] <= ports);
        check_consistent(&t);
        // Only open connections left: refused, none of them evicted.
        let limit = [flows, ports].into_iter().filter(|&l| l > 0).min().unwrap();
        t.remove_where(|f| f.inside.sport >= 30_000);
        for i in 0..limit as u16 - 10 {
            let id = t
                .create(&ik(Proto::Tcp, 2, 40_000 + i, 9, 80), EXT, 5000)
                .unwrap_or_else(|e| {
                    panic!(
                        "{flows}/{ports} {i}: {e:?} {:?} cooling {}",
                        t.pods.usage(Ipv4Addr::new(10, 0, 0, 2)),
                        t.cooling_len()
                    )
                });
            acc(&mut t, id, Direction::In2Out, SYN, 60, 5000);
            acc(&mut t, id, Direction::Out2In, SYNACK, 60, 5000);
            acc(&mut t, id, Direction::In2Out, ACK, 60, 5000);
        }
        t.expire(5000 + 120_000, usize::MAX);
        let refused = t.create(&ik(Proto::Tcp, 2, 50_000, 9, 80), EXT, 5000 + 120_000);
        assert!(
            matches!(
                refused,
                Err(CreateError::PodFlowLimit | CreateError::PodPortLimit)
            ),
            "{refused:?}"
        );
        check_consistent(&t);
    }
}
