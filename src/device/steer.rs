//! A queue-steering program for a multi-queue TAP: the kernel puts each
//! frame it hands to userspace on queue `port % queues`, where `port` is a
//! transport port (or the ICMP echo identifier) of the frame. With the
//! gateway's ownership rule (`port % workers`), the first packet of a new
//! flow then lands on its owner's queue, not just the packets after it.
//!
//! The program is classic-style eBPF (`BPF_LD | BPF_ABS/IND`, allowed in
//! socket filters): Ethernet type IPv4, then the IP header length, then
//! the 16-bit field at `port_offset` into the TCP/UDP header (0: source
//! port, 2: destination port) or the echo identifier of ICMP. Anything
//! else, and any read past the end, steers to queue 0. It is only a hint:
//! a frame read on another queue is still handed to its owner.
use std::io;
use std::os::fd::{AsFd, OwnedFd};

use super::sys::{self, BpfInsn};
use super::Tap;

/// Which port of a frame picks its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SteerBy {
    /// The source port: frames the pods send (outbound).
    SourcePort,
    /// The destination port: frames from the uplink (inbound).
    DestinationPort,
}

const LD_ABS_H: u8 = 0x28;
const LD_ABS_B: u8 = 0x30;
const LD_IND_H: u8 = 0x48;
const MOV64_X: u8 = 0xbf;
const MOV64_K: u8 = 0xb7;
const AND64_K: u8 = 0x57;
const LSH64_K: u8 = 0x67;
const JEQ_K: u8 = 0x15;
const JNE_K: u8 = 0x55;
const JA: u8 = 0x05;
const EXIT: u8 = 0x95;

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> BpfInsn {
    BpfInsn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

const LDX_MEM_W: u8 = 0x61;
/// `offsetof(struct __sk_buff, protocol)` (linux/bpf.h).
const SKB_PROTOCOL: i16 = 16;

/// The program's instructions, for a TAP's queue steering: the frame
/// starts at its Ethernet header.
pub fn program(by: SteerBy) -> [BpfInsn; 19] {
    program_at(by, Start::Ethernet)
}

/// The same program for an AF_PACKET fanout group (`PACKET_FANOUT_EBPF`),
/// which runs it on a received frame whose Ethernet header was already
/// pulled: the data starts at the IP header and the ethertype is
/// `skb->protocol`. The returned index (modulo the group's size) picks the
/// socket.
pub fn fanout_program(by: SteerBy) -> [BpfInsn; 19] {
    program_at(by, Start::Network)
}

/// Where a program's packet data starts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Start {
    Ethernet,
    Network,
}

fn program_at(by: SteerBy, start: Start) -> [BpfInsn; 19] {
    let port_off = match by {
        SteerBy::SourcePort => 0,
        SteerBy::DestinationPort => 2,
    };
    let (l2, ethertype, ipv4) = match start {
        Start::Ethernet => (14, insn(LD_ABS_H, 0, 0, 0, 12), 0x0800),
        // skb->protocol is the ethertype in network byte order, in a u32.
        Start::Network => (
            0,
            insn(LDX_MEM_W, 0, 6, SKB_PROTOCOL, 0),
            i32::from(0x0800u16.to_be()),
        ),
    };
    [
        insn(MOV64_X, 6, 1, 0, 0),       // 0: r6 = ctx (LD_ABS reads through r6)
        ethertype,                       // 1: r0 = ethertype
        insn(JNE_K, 0, 0, 14, ipv4),     // 2: not IPv4 -> 17
        insn(LD_ABS_B, 0, 0, 0, l2 + 9), // 3: r0 = protocol
        insn(MOV64_X, 8, 0, 0, 0),       // 4: r8 = protocol
        insn(LD_ABS_B, 0, 0, 0, l2),     // 5: r0 = version/IHL
        insn(AND64_K, 0, 0, 0, 0x0f),    // 6
        insn(LSH64_K, 0, 0, 0, 2),       // 7: r0 = IP header length
        insn(MOV64_X, 7, 0, 0, 0),       // 8: r7 = IP header length
        insn(JEQ_K, 8, 0, 5, 1),         // 9: ICMP -> 15
        insn(JEQ_K, 8, 0, 2, 6),         // 10: TCP -> 13
        insn(JEQ_K, 8, 0, 1, 17),        // 11: UDP -> 13
        insn(JA, 0, 0, 4, 0),            // 12: other -> 17
        insn(LD_IND_H, 0, 7, 0, l2 + port_off), // 13: r0 = port
        insn(EXIT, 0, 0, 0, 0),          // 14
        insn(LD_IND_H, 0, 7, 0, l2 + 4), // 15: r0 = echo identifier
        insn(EXIT, 0, 0, 0, 0),          // 16
        insn(MOV64_K, 0, 0, 0, 0),       // 17: r0 = 0
        insn(EXIT, 0, 0, 0, 0),          // 18
    ]
}

/// Loads the program and attaches it to `tap`'s device (all its queues).
pub fn attach(tap: &Tap, by: SteerBy) -> io::Result<()> {
    let prog: OwnedFd = sys::bpf_load_socket_filter(&program(by))?;
    sys::tun_set_steering_ebpf(tap.as_fd(), prog.as_fd())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jumps_land_inside_the_program_on_exits_or_loads() {
        for by in [SteerBy::SourcePort, SteerBy::DestinationPort] {
            let p = program(by);
            for (pc, i) in p.iter().enumerate() {
                if matches!(i.code, JEQ_K | JNE_K | JA) {
                    let target = pc as i64 + 1 + i64::from(i.off);
                    assert!((0..p.len() as i64).contains(&target), "pc {pc}");
                    let t = p[target as usize].code;
                    assert!(matches!(t, LD_IND_H | MOV64_K), "pc {pc} -> {t:#x}");
                }
            }
            assert_eq!(p.last().unwrap().code, EXIT);
        }
        assert_eq!(program(SteerBy::DestinationPort)[13].imm, 16);
        let f = fanout_program(SteerBy::DestinationPort);
        assert_eq!((f[3].imm, f[5].imm, f[13].imm, f[15].imm), (9, 0, 2, 4));
        assert_eq!(f[1].code, LDX_MEM_W);
    }
}
