//! The upstream deadline of a connection's requests, on one timer the connection keeps.
//!
//! `tokio::time::timeout` registers a timer in the runtime's timer wheel for every request and
//! removes it again, each under the wheel's lock. A request of an HTTP/1 connection comes only
//! after the one before it has been answered, so the connection can keep one timer and push
//! its deadline forward: tokio moves a registered deadline later without taking that lock.
//! Requests that overlap (HTTP/2 streams) find the timer in use and take one of their own.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// A timer kept between requests; see the module documentation.
#[derive(Debug, Default)]
pub(crate) struct Deadline {
    idle: Mutex<Option<Pin<Box<Sleep>>>>,
}

impl Deadline {
    /// `work`'s output, or `None` once `after` has passed since `start` first. `start` is a
    /// clock reading the caller already made, when the work began.
    ///
    /// A future written by hand rather than an `async fn`: that one kept `work` twice in its
    /// state, as the argument and pinned, and every future around it grew by the size of the
    /// upstream exchange (1,888 bytes instead of 920; the request's future is moved whole into
    /// its box and between awaits).
    pub(crate) fn within<F: Future>(
        &self,
        start: std::time::Instant,
        after: Duration,
        work: F,
    ) -> Within<'_, F> {
        let at = Instant::from_std(start) + after;
        let taken = crate::lock(&self.idle).take();
        let timer = match taken {
            Some(mut timer) => {
                timer.as_mut().reset(at);
                timer
            }
            None => Box::pin(tokio::time::sleep_until(at)),
        };
        Within {
            deadline: self,
            timer: Some(timer),
            work,
        }
    }
}

pin_project_lite::pin_project! {
    /// See [`Deadline::within`].
    #[derive(Debug)]
    pub(crate) struct Within<'a, F> {
        deadline: &'a Deadline,
        // Given back to the connection when done; dropped before that (the client went away),
        // it goes with the request.
        timer: Option<Pin<Box<Sleep>>>,
        #[pin]
        work: F,
    }
}

impl<F: Future> Future for Within<'_, F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let output = match this.work.poll(cx) {
            Poll::Ready(output) => Some(output),
            Poll::Pending => {
                if let Some(timer) = this.timer.as_mut()
                    && timer.as_mut().poll(cx).is_pending()
                {
                    return Poll::Pending;
                }
                None
            }
        };
        if let Some(timer) = this.timer.take() {
            *crate::lock(&this.deadline.idle) = Some(timer);
        }
        Poll::Ready(output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_request_gets_its_own_full_deadline_on_the_reused_timer() {
        let deadline = Deadline::default();
        let fast = deadline
            .within(
                std::time::Instant::now(),
                Duration::from_millis(200),
                async { 1 },
            )
            .await;
        assert_eq!(fast, Some(1));
        // The timer is kept, and the next request's deadline counts from its own start.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let slowish = deadline
            .within(
                std::time::Instant::now(),
                Duration::from_millis(200),
                tokio::time::sleep(Duration::from_millis(100)),
            )
            .await;
        assert_eq!(slowish, Some(()));
        let started = std::time::Instant::now();
        let slow = deadline
            .within(
                std::time::Instant::now(),
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
            deadline.within(std::time::Instant::now(), Duration::from_secs(5), async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                "long"
            }),
            deadline.within(
                std::time::Instant::now(),
                Duration::from_millis(100),
                tokio::time::sleep(Duration::from_secs(5)),
            ),
        );
        assert_eq!(long, Some("long"));
        assert_eq!(short, None);
    }
}
