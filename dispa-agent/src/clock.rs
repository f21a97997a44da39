//! The time a connection task's wake-up began, read from the system once per poll.
//!
//! Reading the monotonic clock costs about 30 ns on the benchmark machine (vDSO, TSC), and a
//! proxied request read it about fifteen times, most of them within one poll of its
//! connection's task, microseconds apart (callgrind: 14.6 reads per request; nginx reads its
//! clock once per event-loop iteration, about 3 per request). Code running inside
//! [`Polled`] sees the instant that poll began; anywhere else [`now`] reads the clock.
//! Durations measured across polls keep their precision; within one poll they are zero,
//! which they nearly were anyway.
//!
//! [`Deadline`] bounds a future inside such a poll without a timer of its own: it tells the
//! poll when it must be looked at again ([`wanted`]), and the connection's watchdog, which
//! polls the connection's future on every wake-up of its task and holds one timer for the
//! connection's life, wakes it then. A tokio timer per request (registered in the timer wheel
//! on its first poll, removed when dropped) cost about 700 instructions per request.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

thread_local! {
    static POLL_START: Cell<Option<Instant>> = const { Cell::new(None) };
    /// The earliest deadline a [`Deadline`] waited for in the current (or last) poll.
    static WANTED: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// The instant the current connection poll began, or the clock outside one.
pub fn now() -> Instant {
    POLL_START.get().unwrap_or_else(Instant::now)
}

/// Time from `earlier` to [`now`] (zero if `earlier` is later).
pub fn since(earlier: Instant) -> Duration {
    now().saturating_duration_since(earlier)
}

/// The earliest instant a [`Deadline`] inside the last [`Polled`] poll on this thread waits
/// for; read by the connection's watchdog right after polling the connection.
pub fn wanted() -> Option<Instant> {
    WANTED.get()
}

/// Restores the enclosing poll's instant, also when the poll panics.
struct Restore(Option<Instant>);

impl Drop for Restore {
    fn drop(&mut self) {
        POLL_START.set(self.0);
    }
}

/// A future (pinned already: `Pin<&mut F>` is `Unpin`) with the clock read once at the start
/// of each of its polls. A wrapper around the connection's future, not an `async fn`, which
/// would keep the future twice in its state (+2 KiB per idle connection).
pub struct Polled<F>(pub F);

impl<F: Future + Unpin> Future for Polled<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let _restore = Restore(POLL_START.replace(Some(Instant::now())));
        WANTED.set(None);
        Pin::new(&mut self.0).poll(cx)
    }
}

/// A deadline passed before the future finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

pin_project_lite::pin_project! {
    /// `fut`, unless `at` passes first. Inside a [`Polled`] poll it keeps no timer (see the
    /// module's note); elsewhere (an HTTP/2 stream's own task) it makes a tokio timer when
    /// first left waiting.
    pub struct Deadline<F> {
        #[pin]
        fut: F,
        at: Instant,
        timer: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

impl<F: Future> Deadline<F> {
    pub fn new(at: Instant, fut: F) -> Self {
        Self {
            fut,
            at,
            timer: None,
        }
    }
}

impl<F: Future> Future for Deadline<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(v) = this.fut.poll(cx) {
            return Poll::Ready(Ok(v));
        }
        let at = *this.at;
        if let Some(start) = POLL_START.get() {
            if start >= at {
                return Poll::Ready(Err(Elapsed));
            }
            WANTED.set(Some(WANTED.get().map_or(at, |w| w.min(at))));
            return Poll::Pending;
        }
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at.into())));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Elapsed)),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    #[tokio::test]
    async fn one_reading_per_poll_and_the_clock_outside() {
        let outside = now();
        let fut = std::pin::pin!(async {
            let a = now();
            std::thread::sleep(Duration::from_millis(2));
            assert_eq!(now(), a, "the same instant within a poll");
            tokio::task::yield_now().await;
            (a, now())
        });
        let (first, second) = Polled(fut).await;
        assert!(first >= outside);
        assert!(second.duration_since(first) >= Duration::from_millis(2));
        assert!(POLL_START.get().is_none(), "cleared after the future");
        std::thread::sleep(Duration::from_millis(1));
        assert!(now() > second, "outside a poll the clock is read");
    }

    #[tokio::test]
    async fn deadlines_ask_the_poll_for_a_wake_up_and_keep_a_timer_only_outside_one() {
        let at = Instant::now() + Duration::from_millis(20);
        // Inside a poll: no timer, the deadline reported; nothing wakes it but the caller.
        let mut d = Box::pin(Deadline::new(at, std::future::pending::<()>()));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(Polled(d.as_mut()).poll_unpin(&mut cx).is_pending());
        assert_eq!(wanted(), Some(at));
        assert!(d.timer.is_none());
        tokio::time::sleep_until((at + Duration::from_millis(1)).into()).await;
        assert_eq!(
            Polled(d.as_mut()).poll_unpin(&mut cx),
            Poll::Ready(Err(Elapsed))
        );
        // Outside one: its own timer.
        let at = Instant::now() + Duration::from_millis(20);
        let r = Deadline::new(at, std::future::pending::<()>()).await;
        assert_eq!(r, Err(Elapsed));
        assert!(Instant::now() >= at);
        let r = Deadline::new(at, async { 7 }).await;
        assert_eq!(r, Ok(7));
    }
}
