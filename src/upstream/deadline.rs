//! The upstream deadline of a connection's requests, on one timer the connection keeps.
//!
//! `tokio::time::timeout` registers a timer in the runtime's timer wheel for every request and
//! removes it again, each under the wheel's lock. A request of an HTTP/1 connection comes only
//! after the one before it has been answered, so the connection can keep one timer and push
//! its deadline forward: tokio moves a registered deadline later without taking that lock.
//! Requests that overlap (HTTP/2 streams) find the timer in use and take one of their own.

use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::Mutex;
use std::task::Poll;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// A timer kept between requests; see the module documentation.
#[derive(Debug, Default)]
pub(crate) struct Deadline {
    idle: Mutex<Option<Pin<Box<Sleep>>>>,
}

impl Deadline {
    /// `work`'s output, or `None` once `after` has passed first.
    pub(crate) async fn within<F: Future>(&self, after: Duration, work: F) -> Option<F::Output> {
        let at = Instant::now() + after;
        let taken = crate::lock(&self.idle).take();
        let mut timer = match taken {
            Some(mut timer) => {
                timer.as_mut().reset(at);
                timer
            }
            None => Box::pin(tokio::time::sleep_until(at)),
        };
        let mut work = pin!(work);
        let output = poll_fn(|cx| {
            if let Poll::Ready(output) = work.as_mut().poll(cx) {
                return Poll::Ready(Some(output));
            }
            timer.as_mut().poll(cx).map(|()| None)
        })
        .await;
        // Dropped before this point (the client went away), the timer goes with the request.
        *crate::lock(&self.idle) = Some(timer);
        output
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_request_gets_its_own_full_deadline_on_the_reused_timer() {
        let deadline = Deadline::default();
        let fast = deadline
            .within(Duration::from_millis(200), async { 1 })
            .await;
        assert_eq!(fast, Some(1));
        // The timer is kept, and the next request's deadline counts from its own start.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let slowish = deadline
            .within(
                Duration::from_millis(200),
                tokio::time::sleep(Duration::from_millis(100)),
            )
            .await;
        assert_eq!(slowish, Some(()));
        let started = std::time::Instant::now();
        let slow = deadline
            .within(
                Duration::from_millis(200),
                tokio::time::sleep(Duration::from_secs(5)),
            )
            .await;
        assert_eq!(slow, None);
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(190), "{waited:?}");
        assert!(waited < Duration::from_secs(2), "{waited:?}");
    }

    #[tokio::test]
    async fn overlapping_requests_each_keep_their_deadline() {
        let deadline = Deadline::default();
        let (long, short) = tokio::join!(
            deadline.within(Duration::from_secs(5), async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                "long"
            }),
            deadline.within(
                Duration::from_millis(100),
                tokio::time::sleep(Duration::from_secs(5)),
            ),
        );
        assert_eq!(long, Some("long"));
        assert_eq!(short, None);
    }
}
