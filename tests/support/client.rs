//! A blocking raw RESP client that works on bytes, for exact protocol checks.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::resp::{esc, frame_len, resp_cmd};

/// Default time `read_frame` waits for one complete frame.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Why `try_read_frame` returned without a frame.
#[derive(Debug)]
pub enum ReadError {
    /// No complete frame within the timeout; holds the partial bytes buffered.
    Timeout(Vec<u8>),
    /// The peer closed (EOF or reset); holds any incomplete trailing bytes.
    Closed(Vec<u8>),
    /// The bytes received are not valid RESP.
    Protocol(String),
    /// Any other I/O error.
    Io(io::Error),
}

pub struct RawClient {
    stream: TcpStream,
    addr: String,
    buf: Vec<u8>,
    pos: usize,
    closed: bool,
    timeout: Duration,
}

fn resolve(addr: &str) -> SocketAddr {
    addr.to_socket_addrs()
        .unwrap_or_else(|e| panic!("cannot resolve {addr}: {e}"))
        .next()
        .unwrap_or_else(|| panic!("no address for {addr}"))
}

impl RawClient {
    /// Connect or panic.
    pub fn connect(addr: &str) -> RawClient {
        Self::try_connect(addr)
            .unwrap_or_else(|e| panic!("RawClient: connect to {addr} failed: {e}"))
    }

    /// Connect, returning the I/O error (e.g. `ConnectionRefused`).
    pub fn try_connect(addr: &str) -> io::Result<RawClient> {
        let stream = TcpStream::connect_timeout(&resolve(addr), Duration::from_secs(5))?;
        // The peer may already have closed/reset (e.g. a connection limit);
        // that must surface on read, not here.
        let _ = stream.set_nodelay(true);
        let _ = stream.set_write_timeout(Some(Duration::from_secs(60)));
        Ok(RawClient {
            stream,
            addr: addr.to_string(),
            buf: Vec::with_capacity(64 * 1024),
            pos: 0,
            closed: false,
            timeout: DEFAULT_READ_TIMEOUT,
        })
    }

    /// Change the default timeout used by `read_frame` / `read_until_closed`.
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn local_port(&self) -> u16 {
        self.stream.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Write all bytes (panics on error).
    pub fn send(&mut self, bytes: &[u8]) {
        if let Err(e) = self.stream.write_all(bytes) {
            panic!(
                "RawClient({}): write of {} bytes failed: {e}",
                self.addr,
                bytes.len()
            );
        }
    }

    /// Write all bytes, returning the error.
    pub fn try_send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Encode `args` as a RESP command and send it (no read).
    pub fn send_cmd<A: AsRef<[u8]>>(&mut self, args: &[A]) {
        let c = resp_cmd(args);
        self.send(&c);
    }

    /// Send one command and read one frame.
    pub fn cmd<A: AsRef<[u8]>>(&mut self, args: &[A]) -> Vec<u8> {
        self.send_cmd(args);
        self.read_frame()
    }

    /// Send one command and return its frame as a lossy string (for asserting
    /// short replies like `+OK\r\n`).
    pub fn cmd_str<A: AsRef<[u8]>>(&mut self, args: &[A]) -> String {
        String::from_utf8_lossy(&self.cmd(args)).into_owned()
    }

    /// Half-close the write side.
    pub fn shutdown_write(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }

    fn buffered(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    fn compact(&mut self) {
        if self.pos > 0 && self.pos * 2 >= self.buf.len() {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
    }

    /// Read more bytes into the buffer, waiting at most until `deadline`.
    /// Ok(true) = got bytes, Ok(false) = EOF/reset, Err(TimedOut) on deadline.
    fn fill(&mut self, deadline: Instant) -> io::Result<bool> {
        if self.closed {
            return Ok(false);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(io::Error::new(ErrorKind::TimedOut, "deadline"));
        }
        let remaining = (deadline - now).max(Duration::from_millis(1));
        self.stream.set_read_timeout(Some(remaining))?;
        self.compact();
        let old = self.buf.len();
        self.buf.resize(old + 256 * 1024, 0);
        let r = self.stream.read(&mut self.buf[old..]);
        match r {
            Ok(0) => {
                self.buf.truncate(old);
                self.closed = true;
                Ok(false)
            }
            Ok(n) => {
                self.buf.truncate(old + n);
                Ok(true)
            }
            Err(e) => {
                self.buf.truncate(old);
                match e.kind() {
                    ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::BrokenPipe => {
                        self.closed = true;
                        Ok(false)
                    }
                    ErrorKind::WouldBlock | ErrorKind::TimedOut => {
                        if Instant::now() >= deadline {
                            Err(io::Error::new(ErrorKind::TimedOut, "deadline"))
                        } else {
                            Ok(true) // spurious wakeup; caller loops
                        }
                    }
                    ErrorKind::Interrupted => Ok(true),
                    _ => Err(e),
                }
            }
        }
    }

    /// Read exactly one complete RESP frame (raw bytes), waiting at most `timeout`.
    pub fn try_read_frame(&mut self, timeout: Duration) -> Result<Vec<u8>, ReadError> {
        let deadline = Instant::now() + timeout;
        loop {
            match frame_len(self.buffered()) {
                Ok(Some(n)) => {
                    let f = self.buf[self.pos..self.pos + n].to_vec();
                    self.pos += n;
                    return Ok(f);
                }
                Ok(None) => {}
                Err(e) => return Err(ReadError::Protocol(e)),
            }
            match self.fill(deadline) {
                Ok(true) => {}
                Ok(false) => return Err(ReadError::Closed(self.buffered().to_vec())),
                Err(e) if e.kind() == ErrorKind::TimedOut => {
                    return Err(ReadError::Timeout(self.buffered().to_vec()));
                }
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
    }

    /// Read exactly one complete RESP frame, panicking clearly on timeout,
    /// close, or invalid data.
    pub fn read_frame(&mut self) -> Vec<u8> {
        let t = self.timeout;
        self.read_frame_timeout(t)
    }

    pub fn read_frame_timeout(&mut self, timeout: Duration) -> Vec<u8> {
        match self.try_read_frame(timeout) {
            Ok(f) => f,
            Err(ReadError::Timeout(partial)) => panic!(
                "RawClient({}): timed out after {:?} waiting for a RESP frame; buffered: {}",
                self.addr,
                timeout,
                esc(&partial)
            ),
            Err(ReadError::Closed(partial)) => panic!(
                "RawClient({}): connection closed while waiting for a RESP frame; buffered: {}",
                self.addr,
                esc(&partial)
            ),
            Err(ReadError::Protocol(e)) => {
                panic!("RawClient({}): invalid RESP from server: {e}", self.addr)
            }
            Err(ReadError::Io(e)) => panic!("RawClient({}): read error: {e}", self.addr),
        }
    }

    /// Read one frame and return it as a lossy string.
    pub fn read_str(&mut self) -> String {
        String::from_utf8_lossy(&self.read_frame()).into_owned()
    }

    /// Read `n` frames.
    pub fn read_frames(&mut self, n: usize) -> Vec<Vec<u8>> {
        (0..n).map(|_| self.read_frame()).collect()
    }

    /// Read everything until the peer closes; returns the bytes not yet
    /// consumed as frames. Panics if the peer does not close within the
    /// client's timeout.
    pub fn read_until_closed(&mut self) -> Vec<u8> {
        let t = self.timeout;
        self.read_until_closed_timeout(t)
    }

    pub fn read_until_closed_timeout(&mut self, timeout: Duration) -> Vec<u8> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.fill(deadline) {
                Ok(true) => {}
                Ok(false) => {
                    let rest = self.buffered().to_vec();
                    self.pos = self.buf.len();
                    return rest;
                }
                Err(e) if e.kind() == ErrorKind::TimedOut => panic!(
                    "RawClient({}): connection still open after {:?} (expected close); unread: {}",
                    self.addr,
                    timeout,
                    esc(self.buffered())
                ),
                Err(e) => panic!(
                    "RawClient({}): read error while waiting for close: {e}",
                    self.addr
                ),
            }
        }
    }

    /// Wait up to `timeout` for the peer to close, keeping any data received.
    /// Returns whether it closed.
    pub fn wait_closed(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            match self.fill(deadline) {
                Ok(true) => {}
                Ok(false) => return true,
                Err(_) => return false,
            }
        }
    }

    /// Non-blocking check whether the peer has closed the connection
    /// (EOF or reset already received). Data that arrives is kept buffered.
    pub fn is_closed(&mut self) -> bool {
        if self.closed {
            return true;
        }
        if self.stream.set_nonblocking(true).is_err() {
            return true;
        }
        let mut tmp = [0u8; 64 * 1024];
        let result = loop {
            match self.stream.read(&mut tmp) {
                Ok(0) => break true,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break true,
            }
        };
        let _ = self.stream.set_nonblocking(false);
        if result {
            self.closed = true;
        }
        result
    }

    /// Bytes received but not yet returned as frames.
    pub fn pending_bytes(&self) -> &[u8] {
        self.buffered()
    }
}
