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
