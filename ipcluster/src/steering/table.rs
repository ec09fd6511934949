//! The steering table: for each public service and band, the worker port.
//! Pure data and arithmetic, shared by both backends and the master.

use std::net::{IpAddr, SocketAddr};

use ipcluster_common::{MAX_BANDS, MAX_SERVICES};

/// A band: which worker of a generation owns a client address.
pub type Band = u32;

/// The band of a client address: `(low 32 bits of the address >> shift) & (bands - 1)`.
/// IPv4 addresses are taken as a big-endian `u32`; IPv6 addresses by their last
/// four bytes, so `::ffff:a.b.c.d` lands in the same band as `a.b.c.d`.
pub fn band_of(client: IpAddr, band_shift: u8, bands: u32) -> Band {
    let low32 = match client {
        IpAddr::V4(v4) => u32::from(v4),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            u32::from_be_bytes([o[12], o[13], o[14], o[15]])
        }
    };
    low32.checked_shr(u32::from(band_shift)).unwrap_or(0) & bands.saturating_sub(1)
}

/// One public service (listen address and port) and the worker port of each band.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServiceRoute {
    pub listen: SocketAddr,
    /// `worker_ports[band]`; the length is the number of bands (a power of two).
    pub worker_ports: Vec<u16>,
}

/// A whole generation's steering: every service, every band.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SteeringTable {
    pub band_shift: u8,
    pub services: Vec<ServiceRoute>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TableError {
    #[error("the steering table has no services")]
    NoServices,
    #[error("the steering table has {0} services; at most {MAX_SERVICES} are supported")]
    TooManyServices(usize),
    #[error(
        "service {listen} has {bands} bands; bands must be a power of two between 1 and {MAX_BANDS}"
    )]
    BadBandCount { listen: SocketAddr, bands: usize },
    #[error("service {listen} band {band} has worker port 0")]
    ZeroPort { listen: SocketAddr, band: Band },
    #[error("band shift {0} is too large; it must be below 32")]
    BadShift(u8),
    #[error("service {0} appears twice in the steering table")]
    DuplicateService(SocketAddr),
    #[error("service {listen} has no band {band} (it has {bands})")]
    NoSuchBand {
        listen: SocketAddr,
        band: Band,
        bands: usize,
    },
    #[error("no service with index {0}")]
    NoSuchService(usize),
}

impl SteeringTable {
    /// A table where every service has the same worker port per band
    /// (`ports[band]`), the usual case: one worker serves all public ports.
    pub fn uniform(listens: &[SocketAddr], band_shift: u8, ports_per_service: &[Vec<u16>]) -> Self {
        SteeringTable {
            band_shift,
            services: listens
                .iter()
                .zip(ports_per_service)
                .map(|(listen, ports)| ServiceRoute {
                    listen: *listen,
                    worker_ports: ports.clone(),
                })
                .collect(),
        }
    }

    /// Number of bands of the first service (all services share the worker count).
    pub fn bands(&self) -> usize {
        self.services.first().map_or(0, |s| s.worker_ports.len())
    }

    /// The worker port that a new connection from `client` to service `service` reaches.
    pub fn worker_port_for(&self, service: usize, client: IpAddr) -> Option<u16> {
        let route = self.services.get(service)?;
        let band = band_of(client, self.band_shift, route.worker_ports.len() as u32);
        route.worker_ports.get(band as usize).copied()
    }

    /// Check what both backends require: 1..=MAX_SERVICES distinct services,
    /// a power-of-two band count up to MAX_BANDS, no port 0, shift below 32.
    pub fn validate(&self) -> Result<(), TableError> {
        if self.services.is_empty() {
            return Err(TableError::NoServices);
        }
        if self.services.len() > MAX_SERVICES as usize {
            return Err(TableError::TooManyServices(self.services.len()));
        }
        if self.band_shift >= 32 {
            return Err(TableError::BadShift(self.band_shift));
        }
        for (i, s) in self.services.iter().enumerate() {
            if self.services[..i].iter().any(|o| o.listen == s.listen) {
                return Err(TableError::DuplicateService(s.listen));
            }
            let bands = s.worker_ports.len();
            if bands == 0 || !bands.is_power_of_two() || bands > MAX_BANDS as usize {
                return Err(TableError::BadBandCount {
                    listen: s.listen,
                    bands,
                });
            }
            if let Some(band) = s.worker_ports.iter().position(|&p| p == 0) {
                return Err(TableError::ZeroPort {
                    listen: s.listen,
                    band: band as Band,
                });
            }
        }
        Ok(())
    }

    /// Set one band of one service, checking that both exist.
    pub fn set_band(
        &mut self,
        service: usize,
        band: Band,
        worker_port: u16,
    ) -> Result<(), TableError> {
        let route = self
            .services
            .get_mut(service)
            .ok_or(TableError::NoSuchService(service))?;
        if worker_port == 0 {
            return Err(TableError::ZeroPort {
                listen: route.listen,
                band,
            });
        }
        let bands = route.worker_ports.len();
        let slot = route
            .worker_ports
            .get_mut(band as usize)
            .ok_or(TableError::NoSuchBand {
                listen: route.listen,
                band,
                bands,
            })?;
        *slot = worker_port;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn band_uses_low_bits_of_ipv4() {
        let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 7));
        assert_eq!(band_of(ip, 0, 4), 3);
        assert_eq!(band_of(ip, 1, 4), 3);
        assert_eq!(band_of(ip, 2, 4), 1);
        assert_eq!(band_of(ip, 0, 1), 0);
        assert_eq!(band_of(IpAddr::V4(Ipv4Addr::new(10, 0, 1, 0)), 8, 2), 1);
    }

    #[test]
    fn band_of_ipv6_uses_last_four_bytes() {
        let v6: Ipv6Addr = "2001:db8::1:2:3:5".parse().expect("v6");
        assert_eq!(band_of(IpAddr::V6(v6), 0, 8), 5);
        let mapped = Ipv4Addr::new(192, 168, 1, 9).to_ipv6_mapped();
        assert_eq!(
            band_of(IpAddr::V6(mapped), 0, 16),
            band_of(IpAddr::V4(Ipv4Addr::new(192, 168, 1, 9)), 0, 16)
        );
    }

    #[test]
    fn band_shift_of_31_keeps_top_bit() {
        assert_eq!(band_of(IpAddr::V4(Ipv4Addr::new(128, 0, 0, 0)), 31, 2), 1);
    }

    #[test]
    fn validate_rejects_bad_tables() {
        let l = addr("127.0.0.1:8080");
        let ok = SteeringTable::uniform(&[l], 0, &[vec![9000, 9001]]);
        assert_eq!(ok.validate(), Ok(()));

        let mut t = ok.clone();
        t.services[0].worker_ports = vec![9000, 9001, 9002];
        assert_eq!(
            t.validate(),
            Err(TableError::BadBandCount {
                listen: l,
                bands: 3
            })
        );

        let mut t = ok.clone();
        t.services[0].worker_ports[1] = 0;
        assert_eq!(
            t.validate(),
            Err(TableError::ZeroPort { listen: l, band: 1 })
        );

        let t = SteeringTable {
            band_shift: 0,
            services: vec![],
        };
        assert_eq!(t.validate(), Err(TableError::NoServices));

        let many: Vec<SocketAddr> = (0..17).map(|i| SocketAddr::new(l.ip(), 8000 + i)).collect();
        let ports: Vec<Vec<u16>> = many.iter().map(|_| vec![9000]).collect();
        let t = SteeringTable::uniform(&many, 0, &ports);
        assert_eq!(t.validate(), Err(TableError::TooManyServices(17)));

        let mut t = ok.clone();
        t.band_shift = 32;
        assert_eq!(t.validate(), Err(TableError::BadShift(32)));

        let t = SteeringTable::uniform(&[l, l], 0, &[vec![1], vec![2]]);
        assert_eq!(t.validate(), Err(TableError::DuplicateService(l)));
    }

    #[test]
    fn set_band_and_lookup() {
        let l = addr("127.0.0.1:8080");
        let mut t = SteeringTable::uniform(&[l], 0, &[vec![9000, 9001]]);
        t.set_band(0, 1, 9101).expect("set band");
        assert_eq!(
            t.worker_port_for(0, "127.0.0.3".parse().expect("ip")),
            Some(9101)
        );
        assert_eq!(
            t.worker_port_for(0, "127.0.0.2".parse().expect("ip")),
            Some(9000)
        );
        assert!(matches!(
            t.set_band(0, 2, 9),
            Err(TableError::NoSuchBand { .. })
        ));
        assert!(matches!(
            t.set_band(1, 0, 9),
            Err(TableError::NoSuchService(1))
        ));
        assert!(matches!(
            t.set_band(0, 0, 0),
            Err(TableError::ZeroPort { .. })
        ));
    }
}
