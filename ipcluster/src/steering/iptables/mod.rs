//! The iptables steering backend: for hosts where BPF is not allowed, the
//! original ipcluster's design: nat `REDIRECT` rules that pick the worker by
//! a bitmask of the client's source address.
//!
//! - One nat chain per cluster ([`chain_name`]), jumped to from `PREROUTING`
//!   (clients on other hosts) and `OUTPUT` (clients on this host, restricted
//!   to the listen addresses). One rule per (service, band); IPv6 services
//!   go to `ip6tables`, which is only needed when the config has one
//!   (teardown also looks there when it is installed, and changes nothing
//!   unless it finds this cluster's chain).
//! - `publish` replaces the chain's whole content in one
//!   `iptables-restore --noflush` transaction: every band switches at once,
//!   and a failure leaves the previous table. Established connections keep
//!   their worker through conntrack.
//! - The table lives only in the kernel: each rule's comment carries the
//!   service, band, band count and shift, so `read_table` rebuilds it from
//!   `iptables-save` and a new master continues from what is installed.
//! - Teardown removes only the jumps to our chain and the chain itself.
//! - Counters: `steered` and `new_flows` are both the packet count of the
//!   chain's rules, which in nat is the number of connections redirected since
//!   the last publish (nat sees only a connection's first packet); the
//!   other counters are zero.

mod command;
pub mod rules;
pub mod save;

use std::collections::BTreeSet;

use self::rules::{Family, band_rule_line, band_rules, jump_lines};
use self::save::{NatState, parse_nat, table_from_rules};
use super::{BackendKind, Counters, Steering, SteeringConfig, SteeringError, SteeringTable};

pub use self::rules::chain_name;

pub struct IptablesSteering {
    config: SteeringConfig,
    chain: String,
}

impl IptablesSteering {
    pub fn new(config: SteeringConfig) -> Result<Self, SteeringError> {
        crate::cluster_name::ClusterName::new(&config.cluster)?;
        let chain = chain_name(&config.cluster);
        Ok(Self { config, chain })
    }

    /// The nat chain this cluster's rules live in.
    pub fn chain(&self) -> &str {
        &self.chain
    }

    /// The families the config's services need, IPv4 first.
    fn config_families(&self) -> BTreeSet<Family> {
        self.config
            .services
            .iter()
            .map(|s| Family::of(s.ip()))
            .collect()
    }

    /// Read one family's nat table and pick out this cluster's part.
    fn read_state(&self, family: Family) -> Result<NatState, SteeringError> {
        let saved = command::run(family.save_command(), &["-c", "-t", "nat"], None)?;
        let state = parse_nat(&saved, family, &self.chain, &self.config.cluster);
        if let Some(other) = state.other_clusters.first() {
            return Err(SteeringError::Iptables(format!(
                "nat chain {} holds rules of cluster {other:?}, not {:?}: the shortened chain names collide; \
                 rename one of the clusters",
                self.chain, self.config.cluster
            )));
        }
        Ok(state)
    }

    /// The table in force, from the given families' states.
    fn table_of<'a>(
        &self,
        states: impl IntoIterator<Item = &'a NatState>,
    ) -> Result<Option<SteeringTable>, SteeringError> {
        let states: Vec<&NatState> = states.into_iter().collect();
        if let Some(problem) = states.iter().flat_map(|s| &s.damaged).next() {
            return Err(SteeringError::Iptables(format!(
                "the steering rules of cluster {:?} in nat chain {} were changed by hand: {problem}; \
                 publishing a new table replaces them, `ipcluster stop --name {}` removes them",
                self.config.cluster, self.chain, self.config.cluster
            )));
        }
        let all: Vec<_> = states
            .iter()
            .flat_map(|s| s.band_rules.iter().cloned())
            .collect();
        table_from_rules(&self.chain, &all).map_err(|e| SteeringError::Iptables(e.to_string()))
    }

    fn restore(&self, family: Family, script: &str) -> Result<(), SteeringError> {
        command::run(family.restore_command(), &["--noflush"], Some(script)).map(drop)
    }

    /// The jumps one family needs for `listens`.
    fn wanted_jumps(&self, family: Family, listens: &[std::net::SocketAddr]) -> Vec<String> {
        jump_lines(&self.chain, &self.config.cluster, family, listens)
    }

    /// Make one family's chain hold exactly `table`'s services of that family
    /// (removing chain and jumps when it has none), in one transaction.
    fn publish_family(
        &self,
        family: Family,
        state: &NatState,
        table: &SteeringTable,
    ) -> Result<(), SteeringError> {
        let rules: Vec<String> = band_rules(table, family)
            .iter()
            .map(|rule| band_rule_line(&self.chain, &self.config.cluster, rule))
            .collect();
        let script = if rules.is_empty() {
            match rules::teardown_script(&self.chain, state.chain_exists, &state.jumps) {
                Some(script) => script,
                None => return Ok(()),
            }
        } else {
            let mut listens: Vec<_> = self.config.services.clone();
            listens.extend(table.services.iter().map(|s| s.listen));
            let wanted = self.wanted_jumps(family, &listens);
            rules::publish_script(&self.chain, &rules, &state.jumps, &wanted)
        };
        self.restore(family, &script)
    }

    /// Remove one family's jumps and chain.
    fn teardown_family(&self, family: Family) -> Result<(), SteeringError> {
        let state = self.read_state(family)?;
        match rules::teardown_script(&self.chain, state.chain_exists, &state.jumps) {
            Some(script) => self.restore(family, &script),
            None => Ok(()),
        }
    }
}

impl Steering for IptablesSteering {
    fn kind(&self) -> BackendKind {
        BackendKind::Iptables
    }

    fn install(&mut self) -> Result<Option<SteeringTable>, SteeringError> {
        let mut states = Vec::new();
        for family in self.config_families() {
            let state = self.read_state(family)?;
            let wanted = self.wanted_jumps(family, &self.config.services);
            if let Some(script) =
                rules::install_script(&self.chain, state.chain_exists, &state.jumps, &wanted)
            {
                self.restore(family, &script)?;
            }
            states.push(state);
        }
        self.table_of(&states)
    }

    fn publish(&mut self, table: &SteeringTable) -> Result<(), SteeringError> {
        table.validate()?;
        let mut families = self.config_families();
        families.extend(table.services.iter().map(|s| Family::of(s.listen.ip())));
        let mut states = Vec::new();
        for &family in &families {
            states.push((family, self.read_state(family)?));
        }
        // Only needed to undo a half-done publish; a damaged chain must not
        // stop a publish from replacing it.
        let previous = self.table_of(states.iter().map(|(_, s)| s));
        for (i, (family, state)) in states.iter().enumerate() {
            if let Err(e) = self.publish_family(*family, state, table) {
                // The families already switched go back to the previous table
                // (best effort): a failure must not leave a mix of two tables.
                for (done, _) in &states[..i] {
                    let undo = match &previous {
                        Err(unreadable) => Err(SteeringError::Iptables(unreadable.to_string())),
                        Ok(Some(previous)) => self
                            .read_state(*done)
                            .and_then(|now| self.publish_family(*done, &now, previous)),
                        Ok(None) => self.teardown_family(*done),
                    };
                    if let Err(undo) = undo {
                        log::error!(
                            "iptables: could not restore the previous {done:?} table: {undo}"
                        );
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }

    fn read_table(&self) -> Result<Option<SteeringTable>, SteeringError> {
        let states = self
            .config_families()
            .into_iter()
            .map(|family| self.read_state(family))
            .collect::<Result<Vec<_>, _>>()?;
        self.table_of(&states)
    }

    fn counters(&self) -> Result<Counters, SteeringError> {
        let mut connections = 0;
        for family in self.config_families() {
            connections += self.read_state(family)?.packets;
        }
        Ok(Counters {
            steered: connections,
            new_flows: connections,
            ..Counters::default()
        })
    }

    fn teardown(&mut self) -> Result<(), SteeringError> {
        let needed = self.config_families();
        for family in [Family::V4, Family::V6] {
            match self.teardown_family(family) {
                // A family the config does not use may have no tools at all.
                Err(SteeringError::IptablesMissing { .. }) if !needed.contains(&family) => {}
                other => other?,
            }
        }
        Ok(())
    }
}
