//! What the iptables backend writes, as text: the chain name, one nat REDIRECT
//! rule per (service, band), the jumps into the chain, and the
//! `iptables-restore --noflush` scripts that apply them. Pure functions.
//!
//! A band rule (IPv4, 4 bands, shift 0, band 1):
//! ```text
//! -A IPCLUSTER-web -s 0.0.0.1/0.0.0.3 -d 127.0.0.1/32 -p tcp -m tcp --dport 8080
//!    -m comment --comment "ipcluster:web:0:1/4:shift=0" -j REDIRECT --to-ports 20001
//! ```
//! The comment names the cluster, the service index, the band, the band count
//! and the shift, so the table reads back exactly and foreign rules are told
//! apart. Lines are written the way `iptables-save` prints them, so that a
//! jump read back compares equal to the jump we would write.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::steering::{Band, SteeringTable};

/// Every chain name starts with this.
pub const CHAIN_PREFIX: &str = "IPCLUSTER-";
/// iptables' limit on chain names (`XT_EXTENSION_MAXNAMELEN` - 1).
pub const MAX_CHAIN_NAME: usize = 28;
/// Every comment of this backend starts with this.
pub const COMMENT_PREFIX: &str = "ipcluster:";

/// The nat chain of a cluster: `IPCLUSTER-<cluster>` when that fits in 28
/// characters and the name is plain (letters, digits, '-', '_'); otherwise
/// `IPCLUSTER-<first 9 plain characters>-<8 hex digits of an FNV-1a hash of
/// the full name>`, which is stable across builds and platforms.
pub fn chain_name(cluster: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if !cluster.is_empty()
        && cluster.chars().all(plain)
        && CHAIN_PREFIX.len() + cluster.len() <= MAX_CHAIN_NAME
    {
        return format!("{CHAIN_PREFIX}{cluster}");
    }
    let head: String = cluster.chars().filter(|&c| plain(c)).take(9).collect();
    format!("{CHAIN_PREFIX}{head}-{:08x}", fnv1a32(cluster.as_bytes()))
}

fn fnv1a32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5, |hash, &b| {
        (hash ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// The address family: `iptables` or `ip6tables`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(address: IpAddr) -> Family {
        match address {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    pub fn save_command(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }

    pub fn restore_command(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    /// The address a wildcard listen of this family reads back as.
    pub fn unspecified(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Family::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        }
    }

    /// The prefix length of a single host (`/32`, `/128`).
    fn host_prefix(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    /// A 32-bit band value as an address of this family: the whole IPv4
    /// address, or the last 32 bits of an IPv6 address (as `band_of` reads it).
    pub fn low32_address(self, value: u32) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(Ipv4Addr::from(value)),
            Family::V6 => IpAddr::V6(Ipv6Addr::from(u128::from(value))),
        }
    }
}

/// The source match of `band`: `(band << shift) / ((bands - 1) << shift)`,
/// as addresses of `family`; `None` for a single band (it matches everyone,
/// and iptables-save omits a zero mask).
pub fn band_source(family: Family, band: Band, bands: u32, shift: u8) -> Option<(IpAddr, IpAddr)> {
    let mask = bands
        .saturating_sub(1)
        .checked_shl(u32::from(shift))
        .unwrap_or(0);
    if mask == 0 {
        return None;
    }
    let value = band.checked_shl(u32::from(shift)).unwrap_or(0) & mask;
    Some((family.low32_address(value), family.low32_address(mask)))
}

/// What a band rule says, and what its comment carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BandRule {
    pub service: usize,
    pub listen: SocketAddr,
    pub band: Band,
    pub bands: u32,
    pub shift: u8,
    pub worker_port: u16,
}

/// `ipcluster:<cluster>:<service>:<band>/<bands>:shift=<shift>`.
pub fn band_comment(cluster: &str, rule: &BandRule) -> String {
    format!(
        "{COMMENT_PREFIX}{cluster}:{}:{}/{}:shift={}",
        rule.service, rule.band, rule.bands, rule.shift
    )
}

/// The comment on the jumps into the chain: `ipcluster:<cluster>`.
pub fn jump_comment(cluster: &str) -> String {
    format!("{COMMENT_PREFIX}{cluster}")
}

/// The `-A <chain> …` line of one band rule.
pub fn band_rule_line(chain: &str, cluster: &str, rule: &BandRule) -> String {
    let family = Family::of(rule.listen.ip());
    let mut line = format!("-A {chain}");
    if let Some((value, mask)) = band_source(family, rule.band, rule.bands, rule.shift) {
        line += &format!(" -s {value}/{mask}");
    }
    if rule.listen.ip().is_unspecified() {
        // A wildcard listen serves every local address, and only those.
        line += " -p tcp -m addrtype --dst-type LOCAL";
    } else {
        line += &format!(" -d {}/{} -p tcp", rule.listen.ip(), family.host_prefix());
    }
    line += &format!(
        " -m tcp --dport {} -m comment --comment \"{}\" -j REDIRECT --to-ports {}",
        rule.listen.port(),
        band_comment(cluster, rule),
        rule.worker_port
    );
    line
}

/// Every band rule of `table` whose service is of `family`, in table order.
pub fn band_rules(table: &SteeringTable, family: Family) -> Vec<BandRule> {
    let mut rules = Vec::new();
    for (service, route) in table.services.iter().enumerate() {
        if Family::of(route.listen.ip()) != family {
            continue;
        }
        let bands = route.worker_ports.len() as u32;
        for (band, &worker_port) in route.worker_ports.iter().enumerate() {
            rules.push(BandRule {
                service,
                listen: route.listen,
                band: band as Band,
                bands,
                shift: table.band_shift,
                worker_port,
            });
        }
    }
    rules
}

/// The jumps into the chain for `listens` of `family`: one from `PREROUTING`
/// (clients on other hosts; the chain's own rules match the destination), and
/// from `OUTPUT` (clients on this host) one per specific listen address, or a
/// single one for any local destination when a listen is a wildcard.
pub fn jump_lines(
    chain: &str,
    cluster: &str,
    family: Family,
    listens: &[SocketAddr],
) -> Vec<String> {
    let ips: Vec<IpAddr> = listens
        .iter()
        .map(|l| l.ip())
        .filter(|ip| Family::of(*ip) == family)
        .collect();
    if ips.is_empty() {
        return Vec::new();
    }
    let tail = format!(
        "-m comment --comment \"{}\" -j {chain}",
        jump_comment(cluster)
    );
    let mut lines = vec![format!("-A PREROUTING -p tcp {tail}")];
    if ips.iter().any(|ip| ip.is_unspecified()) {
        lines.push(format!(
            "-A OUTPUT -p tcp -m addrtype --dst-type LOCAL {tail}"
        ));
    } else {
        let mut seen: Vec<IpAddr> = Vec::new();
        for ip in ips {
            if !seen.contains(&ip) {
                seen.push(ip);
                lines.push(format!(
                    "-A OUTPUT -d {ip}/{} -p tcp {tail}",
                    family.host_prefix()
                ));
            }
        }
    }
    lines
}

/// Turn `-A <builtin> <spec>` into `-D <builtin> <spec>`.
fn delete_line(append: &str) -> String {
    match append.strip_prefix("-A ") {
        Some(rest) => format!("-D {rest}"),
        None => append.to_owned(),
    }
}

/// Jump lines to add and to delete so that `existing` becomes `wanted`
/// (both as `-A …` lines in iptables-save's form), leaving jumps that are
/// already right in place.
fn jump_changes(existing: &[String], wanted: &[String]) -> Vec<String> {
    let mut lines: Vec<String> = existing
        .iter()
        .filter(|e| !wanted.contains(e))
        .map(|e| delete_line(e))
        .collect();
    lines.extend(wanted.iter().filter(|w| !existing.contains(w)).cloned());
    lines
}

/// The `iptables-restore --noflush` input that makes the chain exactly
/// `rules` (declaring a chain in a `--noflush` restore empties it or creates
/// it) and the jumps exactly `wanted_jumps`, in one transaction.
pub fn publish_script(
    chain: &str,
    rules: &[String],
    existing_jumps: &[String],
    wanted_jumps: &[String],
) -> String {
    let mut script = format!("*nat\n:{chain} - [0:0]\n");
    for line in rules
        .iter()
        .chain(&jump_changes(existing_jumps, wanted_jumps))
    {
        script += line;
        script.push('\n');
    }
    script += "COMMIT\n";
    script
}

/// The input that creates the chain when missing (keeping its rules when it
/// exists) and sets the jumps; `None` when nothing would change.
pub fn install_script(
    chain: &str,
    chain_exists: bool,
    existing_jumps: &[String],
    wanted_jumps: &[String],
) -> Option<String> {
    let changes = jump_changes(existing_jumps, wanted_jumps);
    if chain_exists && changes.is_empty() {
        return None;
    }
    let mut script = String::from("*nat\n");
    if !chain_exists {
        script += &format!(":{chain} - [0:0]\n");
    }
    for line in changes {
        script += &line;
        script.push('\n');
    }
    script += "COMMIT\n";
    Some(script)
}

/// The input that deletes the jumps, then empties and deletes the chain;
/// `None` when there is nothing of ours.
pub fn teardown_script(
    chain: &str,
    chain_exists: bool,
    existing_jumps: &[String],
) -> Option<String> {
    if !chain_exists && existing_jumps.is_empty() {
        return None;
    }
    let mut script = String::from("*nat\n");
    for jump in existing_jumps {
        script += &delete_line(jump);
        script.push('\n');
    }
    if chain_exists {
        script += &format!("-F {chain}\n-X {chain}\n");
    }
    script += "COMMIT\n";
    Some(script)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steering::ServiceRoute;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    fn rule(listen: &str, band: Band, bands: u32, shift: u8, worker_port: u16) -> BandRule {
        BandRule {
            service: 0,
            listen: addr(listen),
            band,
            bands,
            shift,
            worker_port,
        }
    }

    #[test]
    fn short_plain_names_are_kept() {
        assert_eq!(chain_name("default"), "IPCLUSTER-default");
        assert_eq!(
            chain_name("a23456789012345678"),
            "IPCLUSTER-a23456789012345678"
        );
    }

    #[test]
    fn long_or_odd_names_are_shortened_deterministically() {
        let long = "a-rather-long-cluster-name-for-production";
        let name = chain_name(long);
        assert_eq!(name.len(), MAX_CHAIN_NAME);
        assert!(name.starts_with("IPCLUSTER-a-rather-"), "{name}");
        assert_eq!(name, chain_name(long), "same input, same name");
        assert_ne!(name, chain_name("a-rather-long-cluster-name-for-staging"));
        // 19 characters: one too many for the plain form.
        assert_eq!(chain_name("a234567890123456789").len(), MAX_CHAIN_NAME);
        let odd = chain_name("we b");
        assert!(
            odd.starts_with("IPCLUSTER-web-") && odd.len() == 22,
            "{odd}"
        );
        assert_ne!(odd, chain_name("web"));
        // The FNV-1a reference value of "a".
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
    }

    #[test]
    fn band_sources_v4() {
        let v4 = |s: &str| s.parse::<IpAddr>().expect("v4");
        assert_eq!(band_source(Family::V4, 0, 1, 0), None);
        assert_eq!(band_source(Family::V4, 0, 1, 8), None);
        assert_eq!(
            band_source(Family::V4, 1, 2, 0),
            Some((v4("0.0.0.1"), v4("0.0.0.1")))
        );
        assert_eq!(
            band_source(Family::V4, 1, 4, 8),
            Some((v4("0.0.1.0"), v4("0.0.3.0")))
        );
        assert_eq!(
            band_source(Family::V4, 255, 256, 0),
            Some((v4("0.0.0.255"), v4("0.0.0.255")))
        );
        assert_eq!(
            band_source(Family::V4, 1, 2, 31),
            Some((v4("128.0.0.0"), v4("128.0.0.0")))
        );
        // Bits shifted out past the top are dropped, like band_of's arithmetic.
        assert_eq!(
            band_source(Family::V4, 3, 4, 31),
            Some((v4("128.0.0.0"), v4("128.0.0.0")))
        );
    }

    #[test]
    fn band_sources_v6_use_the_last_32_bits() {
        let v6 = |s: &str| s.parse::<IpAddr>().expect("v6");
        assert_eq!(
            band_source(Family::V6, 3, 4, 0),
            Some((v6("::3"), v6("::3")))
        );
        assert_eq!(
            band_source(Family::V6, 1, 4, 16),
            Some((v6("::1:0"), v6("::3:0")))
        );
        assert_eq!(
            band_source(Family::V6, 0, 2, 0),
            Some((v6("::"), v6("::1")))
        );
        assert_eq!(band_source(Family::V6, 0, 1, 0), None);
    }

    #[test]
    fn band_source_agrees_with_band_of() {
        use crate::steering::band_of;
        for (bands, shift) in [(2u32, 0u8), (4, 2), (8, 8), (256, 0), (16, 28)] {
            for last in [0u32, 1, 7, 0x0102_0304, 0xdead_beef, u32::MAX] {
                let client = IpAddr::V4(Ipv4Addr::from(last));
                let band = band_of(client, shift, bands);
                let (IpAddr::V4(value), IpAddr::V4(mask)) =
                    band_source(Family::V4, band, bands, shift).expect("several bands")
                else {
                    panic!("v4 expected");
                };
                assert_eq!(
                    last & u32::from(mask),
                    u32::from(value),
                    "{client} {bands}/{shift}"
                );
            }
        }
    }

    #[test]
    fn rule_text_v4_specific_listen() {
        assert_eq!(
            band_rule_line(
                "IPCLUSTER-web",
                "web",
                &rule("127.0.0.1:8080", 1, 4, 0, 20001)
            ),
            "-A IPCLUSTER-web -s 0.0.0.1/0.0.0.3 -d 127.0.0.1/32 -p tcp -m tcp --dport 8080 \
             -m comment --comment \"ipcluster:web:0:1/4:shift=0\" -j REDIRECT --to-ports 20001"
        );
    }

    #[test]
    fn rule_text_v4_wildcard_with_shift() {
        assert_eq!(
            band_rule_line("IPCLUSTER-web", "web", &rule("0.0.0.0:80", 2, 4, 8, 20002)),
            "-A IPCLUSTER-web -s 0.0.2.0/0.0.3.0 -p tcp -m addrtype --dst-type LOCAL -m tcp --dport 80 \
             -m comment --comment \"ipcluster:web:0:2/4:shift=8\" -j REDIRECT --to-ports 20002"
        );
    }

    #[test]
    fn rule_text_single_band_has_no_source() {
        assert_eq!(
            band_rule_line("C", "c", &rule("10.1.2.3:443", 0, 1, 0, 9000)),
            "-A C -d 10.1.2.3/32 -p tcp -m tcp --dport 443 \
             -m comment --comment \"ipcluster:c:0:0/1:shift=0\" -j REDIRECT --to-ports 9000"
        );
    }

    #[test]
    fn rule_text_v6() {
        assert_eq!(
            band_rule_line("C", "c", &rule("[::1]:8080", 3, 4, 0, 9003)),
            "-A C -s ::3/::3 -d ::1/128 -p tcp -m tcp --dport 8080 \
             -m comment --comment \"ipcluster:c:0:3/4:shift=0\" -j REDIRECT --to-ports 9003"
        );
        assert_eq!(
            band_rule_line("C", "c", &rule("[::]:80", 1, 2, 4, 9001)),
            "-A C -s ::10/::10 -p tcp -m addrtype --dst-type LOCAL -m tcp --dport 80 \
             -m comment --comment \"ipcluster:c:0:1/2:shift=4\" -j REDIRECT --to-ports 9001"
        );
    }

    #[test]
    fn band_rules_split_by_family_and_keep_service_index() {
        let table = SteeringTable {
            band_shift: 0,
            services: vec![
                ServiceRoute {
                    listen: addr("[::1]:80"),
                    worker_ports: vec![1, 2],
                },
                ServiceRoute {
                    listen: addr("127.0.0.1:80"),
                    worker_ports: vec![3, 4],
                },
            ],
        };
        let v4 = band_rules(&table, Family::V4);
        assert_eq!(v4.len(), 2);
        assert!(v4.iter().all(|r| r.service == 1 && r.bands == 2));
        assert_eq!(v4[1].worker_port, 4);
        let v6 = band_rules(&table, Family::V6);
        assert_eq!(
            v6.iter().map(|r| r.worker_port).collect::<Vec<_>>(),
            vec![1, 2]
        );
    }

    #[test]
    fn jumps_for_specific_and_wildcard_listens() {
        let specific = [
            addr("127.0.0.1:80"),
            addr("127.0.0.1:443"),
            addr("10.0.0.1:80"),
            addr("[::1]:80"),
        ];
        assert_eq!(
            jump_lines("C", "c", Family::V4, &specific),
            vec![
                "-A PREROUTING -p tcp -m comment --comment \"ipcluster:c\" -j C",
                "-A OUTPUT -d 127.0.0.1/32 -p tcp -m comment --comment \"ipcluster:c\" -j C",
                "-A OUTPUT -d 10.0.0.1/32 -p tcp -m comment --comment \"ipcluster:c\" -j C",
            ]
        );
        assert_eq!(
            jump_lines("C", "c", Family::V6, &specific),
            vec![
                "-A PREROUTING -p tcp -m comment --comment \"ipcluster:c\" -j C",
                "-A OUTPUT -d ::1/128 -p tcp -m comment --comment \"ipcluster:c\" -j C",
            ]
        );
        assert_eq!(
            jump_lines(
                "C",
                "c",
                Family::V4,
                &[addr("127.0.0.1:80"), addr("0.0.0.0:81")]
            ),
            vec![
                "-A PREROUTING -p tcp -m comment --comment \"ipcluster:c\" -j C",
                "-A OUTPUT -p tcp -m addrtype --dst-type LOCAL -m comment --comment \"ipcluster:c\" -j C",
            ]
        );
        assert!(jump_lines("C", "c", Family::V6, &[addr("127.0.0.1:80")]).is_empty());
    }

    #[test]
    fn publish_script_replaces_the_chain_and_fixes_jumps() {
        let keep = "-A PREROUTING -p tcp -j C".to_owned();
        let stale = "-A OUTPUT -d 10.0.0.9/32 -p tcp -j C".to_owned();
        let new = "-A OUTPUT -d 10.0.0.1/32 -p tcp -j C".to_owned();
        let script = publish_script(
            "C",
            &["-A C -p tcp -m tcp --dport 1 -j REDIRECT --to-ports 2".to_owned()],
            &[keep.clone(), stale],
            &[keep, new],
        );
        assert_eq!(
            script,
            "*nat\n:C - [0:0]\n-A C -p tcp -m tcp --dport 1 -j REDIRECT --to-ports 2\n\
             -D OUTPUT -d 10.0.0.9/32 -p tcp -j C\n-A OUTPUT -d 10.0.0.1/32 -p tcp -j C\nCOMMIT\n"
        );
    }

    #[test]
    fn install_script_only_when_something_changes() {
        let jump = vec!["-A PREROUTING -p tcp -j C".to_owned()];
        assert_eq!(install_script("C", true, &jump, &jump), None);
        assert_eq!(
            install_script("C", false, &[], &jump).as_deref(),
            Some("*nat\n:C - [0:0]\n-A PREROUTING -p tcp -j C\nCOMMIT\n")
        );
        // An existing chain is not declared again: that would empty it.
        assert_eq!(
            install_script("C", true, &[], &jump).as_deref(),
            Some("*nat\n-A PREROUTING -p tcp -j C\nCOMMIT\n")
        );
    }

    #[test]
    fn teardown_script_removes_jumps_then_chain() {
        assert_eq!(teardown_script("C", false, &[]), None);
        assert_eq!(
            teardown_script("C", true, &["-A OUTPUT -p tcp -j C".to_owned()]).as_deref(),
            Some("*nat\n-D OUTPUT -p tcp -j C\n-F C\n-X C\nCOMMIT\n")
        );
    }
}
