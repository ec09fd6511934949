//! The cluster's BPF maps as typed handles, and the translation between a
//! [`SteeringTable`] and the double-buffered `steering` array.
//!
//! Publishing writes the idle slot (worker ports, the idle band shape of each
//! service, the worker-port index for egress) and then flips `active` with one
//! 4-byte write, so every band of every service switches at the same instant.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use aya::Ebpf;
use aya::Pod;
use aya::maps::{Array, HashMap, IterableMap as _, Map, MapData, MapError, PerCpuArray};
use ipcluster_common::{ACTIVE_PUBLISHED, HISTORY, history_index};
use ipcluster_common::{
    BandShape, COUNTER_COUNT, Counter, FAMILY_V4, FAMILY_V6, FlowKey, FlowValue, MAX_BANDS,
    MAX_SERVICES, MAX_WORKER_PORTS, META_INDEX, Meta, PORT_KIND_PUBLIC, PORT_KIND_WORKER,
    ServiceKey, ServiceValue, WorkerPortValue, map_names, port_bit, steering_index,
};

use super::{batch, bpf_error};
use crate::steering::{Counters, ServiceRoute, SteeringError, SteeringTable};

/// Typed handles on every map of one cluster. The sk-lookup backend uses
/// the same steering-table maps without the tc object's own (`tc: None`).
pub struct SteeringMaps {
    meta: Array<MapData, Meta>,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    steering: Array<MapData, u32>,
    active: Array<MapData, u32>,
    tc: Option<TcMaps>,
}

/// The maps only the tc programs use.
struct TcMaps {
    flows: HashMap<MapData, FlowKey, FlowValue>,
    worker_ports: HashMap<MapData, u32, WorkerPortValue>,
    counters: PerCpuArray<MapData, u64>,
    ports: Array<MapData, u32>,
    history: Array<MapData, u32>,
    history_shapes: Array<MapData, BandShape>,
}

fn map_err(what: impl Into<String>) -> impl FnOnce(MapError) -> SteeringError {
    let what = what.into();
    move |e| bpf_error(what, e)
}

impl SteeringMaps {
    /// Open the maps pinned in `dir` (the layout must have been checked).
    pub fn open_pinned(dir: &Path) -> Result<Self, SteeringError> {
        let open = |name: &str| -> Result<Map, SteeringError> {
            let path = dir.join(name);
            let data = MapData::from_pin(&path)
                .map_err(map_err(format!("opening pinned map {}", path.display())))?;
            Map::from_map_data(data).map_err(map_err(format!("map {}", path.display())))
        };
        Self::from_maps(|name| open(name), true)
    }

    /// Open only the steering-table maps pinned in `dir` (sk-lookup backend).
    pub fn open_pinned_table(dir: &Path) -> Result<Self, SteeringError> {
        let open = |name: &str| -> Result<Map, SteeringError> {
            let path = dir.join(name);
            let data = MapData::from_pin(&path)
                .map_err(map_err(format!("opening pinned map {}", path.display())))?;
            Map::from_map_data(data).map_err(map_err(format!("map {}", path.display())))
        };
        Self::from_maps(|name| open(name), false)
    }

    /// Take only the steering-table maps out of a loaded object (sk-lookup backend).
    pub fn take_table_from(ebpf: &mut Ebpf) -> Result<Self, SteeringError> {
        Self::from_maps(
            |name| {
                ebpf.take_map(name).ok_or_else(|| {
                    SteeringError::Ebpf(format!("the eBPF object has no map named {name}"))
                })
            },
            false,
        )
    }

    /// Take the maps out of a loaded object (its programs keep using them).
    pub fn take_from(ebpf: &mut Ebpf) -> Result<Self, SteeringError> {
        Self::from_maps(
            |name| {
                ebpf.take_map(name).ok_or_else(|| {
                    SteeringError::Ebpf(format!("the eBPF object has no map named {name}"))
                })
            },
            true,
        )
    }

    fn from_maps(
        mut take: impl FnMut(&str) -> Result<Map, SteeringError>,
        with_tc: bool,
    ) -> Result<Self, SteeringError> {
        let typed = |name: &str| map_err(format!("map {name} has an unexpected type or layout"));
        Ok(SteeringMaps {
            meta: Array::try_from(take(map_names::META)?).map_err(typed(map_names::META))?,
            services: HashMap::try_from(take(map_names::SERVICES)?)
                .map_err(typed(map_names::SERVICES))?,
            steering: Array::try_from(take(map_names::STEERING)?)
                .map_err(typed(map_names::STEERING))?,
            active: Array::try_from(take(map_names::ACTIVE)?).map_err(typed(map_names::ACTIVE))?,
            tc: if with_tc {
                Some(TcMaps {
                    flows: HashMap::try_from(take(map_names::FLOWS)?)
                        .map_err(typed(map_names::FLOWS))?,
                    worker_ports: HashMap::try_from(take(map_names::WORKER_PORTS)?)
                        .map_err(typed(map_names::WORKER_PORTS))?,
                    counters: PerCpuArray::try_from(take(map_names::COUNTERS)?)
                        .map_err(typed(map_names::COUNTERS))?,
                    ports: Array::try_from(take(map_names::PORTS)?)
                        .map_err(typed(map_names::PORTS))?,
                    history: Array::try_from(take(map_names::HISTORY)?)
                        .map_err(typed(map_names::HISTORY))?,
                    history_shapes: Array::try_from(take(map_names::HISTORY_SHAPES)?)
                        .map_err(typed(map_names::HISTORY_SHAPES))?,
                })
            } else {
                None
            },
        })
    }

    pub fn meta(&self) -> Result<Meta, SteeringError> {
        self.meta
            .get(&META_INDEX, 0)
            .map_err(map_err("reading the meta map"))
    }

    pub fn write_meta(&mut self, meta: Meta) -> Result<(), SteeringError> {
        self.meta
            .set(META_INDEX, meta, 0)
            .map_err(map_err("writing the meta map"))
    }

    /// The slot the programs read now (0 or 1).
    pub fn active_slot(&self) -> Result<u32, SteeringError> {
        Ok(self
            .active
            .get(&0, 0)
            .map_err(map_err("reading the active slot"))?
            & 1)
    }

    fn all_services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, SteeringError> {
        self.services
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err("reading the services map"))
    }

    /// The table of the active slot, `None` when nothing was published.
    pub fn read_table(&self) -> Result<Option<SteeringTable>, SteeringError> {
        let slot = self.active_slot()?;
        let mut routes: Vec<(u32, u32, ServiceRoute)> = Vec::new();
        for (key, value) in self.all_services()? {
            let shape = value.shapes[slot as usize];
            if shape.present == 0 {
                continue;
            }
            let bands = shape.band_mask.saturating_add(1);
            if bands > MAX_BANDS || value.index >= MAX_SERVICES {
                return Err(SteeringError::Ebpf(format!(
                    "the services map holds a damaged entry for {key:?}: {value:?}"
                )));
            }
            let worker_ports = (0..bands)
                .map(|band| {
                    let index = steering_index(slot, value.index, band);
                    self.steering
                        .get(&index, 0)
                        .map(|port| port as u16)
                        .map_err(map_err(format!("reading steering entry {index}")))
                })
                .collect::<Result<Vec<u16>, _>>()?;
            routes.push((
                shape.position,
                shape.band_shift,
                ServiceRoute {
                    listen: listen_of(&key)?,
                    worker_ports,
                },
            ));
        }
        routes.sort_by_key(|(position, _, _)| *position);
        let Some(&(_, band_shift, _)) = routes.first() else {
            return Ok(None);
        };
        Ok(Some(SteeringTable {
            band_shift: band_shift as u8,
            services: routes.into_iter().map(|(_, _, route)| route).collect(),
        }))
    }

    /// Write `table` into the idle slot and flip `active` to it. On error the
    /// active slot (the table in force) is untouched.
    pub fn publish(&mut self, table: &SteeringTable) -> Result<(), SteeringError> {
        table.validate()?;
        check_worker_ports(table)?;
        let active = self.active_slot()?;
        let idle = 1 - active;
        let existing: BTreeMap<ServiceKey, ServiceValue> =
            self.all_services()?.into_iter().collect();
        let keys: Vec<ServiceKey> = table
            .services
            .iter()
            .map(|s| service_key(s.listen))
            .collect();

        // Service indices are stable: a service keeps its index across
        // generations (the active slot uses it), a new one takes a free index.
        // Entries in neither the new table nor the active slot only make room.
        let in_use: BTreeSet<ServiceKey> = existing
            .iter()
            .filter(|(k, v)| keys.contains(k) || v.shapes[active as usize].present != 0)
            .map(|(k, _)| *k)
            .chain(keys.iter().copied())
            .collect();
        if in_use.len() > MAX_SERVICES as usize {
            return Err(SteeringError::OverCapacity {
                what: "services of the new table and of the table in force".into(),
                count: in_use.len(),
                capacity: MAX_SERVICES,
            });
        }
        let mut evictable: Vec<ServiceKey> = existing
            .keys()
            .filter(|k| !in_use.contains(k))
            .copied()
            .collect();
        let mut taken: BTreeSet<u32> = existing
            .iter()
            .filter(|(k, _)| in_use.contains(k))
            .map(|(_, v)| v.index)
            .collect();
        let mut values: Vec<ServiceValue> = Vec::with_capacity(keys.len());
        for key in &keys {
            let value = match existing.get(key) {
                Some(v) => *v,
                None => {
                    let free = (0..MAX_SERVICES).find(|i| !taken.contains(i));
                    let free_unused_by_stale = (0..MAX_SERVICES).find(|i| {
                        !taken.contains(i)
                            && !existing
                                .iter()
                                .any(|(k, v)| v.index == *i && evictable.contains(k))
                    });
                    // Prefer an index no leftover entry holds; otherwise reuse
                    // a leftover's index and remove that entry.
                    let index = free_unused_by_stale.or(free).ok_or_else(|| {
                        SteeringError::OverCapacity {
                            what: "service indices".into(),
                            count: taken.len() + 1,
                            capacity: MAX_SERVICES,
                        }
                    })?;
                    taken.insert(index);
                    ServiceValue {
                        index,
                        ..ServiceValue::default()
                    }
                }
            };
            values.push(value);
        }
        // Leftovers whose index is now reused must go; the others stay (their
        // flows keep being steered) unless the hash map is full.
        let reused: Vec<ServiceKey> = evictable
            .iter()
            .filter(|k| existing.get(k).is_some_and(|v| taken.contains(&v.index)))
            .copied()
            .collect();
        let room = MAX_SERVICES as usize - in_use.len();
        let stale_kept = evictable.len() - reused.len();
        let mut remove: Vec<ServiceKey> = reused;
        if stale_kept > room {
            evictable.retain(|k| !remove.contains(k));
            remove.extend(evictable.iter().take(stale_kept - room));
        }
        for key in &remove {
            self.services
                .remove(key)
                .map_err(map_err(format!("removing stale service {key:?}")))?;
        }

        // The port bitmap first (tc maps): a set bit only sends packets on to
        // the lookups below, which decide.
        if let Some(tc) = &mut self.tc {
            let mut words: BTreeMap<u32, u32> = BTreeMap::new();
            for route in &table.services {
                let (index, bit) = port_bit(PORT_KIND_PUBLIC, route.listen.port());
                *words.entry(index).or_default() |= bit;
                for &port in &route.worker_ports {
                    let (index, bit) = port_bit(PORT_KIND_WORKER, port);
                    *words.entry(index).or_default() |= bit;
                }
            }
            for (index, bits) in words {
                tc.mark_ports(index, bits)?;
            }
        }
        // The idle slot: worker ports first, then the worker-port index, then
        // the band shapes; nothing here is read before the flip.
        // Each map is written by one batch call where the kernel has them,
        // else (and for what a failed batch left) entry by entry.
        let mut steering: Vec<(u32, u32)> = Vec::new();
        let mut worker_ports: Vec<(u32, WorkerPortValue)> = Vec::new();
        for (route, value) in table.services.iter().zip(&values) {
            for (band, &port) in route.worker_ports.iter().enumerate() {
                steering.push((
                    steering_index(idle, value.index, band as u32),
                    u32::from(port),
                ));
                worker_ports.push((
                    u32::from(port),
                    WorkerPortValue {
                        service: value.index as u16,
                        public_port: route.listen.port(),
                    },
                ));
            }
        }
        let rest = batch_rest(self.steering.map(), &steering);
        for &(index, port) in rest {
            self.steering
                .set(index, port, 0)
                .map_err(map_err(format!("writing steering entry {index}")))?;
        }
        if let Some(tc) = &self.tc {
            let rest = batch_rest(tc.worker_ports.map(), &worker_ports);
            for &(port, entry) in rest {
                let Some(tc) = &mut self.tc else { continue };
                if tc.worker_ports.insert(port, entry, 0).is_err() {
                    // Full: forget ports nothing uses any more, then retry.
                    let live = self.live_worker_ports()?;
                    let Some(tc) = &mut self.tc else { continue };
                    tc.collect_worker_ports(&live);
                    tc.worker_ports
                        .insert(port, entry, 0)
                        .map_err(map_err(format!(
                            "recording worker port {port} (the map holds {MAX_WORKER_PORTS})"
                        )))?;
                }
            }
        }
        for (position, ((route, key), value)) in
            table.services.iter().zip(&keys).zip(&values).enumerate()
        {
            let mut value = *value;
            value.shapes[idle as usize] = BandShape {
                band_mask: route.worker_ports.len() as u32 - 1,
                band_shift: u32::from(table.band_shift),
                present: 1,
                position: position as u32,
            };
            self.services
                .insert(key, value, 0)
                .map_err(map_err(format!("writing service {}", route.listen)))?;
        }
        for (key, value) in &existing {
            if keys.contains(key)
                || remove.contains(key)
                || value.shapes[idle as usize].present == 0
            {
                continue;
            }
            let mut value = *value;
            value.shapes[idle as usize] = BandShape::default();
            self.services
                .insert(key, value, 0)
                .map_err(map_err(format!("clearing the idle slot of {key:?}")))?;
        }

        self.remember(table, &values)?;

        // The flip: one 4-byte write switches every band at once.
        self.active
            .set(0, idle, 0)
            .map_err(map_err("flipping the active slot"))
    }

    /// Count `table` as published (entry [`ACTIVE_PUBLISHED`] of `active`,
    /// kept by every backend) and, with the tc maps, write it as the newest
    /// remembered table first (the evicted-flow fallback looks for a
    /// connection's worker in every one of them).
    fn remember(
        &mut self,
        table: &SteeringTable,
        values: &[ServiceValue],
    ) -> Result<(), SteeringError> {
        let published = self
            .active
            .get(&ACTIVE_PUBLISHED, 0)
            .map_err(map_err("reading the publish count"))?;
        if let Some(tc) = &mut self.tc {
            tc.remember(published % HISTORY, table, values)?;
        }
        self.active
            .set(ACTIVE_PUBLISHED, published.wrapping_add(1), 0)
            .map_err(map_err("counting the publish"))
    }

    /// Every worker port either slot of the table uses.
    fn live_worker_ports(&self) -> Result<BTreeSet<u32>, SteeringError> {
        let mut live: BTreeSet<u32> = BTreeSet::new();
        for (_, value) in self.all_services()? {
            for (slot, shape) in value.shapes.iter().enumerate() {
                if shape.present == 0 {
                    continue;
                }
                for band in 0..=shape.band_mask.min(MAX_BANDS - 1) {
                    let index = steering_index(slot as u32, value.index, band);
                    let port = self
                        .steering
                        .get(&index, 0)
                        .map_err(map_err(format!("reading steering entry {index}")))?;
                    live.insert(port);
                }
            }
        }
        Ok(live)
    }

    /// Packet counters summed over CPUs (zeros without the tc maps).
    pub fn counters(&self) -> Result<Counters, SteeringError> {
        let Some(tc) = &self.tc else {
            return Ok(Counters::default());
        };
        let mut sums = [0u64; COUNTER_COUNT as usize];
        for counter in Counter::ALL {
            let values = tc
                .counters
                .get(&(counter as u32), 0)
                .map_err(map_err(format!("reading counter {}", counter.name())))?;
            sums[counter as usize] = values.iter().sum();
        }
        Ok(Counters {
            steered: sums[Counter::Steered as usize],
            new_flows: sums[Counter::NewFlows as usize],
            flow_hits: sums[Counter::FlowHits as usize],
            table_misses: sums[Counter::TableMisses as usize],
            egress_rewrites: sums[Counter::EgressRewrites as usize],
            passed: sums[Counter::Passed as usize],
            flow_fallbacks: sums[Counter::FlowFallbacks as usize],
            refused_hijacks: sums[Counter::RefusedHijacks as usize],
            forwarded: sums[Counter::Forwarded as usize],
            icmp_translated: sums[Counter::IcmpTranslated as usize],
            ..Counters::default()
        })
    }

    /// Every recorded flow (for diagnostics and tests).
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowValue)>, SteeringError> {
        let Some(tc) = &self.tc else {
            return Ok(Vec::new());
        };
        tc.flows
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err("reading the flow table"))
    }
}

impl TcMaps {
    /// Forget worker ports that neither slot uses (`live`) and no flow refers
    /// to (run when the map is full). Ports of older generations stay while
    /// their connections live: egress needs them to restore the public port.
    fn collect_worker_ports(&mut self, live: &BTreeSet<u32>) {
        let stale: Vec<u32> = self
            .worker_ports
            .keys()
            .filter_map(Result::ok)
            .filter(|port| !live.contains(port))
            .collect();
        let referenced: BTreeSet<u32> = self
            .flows
            .iter()
            .filter_map(Result::ok)
            .map(|(_, flow)| u32::from(flow.worker_port))
            .collect();
        for port in stale.iter().filter(|p| !referenced.contains(p)) {
            // Gone already is fine: only the map's size matters here.
            let _ = self.worker_ports.remove(port);
        }
    }

    /// Write `table` at `position` of the `history` maps.
    fn remember(
        &mut self,
        position: u32,
        table: &SteeringTable,
        values: &[ServiceValue],
    ) -> Result<(), SteeringError> {
        let mut shapes = [BandShape::default(); MAX_SERVICES as usize];
        let mut history: Vec<(u32, u32)> = Vec::new();
        for (position_in_table, (route, value)) in table.services.iter().zip(values).enumerate() {
            for (band, &port) in route.worker_ports.iter().enumerate() {
                history.push((
                    history_index(position, value.index, band as u32),
                    u32::from(port),
                ));
            }
            if let Some(shape) = shapes.get_mut(value.index as usize) {
                *shape = BandShape {
                    band_mask: route.worker_ports.len() as u32 - 1,
                    band_shift: u32::from(table.band_shift),
                    present: 1,
                    position: position_in_table as u32,
                };
            }
        }
        for &(index, port) in batch_rest(self.history.map(), &history) {
            self.history
                .set(index, port, 0)
                .map_err(map_err(format!("writing history entry {index}")))?;
        }
        let shapes: Vec<(u32, BandShape)> = shapes
            .iter()
            .enumerate()
            .map(|(index, shape)| (position * MAX_SERVICES + index as u32, *shape))
            .collect();
        for &(at, shape) in batch_rest(self.history_shapes.map(), &shapes) {
            self.history_shapes
                .set(at, shape, 0)
                .map_err(map_err(format!("writing history shape {at}")))?;
        }
        Ok(())
    }

    /// Set `bits` in word `index` of the `ports` bitmap (bits are never
    /// cleared: a stale bit costs a hash lookup, a missing one a connection).
    /// One read per word, and a write only when a bit is new.
    fn mark_ports(&mut self, index: u32, bit: u32) -> Result<(), SteeringError> {
        let word = self
            .ports
            .get(&index, 0)
            .map_err(map_err(format!("reading the port bitmap entry {index}")))?;
        if word & bit != bit {
            self.ports
                .set(index, word | bit, 0)
                .map_err(map_err(format!("writing the port bitmap entry {index}")))?;
        }
        Ok(())
    }
}

/// Write `entries` with one batch call; what it did not write (everything
/// when the kernel has no batch updates for this map) is left to the caller,
/// which writes it entry by entry and reports errors entry by entry.
fn batch_rest<'a, K: Pod, V: Pod>(map: &MapData, entries: &'a [(K, V)]) -> &'a [(K, V)] {
    match batch::update(map, entries) {
        Ok(()) => &[],
        Err((e, written)) => {
            log::debug!(
                "batch update of {} map entries stopped after {written}: {e}; writing the rest one by one",
                entries.len()
            );
            &entries[written..]
        }
    }
}

/// A worker port may serve one public port only: egress finds the public
/// port (and so the flow) from the worker port alone.
fn check_worker_ports(table: &SteeringTable) -> Result<(), SteeringError> {
    let mut public_of: BTreeMap<u16, u16> = BTreeMap::new();
    for route in &table.services {
        for &port in &route.worker_ports {
            let public = route.listen.port();
            if let Some(&other) = public_of.get(&port)
                && other != public
            {
                return Err(SteeringError::Ebpf(format!(
                    "worker port {port} serves both public port {other} and {public}; \
                     a worker port can stand for one public port only"
                )));
            }
            public_of.insert(port, public);
        }
    }
    Ok(())
}

/// The `services` key of a listen address (wildcards have an all-zero address).
pub fn service_key(listen: SocketAddr) -> ServiceKey {
    let mut addr = [0u8; 16];
    let family = match listen.ip() {
        IpAddr::V4(v4) => {
            addr[..4].copy_from_slice(&v4.octets());
            FAMILY_V4
        }
        IpAddr::V6(v6) => {
            addr = v6.octets();
            FAMILY_V6
        }
    };
    ServiceKey {
        addr,
        port: listen.port(),
        family,
    }
}

fn listen_of(key: &ServiceKey) -> Result<SocketAddr, SteeringError> {
    let ip = match key.family {
        FAMILY_V4 => IpAddr::V4(Ipv4Addr::new(
            key.addr[0],
            key.addr[1],
            key.addr[2],
            key.addr[3],
        )),
        FAMILY_V6 => IpAddr::V6(Ipv6Addr::from(key.addr)),
        other => {
            return Err(SteeringError::Ebpf(format!(
                "the services map holds an entry of unknown family {other}"
            )));
        }
    };
    Ok(SocketAddr::new(ip, key.port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_keys_round_trip() {
        for s in ["127.0.0.1:8080", "0.0.0.0:80", "[::1]:443", "[::]:8443"] {
            let listen: SocketAddr = s.parse().expect("address");
            assert_eq!(listen_of(&service_key(listen)).expect("listen"), listen);
        }
        let wildcard = service_key("0.0.0.0:80".parse().expect("address"));
        assert_eq!(wildcard.addr, [0; 16]);
        assert_eq!(wildcard.family, FAMILY_V4);
    }

    #[test]
    fn a_worker_port_serves_one_public_port() {
        let a: SocketAddr = "127.0.0.1:8080".parse().expect("address");
        let b: SocketAddr = "[::1]:8080".parse().expect("address");
        let c: SocketAddr = "127.0.0.1:8081".parse().expect("address");
        let shared = SteeringTable::uniform(&[a, b], 0, &[vec![9000], vec![9000]]);
        assert!(check_worker_ports(&shared).is_ok());
        let clash = SteeringTable::uniform(&[a, c], 0, &[vec![9000], vec![9000]]);
        assert!(check_worker_ports(&clash).is_err());
    }
}
