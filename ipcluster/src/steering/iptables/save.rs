//! Reading back what is installed: parse `iptables-save -c -t nat` output into
//! the cluster's band rules and jumps, and rebuild the `SteeringTable` from
//! them. Pure functions; rules that are not ours are ignored.

use std::net::{IpAddr, SocketAddr};

use super::rules::{BandRule, COMMENT_PREFIX, Family, band_source};
use crate::steering::{Band, ServiceRoute, SteeringTable};

/// What one family's nat table holds of one cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NatState {
    /// The chain is declared.
    pub chain_exists: bool,
    /// Band rules in the chain carrying this cluster's comment, in order.
    pub band_rules: Vec<BandRule>,
    /// Packets counted by those rules (nat sees only a connection's first
    /// packet, so this is the number of connections steered since the publish).
    pub packets: u64,
    /// Rules in `PREROUTING`/`OUTPUT` that jump to the chain, as `-A …` lines
    /// without counters: exactly what a `-D` needs.
    pub jumps: Vec<String>,
    /// Cluster names found in comments in the chain that are not this
    /// cluster (a chain-name collision).
    pub other_clusters: Vec<String>,
    /// Rules of ours that do not read back as we wrote them (edited by hand,
    /// or unparseable lines naming the chain). Reading the table fails on
    /// them; a publish replaces them.
    pub damaged: Vec<ParseError>,
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("unbalanced quotes in {0:?}")]
    Quotes(String),
    #[error("rule {line:?}: {problem}")]
    Rule { line: String, problem: String },
    #[error("chain {chain}: {problem}")]
    Table { chain: String, problem: String },
}

/// Parse one family's `iptables-save [-c] -t nat` output for `cluster`'s
/// `chain`. Never fails: lines that are not ours are skipped whatever they
/// hold, and problems with ours are listed in [`NatState::damaged`].
pub fn parse_nat(text: &str, family: Family, chain: &str, cluster: &str) -> NatState {
    let mut state = NatState::default();
    let mut in_nat = false;
    for raw in text.lines() {
        let line = raw.trim();
        if line.starts_with('*') {
            in_nat = line == "*nat";
            continue;
        }
        if !in_nat || line.is_empty() || line.starts_with('#') || line == "COMMIT" {
            continue;
        }
        if let Some(declared) = line.strip_prefix(':') {
            if declared.split_whitespace().next() == Some(chain) {
                state.chain_exists = true;
            }
            continue;
        }
        let (packets, rule) = split_counters(line);
        let tokens = match tokenize(rule) {
            Ok(tokens) => tokens,
            Err(e) => {
                if rule.split_whitespace().any(|word| word == chain) {
                    state.damaged.push(e);
                }
                continue;
            }
        };
        if tokens.first().map(String::as_str) != Some("-A") {
            continue;
        }
        let Some(rule_chain) = tokens.get(1) else {
            continue;
        };
        let options = Options::of(&tokens[2..]);
        if rule_chain == chain {
            let Some(comment) = options.get("--comment") else {
                continue;
            };
            match parse_comment(comment, cluster) {
                Comment::Ours(meta) => match band_rule(&options, family, meta) {
                    Ok(band_rule) => {
                        state.packets += packets;
                        state.band_rules.push(band_rule);
                    }
                    Err(problem) => state.damaged.push(ParseError::Rule {
                        line: rule.to_owned(),
                        problem,
                    }),
                },
                Comment::OtherCluster(name) => {
                    if !state.other_clusters.contains(&name) {
                        state.other_clusters.push(name);
                    }
                }
                Comment::Foreign => {}
            }
        } else if (rule_chain == "PREROUTING" || rule_chain == "OUTPUT")
            && options.get("-j") == Some(chain)
        {
            state.jumps.push(rule.to_owned());
        }
    }
    state
}

/// Rebuild the table from the band rules of every family (service indexes
/// are global). `None` when there are no rules; an error when they do not
/// form a complete, consistent table.
pub fn table_from_rules(
    chain: &str,
    rules: &[BandRule],
) -> Result<Option<SteeringTable>, ParseError> {
    let problem = |problem: String| ParseError::Table {
        chain: chain.to_owned(),
        problem,
    };
    let Some(first) = rules.first() else {
        return Ok(None);
    };
    let services = rules.iter().map(|r| r.service).max().map_or(0, |m| m + 1);
    let mut routes: Vec<Option<ServiceRoute>> = vec![None; services];
    for rule in rules {
        if rule.shift != first.shift {
            return Err(problem(format!(
                "rules disagree on the band shift ({} and {})",
                first.shift, rule.shift
            )));
        }
        let route = routes[rule.service].get_or_insert_with(|| ServiceRoute {
            listen: rule.listen,
            worker_ports: vec![0; rule.bands as usize],
        });
        if route.listen != rule.listen || route.worker_ports.len() != rule.bands as usize {
            return Err(problem(format!(
                "service {} has rules for {} with {} bands and for {} with {} bands",
                rule.service,
                route.listen,
                route.worker_ports.len(),
                rule.listen,
                rule.bands
            )));
        }
        match route.worker_ports.get_mut(rule.band as usize) {
            Some(slot) if *slot == 0 => *slot = rule.worker_port,
            Some(_) => {
                return Err(problem(format!(
                    "service {} band {} appears twice",
                    rule.service, rule.band
                )));
            }
            None => {
                return Err(problem(format!(
                    "service {} has no band {}",
                    rule.service, rule.band
                )));
            }
        }
    }
    let mut table = SteeringTable {
        band_shift: first.shift,
        services: Vec::with_capacity(services),
    };
    for (service, route) in routes.into_iter().enumerate() {
        let route = route.ok_or_else(|| problem(format!("service {service} has no rules")))?;
        if let Some(band) = route.worker_ports.iter().position(|&p| p == 0) {
            return Err(problem(format!(
                "service {service} ({}) has no rule for band {band}",
                route.listen
            )));
        }
        table.services.push(route);
    }
    table.validate().map_err(|e| problem(e.to_string()))?;
    Ok(Some(table))
}

/// `[packets:bytes] -A …` → (packets, `-A …`); no counters → 0.
fn split_counters(line: &str) -> (u64, &str) {
    if let Some(rest) = line.strip_prefix('[')
        && let Some((counters, rule)) = rest.split_once(']')
    {
        let packets = counters
            .split(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        return (packets, rule.trim_start());
    }
    (0, line)
}

/// Split a saved rule into words the way iptables-restore does: whitespace
/// separates, `"…"` quotes, `\` escapes the next character inside quotes.
fn tokenize(line: &str) -> Result<Vec<String>, ParseError> {
    let mut tokens = Vec::new();
    let mut current = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            '\\' if quoted => {
                if let Some(next) = chars.next() {
                    current.push(next);
                }
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    tokens.push(std::mem::take(&mut current));
                    in_word = false;
                }
            }
            c => {
                current.push(c);
                in_word = true;
            }
        }
    }
    if quoted {
        return Err(ParseError::Quotes(line.to_owned()));
    }
    if in_word {
        tokens.push(current);
    }
    Ok(tokens)
}

/// The options of a rule: option → its (first) argument. A `!` (negation)
/// marks the rule as not ours.
struct Options<'a> {
    pairs: Vec<(&'a str, &'a str)>,
    negated: bool,
}

impl<'a> Options<'a> {
    fn of(tokens: &'a [String]) -> Options<'a> {
        let mut pairs = Vec::new();
        let mut negated = false;
        let mut i = 0;
        while i < tokens.len() {
            let word = tokens[i].as_str();
            if word == "!" {
                negated = true;
            } else if word.starts_with('-')
                && let Some(value) = tokens
                    .get(i + 1)
                    .filter(|v| !v.starts_with('-') || *v == "-")
            {
                pairs.push((word, value.as_str()));
                i += 1;
            }
            i += 1;
        }
        Options { pairs, negated }
    }

    fn get(&self, option: &str) -> Option<&'a str> {
        self.pairs
            .iter()
            .find(|(o, _)| *o == option)
            .map(|(_, v)| *v)
    }
}

struct CommentMeta {
    service: usize,
    band: Band,
    bands: u32,
    shift: u8,
}

enum Comment {
    Ours(CommentMeta),
    OtherCluster(String),
    Foreign,
}

/// `ipcluster:<cluster>:<service>:<band>/<bands>:shift=<s>`.
fn parse_comment(comment: &str, cluster: &str) -> Comment {
    let Some(rest) = comment.strip_prefix(COMMENT_PREFIX) else {
        return Comment::Foreign;
    };
    // Cluster names cannot contain ':', so split from the right.
    let mut parts = rest.rsplitn(4, ':');
    let (Some(shift), Some(bands), Some(service), Some(name)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Comment::Foreign;
    };
    let meta = (|| {
        let shift = shift.strip_prefix("shift=")?.parse().ok()?;
        let (band, bands) = bands.split_once('/')?;
        Some(CommentMeta {
            service: service.parse().ok()?,
            band: band.parse().ok()?,
            bands: bands.parse().ok()?,
            shift,
        })
    })();
    match meta {
        Some(_) if name != cluster => Comment::OtherCluster(name.to_owned()),
        Some(meta) => Comment::Ours(meta),
        None => Comment::Foreign,
    }
}

/// Check a rule carrying our comment against what we would have written,
/// and take the listen address and worker port from it.
fn band_rule(options: &Options, family: Family, meta: CommentMeta) -> Result<BandRule, String> {
    if options.negated {
        return Err("has a negated match".into());
    }
    if options.get("-p") != Some("tcp") || options.get("-j") != Some("REDIRECT") {
        return Err("is not a tcp REDIRECT rule".into());
    }
    if !meta.bands.is_power_of_two() || meta.band >= meta.bands || meta.shift >= 32 {
        return Err(format!(
            "comment has band {}/{} shift {}",
            meta.band, meta.bands, meta.shift
        ));
    }
    let port = |option: &str| -> Result<u16, String> {
        let value = options
            .get(option)
            .ok_or_else(|| format!("has no {option}"))?;
        value
            .parse()
            .map_err(|_| format!("{option} {value:?} is not a port"))
    };
    let public = port("--dport")?;
    let worker_port = port("--to-ports")?;
    let ip = match (options.get("-d"), options.get("--dst-type")) {
        (Some(d), _) => host_address(d, family)
            .ok_or_else(|| format!("-d {d:?} is not one {family:?} address"))?,
        (None, Some("LOCAL")) => family.unspecified(),
        (None, _) => return Err("has neither -d nor --dst-type LOCAL".into()),
    };
    let expected = band_source(family, meta.band, meta.bands, meta.shift);
    let found = match options.get("-s") {
        None => None,
        Some(s) => Some(
            source_match(s, family).ok_or_else(|| format!("-s {s:?} is not an address/mask"))?,
        ),
    };
    if found != expected {
        return Err(format!(
            "its source match {found:?} is not the one of band {}/{} shift {} ({expected:?})",
            meta.band, meta.bands, meta.shift
        ));
    }
    Ok(BandRule {
        service: meta.service,
        listen: SocketAddr::new(ip, public),
        band: meta.band,
        bands: meta.bands,
        shift: meta.shift,
        worker_port,
    })
}

/// `127.0.0.1/32`, `::1/128` (or without a prefix) → the address.
fn host_address(text: &str, family: Family) -> Option<IpAddr> {
    let (ip, prefix) = match text.split_once('/') {
        Some((ip, prefix)) => (ip, Some(prefix)),
        None => (text, None),
    };
    let ip: IpAddr = ip.parse().ok()?;
    let full = match family {
        Family::V4 => "32",
        Family::V6 => "128",
    };
    (Family::of(ip) == family && prefix.is_none_or(|p| p == full)).then_some(ip)
}

/// `0.0.1.0/0.0.3.0`, `::3/::3`, `::0.1.0.0/::0.3.0.0` → (value, mask).
/// iptables-save prints contiguous masks as a prefix length (`/24`).
fn source_match(text: &str, family: Family) -> Option<(IpAddr, IpAddr)> {
    let (value, mask) = text.split_once('/')?;
    let value: IpAddr = value.parse().ok()?;
    let mask: IpAddr = match mask.parse::<u8>() {
        Ok(prefix) => prefix_mask(family, prefix)?,
        Err(_) => mask.parse().ok()?,
    };
    (Family::of(value) == family && Family::of(mask) == family).then_some((value, mask))
}

fn prefix_mask(family: Family, prefix: u8) -> Option<IpAddr> {
    Some(match family {
        Family::V4 if prefix <= 32 => IpAddr::V4(
            u32::MAX
                .checked_shl(32 - u32::from(prefix))
                .unwrap_or(0)
                .into(),
        ),
        Family::V6 if prefix <= 128 => IpAddr::V6(
            u128::MAX
                .checked_shl(128 - u32::from(prefix))
                .unwrap_or(0)
                .into(),
        ),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steering::iptables::rules::{band_rule_line, band_rules, jump_lines};

    const SAVED_V4: &str = r#"# Generated by iptables-save v1.8.9 (nf_tables) on Fri Nov 27 22:50:28 2026
*filter
:INPUT ACCEPT [10:600]
-A INPUT -j IPCLUSTER-web
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [3:180]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
:IPCLUSTER-web - [0:0]
[0:0] -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
[12:720] -A PREROUTING -p tcp -m comment --comment "ipcluster:web" -j IPCLUSTER-web
[0:0] -A OUTPUT -d 127.0.0.1/32 -p tcp -m tcp --dport 8080 -j REDIRECT --to-ports 7000
[3:180] -A OUTPUT -d 127.0.0.1/32 -p tcp -m comment --comment "ipcluster:web" -j IPCLUSTER-web
[0:0] -A DOCKER -i docker0 -j RETURN
[5:300] -A IPCLUSTER-web -s 0.0.0.0/0.0.0.1 -d 127.0.0.1/32 -p tcp -m tcp --dport 8080 -m comment --comment "ipcluster:web:0:0/2:shift=0" -j REDIRECT --to-ports 20000
[7:420] -A IPCLUSTER-web -s 0.0.0.1/0.0.0.1 -d 127.0.0.1/32 -p tcp -m tcp --dport 8080 -m comment --comment "ipcluster:web:0:1/2:shift=0" -j REDIRECT --to-ports 20001
[0:0] -A IPCLUSTER-web -p tcp -m tcp --dport 9 -m comment --comment "added by hand" -j REDIRECT --to-ports 1
[0:0] -A IPCLUSTER-web -p tcp -m addrtype --dst-type LOCAL -m tcp --dport 443 -m comment --comment "ipcluster:web:1:0/1:shift=0" -j REDIRECT --to-ports 20002
COMMIT
# Completed on Fri Nov 27 22:50:28 2026
"#;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn parses_our_rules_and_ignores_foreign_ones() {
        let state = parse_nat(SAVED_V4, Family::V4, "IPCLUSTER-web", "web");
        assert!(state.chain_exists);
        assert_eq!(state.packets, 12);
        assert_eq!(
            state.jumps,
            vec![
                "-A PREROUTING -p tcp -m comment --comment \"ipcluster:web\" -j IPCLUSTER-web",
                "-A OUTPUT -d 127.0.0.1/32 -p tcp -m comment --comment \"ipcluster:web\" -j IPCLUSTER-web",
            ]
        );
        assert!(state.other_clusters.is_empty());
        let table = table_from_rules("IPCLUSTER-web", &state.band_rules)
            .expect("table")
            .expect("some table");
        assert_eq!(
            table,
            SteeringTable {
                band_shift: 0,
                services: vec![
                    ServiceRoute {
                        listen: addr("127.0.0.1:8080"),
                        worker_ports: vec![20000, 20001]
                    },
                    ServiceRoute {
                        listen: addr("0.0.0.0:443"),
                        worker_ports: vec![20002]
                    },
                ],
            }
        );
    }

    #[test]
    fn missing_chain_reads_as_nothing() {
        let state = parse_nat(SAVED_V4, Family::V4, "IPCLUSTER-other", "other");
        assert_eq!(state, NatState::default());
        assert_eq!(
            table_from_rules("IPCLUSTER-other", &state.band_rules),
            Ok(None)
        );
        let empty = "*nat\n:PREROUTING ACCEPT [0:0]\n:IPCLUSTER-x - [0:0]\nCOMMIT\n";
        let state = parse_nat(empty, Family::V4, "IPCLUSTER-x", "x");
        assert!(state.chain_exists && state.band_rules.is_empty());
    }

    #[test]
    fn another_clusters_rules_in_our_chain_are_reported() {
        let state = parse_nat(SAVED_V4, Family::V4, "IPCLUSTER-web", "web2");
        assert_eq!(state.other_clusters, vec!["web".to_owned()]);
        assert!(state.band_rules.is_empty());
    }

    #[test]
    fn round_trip_of_generated_rules_v4_and_v6() {
        for (listens, shift, bands) in [
            (vec![addr("127.0.0.1:8080")], 0u8, 8usize),
            (vec![addr("0.0.0.0:80"), addr("10.0.0.1:443")], 8, 4),
            (vec![addr("[::1]:8080")], 0, 4),
            (vec![addr("[::]:80"), addr("[2001:db8::1]:443")], 16, 2),
            (vec![addr("[::1]:80")], 0, 1),
        ] {
            let ports: Vec<Vec<u16>> = (0..listens.len())
                .map(|s| (0..bands).map(|b| 20000 + (s * 100 + b) as u16).collect())
                .collect();
            let table = SteeringTable::uniform(&listens, shift, &ports);
            let family = Family::of(listens[0].ip());
            let mut saved = String::from("*nat\n:IPCLUSTER-c - [0:0]\n");
            for rule in band_rules(&table, family) {
                saved += &format!("[0:0] {}\n", band_rule_line("IPCLUSTER-c", "c", &rule));
            }
            for jump in jump_lines("IPCLUSTER-c", "c", family, &listens) {
                saved += &format!("[0:0] {jump}\n");
            }
            saved += "COMMIT\n";
            let state = parse_nat(&saved, family, "IPCLUSTER-c", "c");
            assert_eq!(
                state.jumps,
                jump_lines("IPCLUSTER-c", "c", family, &listens)
            );
            let back = table_from_rules("IPCLUSTER-c", &state.band_rules).expect("table");
            assert_eq!(back, Some(table), "{listens:?} shift {shift} bands {bands}");
        }
    }

    #[test]
    fn parses_what_ip6tables_save_prints_for_v6_masks() {
        // ip6tables-save prints `::1:0` as `::0.1.0.0` (IPv4-compatible form).
        let saved = r#"*nat
:IPCLUSTER-c - [0:0]
-A IPCLUSTER-c -s ::/::0.3.0.0 -d ::1/128 -p tcp -m tcp --dport 80 -m comment --comment "ipcluster:c:0:0/4:shift=16" -j REDIRECT --to-ports 1000
-A IPCLUSTER-c -s ::0.1.0.0/::0.3.0.0 -d ::1/128 -p tcp -m tcp --dport 80 -m comment --comment "ipcluster:c:0:1/4:shift=16" -j REDIRECT --to-ports 1001
-A IPCLUSTER-c -s ::0.2.0.0/::0.3.0.0 -d ::1/128 -p tcp -m tcp --dport 80 -m comment --comment "ipcluster:c:0:2/4:shift=16" -j REDIRECT --to-ports 1002
-A IPCLUSTER-c -s ::3:0/::3:0 -d ::1/128 -p tcp -m tcp --dport 80 -m comment --comment "ipcluster:c:0:3/4:shift=16" -j REDIRECT --to-ports 1003
COMMIT
"#;
        let state = parse_nat(saved, Family::V6, "IPCLUSTER-c", "c");
        let table = table_from_rules("IPCLUSTER-c", &state.band_rules).expect("table");
        assert_eq!(
            table,
            Some(SteeringTable::uniform(
                &[addr("[::1]:80")],
                16,
                &[vec![1000, 1001, 1002, 1003]]
            ))
        );
    }

    #[test]
    fn prefix_masks_are_understood() {
        assert_eq!(
            source_match("0.0.0.0/31", Family::V4),
            Some((
                "0.0.0.0".parse().expect("ip"),
                "255.255.255.254".parse().expect("ip")
            ))
        );
        assert_eq!(
            source_match("::/127", Family::V6).map(|(_, m)| m),
            Some(
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe"
                    .parse()
                    .expect("ip")
            )
        );
        assert_eq!(source_match("::/1", Family::V4), None);
    }

    #[test]
    fn tampered_rules_are_errors_not_guesses() {
        let base = "*nat\n:C - [0:0]\n";
        let cases = [
            // Source match of band 0 under the comment of band 1.
            "-A C -s 0.0.0.0/0.0.0.1 -d 127.0.0.1/32 -p tcp -m tcp --dport 80 -m comment --comment \"ipcluster:c:0:1/2:shift=0\" -j REDIRECT --to-ports 9",
            "-A C -s 0.0.0.1/0.0.0.1 -d 127.0.0.1/32 -p tcp -m tcp --dport 80 -m comment --comment \"ipcluster:c:0:1/2:shift=0\" -j DNAT --to-destination 1.2.3.4",
            "-A C -s 0.0.0.1/0.0.0.1 -d 127.0.0.0/8 -p tcp -m tcp --dport 80 -m comment --comment \"ipcluster:c:0:1/2:shift=0\" -j REDIRECT --to-ports 9",
            "-A C -s 0.0.0.1/0.0.0.1 -d 127.0.0.1/32 -p tcp -m tcp --dport 80 -m comment --comment \"ipcluster:c:0:1/3:shift=0\" -j REDIRECT --to-ports 9",
        ];
        for case in cases {
            let text = format!("{base}{case}\nCOMMIT\n");
            let state = parse_nat(&text, Family::V4, "C", "c");
            assert!(
                matches!(state.damaged[..], [ParseError::Rule { .. }])
                    && state.band_rules.is_empty(),
                "{case}: {state:?}"
            );
        }
        let state = parse_nat(
            "*nat\n-A C -m comment --comment \"oops\n-A OTHER -m comment --comment \"x\n",
            Family::V4,
            "C",
            "c",
        );
        assert!(
            matches!(state.damaged[..], [ParseError::Quotes(_)]),
            "{state:?}"
        );
    }

    #[test]
    fn incomplete_or_inconsistent_tables_are_errors() {
        let rule = |service, band, bands, shift| BandRule {
            service,
            listen: addr("127.0.0.1:80"),
            band,
            bands,
            shift,
            worker_port: 9000 + band as u16,
        };
        let missing_band = [rule(0, 0, 2, 0)];
        let twice = [rule(0, 0, 1, 0), rule(0, 0, 1, 0)];
        let shifts = [rule(0, 0, 1, 0), rule(1, 0, 1, 4)];
        let gap = [rule(1, 0, 1, 0)];
        for rules in [&missing_band[..], &twice, &shifts, &gap] {
            assert!(
                matches!(table_from_rules("C", rules), Err(ParseError::Table { .. })),
                "{rules:?}"
            );
        }
    }

    #[test]
    fn tokenizer_handles_quotes_and_escapes() {
        assert_eq!(
            tokenize(r#"-A C -m comment --comment "a \"b\" c" -j X"#).expect("tokens"),
            vec![
                "-A",
                "C",
                "-m",
                "comment",
                "--comment",
                "a \"b\" c",
                "-j",
                "X"
            ]
        );
        assert_eq!(
            tokenize(r#"--comment """#).expect("tokens"),
            vec!["--comment", ""]
        );
    }
}
