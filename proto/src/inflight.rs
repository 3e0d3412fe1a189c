//! The requests a connection has started, run side by side in one task.
//!
//! Both servers (the replica daemon on its replica-protocol connections, the
//! engine on its NBD connections) read requests one after another and let
//! them complete concurrently. A task per request would do that, but every
//! task is a cache-line-aligned allocation, the dearest kind the allocator
//! has, and a 4 KiB write at depth 64 paid for one on each daemon it passed.
//! Here the connection's requests live in one [`FuturesUnordered`] instead,
//! driven by [`run_started`], and only the requests that were woken are
//! polled.
//!
//! A started request runs to its end whatever happens to the connection:
//! the writer going away only means its answer is dropped, and requests
//! left unfinished when the set itself is dropped (a connection's task
//! aborted at shutdown), or still queued for it, are handed to a task of
//! their own, as a [`LocalCall`](crate::LocalCall)'s are. A write is never
//! stopped half-done, nor dropped unstarted once its client sent it whole.

use std::future::Future;

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc;

/// Runs every request that arrives on `started` until that channel closes
/// and the last has finished, sending each one's output to `answered` as it
/// finishes. Finished requests go out before new ones start, so a full
/// queue of new requests never holds answers back. Answers nobody takes any
/// more (the writer failed) are dropped; the requests still run, and so do
/// those running or still queued on `started` if the returned future is
/// dropped before its end, even unpolled.
pub fn run_started<F>(
    started: mpsc::UnboundedReceiver<F>,
    answered: mpsc::UnboundedSender<F::Output>,
) -> impl Future<Output = ()> + Send
where
    F: Future + Send + 'static,
    F::Output: Send,
{
    let mut runner = Runner {
        started,
        running: FuturesUnordered::new(),
    };
    async move { runner.run(answered).await }
}

/// The state of [`run_started`], owned by its future from the start.
struct Runner<F: Future + Send + 'static>
where
    F::Output: Send,
{
    started: mpsc::UnboundedReceiver<F>,
    running: FuturesUnordered<F>,
}

impl<F: Future + Send + 'static> Runner<F>
where
    F::Output: Send,
{
    async fn run(&mut self, answered: mpsc::UnboundedSender<F::Output>) {
        loop {
            tokio::select! {
                biased;
                Some(answer) = self.running.next(), if !self.running.is_empty() => {
                    let _ = answered.send(answer);
                }
                next = self.started.recv() => match next {
                    Some(request) => self.running.push(request),
                    None => break,
                },
            }
        }
        while let Some(answer) = self.running.next().await {
            let _ = answered.send(answer);
        }
    }
}

impl<F: Future + Send + 'static> Drop for Runner<F>
where
    F::Output: Send,
{
    fn drop(&mut self) {
        // Requests queued but not yet taken in join the running ones, and
        // all of them go on in a task of their own.
        self.started.close();
        while let Ok(request) = self.started.try_recv() {
            self.running.push(request);
        }
        if self.running.is_empty() {
            return;
        }
        // Outside a runtime (the process is ending) there is nowhere to run
        // them; the daemon's state goes away with the process.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let mut rest = std::mem::take(&mut self.running);
            rt.spawn(async move { while rest.next().await.is_some() {} });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    /// A request that takes `ms` to finish and counts itself when it does.
    fn request(ms: u64, finished: &Arc<AtomicUsize>) -> impl Future<Output = u64> + Send + 'static {
        let finished = finished.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            finished.fetch_add(1, Ordering::SeqCst);
            ms
        }
    }

    #[tokio::test(start_paused = true)]
    async fn answers_come_in_the_order_requests_finish() {
        let finished = Arc::new(AtomicUsize::new(0));
        let (start, started) = mpsc::unbounded_channel();
        let (answer, mut answers) = mpsc::unbounded_channel();
        let runner = tokio::spawn(run_started(started, answer));
        for ms in [30, 10, 20] {
            start.send(request(ms, &finished)).unwrap();
        }
        drop(start);
        let mut got = Vec::new();
        while let Some(ms) = answers.recv().await {
            got.push(ms);
        }
        assert_eq!(got, [10, 20, 30]);
        runner.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn requests_run_on_when_nobody_takes_their_answers() {
        let finished = Arc::new(AtomicUsize::new(0));
        let (start, started) = mpsc::unbounded_channel();
        let (answer, answers) = mpsc::unbounded_channel();
        drop(answers);
        let runner = tokio::spawn(run_started(started, answer));
        for ms in [5, 50] {
            start.send(request(ms, &finished)).unwrap();
        }
        drop(start);
        runner.await.unwrap();
        assert_eq!(finished.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_left_in_a_dropped_runner_still_finish() {
        let finished = Arc::new(AtomicUsize::new(0));
        let (start, started) = mpsc::unbounded_channel();
        let (answer, mut answers) = mpsc::unbounded_channel();
        for ms in [10, 100] {
            start.send(request(ms, &finished)).unwrap();
        }
        // Polled in this task until one has answered, then dropped.
        let cut = tokio::time::timeout(Duration::from_millis(50), run_started(started, answer));
        assert!(cut.await.is_err(), "the runner ended early");
        assert_eq!(answers.recv().await, Some(10));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(finished.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_queued_for_a_runner_aborted_unpolled_still_run() {
        let finished = Arc::new(AtomicUsize::new(0));
        let (start, started) = mpsc::unbounded_channel();
        let (answer, _answers) = mpsc::unbounded_channel();
        // On this single-thread runtime the runner's task is not polled
        // before it is aborted.
        let runner = tokio::spawn(run_started(started, answer));
        for ms in [10, 20] {
            start.send(request(ms, &finished)).unwrap();
        }
        runner.abort();
        assert!(runner.await.unwrap_err().is_cancelled());
        assert!(
            start.send(request(1, &finished)).is_err(),
            "still taking requests"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(finished.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_aborted_runner_leaves_its_requests_running() {
        let finished = Arc::new(AtomicUsize::new(0));
        let (start, started) = mpsc::unbounded_channel();
        let (answer, _answers) = mpsc::unbounded_channel();
        let runner = tokio::spawn(run_started(started, answer));
        start.send(request(100, &finished)).unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        runner.abort();
        let _ = runner.await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(finished.load(Ordering::SeqCst), 1);
    }
}
