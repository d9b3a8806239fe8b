//! `FaultRelay`: an in-process TCP relay with switchable fault injection.
//!
//! It runs on its own tokio runtime (one worker thread), so it can be used
//! from plain `#[test]`s and from `#[tokio::test]`s alike.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultMode {
    /// Forward bytes both ways.
    Pass,
    /// Delay every chunk travelling upstream → client by this much.
    Delay(Duration),
    /// New connections are accepted and read but never forwarded or answered;
    /// existing connections silently drop everything in both directions.
    BlackHole,
    /// New connections are reset immediately; switching to this mode also
    /// resets (RST) all existing connections.
    Reset,
    /// Forward requests; forward only the first half of the next upstream →
    /// client chunk, then close both sides of that connection.
    Truncate,
}

pub struct FaultRelay {
    addr: SocketAddr,
    target: String,
    mode: watch::Sender<FaultMode>,
    accepted: Arc<AtomicUsize>,
    rt: Option<tokio::runtime::Runtime>,
}

impl FaultRelay {
    /// Start relaying 127.0.0.1:<ephemeral> → `target`, in `Pass` mode.
    pub fn start(target: &str) -> FaultRelay {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fault-relay")
            .enable_all()
            .build()
            .expect("build relay runtime");
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("relay bind");
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let (mode, _) = watch::channel(FaultMode::Pass);
        let accepted = Arc::new(AtomicUsize::new(0));
        {
            let _guard = rt.enter();
            let listener = TcpListener::from_std(std_listener).expect("relay listener");
            let mode_rx = mode.subscribe();
            let target = target.to_string();
            let accepted = accepted.clone();
            rt.spawn(accept_loop(listener, target, mode_rx, accepted));
        }
        FaultRelay {
            addr,
            target: target.to_string(),
            mode,
            accepted,
            rt: Some(rt),
        }
    }

    /// `127.0.0.1:PORT` clients (i.e. redfuse) should connect to.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    pub fn target(&self) -> &str {
        &self.target
    }

    pub fn set_mode(&self, mode: FaultMode) {
        self.mode.send_replace(mode);
    }

    pub fn mode(&self) -> FaultMode {
        self.mode.borrow().clone()
    }

    /// Number of connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for FaultRelay {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: String,
    mode_rx: watch::Receiver<FaultMode>,
    accepted: Arc<AtomicUsize>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        accepted.fetch_add(1, Ordering::SeqCst);
        let _ = client.set_nodelay(true);
        let mode = mode_rx.borrow().clone();
        match mode {
            FaultMode::Reset => {
                let _ = client.set_zero_linger();
                drop(client);
            }
            FaultMode::BlackHole => {
                tokio::spawn(black_hole(client, mode_rx.clone()));
            }
            _ => {
                tokio::spawn(relay_conn(client, target.clone(), mode_rx.clone()));
            }
        }
    }
}

async fn wait_reset(rx: &mut watch::Receiver<FaultMode>) {
    if rx.wait_for(|m| *m == FaultMode::Reset).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn black_hole(mut client: TcpStream, mut mode_rx: watch::Receiver<FaultMode>) {
    let mut buf = vec![0u8; 64 * 1024];
    let reset = tokio::select! {
        _ = async { while let Ok(n) = client.read(&mut buf).await { if n == 0 { break; } } } => false,
        _ = wait_reset(&mut mode_rx) => true,
    };
    if reset {
        let _ = client.set_zero_linger();
    }
}

async fn relay_conn(client: TcpStream, target: String, mode_rx: watch::Receiver<FaultMode>) {
    let upstream = match TcpStream::connect(&target).await {
        Ok(u) => u,
        Err(_) => {
            let _ = client.set_zero_linger();
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let (kill_tx, _) = watch::channel(false);
    let kill_tx = Arc::new(kill_tx);
    let a = pump(cr, uw, false, mode_rx.clone(), kill_tx.clone());
    let b = pump(ur, cw, true, mode_rx, kill_tx);
    tokio::join!(a, b);
}

enum Outcome {
    Eof,
    Truncated,
    WriteFailed,
    Reset,
    Killed,
}

async fn pump(
    mut r: OwnedReadHalf,
    mut w: OwnedWriteHalf,
    from_upstream: bool,
    mut mode_rx: watch::Receiver<FaultMode>,
    kill: Arc<watch::Sender<bool>>,
) {
    let mut kill_rx = kill.subscribe();
    let current = mode_rx.clone();
    let outcome = {
        let work = async {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match r.read(&mut buf).await {
                    Ok(0) | Err(_) => return Outcome::Eof,
                    Ok(n) => n,
                };
                let mode = current.borrow().clone();
                let data: &[u8] = match mode {
                    FaultMode::Pass => &buf[..n],
                    FaultMode::Delay(d) => {
                        if from_upstream {
                            tokio::time::sleep(d).await;
                        }
                        &buf[..n]
                    }
                    FaultMode::BlackHole => continue,
                    FaultMode::Reset => return Outcome::Reset,
                    FaultMode::Truncate => {
                        if from_upstream {
                            let _ = w.write_all(&buf[..n / 2]).await;
                            let _ = w.flush().await;
                            return Outcome::Truncated;
                        }
                        &buf[..n]
                    }
                };
                if w.write_all(data).await.is_err() {
                    return Outcome::WriteFailed;
                }
            }
        };
        tokio::select! {
            o = work => o,
            _ = wait_reset(&mut mode_rx) => Outcome::Reset,
            _ = kill_rx.wait_for(|k| *k) => Outcome::Killed,
        }
    };
    match outcome {
        Outcome::Eof => {
            // Propagate the half-close and let the other direction finish.
            let _ = w.shutdown().await;
        }
        Outcome::Truncated | Outcome::WriteFailed => {
            let _ = w.shutdown().await;
            kill.send_replace(true);
        }
        Outcome::Reset => {
            let _ = r.as_ref().set_zero_linger();
            kill.send_replace(true);
        }
        Outcome::Killed => {
            if *mode_rx.borrow() == FaultMode::Reset {
                let _ = r.as_ref().set_zero_linger();
            }
        }
    }
}
