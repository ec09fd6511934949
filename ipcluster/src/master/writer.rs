//! The steering writer: one thread that makes every write to the steering
//! backend (a generation's table, one band, the teardown of `stop`), in the
//! order the event loop asked for them. A write can block for long
//! (iptables-restore under load); the loop never waits for one, and learns
//! the outcome from the event the job returns (exactly one per job:
//! [`Event::WriteLost`] if the job panicked). One thread, in order: a
//! band set after a publish lands after it, in the kernel and in the loop's
//! mirror of the table.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;
use std::thread::JoinHandle;

use super::{Event, SharedSteering, lock_steering};
use crate::steering::Steering;

/// One write; its outcome goes back to the loop.
pub(super) type Job = Box<dyn FnOnce(&mut dyn Steering) -> Event + Send>;

pub(super) struct SteeringWriter {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl SteeringWriter {
    pub(super) fn start(
        steering: SharedSteering,
        events: tokio::sync::mpsc::UnboundedSender<Event>,
    ) -> std::io::Result<SteeringWriter> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("steering-writer".into())
            .spawn(move || {
                for job in queue {
                    let mut backend = lock_steering(&steering);
                    // A panicking job must not take every later write with it.
                    let event = catch_unwind(AssertUnwindSafe(|| job(backend.as_mut())))
                        .unwrap_or_else(|_| {
                            log::error!("a steering write panicked; the next ones still run");
                            Event::WriteLost
                        });
                    drop(backend);
                    // The loop is gone when the master exits: nobody to tell.
                    let _ = events.send(event);
                }
            })?;
        Ok(SteeringWriter {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Queue `job` behind the writes asked for before it. False if the writer
    /// is gone (after [`SteeringWriter::finish`]).
    pub(super) fn submit(&self, job: Job) -> bool {
        self.jobs
            .as_ref()
            .is_some_and(|jobs| jobs.send(job).is_ok())
    }

    /// Let the queued writes finish, then end the thread: the master exits
    /// with nothing half-written.
    pub(super) fn finish(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            log::error!("the steering writer thread panicked");
        }
    }
}

impl Drop for SteeringWriter {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;
    use crate::master::CountersFor;
    use crate::steering::{BackendKind, Counters, SteeringError, SteeringTable};

    /// A backend that only records what is done to it.
    struct Recorder(Arc<Mutex<Vec<String>>>);

    impl Steering for Recorder {
        fn kind(&self) -> BackendKind {
            BackendKind::Iptables
        }
        fn install(&mut self) -> Result<Option<SteeringTable>, SteeringError> {
            Ok(None)
        }
        fn publish(&mut self, _: &SteeringTable) -> Result<(), SteeringError> {
            Ok(())
        }
        fn read_table(&self) -> Result<Option<SteeringTable>, SteeringError> {
            Ok(None)
        }
        fn counters(&self) -> Result<Counters, SteeringError> {
            Ok(Counters::default())
        }
        fn teardown(&mut self) -> Result<(), SteeringError> {
            self.0.lock().expect("log").push("teardown".into());
            Ok(())
        }
    }

    fn writer() -> (
        SteeringWriter,
        tokio::sync::mpsc::UnboundedReceiver<Event>,
        Arc<Mutex<Vec<String>>>,
    ) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let steering: SharedSteering = Arc::new(Mutex::new(Box::new(Recorder(Arc::clone(&log)))));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let writer = SteeringWriter::start(steering, tx).expect("writer thread");
        (writer, rx, log)
    }

    /// A job whose outcome names it (`status` on connection `n`).
    fn marked(n: u64, log: &Arc<Mutex<Vec<String>>>) -> Job {
        let log = Arc::clone(log);
        Box::new(move |_| {
            log.lock().expect("log").push(format!("job {n}"));
            Event::Counters {
                asker: CountersFor::Status(n),
                counters: None,
            }
        })
    }

    fn mark(event: Option<Event>) -> Option<u64> {
        match event? {
            Event::Counters {
                asker: CountersFor::Status(n),
                ..
            } => Some(n),
            Event::WriteLost => Some(u64::MAX),
            _ => None,
        }
    }

    #[test]
    fn writes_run_in_order_while_the_loop_goes_on() {
        let (writer, mut events, log) = writer();
        let (open, gate) = std::sync::mpsc::channel::<()>();
        let gate = Mutex::new(gate);
        // A slow write (iptables-restore under load) ...
        assert!(writer.submit(Box::new(move |steering| {
            let _ = gate.lock().expect("gate").recv();
            let _ = steering.teardown();
            Event::WriteLost
        })));
        // ... does not hold up the loop, which asks for more meanwhile.
        assert!(writer.submit(marked(1, &log)));
        assert!(writer.submit(marked(2, &log)));
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            log.lock().expect("log").is_empty(),
            "nothing jumps the queue"
        );
        assert!(events.try_recv().is_err());
        open.send(()).expect("open the gate");
        let got: Vec<Option<u64>> = (0..3).map(|_| mark(events.blocking_recv())).collect();
        assert_eq!(got, [Some(u64::MAX), Some(1), Some(2)]);
        assert_eq!(*log.lock().expect("log"), ["teardown", "job 1", "job 2"]);
    }

    #[test]
    fn a_panicking_write_is_reported_lost_and_the_next_ones_still_run() {
        let (writer, mut events, log) = writer();
        assert!(writer.submit(Box::new(|_| panic!("a write that panics"))));
        assert!(writer.submit(marked(7, &log)));
        assert_eq!(mark(events.blocking_recv()), Some(u64::MAX));
        assert_eq!(mark(events.blocking_recv()), Some(7));
    }

    #[test]
    fn finish_lets_the_queued_writes_complete() {
        let (mut writer, mut events, log) = writer();
        for n in 0..5 {
            assert!(writer.submit(marked(n, &log)));
        }
        writer.finish();
        assert_eq!(log.lock().expect("log").len(), 5);
        let got: Vec<Option<u64>> = (0..5).map(|_| mark(events.blocking_recv())).collect();
        assert_eq!(got, [Some(0), Some(1), Some(2), Some(3), Some(4)]);
        assert!(!writer.submit(marked(9, &log)), "no write after finish");
    }
}
