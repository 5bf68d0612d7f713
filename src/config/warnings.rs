//! Warnings about a valid but questionable configuration.
use std::time::Duration;

use super::{values::format_duration, Config};

/// RFC minimum idle timeouts; below them `Config::warnings` complains.
const RFC_MIN_TCP_ESTABLISHED: Duration = Duration::from_secs(7440);
const RFC_MIN_TCP_TRANSITORY: Duration = Duration::from_secs(240);
const RFC_MIN_UDP: Duration = Duration::from_secs(120);
const RFC_MIN_ICMP: Duration = Duration::from_secs(60);

impl Config {
    /// Human-readable warnings about a valid but questionable configuration:
    /// timeouts below the RFC minimums, no masquerade rule, a masquerade or
    /// SNAT rule that no pod traffic can match.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let t = &self.nat.timeouts;
        let checks = [
            (
                "nat.timeouts.tcp_established",
                t.tcp_established,
                RFC_MIN_TCP_ESTABLISHED,
                "RFC 5382 REQ-5",
            ),
            (
                "nat.timeouts.tcp_transitory",
                t.tcp_transitory,
                RFC_MIN_TCP_TRANSITORY,
                "RFC 5382 REQ-5",
            ),
            ("nat.timeouts.udp", t.udp, RFC_MIN_UDP, "RFC 4787 REQ-5"),
            ("nat.timeouts.icmp", t.icmp, RFC_MIN_ICMP, "RFC 5508 REQ-2"),
        ];
        for (key, value, min, rfc) in checks {
            if value < min {
                out.push(format!(
                    "config key `{key}`: {} is below the {}s minimum of {rfc}; idle flows will be dropped early",
                    format_duration(value),
                    min.as_secs()
                ));
            }
        }
        if self.masquerade.is_empty() && self.snat.is_empty() {
            out.push(
                "config key `masquerade`: no masquerade rule and no snat rule, so no pod traffic will be translated"
                    .to_string(),
            );
        }
        for (i, rule) in self.masquerade.iter().enumerate() {
            if !rule.source.overlaps(&self.pod.address) {
                out.push(format!(
                    "config key `masquerade[{i}].source`: {} does not overlap the pod subnet {}, so the rule matches no pod traffic",
                    rule.source, self.pod.address
                ));
            }
        }
        for (i, rule) in self.snat.iter().enumerate() {
            if !rule.source.overlaps(&self.pod.address) {
                out.push(format!(
                    "config key `snat[{i}].source`: {} does not overlap the pod subnet {}, so the rule matches no pod traffic",
                    rule.source, self.pod.address
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::assert_mentions;
    use crate::config::Config;

    #[test]
    fn warns_udp_below_rfc_4787() {
        let c = Config::from_toml_str("[nat.timeouts]\nudp = \"5s\"\n").unwrap();
        let w = c.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(
            w[0],
            "config key `nat.timeouts.udp`: 5s is below the 120s minimum of RFC 4787 REQ-5; idle flows will be dropped early"
        );
    }

    #[test]
    fn empty_masquerade_list_is_allowed_with_warning() {
        let c = Config::from_toml_str("masquerade = []\n").unwrap();
        assert!(c.masquerade.is_empty());
        let w = c.warnings().join("\n");
        assert_mentions(&w, &["masquerade", "no masquerade rule"]);
    }

    #[test]
    fn warns_stray_snat_rule_and_not_for_snat_only() {
        let c = Config::from_toml_str(
            "masquerade = []\n[[snat]]\nsource = \"192.168.0.0/16\"\nto = \"203.0.113.20\"\n",
        )
        .unwrap();
        let w = c.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert_mentions(&w[0], &["snat[0].source", "matches no pod traffic"]);
    }

    #[test]
    fn warns_other_timeouts_and_stray_rule() {
        let c = Config::from_toml_str(
            "[nat.timeouts]\ntcp_established = \"1h\"\ntcp_transitory = \"1m\"\nicmp = \"10s\"\n[[masquerade]]\nsource = \"192.168.0.0/16\"\n",
        )
        .unwrap();
        let w = c.warnings().join("\n");
        assert_mentions(
            &w,
            &[
                "tcp_established",
                "tcp_transitory",
                "icmp",
                "RFC 5382",
                "RFC 5508",
                "masquerade[0].source",
            ],
        );
    }
}
