//! A channel of bursts, bounded by the items in them rather than by messages.
//!
//! A client's pipelined requests read together travel as one message (to the upstream
//! connection, and their reply slots to the writer): one send per burst instead of one per
//! request. The bound must still count requests, or a message of 64 would take the room of
//! one and what a client can queue would grow 64-fold. So a semaphore holds the room: a
//! sender takes a permit per item before it sends, the receiver gives them back as it takes
//! a burst. When the receiver closes or goes, senders waiting for room get their burst back.

use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc};

/// What travels: something that holds a number of items.
pub trait Burst {
    fn items(&self) -> usize;
}

impl<T> Burst for Vec<T> {
    fn items(&self) -> usize {
        self.len()
    }
}

/// A channel with room for `room` items.
pub fn channel<T: Burst>(room: usize) -> (Sender<T>, Receiver<T>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let permits = Arc::new(Semaphore::new(room));
    (
        Sender {
            tx,
            permits: permits.clone(),
            room,
        },
        Receiver { rx, permits, room },
    )
}

/// The room a burst takes: one permit per item (one longer than the whole room takes all).
fn weight(items: usize, room: usize) -> u32 {
    u32::try_from(items.min(room)).unwrap_or(u32::MAX)
}

pub struct Sender<T> {
    tx: mpsc::UnboundedSender<T>,
    permits: Arc<Semaphore>,
    room: usize,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Sender {
            tx: self.tx.clone(),
            permits: self.permits.clone(),
            room: self.room,
        }
    }
}

impl<T: Burst> Sender<T> {
    /// Waits for room, then sends; the burst comes back if the receiver is gone.
    pub async fn send(&self, burst: T) -> Result<(), T> {
        match self
            .permits
            .acquire_many(weight(burst.items(), self.room))
            .await
        {
            Ok(permit) => permit.forget(),
            Err(_) => return Err(burst),
        }
        self.tx.send(burst).map_err(|e| e.0)
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

pub struct Receiver<T> {
    rx: mpsc::UnboundedReceiver<T>,
    permits: Arc<Semaphore>,
    room: usize,
}

impl<T: Burst> Receiver<T> {
    pub async fn recv(&mut self) -> Option<T> {
        let burst = self.rx.recv().await?;
        Some(self.taken(burst))
    }

    pub fn try_recv(&mut self) -> Option<T> {
        let burst = self.rx.try_recv().ok()?;
        Some(self.taken(burst))
    }

    fn taken(&self, burst: T) -> T {
        self.permits
            .add_permits(weight(burst.items(), self.room) as usize);
        burst
    }

    /// The room this channel was made with.
    pub fn room(&self) -> usize {
        self.room
    }

    /// No more bursts are taken: senders waiting for room get theirs back, and what was
    /// sent before stays to be taken.
    pub fn close(&mut self) {
        self.rx.close();
        self.permits.close();
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.permits.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn the_bound_counts_items_not_messages() {
        let (tx, mut rx) = channel::<Vec<u8>>(10);
        tx.send(vec![0; 6]).await.expect("room for 6");
        tx.send(vec![0; 4]).await.expect("room for 4 more");
        // Full: an eleventh item waits until a burst is taken.
        let waiting = tokio::time::timeout(Duration::from_secs(1), tx.send(vec![0])).await;
        assert!(waiting.is_err(), "a full channel took another item");
        assert_eq!(rx.try_recv().map(|c| c.len()), Some(6));
        tokio::time::timeout(Duration::from_secs(1), tx.send(vec![0; 5]))
            .await
            .expect("room after a burst was taken")
            .expect("channel open");
        // A burst longer than the whole room still goes, taking all of it.
        assert_eq!(rx.try_recv().map(|c| c.len()), Some(4));
        assert_eq!(rx.try_recv().map(|c| c.len()), Some(5));
        tx.send(vec![0; 25]).await.expect("an oversized burst");
        assert_eq!(rx.try_recv().map(|c| c.len()), Some(25));
    }

    #[tokio::test(start_paused = true)]
    async fn a_sender_waiting_for_room_gets_its_burst_back_when_the_channel_closes() {
        let (tx, mut rx) = channel::<Vec<u8>>(2);
        tx.send(vec![1, 2]).await.expect("room for 2");
        let sender = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(vec![3, 4, 5]).await.err() }
        });
        tokio::task::yield_now().await;
        rx.close();
        assert_eq!(sender.await.unwrap(), Some(vec![3, 4, 5]));
        // Sent before the close: still there to be taken (and answered).
        assert_eq!(rx.try_recv(), Some(vec![1, 2]));
        drop(rx);
        assert!(tx.send(vec![6]).await.is_err());
    }
}
