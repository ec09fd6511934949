//! When a generation's steering table is published, and what it holds. Pure:
//! the master passes what it knows about the new workers and the table found
//! at start-up.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::steering::{SteeringTable, TableError};

/// The shape of a generation: its services, band shift and band count.
#[derive(Clone, Debug)]
pub struct Shape<'a> {
    pub listens: &'a [SocketAddr],
    pub band_shift: u8,
    pub bands: u32,
}

impl Shape<'_> {
    /// `table` has this shape, so its bands can stand in for ours.
    pub fn fits(&self, table: &SteeringTable) -> bool {
        table.bands() == self.bands as usize
            && table.band_shift == self.band_shift
            && table.services.len() == self.listens.len()
            && table
                .services
                .iter()
                .zip(self.listens)
                .all(|(s, l)| s.listen == *l)
    }
}

/// The table to publish now, if it is time:
/// - every band has a ready new worker: all of them;
/// - with a `previous` table of the same shape, every band is ready or has
///   failed at least once: ready bands get their new worker, the others keep
///   the previous worker (replaced later, one band at a time);
/// - otherwise: not yet (`None`).
///
/// `ready` maps a band to its new worker's port for each service.
pub fn table_to_publish(
    shape: &Shape<'_>,
    ready: &BTreeMap<u32, Vec<u16>>,
    has_failed: impl Fn(u32) -> bool,
    previous: Option<&SteeringTable>,
) -> Result<Option<SteeringTable>, TableError> {
    let all_ready = (0..shape.bands).all(|b| ready.contains_key(&b));
    let mut table = if all_ready {
        SteeringTable::uniform(
            shape.listens,
            shape.band_shift,
            &vec![vec![0; shape.bands as usize]; shape.listens.len()],
        )
    } else {
        match previous.filter(|p| shape.fits(p)) {
            Some(previous) if (0..shape.bands).all(|b| ready.contains_key(&b) || has_failed(b)) => {
                previous.clone()
            }
            _ => return Ok(None),
        }
    };
    for (&band, ports) in ready {
        for (service, &port) in ports.iter().enumerate() {
            table.set_band(service, band, port)?;
        }
    }
    table.validate()?;
    Ok(Some(table))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listens() -> Vec<SocketAddr> {
        vec!["127.0.0.1:8080".parse().expect("addr")]
    }

    fn ready(pairs: &[(u32, u16)]) -> BTreeMap<u32, Vec<u16>> {
        pairs.iter().map(|&(b, p)| (b, vec![p])).collect()
    }

    #[test]
    fn first_generation_waits_for_every_band() {
        let l = listens();
        let shape = Shape {
            listens: &l,
            band_shift: 0,
            bands: 2,
        };
        let never_failed = |_| false;
        let always_failed = |_| true;
        assert_eq!(
            table_to_publish(&shape, &ready(&[(0, 20000)]), never_failed, None),
            Ok(None)
        );
        // Without a previous table, failures do not help: there is nothing to keep.
        assert_eq!(
            table_to_publish(&shape, &ready(&[(0, 20000)]), always_failed, None),
            Ok(None)
        );
        let t = table_to_publish(
            &shape,
            &ready(&[(0, 20000), (1, 20001)]),
            never_failed,
            None,
        )
        .expect("valid")
        .expect("published");
        assert_eq!(t.services[0].worker_ports, vec![20000, 20001]);
    }

    #[test]
    fn a_failed_band_keeps_its_previous_worker() {
        let l = listens();
        let shape = Shape {
            listens: &l,
            band_shift: 0,
            bands: 2,
        };
        let previous = SteeringTable::uniform(&l, 0, &[vec![20000, 20001]]);
        let new = ready(&[(0, 20010)]);
        // Band 1 has not failed yet: wait.
        assert_eq!(
            table_to_publish(&shape, &new, |_| false, Some(&previous)),
            Ok(None)
        );
        let t = table_to_publish(&shape, &new, |b| b == 1, Some(&previous))
            .expect("valid")
            .expect("published");
        assert_eq!(t.services[0].worker_ports, vec![20010, 20001]);
    }

    #[test]
    fn a_previous_table_of_another_shape_is_not_used() {
        let l = listens();
        let shape = Shape {
            listens: &l,
            band_shift: 0,
            bands: 4,
        };
        let previous = SteeringTable::uniform(&l, 0, &[vec![20000, 20001]]);
        assert!(!shape.fits(&previous));
        assert_eq!(
            table_to_publish(&shape, &ready(&[(0, 1), (1, 2)]), |_| true, Some(&previous)),
            Ok(None)
        );
        let shifted = SteeringTable::uniform(&l, 8, &[vec![1, 2, 3, 4]]);
        assert!(!shape.fits(&shifted));
    }

    #[test]
    fn two_services_get_their_own_ports() {
        let l: Vec<SocketAddr> = vec![
            "127.0.0.1:8080".parse().expect("addr"),
            "[::1]:8443".parse().expect("addr"),
        ];
        let shape = Shape {
            listens: &l,
            band_shift: 0,
            bands: 1,
        };
        let ready: BTreeMap<u32, Vec<u16>> = BTreeMap::from([(0, vec![20000, 20001])]);
        let t = table_to_publish(&shape, &ready, |_| false, None)
            .expect("valid")
            .expect("published");
        assert_eq!(t.services[0].worker_ports, vec![20000]);
        assert_eq!(t.services[1].worker_ports, vec![20001]);
    }
}
