//! What differs between two validated configs, by key, and which keys a
//! running gateway can take on a reload (SIGHUP) without a restart.
use super::Config;

/// Keys whose new value a running gateway applies: the rules that decide
/// per flow (masquerade, forwards) and the flow table's limits. Every
/// other key names something built once at start (devices, addresses,
/// threads, sockets, the port pool and the SNAT pools the gateway answers
/// ARP for, the fragment cache).
pub const LIVE_KEYS: &[&str] = &[
    "masquerade",
    "forward",
    "nat.max_flows",
    "nat.max_flows_per_pod",
    "nat.ports_per_pod",
    "nat.timeouts.tcp_established",
    "nat.timeouts.tcp_transitory",
    "nat.timeouts.udp",
    "nat.timeouts.icmp",
    "nat.filtering",
    "nat.icmp_errors_per_sec",
    "nat.icmp_errors_burst",
    "log.mappings",
    "log.destinations",
];

/// Every key (a list by its name) whose value differs, in the order of the
/// default file.
pub fn changed_keys(old: &Config, new: &Config) -> Vec<&'static str> {
    let (o, n) = (old, new);
    let (ot, nt) = (&o.nat.timeouts, &n.nat.timeouts);
    [
        ("pod.tap", o.pod.tap != n.pod.tap),
        ("pod.address", o.pod.address != n.pod.address),
        ("pod.netns", o.pod.netns != n.pod.netns),
        ("pod.mtu", o.pod.mtu != n.pod.mtu),
        ("uplink.kind", o.uplink.kind != n.uplink.kind),
        ("uplink.tap", o.uplink.tap != n.uplink.tap),
        ("uplink.interface", o.uplink.interface != n.uplink.interface),
        ("uplink.address", o.uplink.address != n.uplink.address),
        ("uplink.gateway", o.uplink.gateway != n.uplink.gateway),
        ("uplink.netns", o.uplink.netns != n.uplink.netns),
        ("uplink.mtu", o.uplink.mtu != n.uplink.mtu),
        ("masquerade", o.masquerade != n.masquerade),
        ("snat", o.snat != n.snat),
        ("forward", o.forward != n.forward),
        ("nat.ports", o.nat.ports != n.nat.ports),
        ("nat.max_flows", o.nat.max_flows != n.nat.max_flows),
        (
            "nat.max_flows_per_pod",
            o.nat.max_flows_per_pod != n.nat.max_flows_per_pod,
        ),
        (
            "nat.ports_per_pod",
            o.nat.ports_per_pod != n.nat.ports_per_pod,
        ),
        (
            "nat.timeouts.tcp_established",
            ot.tcp_established != nt.tcp_established,
        ),
        (
            "nat.timeouts.tcp_transitory",
            ot.tcp_transitory != nt.tcp_transitory,
        ),
        ("nat.timeouts.udp", ot.udp != nt.udp),
        ("nat.timeouts.icmp", ot.icmp != nt.icmp),
        ("nat.timeouts.fragment", ot.fragment != nt.fragment),
        ("nat.filtering", o.nat.filtering != n.nat.filtering),
        (
            "nat.icmp_errors_per_sec",
            o.nat.icmp_errors_per_sec != n.nat.icmp_errors_per_sec,
        ),
        (
            "nat.icmp_errors_burst",
            o.nat.icmp_errors_burst != n.nat.icmp_errors_burst,
        ),
        (
            "nat.fragments_max",
            o.nat.fragments_max != n.nat.fragments_max,
        ),
        ("workers.threads", o.workers.threads != n.workers.threads),
        ("workers.offload", o.workers.offload != n.workers.offload),
        ("workers.io_uring", o.workers.io_uring != n.workers.io_uring),
        (
            "workers.busy_poll",
            o.workers.busy_poll != n.workers.busy_poll,
        ),
        ("workers.pin", o.workers.pin != n.workers.pin),
        ("control.socket", o.control.socket != n.control.socket),
        ("control.group", o.control.group != n.control.group),
        ("metrics.listen", o.metrics.listen != n.metrics.listen),
        ("run.run_as", o.run.run_as != n.run.run_as),
        ("run.seccomp", o.run.seccomp != n.run.seccomp),
        ("log.mappings", o.log.mappings != n.log.mappings),
        ("log.destinations", o.log.destinations != n.log.destinations),
    ]
    .into_iter()
    .filter_map(|(key, differs)| differs.then_some(key))
    .collect()
}

/// The changed keys a running gateway cannot take (a restart applies them).
pub fn restart_keys(changed: &[&'static str]) -> Vec<&'static str> {
    changed
        .iter()
        .copied()
        .filter(|k| !LIVE_KEYS.contains(k))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        Config::from_toml_str(extra).unwrap()
    }

    #[test]
    fn same_config_changes_nothing() {
        let c = config("");
        assert!(changed_keys(&c, &c.clone()).is_empty());
    }

    #[test]
    fn each_changed_key_is_named_and_classified() {
        let base = config("");
        for (text, key, live) in [
            ("[pod]\ntap = \"tap9\"\n", "pod.tap", false),
            ("[pod]\nmtu = 1400\n", "pod.mtu", false),
            (
                "[uplink]\ngateway = \"203.0.113.2\"\n",
                "uplink.gateway",
                false,
            ),
            ("[workers]\nthreads = 3\n", "workers.threads", false),
            ("[nat]\nports = \"2000-3000\"\n", "nat.ports", false),
            (
                "[control]\nsocket = \"/run/x.sock\"\n",
                "control.socket",
                false,
            ),
            (
                "[metrics]\nlisten = \"127.0.0.1:9469\"\n",
                "metrics.listen",
                false,
            ),
            (
                "[nat]\nicmp_errors_per_sec = 5\n",
                "nat.icmp_errors_per_sec",
                true,
            ),
            ("[nat]\nfragments_max = 5\n", "nat.fragments_max", false),
            ("[run]\nseccomp = false\n", "run.seccomp", false),
            ("[run]\nrun_as = \"nobody\"\n", "run.run_as", false),
            (
                "[nat.timeouts]\nfragment = \"3s\"\n",
                "nat.timeouts.fragment",
                false,
            ),
            (
                "[[snat]]\nsource = \"10.244.1.0/24\"\nto = \"203.0.113.20\"\n",
                "snat",
                false,
            ),
            ("[nat.timeouts]\nudp = \"400s\"\n", "nat.timeouts.udp", true),
            (
                "[nat]\nfiltering = \"endpoint-independent\"\n",
                "nat.filtering",
                true,
            ),
            ("[nat]\nmax_flows = 1000\n", "nat.max_flows", true),
            (
                "[log]\nmappings = \"/var/log/m.json\"\n",
                "log.mappings",
                true,
            ),
            ("[log]\ndestinations = true\n", "log.destinations", true),
            (
                "[nat]\nmax_flows_per_pod = 10\n",
                "nat.max_flows_per_pod",
                true,
            ),
            ("[nat]\nports_per_pod = 0\n", "nat.ports_per_pod", true),
            (
                "[[masquerade]]\nsource = \"10.244.0.0/17\"\n",
                "masquerade",
                true,
            ),
            (
                "[[forward]]\nprotocol = \"tcp\"\nport = 8080\nto = \"10.244.0.2:80\"\n",
                "forward",
                true,
            ),
        ] {
            let changed = changed_keys(&base, &config(text));
            assert_eq!(changed, vec![key], "{text}");
            let refused = restart_keys(&changed);
            assert_eq!(refused.is_empty(), live, "{key}");
        }
        let both = config("[pod]\ntap = \"tap9\"\n[nat.timeouts]\nudp = \"400s\"\n");
        let changed = changed_keys(&base, &both);
        assert_eq!(changed, vec!["pod.tap", "nat.timeouts.udp"]);
        assert_eq!(restart_keys(&changed), vec!["pod.tap"]);
    }
}
