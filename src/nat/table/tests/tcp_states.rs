//! The TCP state machine driven through [`FlowTable::account`].

use super::*;

#[test]
fn tcp_normal_open_and_close() {
    let mut t = table();
    let k = ik(Proto::Tcp, 2, 5000, 9, 443);
    let id = t.create(&k, EXT, 0).unwrap();
    assert_eq!(tcp_state(&t, id), TcpState::SynSent);
    acc(&mut t, id, Direction::In2Out, SYN, 60, 0);
    assert_eq!(tcp_state(&t, id), TcpState::SynSent);
    acc(&mut t, id, Direction::In2Out, SYN, 60, 0); // retransmit
    assert_eq!(tcp_state(&t, id), TcpState::SynSent);
    acc(&mut t, id, Direction::In2Out, ACK, 60, 0); // odd, no effect
    assert_eq!(tcp_state(&t, id), TcpState::SynSent);
    acc(&mut t, id, Direction::Out2In, SYNACK, 60, 0);
    assert_eq!(tcp_state(&t, id), TcpState::SynReceived);
    acc(&mut t, id, Direction::Out2In, SYNACK, 60, 0); // retransmit
    assert_eq!(tcp_state(&t, id), TcpState::SynReceived);
    acc(&mut t, id, Direction::In2Out, ACK, 52, 0);
    assert_eq!(tcp_state(&t, id), TcpState::Established);
    acc(&mut t, id, Direction::Out2In, ACK, 1500, 0);
    assert_eq!(tcp_state(&t, id), TcpState::Established);
    acc(&mut t, id, Direction::In2Out, FINACK, 52, 0);
    assert_eq!(tcp_state(&t, id), TcpState::FinWait);
    acc(&mut t, id, Direction::In2Out, FINACK, 52, 0); // retransmitted FIN
    assert_eq!(tcp_state(&t, id), TcpState::FinWait);
    acc(&mut t, id, Direction::Out2In, ACK, 52, 10);
    assert_eq!(tcp_state(&t, id), TcpState::FinWait);
    assert_eq!(t.get(id).expires_at_ms(&T), 10 + T.tcp_transitory_ms);
    acc(&mut t, id, Direction::Out2In, FINACK, 52, 20);
    assert_eq!(tcp_state(&t, id), TcpState::Closing);
    acc(&mut t, id, Direction::In2Out, ACK, 52, 30);
    assert_eq!(tcp_state(&t, id), TcpState::Closing);
    // FIN/FIN: transitory timeout.
    assert_eq!(t.lookup_in2out(&k, 30 + T.tcp_transitory_ms - 1), Some(id));
    assert_eq!(t.lookup_in2out(&k, 30 + T.tcp_transitory_ms), None);
}

#[test]
fn tcp_simultaneous_open() {
    let mut t = table();
    let id = t.create(&ik(Proto::Tcp, 2, 5000, 9, 443), EXT, 0).unwrap();
    acc(&mut t, id, Direction::In2Out, SYN, 60, 0);
    acc(&mut t, id, Direction::Out2In, SYN, 60, 0);
    assert_eq!(tcp_state(&t, id), TcpState::SynReceived);
    acc(&mut t, id, Direction::In2Out, SYNACK, 60, 0);
    assert_eq!(tcp_state(&t, id), TcpState::SynReceived);
    acc(&mut t, id, Direction::Out2In, SYNACK, 60, 0);
    assert_eq!(tcp_state(&t, id), TcpState::Established);

    // Variant: the ACK arrives before the second SYN+ACK.
    let id = t.create(&ik(Proto::Tcp, 2, 5001, 9, 443), EXT, 0).unwrap();
    acc(&mut t, id, Direction::In2Out, SYN, 60, 0);
    acc(&mut t, id, Direction::Out2In, SYN, 60, 0);
    acc(&mut t, id, Direction::Out2In, SYNACK, 60, 0);
    assert_eq!(tcp_state(&t, id), TcpState::SynReceived);
    acc(&mut t, id, Direction::In2Out, ACK, 60, 0);
    assert_eq!(tcp_state(&t, id), TcpState::Established);
}

#[test]
fn tcp_fin_from_outside_first_and_rst() {
    let mut t = table();
    let k = ik(Proto::Tcp, 2, 5000, 9, 443);
    let id = t.create(&k, EXT, 0).unwrap();
    handshake(&mut t, id, 0);
    acc(&mut t, id, Direction::Out2In, FINACK, 52, 0);
    assert_eq!(tcp_state(&t, id), TcpState::FinWait);
    acc(&mut t, id, Direction::Out2In, FINACK, 52, 0);
    assert_eq!(tcp_state(&t, id), TcpState::FinWait);
    acc(&mut t, id, Direction::In2Out, FINACK, 52, 0);
    assert_eq!(tcp_state(&t, id), TcpState::Closing);

    // RST from either side -> Closed with the transitory timeout.
    for dir in [Direction::In2Out, Direction::Out2In] {
        let k = ik(
            Proto::Tcp,
            3,
            if dir == Direction::In2Out { 6000 } else { 6001 },
            9,
            443,
        );
        let id = t.create(&k, EXT, 0).unwrap();
        handshake(&mut t, id, 0);
        assert_eq!(tcp_state(&t, id), TcpState::Established);
        acc(&mut t, id, dir, RST, 40, 100);
        assert_eq!(tcp_state(&t, id), TcpState::Closed);
        acc(&mut t, id, Direction::In2Out, ACK, 40, 100);
        assert_eq!(tcp_state(&t, id), TcpState::Closed);
        assert_eq!(t.get(id).expires_at_ms(&T), 100 + T.tcp_transitory_ms);
        // A new SYN from inside reopens the tuple.
        acc(&mut t, id, Direction::In2Out, SYN, 60, 100);
        assert_eq!(tcp_state(&t, id), TcpState::SynSent);
        acc(&mut t, id, Direction::Out2In, SYNACK, 60, 100);
        acc(&mut t, id, Direction::In2Out, ACK, 60, 100);
        assert_eq!(tcp_state(&t, id), TcpState::Established);
    }
}

#[test]
fn tcp_midstream_pickup() {
    let mut t = table();
    let id = t.create(&ik(Proto::Tcp, 2, 5000, 9, 443), EXT, 0).unwrap();
    acc(&mut t, id, Direction::In2Out, ACK, 60, 0);
    assert_eq!(tcp_state(&t, id), TcpState::SynSent);
    acc(&mut t, id, Direction::Out2In, ACK, 60, 0);
    assert_eq!(tcp_state(&t, id), TcpState::Established);
    // But not when a SYN was sent (a bare ACK back is not a handshake).
    let id = t.create(&ik(Proto::Tcp, 2, 5001, 9, 443), EXT, 0).unwrap();
    acc(&mut t, id, Direction::In2Out, SYN, 60, 0);
    acc(&mut t, id, Direction::Out2In, ACK, 60, 0);
    assert_eq!(tcp_state(&t, id), TcpState::SynSent);
}
