//! Random operations against the consistency check of every part.

use super::*;

/// The slow paths the random operations reached: the table's own
/// counters, and the results a caller would count.
#[derive(Debug, Default)]
struct Reached {
    created: u64,
    inbound_created: u64,
    expired: u64,
    early_dropped: u64,
    table_full: u64,
    ports_exhausted: u64,
    inbound_filtered: u64,
    pod_flow_limit: u64,
    pod_port_limit: u64,
}

#[test]
fn property_random_ops_keep_indexes_consistent() {
    let mut total = Reached::default();
    for (worker, workers, filtering, delay, pod_limits) in [
        (0, 1, Filtering::AddressAndPort, 0, (0, 0)),
        (1, 3, Filtering::Address, 3_000, (10, 4)),
        (0, 2, Filtering::EndpointIndependent, 500, (12, 0)),
        (0, 1, Filtering::Address, 2_000, (0, 5)),
    ] {
        let mut t = FlowTable::new(TableConfig {
            seed: 7,
            filtering,
            port_reuse_delay_ms: delay,
            max_flows_per_pod: pod_limits.0,
            ports_per_pod: pod_limits.1,
            ..cfg(worker, workers, 1000, 1120, 150)
        });
        // A forward inside the dynamic range and one outside it.
        let fwd = (1000..1003).find(|p| p % workers == worker).unwrap();
        t.add_forward(Proto::Tcp, EXT, fwd, Ipv4Addr::new(10, 0, 0, 5), 80)
            .unwrap();
        t.add_forward(
            Proto::Udp,
            EXT,
            3000 + worker,
            Ipv4Addr::new(10, 0, 0, 5),
            53,
        )
        .unwrap();
        let mut rng = XorShift::new(99);
        let mut now = 0u64;
        for step in 0..5000 {
            // Mostly small steps (the table fills up), sometimes a jump
            // past some timeouts.
            now += u64::from(if rng.below(500) == 0 {
                rng.below(400_000)
            } else {
                rng.below(50)
            });
            let proto = [Proto::Tcp, Proto::Udp, Proto::Icmp][rng.below(3) as usize];
            let k = ik(
                proto,
                rng.below(30) as u8,
                990 + rng.below(40) as u16,
                rng.below(4) as u8,
                80,
            );
            match rng.below(10) {
                0..=4 => match (Before::of(&t), t.create(&k, EXT, now)) {
                    (before, Ok(id)) => {
                        total.created += before.created(&t);
                        assert_eq!(t.get(id).inside, k);
                        let flags = TcpFlags {
                            syn: true,
                            ..TcpFlags::default()
                        };
                        acc(&mut t, id, Direction::In2Out, flags, 60, now);
                        // Most flows get an answer (so the table can be
                        // full of replied flows), some never do.
                        if rng.below(8) != 0 {
                            acc(&mut t, id, Direction::Out2In, SYNACK, 60, now);
                        }
                    }
                    (before, Err(e)) => {
                        assert_eq!(before.created(&t), 0);
                        match e {
                            CreateError::PortsExhausted => total.ports_exhausted += 1,
                            CreateError::PodFlowLimit => total.pod_flow_limit += 1,
                            CreateError::PodPortLimit => total.pod_port_limit += 1,
                            CreateError::TableFull => {
                                assert_eq!(t.len(), 150);
                                total.table_full += 1;
                            }
                        }
                    }
                },
                5 => {
                    if let Some(id) = t.lookup_in2out(&k, now) {
                        acc(&mut t, id, Direction::Out2In, SYNACK, 60, now);
                    }
                }
                6 => {
                    if let Some(id) = t.lookup_in2out(&k, now) {
                        t.remove(id);
                    }
                }
                7 => {
                    t.expire(now, rng.below(50) as usize);
                }
                8 => {
                    // Inbound to a random port of the slice (or a
                    // forward) from a random remote.
                    let eport = match rng.below(4) {
                        0 => fwd,
                        1 => 3000 + worker,
                        _ => 1000 + rng.below(121) as u16,
                    };
                    let proto = if rng.below(2) == 0 {
                        Proto::Tcp
                    } else {
                        Proto::Udp
                    };
                    let key = OutKey {
                        proto,
                        remote: Ipv4Addr::new(203, 0, 113, rng.below(4) as u8),
                        rport: 80 + rng.below(3) as u16,
                        ext: EXT,
                        eport,
                    };
                    let flags = if rng.below(2) == 0 { SYN } else { ACK };
                    let before = Before::of(&t);
                    match t.inbound(&key, flags, now) {
                        Ok(id) => {
                            let created = before.created(&t);
                            total.created += created;
                            total.inbound_created += created;
                            assert_eq!(t.get(id).out_key(), key);
                            acc(&mut t, id, Direction::Out2In, flags, 60, now);
                        }
                        Err(InboundError::Filtered | InboundError::NotSyn) => {
                            total.inbound_filtered += 1;
                        }
                        Err(InboundError::PodFlowLimit) => total.pod_flow_limit += 1,
                        Err(InboundError::NoMapping | InboundError::TableFull) => {}
                    }
                }
                _ => {
                    // Remove a random live flow by slot.
                    let n = t.slab.slots();
                    if n > 0 {
                        let i = rng.below(n as u32) as usize;
                        if t.slab.is_live(i) {
                            t.remove(FlowId(i as u32));
                        }
                    }
                }
            }
            if step % 97 == 0 {
                check_consistent(&t);
            }
            // Lookups never return expired flows.
            if let Some(id) = t.lookup_in2out(&k, now) {
                assert!(now < t.get(id).expires_at_ms(&T));
                let ok = t.get(id).out_key();
                assert_eq!(t.lookup_out2in(&ok, now), Some(id));
            }
        }
        check_consistent(&t);
        let st = t.stats();
        total.expired += st.expired;
        total.early_dropped += st.early_dropped;
    }
    // The loops reach every slow path.
    let t = total;
    assert!(
        t.created > 0 && t.expired > 0 && t.early_dropped > 0,
        "{t:?}"
    );
    assert!(t.table_full > 0 && t.ports_exhausted > 0, "{t:?}");
    assert!(t.inbound_created > 0 && t.inbound_filtered > 0, "{t:?}");
    assert!(t.pod_flow_limit > 0 && t.pod_port_limit > 0, "{t:?}");
}
