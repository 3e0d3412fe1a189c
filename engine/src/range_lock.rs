//! Orders overlapping writes.
//!
//! Two writes to the same block that are in flight together could reach two
//! replicas in different orders and leave them holding different bytes, each
//! having acknowledged both. The engine therefore lets a write start only when
//! no in-flight write overlaps it; writes to disjoint ranges (nearly all of
//! them) never wait.

use std::sync::Mutex;

use tokio::sync::Notify;

#[derive(Default)]
pub struct RangeLock {
    held: Mutex<Vec<(u64, u64)>>,
    released: Notify,
}

pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    range: (u64, u64),
}

impl RangeLock {
    pub fn new() -> RangeLock {
        RangeLock::default()
    }

    /// Waits until `[start, end)` overlaps no held range, then holds it.
    pub async fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            // Registered before the check, so a release between the check
            // and the await still wakes us.
            notified.as_mut().enable();
            {
                let mut held = self.held.lock().unwrap();
                if !held.iter().any(|&(s, e)| s < end && start < e) {
                    held.push((start, end));
                    return RangeGuard {
                        lock: self,
                        range: (start, end),
                    };
                }
            }
            notified.await;
        }
    }

    #[cfg(test)]
    fn held(&self) -> usize {
        self.held.lock().unwrap().len()
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.lock.held.lock().unwrap();
        if let Some(i) = held.iter().position(|&r| r == self.range) {
            held.swap_remove(i);
        }
        drop(held);
        self.lock.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn disjoint_ranges_do_not_wait() {
        let lock = RangeLock::new();
        let _a = lock.lock(0, 4096).await;
        let _b = lock.lock(4096, 8192).await;
        assert_eq!(lock.held(), 2);
    }

    #[tokio::test]
    async fn overlapping_range_waits_for_release() {
        let lock = Arc::new(RangeLock::new());
        let a = lock.lock(0, 8192).await;
        let l2 = lock.clone();
        let waiter = tokio::spawn(async move {
            let _g = l2.lock(4096, 4097).await;
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "overlapping write must wait");
        drop(a);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("released range wakes the waiter")
            .unwrap();
        assert_eq!(lock.held(), 0);
    }
}
