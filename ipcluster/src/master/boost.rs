//! A short scheduling boost for the master's own step on a reload's critical
//! path: loading (verifying) the steering programs. Under a load that keeps
//! both cores busy, that CPU-bound step competes at equal weight with every
//! client and worker thread and took seconds (0.5 s paced, 1.4–3.7 s
//! saturating, measured with `cargo xtask bench --case reload`), while the
//! new generation cannot be published before it ends. The thread's nice
//! value is lowered for the step and put back when the guard drops.

/// How much the nice value is lowered (Linux: -20 … 19; root only).
const BOOST: i32 = 10;

/// Restores the calling thread's nice value on drop.
pub struct Boost {
    previous: Option<i32>,
}

/// The calling thread's nice value (`PRIO_PROCESS` with no pid acts on the
/// calling thread on Linux).
fn nice() -> Option<i32> {
    rustix::process::getpriority_process(None).ok()
}

fn set_nice(value: i32) -> std::io::Result<()> {
    rustix::process::setpriority_process(None, value).map_err(std::io::Error::from)
}

impl Boost {
    /// Lower the calling thread's nice value by [`BOOST`] (best effort: an
    /// unprivileged master keeps its priority and says so in the debug log).
    pub fn raise() -> Boost {
        let Some(previous) = nice() else {
            return Boost { previous: None };
        };
        let boosted = (previous - BOOST).max(-20);
        if boosted == previous || set_nice(boosted).is_err() {
            log::debug!("no scheduling boost for the steering install (nice stays {previous})");
            return Boost { previous: None };
        }
        Boost {
            previous: Some(previous),
        }
    }
}

impl Drop for Boost {
    fn drop(&mut self) {
        if let Some(previous) = self.previous
            && let Err(e) = set_nice(previous)
        {
            log::warn!("could not put the master's nice value back to {previous}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nice_value_is_restored() {
        // In a thread of its own: the test harness's other threads keep theirs.
        std::thread::spawn(|| {
            let before = nice().expect("getpriority");
            {
                let _boost = Boost::raise();
                let during = nice().expect("getpriority");
                assert!(during <= before, "{during} > {before}");
            }
            assert_eq!(nice().expect("getpriority"), before);
        })
        .join()
        .expect("the test thread");
    }
}
